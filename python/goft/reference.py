"""Slow, independent references for the fused op: the schedule, a dense float64 T, and a float64
layer-by-layer application for widths where a dense d x d product is too costly.

Written from GOFT_SPEC.md sections 2-3 with no code shared with the kernels, so tests comparing
the two check the kernels against the spec rather than against themselves.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

__all__ = [
    "pair_schedule",
    "num_layers",
    "blocks_from_params",
    "dense_transform",
    "rotate_dense_ref",
    "rotate_layers_ref",
    "rotate_ref",
]

# rotate_ref switches from the dense matrix to the layer-by-layer reference above this width.
DENSE_MAX_DIM = 256


def pair_schedule(d: int) -> List[List[Tuple[int, int]]]:
    """The layers of disjoint feature pairs (a, b) for width d; d-1 pairs in all (spec section 2)."""
    c, s, layers = d, 1, []
    while c > 1:
        m = c // 2
        layers.append([(2 * s * k, 2 * s * k + s) for k in range(m)])
        c -= m
        s *= 2
    return layers


def num_layers(d: int) -> int:
    """ceil(log2 d): the number of rotation layers for width d."""
    return math.ceil(math.log2(d)) if d > 1 else 0


def blocks_from_params(params: torch.Tensor) -> torch.Tensor:
    """(d-1,) angles -> (d-1, 2, 2) rotation blocks [[cos, -sin], [sin, cos]]; blocks pass through."""
    if params.dim() == 3:
        return params
    c, s = torch.cos(params), torch.sin(params)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _layer_indices(d: int):
    """Per layer: (a, b) index tensors and the slice of parameters it owns."""
    start = 0
    for pairs in pair_schedule(d):
        idx = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
        yield idx[:, 0], idx[:, 1], slice(start, start + len(pairs))
        start += len(pairs)


def dense_transform(params: torch.Tensor, d: int, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense (d, d) matrix T = R_L @ ... @ R_1 @ diag(scale), differentiable, float64.

    Equivalent to the op: rotate(x, params, scale) == x @ T.
    """
    blocks = blocks_from_params(params.double())
    T = torch.eye(d, dtype=torch.float64)
    layer_matrices = []
    for a, b, owned in _layer_indices(d):
        A = blocks[owned]
        R = torch.eye(d, dtype=torch.float64)
        R = R.index_put((a, a), A[:, 0, 0]).index_put((a, b), A[:, 0, 1])
        R = R.index_put((b, a), A[:, 1, 0]).index_put((b, b), A[:, 1, 1])
        layer_matrices.append(R)
    for R in reversed(layer_matrices):  # T = R_L @ ... @ R_1
        T = T @ R
    if scale is not None:
        T = T * scale.double()[None, :]
    return T


def rotate_dense_ref(x, params, scale=None, transpose=False) -> torch.Tensor:
    """rotate() as a float64 dense matrix product: x @ T (or x @ T.T)."""
    T = dense_transform(params, x.shape[-1], scale)
    return x.double() @ (T.T if transpose else T)


def rotate_layers_ref(x, params, scale=None, transpose=False) -> torch.Tensor:
    """rotate() applied one float64 layer at a time with row-vector pair updates (spec section 3):
    u'_a = A00 u_a + A10 u_b, u'_b = A01 u_a + A11 u_b; T^T uses the transposed blocks."""
    d = x.shape[-1]
    blocks = blocks_from_params(params.double())
    if transpose:
        blocks = blocks.transpose(-1, -2)
    u = x.double()
    layers = list(_layer_indices(d))
    if transpose:
        if scale is not None:
            u = u * scale.double()
    else:
        layers = layers[::-1]
    for a, b, owned in layers:
        A = blocks[owned]
        ua, ub = u[..., a], u[..., b]
        u = u.index_copy(-1, a, A[:, 0, 0] * ua + A[:, 1, 0] * ub)
        u = u.index_copy(-1, b, A[:, 0, 1] * ua + A[:, 1, 1] * ub)
    if not transpose and scale is not None:
        u = u * scale.double()
    return u


def rotate_ref(x, params, scale=None, transpose=False) -> torch.Tensor:
    """float64 reference of rotate(): dense for d <= DENSE_MAX_DIM, layer by layer above."""
    if x.shape[-1] <= DENSE_MAX_DIM:
        return rotate_dense_ref(x, params, scale, transpose)
    return rotate_layers_ref(x, params, scale, transpose)
