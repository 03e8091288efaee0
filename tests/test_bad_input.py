"""Misuse of the op and the modules: a clear exception naming the argument or layer, or a correct result; never a crash."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import goft
from goft import GivensLinear
from goft.inject import goft_layers
from goft.reference import blocks_from_params, dense_transform, pair_schedule, rotate_ref

from tiny_models import build, perturb_adapters, tiny_gpt2


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# ---- the op: calls that must raise, and what the message must say ------------------------------
# (id, call, exception type, regex the message must match). Every message must name the op too.
OP_ERRORS = [
    # dtypes of x
    ("x int32", lambda: goft.rotate(torch.ones(3, 4, dtype=torch.int32), torch.zeros(3)), RuntimeError, r"x of dtype .* got Int"),
    ("x int64", lambda: goft.rotate(torch.ones(3, 4, dtype=torch.int64), torch.zeros(3)), RuntimeError, r"x of dtype .* got Long"),
    ("x uint8", lambda: goft.rotate(torch.ones(3, 4, dtype=torch.uint8), torch.zeros(3)), RuntimeError, r"x of dtype .* got Byte"),
    ("x bool", lambda: goft.rotate(torch.ones(3, 4, dtype=torch.bool), torch.zeros(3)), RuntimeError, r"x of dtype .* got Bool"),
    ("x complex64", lambda: goft.rotate(torch.ones(3, 4, dtype=torch.complex64), torch.zeros(3)), RuntimeError, r"x of dtype .* got ComplexFloat"),
    ("x complex128", lambda: goft.rotate(torch.ones(3, 4, dtype=torch.complex128), torch.zeros(3)), RuntimeError, r"x of dtype .* got ComplexDouble"),
    # dtypes of params and scale (float32/float64 only: low-precision angles lose training updates)
    ("params int64", lambda: goft.rotate(_rand(3, 4), torch.zeros(3, dtype=torch.int64)), RuntimeError, r"params of dtype float32 or float64, got Long"),
    ("params bool", lambda: goft.rotate(_rand(3, 4), torch.zeros(3, dtype=torch.bool)), RuntimeError, r"params of dtype float32 or float64, got Bool"),
    ("params complex", lambda: goft.rotate(_rand(3, 4), torch.zeros(3, dtype=torch.complex64)), RuntimeError, r"params of dtype float32 or float64, got ComplexFloat"),
    ("params bfloat16", lambda: goft.rotate(_rand(3, 4), torch.zeros(3, dtype=torch.bfloat16)), RuntimeError, r"params of dtype float32 or float64, got BFloat16"),
    ("params float16", lambda: goft.rotate(_rand(3, 4), torch.zeros(3, dtype=torch.float16)), RuntimeError, r"params of dtype float32 or float64, got Half"),
    ("scale int64", lambda: goft.rotate(_rand(3, 4), torch.zeros(3), torch.ones(4, dtype=torch.int64)), RuntimeError, r"scale of dtype float32 or float64, got Long"),
    ("scale complex", lambda: goft.rotate(_rand(3, 4), torch.zeros(3), torch.ones(4, dtype=torch.complex64)), RuntimeError, r"scale of dtype float32 or float64, got ComplexFloat"),
    ("scale float16", lambda: goft.rotate(_rand(3, 4), torch.zeros(3), torch.ones(4, dtype=torch.float16)), RuntimeError, r"scale of dtype float32 or float64, got Half"),
    # shapes that do not fit d
    ("params (d,)", lambda: goft.rotate(_rand(2, 768), torch.zeros(768)), RuntimeError, r"params of shape \(767,\) or \(767, 2, 2\) for d=768, got \(768,\)"),
    ("params (d-2,)", lambda: goft.rotate(_rand(2, 9), torch.zeros(7)), RuntimeError, r"params of shape \(8,\) or \(8, 2, 2\) for d=9, got \(7,\)"),
    ("params 0-d", lambda: goft.rotate(_rand(2, 4), torch.tensor(0.0)), RuntimeError, r"params of shape \(3,\) or \(3, 2, 2\) for d=4, got \(\)"),
    ("params (d-1, 1)", lambda: goft.rotate(_rand(2, 4), torch.zeros(3, 1)), RuntimeError, r"got \(3, 1\)"),
    ("params (d-1, 2)", lambda: goft.rotate(_rand(2, 4), torch.zeros(3, 2)), RuntimeError, r"got \(3, 2\)"),
    ("blocks (d-1, 2, 3)", lambda: goft.rotate(_rand(2, 4), torch.zeros(3, 2, 3)), RuntimeError, r"got \(3, 2, 3\)"),
    ("blocks (d-1, 3, 2)", lambda: goft.rotate(_rand(2, 4), torch.zeros(3, 3, 2)), RuntimeError, r"got \(3, 3, 2\)"),
    ("blocks (d, 2, 2)", lambda: goft.rotate(_rand(2, 4), torch.zeros(4, 2, 2)), RuntimeError, r"got \(4, 2, 2\)"),
    ("blocks 4-d", lambda: goft.rotate(_rand(2, 4), torch.zeros(3, 2, 2, 1)), RuntimeError, r"got \(3, 2, 2, 1\)"),
    ("params for d with empty rows", lambda: goft.rotate(_rand(0, 4), torch.zeros(5)), RuntimeError, r"for d=4, got \(5,\)"),
    ("params for d=1", lambda: goft.rotate(_rand(3, 1), torch.zeros(1)), RuntimeError, r"params of shape \(0,\) or \(0, 2, 2\) for d=1, got \(1,\)"),
    ("scale (d-1,)", lambda: goft.rotate(_rand(2, 5), torch.zeros(4), torch.ones(4)), RuntimeError, r"scale of shape \(5,\) for d=5, got \(4,\)"),
    ("scale (1, d)", lambda: goft.rotate(_rand(2, 5), torch.zeros(4), torch.ones(1, 5)), RuntimeError, r"scale of shape \(5,\) for d=5, got \(1, 5\)"),
    ("scale 0-d", lambda: goft.rotate(_rand(2, 5), torch.zeros(4), torch.tensor(1.0)), RuntimeError, r"scale of shape \(5,\) for d=5, got \(\)"),
    ("x 0-d", lambda: goft.rotate(torch.tensor(1.0), torch.zeros(0)), RuntimeError, r"x of shape \(\.\.\., d\) with at least one dimension"),
    ("x d=0", lambda: goft.rotate(_rand(3, 0), torch.zeros(0)), RuntimeError, r"d >= 1, got shape \(3, 0\)"),
    ("x (0, 0)", lambda: goft.rotate(_rand(0, 0), torch.zeros(0)), RuntimeError, r"d >= 1, got shape \(0, 0\)"),
    # devices ("meta" stands for any other device: the check is the same for cuda)
    ("params on meta", lambda: goft.rotate(_rand(2, 5), torch.zeros(4, device="meta")), RuntimeError, r"params on x's device cpu, got meta"),
    ("scale on meta", lambda: goft.rotate(_rand(2, 5), torch.zeros(4), torch.ones(5, device="meta")), RuntimeError, r"scale on x's device cpu, got meta"),
    ("x on meta", lambda: goft.rotate(_rand(2, 5).to("meta"), torch.zeros(4)), RuntimeError, r"params on x's device meta, got cpu"),
    # not tensors, or layouts the op has no kernel for
    ("x a list", lambda: goft.rotate([[1.0, 2.0]], torch.zeros(1)), RuntimeError, r"goft::rotate\(\) Expected a value of type 'Tensor' for argument 'x'"),
    ("x None", lambda: goft.rotate(None, torch.zeros(1)), RuntimeError, r"goft.rotate: .*\bx\b.*None"),
    ("params None", lambda: goft.rotate(_rand(2, 2), None), RuntimeError, r"goft.rotate: .*\bparams\b.*None"),
    ("x sparse", lambda: goft.rotate(_rand(2, 4).to_sparse(), torch.zeros(3)), NotImplementedError, r"goft::rotate.*SparseCPU"),
    # The composite ops run for sparse tensors too: their own checks name the argument.
    ("rotated_linear weight sparse", lambda: goft.rotated_linear(_rand(2, 5), _rand(3, 5).to_sparse(), None, torch.zeros(4)),
     RuntimeError, r"goft.rotated_linear: expected weight to be a dense \(strided\) tensor, got layout Sparse"),
    ("rotated_linear bias sparse", lambda: goft.rotated_linear(_rand(2, 5), _rand(3, 5), _rand(3).to_sparse(), torch.zeros(4)),
     RuntimeError, r"goft.rotated_linear: expected bias to be a dense \(strided\) tensor, got layout Sparse"),
    ("rotated_linear params sparse", lambda: goft.rotated_linear(_rand(2, 5), _rand(3, 5), None, torch.ones(4).to_sparse()),
     RuntimeError, r"goft.rotated_linear: expected params to be a dense \(strided\) tensor, got layout Sparse"),
    ("rotated_linear scale sparse",
     lambda: goft.rotated_linear(_rand(2, 5), _rand(3, 5), None, torch.zeros(4), torch.ones(5).to_sparse()),
     RuntimeError, r"goft.rotated_linear: expected scale to be a dense \(strided\) tensor, got layout Sparse"),
    ("rotate_angle_grads grad_x sparse",
     lambda: torch.ops.goft.rotate_angle_grads(_rand(2, 5), _rand(2, 5).to_sparse(), torch.randn(4)),
     RuntimeError, r"goft.rotate_angle_grads: expected grad_x to be a dense \(strided\) tensor, got layout Sparse"),
    # the backward op called directly
    (
        "rotate_backward grad_out shape",
        lambda: torch.ops.goft.rotate_backward(_rand(2, 4), _rand(3, 4), torch.zeros(3), None, False, [True, True, False]),
        RuntimeError,
        r"goft.rotate_backward: expected grad_out of x's shape \(3, 4\), got \(2, 4\)",
    ),
    (
        "rotate_backward grad_out dtype",
        lambda: torch.ops.goft.rotate_backward(_rand(3, 4, dtype=torch.float64), _rand(3, 4), torch.zeros(3), None, False, [True, True, False]),
        RuntimeError,
        r"goft.rotate_backward: expected grad_out of x's dtype Float, got Double",
    ),
    # rotate_angle_grads called directly
    ("rotate_angle_grads blocks", lambda: torch.ops.goft.rotate_angle_grads(_rand(2, 5), _rand(2, 5), torch.randn(4, 2, 2)),
     RuntimeError, r"goft.rotate_angle_grads: expected params of shape \(4,\) \(angles\): free 2x2 blocks \(qGOFT\)"),
    ("rotate_angle_grads params length", lambda: torch.ops.goft.rotate_angle_grads(_rand(2, 5), _rand(2, 5), torch.randn(5)),
     RuntimeError, r"goft.rotate_angle_grads: expected params of shape \(4,\) or \(4, 2, 2\)"),
    ("rotate_angle_grads grad_x shape", lambda: torch.ops.goft.rotate_angle_grads(_rand(2, 5), _rand(3, 5), torch.randn(4)),
     RuntimeError, r"goft.rotate_angle_grads: expected grad_x of x's shape \(2, 5\), got \(3, 5\)"),
    ("rotate_angle_grads grad_x dtype",
     lambda: torch.ops.goft.rotate_angle_grads(_rand(2, 5), _rand(2, 5, dtype=torch.float64), torch.randn(4)),
     RuntimeError, r"goft.rotate_angle_grads: expected grad_x of x's dtype Float, got Double"),
    ("rotate_angle_grads grad_x None", lambda: torch.ops.goft.rotate_angle_grads(_rand(2, 5), None, torch.randn(4)),
     RuntimeError, r"goft.rotate_angle_grads: expected grad_x to be a tensor of x's shape \(2, 5\), got None"),
    ("rotate_angle_grads x dtype",
     lambda: torch.ops.goft.rotate_angle_grads(torch.zeros(2, 5, dtype=torch.int32), torch.zeros(2, 5, dtype=torch.int32),
                                               torch.randn(4)),
     RuntimeError, r"goft.rotate_angle_grads: expected x of dtype float32, float64, bfloat16 or float16"),
]


def _op_cases():
    for name, call, error, message in OP_ERRORS:
        yield pytest.param(call, error, message, id=name)


@pytest.mark.parametrize("call,error,message", _op_cases())
def test_op_misuse_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    assert "goft" in str(info.value)


# Cases whose inputs fake tensors cannot stand for: sparse tensors (FakeTensorMode fakes strided layouts).
UNTRACED = {"x sparse", "rotated_linear weight sparse", "rotated_linear bias sparse", "rotated_linear params sparse",
            "rotated_linear scale sparse", "rotate_angle_grads grad_x sparse"}


def _traced_cases():
    from test_ops import ERRORS as ROTATE_ERRORS
    from test_rotated_linear import ERRORS as LINEAR_ERRORS

    for name, call, error, message in OP_ERRORS:
        if name not in UNTRACED:
            yield pytest.param(call, error, message, id=name)
    for name, call, message in ROTATE_ERRORS + LINEAR_ERRORS:
        yield pytest.param(call, RuntimeError, message, id=name)


@pytest.mark.parametrize("call,error,message", _traced_cases())
def test_fake_kernels_refuse_what_the_kernels_refuse(call, error, message):
    # torch.compile traces with fake tensors, which reach the Python fake kernels (goft/ops.py)
    # instead of the C++ checks: the same error, with the same message, must come from both.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(error, match=message) as info, FakeTensorMode():
        call()
    assert "goft" in str(info.value)


def test_op_misuse_never_crashes_the_process():
    # The same table in a fresh interpreter: a segfault or abort there fails this test instead of
    # killing pytest, and the timeout turns a hang into a failure.
    script = textwrap.dedent(
        """
        import test_bad_input as t
        for name, call, error, _ in t.OP_ERRORS:
            try:
                call()
            except Exception as e:
                assert isinstance(e, error), (name, e)
                print("raised:", name)
            else:
                raise SystemExit(f"no error for {name}")
        print("done")
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=os.path.dirname(__file__), env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("raised:") == len(OP_ERRORS) and done.stdout.rstrip().endswith("done")


# ---- the op: unusual inputs that must give the right answer -----------------------------------


def _close(actual, expected, dtype=torch.float32):
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


VIEWS = {
    "transposed": lambda d: _rand(d, 6).T,  # (6, d), feature stride 6
    "feature stride 2": lambda d: _rand(5, 2 * d)[:, ::2],
    "row stride 3d": lambda d: _rand(5, 3 * d)[:, :d],
    "expanded rows": lambda d: _rand(1, d).expand(7, d),
    "expanded 3-d rows": lambda d: _rand(1, 1, d).expand(2, 3, d),
    "expanded features": lambda d: _rand(4, 1).expand(4, d),  # stride 0 along d
    "permuted leading": lambda d: _rand(3, 4, d).permute(1, 0, 2),
    "flipped": lambda d: _rand(4, d).flip(-1),
    "channels-last 4-d": lambda d: _rand(2, d, 3, 2).permute(0, 2, 3, 1),
    "single row 1-d": lambda d: _rand(d),
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("d", [1, 7, 33, 200])
def test_non_contiguous_and_expanded_x(view, d):
    x = VIEWS[view](d)
    params = torch.randn(d - 1)
    scale = torch.rand(d) + 0.5
    for transpose in (False, True):
        y = goft.rotate(x, params, scale, transpose)
        assert y.shape == x.shape
        _close(y, rotate_ref(x, params, scale, transpose))
    # The backward reads the saved x (for the angle gradients) through the same strides.
    pg = params.clone().requires_grad_()
    sg = scale.clone().requires_grad_()
    grad = torch.randn(x.shape)
    got = torch.autograd.grad(goft.rotate(x, pg, sg), [pg, sg], grad)
    want = torch.autograd.grad(rotate_ref(x, pg, sg), [pg, sg], grad.double(), allow_unused=True)
    for g, w, t in zip(got, want, (pg, sg)):
        _close(g, torch.zeros_like(t) if w is None else w)  # d = 1: no angles, nothing to differentiate


@pytest.mark.parametrize("quasi", [False, True])
def test_non_contiguous_and_expanded_params_and_scale(quasi):
    d = 45
    x = _rand(6, d)
    if quasi:
        dense = torch.eye(2) + 0.3 * torch.randn(d - 1, 2, 2)
        params_views = [dense.transpose(1, 2).contiguous().transpose(1, 2), torch.eye(2).expand(d - 1, 2, 2)]
    else:
        params_views = [torch.randn(2 * (d - 1))[::2], torch.tensor(0.3).expand(d - 1)]
    scale_views = [None, (torch.rand(3 * d) + 0.5)[::3], torch.tensor(1.5).expand(d)]
    for params in params_views:
        for scale in scale_views:
            assert not params.is_contiguous() or params.stride(0) == 0
            _close(goft.rotate(x, params, scale), rotate_ref(x, params, scale))


def test_params_and_scale_in_float64_with_float32_x_and_the_reverse():
    d = 40
    x32, p64, s64 = _rand(5, d), torch.randn(d - 1, dtype=torch.float64), torch.rand(d, dtype=torch.float64) + 0.5
    y = goft.rotate(x32, p64, s64)
    assert y.dtype == torch.float32
    _close(y, rotate_ref(x32, p64, s64))
    y = goft.rotate(x32.double(), p64.float(), s64.float())
    assert y.dtype == torch.float64
    _close(y, rotate_ref(x32.double(), p64.float(), s64.float()), torch.float64)


@pytest.mark.parametrize("shape", [(0, 7), (0, 3, 7), (4, 0, 7), (0, 1)])
@pytest.mark.parametrize("with_scale", [False, True])
def test_empty_inputs(shape, with_scale):
    d = shape[-1]
    x = torch.randn(shape, requires_grad=True)
    params = torch.randn(d - 1, requires_grad=True)
    scale = torch.rand(d).requires_grad_() if with_scale else None
    y = goft.rotate(x, params, scale)
    assert y.shape == shape
    inputs = [x, params] + ([scale] if with_scale else [])
    grads = torch.autograd.grad(y.sum(), inputs)
    assert grads[0].shape == shape
    assert torch.equal(grads[1], torch.zeros(d - 1))  # no rows: zero gradient, not garbage
    if with_scale:
        assert torch.equal(grads[2], torch.zeros(d))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_d_equal_one(dtype):
    x = torch.randn(6, 1).to(dtype)
    assert torch.equal(goft.rotate(x, torch.zeros(0)), x)
    assert torch.equal(goft.rotate(x, torch.zeros(0, 2, 2), transpose=True), x)
    scale = torch.tensor([-1.5])
    _close(goft.rotate(x.float(), torch.zeros(0), scale), x.float() * -1.5)
    xg = x.float().requires_grad_()
    sg = scale.clone().requires_grad_()
    gx, gs = torch.autograd.grad(goft.rotate(xg, torch.zeros(0), sg).sum(), [xg, sg])
    _close(gx, torch.full((6, 1), -1.5))
    _close(gs, xg.detach().sum(0))


def _dependency(d: int) -> torch.Tensor:
    """(d, d) bool: output feature j of a row depends on input feature i (T[i, j] != 0 for generic angles)."""
    return dense_transform(torch.rand(d - 1, dtype=torch.float64) + 0.1, d) != 0


@pytest.mark.parametrize("d", [4, 17, 64, 100])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_x_propagates_within_its_row_only(d, bad):
    x = torch.randn(9, d)
    row, feature = 4, d // 3
    x[row, feature] = bad
    params = torch.rand(d - 1) + 0.1
    y = goft.rotate(x, params)
    clean = [r for r in range(9) if r != row]
    assert torch.equal(y[clean], goft.rotate(x[clean], params)), "a non-finite value leaked into other rows"
    # Every output the bad feature feeds is non-finite (IEEE: inf * 0 and nan * anything are nan).
    assert not y[row][_dependency(d)[feature]].isfinite().any()
    # Gradients to x do not depend on x; those to the angles become NaN only through that row.
    xg, pg = x.clone().requires_grad_(), params.clone().requires_grad_()
    gx, gp = torch.autograd.grad(goft.rotate(xg, pg).sum(), [xg, pg])
    assert gx.isfinite().all()
    assert not gp.isfinite().all()


@pytest.mark.parametrize("quasi", [False, True])
def test_non_finite_params_and_scale_give_nan_not_an_error(quasi):
    d = 33
    x = torch.randn(5, d)
    params = torch.eye(2).repeat(d - 1, 1, 1) if quasi else torch.rand(d - 1)
    params[3] = float("nan")
    y = goft.rotate(x, params)
    assert y.isnan().any()
    a, b = pair_schedule(d)[0][3]
    assert y[:, [a, b]].isnan().all()  # the pair the NaN block acts on
    params[3] = 0.5 if not quasi else torch.eye(2)
    scale = torch.ones(d)
    scale[7] = float("inf")
    y = goft.rotate(x, params, scale)
    assert (~y[:, 7].isfinite()).all()
    pg = params.clone().requires_grad_()
    sg = scale.clone().requires_grad_()
    grads = torch.autograd.grad(goft.rotate(x, pg, sg).sum(), [pg, sg])
    assert all(g.shape == t.shape for g, t in zip(grads, (pg, sg)))


def _layerwise_ref(x: torch.Tensor, params: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """GOFT_SPEC.md section 3 one float64 layer at a time (cheap for any d): x @ T or x @ T^T."""
    blocks = blocks_from_params(params.double())
    u = x.double().clone()
    layers, start = [], 0
    for pairs in pair_schedule(x.shape[-1]):
        idx = torch.tensor(pairs).reshape(-1, 2)
        layers.append((idx[:, 0], idx[:, 1], blocks[start : start + len(pairs)]))
        start += len(pairs)
    for a, b, A in layers if transpose else reversed(layers):
        if transpose:
            A = A.transpose(1, 2)
        ua, ub = u[:, a], u[:, b]
        u[:, a], u[:, b] = A[:, 0, 0] * ua + A[:, 1, 0] * ub, A[:, 0, 1] * ua + A[:, 1, 1] * ub
    return u


@pytest.mark.parametrize("d", [65536, 65537])
def test_enormous_d(d):
    x = torch.randn(3, d)
    angles = torch.randn(d - 1)
    y = goft.rotate(x, angles)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(goft.rotate(y, angles, transpose=True), x, rtol=0, atol=1e-4)
    _close(y, _layerwise_ref(x, angles))
    blocks = torch.eye(2) + 0.2 * torch.randn(d - 1, 2, 2)
    _close(goft.rotate(x, blocks, transpose=True), _layerwise_ref(x, blocks, transpose=True))
    # d/dx ||x T||^2 = 2 x for an orthogonal T, and rotating does not change the norm: d/dangles = 0.
    xg, ag = x.clone().requires_grad_(), angles.clone().requires_grad_()
    gx, ga = torch.autograd.grad(goft.rotate(xg, ag).square().sum(), [xg, ag])
    torch.testing.assert_close(gx, 2 * x, rtol=0, atol=1e-4)
    assert ga.abs().max() < 1e-3


# ---- the modules --------------------------------------------------------------------------------


class _Zoo(nn.Module):
    """One module of each kind a target_modules entry could name by mistake, plus a linear."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.embedding = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 1)
        self.bilinear = nn.Bilinear(8, 8, 8)
        self.attention = nn.MultiheadAttention(8, 2)
        self.lazy = nn.LazyLinear(8)
        self.identity = nn.Identity()

    def forward(self, x):
        return self.norm(self.linear(x))


NOT_LINEAR = ["norm", "embedding", "conv", "bilinear", "attention", "identity"]


@pytest.mark.parametrize("target", NOT_LINEAR + ["lazy"])
def test_inject_refuses_a_layer_that_is_not_linear_and_changes_nothing(target):
    model = _Zoo()
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=rf"not linear layers: \[{target} \({type(getattr(model, target)).__name__}"):
        goft.inject(model, target_modules=["linear", target])
    assert [type(m) for m in model.modules()] == types and goft.adapter_configs(model) == {}
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("lazy"))


def test_inject_refuses_an_uninitialised_lazy_layer_with_the_fix():
    with pytest.raises(ValueError, match="LazyLinear whose weight is not initialised yet; run one forward pass first"):
        goft.inject(_Zoo(), target_modules=["lazy"])
    model = _Zoo()
    model.lazy(torch.randn(2, 5))  # now (8, 5)
    goft.inject(model, target_modules=["lazy"])
    assert model.lazy.in_features == 5


def test_inject_twice():
    model = build("bert")
    goft.inject(model)
    with pytest.raises(ValueError, match="adapter 'default' is already injected into this model"):
        goft.inject(model)
    with pytest.raises(ValueError, match="adapter_name a non-empty string without '.'"):
        goft.inject(model, adapter_name="a.b")
    goft.inject(model, adapter_name="second", target_modules=["query"])  # another name: a second adapter
    layer = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, GivensLinear) and isinstance(layer.base_layer, nn.Linear)
    assert layer.adapter_names == ["default", "second"] and goft.active_adapter(model) == "second"


def _one_layer(d=8, **overrides):
    model = nn.Sequential(nn.Linear(d, 4))
    goft.inject(model, target_modules=["0"], **overrides)
    return model


MODULE_CALL_ERRORS = [
    ("input of the wrong width", lambda m: m(torch.randn(2, 6)), r"goft: layer 0 \(GivensLinear, in_features=8, adapter 'default'\): expected input of shape \(\.\.\., 8\), got \(2, 6\)"),
    ("0-d input", lambda m: m(torch.tensor(1.0)), r"layer 0 .* expected input of shape \(\.\.\., 8\), got \(\)"),
    ("integer input", lambda m: m(torch.ones(2, 8, dtype=torch.long)), r"layer 0 .* expected a floating-point input, got torch.int64"),
    ("complex input", lambda m: m(torch.ones(2, 8, dtype=torch.complex64)), r"layer 0 .* expected a floating-point input, got torch.complex64"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in MODULE_CALL_ERRORS], ids=[c[0] for c in MODULE_CALL_ERRORS])
def test_adapted_layer_names_itself_in_input_errors(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(_one_layer())


def test_adapter_parameters_on_the_meta_device():
    # As accelerate's offloading leaves them (test below): the layer says so, naming itself.
    message = r"goft: layer 0 .*: the adapter's parameters are on the meta device and hold no values: offloaded"
    model = _one_layer()
    model[0].goft_angles["default"] = nn.Parameter(torch.zeros(7, device="meta"))
    with pytest.raises(RuntimeError, match=message):
        model(torch.randn(2, 8))
    model = _one_layer(scale=True)
    model[0].goft_scale["default"] = nn.Parameter(torch.ones(8, device="meta"))
    with pytest.raises(RuntimeError, match=message):
        model(torch.randn(2, 8))


def test_a_model_offloaded_by_accelerate_is_refused_not_silently_merged():
    # accelerate's cpu_offload keeps every weight on the meta device and loads it for each
    # forward: a merge would have rotated nothing in memory, and the model would then have run
    # its base weights with the adapter marked merged, i.e. without it.
    accelerate = pytest.importorskip("accelerate")
    from tiny_models import tiny_llama

    model = tiny_llama()
    goft.inject(model)
    perturb_adapters(model, 0.3)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"goft.merge: the weight of layer model.layers.0.self_attn.q_proj is on the meta device: offloaded"):
        goft.merge(model)
    assert not any(layer.merged_adapters for layer in model.modules() if isinstance(layer, GivensLinear))
    with pytest.raises(RuntimeError, match=r"layer model.layers.0.self_attn.q_proj .*meta device and hold no values"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))


def test_d_equal_one_layer_trains_merges_and_unmerges():
    torch.manual_seed(0)
    model = _one_layer(d=1, scale=True)
    x = torch.randn(5, 1)
    with torch.no_grad():
        model[0].goft_scale["default"].fill_(3.0)
    y = model(x)
    torch.testing.assert_close(y, model[0].base_layer(3 * x))
    y.sum().backward()
    assert model[0].goft_scale["default"].grad is not None and model[0].goft_angles["default"].numel() == 0
    weight = model[0].weight.clone()
    goft.merge(model)
    torch.testing.assert_close(model(x), y.detach())
    goft.unmerge(model)
    torch.testing.assert_close(model[0].weight, weight)


def test_nan_input_to_a_model_propagates_and_does_not_abort():
    model = build("llama")
    goft.inject(model)
    perturb_adapters(model, 0.1)
    ids = torch.randint(0, 100, (3, 6))
    embeds = model.get_input_embeddings()(ids).detach()
    embeds[1, 2, 5] = float("nan")
    with torch.no_grad():
        logits = model(inputs_embeds=embeds).logits
        with goft.disable_adapters(model):
            base = model(inputs_embeds=embeds).logits
    assert logits[1].isnan().any() and logits[0].isfinite().all() and logits[2].isfinite().all()
    # Where the NaN reaches is the base model's business (attention spreads it); goft adds none.
    assert torch.equal(logits.isnan(), base.isnan())


def test_merge_refuses_non_finite_adapters_and_changes_nothing():
    model = _one_layer(scale=True)
    weight = model[0].weight.clone()
    for store, value in (("goft_angles", float("nan")), ("goft_scale", float("inf"))):
        with torch.no_grad():
            getattr(model[0], store)["default"][2] = value
        for merge in (goft.merge, goft.merge_and_unload):
            with pytest.raises(ValueError, match=r"adapter 'default' of layer 0 has NaN or infinite"):
                merge(model)
            assert torch.equal(model[0].weight, weight) and model[0].merged_adapters == []
        with torch.no_grad():
            getattr(model[0], store)["default"][2] = 0.5


class _TiedLanguageModel(nn.Module):
    """A plain module whose output head shares the input embedding's weight, as GPT-2's does: one
    Parameter, or (``by_data``, as older code ties them) two Parameters over the same memory."""

    def __init__(self, vocab=50, width=16, by_data=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.block = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        if by_data:
            self.head.weight.data = self.embed.weight.data
        else:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.block(self.embed(ids))))


@pytest.mark.parametrize("by_data", [False, True], ids=["one-parameter", "same-memory"])
def test_merge_refuses_a_tied_weight(by_data):
    # Merging a rotation into a head that shares the input embedding would rotate the embedding too.
    torch.manual_seed(0)
    model = _TiedLanguageModel(by_data=by_data)
    assert (model.head.weight is model.embed.weight) != by_data
    goft.inject(model, target_modules=["block", "head"])
    perturb_adapters(model, 0.3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (goft.merge, goft.merge_and_unload):
        with pytest.raises(ValueError, match=rf"goft.{merge.__name__}: the weight of layer head is shared with "
                                             r"\['embed.weight'\] \(tied weights\)"):
            merge(model)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # block not merged either
        assert all(not layer.merged_adapters for layer in model.modules() if isinstance(layer, GivensLinear))


def test_a_tied_head_of_a_transformers_model_is_refused_with_the_way_to_untie_it(tmp_path):
    # transformers re-ties and saves tied weights by their plain names, which the wrapper moves:
    # save_pretrained (every Trainer checkpoint) and tie_weights would fail after injection.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = tiny_gpt2().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    untie = r"model.config.tie_word_embeddings = False; model.lm_head.weight = torch.nn.Parameter\(model.lm_head.weight"
    with pytest.raises(ValueError, match=r"goft.inject: layer lm_head shares its weight with \['transformer.wte.weight'\] "
                                         r"\(tied weights.*" + untie):
        goft.inject(model, target_modules=["c_attn", "lm_head"])
    assert not goft.adapter_configs(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # An adapter on the head saved from an untied copy is refused by the tied model in the same words.
    untied = tiny_gpt2().eval()
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    goft.inject(untied, target_modules=["c_attn", "lm_head"])
    goft.save_adapter(untied, str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=r"goft.load_adapter\(.*\): layer lm_head shares its weight .*" + untie):
        goft.load_adapter(model, str(tmp_path / "adapter"))
    # The way out the message gives works: the untied model saves whole, and merges.
    perturb_adapters(untied, 0.3)
    untied.save_pretrained(str(tmp_path / "injected"))
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        adapted = untied(ids).logits
        goft.merge(untied)
        assert torch.allclose(untied(ids).logits, adapted, atol=1e-5)


class _Int8Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 8, 8
        self.weight = nn.Parameter(torch.ones(8, 8, dtype=torch.int8), requires_grad=False)

    def forward(self, x):
        return x @ self.weight.to(x.dtype).T


def test_merge_is_all_or_nothing():
    model = nn.Sequential(nn.Linear(8, 8), _Int8Linear())
    goft.inject(model, target_modules=["0", "1"])
    perturb_adapters(model, 0.3)
    x = torch.randn(3, 8)
    expected = model(x)
    weight = model[0].weight.clone()
    for merge in (goft.merge, goft.merge_and_unload):
        with pytest.raises(NotImplementedError, match=f"goft.{merge.__name__}: cannot merge into _Int8Linear"):
            merge(model)
        assert torch.equal(model[0].weight, weight) and model[0].merged_adapters == []
        assert isinstance(model[0], GivensLinear)
    torch.testing.assert_close(model(x), expected)



def test_a_flat_fsdp1_shard_of_an_integer_weight_is_refused_as_sharded_not_quantized():
    # FSDP1's flat shard of a quantized layer's packed weight: the error says what to do about the
    # sharding (merge unsharded), which the quantized refusal's recipe does not.
    model = nn.Sequential(nn.Linear(8, 8))
    goft.inject(model, target_modules=["0"])
    flat = nn.Parameter(torch.zeros(32, dtype=torch.int8), requires_grad=False)
    flat._fsdp_flattened = True
    model[0].base_layer.weight = flat
    with pytest.raises(ValueError, match=r"cannot merge into Linear: expected a floating \(out, in\) weight with "
                                         r"in=8, got torch.int8 \(32,\): FullyShardedDataParallel \(FSDP1\) .*"
                                         r"merge a plain model"):
        goft.merge(model)
    assert model[0].merged_adapters == []

def _set_block(model, value):
    model[0].goft_blocks["default"][1] = torch.tensor(value)


def _set_scale(model, value):
    model[0].goft_scale["default"][2] = value


@pytest.mark.parametrize("variant, edit, value, message", [
    ({"variant": "qgoft"}, _set_block, [[1.0, 2.0], [2.0, 4.0]], r"a singular or nearly singular 2x2 block \(block 1: determinant 0\)"),
    ({"variant": "qgoft"}, _set_block, [[1.0, 0.0], [0.0, 1e-6]], r"a singular or nearly singular 2x2 block \(block 1: determinant 1e-06\)"),
    ({"scale": True}, _set_scale, 0.0, r"scale entries from 0 to 1 in magnitude"),
    ({"scale": True}, _set_scale, 1e-39, r"scale entries from 1e-39 to 1 in magnitude"),  # 1/scale overflows float32
    ({"scale": True}, _set_scale, 1e-5, r"scale entries from 1e-05 to 1 in magnitude \(condition above 10000"),
], ids=["singular block", "nearly singular block", "zero scale", "tiny scale", "scales 1e5 apart"])
def test_merge_refuses_what_unmerge_could_not_undo_but_merge_and_unload_allows_it(variant, edit, value, message):
    # Unmerging would fill the weight with inf/NaN, or give it back off by the rounding errors
    # times the condition number (a block of determinant 1e-6: 1.3% in float32).
    model = _one_layer(**variant)
    with torch.no_grad():
        edit(model, value)
    x = torch.randn(3, 8)
    expected = model(x)
    weight = model[0].weight.clone()
    with pytest.raises(ValueError, match=r"goft.merge: adapter 'default' of layer 0 has " + message +
                                         r".*so goft.unmerge could not restore the weight; goft.merge_and_unload"):
        goft.merge(model)
    assert torch.equal(model[0].weight, weight) and model[0].merged_adapters == []
    plain = goft.merge_and_unload(model)
    if value:  # a zero scale entry merges for good too, as a zero column
        torch.testing.assert_close(plain(x), expected)


class _Shared(nn.Module):
    """One nn.Linear registered under two names, applied twice."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = self.first

    def forward(self, x):
        return self.second(self.first(x))


@pytest.mark.parametrize("target", ["first", "second"])
def test_a_layer_registered_under_two_names_is_adapted_on_both_paths(target):
    model = _Shared()
    x = torch.randn(4, 6)
    base = model(x)
    goft.inject(model, target_modules=[target])
    assert model.first is model.second and isinstance(model.first, GivensLinear)
    perturb_adapters(model, 0.5)
    adapted = model(x)
    params, _ = model.first.transform("default")
    layer = model.first.base_layer
    torch.testing.assert_close(adapted, layer(goft.rotate(layer(goft.rotate(x, params)), params)))
    assert not torch.allclose(adapted, base)
    assert goft.count_parameters(model)[0] == 5
    goft.unload(model)
    assert type(model.first) is nn.Linear and model.first is model.second
    torch.testing.assert_close(model(x), base)


def test_loading_into_the_wrong_model(tmp_path):
    model = _one_layer()
    goft.save_adapter(model, str(tmp_path))
    cases = [
        (nn.Sequential(nn.Linear(16, 4)), "layer 0 has input width 16, the adapter expects 8"),
        (nn.Sequential(nn.LayerNorm(8)), "target layer 0 is a LayerNorm, not a linear layer"),
        (nn.Sequential(nn.Embedding(8, 8)), "target layer 0 is a Embedding, not a linear layer"),
        (nn.Sequential(nn.LazyLinear(8)), "target layer 0 is a LazyLinear, not a linear layer"),
        (nn.Sequential(), "target layer 0 is missing in Sequential"),
        (build("bert"), "adapter saved for model_type=None, model is model_type='bert'"),
    ]
    for other, message in cases:
        state = {k: v.clone() for k, v in other.state_dict().items() if not isinstance(v, nn.parameter.UninitializedParameter)}
        with pytest.raises(ValueError, match=message):
            goft.load_adapter(other, str(tmp_path))
        assert goft.adapter_configs(other) == {} and not any(isinstance(m, GivensLinear) for m in other.modules())
        assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())


def test_add_adapter_errors_name_add_adapter():
    model = _one_layer()
    for call in (lambda: goft.add_adapter(model, "a", target_modules=["nope"]),
                 lambda: goft.add_adapter(model, "a.b", target_modules=["0"])):
        with pytest.raises(ValueError, match=r"^goft\.add_adapter: "):
            call()
    with pytest.raises(TypeError, match=r"^goft\.add_adapter: expected config a GOFTConfig or None, got str"):
        goft.add_adapter(model, "a", "qgoft")
    with pytest.raises(ValueError, match=r"^goft\.inject: target_modules=\['nope'\] matched no layer"):
        goft.inject(model, adapter_name="b", target_modules=["nope"])



def test_saving_under_a_folder_that_is_not_writable_is_refused_first(tmp_path, monkeypatch):
    # The tests run as root, for whom every folder is writable (chmod cannot stand in): the
    # answer os.access gives for one folder is faked.
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *args, **kwargs: (
        False if os.fspath(path) == str(locked) and mode & os.W_OK else access(path, mode, *args, **kwargs)))
    with pytest.raises(ValueError, match=r"goft.save_adapter: path .*locked/run/adapter' cannot be a folder: "
                                         r".*locked' is not writable"):
        goft.save_adapter(_one_layer(), str(locked / "run" / "adapter"))
    assert os.listdir(locked) == []

def test_saving_into_a_file_path_or_from_a_meta_model(tmp_path):
    model = _one_layer()
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(NotADirectoryError, match="goft.save_adapter: .*file' exists and is not a directory"):
        goft.save_adapter(model, str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "keep me"
    os.symlink(tmp_path / "moved-away", tmp_path / "link")
    with pytest.raises(FileNotFoundError, match=r"goft.save_adapter: .*link' is a symbolic link to .*moved-away', "
                                                r"which does not exist"):
        goft.save_adapter(model, str(tmp_path / "link"))
    # Found before anything is gathered or written (on a sharded model, every rank gathers first).
    with pytest.raises(ValueError, match=r"goft.save_adapter: path .*file/adapter' cannot be a folder: .*file' is a file"):
        goft.save_adapter(model, str(tmp_path / "file" / "adapter"))
    with torch.device("meta"):
        meta = _one_layer()
    with pytest.raises(ValueError, match=r"goft.save_adapter: 0.goft_angles is on the meta device"):
        goft.save_adapter(meta, str(tmp_path / "meta"))
    assert not (tmp_path / "meta").exists() or os.listdir(tmp_path / "meta") == []


def _plain():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _no_active_adapter():
    model = _one_layer()
    goft.set_adapter(model, None)
    return model


# (id, call taking a tmp folder, exception type, regex the message must match): arguments of the
# wrong type are named, with what was expected, before anything is touched.
WRONG_TYPES = [
    ("config a variant string", lambda t: goft.inject(_plain(), "qgoft", target_modules=["0"]), TypeError,
     r"goft.inject: expected config a GOFTConfig or None, got str 'qgoft'; to choose the variant, pass variant='qgoft'"),
    ("config a dict", lambda t: goft.inject(_plain(), {"variant": "qgoft"}, target_modules=["0"]), TypeError,
     r"goft.inject: expected config a GOFTConfig or None, got dict .*; pass GOFTConfig\(\*\*config\)"),
    ("adapter_name a list", lambda t: goft.inject(_plain(), None, ["a"], target_modules=["0"]), TypeError,
     r"goft.inject: expected adapter_name a string, got list \['a'\]"),
    ("model None", lambda t: goft.inject(None, target_modules=["0"]), TypeError,
     r"goft.inject: expected model an nn.Module, got None"),
    ("model a string", lambda t: goft.merge("model"), TypeError, r"goft.merge: expected model an nn.Module, got str"),
    ("count of a string", lambda t: goft.count_parameters("x"), TypeError, r"goft.count_parameters: expected model"),
    ("set_adapter of an int", lambda t: goft.set_adapter(_one_layer(), 1), TypeError,
     r"goft.set_adapter: expected adapter_name a string, got int 1"),
    ("delete_adapter of a list", lambda t: goft.delete_adapter(_one_layer(), ["default"]), TypeError,
     r"goft.delete_adapter: expected adapter_name a string, got list"),
    ("save into ''", lambda t: goft.save_adapter(_one_layer(), ""), ValueError,
     r"goft.save_adapter: expected path a non-empty directory path, got ''"),
    ("save into None", lambda t: goft.save_adapter(_one_layer(), None), TypeError,
     r"goft.save_adapter: expected path a directory path \(str or os.PathLike\), got NoneType"),
    ("save under an int name", lambda t: goft.save_adapter(_one_layer(), str(t), 0), TypeError,
     r"goft.save_adapter: expected adapter_name a string, got int 0"),
    ("save with no active adapter", lambda t: goft.save_adapter(_no_active_adapter(), str(t)), ValueError,
     r"goft.save_adapter: no active adapter to save; pass adapter_name \(one of \['default'\]\) or goft.set_adapter"),
    ("load from None", lambda t: goft.load_adapter(_plain(), None), TypeError,
     r"goft.load_adapter: expected path a directory path"),
    ("load under an int name", lambda t: goft.load_adapter(_plain(), str(t), 1), TypeError,
     r"goft.load_adapter: expected adapter_name a string, got int 1"),
    ("adapter_name an attribute of ParameterDict", lambda t: goft.inject(_plain(), adapter_name="train", target_modules=["0"]),
     ValueError, r"goft.inject: adapter_name 'train' is the name of an attribute of torch's nn.ParameterDict"),
    ("orth_lambda beyond float", lambda t: goft.inject(_plain(), orth_lambda=10**400, target_modules=["0"]), ValueError,
     r"GOFTConfig.orth_lambda: expected a finite number >= 0"),
    ("wrap None", lambda t: GivensLinear(None), TypeError, r"goft: cannot adapt NoneType"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in WRONG_TYPES], ids=[c[0] for c in WRONG_TYPES])
def test_arguments_of_the_wrong_type_are_named(tmp_path, call, error, message):
    with pytest.raises(error, match=message):
        call(tmp_path)
    assert os.listdir(tmp_path) == []  # nothing written


def test_a_path_like_folder_saves_and_loads(tmp_path):
    model = _one_layer()
    perturb_adapters(model, 0.3)
    goft.save_adapter(model, tmp_path / "adapter")
    other = goft.load_adapter(nn.Sequential(nn.Linear(8, 4)), tmp_path / "adapter")
    assert torch.equal(other[0].goft_angles["default"], model[0].goft_angles["default"])


class _InOutLinear(nn.Module):
    """A linear layer of its own that keeps its weight as (in, out): goft cannot know the layout."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)

    def forward(self, x):
        return x @ self.weight


class _DecoupledLinear(nn.Linear):
    """An nn.Linear with a second layer on the same input, as transformers' IdeficsDecoupledLinear."""

    def __init__(self, in_features, out_features, additional_features):
        super().__init__(in_features, out_features)
        self.additional_fc = nn.Linear(in_features, additional_features)

    def forward(self, x):
        return torch.cat([super().forward(x), self.additional_fc(x)], dim=-1)


def _weight_normed(model):
    torch.nn.utils.parametrizations.weight_norm(model[0])


def _spectral_normed(model):
    torch.nn.utils.parametrizations.spectral_norm(model[0])


def _pruned(model):
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.3)


@pytest.mark.parametrize("prepare, message", [
    (_weight_normed, r"weight of layer 0 is recomputed at each access .*remove_parametrizations"),
    (_spectral_normed, r"weight of layer 0 is recomputed at each access"),
    (_pruned, r"weight of layer 0 is recomputed at each access .*prune.remove"),
    (None, r"cannot merge into _InOutLinear \(layer 0\): merging is defined for nn.Linear and transformers' Conv1D"),
    ("decoupled", r"cannot merge into _DecoupledLinear \(layer 0\): besides its weight it holds \['additional_fc'\]"),
], ids=["weight_norm", "spectral_norm", "prune", "custom layout", "linear subclass with more layers"])
def test_merge_refuses_weights_it_cannot_write_or_read(prepare, message):
    # A merge into these once succeeded and changed nothing (the weight is recomputed, and the
    # adapter, counted as merged, was skipped) or read an (in, out) weight as (out, in).
    torch.manual_seed(0)
    if prepare is None:
        model = nn.Sequential(_InOutLinear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    elif prepare == "decoupled":
        model = nn.Sequential(_DecoupledLinear(16, 12, 4), nn.ReLU(), nn.Linear(16, 4))
    else:
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        prepare(model)
    model.eval()  # spectral_norm's power iteration updates its vectors at each training-mode access
    goft.inject(model, target_modules="^(0|2)$")
    perturb_adapters(model, 0.5)
    x = torch.randn(5, 16)
    with torch.no_grad():
        adapted = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (goft.merge, goft.merge_and_unload):
        with pytest.raises(NotImplementedError, match=message):
            merge(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(layer.merged_adapters for layer in goft_layers(model))
    with torch.no_grad():
        assert torch.equal(model(x), adapted)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_a_merge_that_float16_cannot_hold_is_refused_before_any_layer_changes(sign):
    # A rotation keeps a row's norm, not its largest entry: at 45 degrees (50000, -50000), in
    # float16 (49984, -49984), becomes (70688, 0), past float16's 65504 (and its negative below
    # -65504). Stored, it was inf, and an unmerge made the weight NaN.
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False)).half()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[1].weight.copy_(torch.tensor([[sign * 50000.0, -sign * 50000.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]]))
    goft.inject(model, target_modules=["0", "1"])
    with torch.no_grad():
        for layer in goft_layers(model):
            layer.goft_angles["default"][0] = math.atanh(0.25)  # pi * tanh(p) = pi / 4, on features 0 and 1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (goft.merge, goft.merge_and_unload):
        with pytest.raises(ValueError, match=rf"goft.{merge.__name__}: the weight of layer 1 would not fit in float16: "
                                             r"entries up to 7.069e\+04, above float16's largest, 65504; the weight is "
                                             "left as it was"):
            merge(model)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # layer 0 not merged either
    # Entries a little smaller fit, and merge as usual.
    with torch.no_grad():
        model[1].base_layer.weight[0, :2] = torch.tensor([sign * 40000.0, -sign * 40000.0])
    x = torch.randn(3, 4, dtype=torch.float16)
    adapted = model(x)
    goft.merge(model)
    torch.testing.assert_close(model(x), adapted, rtol=2e-3, atol=2e-3 * 56569)
    assert torch.isfinite(model[1].base_layer.weight).all()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_merge_into_a_weight_holding_nan_or_inf_is_refused(bad):
    # The transform would carry the value to every feature paired with it, for good.
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[1, 2] = bad
    goft.inject(model, target_modules=["0"])
    perturb_adapters(model, 0.3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (goft.merge, goft.merge_and_unload):
        with pytest.raises(ValueError, match=rf"goft.{merge.__name__}: the weight of layer 0 holds NaN or infinite "
                                             "values already; .* left as it was"):
            merge(model)
        assert all(torch.equal(v, state[k]) or torch.equal(v.isnan(), state[k].isnan()) and
                   torch.equal(v.nan_to_num(), state[k].nan_to_num()) for k, v in model.state_dict().items())


def test_dynamically_quantized_linears_are_refused_and_the_model_is_left_as_it_was():
    # Their weight is a method returning a packed tensor; injecting once failed half-way.
    model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
                                                   {nn.Linear}, dtype=torch.qint8)
    kinds = [type(m) for m in model]
    with pytest.raises(ValueError, match=r"goft.inject: .* not linear layers: \[0 \(Linear from torch.ao.nn.quantized"
                                         r".*whose weight is not a tensor\)"):
        goft.inject(model, target_modules=["0", "2"])
    assert [type(m) for m in model] == kinds and not goft.adapter_configs(model)


def test_adapted_layer_methods_check_their_arguments():
    layer = GivensLinear(nn.Linear(8, 4))
    layer.add_adapter("a", goft.GOFTConfig())
    calls = [
        (lambda: layer.add_adapter("a.b", goft.GOFTConfig()), ValueError,
         r"GivensLinear.add_adapter: expected adapter_name a non-empty string without '.', got 'a.b'"),
        (lambda: layer.add_adapter("x", "qgoft"), TypeError, r"GivensLinear.add_adapter: expected config a GOFTConfig, got str"),
        (lambda: layer.add_adapter("x", None), TypeError, r"GivensLinear.add_adapter: expected config a GOFTConfig, got None"),
        (lambda: layer.delete_adapter("typo"), ValueError, r"GivensLinear.delete_adapter: no adapter 'typo' in this layer \(has \['a'\]\)"),
        (lambda: layer.transform("typo"), ValueError, r"no adapter 'typo' in this layer"),
        (lambda: layer.op_arguments("typo"), ValueError, r"no adapter 'typo' in this layer"),
        (lambda: layer.set_adapter("typo"), ValueError, r"GivensLinear.set_adapter: no adapter 'typo'"),
        (lambda: GivensLinear(layer), TypeError, r"base_layer is a GivensLinear already"),
    ]
    for call, error, message in calls:
        with pytest.raises(error, match=message):
            call()
    assert layer.adapter_names == ["a"] and list(layer.goft_angles.keys()) == ["a"]
    layer.add_adapter("b", goft.GOFTConfig(variant="qgoft"))  # still usable
    assert "adapters=['a', 'b']" in repr(layer)


def test_hand_edited_json_of_the_wrong_shape_is_refused(tmp_path):
    model = _one_layer()
    goft.save_adapter(model, str(tmp_path))
    original = json.loads((tmp_path / "adapter_config.json").read_text())
    edits = {
        "layers": [["0", 8], {"0": 8}, {"0": {"in_features": "8"}}],
        "tensors": [["0.goft_angles"], {"0.goft_angles": {"shape": 7, "dtype": "float32"}}, {"0.goft_angles": None}],
        "modules_to_save": [None, "head", [1]],
        "config": [None, "goft"],
    }
    for field, values in edits.items():
        for value in values:
            (tmp_path / "adapter_config.json").write_text(json.dumps({**original, field: value}))
            other = nn.Sequential(nn.Linear(8, 4))
            with pytest.raises(ValueError, match=f"adapter_config.json field '{field}' must be"):
                goft.load_adapter(other, str(tmp_path))
            assert goft.adapter_configs(other) == {}


def test_enormous_width_layer_injects_trains_merges_and_unmerges():
    d = 65536
    model = nn.Sequential(nn.Linear(d, 3))
    goft.inject(model, target_modules=["0"], scale=True)
    perturb_adapters(model, 0.05)
    x = torch.randn(2, d)
    y = model(x)
    params, scale = model[0].transform("default")
    torch.testing.assert_close(y, model[0].base_layer(goft.rotate(x, params, scale)))
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)
    weight = model[0].weight.detach().clone()
    goft.merge(model)
    torch.testing.assert_close(model(x), y.detach(), rtol=1e-4, atol=1e-4)
    goft.unmerge(model)
    torch.testing.assert_close(model[0].weight, weight, rtol=0, atol=1e-5)


def test_non_contiguous_inputs_to_an_adapted_model():
    model = _one_layer(d=24, variant="qgoft")
    perturb_adapters(model, 0.3)
    base = torch.randn(24, 5, 3)
    for x in (base.permute(1, 2, 0), torch.randn(5, 72)[:, ::3], torch.randn(1, 24).expand(6, 24)):
        assert not x.is_contiguous()
        torch.testing.assert_close(model(x), model(x.contiguous()), rtol=0, atol=0)


@pytest.mark.skipif(getattr(goft._C, "with_cuda", False), reason="this build has its CUDA kernels")
@pytest.mark.parametrize("op, args", [
    ("rotate", lambda: (torch.randn(2, 4), torch.zeros(3))),
    ("rotate_backward", lambda: (torch.randn(2, 4), torch.randn(2, 4), torch.zeros(3), None, False, [True, True, False])),
    ("rotate_angle_grads", lambda: (torch.randn(2, 4), torch.randn(2, 4), torch.zeros(3))),
])
def test_a_build_without_cuda_kernels_says_so_for_cuda_tensors(op, args):
    # Such a build (no nvcc when it was built) registers kernels for the CUDA key that explain
    # themselves. No CUDA tensor can exist here, so the CUDA kernels are reached by redispatch.
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(NotImplementedError, match=rf"goft.{op}: x is on .*built without its CUDA kernels .*nvcc on PATH"):
        getattr(torch.ops.goft, op).default.redispatch(cuda_only, *args())


def test_a_build_for_another_torch_release_is_refused_at_import():
    # The installed extension records the torch it was built against; importing goft under
    # another release says what to do instead of failing on an undefined symbol (or worse).
    assert goft._BUILT_AGAINST == torch.__version__
    goft._check_torch_version("2.13.0+cpu", "2.13.0+cu130")  # only local tags differ: fine
    script = "import torch; torch.__version__ = '2.99.0'; import goft"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    message = f"goft: its compiled extension was built against torch {re.escape(torch.__version__)}, but torch 2.99.0 is installed"
    assert re.search(message + r"; rebuild goft against this torch: pip install --no-build-isolation", done.stderr), done.stderr[-2000:]

