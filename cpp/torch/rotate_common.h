// Device-independent pieces of the rotate ops' ATen bindings: the parameter dtype dispatch, the
// scale in the accumulation type, and the outputs of rotate_backward for an output_mask.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

namespace goft {

// The element type a device's kernels take for an ATen scalar type S: c10's 16-bit types pass as
// that device's own types of the same layout (the CPU core's goft::bfloat16 / goft::float16,
// CUDA's __nv_bfloat16 / __half), every other type as itself.
template <typename S, typename BFloat16As, typename HalfAs>
struct ElementAs {
  using type = S;
};
template <typename BFloat16As, typename HalfAs>
struct ElementAs<c10::BFloat16, BFloat16As, HalfAs> {
  using type = BFloat16As;
};
template <typename BFloat16As, typename HalfAs>
struct ElementAs<c10::Half, BFloat16As, HalfAs> {
  using type = HalfAs;
};

// A tensor of ATen element type S, seen as the kernels' element type E.
template <typename E, typename S>
const E* data_as(const at::Tensor& t) {
  static_assert(sizeof(E) == sizeof(S) && alignof(E) <= alignof(S), "one element, one layout");
  return reinterpret_cast<const E*>(t.const_data_ptr<S>());
}
template <typename E, typename S>
E* mutable_data_as(at::Tensor& t) {
  static_assert(sizeof(E) == sizeof(S) && alignof(E) <= alignof(S), "one element, one layout");
  return reinterpret_cast<E*>(t.mutable_data_ptr<S>());
}

// Calls fn with a value of the C++ type of a float32/float64 tensor (params and scale).
template <typename Fn>
void dispatch_param_dtype(at::ScalarType type, Fn&& fn) {
  if (type == at::kDouble) {
    fn(double{});
  } else {
    fn(float{});
  }
}

// The scale as a contiguous tensor of the accumulation type, on the scale's device.
template <typename Acc>
std::optional<at::Tensor> scale_as_acc(const std::optional<at::Tensor>& scale) {
  if (!scale.has_value()) return std::nullopt;
  return scale->to(c10::CppTypeToScalarType<Acc>::value).contiguous();
}

// The three outputs of rotate_backward. An output not asked for is an empty tensor; the others
// start uninitialised, since every kernel path writes all of them (no fill kernels per call),
// except a trivial call, which zeroes them (zero_wanted).
struct BackwardOutputs {
  bool want_x = false, want_params = false, want_scale = false;
  at::Tensor grad_x, grad_params, grad_scale;

  // Nothing to compute: no rows, or no output asked for.
  bool trivial(int64_t rows) const { return rows == 0 || (!want_x && !want_params && !want_scale); }

  // The gradients of a call without rows: zero.
  void zero_wanted() {
    if (want_x) grad_x.zero_();
    if (want_params) grad_params.zero_();
    if (want_scale) grad_scale.zero_();
  }
};

inline BackwardOutputs make_backward_outputs(const at::Tensor& x, const at::Tensor& params,
                                             const std::optional<at::Tensor>& scale,
                                             std::array<bool, 3> output_mask) {
  BackwardOutputs o;
  o.want_x = output_mask[0];
  o.want_params = output_mask[1];
  o.want_scale = output_mask[2] && scale.has_value();
  o.grad_x = o.want_x ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  o.grad_params = o.want_params ? at::empty(params.sizes(), params.options())
                                : at::empty({0}, params.options());
  o.grad_scale = o.want_scale ? at::empty(scale->sizes(), scale->options())
                              : at::empty({0}, x.options().dtype(params.scalar_type()));
  return o;
}

}  // namespace goft
