// goft's CUDA kernels: the __global__ entry points over the bodies of row_kernels.h, and the
// host launchers declared in rotate_api.h. Torch-free (raw pointers, the structs of params.h).
// Include from exactly the translation units that instantiate the launchers
// (GOFT_CUDA_INSTANTIATE_ROTATE below; see cpp/cuda/rotate_<type>.cu).
//
// Forward: fused_rotate_kernel, one pass per row with the row in registers (row_kernels.h). The
// applied blocks are first staged from the op's parameters into a slot-ordered buffer
// (stage_store_kernel) that each thread block copies to shared memory once and reuses for all the
// rows it processes.
// Backward: fused_rotate_backward_kernel writes per-chunk partial gradients without atomics; two
// fixed-order reductions (reduce_segments_kernel, finish_*_kernel) sum them, so gradients are
// bitwise identical run to run. Rows too wide for registers take fallback_*_kernel.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#include "goft/blocks.h"
#include "goft/cuda/plan.h"
#include "goft/cuda/rotate_api.h"
#include "goft/cuda/row_kernels.h"
#include "goft/params.h"
#include "goft/schedule.h"

namespace goft {
namespace cuda {

// The thread interface of row_kernels.h on the GPU.
struct CudaThreads {
  __device__ __forceinline__ int thread() const { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ int num_threads() const { return static_cast<int>(blockDim.x); }
  __device__ __forceinline__ int64_t cta() const { return blockIdx.x; }
  __device__ __forceinline__ int64_t num_ctas() const { return gridDim.x; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  // Every lane of the warp calls it (full mask): block sizes are multiples of 32 (plan.h).
  template <typename V>
  __device__ __forceinline__ V shfl_xor(V v, int mask) const {
    return __shfl_xor_sync(0xffffffffu, v, mask);
  }
  template <typename V>
  __device__ __forceinline__ V shfl(V v, int src_lane) const {
    return __shfl_sync(0xffffffffu, v, src_lane);
  }
};

template <typename Acc>
__device__ __forceinline__ Acc* dynamic_smem() {
  extern __shared__ __align__(32) unsigned char goft_dynamic_smem[];
  return reinterpret_cast<Acc*>(goft_dynamic_smem);
}

// ---------------------------------------------------------------------------------------------
// Kernels.

// kOnChip: the block store (and in backward the gradient accumulators) is in shared memory
// (fused_on_chip, plan.h). A kernel of its own for each placement, so that each is compiled and
// register-allocated for one address space.
template <class K, bool kTransposed, bool kOnChip>
__global__ void __launch_bounds__(K::kLaunchBoundThreads) fused_rotate_kernel(const FusedParams<typename K::T, typename K::Acc> p) {
  fused_rotate_rows<K, kTransposed, kOnChip>(p, CudaThreads{},
                                             dynamic_smem<typename K::Acc>());
}

template <class K, bool kTransposed, bool kOnChip>
__global__ void __launch_bounds__(K::kLaunchBoundThreads, K::kMinBlocksPerSm)
    fused_rotate_backward_kernel(const FusedParams<typename K::T, typename K::Acc> p) {
  fused_rotate_backward_rows<K, kTransposed, kOnChip>(p, CudaThreads{},
                                                      dynamic_smem<typename K::Acc>());
}

template <typename T, typename Acc, bool kTransposed>
__global__ void fallback_rotate_kernel(const FallbackParams<T, Acc> p) {
  fallback_rotate<T, Acc, kTransposed>(p, CudaThreads{}, dynamic_smem<Acc>());
}

template <typename T, typename Acc, bool kTransposed>
__global__ void fallback_rotate_backward_kernel(const FallbackParams<T, Acc> p) {
  fallback_rotate_backward<T, Acc, kTransposed>(p, CudaThreads{}, dynamic_smem<Acc>());
}

template <typename T, typename Acc, bool kTransposed>
__global__ void fallback_rotate_backward_strict_kernel(const FallbackParams<T, Acc> p) {
  fallback_rotate_backward_strict<T, Acc, kTransposed>(p, CudaThreads{}, dynamic_smem<Acc>());
}

__device__ __forceinline__ int64_t global_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// The fallback kernels' (d-1, 4) blocks, in the op's natural form.
template <typename Param, typename Acc>
__global__ void params_to_blocks_kernel(const Param* params, bool params_are_blocks,
                                        AngleParameterisation map, int64_t pairs, Acc* blocks) {
  const int64_t p = global_index();
  if (p >= pairs) return;
  param_block(params, params_are_blocks, map, p, blocks + kBlockSize * p);
}

// The strict fallback's (d-1, 2) rotations (cos t, sin t) from angle parameters.
template <typename Param, typename Acc>
__global__ void params_to_rotations_kernel(const Param* params, AngleParameterisation map,
                                           int64_t pairs, Acc* rotations) {
  const int64_t p = global_index();
  if (p >= pairs) return;
  angle_to_rotation(angle_of(params[p], map), rotations + 2 * p);
}

// The fused kernels' block store, every slot written (stage_slot).
template <typename Param, typename Acc>
__global__ void stage_store_kernel(const Param* params, bool params_are_blocks,
                                   AngleParameterisation map, bool transpose,
                                   const PairSchedule schedule, int log_elts, int64_t vcap,
                                   int64_t num_slots, Acc* store) {
  const int64_t slot = global_index();
  if (slot >= num_slots) return;
  stage_slot(params, params_are_blocks, map, transpose, schedule, log_elts, vcap, slot, store);
}

// First level of the partial sums: segment blockIdx.y of kReduceSegment partials.
template <typename Acc>
__global__ void reduce_segments_kernel(const Acc* partials, int64_t num_partials, int64_t length,
                                       Acc* sums) {
  const int64_t i = global_index();
  if (i >= length) return;
  const int64_t segment = kReduceSegment;  // a value: std::min would take the constant's address
  const int64_t first = static_cast<int64_t>(blockIdx.y) * segment;
  const int64_t count = num_partials - first < segment ? num_partials - first : segment;
  sums[blockIdx.y * length + i] = sum_partials(partials, length, first, count, i);
}

template <typename Acc, typename Param>
__global__ void finish_block_grads_kernel(const Acc* sums, int64_t count, int64_t pairs,
                                          bool transpose, const Param* params,
                                          bool params_are_blocks, AngleParameterisation map,
                                          Param* grad_params) {
  const int64_t p = global_index();
  if (p >= pairs) return;
  Acc applied[kBlockSize], grad[kBlockSize];
  for (int i = 0; i < kBlockSize; ++i) applied[i] = sum_partials(sums, 4 * pairs, 0, count, 4 * p + i);
  // The gradient of A from that of the block as applied (A^T when transposed).
  applied_block(applied, transpose, grad);
  if (params_are_blocks) {
    for (int i = 0; i < kBlockSize; ++i) grad_params[kBlockSize * p + i] = static_cast<Param>(grad[i]);
  } else {
    grad_params[p] = block_grad_to_angle_grad<Acc>(params[p], map, grad);
  }
}

// Second level of a plain sum of partials (the scale gradient).
template <typename Acc, typename Out>
__global__ void finish_sums_kernel(const Acc* sums, int64_t count, int64_t length, Out* out) {
  const int64_t i = global_index();
  if (i >= length) return;
  out[i] = static_cast<Out>(sum_partials(sums, length, 0, count, i));
}

// Second level of the angle gradients' sums: the sum (negated if asked) times d angle / d p.
template <typename Acc, typename Param>
__global__ void finish_angle_grads_kernel(const Acc* sums, int64_t count, int64_t pairs,
                                          bool negate, const Param* params,
                                          AngleParameterisation map, Param* grad_params) {
  const int64_t p = global_index();
  if (p >= pairs) return;
  grad_params[p] = angle_param_grad(sum_partials(sums, pairs, 0, count, p), negate, params[p], map);
}

// ---------------------------------------------------------------------------------------------
// Host side.

constexpr int kElementwiseThreads = 256;

inline unsigned elementwise_blocks(int64_t n) {
  return static_cast<unsigned>((n + kElementwiseThreads - 1) / kElementwiseThreads);
}

inline int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }

struct DeviceInfo {
  int sms = 1;
  int64_t smem_optin = 48 * 1024;  // largest dynamic shared memory a block may opt in to
};

// The planners' first step. `device` must be the current device: kernel attributes, the
// shared-memory opt-in and occupancy act on the current one, and their caches are keyed by
// `device`, so a mismatch would cache one GPU's answers as another's (cudaErrorInvalidDevice).
inline cudaError_t device_info(int device, DeviceInfo* info) {
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return err;
  if (current != device) return cudaErrorInvalidDevice;
  int sms = 0, smem = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  info->sms = std::max(sms, 1);
  info->smem_optin = smem;
  return cudaSuccess;
}

// Threads per block a kernel's register count allows, cached per kernel and device.
inline cudaError_t max_threads_per_block(const void* kernel, int device, int* out) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  const auto it = cache.find(key);
  if (it != cache.end()) {
    *out = it->second;
    return cudaSuccess;
  }
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  cache[key] = attr.maxThreadsPerBlock;
  *out = attr.maxThreadsPerBlock;
  return cudaSuccess;
}

// Opts the kernel in to `smem` bytes of dynamic shared memory on the current device and returns
// how many of its blocks fit on one SM. Both are remembered, so that a call repeating a shape
// makes no runtime calls here: the opt-in only ever rises (another shape may launch the same
// kernel with more), and the occupancy is cached per kernel, device, block size and memory.
inline cudaError_t prepare_kernel(const void* kernel, int device, int threads, int64_t smem,
                                  int* blocks_per_sm) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> opted_in;
  static std::map<std::tuple<const void*, int, int, int64_t>, int> occupancy;
  std::lock_guard<std::mutex> lock(mutex);
  int64_t& limit = opted_in[std::make_pair(kernel, device)];
  if (smem > limit) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    limit = smem;
  }
  const auto key = std::make_tuple(kernel, device, threads, smem);
  const auto it = occupancy.find(key);
  if (it != occupancy.end()) {
    *blocks_per_sm = it->second;
    return cudaSuccess;
  }
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      blocks_per_sm, kernel, threads, static_cast<size_t>(smem));
  if (err != cudaSuccess) return err;
  *blocks_per_sm = std::max(*blocks_per_sm, 1);
  occupancy[key] = *blocks_per_sm;
  return cudaSuccess;
}

template <typename T>
using FusedKernel = void (*)(FusedParams<T, typename AccOf<T>::type>);
template <typename T>
using FallbackKernel = void (*)(FallbackParams<T, typename AccOf<T>::type>);

template <typename T, bool kBackward, int kChunks, int kRows, bool kStrict, bool kOnChip>
FusedKernel<T> fused_kernel_for(bool transpose) {
  using K = FusedTraits<T, kChunks, kBackward, kRows, kStrict>;
  if constexpr (kBackward) {
    return transpose ? &fused_rotate_backward_kernel<K, true, kOnChip>
                     : &fused_rotate_backward_kernel<K, false, kOnChip>;
  } else {
    return transpose ? &fused_rotate_kernel<K, true, kOnChip>
                     : &fused_rotate_kernel<K, false, kOnChip>;
  }
}

template <typename T, bool kBackward, int kChunks, int kRows, bool kStrict>
FusedKernel<T> fused_kernel_for(bool transpose, bool on_chip) {
  return on_chip ? fused_kernel_for<T, kBackward, kChunks, kRows, kStrict, true>(transpose)
                 : fused_kernel_for<T, kBackward, kChunks, kRows, kStrict, false>(transpose);
}

template <typename T, bool kBackward, int kChunks, int kRows>
FusedKernel<T> fused_kernel_for(bool strict, bool transpose, bool on_chip) {
  if constexpr (kBackward) {
    if (strict) return fused_kernel_for<T, true, kChunks, kRows, true>(transpose, on_chip);
  }
  return fused_kernel_for<T, kBackward, kChunks, kRows, false>(transpose, on_chip);
}

// The kernel of a variant's shape (fused_variant_shape) for a transpose and store placement;
// strict picks the strict backward kernels (FusedTraits::kStrict).
template <typename T, bool kBackward>
FusedKernel<T> fused_kernel(int chunks, int rows_per_group, bool strict, bool transpose,
                            bool on_chip) {
  if constexpr (!kBackward) {
    if (rows_per_group == 2) return fused_kernel_for<T, false, 1, 2>(false, transpose, on_chip);
  }
  switch (chunks) {
    case 1: return fused_kernel_for<T, kBackward, 1, 1>(strict, transpose, on_chip);
    case 2: return fused_kernel_for<T, kBackward, 2, 1>(strict, transpose, on_chip);
    case 3: return fused_kernel_for<T, kBackward, 3, 1>(strict, transpose, on_chip);
    default: return fused_kernel_for<T, kBackward, 4, 1>(strict, transpose, on_chip);
  }
}

// The kernel a fused layout runs.
template <typename T, bool kBackward>
FusedKernel<T> fused_kernel(const FusedLayout& l, bool transpose) {
  return fused_kernel<T, kBackward>(l.chunks, l.rows_per_group, l.strict, transpose,
                                    fused_on_chip(l, kBackward));
}

template <typename T, bool kBackward>
cudaError_t fused_variants(bool strict, bool transpose, int device,
                           FusedVariant (&variants)[kMaxFusedVariants]) {
  for (int i = 0; i < num_fused_variants(kBackward); ++i) {
    FusedVariant& v = variants[i];
    v = fused_variant_shape(i);
    const cudaError_t err = max_threads_per_block(
        reinterpret_cast<const void*>(
            fused_kernel<T, kBackward>(v.chunks, v.rows_per_group, strict, transpose, true)),
        device,
        &v.max_threads);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
FallbackKernel<T> fallback_kernel(FallbackPass pass, bool transpose) {
  using Acc = typename AccOf<T>::type;
  if (pass == FallbackPass::kStrictBackward) {
    return transpose ? &fallback_rotate_backward_strict_kernel<T, Acc, true>
                     : &fallback_rotate_backward_strict_kernel<T, Acc, false>;
  }
  if (pass == FallbackPass::kBackward) {
    return transpose ? &fallback_rotate_backward_kernel<T, Acc, true>
                     : &fallback_rotate_backward_kernel<T, Acc, false>;
  }
  return transpose ? &fallback_rotate_kernel<T, Acc, true> : &fallback_rotate_kernel<T, Acc, false>;
}

// Shared parts of both plans: the fused layout or the fallback's threads and scratch placement.
// strict (backward): the parameters are angles, so the strict kernels may run (fused, or the
// strict fallback); *angle_partials says whether the chosen kernel writes angle partials.
template <typename T, typename Plan>
cudaError_t plan_common(int64_t dim, bool backward, bool strict, bool transpose, bool scale_grad,
                        int device, const DeviceInfo& info, Plan* plan, const void** kernel,
                        bool* angle_partials) {
  using Acc = typename AccOf<T>::type;
  constexpr int kElts = FusedTraits<T, 1, false>::kElts;
  plan->fused = false;
  strict = strict && backward && strict_kernels_enabled();
  if (!fallback_forced()) {
    FusedVariant variants[kMaxFusedVariants];
    const cudaError_t err =
        backward ? fused_variants<T, true>(strict, transpose, device, variants)
                 : fused_variants<T, false>(false, transpose, device, variants);
    if (err != cudaSuccess) return err;
    FusedLayout layout;
    if (choose_fused_layout(dim, kElts, sizeof(Acc), backward, strict, scale_grad, variants,
                            num_fused_variants(backward), info.smem_optin, &layout,
                            tuning_from_env())) {
      plan->fused = true;
      plan->layout = layout;
      plan->cta_threads = layout.cta_threads;
      plan->smem_bytes = layout.smem_bytes;
      *angle_partials = layout.strict;
      *kernel = reinterpret_cast<const void*>(backward ? fused_kernel<T, true>(layout, transpose)
                                                       : fused_kernel<T, false>(layout, transpose));
      return cudaSuccess;
    }
  }
  const FallbackPass pass = !backward ? FallbackPass::kForward
                            : strict  ? FallbackPass::kStrictBackward
                                      : FallbackPass::kBackward;
  *angle_partials = strict;
  *kernel = reinterpret_cast<const void*>(fallback_kernel<T>(pass, transpose));
  int max_threads = 0;
  const cudaError_t err = max_threads_per_block(*kernel, device, &max_threads);
  if (err != cudaSuccess) return err;
  plan->cta_threads = fallback_cta_threads(dim, max_threads);
  const int64_t scratch =
      fallback_scratch_size(dim, pass, scale_grad) * static_cast<int64_t>(sizeof(Acc));
  plan->scratch_in_smem = scratch <= info.smem_optin;
  plan->smem_bytes = plan->scratch_in_smem ? scratch : 0;
  return cudaSuccess;
}

// A workspace of `blocks` 2x2 blocks (the fused kernels' store, or the fallback's (d-1, 4)
// blocks) and `scratch` further elements, of acc_bytes each.
inline Workspace make_workspace(int64_t blocks, int64_t scratch, int64_t acc_bytes) {
  Workspace w;
  w.blocks_offset = 0;
  w.scratch_offset = align256(4 * std::max<int64_t>(blocks, 0) * acc_bytes);
  w.bytes = w.scratch_offset + align256(scratch * acc_bytes);
  return w;
}

template <typename T>
cudaError_t plan_rotate(int64_t rows, int64_t dim, bool transpose, int device, RotatePlan* plan) {
  using Acc = typename AccOf<T>::type;
  DeviceInfo info;
  cudaError_t err = device_info(device, &info);
  if (err != cudaSuccess) return err;
  RotatePlan pl;
  const void* kernel = nullptr;
  bool angle_partials = false;
  err = plan_common<T>(dim, false, false, transpose, false, device, info, &pl, &kernel,
                       &angle_partials);
  if (err != cudaSuccess) return err;
  int per_sm = 1;
  err = prepare_kernel(kernel, device, pl.cta_threads, pl.smem_bytes, &per_sm);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(per_sm) * info.sms;
  if (pl.fused) {
    const int64_t tile_rows =
        static_cast<int64_t>(pl.layout.rows_per_cta) * pl.layout.rows_per_group;
    const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
    pl.grid = static_cast<int>(std::max<int64_t>(1, std::min(tiles, resident)));
    pl.workspace = make_workspace(pl.layout.num_slots, 0, sizeof(Acc));
  } else {
    pl.grid = static_cast<int>(std::max<int64_t>(1, std::min(rows, resident)));
    const int64_t scratch =
        pl.scratch_in_smem ? 0 : pl.grid * fallback_scratch_size(dim, FallbackPass::kForward, false);
    pl.workspace = make_workspace(dim - 1, scratch, sizeof(Acc));
  }
  *plan = pl;
  return cudaSuccess;
}

template <typename T>
cudaError_t plan_rotate_backward(int64_t rows, int64_t dim, bool transpose, bool scale_grad,
                                 bool strict, int device, RotateBackwardPlan* plan) {
  using Acc = typename AccOf<T>::type;
  DeviceInfo info;
  cudaError_t err = device_info(device, &info);
  if (err != cudaSuccess) return err;
  RotateBackwardPlan pl;
  const void* kernel = nullptr;
  pl.scale_grad = scale_grad;
  err = plan_common<T>(dim, true, strict, transpose, scale_grad, device, info, &pl, &kernel,
                       &pl.strict);
  if (err != cudaSuccess) return err;
  int per_sm = 1;
  err = prepare_kernel(kernel, device, pl.cta_threads, pl.smem_bytes, &per_sm);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(per_sm) * info.sms;
  const int rows_per_cta = pl.fused ? pl.layout.rows_per_cta : 1;
  pl.num_chunks = backward_chunk_count(rows, dim, rows_per_cta, resident);
  pl.num_partials = pl.num_chunks * rows_per_cta;
  pl.grid = static_cast<int>(std::min(pl.num_chunks, resident));
  if (pl.fused) {
    const int64_t grads = pl.layout.grads_in_smem ? 0 : pl.grid * pl.layout.grad_workspace_per_cta;
    pl.workspace = make_workspace(pl.layout.num_slots, grads, sizeof(Acc));
  } else {
    const FallbackPass pass = pl.strict ? FallbackPass::kStrictBackward : FallbackPass::kBackward;
    const int64_t scratch =
        pl.scratch_in_smem ? 0 : pl.grid * fallback_scratch_size(dim, pass, scale_grad);
    pl.workspace = make_workspace(dim - 1, scratch, sizeof(Acc));
  }
  *plan = pl;
  return cudaSuccess;
}

// Calls fn with the parameters as a typed pointer (float or double).
template <typename Fn>
cudaError_t with_typed_params(const ParamSource& params, Fn&& fn) {
  if (params.is_double) {
    fn(static_cast<const double*>(params.data));
  } else {
    fn(static_cast<const float*>(params.data));
  }
  return cudaGetLastError();
}

// Fills the fused kernels' block store from the op's parameters: one launch.
template <typename Acc>
cudaError_t stage_store(const ParamSource& params, bool transpose, const PairSchedule& schedule,
                        int log_elts, const FusedLayout& layout, Acc* store, cudaStream_t stream) {
  const int64_t slots = layout.num_slots;
  if (slots == 0) return cudaSuccess;
  return with_typed_params(params, [&](auto typed) {
    using Param = std::remove_const_t<std::remove_pointer_t<decltype(typed)>>;
    stage_store_kernel<Param, Acc><<<elementwise_blocks(slots), kElementwiseThreads, 0, stream>>>(
        typed, params.are_blocks, params.angles, transpose, schedule, log_elts, layout.vcap, slots,
        store);
  });
}

// The strict fallback's (d-1, 2) rotations from the op's angles.
template <typename Acc>
cudaError_t make_rotations(const ParamSource& params, int64_t pairs, Acc* rotations,
                           cudaStream_t stream) {
  if (pairs == 0) return cudaSuccess;
  if (params.are_blocks) return cudaErrorInvalidValue;
  return with_typed_params(params, [&](auto typed) {
    using Param = std::remove_const_t<std::remove_pointer_t<decltype(typed)>>;
    params_to_rotations_kernel<Param, Acc><<<elementwise_blocks(pairs), kElementwiseThreads, 0,
                                             stream>>>(typed, params.angles, pairs, rotations);
  });
}

// The fallback kernels' (d-1, 4) blocks from the op's parameters.
template <typename Acc>
cudaError_t make_blocks(const ParamSource& params, int64_t pairs, Acc* blocks,
                        cudaStream_t stream) {
  if (pairs == 0) return cudaSuccess;
  return with_typed_params(params, [&](auto typed) {
    using Param = std::remove_const_t<std::remove_pointer_t<decltype(typed)>>;
    const unsigned grid = elementwise_blocks(pairs);
    params_to_blocks_kernel<Param, Acc><<<grid, kElementwiseThreads, 0, stream>>>(
        typed, params.are_blocks, params.angles, pairs, blocks);
  });
}

template <typename T>
cudaError_t launch_rotate(const RotateArgs<T, typename AccOf<T>::type>& args,
                          const ParamSource& params, const RotatePlan& plan, void* workspace,
                          cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  if (args.rows == 0) return cudaSuccess;
  char* ws = static_cast<char*>(workspace);
  Acc* blocks = reinterpret_cast<Acc*>(ws + plan.workspace.blocks_offset);
  if (plan.fused) {
    const FusedLayout& l = plan.layout;
    FusedParams<T, Acc> p = make_fused_params<T, Acc>(args.rows, args.dim, args.transpose, l);
    cudaError_t err = stage_store(params, args.transpose, p.schedule,
                                  FusedTraits<T, 1, false>::kLogElts, l, blocks, stream);
    if (err != cudaSuccess) return err;
    p.x = args.x;
    p.x_stride = args.x_row_stride;
    p.x_vec = rows_vectorizable(args.x, args.x_row_stride, args.rows, args.dim);
    p.out = args.out;
    p.out_stride = args.out_row_stride;
    p.out_vec = rows_vectorizable<T>(args.out, args.out_row_stride, args.rows, args.dim);
    p.store = blocks;
    p.scale = args.scale;
    p.scale_vec = scale_vectorizable(args.scale);
    const FusedKernel<T> kernel = fused_kernel<T, false>(l, args.transpose);
    kernel<<<plan.grid, plan.cta_threads, plan.smem_bytes, stream>>>(p);
    return cudaGetLastError();
  }
  const cudaError_t err = make_blocks(params, args.dim - 1, blocks, stream);
  if (err != cudaSuccess) return err;
  FallbackParams<T, Acc> p;
  p.rows = args.rows;
  p.dim = args.dim;
  p.schedule = make_schedule(args.dim);
  p.transpose = args.transpose;
  p.x = args.x;
  p.x_stride = args.x_row_stride;
  p.out = args.out;
  p.out_stride = args.out_row_stride;
  p.blocks = blocks;
  p.scale = args.scale;
  p.scratch_in_smem = plan.scratch_in_smem;
  p.scratch_workspace = reinterpret_cast<Acc*>(ws + plan.workspace.scratch_offset);
  const FallbackKernel<T> kernel = fallback_kernel<T>(FallbackPass::kForward, args.transpose);
  kernel<<<plan.grid, plan.cta_threads, plan.smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_rotate_backward(const RotateBackwardArgs<T, typename AccOf<T>::type>& args,
                                   const ParamSource& params, const RotateBackwardPlan& plan,
                                   bool x_is_output, void* workspace, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  if (args.rows == 0) return cudaSuccess;
  if (args.num_chunks != plan.num_partials) return cudaErrorInvalidValue;
  if (x_is_output && (!plan.angle_partials() || args.scale != nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (args.scale_grad_partials != nullptr && !plan.scale_grad) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  Acc* blocks = reinterpret_cast<Acc*>(ws + plan.workspace.blocks_offset);
  if (plan.fused) {
    const FusedLayout& l = plan.layout;
    FusedParams<T, Acc> p = make_fused_params<T, Acc>(args.rows, args.dim, args.transpose, l);
    cudaError_t err = stage_store(params, args.transpose, p.schedule,
                                  FusedTraits<T, 1, true>::kLogElts, l, blocks, stream);
    if (err != cudaSuccess) return err;
    p.x = args.x;
    p.x_stride = args.x_row_stride;
    p.x_vec = rows_vectorizable(args.x, args.x_row_stride, args.rows, args.dim);
    p.x_is_output = x_is_output;
    p.grad_out = args.grad_out;
    p.grad_out_stride = args.grad_out_row_stride;
    p.grad_out_vec = rows_vectorizable(args.grad_out, args.grad_out_row_stride, args.rows, args.dim);
    p.out = args.grad_x;
    p.out_stride = args.grad_x_row_stride;
    p.out_vec = args.grad_x != nullptr &&
                rows_vectorizable<T>(args.grad_x, args.grad_x_row_stride, args.rows, args.dim);
    p.store = blocks;
    p.scale = args.scale;
    p.scale_vec = scale_vectorizable(args.scale);
    p.num_chunks = plan.num_chunks;
    p.block_partials = args.block_grad_partials;
    p.scale_partials = args.scale_grad_partials;
    p.grad_workspace = reinterpret_cast<Acc*>(ws + plan.workspace.scratch_offset);
    const FusedKernel<T> kernel = fused_kernel<T, true>(l, args.transpose);
    kernel<<<plan.grid, plan.cta_threads, plan.smem_bytes, stream>>>(p);
    return cudaGetLastError();
  }
  // The strict fallback reads (cos t, sin t) per pair, in the blocks' part of the workspace.
  const cudaError_t err = plan.strict ? make_rotations(params, args.dim - 1, blocks, stream)
                                      : make_blocks(params, args.dim - 1, blocks, stream);
  if (err != cudaSuccess) return err;
  FallbackParams<T, Acc> p;
  p.rows = args.rows;
  p.dim = args.dim;
  p.schedule = make_schedule(args.dim);
  p.transpose = args.transpose;
  p.x = args.x;
  p.x_stride = args.x_row_stride;
  p.grad_out = args.grad_out;
  p.grad_out_stride = args.grad_out_row_stride;
  p.out = args.grad_x;
  p.out_stride = args.grad_x_row_stride;
  (plan.strict ? p.rotations : p.blocks) = blocks;
  p.scale = args.scale;
  p.scratch_in_smem = plan.scratch_in_smem;
  p.scratch_workspace = reinterpret_cast<Acc*>(ws + plan.workspace.scratch_offset);
  p.x_is_output = x_is_output;
  p.num_chunks = plan.num_chunks;
  p.block_partials = args.block_grad_partials;
  p.scale_partials = args.scale_grad_partials;
  const FallbackKernel<T> kernel = fallback_kernel<T>(
      plan.strict ? FallbackPass::kStrictBackward : FallbackPass::kBackward, args.transpose);
  kernel<<<plan.grid, plan.cta_threads, plan.smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

// First level of the fixed-order sum when there are more partials than one segment; returns the
// array and count the second level sums.
template <typename Acc>
cudaError_t reduce_first_level(const Acc* partials, int64_t num_partials, int64_t length,
                               Acc* workspace, cudaStream_t stream, const Acc** sums,
                               int64_t* count) {
  *sums = partials;
  *count = num_partials;
  if (num_partials <= kReduceSegment) return cudaSuccess;
  const int64_t segments = (num_partials + kReduceSegment - 1) / kReduceSegment;
  const dim3 grid(elementwise_blocks(length), static_cast<unsigned>(segments));
  reduce_segments_kernel<Acc><<<grid, kElementwiseThreads, 0, stream>>>(partials, num_partials,
                                                                        length, workspace);
  *sums = workspace;
  *count = segments;
  return cudaGetLastError();
}

// Both levels of a fixed-order sum of `length`-entry partials: the first level where needed,
// then finish(sums, count), which launches the second level kernel over `outputs` elements.
template <typename Acc, class Finish>
cudaError_t sum_partials_in_two_levels(const Acc* partials, int64_t num_partials, int64_t length,
                                       int64_t outputs, Acc* workspace, cudaStream_t stream,
                                       Finish&& finish) {
  if (outputs == 0) return cudaSuccess;
  const Acc* sums = nullptr;
  int64_t count = 0;
  const cudaError_t err =
      reduce_first_level(partials, num_partials, length, workspace, stream, &sums, &count);
  if (err != cudaSuccess) return err;
  finish(elementwise_blocks(outputs), sums, count);
  return cudaGetLastError();
}

template <typename Acc, typename Param>
cudaError_t launch_block_grads_to_param_grads(const Acc* partials, int64_t num_partials,
                                              int64_t pairs, bool transpose, const Param* params,
                                              bool params_are_blocks, AngleParameterisation map,
                                              Param* grad_params, Acc* workspace,
                                              cudaStream_t stream) {
  return sum_partials_in_two_levels(
      partials, num_partials, 4 * pairs, pairs, workspace, stream,
      [&](unsigned grid, const Acc* sums, int64_t count) {
        finish_block_grads_kernel<Acc, Param><<<grid, kElementwiseThreads, 0, stream>>>(
            sums, count, pairs, transpose, params, params_are_blocks, map, grad_params);
      });
}

template <typename Acc, typename Out>
cudaError_t launch_partial_sums(const Acc* partials, int64_t num_partials, int64_t length,
                                Out* out, Acc* workspace, cudaStream_t stream) {
  return sum_partials_in_two_levels(
      partials, num_partials, length, length, workspace, stream,
      [&](unsigned grid, const Acc* sums, int64_t count) {
        finish_sums_kernel<Acc, Out><<<grid, kElementwiseThreads, 0, stream>>>(sums, count, length,
                                                                               out);
      });
}

template <typename Acc, typename Param>
cudaError_t launch_angle_grad_sums(const Acc* partials, int64_t num_partials, int64_t pairs,
                                   bool negate, const Param* params, AngleParameterisation map,
                                   Param* grad_params, Acc* workspace, cudaStream_t stream) {
  return sum_partials_in_two_levels(
      partials, num_partials, pairs, pairs, workspace, stream,
      [&](unsigned grid, const Acc* sums, int64_t count) {
        finish_angle_grads_kernel<Acc, Param><<<grid, kElementwiseThreads, 0, stream>>>(
            sums, count, pairs, negate, params, map, grad_params);
      });
}

}  // namespace cuda
}  // namespace goft

// Explicit instantiations of the launchers for one element type T of x.
#define GOFT_CUDA_INSTANTIATE_ROTATE(T)                                                          \
  template cudaError_t goft::cuda::plan_rotate<T>(int64_t, int64_t, bool, int,                   \
                                                  goft::cuda::RotatePlan*);                      \
  template cudaError_t goft::cuda::launch_rotate<T>(                                             \
      const goft::RotateArgs<T, goft::cuda::AccOf<T>::type>&, const goft::cuda::ParamSource&,    \
      const goft::cuda::RotatePlan&, void*, cudaStream_t);                                       \
  template cudaError_t goft::cuda::plan_rotate_backward<T>(                                      \
      int64_t, int64_t, bool, bool, bool, int, goft::cuda::RotateBackwardPlan*);                 \
  template cudaError_t goft::cuda::launch_rotate_backward<T>(                                    \
      const goft::RotateBackwardArgs<T, goft::cuda::AccOf<T>::type>&,                            \
      const goft::cuda::ParamSource&, const goft::cuda::RotateBackwardPlan&, bool, void*,        \
      cudaStream_t);

// The element-type-independent launchers, for one accumulation type Acc (float or double).
#define GOFT_CUDA_INSTANTIATE_PARAMS(Acc)                                                         \
  template cudaError_t goft::cuda::launch_block_grads_to_param_grads<Acc, float>(                \
      const Acc*, int64_t, int64_t, bool, const float*, bool, goft::AngleParameterisation,       \
      float*, Acc*, cudaStream_t);                                                               \
  template cudaError_t goft::cuda::launch_block_grads_to_param_grads<Acc, double>(               \
      const Acc*, int64_t, int64_t, bool, const double*, bool, goft::AngleParameterisation,      \
      double*, Acc*, cudaStream_t);                                                              \
  template cudaError_t goft::cuda::launch_angle_grad_sums<Acc, float>(                           \
      const Acc*, int64_t, int64_t, bool, const float*, goft::AngleParameterisation, float*,     \
      Acc*, cudaStream_t);                                                                       \
  template cudaError_t goft::cuda::launch_angle_grad_sums<Acc, double>(                          \
      const Acc*, int64_t, int64_t, bool, const double*, goft::AngleParameterisation, double*,   \
      Acc*, cudaStream_t);                                                                       \
  template cudaError_t goft::cuda::launch_partial_sums<Acc, float>(                              \
      const Acc*, int64_t, int64_t, float*, Acc*, cudaStream_t);                                 \
  template cudaError_t goft::cuda::launch_partial_sums<Acc, double>(                             \
      const Acc*, int64_t, int64_t, double*, Acc*, cudaStream_t);
