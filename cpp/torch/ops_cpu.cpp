// CPU kernels of goft::rotate and goft::rotate_backward: validate, fill the core's args, run the
// core's row kernels under at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu_lanes.h"
#include "goft/blocks.h"
#include "goft/cpu/lanes.h"
#include "goft/storage.h"
#include "rotate_common.h"

namespace goft {

int cpu_lane_bytes() {
  // Chosen once per process; an invalid override fails every call with the same message.
  static const int bytes = [] {
    const char* forced = std::getenv("GOFT_CPU_LANE_BYTES");
    if (forced != nullptr && *forced != '\0') {
      const std::string value(forced);
      TORCH_CHECK(value == "16" || value == "32" || value == "64",
                  "goft: environment variable GOFT_CPU_LANE_BYTES must be 16, 32 or 64, got '", value,
                  "'");
      return std::stoi(value);
    }
    return cpu::native_lane_bytes();
  }();
  return bytes;
}

namespace {

// x's element type as the core sees it (goft/storage.h for the 16-bit types).
template <typename S>
using core_t = typename ElementAs<S, bfloat16, float16>::type;

// Calls fn(std::integral_constant<int, Bytes>) for the lane width this process uses.
template <typename Fn>
void dispatch_lane_bytes(Fn&& fn) {
  cpu::with_lane_bytes(cpu_lane_bytes(), std::forward<Fn>(fn));
}

// The d-1 blocks as the kernels apply them, in the accumulation type.
template <typename Acc>
at::Tensor make_blocks(const at::Tensor& params, bool params_are_blocks,
                       AngleParameterisation angles, int64_t pairs) {
  at::Tensor blocks = at::empty({pairs, kBlockSize}, params.options().dtype(c10::CppTypeToScalarType<Acc>::value));
  const at::Tensor p = params.contiguous();
  dispatch_param_dtype(p.scalar_type(), [&](auto tag) {
    using Param = decltype(tag);
    params_to_blocks(p.data_ptr<Param>(), params_are_blocks, angles, pairs, blocks.data_ptr<Acc>());
  });
  return blocks;
}

// Rows per parallel task: enough features per task that scheduling costs nothing.
int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)); }

// Per-call state of the fast path: the blocks, their expansion for the fine layers and the
// padded scale, all in the accumulation type.
template <typename Acc, int Bytes>
struct PreparedCall {
  PairSchedule schedule;
  at::Tensor blocks, coefficients, scale_padded;
  cpu::LaneCall<Acc, Bytes> lanes;

  PreparedCall(const at::Tensor& params, const RotateShape& shape,
               const std::optional<at::Tensor>& scale, const at::TensorOptions& options)
      : schedule(make_schedule(shape.dim)) {
    constexpr int W = cpu::LaneTraits<Acc, Bytes>::kLanes;
    const int64_t d = shape.dim;
    blocks = make_blocks<Acc>(params, shape.params_are_blocks, shape.angles, d - 1);
    coefficients = at::empty({cpu::fine_coefficients_size<Acc, Bytes>(d)}, options);
    const std::optional<at::Tensor> scale_acc = scale_as_acc<Acc>(scale);
    scale_padded = at::empty({scale_acc.has_value() ? (d + W - 1) / W * W : 0}, options);
    lanes = cpu::prepare_lane_call<Bytes>(schedule, blocks.const_data_ptr<Acc>(),
                                   scale_acc.has_value() ? scale_acc->const_data_ptr<Acc>() : nullptr,
                                   coefficients.mutable_data_ptr<Acc>(),
                                   scale_padded.mutable_data_ptr<Acc>());
    lanes.schedule = &schedule;
  }
  PreparedCall(const PreparedCall&) = delete;
  PreparedCall& operator=(const PreparedCall&) = delete;
};

template <typename T, int Bytes>
void rotate_into(const at::Tensor& x2, const at::Tensor& params, const RotateShape& shape,
                 const std::optional<at::Tensor>& scale, bool transpose, at::Tensor& out2) {
  using Acc = at::opmath_type<T>;
  const int64_t rows = x2.size(0), d = x2.size(1);
  const PreparedCall<Acc, Bytes> prepared(params, shape, scale,
                                          x2.options().dtype(c10::CppTypeToScalarType<Acc>::value));
  RotateArgs<core_t<T>, Acc> args;
  args.rows = rows;
  args.dim = d;
  args.x = data_as<core_t<T>, T>(x2);
  args.x_row_stride = x2.stride(0);
  args.out = mutable_data_as<core_t<T>, T>(out2);
  args.out_row_stride = out2.stride(0);
  args.blocks = prepared.blocks.template const_data_ptr<Acc>();
  args.scale = prepared.lanes.scale_padded;
  args.transpose = transpose;
  const int64_t grain = std::max<int64_t>(cpu::kMaxTileRows, row_grain(d));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> scratch(cpu::rotate_tile_scratch_size<Acc, Bytes>(d));
    cpu::rotate_rows_fast(args, prepared.lanes, begin, end, scratch.data());
  });
}

at::Tensor rotate_cpu(const at::Tensor& x, const at::Tensor& params,
                      const std::optional<at::Tensor>& scale, bool transpose,
                      c10::string_view angle_parameterisation) {
  const RotateShape shape = check_rotate_args("goft.rotate", x, params, scale, angle_parameterisation);
  // Outputs above glibc's mmap threshold are faulted in 4 KiB at a time, about half of the op's
  // time at 8192 x 4096 float32. madvise(MADV_HUGEPAGE) on them halved the standalone op but, in
  // a layer, made it 2x slower (likely THP faults compacting memory the matmuls fragmented), so the
  // op leaves its outputs as torch allocates them.
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (shape.rows == 0) return out;
  const at::Tensor x2 = as_rows(x, shape.rows, shape.dim);
  at::Tensor out2 = out.view({shape.rows, shape.dim});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "goft.rotate", [&] {
    dispatch_lane_bytes([&](auto bytes) {
      rotate_into<scalar_t, decltype(bytes)::value>(x2, params, shape, scale, transpose, out2);
    });
  });
  return out;
}

template <typename T, int Bytes>
void rotate_backward_into(const at::Tensor& grad2, const at::Tensor& x2, const at::Tensor& params,
                          const RotateShape& shape, const std::optional<at::Tensor>& scale,
                          bool transpose, at::Tensor* grad_x2, at::Tensor& grad_params,
                          at::Tensor* grad_scale) {
  using Acc = at::opmath_type<T>;
  const int64_t rows = x2.size(0), d = x2.size(1), pairs = d - 1;
  const PreparedCall<Acc, Bytes> prepared(params, shape, scale,
                                          x2.options().dtype(c10::CppTypeToScalarType<Acc>::value));
  const int64_t chunks = grad_chunk_count(rows, d);
  const auto acc_options = x2.options().dtype(c10::CppTypeToScalarType<Acc>::value);
  at::Tensor block_partials = at::empty({chunks, pairs, kBlockSize}, acc_options);
  at::Tensor scale_partials;
  if (grad_scale != nullptr) scale_partials = at::empty({chunks, d}, acc_options);

  RotateBackwardArgs<core_t<T>, Acc> args;
  args.rows = rows;
  args.dim = d;
  args.grad_out = data_as<core_t<T>, T>(grad2);
  args.grad_out_row_stride = grad2.stride(0);
  args.x = data_as<core_t<T>, T>(x2);
  args.x_row_stride = x2.stride(0);
  if (grad_x2 != nullptr) {
    args.grad_x = mutable_data_as<core_t<T>, T>(*grad_x2);
    args.grad_x_row_stride = grad_x2->stride(0);
  }
  args.blocks = prepared.blocks.template const_data_ptr<Acc>();
  args.scale = prepared.lanes.scale_padded;
  args.transpose = transpose;
  args.num_chunks = chunks;
  args.block_grad_partials = block_partials.mutable_data_ptr<Acc>();
  args.scale_grad_partials = grad_scale != nullptr ? scale_partials.mutable_data_ptr<Acc>() : nullptr;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> scratch(cpu::backward_chunk_scratch_size<Acc, Bytes>(d));
    cpu::rotate_backward_chunks_fast(args, prepared.lanes, begin, end, scratch.data());
  });

  // Fixed-order sums over chunks, then the chain rule into the params' own form.
  at::Tensor block_total = at::empty({pairs, kBlockSize}, acc_options);
  const int64_t block_len = pairs * kBlockSize;
  at::parallel_for(0, block_len, 4096, [&](int64_t begin, int64_t end) {
    reduce_partials(block_partials.const_data_ptr<Acc>(), chunks, block_len, begin, end,
                    block_total.mutable_data_ptr<Acc>());
  });
  const at::Tensor p = params.contiguous();
  dispatch_param_dtype(p.scalar_type(), [&](auto tag) {
    using Param = decltype(tag);
    block_grads_to_param_grads(block_total.const_data_ptr<Acc>(), transpose, p.const_data_ptr<Param>(),
                               shape.params_are_blocks, shape.angles, 0, pairs,
                               grad_params.mutable_data_ptr<Param>());
  });
  if (grad_scale != nullptr) {
    at::Tensor scale_total = at::empty({d}, acc_options);
    reduce_partials(scale_partials.const_data_ptr<Acc>(), chunks, d, 0, d,
                    scale_total.mutable_data_ptr<Acc>());
    grad_scale->copy_(scale_total);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rotate_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& params,
    const std::optional<at::Tensor>& scale, bool transpose, std::array<bool, 3> output_mask,
    c10::string_view angle_parameterisation) {
  const char* op = "goft.rotate_backward";
  const RotateShape shape = check_rotate_args(op, x, params, scale, angle_parameterisation);
  check_grad_like_x(op, "grad_out", grad_out, x);
  BackwardOutputs outputs = make_backward_outputs(x, params, scale, output_mask);
  const bool want_x = outputs.want_x, want_params = outputs.want_params;
  const bool want_scale = outputs.want_scale;
  at::Tensor& grad_x = outputs.grad_x;
  at::Tensor& grad_params = outputs.grad_params;
  at::Tensor& grad_scale = outputs.grad_scale;
  if (outputs.trivial(shape.rows)) {
    outputs.zero_wanted();
    return {grad_x, grad_params, grad_scale};
  }
  const at::Tensor grad2 = as_rows(grad_out, shape.rows, shape.dim);
  if (!want_params && !want_scale) {
    // grad_x = grad_out @ T^T is the forward with the other transpose.
    at::Tensor grad_x2 = grad_x.view({shape.rows, shape.dim});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "goft.rotate_backward", [&] {
      dispatch_lane_bytes([&](auto bytes) {
        rotate_into<scalar_t, decltype(bytes)::value>(grad2, params, shape, scale, !transpose,
                                                      grad_x2);
      });
    });
    return {grad_x, grad_params, grad_scale};
  }
  const at::Tensor x2 = as_rows(x, shape.rows, shape.dim);
  at::Tensor grad_x2 = want_x ? grad_x.view({shape.rows, shape.dim}) : at::Tensor();
  at::Tensor params_grad_full = want_params ? grad_params : at::empty(params.sizes(), params.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "goft.rotate_backward", [&] {
    dispatch_lane_bytes([&](auto bytes) {
      rotate_backward_into<scalar_t, decltype(bytes)::value>(
          grad2, x2, params, shape, scale, transpose, want_x ? &grad_x2 : nullptr,
          params_grad_full, want_scale ? &grad_scale : nullptr);
    });
  });
  return {grad_x, grad_params, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(goft, CPU, m) {
  m.impl("rotate", &rotate_cpu);
  m.impl("rotate_backward", &rotate_backward_cpu);
}

}  // namespace goft
