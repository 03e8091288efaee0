// The goft ops defined for every device in terms of goft::rotate and goft::rotate_backward (called
// through the dispatcher, so each device's kernels serve them):
// - rotated_linear: rotate on the weight's rows, then at::linear. Its autograd (which saves x,
//   not the rotated weight) is in ops_autograd.cpp, its fake kernel in python/goft/ops.py.
// - rotate_angle_grads: the reference form, two passes; ops_cuda.cu has a one-pass kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "composite.h"
#include "dispatch.h"

namespace goft {
namespace {

at::Tensor rotated_linear(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& params,
                          const std::optional<at::Tensor>& scale,
                          c10::string_view angle_parameterisation) {
  const char* op = "goft.rotated_linear";
  check_rotate_args(op, x, params, scale, angle_parameterisation);
  check_linear_args(op, x, weight, bias);
  // (x T) W^T = x (W T^T)^T, and W T^T is rotate(W) with the transpose.
  const at::Tensor rotated_weight =
      rotate_op().call(weight, params, scale, true, angle_parameterisation);
  return at::linear(x, rotated_weight, bias);
}

at::Tensor rotate_angle_grads(const at::Tensor& x, const at::Tensor& grad_x,
                              const at::Tensor& params, bool transpose,
                              c10::string_view angle_parameterisation) {
  check_angle_grads_args("goft.rotate_angle_grads", x, grad_x, params, angle_parameterisation);
  return rotate_angle_grads_two_pass(x, grad_x, params, transpose, angle_parameterisation);
}

}  // namespace

at::Tensor rotate_angle_grads_two_pass(const at::Tensor& x, const at::Tensor& grad_x,
                                       const at::Tensor& params, bool transpose,
                                       c10::string_view angle_parameterisation) {
  // grad_x = grad_y T^T (grad_y T when transposed) with T orthogonal: grad_y = grad_x T (T^T),
  // which is rotate with the same transpose.
  const at::Tensor grad_y =
      rotate_op().call(grad_x, params, std::nullopt, transpose, angle_parameterisation);
  return std::get<1>(rotate_backward_op().call(grad_y, x, params, std::nullopt, transpose,
                                               {false, true, false}, angle_parameterisation));
}

TORCH_LIBRARY_IMPL(goft, CompositeExplicitAutograd, m) {
  m.impl("rotated_linear", &rotated_linear);
  m.impl("rotate_angle_grads", &rotate_angle_grads);
}

}  // namespace goft
