"""The typed public wrappers of goft's ATen ops, with their fake kernels and autograd."""

from __future__ import annotations

from typing import Optional

import torch

from goft import _C  # noqa: F401  (loading the extension registers torch.ops.goft.*)

__all__ = ["rotate"]


def rotate(
    x: torch.Tensor,
    params: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    transpose: bool = False,
) -> torch.Tensor:
    """Applies the GOFT transform to the last dimension of ``x``.

    Args:
        x: (..., d) float32, float64, bfloat16 or float16, any strides.
        params: (d-1,) angles (strict GOFT, block [[cos t, -sin t], [sin t, cos t]]) or
            (d-1, 2, 2) free blocks (qGOFT), float32 or float64, on x's device, in the flat
            order of the pair schedule (layer 1 first).
        scale: optional (d,) per-feature scale (GOFT*), applied after the rotations.
        transpose: apply T^T instead of T (merging, and the input gradient).

    Returns:
        (..., d) tensor of x's dtype. Equivalent to ``x @ T`` (``x @ T.T`` when transpose) with
        ``T = R_L @ ... @ R_1 @ diag(scale)`` (GOFT_SPEC.md section 3), computed in one fused pass
        per row with float32 accumulation (float64 for float64 x). Differentiable in x, params
        and scale; backward saves x only.
    """
    return torch.ops.goft.rotate.default(x, params, scale, transpose)


def _check_args(op: str, x: torch.Tensor, params: torch.Tensor, scale: Optional[torch.Tensor]) -> None:
    # The compiled kernels check the same; fake tensors never reach them, so tracing checks here.
    d = x.shape[-1] if x.dim() >= 1 else None
    if d is None:
        raise RuntimeError(f"{op}: expected x of shape (..., d) with at least one dimension, got a 0-d tensor")
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise RuntimeError(f"{op}: expected x of dtype float32, float64, bfloat16 or float16, got {x.dtype}")
    if params.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: expected params of dtype float32 or float64, got {params.dtype}")
    torch._check(
        (params.dim() == 1 and params.shape[0] == d - 1)
        or (params.dim() == 3 and params.shape[0] == d - 1 and params.shape[1] == 2 and params.shape[2] == 2),
        lambda: f"{op}: expected params of shape ({d - 1},) or ({d - 1}, 2, 2) for d={d}, got {tuple(params.shape)}",
    )
    if params.device != x.device:
        raise RuntimeError(f"{op}: expected params on x's device {x.device}, got {params.device}")
    if scale is not None:
        if scale.device != x.device:
            raise RuntimeError(f"{op}: expected scale on x's device {x.device}, got {scale.device}")
        if scale.dtype not in (torch.float32, torch.float64):
            raise RuntimeError(f"{op}: expected scale of dtype float32 or float64, got {scale.dtype}")
        torch._check(
            scale.dim() == 1 and scale.shape[0] == d,
            lambda: f"{op}: expected scale of shape ({d},) for d={d}, got {tuple(scale.shape)}",
        )


@torch.library.register_fake("goft::rotate")
def _rotate_fake(x, params, scale=None, transpose=False):
    _check_args("goft.rotate", x, params, scale)
    return x.new_empty(x.shape)


@torch.library.register_fake("goft::rotate_backward")
def _rotate_backward_fake(grad_out, x, params, scale, transpose, output_mask):
    _check_args("goft.rotate_backward", x, params, scale)
    grad_x = grad_out.new_empty(x.shape) if output_mask[0] else grad_out.new_empty((0,))
    grad_params = params.new_empty(params.shape) if output_mask[1] else params.new_empty((0,))
    if output_mask[2] and scale is not None:
        grad_scale = scale.new_empty(scale.shape)
    else:
        grad_scale = params.new_empty((0,))
    return grad_x, grad_params, grad_scale


def _setup_context(ctx, inputs, output):
    x, params, scale, transpose = inputs
    ctx.save_for_backward(x, params, scale)
    ctx.transpose = transpose


def _backward(ctx, grad_out):
    x, params, scale = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], scale is not None and ctx.needs_input_grad[2]]
    if not any(mask):
        return None, None, None, None
    grad_x, grad_params, grad_scale = torch.ops.goft.rotate_backward.default(
        grad_out.contiguous(), x, params, scale, ctx.transpose, mask
    )
    return (
        grad_x if mask[0] else None,
        grad_params if mask[1] else None,
        grad_scale if mask[2] else None,
        None,
    )


torch.library.register_autograd("goft::rotate", _backward, setup_context=_setup_context)
