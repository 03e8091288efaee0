// The fast CPU path of the GOFT transform: the fine layers run inside chunks of a row (one vector
// register: 64, 32 or 16 bytes, see LaneTraits) as SIMD butterflies, the few coarse layers run on
// a compact copy of each chunk's first feature.
//
// Why this split: layer r pairs features (2sk, 2sk+s), s = 2^r. For s below the chunk width W
// (e.g. 16 floats in a 64-byte AVX-512 register) both features of every pair lie in one chunk, so
// the first log2(W) layers (all but 1/W of the pairs) are a per-chunk transform
//     v <- P * v + Q * swap_s(v)        (swap_s exchanges lanes i and i ^ s)
// with per-lane coefficients P, Q expanded once per call. Layers with s >= W touch only features
// at multiples of W: one per chunk, gathered into a "compact" row where those layers are plain
// adjacent-pair layers of stride s / W. Each row is read once and written once; rows are handled
// in small tiles so each chunk's coefficients are loaded once per tile, not once per row, and the
// compact rows of a tile are stored interleaved ([chunk][row]) so the coarse layers run as SIMD
// over the tile's rows instead of scalar code (they are 1/W of the pairs but, scalar, were about
// half of the backward's instructions).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "goft/blocks.h"
#include "goft/cpu/rotate.h"
#include "goft/inline.h"
#include "goft/params.h"
#include "goft/schedule.h"
#include "goft/storage.h"

namespace goft {
namespace cpu {

// One SIMD width of the fast path: a chunk is Bytes of a row (W = Bytes / sizeof(Acc) lanes, one
// vector register), and its first F = log2(W) layers run in-register. The width must match the
// CPU's registers (native_lane_bytes): 64-byte vectors split over AVX2's 16 registers spill, and
// their backward ran 1.4x slower than the per-row kernel there, while 32-byte lanes ran 4x faster
// (d=768, one thread, an -march=x86-64-v3 build).
template <typename AccT, int Bytes>
struct LaneTraits {
  static constexpr int kLanes = Bytes / static_cast<int>(sizeof(AccT));
  static constexpr int kFineLayers = kLanes == 16 ? 4 : kLanes == 8 ? 3 : kLanes == 4 ? 2 : 1;
  static_assert(kLanes == (1 << kFineLayers), "a chunk holds a power of two of lanes");
  typedef AccT Vec __attribute__((vector_size(Bytes)));
  typedef typename std::conditional<sizeof(AccT) == 4, int32_t, int64_t>::type MaskElement;
  typedef MaskElement Mask __attribute__((vector_size(Bytes)));
  // A chunk of 16-bit storage (bfloat16, float16) and its values as 32-bit lanes, for the
  // conversions to and from float (Acc = float).
  typedef uint16_t Bits16 __attribute__((vector_size(Bytes / 2)));
  typedef uint32_t Bits32 __attribute__((vector_size(Bytes)));
};

// The lane width of this CPU's vector registers: 64 bytes with AVX-512F, 32 with AVX2, else 16
// (SSE2, and other architectures' 128-bit SIMD).
inline int native_lane_bytes() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx512f")) return 64;
  if (__builtin_cpu_supports("avx2")) return 32;
#endif
  return 16;
}

// Calls fn(std::integral_constant<int, Bytes>()) for a lane width of 64, 32 or 16 bytes (any
// other value counts as 16), so run-time widths reach the width templates in one place.
template <typename Fn>
decltype(auto) with_lane_bytes(int bytes, Fn&& fn) {
  switch (bytes) {
    case 64: return fn(std::integral_constant<int, 64>());
    case 32: return fn(std::integral_constant<int, 32>());
    default: return fn(std::integral_constant<int, 16>());
  }
}

// Rows per tile (Rows below): each chunk's coefficients (about 0.75 KB with 64-byte lanes) are
// reused across the tile's rows while the tile's chunks stream through L1, but every row of a
// tile is a memory stream of its own (three in backward). With 32- and 16-byte lanes (AVX2's 16
// registers, or SSE), tiles of 4 rows against tiles of 8 ran the backward 1.1-1.5x faster at
// every d measured (384 to 16384) and the forward as fast or up to 1.5x faster (0.94x at
// d = 384); one thread, AMD EPYC with AVX2, 2026-11-29. Tiles of 8 stay for 64-byte lanes
// (AVX-512), where no other size has been measured. Rows whose length is a multiple of 4 KiB
// (float32 d = 1024, 3072, 4096, ...) put the same feature of every row at the same address
// modulo 4 KiB: one L1 cache set, and the low address bits that loads are matched against
// earlier stores on. There tiles of 2 rows ran 1.2-1.4x faster than tiles of 4 in backward and
// 1.1-1.2x in forward; at other widths up to 1.2x slower.
constexpr int64_t kMaxTileRows = 8;  // what the scratch sizes below allow for

// Rows per tile for rows of `dim` elements of T at this lane width (the measurements above).
template <int Bytes, typename T>
inline int tile_rows(int64_t dim) {
  if (Bytes >= 64) return 8;
  return (dim * static_cast<int64_t>(sizeof(T))) % 4096 == 0 ? 2 : 4;
}

// One value per row of a tile, for the coarse layers.
template <typename Acc, int Rows>
struct RowTraits {
  typedef Acc RowVec __attribute__((vector_size(Rows * sizeof(Acc))));
};

#if !defined(__GNUC__) || defined(__clang__)
#error "goft's fast CPU path uses GCC vector extensions (__builtin_shuffle); build with GCC"
#endif

// Lanes i and i ^ S exchanged.
template <typename Acc, int Bytes, int S>
GOFT_ALWAYS_INLINE typename LaneTraits<Acc, Bytes>::Vec swap_lanes(typename LaneTraits<Acc, Bytes>::Vec v) {
  using Mask = typename LaneTraits<Acc, Bytes>::Mask;
  Mask mask;
  for (int i = 0; i < LaneTraits<Acc, Bytes>::kLanes; ++i) mask[i] = i ^ S;
  return __builtin_shuffle(v, mask);
}

// swap_lanes for the stride of fine layer f; f is a constant once the layer loops unroll.
template <typename Acc, int Bytes>
GOFT_ALWAYS_INLINE typename LaneTraits<Acc, Bytes>::Vec swap_any(typename LaneTraits<Acc, Bytes>::Vec v, int f) {
  switch (f) {
    case 0: return swap_lanes<Acc, Bytes, 1>(v);
    case 1: return swap_lanes<Acc, Bytes, 2>(v);
    case 2: return swap_lanes<Acc, Bytes, 4>(v);
    default: return swap_lanes<Acc, Bytes, 8 % LaneTraits<Acc, Bytes>::kLanes>(v);
  }
}

// Geometry shared by every fast-path function for one d.
struct LaneGeometry {
  int64_t dim = 0;
  int64_t chunks = 0;        // ceil(d / W): chunks per row, also the compact row length
  int fine_layers = 0;       // min(log2 W, number of layers)
  int first_coarse = 0;      // first layer whose pairs span chunks
  int64_t first_coarse_pair = 0;  // parameter row of the first coarse pair (= d - 1 if none)
  int64_t coarse_pairs = 0;       // pairs of the coarse layers (< chunks)
};

template <typename Acc, int Bytes>
LaneGeometry make_lane_geometry(const PairSchedule& schedule) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes;
  LaneGeometry g;
  g.dim = schedule.dim;
  g.chunks = (schedule.dim + W - 1) / W;
  g.fine_layers = schedule.num_layers < LaneTraits<Acc, Bytes>::kFineLayers ? schedule.num_layers
                                                                      : LaneTraits<Acc, Bytes>::kFineLayers;
  g.first_coarse = LaneTraits<Acc, Bytes>::kFineLayers;
  g.first_coarse_pair = schedule.num_layers > g.first_coarse ? schedule.offset[g.first_coarse]
                                                              : schedule.num_pairs();
  g.coarse_pairs = schedule.num_pairs() - g.first_coarse_pair;
  return g;
}

// Expanded per-lane coefficients of the fine layers, laid out [chunk][layer][P, Q, Qt][lane]:
// applying layer f to chunk v is P*v + Q*swap(v); its transpose (and its backward) is
// P*v + Qt*swap(v). Lanes outside any pair keep P = 1, Q = Qt = 0.
template <typename Acc, int Bytes>
constexpr int64_t fine_coefficients_size(int64_t dim) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes;
  return ((dim + W - 1) / W) * LaneTraits<Acc, Bytes>::kFineLayers * 3 * W;
}

template <int Bytes, typename Acc>
void expand_fine_coefficients(const PairSchedule& schedule, const Acc* blocks, Acc* coefficients) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes, F = LaneTraits<Acc, Bytes>::kFineLayers;
  const int64_t chunks = (schedule.dim + W - 1) / W;
  for (int64_t i = 0; i < chunks * F * 3 * W; ++i) coefficients[i] = 0;
  for (int64_t j = 0; j < chunks; ++j) {
    for (int f = 0; f < F; ++f) {
      for (int l = 0; l < W; ++l) coefficients[((j * F + f) * 3) * W + l] = 1;
    }
  }
  const int fine = schedule.num_layers < F ? schedule.num_layers : F;
  for (int f = 0; f < fine; ++f) {
    const int64_t s = schedule.stride(f);
    for (int64_t k = 0; k < schedule.pairs[f]; ++k) {
      const Acc* A = blocks + kBlockSize * (schedule.offset[f] + k);
      const int64_t a = 2 * s * k, b = a + s, j = a / W;
      Acc* P = coefficients + ((j * F + f) * 3) * W;
      Acc* Q = P + W;
      Acc* Qt = Q + W;
      const int64_t la = a % W, lb = b % W;
      P[la] = A[0];
      P[lb] = A[3];
      Q[la] = A[2];
      Q[lb] = A[1];
      Qt[la] = A[1];
      Qt[lb] = A[2];
    }
  }
}

template <typename T, typename Acc, int Bytes>
GOFT_ALWAYS_INLINE typename LaneTraits<Acc, Bytes>::Vec load_chunk(const T* src, int64_t valid) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes;
  typename LaneTraits<Acc, Bytes>::Vec v;
  if (sizeof(T) == sizeof(Acc) && valid == W) {
    std::memcpy(&v, src, sizeof(v));
  } else if (valid == W) {
    if constexpr (is_16bit_float<T>::value) {
      static_assert(std::is_same<Acc, float>::value, "16-bit storage accumulates in float");
      using Traits = LaneTraits<Acc, Bytes>;
      typename Traits::Bits16 h;
      std::memcpy(&h, src, sizeof(h));
      v = T::Format::template to_float<typename Traits::Vec>(
          __builtin_convertvector(h, typename Traits::Bits32));
    } else {
      for (int l = 0; l < W; ++l) v[l] = static_cast<Acc>(src[l]);
    }
  } else {
    for (int l = 0; l < W; ++l) v[l] = l < valid ? static_cast<Acc>(src[l]) : Acc(0);
  }
  return v;
}

template <typename T, typename Acc, int Bytes>
GOFT_ALWAYS_INLINE void store_chunk(typename LaneTraits<Acc, Bytes>::Vec v, int64_t valid, T* dst) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes;
  if (sizeof(T) == sizeof(Acc) && valid == W) {
    std::memcpy(dst, &v, sizeof(v));
  } else if (valid == W) {
    if constexpr (is_16bit_float<T>::value) {
      using Traits = LaneTraits<Acc, Bytes>;
      const typename Traits::Bits16 h = __builtin_convertvector(
          T::Format::template from_float<typename Traits::Bits32>(v), typename Traits::Bits16);
      std::memcpy(dst, &h, sizeof(h));
    } else {
      for (int l = 0; l < W; ++l) dst[l] = static_cast<T>(v[l]);
    }
  } else {
    for (int l = 0; l < W && l < valid; ++l) dst[l] = static_cast<T>(v[l]);
  }
}

// Software prefetch of one chunk of a row the tile loops reach next. A tile's rows are short
// streams (a few KB each, read chunk by chunk across the tile) that the hardware prefetcher
// catches late; asking for chunk j of the next tile's rows while chunk j of this tile computes
// keeps many misses in flight (measured: forward and backward about 25% faster when x and
// grad_out come from memory, as in a layer where matmuls ran in between).
// These are always-inline functions, not lambdas: GCC treats __builtin_prefetch as free of side
// effects, so a lambda holding only prefetches is judged pure and its calls deleted before it
// would be inlined (observed: no prefetch left in the -O1..-O3 code).
template <int Bytes, typename T, typename Acc>
GOFT_ALWAYS_INLINE void prefetch_row_chunk(const RotateArgs<T, Acc>& args, int64_t row, int64_t j) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes;
  if (row < args.rows) {
    __builtin_prefetch(args.x + row * args.x_row_stride + j * W, 0, 3);
    __builtin_prefetch(args.out + row * args.out_row_stride + j * W, 1, 3);
  }
}

template <int Bytes, typename T, typename Acc>
GOFT_ALWAYS_INLINE void prefetch_row_chunk(const RotateBackwardArgs<T, Acc>& args, int64_t row,
                                           int64_t row_end, int64_t j) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes;
  if (row < row_end) {
    __builtin_prefetch(args.x + row * args.x_row_stride + j * W, 0, 3);
    __builtin_prefetch(args.grad_out + row * args.grad_out_row_stride + j * W, 0, 3);
    if (args.grad_x != nullptr) __builtin_prefetch(args.grad_x + row * args.grad_x_row_stride + j * W, 1, 3);
  }
}

template <int Bytes, typename Acc>
GOFT_ALWAYS_INLINE typename LaneTraits<Acc, Bytes>::Vec load_vec(const Acc* src) {
  typename LaneTraits<Acc, Bytes>::Vec v;
  std::memcpy(&v, src, sizeof(v));
  return v;
}

template <int Bytes, typename Acc>
GOFT_ALWAYS_INLINE void store_vec(typename LaneTraits<Acc, Bytes>::Vec v, Acc* dst) {
  std::memcpy(dst, &v, sizeof(v));
}

template <int Rows, typename Acc>
GOFT_ALWAYS_INLINE typename RowTraits<Acc, Rows>::RowVec load_rows(const Acc* src) {
  typename RowTraits<Acc, Rows>::RowVec v;
  std::memcpy(&v, src, sizeof(v));
  return v;
}

template <int Rows, typename Acc>
GOFT_ALWAYS_INLINE void store_rows(typename RowTraits<Acc, Rows>::RowVec v, Acc* dst) {
  std::memcpy(dst, &v, sizeof(v));
}

// The fine layers in descending order with Q (the forward, coarse to fine).
template <typename Acc, int Bytes>
GOFT_ALWAYS_INLINE typename LaneTraits<Acc, Bytes>::Vec fine_forward(typename LaneTraits<Acc, Bytes>::Vec v,
                                                              const Acc* coef) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes;
  for (int f = LaneTraits<Acc, Bytes>::kFineLayers - 1; f >= 0; --f) {
    const Acc* P = coef + f * 3 * W;
    v = load_vec<Bytes>(P) * v + load_vec<Bytes>(P + W) * swap_any<Acc, Bytes>(v, f);
  }
  return v;
}

// The fine layers in ascending order with Qt (the transposed forward).
template <typename Acc, int Bytes>
GOFT_ALWAYS_INLINE typename LaneTraits<Acc, Bytes>::Vec fine_forward_transposed(
    typename LaneTraits<Acc, Bytes>::Vec v, const Acc* coef) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes;
  for (int f = 0; f < LaneTraits<Acc, Bytes>::kFineLayers; ++f) {
    const Acc* P = coef + f * 3 * W;
    v = load_vec<Bytes>(P) * v + load_vec<Bytes>(P + 2 * W) * swap_any<Acc, Bytes>(v, f);
  }
  return v;
}

// Coarse layers on a tile's compact rows, stored [chunk][row in tile] so that each pair is one
// RowVec operation over the tile's rows: layer r >= first_coarse has compact stride
// 2^(r - first_coarse). Saves the pair inputs ([coarse pair][a, b][row]) when `saved` is given.
template <typename Acc, bool Transposed, int Rows>
GOFT_ALWAYS_INLINE void coarse_layer(const PairSchedule& schedule, const LaneGeometry& geometry,
                                     int r, const Acc* blocks, Acc* compact, Acc* saved) {
  using RowVec = typename RowTraits<Acc, Rows>::RowVec;
  constexpr int64_t R = Rows;
  const int64_t s = int64_t{1} << (r - geometry.first_coarse);
  const int64_t pairs = schedule.pairs[r], off = schedule.offset[r];
  const Acc* B = blocks + kBlockSize * off;
  for (int64_t k = 0; k < pairs; ++k) {
    const int64_t a = 2 * s * k, b = a + s;
    const RowVec ua = load_rows<Rows>(compact + a * R), ub = load_rows<Rows>(compact + b * R);
    if (saved != nullptr) {
      Acc* pair_saved = saved + 2 * R * (off + k - geometry.first_coarse_pair);
      store_rows<Rows>(ua, pair_saved);
      store_rows<Rows>(ub, pair_saved + R);
    }
    const Acc cab = Transposed ? B[4 * k + 2] : B[4 * k + 1];
    const Acc cba = Transposed ? B[4 * k + 1] : B[4 * k + 2];
    store_rows<Rows>(B[4 * k] * ua + cba * ub, compact + a * R);
    store_rows<Rows>(cab * ua + B[4 * k + 3] * ub, compact + b * R);
  }
}

template <typename Acc, bool Transposed, int Rows>
GOFT_ALWAYS_INLINE void coarse_forward(const PairSchedule& schedule, const LaneGeometry& geometry,
                                       const Acc* blocks, Acc* compact, Acc* saved) {
  if (Transposed) {
    for (int r = geometry.first_coarse; r < schedule.num_layers; ++r)
      coarse_layer<Acc, true, Rows>(schedule, geometry, r, blocks, compact, saved);
  } else {
    for (int r = schedule.num_layers - 1; r >= geometry.first_coarse; --r)
      coarse_layer<Acc, false, Rows>(schedule, geometry, r, blocks, compact, saved);
  }
}

// Backward of the coarse layers (reverse of coarse_forward) on compact gradients g, adding each
// row's applied-block gradient products to its lane of grad_rows ([coarse pair][4][row]); the
// lanes are summed in a fixed order once per gradient chunk (sum_coarse_grads).
template <typename Acc, bool Transposed, int Rows>
GOFT_ALWAYS_INLINE void coarse_backward(const PairSchedule& schedule, const LaneGeometry& geometry,
                                        const Acc* blocks, const Acc* saved, Acc* g,
                                        Acc* grad_rows) {
  using RowVec = typename RowTraits<Acc, Rows>::RowVec;
  constexpr int64_t R = Rows;
  auto layer = [&](int r) {
    const int64_t s = int64_t{1} << (r - geometry.first_coarse);
    const int64_t pairs = schedule.pairs[r], off = schedule.offset[r];
    const Acc* B = blocks + kBlockSize * off;
    for (int64_t k = 0; k < pairs; ++k) {
      const int64_t a = 2 * s * k, b = a + s, q = off + k - geometry.first_coarse_pair;
      const RowVec ua = load_rows<Rows>(saved + 2 * R * q), ub = load_rows<Rows>(saved + 2 * R * q + R);
      const RowVec ga = load_rows<Rows>(g + a * R), gb = load_rows<Rows>(g + b * R);
      Acc* gB = grad_rows + kBlockSize * R * q;
      store_rows<Rows>(load_rows<Rows>(gB) + ua * ga, gB);
      store_rows<Rows>(load_rows<Rows>(gB + R) + ua * gb, gB + R);
      store_rows<Rows>(load_rows<Rows>(gB + 2 * R) + ub * ga, gB + 2 * R);
      store_rows<Rows>(load_rows<Rows>(gB + 3 * R) + ub * gb, gB + 3 * R);
      const Acc cab = Transposed ? B[4 * k + 2] : B[4 * k + 1];
      const Acc cba = Transposed ? B[4 * k + 1] : B[4 * k + 2];
      store_rows<Rows>(B[4 * k] * ga + cab * gb, g + a * R);
      store_rows<Rows>(cba * ga + B[4 * k + 3] * gb, g + b * R);
    }
  };
  if (Transposed) {
    for (int r = schedule.num_layers - 1; r >= geometry.first_coarse; --r) layer(r);
  } else {
    for (int r = geometry.first_coarse; r < schedule.num_layers; ++r) layer(r);
  }
}

// grad_blocks of the coarse pairs += the row lanes of grad_rows, summed in row order.
template <int Rows, typename Acc>
inline void sum_coarse_grads(const LaneGeometry& geometry, const Acc* grad_rows, Acc* grad_blocks) {
  constexpr int64_t R = Rows;
  Acc* out = grad_blocks + kBlockSize * geometry.first_coarse_pair;
  for (int64_t i = 0; i < kBlockSize * geometry.coarse_pairs; ++i) {
    Acc sum = 0;
    for (int64_t t = 0; t < R; ++t) sum += grad_rows[i * R + t];
    out[i] += sum;
  }
}

// Calls body(j, valid) for each chunk j of a row of `dim` features, valid being the chunk's
// features: first every full chunk with valid = W, a constant once body is inlined, so their
// loads and stores compile to plain vector moves without the short chunk's per-lane code and
// tests, then the short last chunk if W does not divide dim. body must be always_inline, as in
// with_tile_rows.
template <int W, typename Body>
GOFT_ALWAYS_INLINE void for_each_chunk(int64_t dim, Body&& body) {
  const int64_t full = dim / W;
  for (int64_t j = 0; j < full; ++j) body(j, int64_t{W});
  if (full * W < dim) body(full, dim - full * W);
}

// Precomputed, read-only state of one call, shared by all threads.
template <typename Acc, int Bytes>
struct LaneCall {
  const PairSchedule* schedule;
  LaneGeometry geometry;
  const Acc* blocks;        // (d-1, 4) as applied by the coarse layers
  const Acc* coefficients;  // expand_fine_coefficients
  const Acc* scale_padded;  // (chunks * W,) scale padded with ones, or nullptr
};

template <typename Acc, int Bytes>
inline int64_t rotate_tile_scratch_size(int64_t dim) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes;
  return kMaxTileRows * ((dim + W - 1) / W);
}

// compact[j][t] = 0 for the rows t >= n a short tile lacks, so the coarse layers' SIMD lanes of
// missing rows hold zeros (no stale NaN reaching a gradient sum, no slow denormals).
template <int Rows, typename Acc>
GOFT_ALWAYS_INLINE void clear_missing_rows(int64_t n, int64_t chunks, Acc* compact) {
  for (int64_t t = n; t < Rows; ++t) {
    for (int64_t j = 0; j < chunks; ++j) compact[j * Rows + t] = 0;
  }
}

// compact[j][t] = feature j * W of row t, for the tile's n rows.
template <int Bytes, int Rows, typename T, typename Acc>
GOFT_ALWAYS_INLINE void gather_compact(const T* rows, int64_t row_stride, int64_t n, int64_t chunks,
                                       Acc* compact) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes;
  for (int64_t t = 0; t < n; ++t) {
    const T* row = rows + t * row_stride;
    for (int64_t j = 0; j < chunks; ++j) compact[j * Rows + t] = static_cast<Acc>(row[j * W]);
  }
  clear_missing_rows<Rows>(n, chunks, compact);
}

// Feature j * W of row t = compact[j][t], for the tile's n rows.
template <int Bytes, int Rows, typename T, typename Acc>
GOFT_ALWAYS_INLINE void scatter_compact(const Acc* compact, int64_t n, int64_t chunks, T* rows,
                                        int64_t row_stride) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes;
  for (int64_t t = 0; t < n; ++t) {
    T* row = rows + t * row_stride;
    for (int64_t j = 0; j < chunks; ++j) row[j * W] = static_cast<T>(compact[j * Rows + t]);
  }
}

// Rows [begin, end) of y = x @ T (or x @ T^T), end - begin <= Rows.
// scratch: rotate_tile_scratch_size(d) elements.
template <int Rows, typename T, typename Acc, int Bytes>
GOFT_ALWAYS_INLINE void rotate_tile(const RotateArgs<T, Acc>& args_in, const LaneCall<Acc, Bytes>& call_in,
                                    int64_t begin, int64_t end, Acc* scratch) {
  // Local copies: the row stores are byte copies (memcpy), which may alias any object whose
  // address escaped, so fields read through the references were reloaded on every chunk.
  const RotateArgs<T, Acc> args = args_in;
  const LaneCall<Acc, Bytes> call = call_in;
  using Vec = typename LaneTraits<Acc, Bytes>::Vec;
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes, F = LaneTraits<Acc, Bytes>::kFineLayers;
  constexpr int64_t R = Rows;
  const int64_t d = args.dim, chunks = call.geometry.chunks, n = end - begin;
  Acc* compact = scratch;  // [chunk][row in tile]
  const T* x_tile = args.x + begin * args.x_row_stride;
  T* out_tile = args.out + begin * args.out_row_stride;
  if (!args.transpose) {
    gather_compact<Bytes, Rows>(x_tile, args.x_row_stride, n, chunks, compact);
    coarse_forward<Acc, false, Rows>(*call.schedule, call.geometry, call.blocks, compact, nullptr);
    for_each_chunk<W>(d, [&](int64_t j, int64_t valid) __attribute__((always_inline)) {
      const Acc* coef = call.coefficients + j * F * 3 * W;
      for (int64_t t = 0; t < n; ++t) {
        prefetch_row_chunk<Bytes>(args, end + t, j);  // the next tile's row t
        Vec v = load_chunk<T, Acc, Bytes>(args.x + (begin + t) * args.x_row_stride + j * W, valid);
        v[0] = compact[j * R + t];
        v = fine_forward<Acc, Bytes>(v, coef);
        if (call.scale_padded != nullptr) v *= load_vec<Bytes>(call.scale_padded + j * W);
        store_chunk<T, Acc, Bytes>(v, valid, args.out + (begin + t) * args.out_row_stride + j * W);
      }
    });
  } else {
    for_each_chunk<W>(d, [&](int64_t j, int64_t valid) __attribute__((always_inline)) {
      const Acc* coef = call.coefficients + j * F * 3 * W;
      for (int64_t t = 0; t < n; ++t) {
        prefetch_row_chunk<Bytes>(args, end + t, j);  // the next tile's row t
        Vec v = load_chunk<T, Acc, Bytes>(args.x + (begin + t) * args.x_row_stride + j * W, valid);
        if (call.scale_padded != nullptr) v *= load_vec<Bytes>(call.scale_padded + j * W);
        v = fine_forward_transposed<Acc, Bytes>(v, coef);
        store_chunk<T, Acc, Bytes>(v, valid, args.out + (begin + t) * args.out_row_stride + j * W);
        compact[j * R + t] = v[0];
      }
    });
    clear_missing_rows<Rows>(n, chunks, compact);
    coarse_forward<Acc, true, Rows>(*call.schedule, call.geometry, call.blocks, compact, nullptr);
    scatter_compact<Bytes, Rows>(compact, n, chunks, out_tile, args.out_row_stride);
  }
}

// Scratch of the backward for one gradient chunk (see rotate_backward_chunk_fast).
template <typename Acc, int Bytes>
inline int64_t backward_chunk_scratch_size(int64_t dim) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes, F = LaneTraits<Acc, Bytes>::kFineLayers;
  const int64_t chunks = (dim + W - 1) / W;  // also a bound on the coarse pairs
  return 2 * kMaxTileRows * chunks             // compact forward values and compact gradients
         + 2 * kMaxTileRows * chunks           // saved coarse-pair inputs
         + kBlockSize * kMaxTileRows * chunks  // coarse-pair gradients per tile row
         + chunks * F * 2 * W                  // fine-layer gradient sums D, E per lane
         + chunks * W;                         // scale gradient sums per lane
}

// Backward for gradient chunk `chunk` (rows split as in params.h), writing that chunk's partial
// applied-block gradients (and scale gradients) and, if requested, grad_x for its rows.
template <int Rows, typename T, typename Acc, int Bytes>
GOFT_ALWAYS_INLINE void rotate_backward_chunk_fast(const RotateBackwardArgs<T, Acc>& args_in,
                                                   const LaneCall<Acc, Bytes>& call_in, int64_t chunk,
                                                   Acc* scratch) {
  const RotateBackwardArgs<T, Acc> args = args_in;  // local copies, as in rotate_tile
  const LaneCall<Acc, Bytes> call = call_in;
  using Vec = typename LaneTraits<Acc, Bytes>::Vec;
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes, F = LaneTraits<Acc, Bytes>::kFineLayers;
  const PairSchedule& schedule = *call.schedule;
  constexpr int64_t R = Rows;
  const LaneGeometry& geometry = call.geometry;
  const int64_t d = args.dim, chunks = geometry.chunks, pairs = schedule.num_pairs();
  const bool transpose = args.transpose;

  Acc* compact = scratch;                                 // [chunk][row in tile]
  Acc* compact_grad = compact + R * chunks;               // [chunk][row in tile]
  Acc* saved = compact_grad + R * chunks;                 // [coarse pair][a, b][row in tile]
  Acc* coarse_grads = saved + 2 * R * chunks;             // [coarse pair][4][row in tile]
  Acc* lane_grads = coarse_grads + kBlockSize * R * chunks;  // [chunk][layer][D, E][lane]
  Acc* scale_grads = lane_grads + chunks * F * 2 * W;     // [chunk][lane]
  Acc* block_grads = args.block_grad_partials + chunk * kBlockSize * pairs;
  Acc* scale_out = args.scale_grad_partials == nullptr ? nullptr : args.scale_grad_partials + chunk * d;
  const bool want_scale = scale_out != nullptr;
  for (int64_t i = 0; i < kBlockSize * pairs; ++i) block_grads[i] = 0;
  for (int64_t i = 0; i < kBlockSize * R * geometry.coarse_pairs; ++i) coarse_grads[i] = 0;
  for (int64_t i = 0; i < chunks * F * 2 * W; ++i) lane_grads[i] = 0;
  for (int64_t i = 0; i < chunks * W; ++i) scale_grads[i] = 0;

  const int64_t row_begin = chunk_begin(chunk, args.rows, args.num_chunks);
  const int64_t row_end = chunk_begin(chunk + 1, args.rows, args.num_chunks);
  for (int64_t begin = row_begin; begin < row_end; begin += R) {
    const int64_t n = row_end - begin < R ? row_end - begin : R;
    auto x_row = [&](int64_t t) { return args.x + (begin + t) * args.x_row_stride; };
    auto g_row = [&](int64_t t) { return args.grad_out + (begin + t) * args.grad_out_row_stride; };
    auto gx_row = [&](int64_t t) { return args.grad_x + (begin + t) * args.grad_x_row_stride; };

    if (!transpose) {
      // Coarse layers act first: run them on the compact rows, saving their inputs.
      gather_compact<Bytes, Rows>(x_row(0), args.x_row_stride, n, chunks, compact);
      coarse_forward<Acc, false, Rows>(schedule, geometry, call.blocks, compact, saved);
      for_each_chunk<W>(d, [&](int64_t j, int64_t valid) __attribute__((always_inline)) {
        const Acc* coef = call.coefficients + j * F * 3 * W;
        Vec D[F], E[F], dscale = {};
        for (int f = 0; f < F; ++f) D[f] = E[f] = Vec{};
        for (int64_t t = 0; t < n; ++t) {
          // u[f] is the input of fine layer f; the forward runs f = F-1 .. 0.
          prefetch_row_chunk<Bytes>(args, begin + n + t, row_end, j);  // the next tile's row t
          Vec u[F];
          Vec v = load_chunk<T, Acc, Bytes>(x_row(t) + j * W, valid);
          v[0] = compact[j * R + t];
          for (int f = F - 1; f >= 0; --f) {
            u[f] = v;
            const Acc* P = coef + f * 3 * W;
            v = load_vec<Bytes>(P) * v + load_vec<Bytes>(P + W) * swap_any<Acc, Bytes>(v, f);
          }
          Vec g = load_chunk<T, Acc, Bytes>(g_row(t) + j * W, valid);
          if (call.scale_padded != nullptr) {
            if (want_scale) dscale += g * v;
            g *= load_vec<Bytes>(call.scale_padded + j * W);
          }
          for (int f = 0; f < F; ++f) {
            const Vec gs = swap_any<Acc, Bytes>(g, f);
            D[f] += u[f] * g;
            E[f] += u[f] * gs;
            const Acc* P = coef + f * 3 * W;
            g = load_vec<Bytes>(P) * g + load_vec<Bytes>(P + 2 * W) * gs;
          }
          compact_grad[j * R + t] = g[0];
          if (args.grad_x != nullptr) store_chunk<T, Acc, Bytes>(g, valid, gx_row(t) + j * W);
        }
        Acc* lg = lane_grads + j * F * 2 * W;
        for (int f = 0; f < F; ++f) {
          store_vec<Bytes>(load_vec<Bytes>(lg + 2 * f * W) + D[f], lg + 2 * f * W);
          store_vec<Bytes>(load_vec<Bytes>(lg + (2 * f + 1) * W) + E[f], lg + (2 * f + 1) * W);
        }
        if (want_scale) store_vec<Bytes>(load_vec<Bytes>(scale_grads + j * W) + dscale, scale_grads + j * W);
      });
      clear_missing_rows<Rows>(n, chunks, compact_grad);
      coarse_backward<Acc, false, Rows>(schedule, geometry, call.blocks, saved, compact_grad, coarse_grads);
      if (args.grad_x != nullptr) scatter_compact<Bytes, Rows>(compact_grad, n, chunks, gx_row(0), args.grad_x_row_stride);
    } else {
      // Transposed: scale, fine layers ascending, then coarse layers. First the fine forward to
      // get the compact rows, then the coarse forward and backward, then the fine backward.
      for_each_chunk<W>(d, [&](int64_t j, int64_t valid) __attribute__((always_inline)) {
        const Acc* coef = call.coefficients + j * F * 3 * W;
        for (int64_t t = 0; t < n; ++t) {
          Vec v = load_chunk<T, Acc, Bytes>(x_row(t) + j * W, valid);
          if (call.scale_padded != nullptr) v *= load_vec<Bytes>(call.scale_padded + j * W);
          v = fine_forward_transposed<Acc, Bytes>(v, coef);
          compact[j * R + t] = v[0];
        }
      });
      clear_missing_rows<Rows>(n, chunks, compact);
      coarse_forward<Acc, true, Rows>(schedule, geometry, call.blocks, compact, saved);
      gather_compact<Bytes, Rows>(g_row(0), args.grad_out_row_stride, n, chunks, compact_grad);
      coarse_backward<Acc, true, Rows>(schedule, geometry, call.blocks, saved, compact_grad, coarse_grads);
      for_each_chunk<W>(d, [&](int64_t j, int64_t valid) __attribute__((always_inline)) {
        const Acc* coef = call.coefficients + j * F * 3 * W;
        Vec D[F], E[F], dscale = {};
        for (int f = 0; f < F; ++f) D[f] = E[f] = Vec{};
        for (int64_t t = 0; t < n; ++t) {
          prefetch_row_chunk<Bytes>(args, begin + n + t, row_end, j);  // the next tile's row t
          Vec u[F];
          const Vec xs = load_chunk<T, Acc, Bytes>(x_row(t) + j * W, valid);
          Vec v = xs;
          if (call.scale_padded != nullptr) v *= load_vec<Bytes>(call.scale_padded + j * W);
          for (int f = 0; f < F; ++f) {
            u[f] = v;
            const Acc* P = coef + f * 3 * W;
            v = load_vec<Bytes>(P) * v + load_vec<Bytes>(P + 2 * W) * swap_any<Acc, Bytes>(v, f);
          }
          Vec g = load_chunk<T, Acc, Bytes>(g_row(t) + j * W, valid);
          g[0] = compact_grad[j * R + t];
          for (int f = F - 1; f >= 0; --f) {
            const Vec gs = swap_any<Acc, Bytes>(g, f);
            D[f] += u[f] * g;
            E[f] += u[f] * gs;
            const Acc* P = coef + f * 3 * W;
            g = load_vec<Bytes>(P) * g + load_vec<Bytes>(P + W) * gs;
          }
          if (call.scale_padded != nullptr) {
            if (want_scale) dscale += g * xs;
            g *= load_vec<Bytes>(call.scale_padded + j * W);
          }
          if (args.grad_x != nullptr) store_chunk<T, Acc, Bytes>(g, valid, gx_row(t) + j * W);
        }
        Acc* lg = lane_grads + j * F * 2 * W;
        for (int f = 0; f < F; ++f) {
          store_vec<Bytes>(load_vec<Bytes>(lg + 2 * f * W) + D[f], lg + 2 * f * W);
          store_vec<Bytes>(load_vec<Bytes>(lg + (2 * f + 1) * W) + E[f], lg + (2 * f + 1) * W);
        }
        if (want_scale) store_vec<Bytes>(load_vec<Bytes>(scale_grads + j * W) + dscale, scale_grads + j * W);
      });
    }
  }

  sum_coarse_grads<Rows>(geometry, coarse_grads, block_grads);
  // Per-lane sums -> applied-block gradients of the fine pairs: for pair (a, b),
  // dC00 = D[a], dC01 = E[a] (u_a g_b), dC10 = E[b] (u_b g_a), dC11 = D[b].
  for (int f = 0; f < call.geometry.fine_layers; ++f) {
    const int64_t s = schedule.stride(f);
    for (int64_t k = 0; k < schedule.pairs[f]; ++k) {
      const int64_t a = 2 * s * k, b = a + s, j = a / W;
      const Acc* Dv = lane_grads + (j * F + f) * 2 * W;
      const Acc* Ev = Dv + W;
      Acc* gB = block_grads + kBlockSize * (schedule.offset[f] + k);
      gB[0] += Dv[a % W];
      gB[1] += Ev[a % W];
      gB[2] += Ev[b % W];
      gB[3] += Dv[b % W];
    }
  }
  if (want_scale) {
    for (int64_t i = 0; i < d; ++i) scale_out[i] = scale_grads[i];
  }
}

// The per-thread entry points are compiled for several x86-64 levels and picked at load time
// (GCC function multiversioning), so one binary runs everywhere and uses AVX-512 or AVX2 where
// the CPU has them. flatten inlines the kernels into each clone so they get that level's code.
// The lane width (Bytes) is chosen separately by the caller, to match (native_lane_bytes).
#if defined(__x86_64__) && !defined(__CUDACC__) && !defined(GOFT_NO_MULTIVERSION)
#define GOFT_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define GOFT_MULTIVERSION __attribute__((flatten))
#endif

// Fills the call's coefficients (fine_coefficients_size(d) elements) and padded scale (chunks * W
// elements, used only when scale is given).
template <int Bytes, typename Acc>
LaneCall<Acc, Bytes> prepare_lane_call(const PairSchedule& schedule, const Acc* blocks, const Acc* scale,
                                Acc* coefficients, Acc* scale_padded) {
  constexpr int W = LaneTraits<Acc, Bytes>::kLanes;
  LaneCall<Acc, Bytes> call;
  call.schedule = &schedule;
  call.geometry = make_lane_geometry<Acc, Bytes>(schedule);
  call.blocks = blocks;
  expand_fine_coefficients<Bytes>(schedule, blocks, coefficients);
  call.coefficients = coefficients;
  call.scale_padded = nullptr;
  if (scale != nullptr) {
    for (int64_t i = 0; i < call.geometry.chunks * W; ++i) {
      scale_padded[i] = i < schedule.dim ? scale[i] : Acc(1);
    }
    call.scale_padded = scale_padded;
  }
  return call;
}

// Calls fn(std::integral_constant<int, Rows>()) with the rows per tile for rows of `dim`
// elements of T (tile_rows), or with ForcedRows (2, 4 or 8: the bench binary's comparison) when
// it is not 0, so both entry points below pick the tile size in one place. The compile-time
// branches keep each lane width from instantiating tile sizes it never runs. The callers' lambdas
// must be always_inline: flatten alone left them as out-of-line functions built for the default
// x86-64 level, so every clone ran baseline SSE code (measured 2-4x slower, AVX2 machine).
template <int Bytes, typename T, int ForcedRows, typename Fn>
GOFT_ALWAYS_INLINE void with_tile_rows(int64_t dim, Fn&& fn) {
  static_assert(ForcedRows == 0 || ForcedRows == 2 || ForcedRows == 4 || ForcedRows == 8, "tile rows");
  if constexpr (ForcedRows != 0) {
    fn(std::integral_constant<int, ForcedRows>());
  } else if constexpr (Bytes >= 64) {
    fn(std::integral_constant<int, 8>());
  } else if (tile_rows<Bytes, T>(dim) == 2) {
    fn(std::integral_constant<int, 2>());
  } else {
    fn(std::integral_constant<int, 4>());
  }
}

// Rows [begin, end) of the forward, tile by tile. scratch: rotate_tile_scratch_size<Acc>(d).
// Tiles as in with_tile_rows.
template <typename T, typename Acc, int Bytes, int ForcedRows = 0>
GOFT_MULTIVERSION void rotate_rows_fast(const RotateArgs<T, Acc>& args, const LaneCall<Acc, Bytes>& call,
                                        int64_t begin, int64_t end, Acc* scratch) {
  with_tile_rows<Bytes, T, ForcedRows>(args.dim, [&](auto rows_constant) __attribute__((always_inline)) {
    constexpr int Rows = decltype(rows_constant)::value;
    for (int64_t row = begin; row < end; row += Rows) {
      rotate_tile<Rows>(args, call, row, end - row < Rows ? end : row + Rows, scratch);
    }
  });
}

// Gradient chunks [begin, end) of the backward. scratch: backward_chunk_scratch_size<Acc>(d).
// Tiles as in with_tile_rows.
template <typename T, typename Acc, int Bytes, int ForcedRows = 0>
GOFT_MULTIVERSION void rotate_backward_chunks_fast(const RotateBackwardArgs<T, Acc>& args,
                                                   const LaneCall<Acc, Bytes>& call, int64_t begin,
                                                   int64_t end, Acc* scratch) {
  with_tile_rows<Bytes, T, ForcedRows>(args.dim, [&](auto rows_constant) __attribute__((always_inline)) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      rotate_backward_chunk_fast<decltype(rows_constant)::value>(args, call, chunk, scratch);
    }
  });
}

}  // namespace cpu
}  // namespace goft
