// The schemas of goft's ATen ops, defined once; each device file registers its kernels for them.
#include <torch/library.h>

TORCH_LIBRARY(goft, m) {
  // y = x @ T (transpose: x @ T^T), T = R_L ... R_1 diag(scale); see python/goft/ops.py.
  // angle_parameterisation: "raw" (params are the angles) or "tanh" (angle = pi * tanh(param)).
  m.def(
      "rotate(Tensor x, Tensor params, Tensor? scale=None, bool transpose=False, "
      "str angle_parameterisation=\"raw\") -> Tensor");
  // Gradients of rotate for upstream grad_out; an output not asked for in output_mask is empty.
  m.def(
      "rotate_backward(Tensor grad_out, Tensor x, Tensor params, Tensor? scale, bool transpose, "
      "bool[3] output_mask, str angle_parameterisation=\"raw\") "
      "-> (Tensor grad_x, Tensor grad_params, Tensor grad_scale)");
  // The angle gradients of rotate(x, params, transpose=transpose), no scale, from x and the
  // gradient at x: T is orthogonal, so the gradient at the output is grad_x @ T (@ T^T) and is
  // never formed (rotated_linear's backward, ops_composite.cpp).
  m.def(
      "rotate_angle_grads(Tensor x, Tensor grad_x, Tensor params, bool transpose=False, "
      "str angle_parameterisation=\"raw\") -> Tensor");
  // linear(rotate(x, params, scale), weight, bias), computed as linear(x, weight @ T^T, bias): the
  // transform applied to the weight's rows instead of x's (ops_composite.cpp).
  m.def(
      "rotated_linear(Tensor x, Tensor weight, Tensor? bias, Tensor params, Tensor? scale=None, "
      "str angle_parameterisation=\"raw\") -> Tensor");
}
