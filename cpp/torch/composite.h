// Ops of ops_composite.cpp that device kernels fall back to.
#pragma once

#include <ATen/ATen.h>

namespace goft {

// goft::rotate_angle_grads as two passes through the dispatcher (rotate on grad_x, then
// rotate_backward on x), for arguments already checked.
at::Tensor rotate_angle_grads_two_pass(const at::Tensor& x, const at::Tensor& grad_x,
                                       const at::Tensor& params, bool transpose,
                                       c10::string_view angle_parameterisation);

}  // namespace goft
