// CPU kernels of the GOFT transform: one fused pass per row over all layers, row kept in cache.
//
// The caller splits rows (forward) or gradient chunks (backward) over threads; these functions are
// single-threaded and allocation-free, working in caller-provided scratch.
#pragma once

#include <cstdint>

#include "goft/params.h"
#include "goft/schedule.h"

namespace goft {
namespace cpu {

#if defined(__GNUC__)
#define GOFT_RESTRICT __restrict__
#else
#define GOFT_RESTRICT
#endif

// Applies one layer in place to the row w. Transposed, each block acts as A^T.
// Only features at multiples of the stride are touched, so layer r costs d / 2^r pairs.
template <typename Acc, bool Transposed>
inline void apply_layer(Acc* GOFT_RESTRICT w, const Acc* GOFT_RESTRICT blocks, int64_t pairs,
                        int64_t stride) {
  // Stride 1 is half of all the work; its own loop lets the compiler vectorise it.
  if (stride == 1) {
    for (int64_t k = 0; k < pairs; ++k) {
      const Acc* B = blocks + 4 * k;
      const Acc ua = w[2 * k], ub = w[2 * k + 1];
      const Acc cab = Transposed ? B[2] : B[1], cba = Transposed ? B[1] : B[2];
      w[2 * k] = B[0] * ua + cba * ub;
      w[2 * k + 1] = cab * ua + B[3] * ub;
    }
    return;
  }
  for (int64_t k = 0; k < pairs; ++k) {
    const Acc* B = blocks + 4 * k;
    const int64_t a = 2 * stride * k, b = a + stride;
    const Acc ua = w[a], ub = w[b];
    const Acc cab = Transposed ? B[2] : B[1], cba = Transposed ? B[1] : B[2];
    w[a] = B[0] * ua + cba * ub;
    w[b] = cab * ua + B[3] * ub;
  }
}

// Forward transform of one row held in w (length d), in place.
template <typename Acc, bool Transposed>
inline void transform_row(const PairSchedule& schedule, const Acc* blocks, const Acc* scale,
                          Acc* GOFT_RESTRICT w) {
  const int64_t d = schedule.dim;
  if (Transposed) {
    if (scale != nullptr) {
      for (int64_t i = 0; i < d; ++i) w[i] *= scale[i];
    }
    for (int r = 0; r < schedule.num_layers; ++r) {
      apply_layer<Acc, true>(w, blocks + 4 * schedule.offset[r], schedule.pairs[r],
                             schedule.stride(r));
    }
  } else {
    for (int r = schedule.num_layers - 1; r >= 0; --r) {
      apply_layer<Acc, false>(w, blocks + 4 * schedule.offset[r], schedule.pairs[r],
                              schedule.stride(r));
    }
    if (scale != nullptr) {
      for (int64_t i = 0; i < d; ++i) w[i] *= scale[i];
    }
  }
}

template <typename T, typename Acc>
inline void load_row(const T* GOFT_RESTRICT src, int64_t d, Acc* GOFT_RESTRICT dst) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<Acc>(src[i]);
}

template <typename T, typename Acc>
inline void store_row(const Acc* GOFT_RESTRICT src, int64_t d, T* GOFT_RESTRICT dst) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(src[i]);
}

// Scratch (in Acc elements) that rotate_rows needs.
inline int64_t rotate_scratch_size(int64_t dim) { return dim; }

// Rows [begin, end) of y = x @ T (or x @ T^T). scratch: rotate_scratch_size(d) elements.
template <typename T, typename Acc>
void rotate_rows(const RotateArgs<T, Acc>& args, const PairSchedule& schedule, int64_t begin,
                 int64_t end, Acc* scratch) {
  const int64_t d = args.dim;
  for (int64_t row = begin; row < end; ++row) {
    load_row(args.x + row * args.x_row_stride, d, scratch);
    if (args.transpose) {
      transform_row<Acc, true>(schedule, args.blocks, args.scale, scratch);
    } else {
      transform_row<Acc, false>(schedule, args.blocks, args.scale, scratch);
    }
    store_row(scratch, d, args.out + row * args.out_row_stride);
  }
}

// Scratch (in Acc elements) that rotate_backward_chunk needs: the row, its gradient, a copy of
// the input row, and the 2(d-1) inputs of every pair, saved during the recomputed forward.
inline int64_t rotate_backward_scratch_size(int64_t dim) { return 3 * dim + 2 * dim; }

// Recomputes the forward of one row (in w, from the input row) and saves each pair's input in
// saved[2p], saved[2p+1] (p = pair index), so backward needs no inverse and works for any blocks.
template <typename Acc, bool Transposed>
inline void forward_saving_inputs(const PairSchedule& schedule, const Acc* blocks,
                                  const Acc* scale, Acc* GOFT_RESTRICT w,
                                  Acc* GOFT_RESTRICT saved) {
  auto layer = [&](int r) {
    const int64_t s = schedule.stride(r), pairs = schedule.pairs[r], off = schedule.offset[r];
    const Acc* B = blocks + 4 * off;
    Acc* sv = saved + 2 * off;
    for (int64_t k = 0; k < pairs; ++k) {
      const int64_t a = 2 * s * k, b = a + s;
      const Acc ua = w[a], ub = w[b];
      sv[2 * k] = ua;
      sv[2 * k + 1] = ub;
      const Acc cab = Transposed ? B[4 * k + 2] : B[4 * k + 1];
      const Acc cba = Transposed ? B[4 * k + 1] : B[4 * k + 2];
      w[a] = B[4 * k] * ua + cba * ub;
      w[b] = cab * ua + B[4 * k + 3] * ub;
    }
  };
  const int64_t d = schedule.dim;
  if (Transposed) {
    if (scale != nullptr) {
      for (int64_t i = 0; i < d; ++i) w[i] *= scale[i];
    }
    for (int r = 0; r < schedule.num_layers; ++r) layer(r);
  } else {
    for (int r = schedule.num_layers - 1; r >= 0; --r) layer(r);
  }
}

// Backward through one layer: accumulates the applied block's gradient outer([u_a,u_b],[g_a,g_b])
// into grad_blocks and turns g (gradient at the layer output) into the gradient at its input.
template <typename Acc, bool Transposed>
inline void backward_layer(const PairSchedule& schedule, int r, const Acc* blocks,
                           const Acc* GOFT_RESTRICT saved, Acc* GOFT_RESTRICT g,
                           Acc* GOFT_RESTRICT grad_blocks) {
  const int64_t s = schedule.stride(r), pairs = schedule.pairs[r], off = schedule.offset[r];
  const Acc* B = blocks + 4 * off;
  const Acc* sv = saved + 2 * off;
  Acc* gB = grad_blocks + 4 * off;
  for (int64_t k = 0; k < pairs; ++k) {
    const int64_t a = 2 * s * k, b = a + s;
    const Acc ua = sv[2 * k], ub = sv[2 * k + 1];
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
}

template <typename T, typename Acc, bool Transposed>
void rotate_backward_chunk_impl(const RotateBackwardArgs<T, Acc>& args,
                                const PairSchedule& schedule, int64_t chunk, Acc* scratch) {
  const int64_t d = args.dim;
  const int64_t num_pairs = schedule.num_pairs();
  Acc* w = scratch;
  Acc* g = scratch + d;
  Acc* x_row = scratch + 2 * d;
  Acc* saved = scratch + 3 * d;
  Acc* grad_blocks = args.block_grad_partials + chunk * 4 * num_pairs;
  Acc* grad_scale = args.scale_grad_partials == nullptr ? nullptr
                                                        : args.scale_grad_partials + chunk * d;
  for (int64_t i = 0; i < 4 * num_pairs; ++i) grad_blocks[i] = 0;
  if (grad_scale != nullptr) {
    for (int64_t i = 0; i < d; ++i) grad_scale[i] = 0;
  }
  const int64_t begin = chunk_begin(chunk, args.rows, args.num_chunks);
  const int64_t end = chunk_begin(chunk + 1, args.rows, args.num_chunks);
  for (int64_t row = begin; row < end; ++row) {
    load_row(args.x + row * args.x_row_stride, d, x_row);
    for (int64_t i = 0; i < d; ++i) w[i] = x_row[i];
    forward_saving_inputs<Acc, Transposed>(schedule, args.blocks, args.scale, w, saved);
    load_row(args.grad_out + row * args.grad_out_row_stride, d, g);
    if (Transposed) {
      for (int r = schedule.num_layers - 1; r >= 0; --r) {
        backward_layer<Acc, true>(schedule, r, args.blocks, saved, g, grad_blocks);
      }
      if (args.scale != nullptr) {
        // The scale acted first, on x itself.
        for (int64_t i = 0; i < d; ++i) {
          if (grad_scale != nullptr) grad_scale[i] += g[i] * x_row[i];
          g[i] *= args.scale[i];
        }
      }
    } else {
      if (args.scale != nullptr) {
        // The scale acted last, on the rotated row now in w.
        for (int64_t i = 0; i < d; ++i) {
          if (grad_scale != nullptr) grad_scale[i] += g[i] * w[i];
          g[i] *= args.scale[i];
        }
      }
      for (int r = 0; r < schedule.num_layers; ++r) {
        backward_layer<Acc, false>(schedule, r, args.blocks, saved, g, grad_blocks);
      }
    }
    if (args.grad_x != nullptr) store_row(g, d, args.grad_x + row * args.grad_x_row_stride);
  }
}

// Chunk `chunk` of the backward with parameter gradients: writes that chunk's partial block (and
// scale) gradients and, when requested, grad_x for its rows. The grad_x-only backward is
// rotate_rows with the opposite transpose (grad_x = grad_out @ T^T). scratch:
// rotate_backward_scratch_size(d) elements.
template <typename T, typename Acc>
void rotate_backward_chunk(const RotateBackwardArgs<T, Acc>& args, const PairSchedule& schedule,
                           int64_t chunk, Acc* scratch) {
  if (args.transpose) {
    rotate_backward_chunk_impl<T, Acc, true>(args, schedule, chunk, scratch);
  } else {
    rotate_backward_chunk_impl<T, Acc, false>(args, schedule, chunk, scratch);
  }
}

}  // namespace cpu
}  // namespace goft
