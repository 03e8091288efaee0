"""goft::rotate_angle_grads (the angle gradients of strict rotate from x and the gradient at x)
against a dense float64 reference: shapes including d = 1, odd d and empty batches, both
transposes, the 16-bit dtypes, strided inputs, opcheck and torch.compile (its errors are in
test_bad_input.py's table)."""

import pytest
import torch

from goft.reference import dense_transform

angle_grads = torch.ops.goft.rotate_angle_grads.default


def dense_case(rows_shape, d, transpose, dtype=torch.float64, seed=0):
    """x, grad_x = grad_y T^T (grad_y T when transposed), angles, and the angles' gradient of
    <grad_y, rotate(x)> by autograd through the dense float64 transform."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows_shape, d, generator=g, dtype=torch.float64).to(dtype)
    grad_y = torch.randn(*rows_shape, d, generator=g, dtype=torch.float64)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    angles = torch.randn(d - 1, generator=g, dtype=pdt)
    t64 = angles.double().requires_grad_(True)
    transform = dense_transform(t64, d)
    applied = transform.t() if transpose else transform
    y = x.double() @ applied
    if d == 1:  # no pairs: T is the identity, with nothing to differentiate
        want = torch.zeros(0, dtype=torch.float64)
    else:
        (want,) = torch.autograd.grad((y * grad_y).sum(), t64)
    grad_x = (grad_y @ applied.detach().t()).to(dtype)
    return x, grad_x, angles, want


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 17, 33, 64])
@pytest.mark.parametrize("transpose", [False, True], ids=["", "transpose"])
@pytest.mark.parametrize("rows_shape", [(3, 4), (1,), (0,)], ids=["3x4", "1", "0"])
def test_matches_dense_float64(d, transpose, rows_shape):
    x, grad_x, angles, want = dense_case(rows_shape, d, transpose)
    got = angle_grads(x, grad_x, angles, transpose)
    assert got.shape == angles.shape and got.dtype == angles.dtype
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("d", [1, 2, 5, 17, 64])
@pytest.mark.parametrize("transpose", [False, True], ids=["", "transpose"])
def test_tanh_parameterisation_matches_dense_float64(d, transpose):
    # params p with angles pi * tanh(p): the op's gradient is the angles' times pi (1 - tanh(p)^2),
    # here by autograd through torch.tanh and the dense transform.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, d, generator=g, dtype=torch.float64)
    grad_y = torch.randn(3, 4, d, generator=g, dtype=torch.float64)
    p = (2 * torch.randn(d - 1, generator=g, dtype=torch.float64)).requires_grad_(True)
    transform = dense_transform(torch.pi * torch.tanh(p), d)
    applied = transform.t() if transpose else transform
    grad_x = grad_y @ applied.detach().t()
    want = torch.zeros(0, dtype=torch.float64) if d == 1 else torch.autograd.grad(((x @ applied) * grad_y).sum(), p)[0]
    got = angle_grads(x, grad_x, p.detach(), transpose, "tanh")
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [7, 96])
def test_low_precision_inputs(dtype, d):
    # The reference takes the same rounded x and grad_x in float64; what is left is the op's own
    # float32 accumulation (and its rounding of the gradient at the output for 16-bit types).
    x, grad_x, angles, _ = dense_case((50,), d, False, dtype, seed=3)
    t64 = angles.double().requires_grad_(True)
    transform = dense_transform(t64, d)
    grad_y = grad_x.double() @ transform.detach()
    (want,) = torch.autograd.grad(((x.double() @ transform) * grad_y).sum(), t64)
    got = angle_grads(x, grad_x, angles, False)
    # 16-bit: about 2e-3 (bfloat16) and 2e-4 (float16) at d = 96, from that rounding.
    tol = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    err = (got.double() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), f"max error {err:.3g}"


def test_strided_inputs():
    x, grad_x, angles, want = dense_case((6,), 9, True, seed=5)
    # Rows one element apart in a wider buffer, and a column-major grad_x (no contiguous rows).
    x_wide = torch.zeros(6, 10, dtype=torch.float64)
    x_wide[:, :9] = x
    grad_cols = grad_x.t().contiguous().t()
    got = angle_grads(x_wide[:, :9], grad_cols, angles, True)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("transpose", [False, True], ids=["", "transpose"])
def test_opcheck(transpose):
    x, grad_x, angles, _ = dense_case((3, 4), 11, transpose, torch.float32)
    torch.library.opcheck(angle_grads, (x, grad_x, angles, transpose))
    torch.library.opcheck(angle_grads, (x, grad_x, angles, transpose, "tanh"))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(x, grad_x, angles):
        return angle_grads(x * 2, grad_x, angles, False)

    x, grad_x, angles, _ = dense_case((40,), 16, False, torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, grad_x, angles), f(x, grad_x, angles))
