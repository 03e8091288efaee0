// CUDA kernels of goft::rotate and goft::rotate_backward: validate (checks.h), fill the core's
// args, plan and launch the core's kernels (goft/cuda/rotate_api.h) on the current stream.
// Same semantics as ops_cpu.cpp; parameter gradients are reduced in a fixed order, so they are
// bitwise identical run to run on a given GPU model.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "composite.h"
#include "goft/blocks.h"
#include "goft/cuda/rotate_api.h"
#include "goft/params.h"
#include "rotate_common.h"

namespace goft {
namespace {

// The CUDA type the kernels use for an ATen scalar type.
template <typename S>
using kernel_t = typename ElementAs<S, __nv_bfloat16, __half>::type;

#ifndef GOFT_CUDA_ARCH_LIST  // the build's TORCH_CUDA_ARCH_LIST, set by CMakeLists.txt
#define GOFT_CUDA_ARCH_LIST "(not recorded)"
#endif

// A failed CUDA call as an error that names the op. On a GPU the kernels were not compiled for,
// the first plan fails (cudaFuncGetAttributes: cudaErrorNoKernelImageForDevice): the message
// says which GPU it is and how to build goft for it.
void check_cuda(const char* op, cudaError_t status) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();  // not a sticky error: clear it, or the next CUDA call reports it again
  if (status == cudaErrorNoKernelImageForDevice) {
    int device = 0;
    cudaDeviceProp properties{};
    const bool known = cudaGetDevice(&device) == cudaSuccess &&
                       cudaGetDeviceProperties(&properties, device) == cudaSuccess;
    TORCH_CHECK(!known, op, ": goft's CUDA kernels were not built for this GPU (", properties.name,
                ", compute capability ", properties.major, ".", properties.minor, "; built for ",
                GOFT_CUDA_ARCH_LIST, "); rebuild goft for it: TORCH_CUDA_ARCH_LIST=\"", properties.major,
                ".", properties.minor, "\" pip install --no-build-isolation --force-reinstall --no-deps "
                "<the goft source folder>");
  }
  TORCH_CHECK(false, op, ": CUDA error: ", cudaGetErrorName(status), ": ", cudaGetErrorString(status));
}

at::Tensor workspace_tensor(int64_t bytes, const at::Tensor& like) {
  return at::empty({bytes}, like.options().dtype(at::kByte));
}

// The op's parameters for the launchers, which build the blocks on the device themselves.
// `contiguous` keeps a contiguous copy alive (if one was needed) until the launches are queued;
// the caching allocator orders its reuse on the stream.
cuda::ParamSource param_source(const at::Tensor& params, const RotateShape& shape,
                               at::Tensor* contiguous) {
  *contiguous = params.contiguous();
  cuda::ParamSource source;
  source.data = contiguous->const_data_ptr();
  source.is_double = contiguous->scalar_type() == at::kDouble;
  source.are_blocks = shape.params_are_blocks;
  source.angles = shape.angles;
  return source;
}

template <typename S>
void rotate_into(const char* op, const at::Tensor& x2, const at::Tensor& params, const RotateShape& shape,
                 const std::optional<at::Tensor>& scale, bool transpose, at::Tensor& out2) {
  using T = kernel_t<S>;
  using Acc = at::opmath_type<S>;
  static_assert(std::is_same<Acc, typename cuda::AccOf<T>::type>::value, "accumulation types differ");
  const int64_t rows = x2.size(0), d = x2.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor params_c;
  const cuda::ParamSource source = param_source(params, shape, &params_c);
  const std::optional<at::Tensor> scale_acc = scale_as_acc<Acc>(scale);
  cuda::RotatePlan plan;
  check_cuda(op, cuda::plan_rotate<T>(rows, d, transpose, x2.get_device(), &plan));
  at::Tensor workspace = workspace_tensor(plan.workspace.bytes, x2);
  RotateArgs<T, Acc> args;
  args.rows = rows;
  args.dim = d;
  args.x = data_as<T, S>(x2);
  args.x_row_stride = x2.stride(0);
  args.out = mutable_data_as<T, S>(out2);
  args.out_row_stride = out2.stride(0);
  args.scale = scale_acc.has_value() ? scale_acc->const_data_ptr<Acc>() : nullptr;
  args.transpose = transpose;
  check_cuda(op, cuda::launch_rotate<T>(args, source, plan, workspace.mutable_data_ptr(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rotate_cuda(const at::Tensor& x, const at::Tensor& params,
                       const std::optional<at::Tensor>& scale, bool transpose,
                       c10::string_view angle_parameterisation) {
  const RotateShape shape = check_rotate_args("goft.rotate", x, params, scale, angle_parameterisation);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (shape.rows == 0) return out;
  const at::Tensor x2 = as_rows(x, shape.rows, shape.dim);
  at::Tensor out2 = out.view({shape.rows, shape.dim});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "goft.rotate", [&] {
    rotate_into<scalar_t>("goft.rotate", x2, params, shape, scale, transpose, out2);
  });
  return out;
}

template <typename S>
cuda::RotateBackwardPlan plan_backward(const char* op, const at::Tensor& x2, bool transpose,
                                       bool scale_grad, bool strict) {
  cuda::RotateBackwardPlan plan;
  check_cuda(op, cuda::plan_rotate_backward<kernel_t<S>>(x2.size(0), x2.size(1), transpose, scale_grad,
                                                         strict, x2.get_device(), &plan));
  return plan;
}

// x_is_output: x2 holds rotate(x) (strict fused plans, no scale; launch_rotate_backward).
template <typename S>
void rotate_backward_into(const char* op, const cuda::RotateBackwardPlan& plan, const at::Tensor& grad2,
                          const at::Tensor& x2, bool x_is_output, const at::Tensor& params,
                          const RotateShape& shape, const std::optional<at::Tensor>& scale,
                          bool transpose, at::Tensor* grad_x2, at::Tensor* grad_params,
                          at::Tensor* grad_scale) {
  using T = kernel_t<S>;
  using Acc = at::opmath_type<S>;
  const int64_t d = x2.size(1), pairs = d - 1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor params_c;
  const cuda::ParamSource source = param_source(params, shape, &params_c);
  const std::optional<at::Tensor> scale_acc = scale_as_acc<Acc>(scale);
  const auto acc_options = x2.options().dtype(c10::CppTypeToScalarType<Acc>::value);
  const int64_t per_pair = plan.angle_partials() ? 1 : kBlockSize;
  at::Tensor block_partials = at::empty({plan.num_partials, pairs, per_pair}, acc_options);
  at::Tensor scale_partials;
  if (grad_scale != nullptr) scale_partials = at::empty({plan.num_partials, d}, acc_options);
  at::Tensor workspace = workspace_tensor(plan.workspace.bytes, x2);

  RotateBackwardArgs<T, Acc> args;
  args.rows = x2.size(0);
  args.dim = d;
  args.grad_out = data_as<T, S>(grad2);
  args.grad_out_row_stride = grad2.stride(0);
  args.x = data_as<T, S>(x2);
  args.x_row_stride = x2.stride(0);
  if (grad_x2 != nullptr) {
    args.grad_x = mutable_data_as<T, S>(*grad_x2);
    args.grad_x_row_stride = grad_x2->stride(0);
  }
  args.scale = scale_acc.has_value() ? scale_acc->const_data_ptr<Acc>() : nullptr;
  args.transpose = transpose;
  args.num_chunks = plan.num_partials;
  args.block_grad_partials = block_partials.mutable_data_ptr<Acc>();
  args.scale_grad_partials = grad_scale != nullptr ? scale_partials.mutable_data_ptr<Acc>() : nullptr;
  check_cuda(op, cuda::launch_rotate_backward<T>(args, source, plan, x_is_output,
                                                 workspace.mutable_data_ptr(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Fixed-order sums over the partials, then the chain rule into the params' own form (angle
  // partials are already angle gradients).
  const int64_t reduce_elements =
      std::max(cuda::reduce_workspace_elements(plan.num_partials, per_pair * pairs),
               grad_scale != nullptr ? cuda::reduce_workspace_elements(plan.num_partials, d) : 0);
  at::Tensor reduce_workspace = at::empty({reduce_elements}, acc_options);
  if (grad_params != nullptr) {
    const at::Tensor& p = params_c;
    dispatch_param_dtype(p.scalar_type(), [&](auto tag) {
      using Param = decltype(tag);
      if (plan.angle_partials()) {
        // Angle gradients of the blocks as applied; the transposed op applies angle -t, so its
        // sums are negated. rotate_angle_grads (x_is_output) runs the op with the other
        // transpose, whose angle gradients are the negation of those it returns: one more flip.
        check_cuda(op, cuda::launch_angle_grad_sums<Acc, Param>(
            block_partials.const_data_ptr<Acc>(), plan.num_partials, pairs,
            transpose != x_is_output, p.const_data_ptr<Param>(), shape.angles,
            grad_params->mutable_data_ptr<Param>(), reduce_workspace.mutable_data_ptr<Acc>(),
            stream));
      } else {
        check_cuda(op, cuda::launch_block_grads_to_param_grads<Acc, Param>(
            block_partials.const_data_ptr<Acc>(), plan.num_partials, pairs, transpose,
            p.const_data_ptr<Param>(), shape.params_are_blocks, shape.angles,
            grad_params->mutable_data_ptr<Param>(), reduce_workspace.mutable_data_ptr<Acc>(),
            stream));
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (grad_scale != nullptr) {
    dispatch_param_dtype(grad_scale->scalar_type(), [&](auto tag) {
      using Scale = decltype(tag);
      check_cuda(op, cuda::launch_partial_sums<Acc, Scale>(
          scale_partials.const_data_ptr<Acc>(), plan.num_partials, d,
          grad_scale->mutable_data_ptr<Scale>(), reduce_workspace.mutable_data_ptr<Acc>(), stream));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rotate_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& params,
    const std::optional<at::Tensor>& scale, bool transpose, std::array<bool, 3> output_mask,
    c10::string_view angle_parameterisation) {
  const char* op = "goft.rotate_backward";
  const RotateShape shape = check_rotate_args(op, x, params, scale, angle_parameterisation);
  check_grad_like_x(op, "grad_out", grad_out, x);
  const c10::cuda::CUDAGuard guard(x.device());
  BackwardOutputs o = make_backward_outputs(x, params, scale, output_mask);
  if (o.trivial(shape.rows)) {
    o.zero_wanted();
    return {o.grad_x, o.grad_params, o.grad_scale};
  }
  const at::Tensor grad2 = as_rows(grad_out, shape.rows, shape.dim);
  if (!o.want_params && !o.want_scale) {
    // grad_x = grad_out @ T^T is the forward with the other transpose.
    at::Tensor grad_x2 = o.grad_x.view({shape.rows, shape.dim});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "goft.rotate_backward", [&] {
      rotate_into<scalar_t>(op, grad2, params, shape, scale, !transpose, grad_x2);
    });
    return {o.grad_x, o.grad_params, o.grad_scale};
  }
  const at::Tensor x2 = as_rows(x, shape.rows, shape.dim);
  at::Tensor grad_x2 = o.want_x ? o.grad_x.view({shape.rows, shape.dim}) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "goft.rotate_backward", [&] {
    const cuda::RotateBackwardPlan plan =
        plan_backward<scalar_t>(op, x2, transpose, o.want_scale, !shape.params_are_blocks);
    rotate_backward_into<scalar_t>(op, plan, grad2, x2, false, params, shape, scale,
                                   transpose, o.want_x ? &grad_x2 : nullptr,
                                   o.want_params ? &o.grad_params : nullptr,
                                   o.want_scale ? &o.grad_scale : nullptr);
  });
  return {o.grad_x, o.grad_params, o.grad_scale};
}

// The angle gradients of rotate(x, transpose) from x and grad_x in one pass: x is the output of
// the op with the other transpose, and grad_x the gradient there, which the strict kernels take
// back through that op's layers without a recompute and without writing a gradient (the fused
// strict kernels, or the strict fallback for rows they cannot hold). With GOFT_CUDA_STRICT=0,
// the two passes of the composite form (ops_composite.cpp).
at::Tensor rotate_angle_grads_cuda(const at::Tensor& x, const at::Tensor& grad_x,
                                   const at::Tensor& params, bool transpose,
                                   c10::string_view angle_parameterisation) {
  const char* op = "goft.rotate_angle_grads";
  const RotateShape shape = check_angle_grads_args(op, x, grad_x, params, angle_parameterisation);
  const c10::cuda::CUDAGuard guard(x.device());
  if (shape.rows == 0 || shape.dim == 1) {
    return at::zeros(params.sizes(), params.options());  // nothing to sum, or no pairs
  }
  at::Tensor grad_params = at::empty(params.sizes(), params.options());  // the sums write all
  const at::Tensor x2 = as_rows(x, shape.rows, shape.dim);
  const at::Tensor grad2 = as_rows(grad_x, shape.rows, shape.dim);
  bool one_pass = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "goft.rotate_angle_grads", [&] {
    const cuda::RotateBackwardPlan plan = plan_backward<scalar_t>(op, x2, !transpose, false, true);
    one_pass = plan.angle_partials();
    if (one_pass) {
      rotate_backward_into<scalar_t>(op, plan, grad2, x2, true, params, shape, std::nullopt,
                                     !transpose, nullptr, &grad_params, nullptr);
    }
  });
  if (!one_pass) {
    return rotate_angle_grads_two_pass(x, grad_x, params, transpose, angle_parameterisation);
  }
  return grad_params;
}

}  // namespace

TORCH_LIBRARY_IMPL(goft, CUDA, m) {
  m.impl("rotate", &rotate_cuda);
  m.impl("rotate_backward", &rotate_backward_cuda);
  m.impl("rotate_angle_grads", &rotate_angle_grads_cuda);
}

}  // namespace goft
