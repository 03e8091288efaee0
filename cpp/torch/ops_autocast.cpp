// Autocast kernels: under torch.autocast, goft::rotated_linear computes what linear(rotate(x), W)
// computes there. rotate keeps x's dtype (it is not on autocast's lists), and linear casts x,
// the weight and the bias to the autocast dtype; this kernel casts the same three before the
// op, so the autograd kernel below it sees one dtype (its backward multiplies grad_y by the
// weight), and the fake kernel, which torch.compile traces with the casts, gives the same dtype
// as eager. params and the scale stay float32: they are the adapter's, like rotate's.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>

#include "dispatch.h"

namespace goft {
namespace {

template <c10::DeviceType device_type>
at::Tensor rotated_linear_autocast(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& params,
                                   const std::optional<at::Tensor>& scale,
                                   c10::string_view angle_parameterisation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  // cached_cast leaves float64 and tensors of other devices as they are, as for at::linear.
  return rotated_linear_op().call(at::autocast::cached_cast(dtype, x, device_type),
                                  at::autocast::cached_cast(dtype, weight, device_type),
                                  at::autocast::cached_cast(dtype, bias, device_type), params, scale,
                                  angle_parameterisation);
}

TORCH_LIBRARY_IMPL(goft, AutocastCPU, m) {
  m.impl("rotated_linear", &rotated_linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(goft, AutocastCUDA, m) {
  m.impl("rotated_linear", &rotated_linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace
}  // namespace goft
