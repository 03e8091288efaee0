// goft's CUDA launchers (goft/cuda/rotate.cuh) for float64 x, with the double-accumulation
// parameter conversions and reductions. One file per element type: they compile in parallel.
#include "goft/cuda/rotate.cuh"

GOFT_CUDA_INSTANTIATE_ROTATE(double)
GOFT_CUDA_INSTANTIATE_PARAMS(double)
