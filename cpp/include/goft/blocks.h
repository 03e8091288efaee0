// Conversions between the op's parameters (angles or 2x2 blocks) and the 2x2 blocks the kernels
// apply, and the chain rule back from block gradients to parameter gradients (spec section 4).
#pragma once

#include <cmath>
#include <cstdint>

#include "goft/schedule.h"

namespace goft {

// Blocks are stored (d-1, 4) row-major as A00, A01, A10, A11. For a row vector u, pair (a, b)
// maps to u'_a = A00*u_a + A10*u_b, u'_b = A01*u_a + A11*u_b (spec section 3).
constexpr int kBlockSize = 4;

// How (d-1,) angle parameters become angles (the op's `angle_parameterisation`): the parameter
// is the angle, or the angle is pi * tanh(p), which keeps it in (-pi, pi) (GOFTConfig's default).
// Mapping inside the ops saves an adapter two elementwise ops forward and two backward per step,
// host time that exceeds the op's own at small batches (bench/host_bench.py).
enum class AngleParameterisation : int { kRaw = 0, kPiTanh = 1 };

constexpr double kPi = 3.14159265358979323846;

// The angle of parameter p, in double like the trigonometry after it.
template <typename Param>
GOFT_HOST_DEVICE double angle_of(Param p, AngleParameterisation map) {
  const double v = static_cast<double>(p);
  return map == AngleParameterisation::kPiTanh ? kPi * tanh(v) : v;
}

// d angle / d p: 1, or pi * (1 - tanh(p)^2).
template <typename Param>
GOFT_HOST_DEVICE double angle_derivative(Param p, AngleParameterisation map) {
  if (map != AngleParameterisation::kPiTanh) return 1.0;
  const double t = tanh(static_cast<double>(p));
  return kPi * (1.0 - t * t);
}

// (cos t, sin t) of a rotation by angle t. The trigonometry runs in double whatever the
// accumulation type, since it is computed once per call for d-1 values.
template <typename Acc>
GOFT_HOST_DEVICE void angle_to_rotation(double angle, Acc* cos_sin) {
  cos_sin[0] = static_cast<Acc>(cos(angle));
  cos_sin[1] = static_cast<Acc>(sin(angle));
}

// Strict GOFT: A = [[cos t, -sin t], [sin t, cos t]].
template <typename Acc>
GOFT_HOST_DEVICE void angle_to_block(double angle, Acc* block) {
  Acc cos_sin[2];
  angle_to_rotation(angle, cos_sin);
  block[0] = cos_sin[0];
  block[1] = -cos_sin[1];
  block[2] = cos_sin[1];
  block[3] = cos_sin[0];
}

// Gradient of parameter p from its block's gradient: dA/dt = [[-sin, -cos], [cos, -sin]], times
// d angle / d p.
template <typename Acc, typename Param>
GOFT_HOST_DEVICE Param block_grad_to_angle_grad(Param p, AngleParameterisation map,
                                                const Acc* block_grad) {
  const double t = angle_of(p, map);
  const double c = cos(t), s = sin(t);
  const double g00 = block_grad[0], g01 = block_grad[1], g10 = block_grad[2], g11 = block_grad[3];
  return static_cast<Param>((-s * (g00 + g11) + c * (g10 - g01)) * angle_derivative(p, map));
}

// The block of pair p from the op's parameters: (d-1,) angles or (d-1, 2, 2) blocks.
template <typename Param, typename Acc>
GOFT_HOST_DEVICE void param_block(const Param* params, bool params_are_blocks,
                                  AngleParameterisation map, int64_t p, Acc* block) {
  if (params_are_blocks) {
    for (int i = 0; i < kBlockSize; ++i) block[i] = static_cast<Acc>(params[kBlockSize * p + i]);
  } else {
    angle_to_block(angle_of(params[p], map), block);
  }
}

// Host helpers over all d-1 parameters; the CUDA path runs the same per-pair functions in a kernel.
template <typename Param, typename Acc>
inline void params_to_blocks(const Param* params, bool params_are_blocks,
                             AngleParameterisation map, int64_t num_pairs, Acc* blocks) {
  for (int64_t p = 0; p < num_pairs; ++p) {
    param_block(params, params_are_blocks, map, p, blocks + kBlockSize * p);
  }
}

// Sums per-chunk partial gradients in chunk order (a fixed order, so the result does not depend
// on how chunks were spread over threads) for entries [begin, end) of each partial.
template <typename Acc>
inline void reduce_partials(const Acc* partials, int64_t num_chunks, int64_t length,
                            int64_t begin, int64_t end, Acc* total) {
  for (int64_t i = begin; i < end; ++i) {
    Acc sum = 0;
    for (int64_t c = 0; c < num_chunks; ++c) sum += partials[c * length + i];
    total[i] = sum;
  }
}

// Maps the gradient of the blocks as applied (C = A, or C = A^T for the transposed op) to the
// gradient of the op's params, for pairs [begin, end).
template <typename Acc, typename Param>
inline void block_grads_to_param_grads(const Acc* applied_grad, bool transpose,
                                       const Param* params, bool params_are_blocks,
                                       AngleParameterisation map, int64_t begin, int64_t end,
                                       Param* params_grad) {
  for (int64_t p = begin; p < end; ++p) {
    const Acc* g = applied_grad + kBlockSize * p;
    const Acc block_grad[kBlockSize] = {g[0], transpose ? g[2] : g[1], transpose ? g[1] : g[2],
                                        g[3]};
    if (params_are_blocks) {
      for (int i = 0; i < kBlockSize; ++i) {
        params_grad[kBlockSize * p + i] = static_cast<Param>(block_grad[i]);
      }
    } else {
      params_grad[p] = block_grad_to_angle_grad<Acc>(params[p], map, block_grad);
    }
  }
}

}  // namespace goft
