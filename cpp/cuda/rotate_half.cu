// goft's CUDA launchers (goft/cuda/rotate.cuh) for float16 x (float accumulation).
// One file per element type: they compile in parallel.
#include "goft/cuda/rotate.cuh"

GOFT_CUDA_INSTANTIATE_ROTATE(__half)
