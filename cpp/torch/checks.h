// Argument validation shared by every device's kernels: errors name the op, the argument, what
// was expected and what came.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <sstream>
#include <string>

#include "goft/blocks.h"

namespace goft {

inline std::string shape_string(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << sizes[i] << (sizes.size() == 1 ? "," : (i + 1 < sizes.size() ? ", " : ""));
  out << ")";
  return out.str();
}

inline bool is_supported_x_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// What the checks learnt about the call.
struct RotateShape {
  int64_t dim;              // d, the last dimension of x
  int64_t rows;             // product of the leading dimensions
  bool params_are_blocks;   // (d-1, 2, 2) quasi blocks rather than (d-1,) angles
  AngleParameterisation angles;  // how angle parameters become angles (kRaw for blocks)
};

// None passed from Python arrives as an undefined tensor. Checked first, and by the autograd
// kernels too (ops_autograd.cpp), which run before the device kernels' checks.
inline void check_x_and_params_given(const char* op, const at::Tensor& x,
                                     const at::Tensor& params) {
  TORCH_CHECK(x.defined(), op, ": expected x to be a tensor of shape (..., d), got None");
  TORCH_CHECK(params.defined(), op, ": expected params to be a tensor of angles (d-1,) or blocks (d-1, 2, 2), got None");
}

// Sparse (or other non-strided) tensors reach a composite op's kernel, which would pass them on
// to rotate and fail there, naming rotate or no goft op at all.
inline void check_strided(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": expected ", name, " to be a dense (strided) tensor, got layout ",
              t.layout());
}

// The ops' angle_parameterisation argument: "raw" (params are the angles) or "tanh" (the angle is
// pi * tanh(param)); free blocks take no parameterisation.
inline AngleParameterisation check_angle_parameterisation(const char* op, c10::string_view value,
                                                          bool params_are_blocks) {
  const bool is_tanh = value == "tanh";
  TORCH_CHECK(is_tanh || value == "raw", op,
              ": expected angle_parameterisation \"raw\" or \"tanh\", got \"", value, "\"");
  TORCH_CHECK(!(is_tanh && params_are_blocks), op,
              ": angle_parameterisation \"tanh\" maps angles, but params are free 2x2 blocks "
              "(qGOFT); pass \"raw\" with blocks");
  return is_tanh ? AngleParameterisation::kPiTanh : AngleParameterisation::kRaw;
}

inline RotateShape check_rotate_args(const char* op, const at::Tensor& x, const at::Tensor& params,
                                     const std::optional<at::Tensor>& scale,
                                     c10::string_view angle_parameterisation) {
  check_x_and_params_given(op, x, params);
  check_strided(op, "x", x);
  check_strided(op, "params", params);
  TORCH_CHECK(x.dim() >= 1, op, ": expected x of shape (..., d) with at least one dimension, got a 0-d tensor");
  TORCH_CHECK(is_supported_x_dtype(x.scalar_type()), op,
              ": expected x of dtype float32, float64, bfloat16 or float16, got ", x.scalar_type());
  const int64_t d = x.size(-1);
  TORCH_CHECK(d >= 1, op, ": expected x with a last dimension d >= 1, got shape ", shape_string(x.sizes()));
  const int64_t pairs = d - 1;
  TORCH_CHECK(params.scalar_type() == at::kFloat || params.scalar_type() == at::kDouble, op,
              ": expected params of dtype float32 or float64, got ", params.scalar_type());
  const bool is_angles = params.dim() == 1 && params.size(0) == pairs;
  const bool is_blocks = params.dim() == 3 && params.size(0) == pairs && params.size(1) == 2 &&
                         params.size(2) == 2;
  TORCH_CHECK(is_angles || is_blocks, op, ": expected params of shape (", pairs, ",) or (", pairs,
              ", 2, 2) for d=", d, ", got ", shape_string(params.sizes()));
  TORCH_CHECK(params.device() == x.device(), op, ": expected params on x's device ", x.device(),
              ", got ", params.device());
  if (scale.has_value()) {
    const at::Tensor& s = *scale;
    check_strided(op, "scale", s);
    TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, op,
                ": expected scale of dtype float32 or float64, got ", s.scalar_type());
    TORCH_CHECK(s.dim() == 1 && s.size(0) == d, op, ": expected scale of shape (", d, ",) for d=", d,
                ", got ", shape_string(s.sizes()));
    TORCH_CHECK(s.device() == x.device(), op, ": expected scale on x's device ", x.device(), ", got ",
                s.device());
  }
  return RotateShape{d, d == 0 ? 0 : x.numel() / d, is_blocks,
                     check_angle_parameterisation(op, angle_parameterisation, is_blocks)};
}

// The linear layer's arguments of rotated_linear, after check_rotate_args has checked x.
inline void check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.defined(), op, ": expected weight to be a tensor of shape (out, ", d,
              "), got None");
  check_strided(op, "weight", weight);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == d, op, ": expected weight of shape (out, ", d,
              ") for x of shape ", shape_string(x.sizes()), ", got ", shape_string(weight.sizes()));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": expected weight of x's dtype ",
              x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": expected weight on x's device ", x.device(),
              ", got ", weight.device());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_strided(op, "bias", b);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), op, ": expected bias of shape (",
                weight.size(0), ",), got ", shape_string(b.sizes()));
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, ": expected bias of x's dtype ",
                x.scalar_type(), ", got ", b.scalar_type());
    TORCH_CHECK(b.device() == x.device(), op, ": expected bias on x's device ", x.device(),
                ", got ", b.device());
  }
}

// A gradient the op takes beside x (grad_out of rotate_backward, grad_x of rotate_angle_grads):
// x's shape, dtype and device; `name` is the argument's name.
inline void check_grad_like_x(const char* op, const char* name, const at::Tensor& grad,
                              const at::Tensor& x) {
  TORCH_CHECK(grad.defined(), op, ": expected ", name, " to be a tensor of x's shape ",
              shape_string(x.sizes()), ", got None");
  check_strided(op, name, grad);
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": expected ", name, " of x's shape ",
              shape_string(x.sizes()), ", got ", shape_string(grad.sizes()));
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": expected ", name, " of x's dtype ",
              x.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == x.device(), op, ": expected ", name, " on x's device ", x.device(),
              ", got ", grad.device());
}

// rotate_angle_grads: the gradient at x determines the parameter gradients only when T is
// orthogonal, that is for angles without a scale.
inline RotateShape check_angle_grads_args(const char* op, const at::Tensor& x,
                                          const at::Tensor& grad_x, const at::Tensor& params,
                                          c10::string_view angle_parameterisation) {
  const RotateShape shape = check_rotate_args(op, x, params, std::nullopt, angle_parameterisation);
  TORCH_CHECK(!shape.params_are_blocks, op, ": expected params of shape (", shape.dim - 1,
              ",) (angles): free 2x2 blocks (qGOFT) do not make an orthogonal transform, so the "
              "gradient at x does not determine theirs; got ", shape_string(params.sizes()),
              ". Use torch.ops.goft.rotate_backward with the gradient at the output instead");
  check_grad_like_x(op, "grad_x", grad_x, x);
  return shape;
}

// A (rows, d) view of t with contiguous features, copying only when no such view exists.
inline at::Tensor as_rows(const at::Tensor& t, int64_t rows, int64_t d) {
  if (t.stride(-1) == 1 || d == 1) {
    return t.reshape({rows, d});
  }
  return t.contiguous().view({rows, d});
}

}  // namespace goft
