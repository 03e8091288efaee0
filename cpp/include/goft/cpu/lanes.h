// The fast CPU path of the GOFT transform: the fine layers run inside 64-byte chunks of a row as
// SIMD butterflies, the few coarse layers run on a compact copy of each chunk's first feature.
//
// Why this split: layer r pairs features (2sk, 2sk+s), s = 2^r. For s below the chunk width W
// (16 floats or 8 doubles, one cache line, one AVX-512 register) both features of every pair lie
// in one chunk, so the first log2(W) layers (15/16 of all pairs) are a per-chunk transform
//     v <- P * v + Q * swap_s(v)        (swap_s exchanges lanes i and i ^ s)
// with per-lane coefficients P, Q expanded once per call. Layers with s >= W touch only features
// at multiples of W: one per chunk, gathered into a "compact" row where those layers are plain
// adjacent-pair layers of stride s / W. Each row is read once and written once; rows are handled
// in small tiles so each chunk's coefficients are loaded once per tile, not once per row.
#pragma once

#include <cstdint>
#include <cstring>

#include "goft/blocks.h"
#include "goft/cpu/rotate.h"
#include "goft/params.h"
#include "goft/schedule.h"

namespace goft {
namespace cpu {

#if defined(__GNUC__)
#define GOFT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define GOFT_ALWAYS_INLINE inline
#endif

template <typename Acc>
struct LaneTraits;

template <>
struct LaneTraits<float> {
  static constexpr int kLanes = 16;
  static constexpr int kFineLayers = 4;
  typedef float Vec __attribute__((vector_size(64)));
  typedef int32_t Mask __attribute__((vector_size(64)));
};

template <>
struct LaneTraits<double> {
  static constexpr int kLanes = 8;
  static constexpr int kFineLayers = 3;
  typedef double Vec __attribute__((vector_size(64)));
  typedef int64_t Mask __attribute__((vector_size(64)));
};

// Rows per tile: each chunk's coefficients (about 0.75 KB) are reused across the tile's rows
// while the tile's chunks stream through L1. Larger tiles add concurrent memory streams.
constexpr int64_t kTileRows = 8;

#if !defined(__GNUC__) || defined(__clang__)
#error "goft's fast CPU path uses GCC vector extensions (__builtin_shuffle); build with GCC"
#endif

// Lanes i and i ^ S exchanged.
template <typename Acc, int S>
GOFT_ALWAYS_INLINE typename LaneTraits<Acc>::Vec swap_lanes(typename LaneTraits<Acc>::Vec v) {
  using Mask = typename LaneTraits<Acc>::Mask;
  Mask mask;
  for (int i = 0; i < LaneTraits<Acc>::kLanes; ++i) mask[i] = i ^ S;
  return __builtin_shuffle(v, mask);
}

// swap_lanes for the stride of fine layer f; f is a constant once the layer loops unroll.
template <typename Acc>
GOFT_ALWAYS_INLINE typename LaneTraits<Acc>::Vec swap_any(typename LaneTraits<Acc>::Vec v, int f) {
  switch (f) {
    case 0: return swap_lanes<Acc, 1>(v);
    case 1: return swap_lanes<Acc, 2>(v);
    case 2: return swap_lanes<Acc, 4>(v);
    default: return swap_lanes<Acc, 8 % LaneTraits<Acc>::kLanes>(v);
  }
}

// Geometry shared by every fast-path function for one d.
struct LaneGeometry {
  int64_t dim = 0;
  int64_t chunks = 0;        // ceil(d / W): chunks per row, also the compact row length
  int fine_layers = 0;       // min(log2 W, number of layers)
  int first_coarse = 0;      // first layer whose pairs span chunks
};

template <typename Acc>
LaneGeometry make_lane_geometry(const PairSchedule& schedule) {
  constexpr int W = LaneTraits<Acc>::kLanes;
  LaneGeometry g;
  g.dim = schedule.dim;
  g.chunks = (schedule.dim + W - 1) / W;
  g.fine_layers = schedule.num_layers < LaneTraits<Acc>::kFineLayers ? schedule.num_layers
                                                                      : LaneTraits<Acc>::kFineLayers;
  g.first_coarse = LaneTraits<Acc>::kFineLayers;
  return g;
}

// Expanded per-lane coefficients of the fine layers, laid out [chunk][layer][P, Q, Qt][lane]:
// applying layer f to chunk v is P*v + Q*swap(v); its transpose (and its backward) is
// P*v + Qt*swap(v). Lanes outside any pair keep P = 1, Q = Qt = 0.
template <typename Acc>
constexpr int64_t fine_coefficients_size(int64_t dim) {
  constexpr int W = LaneTraits<Acc>::kLanes;
  return ((dim + W - 1) / W) * LaneTraits<Acc>::kFineLayers * 3 * W;
}

template <typename Acc>
void expand_fine_coefficients(const PairSchedule& schedule, const Acc* blocks, Acc* coefficients) {
  constexpr int W = LaneTraits<Acc>::kLanes, F = LaneTraits<Acc>::kFineLayers;
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

template <typename T, typename Acc>
GOFT_ALWAYS_INLINE typename LaneTraits<Acc>::Vec load_chunk(const T* src, int64_t valid) {
  constexpr int W = LaneTraits<Acc>::kLanes;
  typename LaneTraits<Acc>::Vec v;
  if (sizeof(T) == sizeof(Acc) && valid == W) {
    std::memcpy(&v, src, sizeof(v));
  } else if (valid == W) {
    // Unconditional so that the bf16/half conversion vectorises.
    for (int l = 0; l < W; ++l) v[l] = static_cast<Acc>(src[l]);
  } else {
    for (int l = 0; l < W; ++l) v[l] = l < valid ? static_cast<Acc>(src[l]) : Acc(0);
  }
  return v;
}

template <typename T, typename Acc>
GOFT_ALWAYS_INLINE void store_chunk(typename LaneTraits<Acc>::Vec v, int64_t valid, T* dst) {
  constexpr int W = LaneTraits<Acc>::kLanes;
  if (sizeof(T) == sizeof(Acc) && valid == W) {
    std::memcpy(dst, &v, sizeof(v));
  } else if (valid == W) {
    for (int l = 0; l < W; ++l) dst[l] = static_cast<T>(v[l]);
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
template <typename T, typename Acc>
GOFT_ALWAYS_INLINE void prefetch_row_chunk(const RotateArgs<T, Acc>& args, int64_t row, int64_t j) {
  constexpr int W = LaneTraits<Acc>::kLanes;
  if (row < args.rows) {
    __builtin_prefetch(args.x + row * args.x_row_stride + j * W, 0, 3);
    __builtin_prefetch(args.out + row * args.out_row_stride + j * W, 1, 3);
  }
}

template <typename T, typename Acc>
GOFT_ALWAYS_INLINE void prefetch_row_chunk(const RotateBackwardArgs<T, Acc>& args, int64_t row,
                                           int64_t row_end, int64_t j) {
  constexpr int W = LaneTraits<Acc>::kLanes;
  if (row < row_end) {
    __builtin_prefetch(args.x + row * args.x_row_stride + j * W, 0, 3);
    __builtin_prefetch(args.grad_out + row * args.grad_out_row_stride + j * W, 0, 3);
    if (args.grad_x != nullptr) __builtin_prefetch(args.grad_x + row * args.grad_x_row_stride + j * W, 1, 3);
  }
}

template <typename Acc>
GOFT_ALWAYS_INLINE typename LaneTraits<Acc>::Vec load_vec(const Acc* src) {
  typename LaneTraits<Acc>::Vec v;
  std::memcpy(&v, src, sizeof(v));
  return v;
}

template <typename Acc>
GOFT_ALWAYS_INLINE void store_vec(typename LaneTraits<Acc>::Vec v, Acc* dst) {
  std::memcpy(dst, &v, sizeof(v));
}

// The fine layers in descending order with Q (the forward, coarse to fine).
template <typename Acc>
GOFT_ALWAYS_INLINE typename LaneTraits<Acc>::Vec fine_forward(typename LaneTraits<Acc>::Vec v,
                                                              const Acc* coef) {
  constexpr int W = LaneTraits<Acc>::kLanes;
  for (int f = LaneTraits<Acc>::kFineLayers - 1; f >= 0; --f) {
    const Acc* P = coef + f * 3 * W;
    v = load_vec(P) * v + load_vec(P + W) * swap_any<Acc>(v, f);
  }
  return v;
}

// The fine layers in ascending order with Qt (the transposed forward).
template <typename Acc>
GOFT_ALWAYS_INLINE typename LaneTraits<Acc>::Vec fine_forward_transposed(
    typename LaneTraits<Acc>::Vec v, const Acc* coef) {
  constexpr int W = LaneTraits<Acc>::kLanes;
  for (int f = 0; f < LaneTraits<Acc>::kFineLayers; ++f) {
    const Acc* P = coef + f * 3 * W;
    v = load_vec(P) * v + load_vec(P + 2 * W) * swap_any<Acc>(v, f);
  }
  return v;
}

// Coarse layers on a compact row (one entry per chunk): layer r >= first_coarse has compact
// stride 2^(r - first_coarse). Saves pair inputs when `saved` is given (for backward).
template <typename Acc, bool Transposed>
GOFT_ALWAYS_INLINE void coarse_layer(const PairSchedule& schedule, int r, int first_coarse,
                                     const Acc* blocks, Acc* compact, Acc* saved) {
  const int64_t s = int64_t{1} << (r - first_coarse);
  const int64_t pairs = schedule.pairs[r], off = schedule.offset[r];
  const Acc* B = blocks + kBlockSize * off;
  for (int64_t k = 0; k < pairs; ++k) {
    const int64_t a = 2 * s * k, b = a + s;
    const Acc ua = compact[a], ub = compact[b];
    if (saved != nullptr) {
      saved[2 * (off + k)] = ua;
      saved[2 * (off + k) + 1] = ub;
    }
    const Acc cab = Transposed ? B[4 * k + 2] : B[4 * k + 1];
    const Acc cba = Transposed ? B[4 * k + 1] : B[4 * k + 2];
    compact[a] = B[4 * k] * ua + cba * ub;
    compact[b] = cab * ua + B[4 * k + 3] * ub;
  }
}

template <typename Acc, bool Transposed>
GOFT_ALWAYS_INLINE void coarse_forward(const PairSchedule& schedule, int first_coarse,
                                       const Acc* blocks, Acc* compact, Acc* saved) {
  if (Transposed) {
    for (int r = first_coarse; r < schedule.num_layers; ++r)
      coarse_layer<Acc, true>(schedule, r, first_coarse, blocks, compact, saved);
  } else {
    for (int r = schedule.num_layers - 1; r >= first_coarse; --r)
      coarse_layer<Acc, false>(schedule, r, first_coarse, blocks, compact, saved);
  }
}

// Backward of the coarse layers (reverse of coarse_forward), accumulating applied-block gradients.
template <typename Acc, bool Transposed>
GOFT_ALWAYS_INLINE void coarse_backward(const PairSchedule& schedule, int first_coarse,
                                        const Acc* blocks, const Acc* saved, Acc* g,
                                        Acc* grad_blocks) {
  auto layer = [&](int r) {
    const int64_t s = int64_t{1} << (r - first_coarse);
    const int64_t pairs = schedule.pairs[r], off = schedule.offset[r];
    const Acc* B = blocks + kBlockSize * off;
    Acc* gB = grad_blocks + kBlockSize * off;
    for (int64_t k = 0; k < pairs; ++k) {
      const int64_t a = 2 * s * k, b = a + s;
      const Acc ua = saved[2 * (off + k)], ub = saved[2 * (off + k) + 1];
      const Acc ga = g[a], gb = g[b];
      gB[4 * k] += ua * ga;
      gB[4 * k + 1] += ua * gb;
      gB[4 * k + 2] += ub * ga;
      gB[4 * k + 3] += ub * gb;
      const Acc cab = Transposed ? B[4 * k + 2] : B[4 * k + 1];
      const Acc cba = Transposed ? B[4 * k + 1] : B[4 * k + 2];
      g[a] = B[4 * k] * ga + cab * gb;
      g[b] = cba * ga + B[4 * k + 3] * gb;
    }
  };
  if (Transposed) {
    for (int r = schedule.num_layers - 1; r >= first_coarse; --r) layer(r);
  } else {
    for (int r = first_coarse; r < schedule.num_layers; ++r) layer(r);
  }
}

// Precomputed, read-only state of one call, shared by all threads.
template <typename Acc>
struct LaneCall {
  const PairSchedule* schedule;
  LaneGeometry geometry;
  const Acc* blocks;        // (d-1, 4) as applied by the coarse layers
  const Acc* coefficients;  // expand_fine_coefficients
  const Acc* scale_padded;  // (chunks * W,) scale padded with ones, or nullptr
};

template <typename Acc>
inline int64_t rotate_tile_scratch_size(int64_t dim) {
  constexpr int W = LaneTraits<Acc>::kLanes;
  return kTileRows * ((dim + W - 1) / W);
}

// Rows [begin, end) of y = x @ T (or x @ T^T), end - begin <= kTileRows.
// scratch: rotate_tile_scratch_size(d) elements.
template <typename T, typename Acc>
GOFT_ALWAYS_INLINE void rotate_tile(const RotateArgs<T, Acc>& args, const LaneCall<Acc>& call,
                                    int64_t begin, int64_t end, Acc* scratch) {
  using Vec = typename LaneTraits<Acc>::Vec;
  constexpr int W = LaneTraits<Acc>::kLanes, F = LaneTraits<Acc>::kFineLayers;
  const int64_t d = args.dim, chunks = call.geometry.chunks, n = end - begin;
  const int first_coarse = call.geometry.first_coarse;
  Acc* compact = scratch;  // [row in tile][chunk]
  if (!args.transpose) {
    for (int64_t t = 0; t < n; ++t) {
      const T* x = args.x + (begin + t) * args.x_row_stride;
      Acc* c = compact + t * chunks;
      for (int64_t j = 0; j < chunks; ++j) c[j] = static_cast<Acc>(x[j * W]);
      coarse_forward<Acc, false>(*call.schedule, first_coarse, call.blocks, c, nullptr);
    }
    for (int64_t j = 0; j < chunks; ++j) {
      const Acc* coef = call.coefficients + j * F * 3 * W;
      const int64_t valid = d - j * W < W ? d - j * W : W;
      for (int64_t t = 0; t < n; ++t) {
        prefetch_row_chunk(args, end + t, j);  // the next tile's row t
        Vec v = load_chunk<T, Acc>(args.x + (begin + t) * args.x_row_stride + j * W, valid);
        v[0] = compact[t * chunks + j];
        v = fine_forward<Acc>(v, coef);
        if (call.scale_padded != nullptr) v *= load_vec(call.scale_padded + j * W);
        store_chunk<T, Acc>(v, valid, args.out + (begin + t) * args.out_row_stride + j * W);
      }
    }
  } else {
    for (int64_t j = 0; j < chunks; ++j) {
      const Acc* coef = call.coefficients + j * F * 3 * W;
      const int64_t valid = d - j * W < W ? d - j * W : W;
      for (int64_t t = 0; t < n; ++t) {
        prefetch_row_chunk(args, end + t, j);  // the next tile's row t
        Vec v = load_chunk<T, Acc>(args.x + (begin + t) * args.x_row_stride + j * W, valid);
        if (call.scale_padded != nullptr) v *= load_vec(call.scale_padded + j * W);
        v = fine_forward_transposed<Acc>(v, coef);
        store_chunk<T, Acc>(v, valid, args.out + (begin + t) * args.out_row_stride + j * W);
        compact[t * chunks + j] = v[0];
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      Acc* c = compact + t * chunks;
      coarse_forward<Acc, true>(*call.schedule, first_coarse, call.blocks, c, nullptr);
      T* out = args.out + (begin + t) * args.out_row_stride;
      for (int64_t j = 0; j < chunks; ++j) out[j * W] = static_cast<T>(c[j]);
    }
  }
}

// Scratch of the backward for one gradient chunk (see rotate_backward_chunk_fast).
template <typename Acc>
inline int64_t backward_chunk_scratch_size(int64_t dim) {
  constexpr int W = LaneTraits<Acc>::kLanes, F = LaneTraits<Acc>::kFineLayers;
  const int64_t chunks = (dim + W - 1) / W;
  return 2 * kTileRows * chunks             // compact forward values and compact gradients
         + kTileRows * 2 * (dim > 0 ? dim : 1)  // saved coarse-pair inputs, indexed by pair
         + chunks * F * 2 * W                // fine-layer gradient sums D, E per lane
         + chunks * W;                       // scale gradient sums per lane
}

// Backward for gradient chunk `chunk` (rows split as in params.h), writing that chunk's partial
// applied-block gradients (and scale gradients) and, if requested, grad_x for its rows.
template <typename T, typename Acc>
GOFT_ALWAYS_INLINE void rotate_backward_chunk_fast(const RotateBackwardArgs<T, Acc>& args,
                                                   const LaneCall<Acc>& call, int64_t chunk,
                                                   Acc* scratch) {
  using Vec = typename LaneTraits<Acc>::Vec;
  constexpr int W = LaneTraits<Acc>::kLanes, F = LaneTraits<Acc>::kFineLayers;
  const PairSchedule& schedule = *call.schedule;
  const int64_t d = args.dim, chunks = call.geometry.chunks, pairs = schedule.num_pairs();
  const int first_coarse = call.geometry.first_coarse;
  const bool transpose = args.transpose;

  Acc* compact = scratch;
  Acc* compact_grad = compact + kTileRows * chunks;
  Acc* saved = compact_grad + kTileRows * chunks;  // [row in tile][2 * pair]
  const int64_t saved_stride = 2 * (d > 0 ? d : 1);
  Acc* lane_grads = saved + kTileRows * saved_stride;  // [chunk][layer][D, E][lane]
  Acc* scale_grads = lane_grads + chunks * F * 2 * W;  // [chunk][lane]
  Acc* block_grads = args.block_grad_partials + chunk * kBlockSize * pairs;
  Acc* scale_out = args.scale_grad_partials == nullptr ? nullptr : args.scale_grad_partials + chunk * d;
  const bool want_scale = scale_out != nullptr;
  for (int64_t i = 0; i < kBlockSize * pairs; ++i) block_grads[i] = 0;
  for (int64_t i = 0; i < chunks * F * 2 * W; ++i) lane_grads[i] = 0;
  for (int64_t i = 0; i < chunks * W; ++i) scale_grads[i] = 0;

  const int64_t row_begin = chunk_begin(chunk, args.rows, args.num_chunks);
  const int64_t row_end = chunk_begin(chunk + 1, args.rows, args.num_chunks);
  for (int64_t begin = row_begin; begin < row_end; begin += kTileRows) {
    const int64_t n = row_end - begin < kTileRows ? row_end - begin : kTileRows;
    auto x_row = [&](int64_t t) { return args.x + (begin + t) * args.x_row_stride; };
    auto g_row = [&](int64_t t) { return args.grad_out + (begin + t) * args.grad_out_row_stride; };
    auto gx_row = [&](int64_t t) { return args.grad_x + (begin + t) * args.grad_x_row_stride; };

    if (!transpose) {
      // Coarse layers act first: run them on the compact rows, saving their inputs.
      for (int64_t t = 0; t < n; ++t) {
        Acc* c = compact + t * chunks;
        for (int64_t j = 0; j < chunks; ++j) c[j] = static_cast<Acc>(x_row(t)[j * W]);
        coarse_forward<Acc, false>(schedule, first_coarse, call.blocks, c, saved + t * saved_stride);
      }
      for (int64_t j = 0; j < chunks; ++j) {
        const Acc* coef = call.coefficients + j * F * 3 * W;
        const int64_t valid = d - j * W < W ? d - j * W : W;
        Vec D[F], E[F], dscale = {};
        for (int f = 0; f < F; ++f) D[f] = E[f] = Vec{};
        for (int64_t t = 0; t < n; ++t) {
          // u[f] is the input of fine layer f; the forward runs f = F-1 .. 0.
          prefetch_row_chunk(args, begin + n + t, row_end, j);  // the next tile's row t
          Vec u[F];
          Vec v = load_chunk<T, Acc>(x_row(t) + j * W, valid);
          v[0] = compact[t * chunks + j];
          for (int f = F - 1; f >= 0; --f) {
            u[f] = v;
            const Acc* P = coef + f * 3 * W;
            v = load_vec(P) * v + load_vec(P + W) * swap_any<Acc>(v, f);
          }
          Vec g = load_chunk<T, Acc>(g_row(t) + j * W, valid);
          if (call.scale_padded != nullptr) {
            if (want_scale) dscale += g * v;
            g *= load_vec(call.scale_padded + j * W);
          }
          for (int f = 0; f < F; ++f) {
            const Vec gs = swap_any<Acc>(g, f);
            D[f] += u[f] * g;
            E[f] += u[f] * gs;
            const Acc* P = coef + f * 3 * W;
            g = load_vec(P) * g + load_vec(P + 2 * W) * gs;
          }
          compact_grad[t * chunks + j] = g[0];
          if (args.grad_x != nullptr) store_chunk<T, Acc>(g, valid, gx_row(t) + j * W);
        }
        Acc* lg = lane_grads + j * F * 2 * W;
        for (int f = 0; f < F; ++f) {
          store_vec(load_vec(lg + 2 * f * W) + D[f], lg + 2 * f * W);
          store_vec(load_vec(lg + (2 * f + 1) * W) + E[f], lg + (2 * f + 1) * W);
        }
        if (want_scale) store_vec(load_vec(scale_grads + j * W) + dscale, scale_grads + j * W);
      }
      for (int64_t t = 0; t < n; ++t) {
        Acc* cg = compact_grad + t * chunks;
        coarse_backward<Acc, false>(schedule, first_coarse, call.blocks, saved + t * saved_stride, cg,
                                    block_grads);
        if (args.grad_x != nullptr) {
          for (int64_t j = 0; j < chunks; ++j) gx_row(t)[j * W] = static_cast<T>(cg[j]);
        }
      }
    } else {
      // Transposed: scale, fine layers ascending, then coarse layers. First the fine forward to
      // get the compact rows, then the coarse forward and backward, then the fine backward.
      for (int64_t j = 0; j < chunks; ++j) {
        const Acc* coef = call.coefficients + j * F * 3 * W;
        const int64_t valid = d - j * W < W ? d - j * W : W;
        for (int64_t t = 0; t < n; ++t) {
          Vec v = load_chunk<T, Acc>(x_row(t) + j * W, valid);
          if (call.scale_padded != nullptr) v *= load_vec(call.scale_padded + j * W);
          v = fine_forward_transposed<Acc>(v, coef);
          compact[t * chunks + j] = v[0];
        }
      }
      for (int64_t t = 0; t < n; ++t) {
        Acc* c = compact + t * chunks;
        Acc* cg = compact_grad + t * chunks;
        coarse_forward<Acc, true>(schedule, first_coarse, call.blocks, c, saved + t * saved_stride);
        for (int64_t j = 0; j < chunks; ++j) cg[j] = static_cast<Acc>(g_row(t)[j * W]);
        coarse_backward<Acc, true>(schedule, first_coarse, call.blocks, saved + t * saved_stride, cg,
                                   block_grads);
      }
      for (int64_t j = 0; j < chunks; ++j) {
        const Acc* coef = call.coefficients + j * F * 3 * W;
        const int64_t valid = d - j * W < W ? d - j * W : W;
        Vec D[F], E[F], dscale = {};
        for (int f = 0; f < F; ++f) D[f] = E[f] = Vec{};
        for (int64_t t = 0; t < n; ++t) {
          prefetch_row_chunk(args, begin + n + t, row_end, j);  // the next tile's row t
          Vec u[F];
          const Vec xs = load_chunk<T, Acc>(x_row(t) + j * W, valid);
          Vec v = xs;
          if (call.scale_padded != nullptr) v *= load_vec(call.scale_padded + j * W);
          for (int f = 0; f < F; ++f) {
            u[f] = v;
            const Acc* P = coef + f * 3 * W;
            v = load_vec(P) * v + load_vec(P + 2 * W) * swap_any<Acc>(v, f);
          }
          Vec g = load_chunk<T, Acc>(g_row(t) + j * W, valid);
          g[0] = compact_grad[t * chunks + j];
          for (int f = F - 1; f >= 0; --f) {
            const Vec gs = swap_any<Acc>(g, f);
            D[f] += u[f] * g;
            E[f] += u[f] * gs;
            const Acc* P = coef + f * 3 * W;
            g = load_vec(P) * g + load_vec(P + W) * gs;
          }
          if (call.scale_padded != nullptr) {
            if (want_scale) dscale += g * xs;
            g *= load_vec(call.scale_padded + j * W);
          }
          if (args.grad_x != nullptr) store_chunk<T, Acc>(g, valid, gx_row(t) + j * W);
        }
        Acc* lg = lane_grads + j * F * 2 * W;
        for (int f = 0; f < F; ++f) {
          store_vec(load_vec(lg + 2 * f * W) + D[f], lg + 2 * f * W);
          store_vec(load_vec(lg + (2 * f + 1) * W) + E[f], lg + (2 * f + 1) * W);
        }
        if (want_scale) store_vec(load_vec(scale_grads + j * W) + dscale, scale_grads + j * W);
      }
    }
  }

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
#if defined(__x86_64__) && !defined(__CUDACC__) && !defined(GOFT_NO_MULTIVERSION)
#define GOFT_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define GOFT_MULTIVERSION __attribute__((flatten))
#endif

// Fills the call's coefficients (fine_coefficients_size(d) elements) and padded scale (chunks * W
// elements, used only when scale is given).
template <typename Acc>
LaneCall<Acc> prepare_lane_call(const PairSchedule& schedule, const Acc* blocks, const Acc* scale,
                                Acc* coefficients, Acc* scale_padded) {
  constexpr int W = LaneTraits<Acc>::kLanes;
  LaneCall<Acc> call;
  call.schedule = &schedule;
  call.geometry = make_lane_geometry<Acc>(schedule);
  call.blocks = blocks;
  expand_fine_coefficients(schedule, blocks, coefficients);
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

// Rows [begin, end) of the forward, tile by tile. scratch: rotate_tile_scratch_size<Acc>(d).
template <typename T, typename Acc>
GOFT_MULTIVERSION void rotate_rows_fast(const RotateArgs<T, Acc>& args, const LaneCall<Acc>& call,
                                        int64_t begin, int64_t end, Acc* scratch) {
  for (int64_t row = begin; row < end; row += kTileRows) {
    rotate_tile(args, call, row, end - row < kTileRows ? end : row + kTileRows, scratch);
  }
}

// Gradient chunks [begin, end) of the backward. scratch: backward_chunk_scratch_size<Acc>(d).
template <typename T, typename Acc>
GOFT_MULTIVERSION void rotate_backward_chunks_fast(const RotateBackwardArgs<T, Acc>& args,
                                                   const LaneCall<Acc>& call, int64_t begin,
                                                   int64_t end, Acc* scratch) {
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    rotate_backward_chunk_fast(args, call, chunk, scratch);
  }
}

}  // namespace cpu
}  // namespace goft
