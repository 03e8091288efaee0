// goft::rotated_linear for every device: goft::rotate on the weight's rows, then at::linear,
// both through the dispatcher, so each device's rotate kernel serves it. Its autograd (which
// saves x, not the rotated weight) and fake kernel are in python/goft/ops.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"

namespace goft {
namespace {

at::Tensor rotated_linear(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& params,
                          const std::optional<at::Tensor>& scale) {
  const char* op = "goft.rotated_linear";
  check_rotate_args(op, x, params, scale);
  check_linear_args(op, x, weight, bias);
  static const auto rotate =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("goft::rotate", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            bool)>();
  // (x T) W^T = x (W T^T)^T, and W T^T is rotate(W) with the transpose.
  const at::Tensor rotated_weight = rotate.call(weight, params, scale, true);
  return at::linear(x, rotated_weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(goft, CompositeExplicitAutograd, m) {
  m.impl("rotated_linear", &rotated_linear);
}

}  // namespace goft
