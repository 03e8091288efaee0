// Torch-free argument structs of the rotate kernels, shared by the CPU and CUDA paths.
#pragma once

#include <cstdint>

#include "goft/schedule.h"

namespace goft {

// y = x @ T (or x @ T^T when transpose) for `rows` rows of length `dim`; T = R_L ... R_1 diag(scale).
// Rows may be strided; the features of a row are contiguous. T is the element type of x and y,
// Acc the accumulation type (float for float/bf16/half, double for double).
template <typename T, typename Acc>
struct RotateArgs {
  int64_t rows = 0;
  int64_t dim = 0;
  const T* x = nullptr;
  int64_t x_row_stride = 0;    // elements between consecutive rows of x
  T* out = nullptr;
  int64_t out_row_stride = 0;  // elements between consecutive rows of out
  const Acc* blocks = nullptr; // (dim - 1, 4): A00, A01, A10, A11 per pair, schedule order
  const Acc* scale = nullptr;  // (dim,) per-feature scale, or nullptr for none
  bool transpose = false;      // apply T^T: scale first, then layers 1..L with transposed blocks
};

// Gradients of y = rotate(x) for upstream gradient grad_out. grad_x = grad_out @ T^T (or @ T);
// parameter gradients are written per chunk of rows and summed in chunk order afterwards, which
// makes them bitwise reproducible whatever the thread count.
template <typename T, typename Acc>
struct RotateBackwardArgs {
  int64_t rows = 0;
  int64_t dim = 0;
  const T* grad_out = nullptr;
  int64_t grad_out_row_stride = 0;
  const T* x = nullptr;                // the forward input, needed for parameter gradients
  int64_t x_row_stride = 0;
  T* grad_x = nullptr;                 // nullptr when x needs no gradient
  int64_t grad_x_row_stride = 0;
  const Acc* blocks = nullptr;         // as in RotateArgs
  const Acc* scale = nullptr;
  bool transpose = false;
  int64_t num_chunks = 0;              // grad_chunk_count(rows, dim)
  // (num_chunks, dim - 1, 4) gradient of the applied blocks (the CUDA strict kernels write one
  // angle gradient per pair instead: RotateBackwardPlan::angle_partials())
  Acc* block_grad_partials = nullptr;
  Acc* scale_grad_partials = nullptr;  // (num_chunks, dim) or nullptr when no scale gradient
};

// Rows are split into this many chunks for parameter gradients. It depends on the problem only,
// never on the thread count (determinism). Each chunk costs a zeroed partial and a final
// per-pair pass, so it gets at least 32 rows; 64 chunks keep up to 64 threads busy, and the cap
// on partial-buffer entries bounds the extra memory for very wide d.
GOFT_HOST_DEVICE int64_t grad_chunk_count(int64_t rows, int64_t dim) {
  constexpr int64_t kMaxChunks = 64;
  constexpr int64_t kMinRowsPerChunk = 32;
  constexpr int64_t kMaxPartialEntries = int64_t{1} << 24;
  const int64_t per_chunk = 5 * (dim > 0 ? dim : 1);
  int64_t chunks = kMaxPartialEntries / per_chunk;
  if (chunks > kMaxChunks) chunks = kMaxChunks;
  if (chunks > rows / kMinRowsPerChunk) chunks = rows / kMinRowsPerChunk;
  return chunks < 1 ? 1 : chunks;
}

// First row of chunk c when `rows` rows are split into `chunks` nearly equal chunks.
GOFT_HOST_DEVICE int64_t chunk_begin(int64_t c, int64_t rows, int64_t chunks) {
  return rows / chunks * c + (c < rows % chunks ? c : rows % chunks);
}

}  // namespace goft
