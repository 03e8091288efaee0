// Autograd of goft::rotate and goft::rotated_linear, registered for the Autograd dispatch key.
// In C++ rather than through torch.library's Python wrapper, which costs tens of microseconds of
// host time per call, in the forward and for every op the backward calls (bench/host_bench.py):
// on a GPU with small batches the host time of a layer step can exceed its kernels'. The
// backward's ops go through the dispatcher like any call, so torch.compile traces them with
// their fake kernels (python/goft/ops.py).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "dispatch.h"

namespace goft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// (grad_x, grad_params, grad_scale) of rotate for those `mask` asks for, undefined otherwise.
std::array<at::Tensor, 3> rotate_grads(const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& params, const at::Tensor& scale,
                                       bool transpose, std::array<bool, 3> mask,
                                       c10::string_view angle_parameterisation) {
  if (!mask[0] && !mask[1] && !mask[2]) return {};
  auto [gx, gp, gs] = rotate_backward_op().call(grad_out.contiguous(), x, params,
                                                optional_tensor(scale), transpose, mask,
                                                angle_parameterisation);
  return {mask[0] ? gx : at::Tensor(), mask[1] ? gp : at::Tensor(), mask[2] ? gs : at::Tensor()};
}

// y = rotate(x, params, scale, transpose, angle_parameterisation); the backward saves x only (the
// op is one pass).
class RotateFunction : public torch::autograd::Function<RotateFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& params,
                            const std::optional<at::Tensor>& scale, bool transpose,
                            c10::string_view angle_parameterisation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x, params, scale.value_or(at::Tensor())});
    ctx->saved_data["transpose"] = transpose;
    ctx->saved_data["angle_parameterisation"] = std::string(angle_parameterisation);
    return rotate_op().call(x, params, scale, transpose, angle_parameterisation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &params = saved[1], &scale = saved[2];
    // Inputs that are tensors are numbered in order, the scale only when given.
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      scale.defined() && ctx->needs_input_grad(2)};
    const auto grads = rotate_grads(grad_outputs[0], x, params, scale,
                                    ctx->saved_data["transpose"].toBool(), mask,
                                    ctx->saved_data["angle_parameterisation"].toStringRef());
    return {grads[0], grads[1], grads[2], at::Tensor(), at::Tensor()};
  }
};

// y = linear(x, weight @ T^T, bias) (ops_composite.cpp). The backward saves x, not the rotated
// weight, and for angles without a scale (T orthogonal) rotates no activations either: grad_x =
// grad_y (W T^T) with the weight rotated again, and the angle gradients from x and grad_x in one
// pass (rotate_angle_grads). Otherwise grad_y W, then the rotation's backward on x.
class RotatedLinearFunction : public torch::autograd::Function<RotatedLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& params,
                            const std::optional<at::Tensor>& scale,
                            c10::string_view angle_parameterisation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x, weight, params, scale.value_or(at::Tensor())});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["angle_parameterisation"] = std::string(angle_parameterisation);
    return rotated_linear_op().call(x, weight, bias, params, scale, angle_parameterisation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &params = saved[2], &scale = saved[3];
    const at::Tensor& grad_y = grad_outputs[0];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::string& angles = ctx->saved_data["angle_parameterisation"].toStringRef();
    // Tensor inputs in order: x, weight, the bias if given, params, the scale if given.
    const int bias_edge = has_bias ? 2 : -1;
    const int params_edge = has_bias ? 3 : 2;
    const bool need_x = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1);
    const bool need_bias = has_bias && ctx->needs_input_grad(bias_edge);
    const bool need_params = ctx->needs_input_grad(params_edge);
    const bool need_scale = scale.defined() && ctx->needs_input_grad(params_edge + 1);
    at::Tensor grad_x, grad_weight, grad_bias, grad_params, grad_scale;
    if (!scale.defined() && params.dim() == 1 && (need_x || need_params)) {
      grad_x = grad_y.matmul(rotate_op().call(weight, params, std::nullopt, true, angles));
      if (need_params) grad_params = rotate_angle_grads_op().call(x, grad_x, params, false, angles);
      if (!need_x) grad_x = at::Tensor();
    } else if (need_x || need_params || need_scale) {
      const auto grads = rotate_grads(grad_y.matmul(weight), x, params, scale, false,
                                      {need_x, need_params, need_scale}, angles);
      grad_x = grads[0];
      grad_params = grads[1];
      grad_scale = grads[2];
    }
    // Symbolic sizes: torch.compile traces this function with dynamic shapes.
    const at::Tensor rows_grad = grad_y.reshape_symint({-1, grad_y.sym_size(-1)});
    if (need_weight) {
      // W' = W T^T, so dL/dW = (dL/dW') T with dL/dW' = grad_y^T x over all rows.
      const at::Tensor grad_rotated = rows_grad.t().matmul(x.reshape_symint({-1, x.sym_size(-1)}));
      grad_weight = rotate_op().call(grad_rotated, params, optional_tensor(scale), false, angles);
    }
    if (need_bias) grad_bias = rows_grad.sum(0);
    return {grad_x, grad_weight, grad_bias, grad_params, grad_scale, at::Tensor()};
  }
};

// goft's gradient ops (rotate_backward, rotate_angle_grads) are not differentiable again. Their
// Autograd kernels give the outputs a node that raises when a backward reaches it: a second
// derivative, e.g. torch.autograd.grad(..., create_graph=True) followed by another backward.
// Without them, PyTorch's fallback for ops lacking an autograd kernel only warns and lets those
// gradients through as zeros, a wrong result without an error.
constexpr const char* kNotTwiceDifferentiable =
    ": second derivatives (a backward through goft's gradients, e.g. after torch.autograd.grad("
    "..., create_graph=True)) are not supported; goft's ops are differentiable once";

class RotateBackwardFunction : public torch::autograd::Function<RotateBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out,
                               const at::Tensor& x, const at::Tensor& params,
                               const std::optional<at::Tensor>& scale, bool transpose,
                               std::array<bool, 3> output_mask,
                               c10::string_view angle_parameterisation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [gx, gp, gs] = rotate_backward_op().call(grad_out, x, params, scale, transpose,
                                                  output_mask, angle_parameterisation);
    return {gx, gp, gs};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "goft.rotate_backward", kNotTwiceDifferentiable);
  }
};

class RotateAngleGradsFunction : public torch::autograd::Function<RotateAngleGradsFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& grad_x,
                            const at::Tensor& params, bool transpose,
                            c10::string_view angle_parameterisation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return rotate_angle_grads_op().call(x, grad_x, params, transpose, angle_parameterisation);
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "goft.rotate_angle_grads", kNotTwiceDifferentiable);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> rotate_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& params,
    const std::optional<at::Tensor>& scale, bool transpose, std::array<bool, 3> output_mask,
    c10::string_view angle_parameterisation) {
  // Without grad mode (any first-order backward) there is no graph to guard: the kernel itself.
  // Undefined inputs go there too, whose checks name them.
  if (!at::GradMode::is_enabled() || !grad_out.defined() || !x.defined() || !params.defined()) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return rotate_backward_op().call(grad_out, x, params, scale, transpose, output_mask,
                                     angle_parameterisation);
  }
  const variable_list grads = RotateBackwardFunction::apply(grad_out, x, params, scale, transpose,
                                                            output_mask, angle_parameterisation);
  return {grads[0], grads[1], grads[2]};
}

at::Tensor rotate_angle_grads_autograd(const at::Tensor& x, const at::Tensor& grad_x,
                                       const at::Tensor& params, bool transpose,
                                       c10::string_view angle_parameterisation) {
  if (!at::GradMode::is_enabled() || !x.defined() || !grad_x.defined() || !params.defined()) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return rotate_angle_grads_op().call(x, grad_x, params, transpose, angle_parameterisation);
  }
  return RotateAngleGradsFunction::apply(x, grad_x, params, transpose, angle_parameterisation);
}

at::Tensor rotate_autograd(const at::Tensor& x, const at::Tensor& params,
                           const std::optional<at::Tensor>& scale, bool transpose,
                           c10::string_view angle_parameterisation) {
  check_x_and_params_given("goft.rotate", x, params);
  return RotateFunction::apply(x, params, scale, transpose, angle_parameterisation);
}

at::Tensor rotated_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& params,
                                   const std::optional<at::Tensor>& scale,
                                   c10::string_view angle_parameterisation) {
  check_x_and_params_given("goft.rotated_linear", x, params);
  TORCH_CHECK(weight.defined(),
              "goft.rotated_linear: expected weight to be a tensor of shape (out, d), got None");
  return RotatedLinearFunction::apply(x, weight, bias, params, scale, angle_parameterisation);
}

}  // namespace

TORCH_LIBRARY_IMPL(goft, Autograd, m) {
  m.impl("rotate", &rotate_autograd);
  m.impl("rotated_linear", &rotated_linear_autograd);
  m.impl("rotate_backward", &rotate_backward_autograd);
  m.impl("rotate_angle_grads", &rotate_angle_grads_autograd);
}

}  // namespace goft
