"""goft.rotated_linear (the transform applied to a linear layer's weight) against the two-step
form F.linear(goft.rotate(x), W, b) and a dense float64 reference: values, gradients to every
input, what backward saves, errors, opcheck and torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import goft
from goft.reference import dense_transform


def make_case(rows_shape, d, out, quasi, with_scale, bias, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows_shape, d, generator=g, dtype=dtype)
    weight = torch.randn(out, d, generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype) if bias else None
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    if quasi:
        params = torch.eye(2, dtype=pdt).expand(d - 1, 2, 2) + 0.3 * torch.randn(d - 1, 2, 2, generator=g, dtype=pdt)
    else:
        params = torch.randn(d - 1, generator=g, dtype=pdt)
    scale = (1 + 0.2 * torch.randn(d, generator=g, dtype=pdt)) if with_scale else None
    return x, weight, b, params.contiguous(), scale


def grads(fn, inputs):
    """Gradients of a fixed random projection of fn(*inputs) to every input that requires grad."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    y = fn(*leaves)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    (y * probe).sum().backward()
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def two_step(x, weight, b, params, scale):
    return F.linear(goft.rotate(x, params, scale), weight, b)


@pytest.mark.parametrize("d", [1, 2, 5, 12, 33])
@pytest.mark.parametrize("quasi", [False, True], ids=["strict", "quasi"])
@pytest.mark.parametrize("with_scale", [False, True], ids=["", "scale"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_matches_dense_float64_with_all_gradients(d, quasi, with_scale, bias):
    x, weight, b, params, scale = make_case((3, 4), d, 7, quasi, with_scale, bias)
    inputs = (x, weight, b, params, scale)
    y, got = grads(goft.rotated_linear, inputs)

    def dense(x, weight, b, params, scale):
        return F.linear(x @ dense_transform(params, d, scale), weight, b)

    y_want, want = grads(dense, inputs)
    torch.testing.assert_close(y, y_want, rtol=1e-12, atol=1e-12)
    for name, t, g, w in zip(("x", "weight", "bias", "params", "scale"), inputs, got, want):
        if t is None:
            assert g is None and w is None, name
            continue
        # At d = 1 there are no parameters, and the dense reference leaves their grad unset.
        w = torch.zeros_like(t) if w is None else w
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("d", [1, 2, 5, 33])
@pytest.mark.parametrize("with_scale", [False, True], ids=["", "scale"])
def test_tanh_parameterisation_matches_dense_float64(d, with_scale):
    # Without a scale the backward takes the angle-gradient path (rotate_angle_grads), with one
    # the rotation backward: both map the gradient through pi * tanh.
    x, weight, b, params, scale = make_case((3, 4), d, 7, False, with_scale, True)
    inputs = (x, weight, b, params, scale)
    y, got = grads(lambda *a: goft.rotated_linear(*a, angle_parameterisation="tanh"), inputs)

    def dense(x, weight, b, params, scale):
        return F.linear(x @ dense_transform(torch.pi * torch.tanh(params), d, scale), weight, b)

    y_want, want = grads(dense, inputs)
    torch.testing.assert_close(y, y_want, rtol=1e-12, atol=1e-12)
    for name, t, g, w in zip(("x", "weight", "bias", "params", "scale"), inputs, got, want):
        if t is None:
            continue
        w = torch.zeros_like(t) if w is None else w
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


NAMES = ("x", "weight", "bias", "params", "scale")


# Subsets of the inputs that require grad; those naming the scale run only where there is one.
TRAINABLE = ["x params", "params", "x", "weight bias", "x bias scale", "params scale", "weight params",
             "x weight bias params scale"]


@pytest.mark.parametrize("trainable, with_scale", [(t, s) for t in TRAINABLE for s in (False, True)
                                                   if s or "scale" not in t.split()])
@pytest.mark.parametrize("quasi", [False, True], ids=["strict", "quasi"])
def test_gradients_reach_exactly_the_inputs_that_require_them(trainable, quasi, with_scale):
    """The autograd kernel numbers its tensor inputs (the optional bias and scale only when
    given): each subset of inputs that require grad gets the dense float64 gradients, the others
    none, as a frozen layer's weight and bias in GivensLinear."""
    x, weight, b, params, scale = make_case((5,), 9, 4, quasi, with_scale, True)
    inputs = (x, weight, b, params, scale)
    def leaf(name, t):
        return None if t is None else t.detach().clone().requires_grad_(name in trainable.split())

    leaves = [leaf(name, t) for name, t in zip(NAMES, inputs)]
    dense_leaves = [leaf(name, t) for name, t in zip(NAMES, inputs)]
    probe = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (goft.rotated_linear(*leaves) * probe).sum().backward()
    xd, wd, bd, pd, sd = dense_leaves
    (F.linear(xd @ dense_transform(pd, 9, sd), wd, bd) * probe).sum().backward()
    for name, got, want in zip(NAMES, leaves, dense_leaves):
        if got is None:
            continue
        if name in trainable.split():
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")
        else:
            assert got.grad is None, f"{name} does not require grad but got one"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quasi", [False, True], ids=["strict", "quasi"])
@pytest.mark.parametrize("with_scale", [False, True], ids=["", "scale"])
def test_matches_the_two_step_form(dtype, quasi, with_scale):
    # 256 rows, 64 outputs: the rows-heavy shape the op is for. The two forms round differently
    # (the rotated weight instead of the rotated input; without a scale, angles get their
    # gradients from grad_x), so the tolerance is the dtype's.
    x, weight, b, params, scale = make_case((256,), 96, 64, quasi, with_scale, True, dtype)
    y, got = grads(goft.rotated_linear, (x, weight, b, params, scale))
    y_want, want = grads(two_step, (x, weight, b, params, scale))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    scale_of = lambda t: t.double().abs().max().item()  # noqa: E731
    assert (y.double() - y_want.double()).abs().max().item() <= tol * scale_of(y_want)
    for name, g, w in zip(("x", "weight", "bias", "params", "scale"), got, want):
        if w is None:
            assert g is None, name
            continue
        err = (g.double() - w.double()).abs().max().item()
        assert err <= tol * scale_of(w), f"grad {name}: max error {err:.3g} vs scale {scale_of(w):.3g}"


def test_backward_saves_x_not_the_rotated_weight():
    x = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(16, 32)
    params = torch.zeros(31, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        goft.rotated_linear(x, weight, None, params)
    assert sum(t.numel() for t in saved) <= x.numel() + weight.numel() + params.numel()
    assert any(t is x or t.data_ptr() == x.data_ptr() for t in saved)


@pytest.mark.parametrize("quasi, with_scale", [(False, False), (True, False), (False, True)],
                         ids=["strict", "quasi", "scale"])
def test_backward_for_the_weight_alone_does_one_matmul(quasi, with_scale):
    """A frozen adapter on a trained layer (x, params and the scale without grad): backward
    computes grad_y^T x and rotates it, and no (rows x out x d) product for x's gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.name())
            return func(*args, **(kwargs or {}))

    x, weight, b, params, scale = make_case((64,), 32, 16, quasi, with_scale, True, torch.float32)
    weight.requires_grad_(True)
    y = goft.rotated_linear(x, weight, b, params, scale)
    with Calls() as calls:
        y.sum().backward()
    assert [op for op in calls.ops if op in ("aten::mm", "aten::matmul", "aten::bmm")] == ["aten::mm"], calls.ops
    assert weight.grad is not None

ERRORS = [
    ("weight width", lambda: goft.rotated_linear(torch.randn(2, 5), torch.randn(3, 4), None, torch.zeros(4)),
     r"expected weight of shape \(out, 5\)"),
    ("weight 1-d", lambda: goft.rotated_linear(torch.randn(2, 5), torch.randn(5), None, torch.zeros(4)),
     r"expected weight of shape \(out, 5\)"),
    ("weight dtype", lambda: goft.rotated_linear(torch.randn(2, 5), torch.randn(3, 5, dtype=torch.float64), None,
                                                 torch.zeros(4)), "expected weight of x's dtype"),
    ("bias length", lambda: goft.rotated_linear(torch.randn(2, 5), torch.randn(3, 5), torch.zeros(4), torch.zeros(4)),
     r"expected bias of shape \(3,\)"),
    ("bias dtype", lambda: goft.rotated_linear(torch.randn(2, 5), torch.randn(3, 5), torch.zeros(3, dtype=torch.float64),
                                               torch.zeros(4)), "expected bias of x's dtype Float, got Double"),
    ("weight None", lambda: goft.rotated_linear(torch.randn(2, 5), None, None, torch.zeros(4)),
     r"expected weight to be a tensor of shape \(out, d\), got None"),
    ("params length", lambda: goft.rotated_linear(torch.randn(2, 5), torch.randn(3, 5), None, torch.zeros(5)),
     r"expected params of shape \(4,\)"),
    ("unknown parameterisation", lambda: goft.rotated_linear(torch.randn(2, 5), torch.randn(3, 5), None, torch.zeros(4),
                                                             angle_parameterisation="Tanh"),
     'expected angle_parameterisation "raw" or "tanh", got "Tanh"'),
]


@pytest.mark.parametrize("name,call,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_name_the_argument(name, call, message):
    with pytest.raises(RuntimeError, match=message) as info:
        call()
    assert "goft.rotated_linear" in str(info.value)


@pytest.mark.parametrize("quasi", [False, True], ids=["strict", "quasi"])
def test_opcheck(quasi):
    x, weight, b, params, scale = make_case((3, 4), 11, 6, quasi, not quasi, True, torch.float32)
    for t in (x, weight, b, params) + ((scale,) if scale is not None else ()):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.goft.rotated_linear.default, (x, weight, b, params, scale))
    if not quasi:
        torch.library.opcheck(torch.ops.goft.rotated_linear.default, (x, weight, b, params, scale, "tanh"))


@pytest.mark.parametrize("with_scale", [False, True], ids=["", "scale"])
def test_torch_compile_fullgraph_with_backward(with_scale):
    torch._dynamo.reset()

    def f(x, weight, b, params, scale):
        return goft.rotated_linear(x, weight, b, params, scale).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, weight, b, params, scale = make_case((40,), 16, 8, False, with_scale, True, torch.float32)
    leaves = [t.requires_grad_(True) for t in (x, params, scale) if t is not None]
    got = torch.autograd.grad(compiled(x, weight, b, params, scale), leaves)
    want = torch.autograd.grad(f(x, weight, b, params, scale), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("quasi, with_scale", [(False, False), (True, False), (False, True)],
                         ids=["strict", "quasi", "scale"])
def test_under_autocast_computes_as_the_two_step_form(quasi, with_scale, compiled):
    """Under torch.autocast, linear(rotate(x), W, b) gives the autocast dtype and float32
    gradients; rotated_linear gives the same, eager and compiled, with values as close to the
    dense float64 reference as the two-step form's (both round x, W and y to bfloat16)."""
    torch._dynamo.reset()
    x, weight, b, params, scale = make_case((6, 5), 33, 24, quasi, with_scale, True, torch.float32)
    inputs = (x, weight, b, params, scale)
    op = torch.compile(goft.rotated_linear, fullgraph=True, backend="aot_eager") if compiled else goft.rotated_linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, got = grads(op, inputs)
        y_two_step, two_step_grads = grads(two_step, inputs)
    assert y.dtype == y_two_step.dtype == torch.bfloat16

    def dense(x, weight, b, params, scale):
        return F.linear(x @ dense_transform(params, 33, scale), weight, b)

    y_want, want = grads(dense, tuple(t.double() if t is not None else None for t in inputs))
    for name, g, g_two_step, w in zip(("y",) + NAMES, (y, *got), (y_two_step, *two_step_grads), (y_want, *want)):
        if w is None:
            continue
        assert g.dtype == g_two_step.dtype, name
        error, two_step_error = ((t.double() - w).norm() / w.norm() for t in (g, g_two_step))
        assert 1e-4 < two_step_error < 2e-2, name  # the bfloat16 rounding is there to compare with
        assert error <= 2 * two_step_error, f"{name}: relative error {error:.2e}, two-step form {two_step_error:.2e}"

@pytest.mark.parametrize("op", ["rotate", "rotated_linear"])
@pytest.mark.parametrize("quasi", [False, True], ids=["strict", "quasi"])
@pytest.mark.parametrize("with_scale", [False, True], ids=["", "scale"])
def test_second_derivatives_through_goft_gradients_raise(op, quasi, with_scale):
    # goft's gradient ops are differentiable once: a backward through the parameters' gradient
    # raises, where PyTorch's fallback would warn and pass zeros on.
    x, weight, b, params, scale = make_case((3,), 6, 2, quasi, with_scale, bias=True)
    x, params = x.requires_grad_(), params.requires_grad_()
    y = goft.rotate(x, params, scale) if op == "rotate" else goft.rotated_linear(x, weight, b, params, scale)
    grad_params, = torch.autograd.grad(y.pow(2).sum(), params, create_graph=True)
    with pytest.raises(RuntimeError, match=r"goft.rotate_(backward|angle_grads): second derivatives .* are not supported"):
        grad_params.sum().backward()


def test_second_derivative_through_the_rotated_weight_matches_dense_float64():
    # rotated_linear's grad_x is a matmul with the rotated weight, itself differentiable: its
    # derivative in the angles needs none of goft's gradient ops.
    x, weight, b, params, _ = make_case((4,), 7, 3, quasi=False, with_scale=False, bias=False)

    def second(fn):
        xs, ps = x.clone().requires_grad_(), params.clone().requires_grad_()
        grad_x, = torch.autograd.grad(fn(xs, ps).pow(2).sum(), xs, create_graph=True)
        return torch.autograd.grad((grad_x * torch.arange(7.0, dtype=torch.float64)).sum(), ps)[0]

    expected = second(lambda xs, ps: F.linear(xs @ dense_transform(ps, 7), weight))
    torch.testing.assert_close(second(lambda xs, ps: goft.rotated_linear(xs, weight, None, ps)), expected)
