// Launch layouts of the CUDA kernels, chosen on the host from the shape and the device's limits.
// Pure C++ (no CUDA calls), shared by the launchers (rotate.cuh) and the host emulator test.
#pragma once

#include <algorithm>
#include <cstdint>

#include "goft/cuda/row_kernels.h"
#include "goft/schedule.h"

namespace goft {
namespace cuda {

// Narrow rows share a thread block between several row groups: blocks of fewer threads leave
// the SM's block slots, not its threads, as the limit on occupancy.
constexpr int kMinCtaThreads = 128;
constexpr int kWarpThreads = 32;

// Partial gradients are summed in segments of this many partials, then the segment sums in
// order: a fixed two-level tree, so the sums are bitwise reproducible and the reduction still
// has enough threads to stream the partials at memory speed.
constexpr int64_t kReduceSegment = 16;

// Shared memory an SM reserves per resident block (sm_80 to sm_90): an SM holds the per-block
// limit plus this much, so two blocks of the same kernel fit when each uses at most half of it.
constexpr int64_t kReservedSmemPerBlock = 1024;

// Bound on the memory for per-chunk partial gradients, in elements (as on the CPU path).
constexpr int64_t kMaxPartialEntries = int64_t{1} << 24;

inline int pow2_floor(int64_t n) {
  int p = 1;
  while (2 * static_cast<int64_t>(p) <= n) p *= 2;
  return p;
}

inline int pow2_ceil(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// A compiled fused kernel: its chunk count and how many threads per block its register count
// allows (cudaFuncAttributes::maxThreadsPerBlock).
struct FusedVariant {
  int chunks = 1;
  int rows_per_group = 1;  // FusedTraits::kRowsPerGroup
  int max_threads = 0;
};

struct FusedLayout {
  int variant = -1;  // index into the variants given to choose_fused_layout
  bool strict = false;  // a strict backward kernel (FusedTraits::kStrict): angle partials
  int chunks = 1;
  int rows_per_group = 1;
  int group_threads = 1;
  int log_group_threads = 0;
  int cta_threads = 1;
  int rows_per_cta = 1;
  int64_t vcap = 0;
  int64_t num_slots = 0;
  bool store_in_smem = true;
  bool grads_in_smem = true;
  bool stage_rows = false;  // the strict two-block kernels stage their next rows (kStageRows)
  int64_t smem_bytes = 0;
  // Per-block global workspace for gradient accumulators when they are not in shared memory.
  int64_t grad_workspace_per_cta = 0;  // elements
};

// The compiled fused kernels (rotate.cuh instantiates one per shape): chunks 1 to 4 with one row
// per group, and for the forward also one chunk with two rows per group
// (FusedTraits::kRowsPerGroup; more would not fit the forward's 64 registers).
constexpr int kMaxFusedVariants = 5;
constexpr int num_fused_variants(bool backward) { return backward ? 4 : 5; }
inline FusedVariant fused_variant_shape(int i) {
  FusedVariant v;
  v.chunks = i < 4 ? i + 1 : 1;
  v.rows_per_group = i < 4 ? 1 : 2;
  return v;
}

// Overrides of the layout choice, for tuning experiments on a GPU (rotate_api.h reads them from
// the environment): only variants with `chunks` vectors per thread and `rows_per_group` rows
// per group (0: any), thread blocks of at least `cta_threads` threads (several row groups per
// block) where the variant allows, and whether the strict kernels may stage their next rows.
struct FusedTuning {
  int chunks = 0;
  int rows_per_group = 0;
  int cta_threads = kMinCtaThreads;
  bool stage_rows = true;  // false: the strict kernels do not stage their next rows
};

// Picks the fused kernel whose row capacity (G * chunks * elts) wastes the fewest threads for
// width d, then the largest shared-memory placement that fits: blocks and gradients in shared
// memory, else gradients only (read-only blocks still hit L1), else neither. Returns false when
// no variant can hold the row on chip (the fallback kernel then runs). strict: the variants are
// the strict backward kernels (backward only).
inline bool choose_fused_layout(int64_t dim, int elts, int acc_bytes, bool backward, bool strict,
                                bool scale_grad, const FusedVariant* variants, int num_variants,
                                int64_t smem_limit_bytes, FusedLayout* out,
                                const FusedTuning& tuning = FusedTuning()) {
  const int64_t vectors = (dim + elts - 1) / elts;
  int best = -1;
  int64_t best_cap = 0;
  int best_group = 0;
  for (int v = 0; v < num_variants; ++v) {
    if (variants[v].max_threads < kWarpThreads) continue;
    if (tuning.chunks > 0 && variants[v].chunks != tuning.chunks) continue;
    if (tuning.rows_per_group > 0 && variants[v].rows_per_group != tuning.rows_per_group) continue;
    const int max_group = pow2_floor(std::min(1024, variants[v].max_threads));
    const int64_t per_chunk = (vectors + variants[v].chunks - 1) / variants[v].chunks;
    if (per_chunk > max_group) continue;
    const int group = pow2_ceil(per_chunk);
    const int64_t cap = static_cast<int64_t>(group) * variants[v].chunks;
    // The least capacity, then the fewest chunks (registers), then the most rows per group.
    const bool better =
        best < 0 || cap < best_cap ||
        (cap == best_cap && variants[v].chunks < variants[best].chunks) ||
        (cap == best_cap && variants[v].chunks == variants[best].chunks &&
         variants[v].rows_per_group > variants[best].rows_per_group);
    if (better) {
      best = v;
      best_cap = cap;
      best_group = group;
    }
  }
  if (best < 0) return false;
  const FusedVariant& fv = variants[best];
  FusedLayout l;
  l.variant = best;
  l.strict = strict && backward;
  l.chunks = fv.chunks;
  l.rows_per_group = fv.rows_per_group;
  l.group_threads = best_group;
  l.log_group_threads = ilog2(best_group);
  const int max_cta = pow2_floor(std::min(1024, fv.max_threads));
  const int want_cta = pow2_floor(std::max(tuning.cta_threads, 1));
  l.cta_threads = std::max(best_group, std::min(want_cta, max_cta));
  l.rows_per_cta = l.cta_threads / best_group;
  l.vcap = best_cap;
  const PairSchedule s = make_schedule(dim);
  l.num_slots = fused_num_slots(s, ilog2(elts), l.vcap);

  auto smem_layout = [&](int rows_per_cta, bool store_smem, bool grads_smem, bool stage = false) {
    // The strict kernels on chip keep compact thread-layer slots (PlacedTraits).
    const bool compact = l.strict && store_smem && grads_smem;
    return fused_smem_layout(l.chunks, fused_exchange_values(l.rows_per_group, l.strict),
                             l.group_threads, rows_per_cta,
                             fused_store_entries(compact, l.num_slots, ilog2(elts), l.vcap),
                             fused_grad_entries(l.strict, l.num_slots, ilog2(elts), l.vcap), dim,
                             backward, scale_grad, store_smem, grads_smem,
                             fused_stage_per_group(stage, l.chunks, l.group_threads, acc_bytes));
  };
  auto bytes = [&](int rows_per_cta, bool store_smem, bool grads_smem, bool stage = false) {
    return acc_bytes * smem_layout(rows_per_cta, store_smem, grads_smem, stage).total;
  };
  // Fewer row groups per block before giving up shared-memory placement, down to one warp: the
  // lane layers shuffle with a full mask, which needs every lane of the warp present.
  const int min_rows = std::max(1, kWarpThreads / best_group);
  if (l.rows_per_cta < min_rows) return false;
  while (l.rows_per_cta > min_rows && bytes(l.rows_per_cta, true, true) > smem_limit_bytes) {
    l.rows_per_cta /= 2;
  }
  l.cta_threads = l.rows_per_cta * l.group_threads;
  const bool options[4][2] = {{true, true}, {false, true}, {true, false}, {false, false}};
  bool placed = false;
  for (const auto& o : options) {
    if (!backward && !o[1]) continue;  // forward: the gradient placement is moot
    if (bytes(l.rows_per_cta, o[0], o[1]) <= smem_limit_bytes) {
      l.store_in_smem = o[0];
      l.grads_in_smem = o[1];
      placed = true;
      break;
    }
  }
  if (!placed) return false;
  // Staging the next rows costs shared memory, spent only where the kernel's two blocks per SM
  // still fit with it: an SM has the per-block limit plus the 1 KB it reserves per block.
  if (backward && tuning.stage_rows &&
      strict_fits_two_blocks(l.strict, l.chunks, elts, acc_bytes)) {
    const int64_t staged = bytes(l.rows_per_cta, l.store_in_smem, l.grads_in_smem, true);
    l.stage_rows = 2 * (staged + kReservedSmemPerBlock) <= smem_limit_bytes + kReservedSmemPerBlock;
  }
  l.smem_bytes = bytes(l.rows_per_cta, l.store_in_smem, l.grads_in_smem, l.stage_rows);
  if (backward && !l.grads_in_smem) {
    const FusedSmemLayout sl = smem_layout(l.rows_per_cta, false, false);
    l.grad_workspace_per_cta = (sl.grads_per_group + sl.scale_grads_per_group) * l.rows_per_cta;
  }
  *out = l;
  return true;
}

// Whether a fused launch keeps everything it reads and accumulates in shared memory: the block
// store, and in backward the gradient accumulators (the kernels' kOnChip specialisation).
inline bool fused_on_chip(const FusedLayout& l, bool backward) {
  return l.store_in_smem && (!backward || l.grads_in_smem);
}

// Number of row chunks (each yields rows_per_cta partials) for the backward: enough to give every
// resident block work, bounded by the rows and by the memory of the partials. It depends on the
// shape and the device, never on timing, so gradients are bitwise reproducible run to run.
inline int64_t backward_chunk_count(int64_t rows, int64_t dim, int rows_per_cta,
                                    int64_t resident_ctas) {
  const int64_t tiles = (rows + rows_per_cta - 1) / rows_per_cta;
  const int64_t by_memory = kMaxPartialEntries / (5 * std::max<int64_t>(dim, 1) * rows_per_cta);
  int64_t chunks = std::min<int64_t>(tiles, std::max<int64_t>(resident_ctas, 1));
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(by_memory, 1));
  return std::max<int64_t>(chunks, 1);
}

// Whether rows at `base` with row stride `stride` can move as 16-byte vectors.
template <typename T>
bool rows_vectorizable(const T* base, int64_t stride, int64_t rows, int64_t dim) {
  constexpr int kElts = FusedTraits<T, 1, false>::kElts;
  return dim % kElts == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0 &&
         (rows <= 1 || (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0);
}

// Whether the scale can be read in 16-byte loads (FusedParams::scale_vec).
template <typename Acc>
bool scale_vectorizable(const Acc* scale) {
  return scale != nullptr && reinterpret_cast<uintptr_t>(scale) % 16 == 0;
}

// The layout part of a fused kernel's arguments; the caller adds the pointers.
template <typename T, typename Acc>
FusedParams<T, Acc> make_fused_params(int64_t rows, int64_t dim, bool transpose,
                                      const FusedLayout& l) {
  constexpr int kLogElts = FusedTraits<T, 1, false>::kLogElts;
  FusedParams<T, Acc> p;
  p.rows = rows;
  p.dim = static_cast<int>(dim);
  p.schedule = make_schedule(dim);
  p.transpose = transpose;
  p.group_threads = l.group_threads;
  p.log_group_threads = l.log_group_threads;
  p.cta_threads = l.cta_threads;
  p.rows_per_cta = l.rows_per_cta;
  p.vcap = static_cast<int>(l.vcap);
  p.num_slots = static_cast<int>(l.num_slots);
  for (int r = kLogElts; r < p.schedule.num_layers && r < 32; ++r) {
    p.layer_base[r] = static_cast<int>(coarse_layer_base(p.schedule, kLogElts, l.vcap, r));
  }
  p.store_in_smem = l.store_in_smem;
  p.grads_in_smem = l.grads_in_smem;
  p.stage_rows = l.stage_rows;
  return p;
}

// Threads of a fallback block: enough for layer 0's d/2 pairs, at most what the kernel allows.
inline int fallback_cta_threads(int64_t dim, int max_threads) {
  const int want = pow2_ceil(std::max<int64_t>((dim + 1) / 2, 32));
  return std::max(32, std::min(want, pow2_floor(std::min(1024, max_threads))));
}

}  // namespace cuda
}  // namespace goft
