"""The typed public wrappers of goft's ATen ops, with their fake kernels (the autograd of rotate
and rotated_linear is in C++: cpp/torch/ops_autograd.cpp)."""

from __future__ import annotations

from typing import Optional

import torch

from goft import _C  # noqa: F401  (loading the extension registers torch.ops.goft.*)

from goft.config import ANGLE_PARAMETERISATIONS  # the ops take the same values as GOFTConfig

__all__ = ["rotate", "rotated_linear"]


def rotate(
    x: torch.Tensor,
    params: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    transpose: bool = False,
    angle_parameterisation: str = "raw",
) -> torch.Tensor:
    """Applies the GOFT transform to the last dimension of ``x``.

    Args:
        x: (..., d) float32, float64, bfloat16 or float16, any strides.
        params: (d-1,) angles (strict GOFT, block [[cos t, -sin t], [sin t, cos t]]) or
            (d-1, 2, 2) free blocks (qGOFT), float32 or float64, on x's device, in the flat
            order of the pair schedule (layer 1 first).
        scale: optional (d,) per-feature scale (GOFT*), applied after the rotations.
        transpose: apply T^T instead of T (merging, and the input gradient).
        angle_parameterisation: for angles, "raw" (params are the angles) or "tanh" (the angle of
            pair k is ``pi * tanh(params[k])``; the gradient goes to params through the map).

    Returns:
        (..., d) tensor of x's dtype. Equivalent to ``x @ T`` (``x @ T.T`` when transpose) with
        ``T = R_L @ ... @ R_1 @ diag(scale)``, layer r rotating the pairs (2sk, 2sk+s), s = 2^(r-1)
        (``goft.reference.dense_transform`` builds it in float64), computed in one fused pass
        per row with float32 accumulation (float64 for float64 x). Differentiable in x, params
        and scale; backward saves x only.
    """
    return torch.ops.goft.rotate.default(x, params, scale, transpose, angle_parameterisation)


def rotated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    params: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    angle_parameterisation: str = "raw",
) -> torch.Tensor:
    """``F.linear(rotate(x, params, scale), weight, bias)``, with the transform applied to the weight.

    (x T) W^T = x (W T^T)^T: the op rotates the weight's ``out`` rows (``rotate(weight, params,
    scale, transpose=True)``) and runs the linear layer on x itself, so x is never rotated in the
    forward. That costs less than rotating x whenever x has more rows than the layer has outputs.
    The backward saves x, as ``rotate`` does, never the rotated weight. With angles and no
    scale (T orthogonal) it computes grad_x = grad_y @ (weight T^T), rotating the weight again,
    and the angle gradients from x and grad_x in one pass (``goft::rotate_angle_grads``);
    otherwise grad_y @ weight, then the fused rotation backward on x. Gradients reach x, params,
    scale, and weight and bias if they require them.

    Args:
        x: (..., d) float32, float64, bfloat16 or float16.
        weight: (out, d) of x's dtype and device; bias: (out,) or None, likewise.
        params, scale, angle_parameterisation: as for :func:`rotate`.

    Returns:
        (..., out) tensor of x's dtype. It equals the two-step form up to rounding: the product
        is formed with the rotated weight (rounded to x's dtype) instead of the rotated input.
    """
    return torch.ops.goft.rotated_linear.default(x, weight, bias, params, scale, angle_parameterisation)


# c10's names of the dtypes, which the compiled kernels' messages print ("got Double").
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int8: "Char", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def _type_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _check_args(
    op: str, x: torch.Tensor, params: torch.Tensor, scale: Optional[torch.Tensor], angle_parameterisation: str
) -> None:
    # What cpp/torch/checks.h check_rotate_args checks, in its order and with its messages: fake
    # tensors never reach the compiled kernels, so tracing (torch.compile) checks here.
    if x is None:
        raise RuntimeError(f"{op}: expected x to be a tensor of shape (..., d), got None")
    if params is None:
        raise RuntimeError(f"{op}: expected params to be a tensor of angles (d-1,) or blocks (d-1, 2, 2), got None")
    if x.dim() < 1:
        raise RuntimeError(f"{op}: expected x of shape (..., d) with at least one dimension, got a 0-d tensor")
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise RuntimeError(
            f"{op}: expected x of dtype float32, float64, bfloat16 or float16, got {_type_name(x.dtype)}")
    d = x.shape[-1]
    torch._check(d >= 1, lambda: f"{op}: expected x with a last dimension d >= 1, got shape {tuple(x.shape)}")
    if params.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: expected params of dtype float32 or float64, got {_type_name(params.dtype)}")
    torch._check(
        (params.dim() == 1 and params.shape[0] == d - 1)
        or (params.dim() == 3 and params.shape[0] == d - 1 and params.shape[1] == 2 and params.shape[2] == 2),
        lambda: f"{op}: expected params of shape ({d - 1},) or ({d - 1}, 2, 2) for d={d}, got {tuple(params.shape)}",
    )
    if params.device != x.device:
        raise RuntimeError(f"{op}: expected params on x's device {x.device}, got {params.device}")
    if scale is not None:
        if scale.dtype not in (torch.float32, torch.float64):
            raise RuntimeError(f"{op}: expected scale of dtype float32 or float64, got {_type_name(scale.dtype)}")
        torch._check(
            scale.dim() == 1 and scale.shape[0] == d,
            lambda: f"{op}: expected scale of shape ({d},) for d={d}, got {tuple(scale.shape)}",
        )
        if scale.device != x.device:
            raise RuntimeError(f"{op}: expected scale on x's device {x.device}, got {scale.device}")
    if angle_parameterisation not in ANGLE_PARAMETERISATIONS:
        raise RuntimeError(f'{op}: expected angle_parameterisation "raw" or "tanh", got "{angle_parameterisation}"')
    if angle_parameterisation == "tanh" and params.dim() != 1:
        raise RuntimeError(
            f'{op}: angle_parameterisation "tanh" maps angles, but params are free 2x2 blocks (qGOFT); '
            'pass "raw" with blocks'
        )


def _check_grad_like_x(op: str, name: str, grad: Optional[torch.Tensor], x: torch.Tensor) -> None:
    # checks.h check_grad_like_x: grad_out of rotate_backward, grad_x of rotate_angle_grads.
    if grad is None:
        raise RuntimeError(f"{op}: expected {name} to be a tensor of x's shape {tuple(x.shape)}, got None")
    if grad.shape != x.shape:
        raise RuntimeError(f"{op}: expected {name} of x's shape {tuple(x.shape)}, got {tuple(grad.shape)}")
    if grad.dtype != x.dtype:
        raise RuntimeError(f"{op}: expected {name} of x's dtype {_type_name(x.dtype)}, got {_type_name(grad.dtype)}")
    if grad.device != x.device:
        raise RuntimeError(f"{op}: expected {name} on x's device {x.device}, got {grad.device}")


@torch.library.register_fake("goft::rotate")
def _rotate_fake(x, params, scale=None, transpose=False, angle_parameterisation="raw"):
    _check_args("goft.rotate", x, params, scale, angle_parameterisation)
    return x.new_empty(x.shape)


@torch.library.register_fake("goft::rotate_backward")
def _rotate_backward_fake(grad_out, x, params, scale, transpose, output_mask, angle_parameterisation="raw"):
    _check_args("goft.rotate_backward", x, params, scale, angle_parameterisation)
    _check_grad_like_x("goft.rotate_backward", "grad_out", grad_out, x)
    grad_x = grad_out.new_empty(x.shape) if output_mask[0] else grad_out.new_empty((0,))
    grad_params = params.new_empty(params.shape) if output_mask[1] else params.new_empty((0,))
    if output_mask[2] and scale is not None:
        grad_scale = scale.new_empty(scale.shape)
    else:
        grad_scale = params.new_empty((0,))
    return grad_x, grad_params, grad_scale


@torch.library.register_fake("goft::rotate_angle_grads")
def _rotate_angle_grads_fake(x, grad_x, params, transpose=False, angle_parameterisation="raw"):
    _check_args("goft.rotate_angle_grads", x, params, None, angle_parameterisation)
    if params.dim() != 1:
        raise RuntimeError(
            f"goft.rotate_angle_grads: expected params of shape ({x.shape[-1] - 1},) (angles): free 2x2 blocks "
            f"(qGOFT) do not make an orthogonal transform, so the gradient at x does not determine theirs; "
            f"got {tuple(params.shape)}. Use torch.ops.goft.rotate_backward with the gradient at the output instead"
        )
    _check_grad_like_x("goft.rotate_angle_grads", "grad_x", grad_x, x)
    return params.new_empty(params.shape)


def _check_linear_args(op: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    # checks.h check_linear_args, for tracing, as _check_args.
    d = x.shape[-1]
    if weight is None:
        raise RuntimeError(f"{op}: expected weight to be a tensor of shape (out, d), got None")
    if weight.dim() != 2 or weight.shape[1] != d:
        raise RuntimeError(f"{op}: expected weight of shape (out, {d}) for x of shape {tuple(x.shape)}, "
                           f"got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise RuntimeError(f"{op}: expected weight of x's dtype {_type_name(x.dtype)}, got {_type_name(weight.dtype)}")
    if weight.device != x.device:
        raise RuntimeError(f"{op}: expected weight on x's device {x.device}, got {weight.device}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise RuntimeError(f"{op}: expected bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise RuntimeError(f"{op}: expected bias of x's dtype {_type_name(x.dtype)}, got {_type_name(bias.dtype)}")
        if bias.device != x.device:
            raise RuntimeError(f"{op}: expected bias on x's device {x.device}, got {bias.device}")


@torch.library.register_fake("goft::rotated_linear")
def _rotated_linear_fake(x, weight, bias, params, scale=None, angle_parameterisation="raw"):
    _check_args("goft.rotated_linear", x, params, scale, angle_parameterisation)
    _check_linear_args("goft.rotated_linear", x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
