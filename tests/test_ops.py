"""The fused op goft.rotate against the float64 dense reference, gradcheck, opcheck and compile."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import goft
from goft import _C
from goft.reference import dense_transform, num_layers, pair_schedule, rotate_dense_ref, rotate_layers_ref, rotate_ref

DIMS = [1, 2, 3, 5, 8, 12, 17, 33, 768, 1000, 3072, 4096, 11008]
# Tolerance on the relative error (Frobenius) per dtype, against a reference given the same
# rounded input: float32 accumulation over ~log2(d) steps keeps float32 near 1e-6; a 16-bit
# output rounded once is off by at most its unit roundoff per element, so in the Frobenius norm
# too (bfloat16 2^-8 = 3.9e-3, float16 2^-11 = 4.9e-4), plus the float32 error.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    return (actual - expected).norm().item() / (denom if denom > 0 else 1.0)


def make_params(d: int, quasi: bool, dtype=torch.float32) -> torch.Tensor:
    if quasi:
        return torch.eye(2, dtype=dtype).expand(d - 1, 2, 2) + 0.3 * torch.randn(d - 1, 2, 2, dtype=dtype)
    return torch.randn(d - 1, dtype=dtype)


def rows_for(d: int) -> int:
    # Enough rows to span several tiles and gradient chunks, few enough for a dense d x d check.
    return 37 if d <= 1000 else 5


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 7, 8, 12, 768, 1000, 3072, 11008])
def test_schedule_matches_spec(d):
    layers = pair_schedule(d)
    assert [[tuple(p) for p in layer] for layer in _C.pair_schedule(d)] == layers
    assert sum(len(layer) for layer in layers) == d - 1
    assert len(layers) == num_layers(d)
    for layer in layers:  # pairs of a layer are disjoint
        flat = [i for pair in layer for i in pair]
        assert len(flat) == len(set(flat)) and max(flat, default=0) < d


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 12, 17, 33, 300, 768])
@pytest.mark.parametrize("transpose", [False, True])
def test_layer_reference_matches_dense_reference(d, transpose):
    # rotate_ref uses the layer-by-layer reference for wide d; it must equal the dense T.
    x = torch.randn(4, d, dtype=torch.float64)
    for params in (torch.randn(d - 1, dtype=torch.float64), torch.randn(d - 1, 2, 2, dtype=torch.float64)):
        scale = torch.rand(d, dtype=torch.float64)
        torch.testing.assert_close(rotate_layers_ref(x, params, scale, transpose), rotate_dense_ref(x, params, scale, transpose))


def test_layer_counts_of_spec():
    assert num_layers(3072) == 12 and len(pair_schedule(3072)) == 12
    assert len(pair_schedule(11008)) == 14
    assert pair_schedule(1) == []


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("quasi", [False, True])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_forward_matches_dense_reference(d, quasi, with_scale, transpose):
    x = torch.randn(rows_for(d), d, dtype=torch.float64)
    params = make_params(d, quasi, torch.float64)
    scale = 1 + 0.2 * torch.randn(d, dtype=torch.float64) if with_scale else None
    expected = rotate_ref(x, params, scale, transpose)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        xin = x.to(dtype)
        # Compare with the reference applied to the rounded input, so only the op's error counts.
        exp = rotate_ref(xin, params, scale, transpose) if dtype != torch.float64 else expected
        p = params.float() if dtype != torch.float64 else params
        s = scale.float() if (scale is not None and dtype != torch.float64) else scale
        if dtype != torch.float64:
            exp = rotate_ref(xin, p, s, transpose)
        y = goft.rotate(xin, p, s, transpose)
        assert y.dtype == dtype and y.shape == x.shape
        assert rel_err(y, exp) < RTOL[dtype], (dtype, rel_err(y, exp))


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 12, 17, 33, 768, 1000])
@pytest.mark.parametrize("quasi", [False, True])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_gradients_match_dense_reference(d, quasi, with_scale, transpose):
    x = torch.randn(rows_for(d), d, dtype=torch.float64, requires_grad=True)
    params = make_params(d, quasi, torch.float64).requires_grad_()
    scale = (1 + 0.2 * torch.randn(d, dtype=torch.float64)).requires_grad_() if with_scale else None
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    inputs = [x, params] + ([scale] if with_scale else [])
    got = torch.autograd.grad(goft.rotate(x, params, scale, transpose), inputs, grad_out)
    want = torch.autograd.grad(rotate_ref(x, params, scale, transpose), inputs, grad_out, allow_unused=True, materialize_grads=True)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-11


@pytest.mark.parametrize("d", [17, 768, 1000])
@pytest.mark.parametrize("quasi", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_many_rows_match_layer_reference(d, quasi, transpose, dtype):
    # 299 rows: several gradient chunks of uneven length, each ending in a short tile, so the
    # tile loops' row lanes, the per-chunk sums and the chunk-order reduction are all exercised.
    x = torch.randn(299, d, dtype=dtype, requires_grad=True)
    params = make_params(d, quasi, dtype).requires_grad_()
    scale = (1 + 0.2 * torch.randn(d, dtype=dtype)).requires_grad_()
    grad_out = torch.randn(x.shape, dtype=dtype)
    inputs = [x, params, scale]
    y = goft.rotate(x, params, scale, transpose)
    got = torch.autograd.grad(y, inputs, grad_out)
    ref = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = rotate_layers_ref(*ref, transpose)
    want = torch.autograd.grad(y_ref, ref, grad_out.double())
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    assert rel_err(y, y_ref) < tol
    for g, w in zip(got, want):
        assert rel_err(g, w) < tol


@pytest.mark.parametrize("d", [17, 768])
@pytest.mark.parametrize("transpose", [False, True])
def test_nan_stays_in_its_row(d, transpose):
    # A NaN in one row must not reach any other row of y or grad_x (the kernels run rows side
    # by side in SIMD lanes). Row 41 sits in a tile followed by a short tile of the same chunk.
    x = torch.randn(45, d)
    params, scale, grad_out = make_params(d, True), 1 + 0.2 * torch.randn(d), torch.randn(45, d)
    clean = x.clone().requires_grad_()
    y_clean = goft.rotate(clean, params, scale, transpose)
    (gx_clean,) = torch.autograd.grad(y_clean, [clean], grad_out)
    x[41, d // 2] = float("nan")
    dirty = x.clone().requires_grad_()
    y = goft.rotate(dirty, params, scale, transpose)
    (gx,) = torch.autograd.grad(y, [dirty], grad_out)
    others = torch.arange(45) != 41
    assert torch.equal(y[others], y_clean[others]) and torch.equal(gx[others], gx_clean[others])
    assert y[41].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [3, 33, 768, 4096])
def test_low_precision_gradients(dtype, d):
    x = torch.randn(rows_for(d), d).to(dtype).requires_grad_()
    params = make_params(d, False).requires_grad_()
    scale = (1 + 0.2 * torch.randn(d)).requires_grad_()
    grad_out = torch.randn(x.shape).to(dtype)
    got = torch.autograd.grad(goft.rotate(x, params, scale), [x, params, scale], grad_out)
    x64 = x.detach().double().requires_grad_()
    p64 = params.detach().double().requires_grad_()
    s64 = scale.detach().double().requires_grad_()
    want = torch.autograd.grad(rotate_ref(x64, p64, s64), [x64, p64, s64], grad_out.double())
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    # grad_x is rounded to x's dtype (bfloat16 about 2e-3 here, float16 2e-4); the parameter and
    # scale gradients come from the same rounded x and grad_out summed in float32 (about 1e-7),
    # so a 16-bit sum in the kernels would show there.
    assert rel_err(got[0], want[0]) < {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    assert rel_err(got[1], want[1]) < 1e-5 and rel_err(got[2], want[2]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [256, 255])
@pytest.mark.parametrize("transpose", [False, True])
def test_low_precision_storage_rounds_as_torch(dtype, d, transpose):
    # Every 16-bit pattern (normals, subnormals, zeros, infinities, NaNs) as x. The op computes in
    # float32 either way, so on x it must give exactly the float32 op on x.float(), rounded by
    # torch's own conversion: this checks the kernels' SIMD conversions bit for bit (d = 255 also
    # the scalar ones of a row's last, partial chunk). NaN payloads may differ; NaN positions not.
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = patterns[torch.randperm(patterns.numel())][: (patterns.numel() // d) * d].view(-1, d)
    grad_out = patterns[torch.randperm(patterns.numel())][: x.numel()].view(x.shape)
    params = 0.3 * torch.randn(d - 1)
    scale = 1 + 0.5 * torch.randn(d)
    exact = dict(rtol=0, atol=0, equal_nan=True)
    got = torch.ops.goft.rotate(x, params, scale, transpose)
    want = torch.ops.goft.rotate(x.float(), params, scale, transpose).to(dtype)
    torch.testing.assert_close(got, want, **exact)
    got = torch.ops.goft.rotate_backward(grad_out, x, params, scale, transpose, [True, True, True])
    want = torch.ops.goft.rotate_backward(grad_out.float(), x.float(), params, scale, transpose, [True, True, True])
    torch.testing.assert_close(got[0], want[0].to(dtype), **exact)
    torch.testing.assert_close(got[1], want[1], **exact)
    torch.testing.assert_close(got[2], want[2], **exact)


@pytest.mark.parametrize("quasi", [False, True])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("d", [1, 2, 5, 13, 20])
def test_gradcheck(quasi, with_scale, transpose, d):
    x = torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True)
    params = make_params(d, quasi, torch.float64).requires_grad_()
    scale = torch.rand(d, dtype=torch.float64).add(0.5).requires_grad_() if with_scale else None
    assert torch.autograd.gradcheck(lambda *a: goft.rotate(*a, transpose=transpose), (x, params, scale))


@pytest.mark.parametrize("d", [1, 2, 5, 17, 768, 1000])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_tanh_parameterisation_matches_the_mapped_reference(d, with_scale, transpose):
    # The op maps p to the angle pi * tanh(p) itself; the reference maps it in PyTorch first, and
    # autograd carries the gradient back through torch.tanh.
    x = torch.randn(rows_for(d), d, dtype=torch.float64, requires_grad=True)
    p = (2 * torch.randn(d - 1, dtype=torch.float64)).requires_grad_()
    scale = (1 + 0.2 * torch.randn(d, dtype=torch.float64)).requires_grad_() if with_scale else None
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    inputs = [x, p] + ([scale] if with_scale else [])
    y = goft.rotate(x, p, scale, transpose, angle_parameterisation="tanh")
    y_ref = rotate_ref(x, math.pi * torch.tanh(p), scale, transpose)
    assert rel_err(y, y_ref) < 1e-12
    got = torch.autograd.grad(y, inputs, grad_out)
    want = torch.autograd.grad(y_ref, inputs, grad_out, allow_unused=True, materialize_grads=True)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-11


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tanh_parameterisation_low_precision(dtype):
    d = 768
    x = torch.randn(37, d).to(dtype).requires_grad_()
    p = torch.randn(d - 1, requires_grad=True)
    grad_out = torch.randn(x.shape).to(dtype)
    got = torch.autograd.grad(goft.rotate(x, p, angle_parameterisation="tanh"), [x, p], grad_out)
    x64, p64 = x.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    want = torch.autograd.grad(rotate_dense_ref(x64, math.pi * torch.tanh(p64)), [x64, p64], grad_out.double())
    assert rel_err(got[0], want[0]) < RTOL[dtype]
    assert rel_err(got[1], want[1]) < 1e-5  # summed in float32 from the same rounded x and grad_out


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("d", [1, 2, 5, 13])
def test_gradcheck_tanh_parameterisation(transpose, d):
    x = torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True)
    p = torch.randn(d - 1, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(d, dtype=torch.float64).add(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: goft.rotate(*a, transpose, "tanh"), (x, p, scale))


def _in_x_dtype(reference):
    return lambda x, params, scale=None, transpose=False: reference(x, params, scale, transpose).to(x.dtype)


# The golden vectors pin the op and both references each, not only through each other.
@pytest.mark.parametrize("rotate", [goft.rotate, _in_x_dtype(rotate_dense_ref), _in_x_dtype(rotate_layers_ref)],
                         ids=["op", "dense reference", "layer reference"])
def test_golden_vectors(golden_path, rotate):
    np = pytest.importorskip("numpy")
    golden = np.load(golden_path)
    cases = sorted({tuple(key.split("/")[:2]) for key in golden.files})
    assert len(cases) == 12
    for case, dim in cases:
        g = {key.split("/")[2]: torch.from_numpy(golden[key]) for key in golden.files if key.startswith(f"{case}/{dim}/")}
        x = g["x"].clone().requires_grad_()
        scale = g["scale"].clone().requires_grad_() if "scale" in g else None
        raw = (g["blocks"] if case == "qgoft" else g["p"]).clone().requires_grad_()
        params = raw if case == "qgoft" else math.pi * torch.tanh(raw)
        y = torch.nn.functional.linear(rotate(x, params, scale), g["weight"], g["bias"])
        (y * g["grad_y"]).sum().backward()
        checks = {"y": (y, g["y"]), "grad_x": (x.grad, g["grad_x"])}
        checks["grad_blocks" if case == "qgoft" else "grad_p"] = (raw.grad, g["grad_blocks" if case == "qgoft" else "grad_p"])
        if scale is not None:
            checks["grad_scale"] = (scale.grad, g["grad_scale"])
        merged = rotate(g["weight"], params.detach(), None if scale is None else scale.detach(), transpose=True)
        checks["merged_weight"] = (merged, g["merged_weight"])
        for name, (got, want) in checks.items():
            assert rel_err(got, want) < 1e-5, (case, dim, name, rel_err(got, want))


@pytest.mark.parametrize("d", [2, 7, 64])
def test_strict_transform_is_orthogonal_and_transpose_inverts(d):
    x = torch.randn(9, d, dtype=torch.float64)
    angles = torch.randn(d - 1, dtype=torch.float64)
    y = goft.rotate(x, angles)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(goft.rotate(y, angles, transpose=True), x)
    T = dense_transform(angles, d)
    torch.testing.assert_close(T @ T.T, torch.eye(d, dtype=torch.float64))


def test_non_contiguous_and_batched_inputs():
    d = 40
    base = torch.randn(6, 2 * d, 5)
    x = base.transpose(1, 2)[..., ::2]  # (6, 5, 40), features strided by 2
    assert not x.is_contiguous()
    params = torch.randn(d - 1)
    torch.testing.assert_close(goft.rotate(x, params), goft.rotate(x.contiguous(), params))
    rows = torch.randn(10, 3 * d)[:, :d]  # row stride 3d, contiguous features
    torch.testing.assert_close(goft.rotate(rows, params), goft.rotate(rows.contiguous(), params))
    expanded = torch.randn(1, d).expand(4, d)
    torch.testing.assert_close(goft.rotate(expanded, params), goft.rotate(expanded.contiguous(), params))


def test_zero_rows_and_d_equal_one():
    params = torch.randn(6)
    assert goft.rotate(torch.randn(0, 7), params).shape == (0, 7)
    x = torch.randn(0, 7, requires_grad=True)
    scale = torch.rand(7, requires_grad=True)
    goft.rotate(x, params.requires_grad_(), scale, angle_parameterisation="tanh").sum().backward()
    assert x.grad.shape == (0, 7)
    # No rows: the parameter gradients are sums over nothing.
    assert torch.equal(params.grad, torch.zeros(6)) and torch.equal(scale.grad, torch.zeros(7))
    one = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    y = goft.rotate(one, torch.zeros(0, dtype=torch.float64), scale)
    torch.testing.assert_close(y, one * 2)
    y.sum().backward()
    torch.testing.assert_close(scale.grad, one.detach().sum(0))


def test_backward_is_bitwise_deterministic():
    x = torch.randn(300, 768, requires_grad=True)
    params = make_params(768, True).requires_grad_()
    scale = torch.ones(768, requires_grad=True)
    grad_out = torch.randn(300, 768)
    runs = [torch.autograd.grad(goft.rotate(x, params, scale), [x, params, scale], grad_out) for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_backward_saves_only_inputs():
    x = torch.randn(64, 256, requires_grad=True)
    params = torch.zeros(255, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        goft.rotate(x, params)
    assert sum(t.numel() for t in saved) <= x.numel() + params.numel()


ERRORS = [
    ("float32 x, int params", lambda: goft.rotate(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64)), "params of dtype float32 or float64"),
    ("integer x", lambda: goft.rotate(torch.ones(3, 4, dtype=torch.int32), torch.zeros(3)), "x of dtype"),
    ("complex x", lambda: goft.rotate(torch.ones(3, 4, dtype=torch.complex64), torch.zeros(3)), "x of dtype"),
    ("params length", lambda: goft.rotate(torch.randn(2, 768), torch.zeros(768)), r"expected params of shape \(767,\) or \(767, 2, 2\) for d=768, got \(768,\)"),
    ("blocks shape", lambda: goft.rotate(torch.randn(2, 5), torch.zeros(4, 2, 3)), r"params of shape \(4,\) or \(4, 2, 2\)"),
    ("scale length", lambda: goft.rotate(torch.randn(2, 5), torch.zeros(4), torch.ones(4)), r"expected scale of shape \(5,\)"),
    ("scale dtype", lambda: goft.rotate(torch.randn(2, 5), torch.zeros(4), torch.ones(5, dtype=torch.int64)), "scale of dtype"),
    ("0-d x", lambda: goft.rotate(torch.tensor(1.0), torch.zeros(0)), "at least one dimension"),
    ("d = 0", lambda: goft.rotate(torch.randn(3, 0), torch.zeros(0)), "d >= 1"),
    ("meta params", lambda: goft.rotate(torch.randn(2, 5), torch.zeros(4, device="meta")), "params on x's device"),
    ("unknown parameterisation", lambda: goft.rotate(torch.randn(2, 5), torch.zeros(4), angle_parameterisation="sigmoid"),
     'expected angle_parameterisation "raw" or "tanh", got "sigmoid"'),
    ("tanh with blocks", lambda: goft.rotate(torch.randn(2, 5), torch.zeros(4, 2, 2), angle_parameterisation="tanh"),
     'angle_parameterisation "tanh" maps angles, but params are free 2x2 blocks'),
]


@pytest.mark.parametrize("name,call,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_name_the_argument(name, call, message):
    with pytest.raises(RuntimeError, match=message) as info:
        call()
    assert "goft.rotate" in str(info.value)


@pytest.mark.parametrize("quasi", [False, True])
@pytest.mark.parametrize("with_scale", [False, True])
def test_opcheck(quasi, with_scale):
    d = 11
    x = torch.randn(3, 4, d, requires_grad=True)
    params = make_params(d, quasi).requires_grad_()
    scale = torch.rand(d).add(0.5).requires_grad_() if with_scale else None
    parameterisations = ["raw"] if quasi else ["raw", "tanh"]
    for transpose in (False, True):
        for angles in parameterisations:
            torch.library.opcheck(torch.ops.goft.rotate.default, (x, params, scale, transpose, angles))
    grad_out = torch.randn(3, 4, d)
    # Every mask: a gradient not asked for is an empty tensor, in the fake kernel as in the real one.
    for angles in parameterisations:
        for mask in ([True, True, with_scale], [True, False, False], [False, True, False], [False, False, with_scale]):
            torch.library.opcheck(
                torch.ops.goft.rotate_backward.default,
                (grad_out, x.detach(), params.detach(), None if scale is None else scale.detach(), False, mask, angles),
            )


@pytest.mark.parametrize("angle_parameterisation", ["raw", "tanh"])
def test_torch_compile_fullgraph_dynamic_with_backward(angle_parameterisation):
    torch._dynamo.reset()

    def f(x, params, scale, weight):
        y = goft.rotate(x, params, scale, angle_parameterisation=angle_parameterisation)
        return torch.nn.functional.linear(y, weight).square().sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for rows, d in [(8, 16), (5, 16), (7, 24)]:
        x = torch.randn(rows, d, requires_grad=True)
        params = torch.randn(d - 1, requires_grad=True)
        scale = torch.rand(d).add(0.5).requires_grad_()
        weight = torch.randn(3, d)
        got = torch.autograd.grad(compiled(x, params, scale, weight), [x, params, scale])
        want = torch.autograd.grad(f(x, params, scale, weight), [x, params, scale])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


# The reference comparisons of this file, for the tests run again at a forced lane width.
REFERENCE_TESTS = "forward_matches_dense or gradients_match_dense or low_precision or many_rows or nan_stays"


@pytest.mark.parametrize("lane_bytes", [16, 32, 64])
def test_every_cpu_lane_width_matches_reference(lane_bytes):
    # A CPU gets the kernels of its own vector width (64 bytes with AVX-512, 32 with AVX2, else
    # 16); GOFT_CPU_LANE_BYTES forces one, so this machine checks all three against the references.
    if lane_bytes == _C.cpu_lane_bytes() and "GOFT_CPU_LANE_BYTES" not in os.environ:
        pytest.skip("this process already runs these tests at its own width")
    env = dict(os.environ, GOFT_CPU_LANE_BYTES=str(lane_bytes))
    check = subprocess.run(
        [sys.executable, "-c", "import goft._C as c; print(c.cpu_lane_bytes())"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert check.stdout.strip() == str(lane_bytes)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)), "-k", REFERENCE_TESTS],
        env=env, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


def test_bad_lane_width_override_is_a_clear_error():
    env = dict(os.environ, GOFT_CPU_LANE_BYTES="48")
    run = subprocess.run(
        [sys.executable, "-c", "import torch, goft; goft.rotate(torch.randn(2, 4), torch.zeros(3))"],
        env=env, capture_output=True, text=True,
    )
    assert run.returncode == 1 and "GOFT_CPU_LANE_BYTES must be 16, 32 or 64, got '48'" in run.stderr
