"""Plain PyTorch implementations of the GOFT transform that goft's fused op is benchmarked against.

- ``rotate_per_layer``: the layers applied one at a time with elementwise ops on strided views
  (gather the a/b features of a layer, rotate them, write them into a fresh copy). Correct for any
  d, differentiable by autograd, which saves per-layer tensors.
- ``rotate_dense``: the approach of the authors' ICML-era code: build each layer's d x d matrix,
  multiply them in turn (the layer matrices as sparse COO, as that code does) into a dense T, then
  ``x @ T``.

Both follow GOFT_SPEC.md sections 2-3 (``rotate(x) = x @ R_L @ ... @ R_1 @ diag(scale)``) and take
the op's arguments: params (d-1,) angles or (d-1, 2, 2) blocks, optional scale (d,).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

__all__ = ["layer_slices", "param_blocks", "rotate_per_layer", "rotate_dense", "dense_transform_icml"]


def layer_slices(d: int) -> List[Tuple[int, int, int]]:
    """(stride s, pairs m, offset of the layer's first parameter) for each layer, finest first.

    Layer r pairs features (2*s*k, 2*s*k + s) for k < m, i.e. the views x[..., 0:2sm:2s] and
    x[..., s:2sm+s:2s] (GOFT_SPEC.md section 2).
    """
    out, c, s, offset = [], d, 1, 0
    while c > 1:
        m = c // 2
        out.append((s, m, offset))
        offset += m
        c -= m
        s *= 2
    return out


def param_blocks(params: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four entries (A00, A01, A10, A11), each (d-1,), of the blocks that params describe."""
    if params.dim() == 1:
        c, s = torch.cos(params), torch.sin(params)
        return c, -s, s, c
    return params[:, 0, 0], params[:, 0, 1], params[:, 1, 0], params[:, 1, 1]


def rotate_per_layer(
    x: torch.Tensor, params: torch.Tensor, scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x @ T one layer at a time, coarsest layer first; (..., d) -> (..., d) in x's dtype.

    Per pair, row form: x'_a = A00*x_a + A10*x_b, x'_b = A01*x_a + A11*x_b. Each layer writes a
    fresh tensor, so autograd sees only out-of-place ops.
    """
    d = x.shape[-1]
    a00, a01, a10, a11 = (t.to(x.dtype) for t in param_blocks(params))
    for s, m, off in reversed(layer_slices(d)):
        xa = x[..., 0 : 2 * s * m : 2 * s]
        xb = x[..., s : 2 * s * m + s : 2 * s]
        b00, b01, b10, b11 = (t[off : off + m] for t in (a00, a01, a10, a11))
        out = x.clone()
        out[..., 0 : 2 * s * m : 2 * s] = b00 * xa + b10 * xb
        out[..., s : 2 * s * m + s : 2 * s] = b01 * xa + b11 * xb
        x = out
    if scale is not None:
        x = x * scale.to(x.dtype)
    return x


def dense_transform_icml(
    params: torch.Tensor, d: int, scale: Optional[torch.Tensor] = None, sparse_layers: bool = True
) -> torch.Tensor:
    """The dense (d, d) T = R_L @ ... @ R_1 @ diag(scale), built the way the authors' ICML code does.

    Each layer's d x d matrix is written into an identity (index_put with the block entries),
    turned into a sparse COO matrix and multiplied from the left into the running product. float32
    (float64 params stay float64), differentiable in params and scale.
    """
    dtype = params.dtype
    a00, a01, a10, a11 = param_blocks(params)
    T = torch.diag(scale.to(dtype)) if scale is not None else torch.eye(d, dtype=dtype, device=params.device)
    for s, m, off in layer_slices(d):
        a = torch.arange(m, device=params.device) * 2 * s
        b = a + s
        # Row-vector convention: x'_a = A00 x_a + A10 x_b, so R[a, a] = A00, R[a, b] = A01,
        # R[b, a] = A10, R[b, b] = A11 (spec section 3).
        rows = torch.cat([a, a, b, b])
        cols = torch.cat([a, b, a, b])
        vals = torch.cat([t[off : off + m] for t in (a00, a01, a10, a11)])
        R = torch.eye(d, dtype=dtype, device=params.device).index_put((rows, cols), vals)
        T = torch.mm(R.to_sparse() if sparse_layers else R, T)
    return T


def rotate_dense(
    x: torch.Tensor, params: torch.Tensor, scale: Optional[torch.Tensor] = None, sparse_layers: bool = True
) -> torch.Tensor:
    """x @ T with T from ``dense_transform_icml``; the product runs in x's dtype."""
    T = dense_transform_icml(params, x.shape[-1], scale, sparse_layers)
    return torch.matmul(x, T.to(x.dtype))
