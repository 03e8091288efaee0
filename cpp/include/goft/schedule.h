// The GOFT pair schedule (GOFT_SPEC.md section 2), written once and shared by every kernel.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GOFT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GOFT_HOST_DEVICE inline
#endif

namespace goft {

// 64 layers cover any d that fits in int64_t: the layer count is ceil(log2 d).
constexpr int kMaxLayers = 64;

// Layer r (0-based here, r = 0 is the spec's layer 1) rotates pairs (2*s*k, 2*s*k + s) for
// k < pairs[r], with s = 2^r. Parameters are stored flat, layer 0 first, so pair k of layer r
// owns parameter row offset[r] + k. The pair counts add up to d - 1.
struct PairSchedule {
  int64_t dim = 0;
  int num_layers = 0;
  int64_t pairs[kMaxLayers] = {};
  int64_t offset[kMaxLayers] = {};

  GOFT_HOST_DEVICE int64_t stride(int layer) const { return int64_t{1} << layer; }
  GOFT_HOST_DEVICE int64_t num_pairs() const { return dim > 0 ? dim - 1 : 0; }
};

// Builds the schedule of spec section 2: c active features, halved (rounding up) per layer.
GOFT_HOST_DEVICE PairSchedule make_schedule(int64_t dim) {
  PairSchedule schedule;
  schedule.dim = dim;
  int64_t active = dim;
  int64_t offset = 0;
  while (active > 1) {
    const int64_t pairs = active / 2;
    schedule.pairs[schedule.num_layers] = pairs;
    schedule.offset[schedule.num_layers] = offset;
    offset += pairs;
    active -= pairs;
    ++schedule.num_layers;
  }
  return schedule;
}

}  // namespace goft
