// Bodies of goft's CUDA kernels, written against a small thread interface (index, barrier, warp
// shuffle) so that the same code runs on the GPU (rotate.cuh) and in the host emulator that tests
// it without a GPU (tests/cpp/test_cuda_emulated.cpp). No CUDA runtime calls, no torch.
//
// The fused kernels keep each row on chip for all ceil(log2 d) layers. The layout of a row:
//   a group of G threads (G a power of two, 1..1024) owns one row (or kRowsPerGroup rows, laid
//   out alike, sharing each block load); thread t of the group holds kChunks vectors of kElts
//   contiguous features of the row (one 16-byte load each): vector position j = c * G + t
//   covers features [j * kElts, (j + 1) * kElts).
// Layer r (stride s = 2^r) pairs features (a, a + s), a a multiple of 2s, and exists iff a + s < d
// (GOFT_SPEC.md section 2 restated: layer r's c_r active features are the multiples of s below d).
// Only features at multiples of s take part in layer r, which splits the layers by where both
// features of a pair live:
//   thread layers  s < kElts                 inside one vector, registers;
//   lane layers    kElts <= s < W * kElts     element 0 of vectors in lanes t, t ^ (s / kElts),
//                                              warp shuffles (W = min(G, 32));
//   warp layers    W * kElts <= s < G * kElts  element 0 of lane 0 of two warps, via shared
//                                              memory and one warp's shuffles (G > 32 only);
//   chunk layers   s >= G * kElts             element 0 of two chunks of thread t = 0, registers.
// The forward applies the coarsest layer first (x @ R_L ... R_1, then the scale); the transposed
// op runs the same stages in the opposite order with each block transposed. The kernels read the
// blocks "as applied" (transposed on staging when transpose is set): x'_a = C00 x_a + C10 x_b,
// x'_b = C01 x_a + C11 x_b, and accumulate the gradient of C, as the CPU kernels do.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cstdint>
#include <cstring>

#include "goft/blocks.h"
#include "goft/params.h"
#include "goft/schedule.h"

#if defined(__CUDACC__)
#define GOFT_DEVICE_FN __device__ __forceinline__
#define GOFT_UNROLL _Pragma("unroll")
#else
#include <vector>
#define GOFT_DEVICE_FN inline
#define GOFT_UNROLL
#endif

namespace goft {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Element types.

template <typename T>
struct AccOf {
  using type = float;  // bfloat16, float16 and float accumulate in float
};
template <>
struct AccOf<double> {
  using type = double;
};

GOFT_HOST_DEVICE float to_acc(float v) { return v; }
GOFT_HOST_DEVICE double to_acc(double v) { return v; }
GOFT_HOST_DEVICE float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
GOFT_HOST_DEVICE float to_acc(__half v) { return __half2float(v); }

// Round-to-nearest-even, as the CPU path's static_cast to c10::BFloat16 / c10::Half.
template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  static GOFT_HOST_DEVICE float convert(float v) { return v; }
};
template <>
struct FromAcc<double> {
  static GOFT_HOST_DEVICE double convert(double v) { return v; }
};
template <>
struct FromAcc<__nv_bfloat16> {
  static GOFT_HOST_DEVICE __nv_bfloat16 convert(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct FromAcc<__half> {
  static GOFT_HOST_DEVICE __half convert(float v) { return __float2half_rn(v); }
};

// N elements moved as one aligned access: 16 bytes is the widest load a thread can issue.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// 16 bytes as the memory system moves them: CUDA's uint4, whose copies nvcc always emits as one
// 16-byte access. A Vec of __nv_bfloat16 or __half copies member by member (their assignment
// operators are user-provided), which compiles to eight 2-byte accesses, each spanning a warp's
// whole 512 bytes; plain aligned stores of four words still get split into 4-byte stores.
//
// Loaded rows stay in this packed form until they are converted (RawChunk): unpacked into a Vec
// of 2-byte elements at the load, the PRMTs that split the words follow the LDG at once and wait
// for it, so a load meant to be in flight during the previous row's work stalls its warp instead
// (ncu on v8's forward: 6.4 of 17.1 cycles per instruction waiting on L1TEX results).
using RawChunk = uint4;

template <typename T, int N>
GOFT_HOST_DEVICE RawChunk pack_vec16(const Vec<T, N>& v) {
  static_assert(sizeof(Vec<T, N>) == sizeof(RawChunk), "a vector must be exactly 16 bytes");
  RawChunk bits;
  memcpy(&bits, static_cast<const void*>(&v), sizeof(bits));
  return bits;
}

template <typename T, int N>
GOFT_HOST_DEVICE Vec<T, N> unpack_vec16(const RawChunk& bits) {
  static_assert(sizeof(Vec<T, N>) == sizeof(RawChunk), "a vector must be exactly 16 bytes");
  Vec<T, N> v;
  memcpy(static_cast<void*>(&v), &bits, sizeof(bits));
  return v;
}

// The 32-bit word holding elements 2i and 2i + 1 (2-byte T), or element i (4-byte T), or half of
// element i / 2 (8-byte T).
template <typename T, int N>
GOFT_HOST_DEVICE unsigned int vec16_word(const Vec<T, N>& v, int i) {
  unsigned int word;
  if constexpr (sizeof(T) == 2) {
    unsigned short lo, hi;
    memcpy(&lo, static_cast<const void*>(&v.v[2 * i]), 2);
    memcpy(&hi, static_cast<const void*>(&v.v[2 * i + 1]), 2);
    word = static_cast<unsigned int>(lo) | (static_cast<unsigned int>(hi) << 16);
  } else {
    memcpy(&word, reinterpret_cast<const char*>(&v) + 4 * i, 4);
  }
  return word;
}

template <typename T, int N>
GOFT_HOST_DEVICE void store_vec16(T* p, const Vec<T, N>& v) {
  static_assert(sizeof(Vec<T, N>) == sizeof(uint4), "a vector must be exactly 16 bytes");
  uint4 bits;
  bits.x = vec16_word(v, 0);
  bits.y = vec16_word(v, 1);
  bits.z = vec16_word(v, 2);
  bits.w = vec16_word(v, 3);
#if defined(__CUDA_ARCH__)
  // The intrinsic is inline PTX (st.global.wb.v4.u32): a plain uint4 store was still split.
  __stwb(reinterpret_cast<uint4*>(p), bits);
#else
  *reinterpret_cast<uint4*>(p) = bits;
#endif
}

#if !defined(__CUDACC__)
// The host emulator's cp.async (tests/cpp/test_cuda_emulated.cpp): the copies a thread has issued
// and not yet waited for.
struct EmulatedAsyncCopy {
  RawChunk* dst;
  const void* src;
};
inline std::vector<EmulatedAsyncCopy>& emulated_async_copies() {
  thread_local std::vector<EmulatedAsyncCopy> pending;
  return pending;
}
#endif

// cp.async of one 16-byte chunk from global to shared memory (sm_80 and later; a plain copy on
// older GPUs). The copies a thread issued are complete and visible to it after
// async_copy_wait_all, and not before: the host emulator makes them land only there, and fills
// the slot with NaN until then, so that a read before the wait fails its tests. kViaL1: cache the
// line in L1 too (.ca), for data that other warps of the block read soon after (the lead chunks);
// else L2 only (.cg), as a row's own chunks are read once.
template <bool kViaL1 = false>
GOFT_DEVICE_FN void async_copy16(RawChunk* smem_dst, const void* global_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  if (kViaL1) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src)
                 : "memory");
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src)
                 : "memory");
  }
#elif !defined(__CUDACC__)
  std::memset(static_cast<void*>(smem_dst), 0xff, sizeof(RawChunk));
  emulated_async_copies().push_back({smem_dst, global_src});
#else
  *smem_dst = *static_cast<const RawChunk*>(global_src);
#endif
}

GOFT_DEVICE_FN void async_copy_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

GOFT_DEVICE_FN void async_copy_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#elif !defined(__CUDACC__)
  for (const EmulatedAsyncCopy& copy : emulated_async_copies()) {
    *copy.dst = *static_cast<const RawChunk*>(copy.src);
  }
  emulated_async_copies().clear();
#endif
}

constexpr int ilog2(int n) { return n <= 1 ? 0 : 1 + ilog2(n / 2); }
constexpr int ceil_log2(int n) { return n <= 1 ? 0 : 1 + ceil_log2((n + 1) / 2); }

// ---------------------------------------------------------------------------------------------
// Kernel traits of the fused kernels.

// Whether a strict backward kernel's thread holds at most 32 bytes of the row in the accumulation
// type (one bf16/fp16 chunk, up to two float32 or float64 ones): such kernels are compiled for two
// blocks per SM (FusedTraits::kMinBlocksPerSm) and stage their next rows (kStageRows). The
// planner sizes their shared memory with it (plan.h).
constexpr bool strict_fits_two_blocks(bool strict, int chunks, int elts, int acc_bytes) {
  return strict && chunks * elts * acc_bytes <= 32;
}

template <typename T_, int kChunks_, bool kBackward_, int kRowsPerGroup_ = 1,
          bool kStrict_ = false>
struct FusedTraits {
  using T = T_;
  using Acc = typename AccOf<T>::type;
  static constexpr bool kBackward = kBackward_;

  // Strict GOFT's backward (blocks from angles, so every block is a rotation). A rotation's
  // inverse is its transpose, the same map that takes a gradient back through the pair, so the
  // backward rebuilds each layer's input from its output instead of keeping it (GOFT_SPEC.md
  // section 4), and a pair's angle gradient needs only its output y and the gradient g there:
  // section 4's dt, with y_a = c u_a + s u_b and y_b = c u_b - s u_a, is g_a y_b - g_b y_a per
  // row (for the block as applied; the transposed op's angle gets the opposite sign). One
  // accumulator per pair instead of four and no saved inputs: about half the registers. The
  // partials (FusedParams::block_partials) then hold one angle gradient per pair.
  static constexpr bool kStrict = kStrict_;
  static_assert(!kStrict || kBackward, "strict: a backward variant");

  // One 16-byte vector per chunk: the widest global access, and what keeps loads coalesced.
  static constexpr int kVecBytes = 16;
  static constexpr int kElts = kVecBytes / static_cast<int>(sizeof(T));
  static constexpr int kLogElts = ilog2(kElts);
  static_assert(kElts * sizeof(T) == kVecBytes, "a vector must be exactly 16 bytes of T");
  // Layer 0 must pair features inside one vector, and a vector's features must be a power of
  // two so that layer boundaries fall on vector boundaries.
  static_assert(kElts >= 2 && (1 << kLogElts) == kElts, "kElts must be a power of two >= 2");

  // Vectors per thread. The row is held in registers: more chunks means more registers per
  // thread and fewer threads per block before the register file is full. Four chunks of 16
  // bytes with 1024 threads hold d = 16384 in float; rows or register counts beyond what a
  // block can hold take the fallback kernel (plan.h decides at run time).
  static constexpr int kChunks = kChunks_;
  static_assert(kChunks >= 1 && kChunks <= 4, "kChunks must be 1..4 (register budget)");
  static constexpr int kChunkLayers = ceil_log2(kChunks);

  // Rows a group transforms together. They share every block load, address computation, branch
  // and barrier of a layer, which are most of a row's instructions when a thread holds only one
  // vector; each row costs its own registers (forward only: the backward's saved inputs would
  // not fit twice).
  static constexpr int kRowsPerGroup = kRowsPerGroup_;
  static_assert(kRowsPerGroup >= 1 && (!kBackward || kRowsPerGroup == 1),
                "several rows per group: forward only");

  static constexpr int kWarpSize = 32;
  // A row group is at most one thread block, and a block has at most 1024 threads.
  static constexpr int kMaxGroupThreads = 1024;
  // Warp layers gather one value per warp of a group into one warp: at most 32 warps per group.
  static_assert(kMaxGroupThreads / kWarpSize <= kWarpSize, "one warp must hold a value per warp");
  // In-row indices (features, block slots) are 32-bit: the widest row a group holds must leave
  // room for (kElts - 1) slots per vector plus the coarse layers' pairs.
  static constexpr int kMaxDim = kMaxGroupThreads * kChunks * kElts;
  static_assert(static_cast<int64_t>(kMaxDim) * kElts < (int64_t{1} << 30), "slots must fit in int");
  // Layers a row of kMaxDim features has, bounded by FusedParams::layer_base.
  static constexpr int kMaxLayers = ilog2(kMaxDim);
  static_assert(kMaxLayers < 32, "FusedParams::layer_base has 32 entries");

  // Layer 0 is half of all pairs and each of its pairs belongs to exactly one thread, so in
  // backward its gradient accumulators can stay in that thread's registers for the whole
  // kernel, which removes half of the shared-memory read-modify-writes per row. They cost
  // 4 * kElts / 2 registers per chunk: only one or two chunks can afford them.
  static constexpr bool kLayer0GradsInRegisters =
      kBackward && !kStrict && kChunks * kElts * static_cast<int>(sizeof(Acc)) <= 32;
  // Strict: the angle gradients of all thread layers' pairs (kElts - 1 per vector) stay in their
  // owner's registers, those of the coarser layers in the group's accumulators (RowCtx::grads).
  static constexpr bool kThreadAngleGradsInRegisters = kStrict;
  // And those of its lane-layer pairs (ThreadAngleGrads::lane): five registers per chunk, which
  // only the one-chunk kernels have to spare (ptxas: the float32 two-chunk kernel spilled 44 B
  // with them, 16 B without).
  static constexpr bool kLaneAngleGradsInRegisters = kStrict && kChunks == 1;
  // The group's next rows are loaded while the current ones are transformed. The backward holds
  // about four values per feature, so only its one-chunk kernels have the registers for the next
  // row's x and grad_out; the strict one spends them on a second block per SM instead
  // (kMinBlocksPerSm) and stages its next row in shared memory (kStageRows).
  static constexpr bool kPrefetch = kBackward ? kChunks == 1 && !kStrict : kChunks <= 2;

  // Block size the compiler must allow (__launch_bounds__), which caps registers per thread at
  // 65536 / kLaunchBoundThreads. Without a cap the compiler spends registers freely and the wide
  // rows, which need the most threads per row, could not launch at all. Forward: 1024 threads
  // (64 registers; the 1- and 2-chunk kernels need fewer anyway). Backward holds about four
  // values per feature: 512 threads (128 registers).
  static constexpr int kLaunchBoundThreads = kBackward ? 512 : 1024;
  // Blocks of kLaunchBoundThreads that must fit on one SM together (__launch_bounds__' second
  // argument), which caps registers at 65536 / (kLaunchBoundThreads * kMinBlocksPerSm). A strict
  // backward whose thread holds at most 32 bytes of the row in Acc (one bf16/fp16 chunk, up to
  // two float32 or float64 ones) keeps it in about the forward's registers: two blocks of 512
  // threads (64 registers; ptxas: no spills in the shared-memory kernels that are not
  // transposed) let one block's barrier waits and loads overlap the other's work. 0 states no
  // minimum; even 1 would change ptxas's register allocation (.minnctapersm).
  static constexpr bool kTwoBlocksPerSm =
      strict_fits_two_blocks(kStrict, kChunks, kElts, static_cast<int>(sizeof(Acc)));
  static constexpr int kMinBlocksPerSm = kTwoBlocksPerSm ? 2 : 0;

  // The strict two-block kernels have no registers left for the next row (kPrefetch), so they
  // stage it in shared memory instead where two blocks per SM still fit with it
  // (FusedParams::stage_rows, plan.h): each thread copies its own 16-byte chunks of the group's
  // next row of x and grad_out with cp.async while the current row is transformed
  // (FusedSmemLayout::stage), and reads them back at the next row; no barrier, as no thread
  // reads another's chunks. Without it each row's loads were waited for in full.
  static constexpr bool kStageRows = kTwoBlocksPerSm;

  // Where the warp layers come first in a row's walk (the forward and the backward's recomputed
  // forward when not transposed; the backward's own walk when transposed), their inputs are the
  // row's own values at one feature per warp (or, after a recomputed forward, that forward's
  // outputs, which every lane already holds: warp_layers' return value).
  // Each warp then reads them itself: lane w < G / 32 fetches element 0 of warp w's lead chunk
  // (the first vector of its lane 0) with the row, prefetched, staged or loaded like it, and the
  // exchange through shared memory and its barrier go (warp_layers). One chunk per thread only:
  // with more, the chunk layers act on those features before the warp layers do.
  static constexpr bool kLeads = kChunks == 1;

  // The store's thread-layer slots in shared memory: 4 entries each, or 2 (PlacedTraits).
  static constexpr bool kCompactThreadSlots = false;
};

// A kernel's traits with its placement. kOnChip: the block store, and in backward the gradient
// accumulators, are in shared memory (fused_on_chip, plan.h). The strict kernels' blocks are
// rotations, (C00, C01, C10, C11) = (c, -s, s, c) for the angle as applied, so on chip they
// keep each thread-layer slot as (C00, C10): half the bytes that every row loads from shared
// memory for the thread layers, twice per row in the backward (fused_store_entries).
template <class K, bool kOnChip_>
struct PlacedTraits : K {
  static constexpr bool kCompactThreadSlots = K::kStrict && kOnChip_;
};

// ---------------------------------------------------------------------------------------------
// Arguments of the fused kernels, filled by the launcher from RotateArgs / RotateBackwardArgs and
// the launch plan.

template <typename T, typename Acc>
struct FusedParams {
  int64_t rows = 0;
  int dim = 0;                // fits in int: FusedTraits::kMaxDim
  PairSchedule schedule;
  bool transpose = false;

  // Launch layout (plan.h).
  int group_threads = 1;      // G: threads per row, a power of two
  int log_group_threads = 0;
  int cta_threads = 1;        // rows_per_cta * G
  int rows_per_cta = 1;       // row groups per thread block
  int vcap = 0;               // G * kChunks vector positions per row
  int num_slots = 0;          // block slots (block_slot)
  int layer_base[32] = {};    // slot of pair 0 of each coarse layer (r >= log2 kElts)

  // Rows: x (forward input and backward recompute input), out (forward output or grad_x).
  const T* x = nullptr;
  int64_t x_stride = 0;
  bool x_vec = false;         // 16-byte aligned rows and d % kElts == 0: vector accesses
  // Strict backward, no scale: x holds the op's output, so the recomputed forward is skipped
  // (the kernels rebuild every layer's input from the output anyway).
  bool x_is_output = false;
  T* out = nullptr;
  int64_t out_stride = 0;
  bool out_vec = false;
  const T* grad_out = nullptr;  // backward only
  int64_t grad_out_stride = 0;
  bool grad_out_vec = false;

  const Acc* store = nullptr;   // (num_slots, 4) applied blocks in slot order
  bool store_in_smem = false;   // copy the store to shared memory once per block
  const Acc* scale = nullptr;   // (d,) or nullptr
  bool scale_vec = false;       // 16-byte aligned: a thread's scales in 16-byte loads

  // Backward: rows are split into num_chunks contiguous chunks; group g of the block that owns
  // chunk c takes rows begin + g, begin + g + rows_per_cta, ... and writes partial
  // c * rows_per_cta + g. Which block owns a chunk changes no result.
  int64_t num_chunks = 0;
  // (num_chunks * rows_per_cta, d - 1, 4) block gradients, or (..., d - 1) angle gradients of
  // the blocks as applied when K::kStrict.
  Acc* block_partials = nullptr;
  Acc* scale_partials = nullptr;  // (num_chunks * rows_per_cta, d) or nullptr
  bool grads_in_smem = true;      // accumulators in shared memory, else in grad_workspace
  bool stage_rows = false;        // K::kStageRows kernels: stage the next rows (plan.h)
  Acc* grad_workspace = nullptr;  // per block: rows_per_cta * (grad entries + padded d)
};

GOFT_HOST_DEVICE int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Where each array of a fused kernel lives in dynamic shared memory, in Acc elements. Every
// region starts at a multiple of 4 elements so that block loads stay 16-byte aligned.
struct FusedSmemLayout {
  int64_t exchange = 0, exchange_per_group = 0;
  int64_t blocks = 0;
  int64_t grads = 0, grads_per_group = 0;
  int64_t scale_grads = 0, scale_grads_per_group = 0;
  // Staged next rows (FusedTraits::kStageRows): per group, x's chunks then grad_out's, each
  // chunk-major ([c][t]: consecutive threads, consecutive 16 bytes), then the lead chunks of x
  // and of grad_out (FusedTraits::kLeads), [warp][lead] each.
  int64_t stage = 0, stage_per_group = 0;
  int64_t total = 0;
};

// Acc elements a group needs to stage its next row of x and grad_out (0 when it does not), and
// with one chunk per thread (FusedTraits::kLeads) each warp's lead chunks of both: one per warp
// of the group, [warp][lead].
GOFT_HOST_DEVICE int64_t fused_stage_per_group(bool stages, int chunks, int group_threads,
                                               int acc_bytes) {
  const int64_t warps = group_threads > 32 ? group_threads / 32 : 0;
  const int64_t leads = chunks == 1 ? warps * warps : 0;
  return stages ? 2 * (int64_t{chunks} * group_threads + leads) * (16 / acc_bytes) : 0;
}

// exchange_values: values per chunk that each warp of a group exchanges in the warp layers (its
// rows, and in the strict backward the outputs beside the gradients, fused_exchange_values);
// grad_entries: gradient accumulators per group in backward (fused_grad_entries); stage_per_group:
// fused_stage_per_group.
GOFT_HOST_DEVICE FusedSmemLayout fused_smem_layout(int chunks, int exchange_values,
                                                   int group_threads, int rows_per_cta,
                                                   int64_t store_entries, int64_t grad_entries,
                                                   int64_t dim, bool backward, bool scale_grad,
                                                   bool store_in_smem, bool grads_in_smem,
                                                   int64_t stage_per_group) {
  FusedSmemLayout l;
  // Two exchange buffers alternate so that one barrier per exchange is enough (see warp_layers);
  // each holds one value per exchanged value of the group, chunk and warp.
  const int64_t warps = group_threads > 32 ? group_threads / 32 : 0;
  l.exchange_per_group = round_up(2 * exchange_values * chunks * warps, 4);
  l.exchange = 0;
  int64_t at = l.exchange_per_group * rows_per_cta;
  l.blocks = at;
  if (store_in_smem) at += store_entries;
  l.grads_per_group = grad_entries;
  l.scale_grads_per_group = scale_grad ? round_up(dim, 4) : 0;
  l.grads = at;
  if (backward && grads_in_smem) at += l.grads_per_group * rows_per_cta;
  l.scale_grads = at;
  if (backward && grads_in_smem) at += l.scale_grads_per_group * rows_per_cta;
  l.stage_per_group = stage_per_group;  // a multiple of 4 elements: 16-byte chunks
  l.stage = at;
  at += l.stage_per_group * rows_per_cta;
  l.total = at;
  return l;
}

// ---------------------------------------------------------------------------------------------
// Block slots: the order in which the fused kernels read (and accumulate) blocks.
//   thread layer r < e = log2(kElts), pair kk of vector j:
//       j * (kElts - 1) + (kElts - (kElts >> r)) + kk
//     a vector's kElts - 1 in-vector pairs are contiguous (one base address per vector, constant
//     offsets); the stride between threads, kElts - 1 blocks, is odd, so the 16-byte loads of
//     consecutive threads hit distinct shared-memory banks;
//   coarser layer r, pair k: vcap * (kElts - 1) + offset[r] - offset[e] + k.

GOFT_HOST_DEVICE int64_t thread_layer_slot(int elts, int r, int kk, int64_t j) {
  return j * (elts - 1) + (elts - (elts >> r)) + kk;
}

// The thread layers' slots come first (kElts - 1 per vector position), then the coarse ones.
GOFT_HOST_DEVICE int64_t first_coarse_slot(int log_elts, int64_t vcap) {
  return ((int64_t{1} << log_elts) - 1) * vcap;
}

GOFT_HOST_DEVICE int64_t coarse_layer_base(const PairSchedule& s, int log_elts, int64_t vcap, int r) {
  return first_coarse_slot(log_elts, vcap) + s.offset[r] - s.offset[log_elts];
}

GOFT_HOST_DEVICE int64_t fused_num_slots(const PairSchedule& s, int log_elts, int64_t vcap) {
  const int64_t coarse = s.num_layers > log_elts ? s.num_pairs() - s.offset[log_elts] : 0;
  return first_coarse_slot(log_elts, vcap) + coarse;
}

// Acc entries of the block store in shared memory: 4 per slot, or with compact thread-layer slots
// (PlacedTraits) 2 per thread-layer slot, padded to a multiple of 4 so that the coarse slots that
// follow stay 16-byte aligned.
GOFT_HOST_DEVICE int64_t fused_store_entries(bool compact_thread_slots, int64_t num_slots,
                                             int log_elts, int64_t vcap) {
  const int64_t thread_slots = first_coarse_slot(log_elts, vcap);
  return compact_thread_slots ? round_up(2 * thread_slots, 4) + 4 * (num_slots - thread_slots)
                              : 4 * num_slots;
}

// Slot of the pair stored at flat index p (schedule order).
GOFT_HOST_DEVICE int64_t block_slot(const PairSchedule& s, int log_elts, int64_t vcap, int64_t p) {
  int r = 0;
  while (r + 1 < s.num_layers && s.offset[r + 1] <= p) ++r;
  const int elts = 1 << log_elts;
  if (r < log_elts) {
    const int64_t a = (p - s.offset[r]) << (r + 1);  // first feature of the pair
    return thread_layer_slot(elts, r, static_cast<int>((a & (elts - 1)) >> (r + 1)), a >> log_elts);
  }
  return coarse_layer_base(s, log_elts, vcap, r) + (p - s.offset[r]);
}

// Gradient accumulators per row group: the four entries of every block's gradient, or for the
// strict kernels one angle gradient per coarse slot.
GOFT_HOST_DEVICE int64_t fused_grad_entries(bool strict, int64_t num_slots, int log_elts,
                                            int64_t vcap) {
  // A multiple of 4 entries, so that the next region stays 16-byte aligned.
  return strict ? round_up(num_slots - first_coarse_slot(log_elts, vcap), 4) : 4 * num_slots;
}

// Values per chunk a warp exchanges in the warp layers: one per row of the group, and in the
// strict backward also the row's output beside its gradient.
GOFT_HOST_DEVICE int fused_exchange_values(int rows_per_group, bool strict_backward) {
  return rows_per_group + (strict_backward ? 1 : 0);
}

// ---------------------------------------------------------------------------------------------
// 2x2 steps shared by all kernels. c = (C00, C01, C10, C11), the block as applied.

template <typename Acc>
GOFT_HOST_DEVICE void apply_pair(const Acc* c, Acc& a, Acc& b) {
  const Acc ua = a, ub = b;
  a = c[0] * ua + c[2] * ub;
  b = c[1] * ua + c[3] * ub;
}

// Gradient at the pair's input from the gradient (ga, gb) at its output: g = C g'.
template <typename Acc>
GOFT_HOST_DEVICE void pair_input_grad(const Acc* c, Acc& ga, Acc& gb) {
  const Acc a = ga, b = gb;
  ga = c[0] * a + c[1] * b;
  gb = c[2] * a + c[3] * b;
}

// dC += outer([ua, ub], [ga, gb]).
template <typename Acc>
GOFT_HOST_DEVICE void add_block_grad(Acc* d, Acc ua, Acc ub, Acc ga, Acc gb) {
  d[0] += ua * ga;
  d[1] += ua * gb;
  d[2] += ub * ga;
  d[3] += ub * gb;
}

template <typename Acc>
GOFT_HOST_DEVICE void load_block(const Acc* p, Acc* c) {
  const Vec<Acc, 4> v = *reinterpret_cast<const Vec<Acc, 4>*>(p);
  c[0] = v.v[0];
  c[1] = v.v[1];
  c[2] = v.v[2];
  c[3] = v.v[3];
}

template <typename Acc>
GOFT_HOST_DEVICE void accumulate_block(Acc* p, Acc ua, Acc ub, Acc ga, Acc gb) {
  Vec<Acc, 4> v = *reinterpret_cast<Vec<Acc, 4>*>(p);
  add_block_grad(v.v, ua, ub, ga, gb);
  *reinterpret_cast<Vec<Acc, 4>*>(p) = v;
}

// The block of pair (A00, A01, A10, A11) as the op applies it: A, or A^T when transposed.
template <typename Acc>
GOFT_HOST_DEVICE void applied_block(const Acc* a, bool transpose, Acc* c) {
  c[0] = a[0];
  c[1] = transpose ? a[2] : a[1];
  c[2] = transpose ? a[1] : a[2];
  c[3] = a[3];
}

// Coarse slots (the lane, warp and chunk layers' pairs) hold their block in lane order,
// (C00, C10, C11, C01): what the pair's a lane multiplies its own value and its partner's by in
// the forward map (apply_pair), then the b lane's. A lane loads its two with one 8-byte access
// at 2 * side, and its update is own * v + partner * o on either side; the backward's
// multipliers (pair_input_grad) are the same own with the other side's partner, which for a
// rotation (C01 = -C10) is -partner.
template <typename Acc>
GOFT_HOST_DEVICE void to_lane_order(const Acc* c, Acc* lane_order) {
  lane_order[0] = c[0];
  lane_order[1] = c[2];
  lane_order[2] = c[3];
  lane_order[3] = c[1];
}

// A coarse slot's block as applied, (C00, C01, C10, C11), from its lane order.
template <typename Acc>
GOFT_HOST_DEVICE void load_coarse_block(const Acc* slot, Acc* c) {
  Acc lane_order[4];
  load_block(slot, lane_order);
  c[0] = lane_order[0];
  c[1] = lane_order[3];
  c[2] = lane_order[1];
  c[3] = lane_order[2];
}

// A lane's forward multipliers (own, partner) in a layer of shuffles (lane or warp layers), whose
// member m (a thread of the group, or the warp a lane stands for) pairs with m ^ 2^q: its pair is
// slot m >> (q + 1) from `first`, the layer's first slot for the chunk, and its half of the slot
// (the a side's first) is 8-byte unit m >> q from there. One shift, no side test.
template <typename Acc>
GOFT_HOST_DEVICE Vec<Acc, 2> load_lane_multipliers(const Acc* first, int member, int q) {
  return *reinterpret_cast<const Vec<Acc, 2>*>(first + 2 * (member >> q));
}

// An integer the compiler cannot see through. The fused kernels pass the thread index through
// it once per row, so per-layer addresses and predicates are recomputed from it (a few integer
// instructions) instead of being hoisted out of the row loop, where dozens of them would each
// hold a register for the whole kernel and cut occupancy.
GOFT_DEVICE_FN int opaque(int v) {
#if defined(__CUDA_ARCH__)
  asm volatile("" : "+r"(v));
#endif
  return v;
}

// ---------------------------------------------------------------------------------------------
// The fused kernels.

// What one thread knows about its row group.
template <class K, class Threads>
struct RowCtx {
  using T = typename K::T;
  using Acc = typename K::Acc;
  const FusedParams<T, Acc>& p;
  const Threads& th;
  int d = 0;
  int G = 1, LG = 0;            // group threads and log2
  int LW = 0;                   // log2 of lanes per group inside a warp, min(LG, 5)
  int t = 0;                    // thread within the group
  int group = 0;                // group within the block
  int num_layers = 0;
  const Acc* blocks = nullptr;  // block store, slot order (shared or global memory)
  // The coarse slots, indexed by slot like blocks: blocks itself, or past the compact
  // thread-layer slots (K::kCompactThreadSlots).
  const Acc* coarse = nullptr;
  // This group's gradient accumulators (backward): block gradients in slot order, or for the
  // strict kernels the angle gradients of the coarse slots, slot - coarse_first.
  Acc* grads = nullptr;
  int coarse_first = 0;         // first_coarse_slot
  Acc* scale_grads = nullptr;   // this group's (d,) scale gradient, or nullptr
  Acc* exchange = nullptr;      // this group's two exchange buffers (G > 32)
  RawChunk* stage = nullptr;    // this group's staged next row (K::kStageRows)

  GOFT_DEVICE_FN int vpos(int c) const { return c * G + t; }
  // The same context with the thread index hidden from the optimiser (see opaque).
  GOFT_DEVICE_FN RowCtx refreshed() const {
    RowCtx r = *this;
    r.t = opaque(t);
    return r;
  }
};

// Inputs of every layer a thread takes part in, recorded by the recomputed forward of the
// backward pass. Fully unrolled code indexes them with constants, so they stay in registers.
template <class K>
struct SavedInputs {
  using Acc = typename K::Acc;
  Acc thread[K::kChunks][K::kLogElts][K::kElts];
  Acc lane[K::kChunks][5];
  Acc warp[K::kChunks][5];
  Acc chunk[K::kChunkLayers > 0 ? K::kChunkLayers : 1][K::kChunks];
};

// Layer-0 gradient accumulators of a thread (backward, kLayer0GradsInRegisters).
template <class K>
struct Layer0Grads {
  using Acc = typename K::Acc;
  static constexpr bool kUsed = K::kLayer0GradsInRegisters;
  static constexpr int kChunks = kUsed ? K::kChunks : 1;
  static constexpr int kPairs = kUsed ? K::kElts / 2 : 1;
  Acc g[kChunks][kPairs][4];
};

// Angle-gradient accumulators a thread keeps in registers (strict backward): those of its
// thread-layer pairs, indexed like a vector's block slots, [chunk][kElts - (kElts >> r) + kk],
// and (FusedTraits::kLaneAngleGradsInRegisters) per chunk and lane layer q the sum of its lane's
// terms, [chunk][q]: a pair's a lane holds the pair's, which store_lane_angle_grads moves to the
// group's accumulators before a flush; a b lane's sum is never used. Every row's term then costs
// an add in a register instead of a shared-memory read-modify-write at a computed address.
template <class K>
struct ThreadAngleGrads {
  using Acc = typename K::Acc;
  static constexpr bool kUsed = K::kThreadAngleGradsInRegisters;
  Acc g[kUsed ? K::kChunks : 1][kUsed ? K::kElts - 1 : 1];
  static constexpr bool kLaneUsed = K::kLaneAngleGradsInRegisters;
  Acc lane[kLaneUsed ? K::kChunks : 1][kLaneUsed ? 5 : 1];
};

// The rows a group transforms together, in the accumulation type: [row][chunk][element].
template <class K>
using GroupRows = typename K::Acc[K::kRowsPerGroup][K::kChunks][K::kElts];

// The chunk of features [f0, f0 + kElts) read one by one and packed: the path for rows that are
// not 16-byte vectors, with zeros past the row's end or for an invalid row.
template <class K>
GOFT_DEVICE_FN RawChunk load_chunk_scalars(const typename K::T* row, int f0, int d, bool valid) {
  using T = typename K::T;
  Vec<T, K::kElts> v;
  GOFT_UNROLL
  for (int i = 0; i < K::kElts; ++i) {
    v.v[i] = valid && f0 + i < d ? row[f0 + i] : FromAcc<T>::convert(0);
  }
  return pack_vec16(v);
}

// The chunk of features [f0, f0 + kElts) of a row, packed: one 16-byte load where rows are
// vectors (vec), else load_chunk_scalars.
template <class K>
GOFT_DEVICE_FN RawChunk load_chunk(const typename K::T* row, int f0, int d, bool vec, bool valid) {
  return valid && vec && f0 < d ? *reinterpret_cast<const RawChunk*>(row + f0)
                                : load_chunk_scalars<K>(row, f0, d, valid);
}

// The same into shared memory at slot: cp.async for whole 16-byte vectors, plain stores of the
// packed scalars elsewhere. Complete and visible to this thread after async_copy_wait_all.
template <class K, bool kViaL1 = false>
GOFT_DEVICE_FN void stage_chunk(const typename K::T* row, int f0, int d, bool vec, bool valid,
                                RawChunk* slot) {
  if (valid && vec && f0 < d) {
    async_copy16<kViaL1>(slot, row + f0);
  } else {
    *slot = load_chunk_scalars<K>(row, f0, d, valid);
  }
}

// A thread's chunks of one row, packed (RawChunk); zeros past the row's end or for an invalid row.
template <class K, class Threads>
GOFT_DEVICE_FN void load_raw(const RowCtx<K, Threads>& x, const typename K::T* row, bool vec,
                             bool valid, RawChunk (&raw)[K::kChunks]) {
  GOFT_UNROLL
  for (int c = 0; c < K::kChunks; ++c) {
    raw[c] = load_chunk<K>(row, x.vpos(c) * K::kElts, x.d, vec, valid);
  }
}

// Stages a thread's chunks of one row (FusedTraits::kStageRows) at dst[c * G]. Read back with
// read_staged after async_copy_wait_all.
template <class K, class Threads>
GOFT_DEVICE_FN void stage_row(const RowCtx<K, Threads>& x, const typename K::T* row, bool vec,
                              bool valid, RawChunk* dst) {
  GOFT_UNROLL
  for (int c = 0; c < K::kChunks; ++c) {
    stage_chunk<K>(row, x.vpos(c) * K::kElts, x.d, vec, valid, dst + c * x.G + x.t);
  }
}

template <class K, class Threads>
GOFT_DEVICE_FN void read_staged(const RowCtx<K, Threads>& x, const RawChunk* src,
                                RawChunk (&raw)[K::kChunks]) {
  GOFT_UNROLL
  for (int c = 0; c < K::kChunks; ++c) raw[c] = src[c * x.G + x.t];
}

// Lead values (FusedTraits::kLeads): lane w < G / 32 of every warp holds element 0 of warp w's
// lead chunk (the first vector of its lane 0) of x (each row of the group) and of grad_out; the
// other lanes hold 0. given: they are the inputs of the warp layers in this row's walk (the same
// for the whole block). Passed by value, so that they stay in registers.
template <class K>
struct LeadValues {
  typename K::Acc x[K::kRowsPerGroup] = {}, g = 0;
  bool given = false;
};

// The feature where the lead chunk this thread fetches starts, or -1 for lanes without one.
template <class K, class Threads>
GOFT_DEVICE_FN int lead_feature(const RowCtx<K, Threads>& x) {
  const int lane = x.t & 31;
  return lane < (x.G >> 5) ? 32 * lane * K::kElts : -1;
}

// This thread's staged lead chunk of x (tensor 0) or grad_out (1): after the group's staged
// rows, [tensor][warp][lead] (fused_stage_per_group). Computed from the (refreshed) context where
// it is used rather than held for the whole kernel.
template <class K, class Threads>
GOFT_DEVICE_FN RawChunk* lead_slot(const RowCtx<K, Threads>& x, int tensor) {
  const int warps = x.G >> 5;
  return x.stage + 2 * K::kChunks * x.G + (tensor * warps + (x.t >> 5)) * warps + (x.t & 31);
}

// Stages this thread's lead chunk of one row (lead_slot), through L1: every warp of the group
// fetches the same chunks, and their owners the same sectors.
template <class K, class Threads>
GOFT_DEVICE_FN void stage_lead(const RowCtx<K, Threads>& x, const typename K::T* row, bool vec,
                               bool valid, int tensor) {
  const int f0 = lead_feature(x);
  if (f0 >= 0) stage_chunk<K, true>(row, f0, x.d, vec, valid, lead_slot(x, tensor));
}

template <class K>
GOFT_DEVICE_FN typename K::Acc first_element(const RawChunk& raw) {
  return to_acc(unpack_vec16<typename K::T, K::kElts>(raw).v[0]);
}

// This thread's lead value of one row, staged (after async_copy_wait_all); load_lead reads it from
// the row instead, unconverted.
template <class K, class Threads>
GOFT_DEVICE_FN typename K::Acc read_staged_lead(const RowCtx<K, Threads>& x, int tensor) {
  return lead_feature(x) >= 0 ? first_element<K>(*lead_slot(x, tensor)) : typename K::Acc(0);
}

template <class K, class Threads>
GOFT_DEVICE_FN typename K::T load_lead(const RowCtx<K, Threads>& x, const typename K::T* row,
                                       bool valid) {
  const int f0 = lead_feature(x);
  return f0 >= 0 && valid && f0 < x.d ? row[f0] : FromAcc<typename K::T>::convert(0);
}

template <class K>
GOFT_DEVICE_FN void raw_to_acc(const RawChunk (&raw)[K::kChunks],
                               typename K::Acc (&w)[K::kChunks][K::kElts]) {
  GOFT_UNROLL
  for (int c = 0; c < K::kChunks; ++c) {
    const Vec<typename K::T, K::kElts> v = unpack_vec16<typename K::T, K::kElts>(raw[c]);
    GOFT_UNROLL
    for (int i = 0; i < K::kElts; ++i) w[c][i] = to_acc(v.v[i]);
  }
}

template <class K, class Threads>
GOFT_DEVICE_FN void store_row(const RowCtx<K, Threads>& x, typename K::T* row, bool vec,
                              const typename K::Acc (&w)[K::kChunks][K::kElts]) {
  using T = typename K::T;
  constexpr int E = K::kElts;
  GOFT_UNROLL
  for (int c = 0; c < K::kChunks; ++c) {
    const int f0 = x.vpos(c) * E;
    if (f0 >= x.d) continue;
    if (vec) {
      Vec<T, E> v;
      GOFT_UNROLL
      for (int i = 0; i < E; ++i) v.v[i] = FromAcc<T>::convert(w[c][i]);
      store_vec16<T, E>(row + f0, v);
    } else {
      GOFT_UNROLL
      for (int i = 0; i < E; ++i) {
        if (f0 + i < x.d) row[f0 + i] = FromAcc<T>::convert(w[c][i]);
      }
    }
  }
}

// Multiplies N rows by the scale; a thread's kElts scales of a chunk are loaded once for all the
// rows, in 16-byte loads where the scale allows (FusedParams::scale_vec).
template <class K, int N, class Threads>
GOFT_DEVICE_FN void apply_scale(const RowCtx<K, Threads>& x,
                                typename K::Acc (&w)[N][K::kChunks][K::kElts]) {
  using Acc = typename K::Acc;
  constexpr int E = K::kElts;
  constexpr int kPerLoad = 16 / static_cast<int>(sizeof(Acc));  // scales per 16-byte load
  static_assert(E % kPerLoad == 0, "a vector's scales must be whole 16-byte loads");
  GOFT_UNROLL
  for (int c = 0; c < K::kChunks; ++c) {
    const int f0 = x.vpos(c) * E;
    Acc sc[E];
    if (x.p.scale_vec && f0 + E <= x.d) {
      GOFT_UNROLL
      for (int i = 0; i < E; i += kPerLoad) {
        const Vec<Acc, kPerLoad> v =
            *reinterpret_cast<const Vec<Acc, kPerLoad>*>(x.p.scale + f0 + i);
        GOFT_UNROLL
        for (int k = 0; k < kPerLoad; ++k) sc[i + k] = v.v[k];
      }
    } else {
      GOFT_UNROLL
      for (int i = 0; i < E; ++i) sc[i] = f0 + i < x.d ? x.p.scale[f0 + i] : Acc(1);
    }
    GOFT_UNROLL
    for (int rr = 0; rr < N; ++rr) {
      GOFT_UNROLL
      for (int i = 0; i < E; ++i) w[rr][c][i] *= sc[i];
    }
  }
}

// The first thread-layer slot of vector position j in the block store.
template <class K, class Threads>
GOFT_DEVICE_FN const typename K::Acc* vector_slots(const RowCtx<K, Threads>& x, int j) {
  return x.blocks + (K::kCompactThreadSlots ? 2 : 4) * (K::kElts - 1) * j;
}

// The block as applied of a vector's in-vector slot i; compact slots (K::kCompactThreadSlots)
// hold a rotation's (C00, C10).
template <class K>
GOFT_HOST_DEVICE void load_thread_block(const typename K::Acc* vector_first, int i,
                                        typename K::Acc* c) {
  if constexpr (K::kCompactThreadSlots) {
    const auto cs = *reinterpret_cast<const Vec<typename K::Acc, 2>*>(vector_first + 2 * i);
    c[0] = cs.v[0];
    c[1] = -cs.v[1];
    c[2] = cs.v[1];
    c[3] = cs.v[0];
  } else {
    load_block(vector_first + 4 * i, c);
  }
}

// Thread layers. Loops run over constant bounds with guards so that every register index is a
// constant after unrolling; a vector's blocks sit at constant offsets from one address.
template <class K, bool kCoarseFirst, bool kSave, class Threads>
GOFT_DEVICE_FN void thread_layers_forward(const RowCtx<K, Threads>& x, GroupRows<K>& w,
                                          SavedInputs<K>& sv) {
  using Acc = typename K::Acc;
  constexpr int E = K::kElts, LE = K::kLogElts;
  GOFT_UNROLL
  for (int c = 0; c < K::kChunks; ++c) {
    const int j = x.vpos(c);
    const Acc* vb = vector_slots(x, j);
    GOFT_UNROLL
    for (int i = 0; i < LE; ++i) {
      const int r = kCoarseFirst ? LE - 1 - i : i;
      GOFT_UNROLL
      for (int kk = 0; kk < E / 2; ++kk) {
        if (kk >= (E >> (r + 1))) continue;
        // A pair past d has an identity block (stage_slot), so no pair needs a bounds check.
        const int a = kk << (r + 1), b = a + (1 << r);
        Acc blk[4];
        load_thread_block<K>(vb, E - (E >> r) + kk, blk);
        if (kSave) {  // backward: one row per group
          sv.thread[c][r][a] = w[0][c][a];
          sv.thread[c][r][b] = w[0][c][b];
        }
        GOFT_UNROLL
        for (int rr = 0; rr < K::kRowsPerGroup; ++rr) apply_pair(blk, w[rr][c][a], w[rr][c][b]);
      }
    }
  }
}

// One row's term of a pair's angle gradient (FusedTraits::kStrict): y is the pair's output and
// g the gradient there.
template <typename Acc>
GOFT_HOST_DEVICE Acc angle_grad_term(Acc ya, Acc yb, Acc ga, Acc gb) {
  return ga * yb - gb * ya;
}

// Gradient through the thread layers. Quasi: each pair's input comes from sv. Strict: y holds
// the layers' outputs and is taken back through them alongside g (FusedTraits::kStrict).
template <class K, bool kCoarseFirst, class Threads>
GOFT_DEVICE_FN void thread_layers_backward(const RowCtx<K, Threads>& x, Layer0Grads<K>& l0,
                                           ThreadAngleGrads<K>& tg,
                                           typename K::Acc (&g)[K::kChunks][K::kElts],
                                           typename K::Acc (&y)[K::kChunks][K::kElts],
                                           const SavedInputs<K>& sv) {
  using Acc = typename K::Acc;
  constexpr int E = K::kElts, LE = K::kLogElts;
  GOFT_UNROLL
  for (int c = 0; c < K::kChunks; ++c) {
    const int j = x.vpos(c);
    const Acc* vb = vector_slots(x, j);
    Acc* vg = x.grads + 4 * (E - 1) * j;
    GOFT_UNROLL
    for (int i = 0; i < LE; ++i) {
      const int r = kCoarseFirst ? LE - 1 - i : i;
      GOFT_UNROLL
      for (int kk = 0; kk < E / 2; ++kk) {
        if (kk >= (E >> (r + 1))) continue;
        // Pairs past d: identity blocks (stage_slot); their gradients are never flushed.
        const int a = kk << (r + 1), b = a + (1 << r);
        Acc blk[4];
        const int in_vector = E - (E >> r) + kk;  // slot, from the vector's first
        load_thread_block<K>(vb, in_vector, blk);
        if constexpr (K::kStrict) {
          tg.g[ThreadAngleGrads<K>::kUsed ? c : 0][ThreadAngleGrads<K>::kUsed ? in_vector : 0] +=
              angle_grad_term(y[c][a], y[c][b], g[c][a], g[c][b]);
          pair_input_grad(blk, y[c][a], y[c][b]);
        } else {
          const Acc ua = sv.thread[c][r][a], ub = sv.thread[c][r][b];
          if (Layer0Grads<K>::kUsed && r == 0) {
            add_block_grad(l0.g[Layer0Grads<K>::kUsed ? c : 0][Layer0Grads<K>::kUsed ? kk : 0],
                           ua, ub, g[c][a], g[c][b]);
          } else {
            accumulate_block(vg + 4 * in_vector, ua, ub, g[c][a], g[c][b]);
          }
        }
        pair_input_grad(blk, g[c][a], g[c][b]);
      }
    }
  }
}

// Lane layer q, chunk c: whether this thread's element 0 is in one of the layer's pairs (its
// thread index a multiple of 2^q, the pair's second feature within d).
template <class K, class Threads>
GOFT_DEVICE_FN bool in_lane_pair(const RowCtx<K, Threads>& x, int c, int q) {
  const int bit = 1 << q;
  return (x.t & (bit - 1)) == 0 && (c * x.G + (x.t & ~bit) + bit) * K::kElts < x.d;
}

// Lane layers: element 0 of the vectors of lanes t and t ^ 2^q (q = r - log2 kElts). Every lane
// of the warp shuffles (full mask); only lanes at multiples of 2^q use the result.
template <class K, bool kCoarseFirst, bool kSave, class Threads>
GOFT_DEVICE_FN void lane_layers_forward(const RowCtx<K, Threads>& x, GroupRows<K>& w,
                                        SavedInputs<K>& sv) {
  using Acc = typename K::Acc;
  constexpr int LE = K::kLogElts, R = K::kRowsPerGroup;
  GOFT_UNROLL
  for (int i = 0; i < 5; ++i) {
    const int q = kCoarseFirst ? 4 - i : i;
    const int r = LE + q;
    if (q >= x.LW || r >= x.num_layers) continue;  // the same for the whole block
    const int bit = 1 << q;
    const int base = x.p.layer_base[r];
    GOFT_UNROLL
    for (int c = 0; c < K::kChunks; ++c) {
      Acc v[R], o[R];
      GOFT_UNROLL
      for (int rr = 0; rr < R; ++rr) {
        v[rr] = w[rr][c][0];
        o[rr] = x.th.shfl_xor(v[rr], bit);
      }
      if (in_lane_pair(x, c, q)) {
        const int first = base + ((c * x.G) >> (q + 1));
        const Vec<Acc, 2> k = load_lane_multipliers(x.coarse + 4 * first, x.t, q);
        if (kSave) sv.lane[c][q] = v[0];
        GOFT_UNROLL
        for (int rr = 0; rr < R; ++rr) w[rr][c][0] = k.v[0] * v[rr] + k.v[1] * o[rr];
      }
    }
  }
}

// The partner's value is shuffled alongside the gradient: the pair's saved input (quasi) or its
// output (strict, which then also takes y back through the pair on both lanes).
template <class K, bool kCoarseFirst, class Threads>
GOFT_DEVICE_FN void lane_layers_backward(const RowCtx<K, Threads>& x, ThreadAngleGrads<K>& tg,
                                         typename K::Acc (&g)[K::kChunks][K::kElts],
                                         typename K::Acc (&y)[K::kChunks][K::kElts],
                                         const SavedInputs<K>& sv) {
  using Acc = typename K::Acc;
  constexpr int LE = K::kLogElts;
  GOFT_UNROLL
  for (int i = 0; i < 5; ++i) {
    const int q = kCoarseFirst ? 4 - i : i;
    const int r = LE + q;
    if (q >= x.LW || r >= x.num_layers) continue;
    const int bit = 1 << q;
    const bool a_side = (x.t & bit) == 0;
    const int base = x.p.layer_base[r];
    GOFT_UNROLL
    for (int c = 0; c < K::kChunks; ++c) {
      const Acc gv = g[c][0], uv = K::kStrict ? y[c][0] : sv.lane[c][q];
      const Acc og = x.th.shfl_xor(gv, bit);
      const Acc ou = x.th.shfl_xor(uv, bit);
      if (in_lane_pair(x, c, q)) {
        const int first = base + ((c * x.G) >> (q + 1));
        const int slot = first + (x.t >> (q + 1));
        if constexpr (K::kStrict) {
          // The a lane's sum is the pair's gradient; y and g go back by the transposed rotation.
          if constexpr (ThreadAngleGrads<K>::kLaneUsed) {
            tg.lane[c][q] += angle_grad_term(uv, ou, gv, og);
          } else if (a_side) {
            x.grads[slot - x.coarse_first] += angle_grad_term(uv, ou, gv, og);
          }
          const Vec<Acc, 2> k = load_lane_multipliers(x.coarse + 4 * first, x.t, q);
          y[c][0] = k.v[0] * uv - k.v[1] * ou;
          g[c][0] = k.v[0] * gv - k.v[1] * og;
        } else {
          Acc blk[4];
          load_coarse_block(x.coarse + 4 * slot, blk);
          if (a_side) {  // the a lane owns the pair's gradient
            accumulate_block(x.grads + 4 * slot, uv, ou, gv, og);
            g[c][0] = blk[0] * gv + blk[1] * og;
          } else {
            g[c][0] = blk[2] * og + blk[3] * gv;
          }
        }
      }
    }
  }
}

// Warp layers (G > 32): lane 0 of each warp of the group puts element 0 of its vectors in shared
// memory; after one barrier every warp applies the layers to all of them, lane w standing for
// warp w, and takes its own results from lane wg by a shuffle. The layers act on one value per
// warp (15 pairs at G = 512), so repeating them in every warp costs a few dozen instructions per
// warp and row; until v9 the group's first warp applied them alone and wrote the results back
// while the other warps waited at a second barrier (v9 on the H100: barrier waits were the
// largest stall of every pass, 3.8-4.8 cycles per issued instruction).
// The exchange buffer alternates between two halves, so a half is written again only after the
// next exchange's barrier, which every reader of it has passed (in any sequence of passes: the
// halves are sized for the kernel's largest pass). Only the first warp adds to the
// gradient accumulators. In the backward pass (one row per group) w holds the gradient, and the
// pairs' inputs come from sv (quasi) or are rebuilt from their outputs y, which travel with the
// gradient (strict; y is unused otherwise).
// lead.given (FusedTraits::kLeads, where the warp layers come first in the row's walk): every
// lane already holds its warp's inputs, so neither the exchange nor its barrier is needed.
// Returns this lane's first value after the layers: lane w < G / 32 holds warp w's (0 without
// warp layers).
template <class K, bool kCoarseFirst, bool kSave, bool kBackwardPass, class Threads>
GOFT_DEVICE_FN typename K::Acc warp_layers(const RowCtx<K, Threads>& x, GroupRows<K>& w,
                                           typename K::Acc (&y)[K::kChunks][K::kElts],
                                           SavedInputs<K>& sv, int& parity,
                                           LeadValues<K> lead = {}) {
  using Acc = typename K::Acc;
  constexpr int E = K::kElts, LE = K::kLogElts, C = K::kChunks, R = K::kRowsPerGroup;
  constexpr bool kStrictPass = kBackwardPass && K::kStrict;
  constexpr int V = R + (kStrictPass ? 1 : 0);  // fused_exchange_values; y is value R
  if (x.LG <= 5) return Acc(0);  // the same for the whole block
  const int warps = x.G >> 5, wg = x.t >> 5, lane = x.t & 31;
  const bool accumulates = wg == 0;  // one warp adds each row's terms
  Acc v[V][C];
  if (K::kLeads && lead.given) {
    if constexpr (K::kLeads) {  // one chunk
      if (kBackwardPass) {
        v[0][0] = lead.g;
        if constexpr (kStrictPass) v[V - 1][0] = lead.x[0];
      } else {
        GOFT_UNROLL
        for (int rr = 0; rr < R; ++rr) v[rr][0] = lead.x[rr];
      }
    }
  } else {
    // Half `parity`, at the offset of the allocation's largest pass (fused_exchange_values), not
    // this pass's V: then each half is the same region in every pass, and two consecutive
    // exchanges write different regions whichever passes they belong to (the strict backward
    // recomputes the forward, V = R, before its walk back, V = R + 1).
    Acc* buf = x.exchange + parity * fused_exchange_values(R, K::kStrict) * C * warps;
    parity ^= 1;
    if (lane == 0) {
      GOFT_UNROLL
      for (int rr = 0; rr < R; ++rr) {
        GOFT_UNROLL
        for (int c = 0; c < C; ++c) buf[(rr * C + c) * warps + wg] = w[rr][c][0];
      }
      GOFT_UNROLL
      for (int c = 0; c < C; ++c) {
        if (kStrictPass) buf[(R * C + c) * warps + wg] = y[c][0];
      }
    }
    x.th.sync();
    GOFT_UNROLL
    for (int rr = 0; rr < V; ++rr) {
      GOFT_UNROLL
      for (int c = 0; c < C; ++c) {
        v[rr][c] = lane < warps ? buf[(rr * C + c) * warps + lane] : Acc(0);
      }
    }
  }
  GOFT_UNROLL
  for (int i = 0; i < 5; ++i) {
    const int q = kCoarseFirst ? 4 - i : i;
    const int r = LE + 5 + q;
    if (q >= x.LG - 5 || r >= x.num_layers) continue;
    const int bit = 1 << q;
    const bool active = lane < warps && (lane & (bit - 1)) == 0;
    const bool a_side = (lane & bit) == 0;
    const int base = x.p.layer_base[r];
    GOFT_UNROLL
    for (int c = 0; c < C; ++c) {
      Acc o[V];
      GOFT_UNROLL
      for (int rr = 0; rr < V; ++rr) o[rr] = x.th.shfl_xor(v[rr][c], bit);
      Acc ou = 0;
      if (kBackwardPass && !K::kStrict) ou = x.th.shfl_xor(sv.warp[c][q], bit);
      if (active && 32 * (c * (x.G >> 5) + (lane & ~bit) + bit) * E < x.d) {
        const int first = base + ((c * x.G) >> (q + 6));
        const int slot = first + (lane >> (q + 1));
        if constexpr (kStrictPass) {
          const Acc gv = v[0][c], uv = v[V - 1][c];
          ou = o[V - 1];
          if (a_side && accumulates) {
            x.grads[slot - x.coarse_first] += angle_grad_term(uv, ou, gv, o[0]);
          }
          const Vec<Acc, 2> k = load_lane_multipliers(x.coarse + 4 * first, lane, q);
          v[V - 1][c] = k.v[0] * uv - k.v[1] * ou;
          v[0][c] = k.v[0] * gv - k.v[1] * o[0];
        } else if (kBackwardPass) {
          const Acc gv = v[0][c], uv = sv.warp[c][q];
          Acc blk[4];
          load_coarse_block(x.coarse + 4 * slot, blk);
          if (a_side) {
            if (accumulates) accumulate_block(x.grads + 4 * slot, uv, ou, gv, o[0]);
            v[0][c] = blk[0] * gv + blk[1] * o[0];
          } else {
            v[0][c] = blk[2] * o[0] + blk[3] * gv;
          }
        } else {
          if (kSave) sv.warp[c][q] = v[0][c];
          const Vec<Acc, 2> k = load_lane_multipliers(x.coarse + 4 * first, lane, q);
          GOFT_UNROLL
          for (int rr = 0; rr < R; ++rr) v[rr][c] = k.v[0] * v[rr][c] + k.v[1] * o[rr];
        }
      }
    }
  }
  // Lane wg holds this warp's results.
  GOFT_UNROLL
  for (int rr = 0; rr < V; ++rr) {
    GOFT_UNROLL
    for (int c = 0; c < C; ++c) {
      const Acc mine = x.th.shfl(v[rr][c], wg);
      if (lane != 0) continue;
      if (rr < R) {
        w[rr][c][0] = mine;
      } else {
        y[c][0] = mine;
      }
    }
  }
  return v[0][0];
}

// Chunk layers: element 0 of chunks c and c + 2^m of thread 0, m = r - log2(G * kElts).
template <class K, bool kCoarseFirst, bool kSave, class Threads>
GOFT_DEVICE_FN void chunk_layers_forward(const RowCtx<K, Threads>& x, GroupRows<K>& w,
                                         SavedInputs<K>& sv) {
  using Acc = typename K::Acc;
  constexpr int E = K::kElts, LE = K::kLogElts, C = K::kChunks;
  if (x.t != 0) return;
  GOFT_UNROLL
  for (int i = 0; i < K::kChunkLayers; ++i) {
    const int m = kCoarseFirst ? K::kChunkLayers - 1 - i : i;
    const int mu = 1 << m;
    const int r = LE + x.LG + m;
    if (r >= x.num_layers) continue;
    const int base = x.p.layer_base[r];
    GOFT_UNROLL
    for (int c = 0; c < C; c += 2 * mu) {
      if (c + mu >= C) continue;
      const int fa = c * x.G * E, fb = (c + mu) * x.G * E;
      if (fb >= x.d) continue;
      Acc blk[4];
      load_coarse_block(x.coarse + 4 * (base + (fa >> (r + 1))), blk);
      if (kSave) {
        sv.chunk[m][c] = w[0][c][0];
        sv.chunk[m][c + mu] = w[0][c + mu][0];
      }
      GOFT_UNROLL
      for (int rr = 0; rr < K::kRowsPerGroup; ++rr) apply_pair(blk, w[rr][c][0], w[rr][c + mu][0]);
    }
  }
}

template <class K, bool kCoarseFirst, class Threads>
GOFT_DEVICE_FN void chunk_layers_backward(const RowCtx<K, Threads>& x,
                                          typename K::Acc (&g)[K::kChunks][K::kElts],
                                          typename K::Acc (&y)[K::kChunks][K::kElts],
                                          const SavedInputs<K>& sv) {
  using Acc = typename K::Acc;
  constexpr int E = K::kElts, LE = K::kLogElts, C = K::kChunks;
  if (x.t != 0) return;
  GOFT_UNROLL
  for (int i = 0; i < K::kChunkLayers; ++i) {
    const int m = kCoarseFirst ? K::kChunkLayers - 1 - i : i;
    const int mu = 1 << m;
    const int r = LE + x.LG + m;
    if (r >= x.num_layers) continue;
    const int base = x.p.layer_base[r];
    GOFT_UNROLL
    for (int c = 0; c < C; c += 2 * mu) {
      if (c + mu >= C) continue;
      const int fa = c * x.G * E, fb = (c + mu) * x.G * E;
      if (fb >= x.d) continue;
      Acc blk[4];
      const int slot = base + (fa >> (r + 1));
      load_coarse_block(x.coarse + 4 * slot, blk);
      if constexpr (K::kStrict) {
        x.grads[slot - x.coarse_first] +=
            angle_grad_term(y[c][0], y[c + mu][0], g[c][0], g[c + mu][0]);
        pair_input_grad(blk, y[c][0], y[c + mu][0]);
      } else {
        accumulate_block(x.grads + 4 * slot, sv.chunk[m][c], sv.chunk[m][c + mu], g[c][0],
                         g[c + mu][0]);
      }
      pair_input_grad(blk, g[c][0], g[c + mu][0]);
    }
  }
}

// All layers of the forward (the scale excluded), coarsest first unless transposed. lead: the
// warp layers' inputs where they come first (not transposed; FusedTraits::kLeads). Transposed,
// returns what warp_layers returns, the outputs at the warp layers' features (one chunk: no
// chunk layers follow).
template <class K, bool kTransposed, bool kSave, class Threads>
GOFT_DEVICE_FN typename K::Acc layers_forward(const RowCtx<K, Threads>& x, GroupRows<K>& w,
                                              SavedInputs<K>& sv, int& parity,
                                              LeadValues<K> lead = {}) {
  // warp_layers' y is for the strict backward only.
  if (kTransposed) {
    thread_layers_forward<K, false, kSave>(x, w, sv);
    lane_layers_forward<K, false, kSave>(x, w, sv);
    const typename K::Acc outputs = warp_layers<K, false, kSave, false>(x, w, w[0], sv, parity);
    chunk_layers_forward<K, false, kSave>(x, w, sv);
    return outputs;
  }
  chunk_layers_forward<K, true, kSave>(x, w, sv);
  warp_layers<K, true, kSave, false>(x, w, w[0], sv, parity, lead);
  lane_layers_forward<K, true, kSave>(x, w, sv);
  thread_layers_forward<K, true, kSave>(x, w, sv);
  return typename K::Acc(0);
}

// Gradient through all layers, in the reverse order of layers_forward (one row per group). y:
// the forward's output, which the strict kernels take back through the layers (else unused).
// lead: the warp layers' inputs where they come first (transposed; FusedTraits::kLeads).
template <class K, bool kTransposed, class Threads>
GOFT_DEVICE_FN void layers_backward(const RowCtx<K, Threads>& x, Layer0Grads<K>& l0,
                                    ThreadAngleGrads<K>& tg, GroupRows<K>& g,
                                    typename K::Acc (&y)[K::kChunks][K::kElts], SavedInputs<K>& sv,
                                    int& parity, LeadValues<K> lead = {}) {
  if (kTransposed) {
    chunk_layers_backward<K, true>(x, g[0], y, sv);
    warp_layers<K, true, false, true>(x, g, y, sv, parity, lead);
    lane_layers_backward<K, true>(x, tg, g[0], y, sv);
    thread_layers_backward<K, true>(x, l0, tg, g[0], y, sv);
  } else {
    thread_layers_backward<K, false>(x, l0, tg, g[0], y, sv);
    lane_layers_backward<K, false>(x, tg, g[0], y, sv);
    warp_layers<K, false, false, true>(x, g, y, sv, parity);
    chunk_layers_backward<K, false>(x, g[0], y, sv);
  }
}

// Sets up a thread's view of its group, copies the block store to shared memory (once per thread
// block, reused for every row it processes) and clears the gradient accumulators.
// kOnChip: the caller has checked that the store (and in backward the gradient accumulators) is
// in shared memory, so the pointers are taken from the shared array unconditionally. The compiler
// then knows their address space and emits shared-memory loads (LDS); a pointer that may point
// to either space compiles to generic loads, which take the slower generic path.
template <class K, bool kOnChip, class Threads>
GOFT_DEVICE_FN RowCtx<K, Threads> make_row_ctx(const FusedParams<typename K::T, typename K::Acc>& p,
                                               const Threads& th, typename K::Acc* smem) {
  using Acc = typename K::Acc;
  const FusedSmemLayout l = fused_smem_layout(
      K::kChunks, fused_exchange_values(K::kRowsPerGroup, K::kStrict), p.group_threads,
      p.rows_per_cta,
      fused_store_entries(K::kCompactThreadSlots, p.num_slots, K::kLogElts, p.vcap),
      fused_grad_entries(K::kStrict, p.num_slots, K::kLogElts, p.vcap), p.dim, K::kBackward,
      p.scale_partials != nullptr, p.store_in_smem, p.grads_in_smem,
      fused_stage_per_group(K::kStageRows && p.stage_rows, K::kChunks, p.group_threads,
                            sizeof(Acc)));
  const int tid = th.thread();
  RowCtx<K, Threads> x{p, th};
  x.d = p.dim;
  x.G = p.group_threads;
  x.LG = p.log_group_threads;
  x.LW = x.LG < 5 ? x.LG : 5;
  x.t = tid & (x.G - 1);
  x.group = tid >> x.LG;
  x.num_layers = p.schedule.num_layers;
  if (K::kStrict) x.coarse_first = static_cast<int>(first_coarse_slot(K::kLogElts, p.vcap));
  x.exchange = smem + l.exchange + x.group * l.exchange_per_group;
  x.stage = reinterpret_cast<RawChunk*>(smem + l.stage + x.group * l.stage_per_group);
  static_assert(!K::kCompactThreadSlots || kOnChip, "compact thread-layer slots: on chip only");
  if (kOnChip || p.store_in_smem) {
    Acc* dst = smem + l.blocks;
    // With compact thread-layer slots, (C00, C10) of each, then the coarse slots whole; coarse
    // is biased by the thread-layer slots so that coarse + 4 * slot addresses a coarse slot.
    const int thread_slots =
        K::kCompactThreadSlots ? static_cast<int>(first_coarse_slot(K::kLogElts, p.vcap)) : 0;
    Acc* const coarse = dst + round_up(2 * thread_slots, 4) - 4 * thread_slots;
    for (int s = tid; s < p.num_slots; s += p.cta_threads) {
      const Vec<Acc, 4> block = *reinterpret_cast<const Vec<Acc, 4>*>(p.store + 4 * s);
      if (s < thread_slots) {
        *reinterpret_cast<Vec<Acc, 2>*>(dst + 2 * s) = Vec<Acc, 2>{{block.v[0], block.v[2]}};
      } else {
        *reinterpret_cast<Vec<Acc, 4>*>(coarse + 4 * s) = block;
      }
    }
    x.blocks = dst;
    x.coarse = coarse;
  } else {
    x.blocks = x.coarse = p.store;
  }
  if (K::kBackward) {
    Acc* base;
    int64_t zero_count;
    if (kOnChip || p.grads_in_smem) {
      base = smem + l.grads;
      zero_count = l.total - l.grads;
      x.grads = base + x.group * l.grads_per_group;
      x.scale_grads = p.scale_partials != nullptr
                          ? smem + l.scale_grads + x.group * l.scale_grads_per_group
                          : nullptr;
    } else {
      const int64_t per_group = l.grads_per_group + l.scale_grads_per_group;
      base = p.grad_workspace + th.cta() * p.rows_per_cta * per_group;
      zero_count = per_group * p.rows_per_cta;
      x.grads = base + x.group * per_group;
      x.scale_grads = p.scale_partials != nullptr ? x.grads + l.grads_per_group : nullptr;
    }
    for (int64_t i = tid; i < zero_count; i += p.cta_threads) base[i] = Acc(0);
  }
  th.sync();
  return x;
}

// y = x @ T (or x @ T^T) for all rows. A tile is rows_per_cta groups of kRowsPerGroup
// consecutive rows; thread blocks stride over the tiles.
template <class K, bool kTransposed, bool kOnChip, class Threads>
GOFT_DEVICE_FN void fused_rotate_rows(const FusedParams<typename K::T, typename K::Acc>& p,
                                      const Threads& th, typename K::Acc* smem) {
  using T = typename K::T;
  using Acc = typename K::Acc;
  constexpr int C = K::kChunks, E = K::kElts, R = K::kRowsPerGroup;
  const RowCtx<K, Threads> ctx = make_row_ctx<K, kOnChip>(p, th, smem);
  SavedInputs<K> unused;
  int parity = 0;
  const int64_t tile_rows = static_cast<int64_t>(p.rows_per_cta) * R;
  const int64_t num_tiles = (p.rows + tile_rows - 1) / tile_rows;
  RawChunk raw[R][C];
  // Not transposed, the warp layers come first: their inputs come with the rows (K::kLeads).
  constexpr bool kLeads = K::kLeads && !kTransposed;
  T raw_lead[kLeads ? R : 1];
  int64_t tile = th.cta();
  if (K::kPrefetch) {
    GOFT_UNROLL
    for (int rr = 0; rr < R; ++rr) {
      const int64_t row = tile * tile_rows + ctx.group * R + rr;
      const bool valid = tile < num_tiles && row < p.rows;
      load_raw(ctx, p.x + row * p.x_stride, p.x_vec, valid, raw[rr]);
      if constexpr (kLeads) raw_lead[rr] = load_lead(ctx, p.x + row * p.x_stride, valid);
    }
  }
  for (; tile < num_tiles; tile += th.num_ctas()) {
    const RowCtx<K, Threads> x = ctx.refreshed();
    const int64_t first = (tile * p.rows_per_cta + x.group) * R;  // this group's first row
    GOFT_UNROLL
    for (int rr = 0; rr < R; ++rr) {
      if (!K::kPrefetch) {
        load_raw(x, p.x + (first + rr) * p.x_stride, p.x_vec, first + rr < p.rows, raw[rr]);
      }
    }
    Acc w[R][C][E];
    GOFT_UNROLL
    for (int rr = 0; rr < R; ++rr) raw_to_acc<K>(raw[rr], w[rr]);
    LeadValues<K> lead;
    if constexpr (kLeads) {
      lead.given = true;
      GOFT_UNROLL
      for (int rr = 0; rr < R; ++rr) lead.x[rr] = to_acc(raw_lead[rr]);
    }
    if (K::kPrefetch) {
      const int64_t next = ((tile + th.num_ctas()) * p.rows_per_cta + x.group) * R;
      GOFT_UNROLL
      for (int rr = 0; rr < R; ++rr) {
        const bool next_valid = tile + th.num_ctas() < num_tiles && next + rr < p.rows;
        load_raw(x, p.x + (next + rr) * p.x_stride, p.x_vec, next_valid, raw[rr]);
        if constexpr (kLeads) {
          raw_lead[rr] = load_lead(x, p.x + (next + rr) * p.x_stride, next_valid);
        }
      }
    }
    if (kTransposed && p.scale != nullptr) apply_scale(x, w);
    layers_forward<K, kTransposed, false>(x, w, unused, parity, lead);
    if (!kTransposed && p.scale != nullptr) apply_scale(x, w);
    GOFT_UNROLL
    for (int rr = 0; rr < R; ++rr) {
      if (first + rr < p.rows) store_row(x, p.out + (first + rr) * p.out_stride, p.out_vec, w[rr]);
    }
  }
}

// The same with the placement chosen at run time (the host emulator's entry point; the CUDA
// launcher picks the kOnChip kernel itself).
template <class K, bool kTransposed, class Threads>
GOFT_DEVICE_FN void fused_rotate(const FusedParams<typename K::T, typename K::Acc>& p,
                                 const Threads& th, typename K::Acc* smem) {
  if (p.store_in_smem) {
    fused_rotate_rows<K, kTransposed, true>(p, th, smem);
  } else {
    fused_rotate_rows<K, kTransposed, false>(p, th, smem);
  }
}

// Strict: writes a group's angle gradients to its partial (one per pair, schedule order) and
// clears the accumulators: the coarse slots' from memory (they are in schedule order, from the
// first coarse layer's first pair on), the thread layers' from their owners' registers.
template <class K, class Threads>
GOFT_DEVICE_FN void flush_angle_partials(const RowCtx<K, Threads>& x, ThreadAngleGrads<K>& tg,
                                         typename K::Acc* ap) {
  using Acc = typename K::Acc;
  constexpr int E = K::kElts, LE = K::kLogElts;
  const PairSchedule& s = x.p.schedule;
  if (s.num_layers > LE) {
    const int64_t first_pair = s.offset[LE];
    const int64_t coarse = s.num_pairs() - first_pair;
    for (int64_t k = x.t; k < coarse; k += x.G) {
      ap[first_pair + k] = x.grads[k];
      x.grads[k] = Acc(0);
    }
  }
  GOFT_UNROLL
  for (int c = 0; c < K::kChunks; ++c) {
    const int f0 = x.vpos(c) * E;
    GOFT_UNROLL
    for (int r = 0; r < LE; ++r) {
      GOFT_UNROLL
      for (int kk = 0; kk < E / 2; ++kk) {
        if (kk >= (E >> (r + 1))) continue;
        const int a = kk << (r + 1), b = a + (1 << r);
        Acc& acc = tg.g[ThreadAngleGrads<K>::kUsed ? c : 0]
                       [ThreadAngleGrads<K>::kUsed ? E - (E >> r) + kk : 0];
        if (f0 + b < x.d) ap[s.offset[r] + ((f0 + a) >> (r + 1))] = acc;
        acc = Acc(0);
      }
    }
  }
}

// Quasi: the layer-0 block gradients a thread keeps in registers (kLayer0GradsInRegisters).
template <class K, class Threads>
GOFT_DEVICE_FN void flush_layer0_partials(const RowCtx<K, Threads>& x, Layer0Grads<K>& l0,
                                          typename K::Acc* bp) {
  using Acc = typename K::Acc;
  constexpr int E = K::kElts;
  if (Layer0Grads<K>::kUsed) {
    GOFT_UNROLL
    for (int c = 0; c < Layer0Grads<K>::kChunks; ++c) {
      GOFT_UNROLL
      for (int kk = 0; kk < Layer0Grads<K>::kPairs; ++kk) {
        const int a = x.vpos(c) * E + 2 * kk;
        Acc* gr = l0.g[c][kk];
        if (a + 1 < x.d) {
          *reinterpret_cast<Vec<Acc, 4>*>(bp + 4 * (a / 2)) = Vec<Acc, 4>{{gr[0], gr[1], gr[2], gr[3]}};
        }
        GOFT_UNROLL
        for (int i = 0; i < 4; ++i) gr[i] = Acc(0);
      }
    }
  }
}

// Strict: each lane-layer pair's sum, held by its a lane (ThreadAngleGrads::lane), to the
// group's accumulators, which hold no other terms of that pair; clears the registers.
template <class K, class Threads>
GOFT_DEVICE_FN void store_lane_angle_grads(const RowCtx<K, Threads>& x, ThreadAngleGrads<K>& tg) {
  constexpr int E = K::kElts, LE = K::kLogElts;
  GOFT_UNROLL
  for (int q = 0; q < 5; ++q) {
    const int bit = 1 << q;
    const bool a_lane = (x.t & (2 * bit - 1)) == 0;
    GOFT_UNROLL
    for (int c = 0; c < K::kChunks; ++c) {
      if (q < x.LW && LE + q < x.num_layers && a_lane && (c * x.G + x.t + bit) * E < x.d) {
        const int slot = x.p.layer_base[LE + q] + ((c * x.G) >> (q + 1)) + (x.t >> (q + 1));
        x.grads[slot - x.coarse_first] = tg.lane[c][q];
      }
      tg.lane[c][q] = typename K::Acc(0);
    }
  }
}

// Writes a group's accumulated gradients to its partial and clears the accumulators.
template <class K, class Threads>
GOFT_DEVICE_FN void flush_partials(const RowCtx<K, Threads>& x, Layer0Grads<K>& l0,
                                   ThreadAngleGrads<K>& tg, int64_t partial) {
  using Acc = typename K::Acc;
  const auto& p = x.p;
  const int64_t pairs = x.d - 1;
  if constexpr (ThreadAngleGrads<K>::kLaneUsed) store_lane_angle_grads(x, tg);
  x.th.sync();
  if constexpr (K::kStrict) {
    flush_angle_partials(x, tg, p.block_partials + partial * pairs);
  } else {
    Acc* bp = p.block_partials + partial * pairs * 4;
    // Layer 0's pairs are the first ones; in registers, their owners write them.
    const int64_t first = Layer0Grads<K>::kUsed ? p.schedule.pairs[0] : 0;
    for (int64_t k = first + x.t; k < pairs; k += x.G) {
      Acc* src = x.grads + 4 * block_slot(p.schedule, K::kLogElts, p.vcap, k);
      *reinterpret_cast<Vec<Acc, 4>*>(bp + 4 * k) = *reinterpret_cast<const Vec<Acc, 4>*>(src);
      *reinterpret_cast<Vec<Acc, 4>*>(src) = Vec<Acc, 4>{{Acc(0), Acc(0), Acc(0), Acc(0)}};
    }
    flush_layer0_partials(x, l0, bp);
  }
  if (x.scale_grads != nullptr) {
    Acc* sp = p.scale_partials + partial * x.d;
    for (int f = x.t; f < x.d; f += x.G) {
      sp[f] = x.scale_grads[f];
      x.scale_grads[f] = Acc(0);
    }
  }
  x.th.sync();
}

// scale_grads += g * v over a thread's features: in 16-byte read-modify-writes for whole vectors
// (the group's scale gradient starts 16-byte aligned, fused_smem_layout), else one by one.
template <class K, class Threads>
GOFT_DEVICE_FN void add_scale_grads(const RowCtx<K, Threads>& x,
                                    const typename K::Acc (&g)[K::kChunks][K::kElts],
                                    const typename K::Acc (&v)[K::kChunks][K::kElts]) {
  using Acc = typename K::Acc;
  constexpr int E = K::kElts;
  constexpr int kPerAccess = 16 / static_cast<int>(sizeof(Acc));
  static_assert(E % kPerAccess == 0, "a vector's scale gradients must be whole 16-byte accesses");
  GOFT_UNROLL
  for (int c = 0; c < K::kChunks; ++c) {
    const int f0 = x.vpos(c) * E;
    if (f0 + E <= x.d) {
      GOFT_UNROLL
      for (int i = 0; i < E; i += kPerAccess) {
        auto* p = reinterpret_cast<Vec<Acc, kPerAccess>*>(x.scale_grads + f0 + i);
        Vec<Acc, kPerAccess> acc = *p;
        GOFT_UNROLL
        for (int k = 0; k < kPerAccess; ++k) acc.v[k] += g[c][i + k] * v[c][i + k];
        *p = acc;
      }
    } else {
      GOFT_UNROLL
      for (int i = 0; i < E; ++i) {
        if (f0 + i < x.d) x.scale_grads[f0 + i] += g[c][i] * v[c][i];
      }
    }
  }
}

// Stages a thread's part of one row of x and of grad_out (K::kStageRows), and the lead chunks the
// row's walk uses (lead_x, lead_g; K::kLeads), and commits the copies: x's chunks at x.stage,
// grad_out's after them (FusedSmemLayout::stage).
template <class K, class Threads>
GOFT_DEVICE_FN void stage_backward_row(const RowCtx<K, Threads>& x, int64_t row, bool valid,
                                       bool lead_x, bool lead_g) {
  const auto& p = x.p;
  stage_row(x, p.x + row * p.x_stride, p.x_vec, valid, x.stage);
  stage_row(x, p.grad_out + row * p.grad_out_stride, p.grad_out_vec, valid,
            x.stage + K::kChunks * x.G);
  if constexpr (K::kLeads) {
    if (lead_x) stage_lead(x, p.x + row * p.x_stride, p.x_vec, valid, 0);
    if (lead_g) stage_lead(x, p.grad_out + row * p.grad_out_stride, p.grad_out_vec, valid, 1);
  }
  async_copy_commit();
}

// Backward with parameter gradients: per row, recompute the forward keeping each layer's inputs
// on chip (quasi) or only its output (strict), then run the gradient back through the layers
// (GOFT_SPEC.md section 4).
template <class KernelTraits, bool kTransposed, bool kOnChip, class Threads>
GOFT_DEVICE_FN void fused_rotate_backward_rows(
    const FusedParams<typename KernelTraits::T, typename KernelTraits::Acc>& p, const Threads& th,
    typename KernelTraits::Acc* smem) {
  using K = PlacedTraits<KernelTraits, kOnChip>;
  using T = typename K::T;
  using Acc = typename K::Acc;
  constexpr int C = K::kChunks, E = K::kElts;
  constexpr bool kSave = !K::kStrict;  // the strict kernels rebuild the inputs instead
  const RowCtx<K, Threads> ctx = make_row_ctx<K, kOnChip>(p, th, smem);
  Layer0Grads<K> l0;
  GOFT_UNROLL
  for (int c = 0; c < Layer0Grads<K>::kChunks; ++c) {
    GOFT_UNROLL
    for (int kk = 0; kk < Layer0Grads<K>::kPairs; ++kk) {
      GOFT_UNROLL
      for (int i = 0; i < 4; ++i) l0.g[c][kk][i] = Acc(0);
    }
  }
  ThreadAngleGrads<K> tg;
  for (auto& chunk_grads : tg.g) {
    for (Acc& v : chunk_grads) v = Acc(0);
  }
  for (auto& chunk_grads : tg.lane) {
    for (Acc& v : chunk_grads) v = Acc(0);
  }
  int parity = 0;
  const int64_t rp = p.rows_per_cta;
  // With K::kPrefetch, the group's next row of x and grad_out, loaded during the current row,
  // and the lead value of the walk whose warp layers come first: x's (the recomputed forward's)
  // when not transposed, else grad_out's (the backward's).
  constexpr int kNextChunks = K::kPrefetch ? C : 1;
  RawChunk next_x[kNextChunks], next_g[kNextChunks];
  constexpr bool kPrefetchLead = K::kPrefetch && K::kLeads;
  const T* const lead_rows = kTransposed ? p.grad_out : p.x;
  const int64_t lead_stride = kTransposed ? p.grad_out_stride : p.x_stride;
  T next_lead = FromAcc<T>::convert(0);
  // x_is_output (strict kernels only): w already holds what the recompute would give.
  const bool recompute = !K::kStrict || !p.x_is_output;
  // The lead values a row's walk uses (K::kLeads): x's where the recomputed forward's warp layers
  // come first (not transposed) or where x is the output (transposed, no recompute); grad_out's
  // where the backward's come first (transposed).
  // Groups of one warp or less have no warp layers, and no room for staged lead chunks
  // (fused_stage_per_group).
  const bool has_warp_layers = p.group_threads > 32;
  const bool lead_x = K::kLeads && has_warp_layers && (kTransposed ? !recompute : recompute);
  const bool lead_g = K::kLeads && has_warp_layers && kTransposed;
  for (int64_t chunk = th.cta(); chunk < p.num_chunks; chunk += th.num_ctas()) {
    const int64_t begin = chunk_begin(chunk, p.rows, p.num_chunks);
    const int64_t end = chunk_begin(chunk + 1, p.rows, p.num_chunks);
    const int64_t tiles = (end - begin + rp - 1) / rp;
    if constexpr (K::kPrefetch) {
      const int64_t row = begin + ctx.group;
      load_raw(ctx, p.x + row * p.x_stride, p.x_vec, row < end, next_x);
      load_raw(ctx, p.grad_out + row * p.grad_out_stride, p.grad_out_vec, row < end, next_g);
      if constexpr (kPrefetchLead) {
        next_lead = load_lead(ctx, lead_rows + row * lead_stride, row < end);
      }
    } else if (K::kStageRows && p.stage_rows) {
      const int64_t row = begin + ctx.group;
      stage_backward_row(ctx, row, row < end, lead_x, lead_g);
    }
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const RowCtx<K, Threads> x = ctx.refreshed();
      const int64_t row = begin + tile * rp + x.group;
      const bool valid = row < end;
      Acc w[1][C][E], g[1][C][E];  // one row per group (GroupRows)
      LeadValues<K> lead;
      if constexpr (K::kPrefetch) {
        raw_to_acc<K>(next_x, w[0]);
        raw_to_acc<K>(next_g, g[0]);
        if constexpr (kPrefetchLead) {
          if (kTransposed) {
            lead.g = to_acc(next_lead);
          } else {
            lead.x[0] = to_acc(next_lead);
          }
        }
        const int64_t next = row + rp;  // the group's next row of this chunk
        load_raw(x, p.x + next * p.x_stride, p.x_vec, next < end, next_x);
        load_raw(x, p.grad_out + next * p.grad_out_stride, p.grad_out_vec, next < end, next_g);
        if constexpr (kPrefetchLead) {
          next_lead = load_lead(x, lead_rows + next * lead_stride, next < end);
        }
      } else if (K::kStageRows && p.stage_rows) {
        async_copy_wait_all();
        RawChunk raw[C];
        read_staged(x, x.stage, raw);
        raw_to_acc<K>(raw, w[0]);
        read_staged(x, x.stage + C * x.G, raw);
        raw_to_acc<K>(raw, g[0]);
        if constexpr (K::kLeads) {
          if (lead_x) lead.x[0] = read_staged_lead(x, 0);
          if (lead_g) lead.g = read_staged_lead(x, 1);
        }
        // The group's next tile, if the chunk has one; zeros past the chunk's last row, as an
        // invalid row must add nothing to the gradients. Only this thread's own later copies
        // overwrite its slots, after the reads above in program order.
        const int64_t next = row + rp;
        if (tile + 1 < tiles) stage_backward_row(x, next, next < end, lead_x, lead_g);
      } else {
        RawChunk raw[C];
        load_raw(x, p.x + row * p.x_stride, p.x_vec, valid, raw);
        raw_to_acc<K>(raw, w[0]);
        load_raw(x, p.grad_out + row * p.grad_out_stride, p.grad_out_vec, valid, raw);
        raw_to_acc<K>(raw, g[0]);
        if constexpr (K::kLeads) {
          if (lead_x) lead.x[0] = to_acc(load_lead(x, p.x + row * p.x_stride, valid));
          if (lead_g) lead.g = to_acc(load_lead(x, p.grad_out + row * p.grad_out_stride, valid));
        }
      }
      SavedInputs<K> sv;
      if constexpr (kSave) {
        GOFT_UNROLL
        for (int c = 0; c < C; ++c) {
          GOFT_UNROLL
          for (int q = 0; q < 5; ++q) sv.lane[c][q] = sv.warp[c][q] = Acc(0);
        }
      }
      // The warp layers come first in the walk of the recomputed forward when not transposed, and
      // of the backward when transposed: the lead values are their inputs (there, y is x itself
      // from the output, or the outputs of the recomputed forward's warp layers, which it
      // applied last).
      if (!kTransposed) {
        lead.given = lead_x;
        if (recompute) layers_forward<K, false, kSave>(x, w, sv, parity, lead);
        if (p.scale != nullptr) {
          // The scale acted last, on the rotated row now in w.
          if (x.scale_grads != nullptr && valid) add_scale_grads(x, g[0], w[0]);
          apply_scale(x, g);
        }
        layers_backward<K, false>(x, l0, tg, g, w[0], sv, parity);
      } else {
        if (p.scale != nullptr) apply_scale(x, w);
        if (recompute) {
          const Acc outputs = layers_forward<K, true, kSave>(x, w, sv, parity);
          if constexpr (K::kLeads) lead.x[0] = outputs;
        }
        lead.given = K::kLeads && (recompute || p.scale == nullptr);
        layers_backward<K, true>(x, l0, tg, g, w[0], sv, parity, lead);
        if (p.scale != nullptr) {
          // The scale acted first, on x itself (read again: it is in cache).
          if (x.scale_grads != nullptr && valid) {
            RawChunk raw[C];
            load_raw(x, p.x + row * p.x_stride, p.x_vec, valid, raw);
            raw_to_acc<K>(raw, w[0]);
            add_scale_grads(x, g[0], w[0]);
          }
          apply_scale(x, g);
        }
      }
      if (valid && p.out != nullptr) store_row(x, p.out + row * p.out_stride, p.out_vec, g[0]);
    }
    flush_partials(ctx, l0, tg, chunk * rp + ctx.group);
  }
}

// The same with the placement chosen at run time (the host emulator's entry point).
template <class K, bool kTransposed, class Threads>
GOFT_DEVICE_FN void fused_rotate_backward(const FusedParams<typename K::T, typename K::Acc>& p,
                                          const Threads& th, typename K::Acc* smem) {
  if (p.store_in_smem && p.grads_in_smem) {
    fused_rotate_backward_rows<K, kTransposed, true>(p, th, smem);
  } else {
    fused_rotate_backward_rows<K, kTransposed, false>(p, th, smem);
  }
}

// ---------------------------------------------------------------------------------------------
// The fallback kernels: one thread block per row, the row in a scratch buffer (shared memory when
// it fits, else global memory), one barrier per layer. Any d; the same steps as the CPU kernels,
// and for angle parameters in backward the strict kernels' scheme
// (fallback_rotate_backward_strict).

template <typename T, typename Acc>
struct FallbackParams {
  int64_t rows = 0;
  int64_t dim = 0;
  PairSchedule schedule;
  bool transpose = false;
  const T* x = nullptr;
  int64_t x_stride = 0;
  T* out = nullptr;  // forward output or grad_x (nullptr: not wanted)
  int64_t out_stride = 0;
  const T* grad_out = nullptr;
  int64_t grad_out_stride = 0;
  bool x_is_output = false;     // strict backward: x holds the op's output (as FusedParams)
  const Acc* blocks = nullptr;  // (d - 1, 4) A00, A01, A10, A11, schedule order
  const Acc* rotations = nullptr;  // strict backward, instead: (d - 1, 2) cos t, sin t
  const Acc* scale = nullptr;
  bool scratch_in_smem = true;
  Acc* scratch_workspace = nullptr;  // per block, fallback_scratch_size(d, backward) elements
  int64_t num_chunks = 0;
  Acc* block_partials = nullptr;     // (num_chunks, d - 1, 4); strict: (num_chunks, d - 1)
  Acc* scale_partials = nullptr;     // (num_chunks, d) or nullptr
};

enum class FallbackPass { kForward, kBackward, kStrictBackward };

// Rows in a fallback's scratch keep one spare element after every 32 features. A layer's pairs
// (2sk, 2sk + s) are 2s features apart from one thread to the next, which without the spare
// elements puts 2 to 32 threads of a warp on the same shared-memory bank for s = 1 to 16 (the
// layers holding 97% of the pairs); with them, those layers are free of bank conflicts.
// scratch_index: where a feature sits in such a row.
GOFT_HOST_DEVICE int64_t scratch_index(int64_t feature) { return feature + (feature >> 5); }

// Elements a scratch row of `dim` features spans.
GOFT_HOST_DEVICE int64_t scratch_row_span(int64_t dim) {
  return dim > 0 ? scratch_index(dim - 1) + 1 : 0;
}

// Elements of scratch a fallback block uses. Forward: the row. Backward: row and gradient
// (padded), and the 2 (d - 1) pair inputs. Strict backward: row and gradient (padded), the
// pairs' angle sums and, with a scale gradient, the scale sums.
GOFT_HOST_DEVICE int64_t fallback_scratch_size(int64_t dim, FallbackPass pass, bool scale_grad) {
  const int64_t row = scratch_row_span(dim);
  switch (pass) {
    case FallbackPass::kForward: return row;
    case FallbackPass::kBackward: return 2 * row + 2 * dim;
    default: return 2 * row + (scale_grad ? 2 : 1) * dim;
  }
}

template <typename T, typename Acc, class Threads>
GOFT_DEVICE_FN Acc* fallback_scratch(const FallbackParams<T, Acc>& p, const Threads& th, Acc* smem,
                                     FallbackPass pass) {
  const int64_t size = fallback_scratch_size(p.dim, pass, p.scale_partials != nullptr);
  return p.scratch_in_smem ? smem : p.scratch_workspace + static_cast<int64_t>(th.cta()) * size;
}

// The block of `pair` as applied: from the (d - 1, 4) blocks, or from the strict fallback's
// (d - 1, 2) rotations, which read half the bytes (every row reads every pair's block from L2 on
// its way forward and again on its way back).
template <typename T, typename Acc>
GOFT_DEVICE_FN void fallback_applied_block(const FallbackParams<T, Acc>& p, int64_t pair,
                                           bool transpose, Acc* blk) {
  if (p.rotations != nullptr) {
    const Vec<Acc, 2> cos_sin = *reinterpret_cast<const Vec<Acc, 2>*>(p.rotations + 2 * pair);
    const Acc c = cos_sin.v[0], s = cos_sin.v[1];
    // [[c, -s], [s, c]], or its transpose (applied_block of angle_to_block's block).
    blk[0] = c;
    blk[1] = transpose ? s : -s;
    blk[2] = transpose ? -s : s;
    blk[3] = c;
  } else {
    applied_block(p.blocks + 4 * pair, transpose, blk);
  }
}

template <typename Acc, bool kTransposed, bool kSave, typename T, class Threads>
GOFT_DEVICE_FN void fallback_layer_forward(const FallbackParams<T, Acc>& p, const Threads& th,
                                           int r, Acc* w, Acc* saved) {
  const PairSchedule& s = p.schedule;
  const int64_t st = s.stride(r), off = s.offset[r];
  for (int64_t k = th.thread(); k < s.pairs[r]; k += th.num_threads()) {
    const int64_t a = scratch_index(2 * st * k);
    const int64_t b = scratch_index(2 * st * k + st);
    Acc blk[4];
    fallback_applied_block(p, off + k, kTransposed, blk);
    if (kSave) {
      saved[2 * (off + k)] = w[a];
      saved[2 * (off + k) + 1] = w[b];
    }
    apply_pair(blk, w[a], w[b]);
  }
  th.sync();
}

template <typename Acc, bool kTransposed, bool kSave, typename T, class Threads>
GOFT_DEVICE_FN void fallback_layers_forward(const FallbackParams<T, Acc>& p, const Threads& th,
                                            Acc* w, Acc* saved) {
  const int layers = p.schedule.num_layers;
  for (int i = 0; i < layers; ++i) {
    fallback_layer_forward<Acc, kTransposed, kSave>(p, th, kTransposed ? i : layers - 1 - i, w, saved);
  }
}

template <typename T, typename Acc, bool kTransposed, class Threads>
GOFT_DEVICE_FN void fallback_rotate(const FallbackParams<T, Acc>& p, const Threads& th, Acc* smem) {
  Acc* w = fallback_scratch(p, th, smem, FallbackPass::kForward);
  const int64_t d = p.dim;
  for (int64_t row = th.cta(); row < p.rows; row += th.num_ctas()) {
    const T* xr = p.x + row * p.x_stride;
    for (int64_t i = th.thread(); i < d; i += th.num_threads()) {
      Acc v = to_acc(xr[i]);
      if (kTransposed && p.scale != nullptr) v *= p.scale[i];
      w[scratch_index(i)] = v;
    }
    th.sync();
    fallback_layers_forward<Acc, kTransposed, false>(p, th, w, nullptr);
    // No barrier after the store: a thread reads here the features it writes at the next row's
    // load (feature i by thread i % nt in both), and the last layer's barrier ordered the other
    // threads' writes before these reads.
    T* orow = p.out + row * p.out_stride;
    for (int64_t i = th.thread(); i < d; i += th.num_threads()) {
      Acc v = w[scratch_index(i)];
      if (!kTransposed && p.scale != nullptr) v *= p.scale[i];
      orow[i] = FromAcc<T>::convert(v);
    }
  }
}

// Steps of the fallback backward kernels, each over one row in scratch (padded, scratch_index)
// with the row's features or pairs spread over the block's threads.

// Loads a row of x (or of the output, from_output) into w, scaled first where the transposed op
// scales its input, and its gradient grad_out into g.
template <typename T, typename Acc, bool kTransposed, class Threads>
GOFT_DEVICE_FN void fallback_load_row(const FallbackParams<T, Acc>& p, const Threads& th,
                                      int64_t row, bool from_output, Acc* w, Acc* g) {
  const T* xr = p.x + row * p.x_stride;
  const T* gr = p.grad_out + row * p.grad_out_stride;
  const bool scale_input = kTransposed && p.scale != nullptr && !from_output;
  for (int64_t i = th.thread(); i < p.dim; i += th.num_threads()) {
    const Acc v = to_acc(xr[i]);
    const int64_t j = scratch_index(i);
    w[j] = scale_input ? v * p.scale[i] : v;
    g[j] = to_acc(gr[i]);
  }
  th.sync();
}

// The scale's step: adds the row's scale-gradient terms g_i v_i to sums (when given; feature i
// by thread i % nt), v being what the scale multiplied (the scratch row `scaled`, or x itself
// when null), then takes g through the scale.
template <typename T, typename Acc, class Threads>
GOFT_DEVICE_FN void fallback_scale_backward(const FallbackParams<T, Acc>& p, const Threads& th,
                                            int64_t row, const Acc* scaled, Acc* g, Acc* sums) {
  const T* xr = p.x + row * p.x_stride;
  for (int64_t i = th.thread(); i < p.dim; i += th.num_threads()) {
    const int64_t j = scratch_index(i);
    if (sums != nullptr) sums[i] += g[j] * (scaled != nullptr ? scaled[j] : to_acc(xr[i]));
    g[j] *= p.scale[i];
  }
  th.sync();
}

// Calls body(pair, a, b, block as applied) for each pair of each layer in the backward's order,
// a and b the pair's scratch positions, with a barrier after each layer. Pair k of a layer goes
// to thread k % nt, the same for every row.
template <typename T, typename Acc, bool kTransposed, class Threads, class Body>
GOFT_DEVICE_FN void fallback_layers_backward(const FallbackParams<T, Acc>& p, const Threads& th,
                                             Body&& body) {
  const PairSchedule& s = p.schedule;
  for (int i = 0; i < s.num_layers; ++i) {
    const int r = kTransposed ? s.num_layers - 1 - i : i;
    const int64_t st = s.stride(r), off = s.offset[r];
    for (int64_t k = th.thread(); k < s.pairs[r]; k += th.num_threads()) {
      Acc blk[4];
      fallback_applied_block(p, off + k, kTransposed, blk);
      body(off + k, scratch_index(2 * st * k), scratch_index(2 * st * k + st), blk);
    }
    th.sync();
  }
}

// Writes the row's gradient g to grad_x (when wanted). No barrier after it: feature i is read
// here and written at the next row's load by the same thread (i % nt), and the steps before it
// end with a barrier (the last layer's) or touch only their thread's own features (the scale's).
template <typename T, typename Acc, class Threads>
GOFT_DEVICE_FN void fallback_store_grad(const FallbackParams<T, Acc>& p, const Threads& th,
                                        int64_t row, const Acc* g) {
  if (p.out == nullptr) return;
  T* orow = p.out + row * p.out_stride;
  for (int64_t i = th.thread(); i < p.dim; i += th.num_threads()) {
    orow[i] = FromAcc<T>::convert(g[scratch_index(i)]);
  }
}

// The backward for free blocks (and angles with GOFT_CUDA_STRICT=0): the forward is recomputed
// saving every pair's inputs, then the walk back adds each pair's four block-gradient terms to
// the chunk's partials.
template <typename T, typename Acc, bool kTransposed, class Threads>
GOFT_DEVICE_FN void fallback_rotate_backward(const FallbackParams<T, Acc>& p, const Threads& th,
                                             Acc* smem) {
  const int64_t d = p.dim, pairs = d - 1;
  const PairSchedule& s = p.schedule;
  Acc* scratch = fallback_scratch(p, th, smem, FallbackPass::kBackward);
  const int64_t span = scratch_row_span(d);
  Acc* w = scratch;
  Acc* g = scratch + span;
  Acc* saved = scratch + 2 * span;  // the pairs' inputs, (d - 1, 2) in schedule order
  const int tid = th.thread(), nt = th.num_threads();
  for (int64_t chunk = th.cta(); chunk < p.num_chunks; chunk += th.num_ctas()) {
    // Each partial entry is only ever touched by one thread (pair k of a layer by thread k % nt,
    // feature i by thread i % nt), the same for every row, so no atomics are needed.
    Acc* bp = p.block_partials + chunk * pairs * 4;
    Acc* sp = p.scale_partials != nullptr ? p.scale_partials + chunk * d : nullptr;
    for (int r = 0; r < s.num_layers; ++r) {
      for (int64_t k = tid; k < s.pairs[r]; k += nt) {
        GOFT_UNROLL
        for (int i = 0; i < 4; ++i) bp[4 * (s.offset[r] + k) + i] = Acc(0);
      }
    }
    if (sp != nullptr) {
      for (int64_t i = tid; i < d; i += nt) sp[i] = Acc(0);
    }
    const int64_t begin = chunk_begin(chunk, p.rows, p.num_chunks);
    const int64_t end = chunk_begin(chunk + 1, p.rows, p.num_chunks);
    for (int64_t row = begin; row < end; ++row) {
      fallback_load_row<T, Acc, kTransposed>(p, th, row, false, w, g);
      fallback_layers_forward<Acc, kTransposed, true>(p, th, w, saved);
      if (!kTransposed && p.scale != nullptr) {
        fallback_scale_backward<T, Acc>(p, th, row, w, g, sp);
      }
      fallback_layers_backward<T, Acc, kTransposed>(
          p, th, [&](int64_t pair, int64_t a, int64_t b, const Acc* blk) {
            add_block_grad(bp + 4 * pair, saved[2 * pair], saved[2 * pair + 1], g[a], g[b]);
            pair_input_grad(blk, g[a], g[b]);
          });
      // The transposed op scaled x before its layers: x is read again for the scale's terms.
      if (kTransposed && p.scale != nullptr) {
        fallback_scale_backward<T, Acc>(p, th, row, nullptr, g, sp);
      }
      fallback_store_grad(p, th, row, g);
    }
  }
}

// The backward for angle parameters where no strict fused kernel holds the row (wide float32
// rows): the strict kernels' scheme (FusedTraits::kStrict) on a row in scratch. A rotation's
// inverse is its transpose, so the walk back takes the layers' outputs back to their inputs
// beside the gradient (no saved pair inputs), and each pair sums one angle gradient per row
// (angle_grad_term) instead of four block-gradient entries. Each sum (pair k of a layer, feature
// i of the scale) has one writer per row: the pair's owner in its layer (fallback_layers_backward),
// the feature's thread i % nt. So it stays in the block's scratch without atomics until the
// chunk's end, when it goes to the chunk's partials:
// (num_chunks, d - 1) angle partials, as the strict fused kernels write them. Its blocks come as
// rotations (p.rotations, fallback_applied_block). x_is_output: x holds the op's output, taken
// back through the layers without a recompute (no scale).
template <typename T, typename Acc, bool kTransposed, class Threads>
GOFT_DEVICE_FN void fallback_rotate_backward_strict(const FallbackParams<T, Acc>& p,
                                                    const Threads& th, Acc* smem) {
  const int64_t d = p.dim, pairs = d - 1;
  const bool scale_grad = p.scale_partials != nullptr;
  Acc* scratch = fallback_scratch(p, th, smem, FallbackPass::kStrictBackward);
  const int64_t span = scratch_row_span(d);
  Acc* w = scratch;                    // the row: the layers' output, walked back
  Acc* g = scratch + span;             // the gradient at w
  Acc* sums = scratch + 2 * span;      // the pairs' angle gradients, schedule order
  Acc* scale_sums = scale_grad ? sums + d : nullptr;
  const int tid = th.thread(), nt = th.num_threads();
  for (int64_t chunk = th.cta(); chunk < p.num_chunks; chunk += th.num_ctas()) {
    for (int64_t k = tid; k < pairs; k += nt) sums[k] = Acc(0);
    if (scale_grad) {
      for (int64_t i = tid; i < d; i += nt) scale_sums[i] = Acc(0);
    }
    const int64_t begin = chunk_begin(chunk, p.rows, p.num_chunks);
    const int64_t end = chunk_begin(chunk + 1, p.rows, p.num_chunks);
    for (int64_t row = begin; row < end; ++row) {
      fallback_load_row<T, Acc, kTransposed>(p, th, row, p.x_is_output, w, g);
      if (!p.x_is_output) fallback_layers_forward<Acc, kTransposed, false>(p, th, w, nullptr);
      if (!kTransposed && p.scale != nullptr) {
        fallback_scale_backward<T, Acc>(p, th, row, w, g, scale_sums);
      }
      fallback_layers_backward<T, Acc, kTransposed>(
          p, th, [&](int64_t pair, int64_t a, int64_t b, const Acc* blk) {
            sums[pair] += angle_grad_term(w[a], w[b], g[a], g[b]);
            pair_input_grad(blk, w[a], w[b]);
            pair_input_grad(blk, g[a], g[b]);
          });
      // The transposed op scaled x before its layers: x is read again rather than divided out.
      if (kTransposed && p.scale != nullptr) {
        fallback_scale_backward<T, Acc>(p, th, row, nullptr, g, scale_sums);
      }
      fallback_store_grad(p, th, row, g);
    }
    // Zeroed and handed on by flat index (thread k % nt), which is not the pair's owner in its
    // layer: the barriers of fallback_load_row (after the zeroing) and of the last layer of
    // fallback_layers_backward (before the hand-off) order both against the sums' writers. The
    // next chunk's zeroing is by the thread that hands on, after it.
    Acc* angle_partials = p.block_partials + chunk * pairs;
    for (int64_t k = tid; k < pairs; k += nt) angle_partials[k] = sums[k];
    if (scale_grad) {
      Acc* sp = p.scale_partials + chunk * d;
      for (int64_t i = tid; i < d; i += nt) sp[i] = scale_sums[i];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Staging and reduction steps, one element (pair, entry or feature) per call.

// The pair whose block a slot holds (the inverse of block_slot), or -1 for the slots of
// thread-layer pairs past d, which no pair uses (they hold identity blocks).
GOFT_HOST_DEVICE int64_t slot_pair(const PairSchedule& s, int log_elts, int64_t vcap,
                                   int64_t slot) {
  const int elts = 1 << log_elts;
  const int64_t coarse = first_coarse_slot(log_elts, vcap);
  if (slot >= coarse) return s.offset[log_elts] + (slot - coarse);  // coarse: schedule order
  const int64_t j = slot / (elts - 1);
  const int in_vector = static_cast<int>(slot % (elts - 1));
  int r = 0;  // layer r's slots are [elts - (elts >> r), elts - (elts >> (r + 1))) of a vector's
  while (in_vector >= elts - (elts >> (r + 1))) ++r;
  const int kk = in_vector - (elts - (elts >> r));
  const int64_t a = j * elts + (int64_t{kk} << (r + 1));  // the pair's first feature
  if (r >= s.num_layers || a + (int64_t{1} << r) >= s.dim) return -1;
  return s.offset[r] + (a >> (r + 1));
}

// Block store entry `slot` (stage_store_kernel): the block of its pair as applied (transposed
// when the op is), in lane order for a coarse slot (to_lane_order), from the op's parameters;
// the identity for an unused slot, so that the thread layers can apply every in-vector pair
// without a bounds check (a pair past d then leaves its features, and the gradient through
// them, as they are).
template <typename Param, typename Acc>
GOFT_HOST_DEVICE void stage_slot(const Param* params, bool params_are_blocks,
                                 AngleParameterisation map, bool transpose, const PairSchedule& s,
                                 int log_elts, int64_t vcap, int64_t slot, Acc* store) {
  const int64_t p = slot_pair(s, log_elts, vcap, slot);
  Acc* out = store + 4 * slot;
  if (p < 0) {
    out[0] = out[3] = Acc(1);
    out[1] = out[2] = Acc(0);
    return;
  }
  Acc block[4], applied[4];
  param_block(params, params_are_blocks, map, p, block);
  applied_block(block, transpose, applied);
  if (slot >= first_coarse_slot(log_elts, vcap)) {
    to_lane_order(applied, out);
  } else {
    for (int i = 0; i < 4; ++i) out[i] = applied[i];
  }
}

// Angle parameter p's gradient from the fixed-order sum of its pair's angle partials: negated
// where the applied blocks turn by -t (the transposed op), times d angle / d p.
template <typename Acc, typename Param>
GOFT_HOST_DEVICE Param angle_param_grad(Acc sum, bool negate, Param p, AngleParameterisation map) {
  const double grad = static_cast<double>(negate ? -sum : sum);
  return static_cast<Param>(grad * angle_derivative(p, map));
}

// Sum of entry i over partials [first, first + count), in partial order.
template <typename Acc>
GOFT_HOST_DEVICE Acc sum_partials(const Acc* partials, int64_t length, int64_t first, int64_t count,
                                  int64_t i) {
  Acc sum = 0;
  for (int64_t c = 0; c < count; ++c) sum += partials[(first + c) * length + i];
  return sum;
}

}  // namespace cuda
}  // namespace goft
