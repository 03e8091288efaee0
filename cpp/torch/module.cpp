// The goft._C extension module: loading it registers the ops; it also exposes build facts.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <utility>
#include <vector>

#include "cpu_lanes.h"
#include "goft/schedule.h"

namespace {

// The pair schedule as the kernels use it: one list of (a, b) pairs per layer, for tests.
std::vector<std::vector<std::pair<int64_t, int64_t>>> pair_schedule(int64_t dim) {
  const goft::PairSchedule schedule = goft::make_schedule(dim);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> layers(schedule.num_layers);
  for (int r = 0; r < schedule.num_layers; ++r) {
    const int64_t s = schedule.stride(r);
    for (int64_t k = 0; k < schedule.pairs[r]; ++k) layers[r].emplace_back(2 * s * k, 2 * s * k + s);
  }
  return layers;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "goft's compiled ops (torch.ops.goft.*) and build information";
  m.def("pair_schedule", &pair_schedule, pybind11::arg("dim"),
        "The layers of (a, b) feature pairs that the kernels rotate for width dim.");
  m.def("cpu_lane_bytes", &goft::cpu_lane_bytes,
        "Bytes per SIMD chunk of the CPU kernels in this process: 64 (AVX-512), 32 (AVX2) or 16.");
#ifdef GOFT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
