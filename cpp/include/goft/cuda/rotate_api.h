// Host interface of goft's CUDA kernels: plan a call (layout, workspace, partial count), then
// launch it on a stream. Declarations only, so that callers (the ATen bindings) compile none of
// the kernels; rotate.cuh defines them and cpp/cuda/rotate_<type>.cu instantiates them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "goft/blocks.h"
#include "goft/cuda/plan.h"
#include "goft/params.h"

namespace goft {
namespace cuda {

// Bytes of workspace a call needs, with the offsets of its parts (each 256-byte aligned).
struct Workspace {
  int64_t blocks_offset = 0;   // fused: (num_slots, 4) staged store; fallback: (d-1, 4) blocks
  int64_t scratch_offset = 0;  // fused backward: gradient accumulators; fallback: row scratch
  int64_t bytes = 0;
};

// The op's parameters as the launchers read them: (d-1,) angles or (d-1, 2, 2) blocks, float or
// double, on the device. The launchers turn them into what their kernels read (the fused
// kernels' slot-ordered store, or the fallback's (d-1, 4) blocks) in one small kernel, so
// RotateArgs::blocks is not used on the GPU.
struct ParamSource {
  const void* data = nullptr;
  bool is_double = false;
  bool are_blocks = false;
  AngleParameterisation angles = AngleParameterisation::kRaw;  // angles only (blocks.h)
};

struct RotatePlan {
  bool fused = false;
  FusedLayout layout;      // fused only
  int cta_threads = 0;
  int grid = 0;
  int64_t smem_bytes = 0;
  bool scratch_in_smem = true;  // fallback only
  Workspace workspace;
};

struct RotateBackwardPlan {
  bool fused = false;
  FusedLayout layout;
  int cta_threads = 0;
  int grid = 0;
  int64_t smem_bytes = 0;
  bool scratch_in_smem = true;
  int64_t num_chunks = 0;    // row chunks
  int64_t num_partials = 0;  // partial gradients written: RotateBackwardArgs::num_chunks
  bool strict = false;       // the strict kernels run: fused (layout.strict) or the fallback's
  bool scale_grad = false;   // planned with scale gradients (their accumulators sized in)
  Workspace workspace;

  // The partials hold one angle gradient per pair (the strict kernels, FusedTraits::kStrict and
  // fallback_rotate_backward_strict), not four block-gradient entries:
  // RotateBackwardArgs::block_grad_partials is then (num_partials, d - 1), summed by
  // launch_angle_grad_sums.
  bool angle_partials() const { return strict; }
};

// Plans query the current device (kernel register counts, shared memory, SM count), which
// `device` must name (cudaErrorInvalidDevice otherwise); a call plans and launches on the same
// device. Errors are CUDA's, e.g. cudaErrorNoKernelImageForDevice on a GPU the build has no code
// for.
//
// y = x @ T (x @ T^T) on `stream`, T from `params`; `workspace` holds plan.workspace.bytes bytes
// of device memory.
template <typename T>
cudaError_t plan_rotate(int64_t rows, int64_t dim, bool transpose, int device, RotatePlan* plan);
template <typename T>
cudaError_t launch_rotate(const RotateArgs<T, typename AccOf<T>::type>& args,
                          const ParamSource& params, const RotatePlan& plan, void* workspace,
                          cudaStream_t stream);

// Gradients of rotate: grad_x (if args.grad_x) and per-partial block (or angle, see
// RotateBackwardPlan::angle_partials()) and scale gradients (args.num_chunks must be
// plan.num_partials). strict: the blocks come from angles, which allows the strict kernels.
// x_is_output: args.x holds the op's output y = rotate(x) instead of x, which the strict kernels
// take back through the layers without recomputing it; it needs plan.angle_partials() and no
// scale (cudaErrorInvalidValue otherwise). Scale-gradient partials need a plan made with
// scale_grad, which sizes their accumulators (cudaErrorInvalidValue otherwise).
template <typename T>
cudaError_t plan_rotate_backward(int64_t rows, int64_t dim, bool transpose, bool scale_grad,
                                 bool strict, int device, RotateBackwardPlan* plan);
template <typename T>
cudaError_t launch_rotate_backward(const RotateBackwardArgs<T, typename AccOf<T>::type>& args,
                                   const ParamSource& params, const RotateBackwardPlan& plan,
                                   bool x_is_output, void* workspace, cudaStream_t stream);

// Elements of Acc workspace the two reductions below need for `num_partials` partials of
// `length` entries: the segment sums of the first level (none when one segment suffices).
inline int64_t reduce_workspace_elements(int64_t num_partials, int64_t length) {
  return num_partials > kReduceSegment
             ? (num_partials + kReduceSegment - 1) / kReduceSegment * length
             : 0;
}

// Sums the block-gradient partials (num_partials, pairs, 4) in a fixed order and maps the sum
// through the chain rule into grad_params (angles or blocks, blocks.h).
template <typename Acc, typename Param>
cudaError_t launch_block_grads_to_param_grads(const Acc* partials, int64_t num_partials,
                                              int64_t pairs, bool transpose, const Param* params,
                                              bool params_are_blocks, AngleParameterisation map,
                                              Param* grad_params, Acc* workspace,
                                              cudaStream_t stream);

// Sums partials (num_partials, length) in a fixed order into out: the scale gradient from its
// partials.
template <typename Acc, typename Out>
cudaError_t launch_partial_sums(const Acc* partials, int64_t num_partials, int64_t length,
                                Out* out, Acc* workspace, cudaStream_t stream);

// The angle parameters' gradients from angle partials (num_partials, pairs): their fixed-order
// sums, negated if asked (the transposed op's applied blocks turn by -t), times d angle / d p.
template <typename Acc, typename Param>
cudaError_t launch_angle_grad_sums(const Acc* partials, int64_t num_partials, int64_t pairs,
                                   bool negate, const Param* params, AngleParameterisation map,
                                   Param* grad_params, Acc* workspace, cudaStream_t stream);

// GOFT_CUDA_FALLBACK=1 forces the fallback kernels, so that tests can compare the two paths.
inline bool fallback_forced() {
  const char* v = std::getenv("GOFT_CUDA_FALLBACK");
  return v != nullptr && v[0] == '1';
}

// GOFT_CUDA_STRICT=0 runs the backward of angle parameters on the quasi kernels (four block
// gradients per pair, then the chain rule) instead of the strict ones, to compare the two.
inline bool strict_kernels_enabled() {
  const char* v = std::getenv("GOFT_CUDA_STRICT");
  return v == nullptr || v[0] != '0';
}

// GOFT_CUDA_CHUNKS, GOFT_CUDA_ROWS (rows per group), GOFT_CUDA_CTA_THREADS and GOFT_CUDA_STAGE=0
// (no staged rows) override the fused layout choice (plan.h FusedTuning), for tuning
// experiments; unset, the planner's defaults apply.
inline FusedTuning tuning_from_env() {
  FusedTuning t;
  if (const char* v = std::getenv("GOFT_CUDA_CHUNKS")) t.chunks = std::atoi(v);
  if (const char* v = std::getenv("GOFT_CUDA_ROWS")) t.rows_per_group = std::atoi(v);
  if (const char* v = std::getenv("GOFT_CUDA_CTA_THREADS")) t.cta_threads = std::atoi(v);
  if (const char* v = std::getenv("GOFT_CUDA_STAGE")) t.stage_rows = v[0] != '0';
  return t;
}

}  // namespace cuda
}  // namespace goft
