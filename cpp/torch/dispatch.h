// Typed handles of goft's ops for calls through the dispatcher from C++ (composite ops and the
// autograd kernels), so that each call reaches the kernel of the tensors' device.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace goft {

inline const auto& rotate_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("goft::rotate", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            bool, c10::string_view)>();
  return op;
}

inline const auto& rotate_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("goft::rotate_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, bool, std::array<bool, 3>, c10::string_view)>();
  return op;
}

inline const auto& rotate_angle_grads_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("goft::rotate_angle_grads", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                            c10::string_view)>();
  return op;
}

inline const auto& rotated_linear_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("goft::rotated_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view)>();
  return op;
}

}  // namespace goft
