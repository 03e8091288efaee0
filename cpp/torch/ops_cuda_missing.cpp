// A build without goft's CUDA kernels (no CUDA compiler was found when it was built, or
// GOFT_CUDA=OFF) registers these for CUDA tensors instead of ops_cuda.cu's kernels, so that a
// CUDA input gets an error saying what happened and what to do, not the dispatcher's "Could not
// run 'goft::rotate' with arguments from the 'CUDA' backend".
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace goft {
namespace {

[[noreturn]] void no_cuda_kernels(const char* op, const at::Tensor& x) {
  C10_THROW_ERROR(NotImplementedError,
                  std::string(op) + ": x is on " + x.device().str() +
                      ", but this goft was built without its CUDA kernels (no CUDA compiler was "
                      "found when it was built, or GOFT_CUDA=OFF; goft._C.with_cuda is False). "
                      "Reinstall it with nvcc on PATH, against this torch: "
                      "pip install --no-build-isolation . (see README.md, Quick start)");
}

at::Tensor rotate_without_cuda(const at::Tensor& x, const at::Tensor&, const std::optional<at::Tensor>&, bool,
                               c10::string_view) {
  no_cuda_kernels("goft.rotate", x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rotate_backward_without_cuda(
    const at::Tensor&, const at::Tensor& x, const at::Tensor&, const std::optional<at::Tensor>&, bool,
    std::array<bool, 3>, c10::string_view) {
  no_cuda_kernels("goft.rotate_backward", x);
}

at::Tensor rotate_angle_grads_without_cuda(const at::Tensor& x, const at::Tensor&, const at::Tensor&, bool,
                                           c10::string_view) {
  no_cuda_kernels("goft.rotate_angle_grads", x);
}

}  // namespace

TORCH_LIBRARY_IMPL(goft, CUDA, m) {
  m.impl("rotate", &rotate_without_cuda);
  m.impl("rotate_backward", &rotate_backward_without_cuda);
  m.impl("rotate_angle_grads", &rotate_angle_grads_without_cuda);
}

}  // namespace goft
