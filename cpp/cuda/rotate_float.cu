// goft's CUDA launchers (goft/cuda/rotate.cuh) for float32 x, with the float-accumulation
// parameter conversions and reductions. One file per element type: they compile in parallel.
#include "goft/cuda/rotate.cuh"

GOFT_CUDA_INSTANTIATE_ROTATE(float)
GOFT_CUDA_INSTANTIATE_PARAMS(float)
