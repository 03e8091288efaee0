"""Slow, independent references for the fused op: the schedule and a dense float64 T.

Written from GOFT_SPEC.md sections 2-3 with no code shared with the kernels, so tests comparing
the two check the kernels against the spec rather than against themselves.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

__all__ = ["pair_schedule", "num_layers", "blocks_from_params", "dense_transform", "rotate_ref"]


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


def dense_transform(params: torch.Tensor, d: int, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense (d, d) matrix T = R_L @ ... @ R_1 @ diag(scale), differentiable, float64.

    Equivalent to the op: rotate(x, params, scale) == x @ T.
    """
    blocks = blocks_from_params(params.double())
    layer_matrices = []
    p = 0
    for pairs in pair_schedule(d):
        rows, cols, vals = [], [], []
        covered = set()
        for a, b in pairs:
            A = blocks[p]
            rows += [a, a, b, b]
            cols += [a, b, a, b]
            vals += [A[0, 0], A[0, 1], A[1, 0], A[1, 1]]
            covered.update((a, b))
            p += 1
        for i in range(d):
            if i not in covered:
                rows.append(i)
                cols.append(i)
                vals.append(torch.ones((), dtype=torch.float64))
        R = torch.zeros(d, d, dtype=torch.float64).index_put((torch.tensor(rows), torch.tensor(cols)), torch.stack(vals))
        layer_matrices.append(R)
    T = torch.eye(d, dtype=torch.float64)
    for R in reversed(layer_matrices):  # T = R_L @ ... @ R_1
        T = T @ R
    if scale is not None:
        T = T * scale.double()[None, :]
    return T


def rotate_ref(
    x: torch.Tensor, params: torch.Tensor, scale: Optional[torch.Tensor] = None, transpose: bool = False
) -> torch.Tensor:
    """rotate() computed as a float64 dense matrix product; returns float64."""
    T = dense_transform(params, x.shape[-1], scale)
    return x.double() @ (T.T if transpose else T)
