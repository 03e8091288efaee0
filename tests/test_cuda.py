"""CUDA kernels of goft.rotate against the CPU op and float64 references (skipped without a GPU).

References: goft.reference.rotate_ref (a dense float64 T, on the CPU) for d <= 64, and for wider
rows `layered_ref` below, which applies the schedule of goft.reference.pair_schedule one layer at a
time in float64 on the GPU (a dense T at d = 11008 would need gigabytes); the two are checked
against each other. Tolerances are set from the dtype:
the kernels accumulate in float32 (float64 for float64), so outputs must agree with the float64
reference to within the rounding of the output dtype.

GOFT_CUDA_TESTS_DEVICE=cpu runs the same tests on the CPU op (tests/test_gpu_scripts.py does), so
that a broken test shows here and not in a short GPU run; tests of behaviour only CUDA
has (the weight side of GivensLinear, CUDA graphs, 4 GiB inputs) skip there.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

import goft
from goft import _C
from goft.reference import blocks_from_params, pair_schedule, rotate_ref

# Where the tensors under test live: "cuda", or "cpu" for a run of the tests' own code.
DEVICE = os.environ.get("GOFT_CUDA_TESTS_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"

pytestmark = [pytest.mark.cuda]
if ON_GPU:
    pytestmark += [
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        pytest.mark.skipif(not getattr(_C, "with_cuda", False), reason="goft was built without its CUDA kernels"),
    ]


def skip_off_gpu(what):
    if not ON_GPU:
        pytest.skip(f"{what}: CUDA only")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# 100 and 200: row groups of exactly one warp (25 vectors: float32 at 100, bf16/fp16 at 200),
# several to a thread block, where the strict kernels once staged lead chunks they had no room for.
DIMS = [1, 2, 3, 5, 8, 12, 100, 200, 768, 1000, 3072, 4096, 11008]
DENSE_MAX_D = 64

# Error relative to the largest magnitude in the row: one rounding to the dtype, at most its unit
# roundoff (bfloat16 2^-8, float16 2^-11) of the row's largest value, or for float32/float64 the
# accumulated rounding of up to 2 * 14 layers of multiply-adds. A kernel that rounded to the
# dtype after every layer, not once at the end, would exceed it.
OUT_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 5e-4}
# Two kernels that each round once may land one unit (two roundoffs) apart.
BETWEEN_KERNELS_RTOL = {dtype: 2 * rtol for dtype, rtol in OUT_RTOL.items()}
# Parameter gradients accumulate in float32 (float64) from inputs that are exact in that type.
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def layered_ref(x, params, scale=None, transpose=False, round_to=None):
    """rotate() in float64, one layer at a time (GOFT_SPEC.md section 3); differentiable. With
    ``round_to`` a dtype, each layer's output is rounded to it (a kernel that should fail OUT_RTOL)."""
    d = x.shape[-1]
    w = x.double().reshape(-1, d)
    blocks = blocks_from_params(params.double())
    layers = pair_schedule(d)
    offsets = [0]
    for pairs in layers:
        offsets.append(offsets[-1] + len(pairs))
    if transpose and scale is not None:
        w = w * scale.double()
    order = range(len(layers)) if transpose else reversed(range(len(layers)))
    for r in order:
        if not layers[r]:
            continue
        a = torch.tensor([p[0] for p in layers[r]], device=w.device)
        b = torch.tensor([p[1] for p in layers[r]], device=w.device)
        A = blocks[offsets[r] : offsets[r + 1]].to(w.device)
        if transpose:
            A = A.transpose(-1, -2)
        ua, ub = w[:, a], w[:, b]
        na = A[:, 0, 0] * ua + A[:, 1, 0] * ub
        nb = A[:, 0, 1] * ua + A[:, 1, 1] * ub
        w = w.index_copy(1, a, na).index_copy(1, b, nb)
        if round_to is not None:
            w = w.to(round_to).double()
    if not transpose and scale is not None:
        w = w * scale.double()
    return w.reshape(x.shape)


def reference(x, params, scale=None, transpose=False):
    d = x.shape[-1]
    if d <= DENSE_MAX_D:
        return rotate_ref(x.double().cpu(), params.double().cpu(), None if scale is None else scale.double().cpu(), transpose).to(x.device)
    return layered_ref(x, params, scale, transpose)


def make_inputs(d, dtype, quasi, with_scale, rows=33, seed=0, device=DEVICE):
    g = torch.Generator(device="cpu").manual_seed(seed * 1000 + d)
    x = torch.randn(rows, d, generator=g).to(device=device, dtype=dtype)
    if quasi:
        params = torch.eye(2).expand(max(d - 1, 0), 2, 2) + 0.3 * torch.randn(max(d - 1, 0), 2, 2, generator=g)
    else:
        params = torch.randn(max(d - 1, 0), generator=g)
    # float64 rows come with float64 parameters, whose gradients then keep float64 precision.
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = params.to(device=device, dtype=param_dtype).contiguous()
    scale = (1 + 0.2 * torch.randn(d, generator=g)).to(device=device, dtype=param_dtype) if with_scale else None
    return x, params, scale


def assert_rows_close(got, want, rtol, what):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    if got.numel() == 0:
        return
    scale = want.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    err = ((got - want).abs() / scale).max().item()
    assert err <= rtol, f"{what}: max error {err:.3g} (relative to the row's largest value) > {rtol:.3g}"


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quasi", [False, True], ids=["strict", "quasi"])
@pytest.mark.parametrize("with_scale", [False, True], ids=["", "scale"])
@pytest.mark.parametrize("transpose", [False, True], ids=["", "T"])
def test_forward_matches_reference_and_cpu(d, dtype, quasi, with_scale, transpose):
    x, params, scale = make_inputs(d, dtype, quasi, with_scale)
    got = goft.rotate(x, params, scale, transpose)
    assert got.dtype == dtype and got.device == x.device
    assert_rows_close(got, reference(x, params, scale, transpose), OUT_RTOL[dtype], "cuda vs float64 reference")
    cpu = goft.rotate(x.cpu(), params.cpu(), None if scale is None else scale.cpu(), transpose)
    assert_rows_close(got.cpu(), cpu, BETWEEN_KERNELS_RTOL[dtype], "cuda vs cpu op")


# 20000: past the fused backward kernels' reach: the fallbacks (strict and general), every dtype.
@pytest.mark.parametrize("d", [1, 3, 12, 768, 1000, 4096, 11008, 20000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quasi", [False, True], ids=["strict", "quasi"])
@pytest.mark.parametrize("transpose", [False, True], ids=["", "T"])
def test_gradients_match_float64(d, dtype, quasi, transpose):
    x, params, scale = make_inputs(d, dtype, quasi, True, rows=29)
    grad_out = torch.randn(x.shape, device=DEVICE).to(dtype)
    x.requires_grad_(True)
    params.requires_grad_(True)
    scale.requires_grad_(True)
    goft.rotate(x, params, scale, transpose).backward(grad_out)

    # Reference: the float64 CPU op's gradients from the same (exactly representable) values.
    xr = x.detach().double().cpu().requires_grad_(True)
    pr = params.detach().double().cpu().requires_grad_(True)
    sr = scale.detach().double().cpu().requires_grad_(True)
    goft.rotate(xr, pr, sr, transpose).backward(grad_out.double().cpu())
    if d <= 64:  # and the dense float64 transform, independent of both kernels
        xd, pd, sd = (t.detach().clone().requires_grad_(True) for t in (xr, pr, sr))
        rotate_ref(xd, pd, sd, transpose).backward(grad_out.double().cpu())
        assert_rows_close(xr.grad, xd.grad, 1e-10, "cpu float64 grad_x vs dense")
        # At d = 1 there are no parameters, and the dense reference leaves their grad unset.
        pd_grad = pd.grad if pd.grad is not None else torch.zeros_like(pd)
        assert_rows_close(pr.grad.reshape(1, -1), pd_grad.reshape(1, -1), 1e-10, "cpu float64 grad_params vs dense")

    assert_rows_close(x.grad.cpu(), xr.grad, OUT_RTOL[dtype], "grad_x")
    assert_rows_close(params.grad.cpu().reshape(1, -1), pr.grad.reshape(1, -1), GRAD_RTOL[dtype], "grad_params")
    assert_rows_close(scale.grad.cpu().reshape(1, -1), sr.grad.reshape(1, -1), GRAD_RTOL[dtype], "grad_scale")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [5, 768, 4096])
def test_backward_output_mask(dtype, d):
    x, params, scale = make_inputs(d, dtype, True, True)
    grad_out = torch.randn(x.shape, device=DEVICE).to(dtype)
    full = torch.ops.goft.rotate_backward.default(grad_out, x, params, scale, False, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, False, False]):
        part = torch.ops.goft.rotate_backward.default(grad_out, x, params, scale, False, mask)
        for i, (want, got) in enumerate(zip(full, part)):
            if not mask[i]:
                assert got.numel() == 0
            elif i == 0:
                # grad_x alone runs the transposed forward: the same values up to rounding.
                assert_rows_close(got, want, BETWEEN_KERNELS_RTOL[dtype], "grad_x alone")
            else:
                torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [3, 768, 3072, 11008])
@pytest.mark.parametrize("quasi", [False, True], ids=["strict", "quasi"])
def test_gradients_bitwise_reproducible(dtype, d, quasi):
    x, params, scale = make_inputs(d, dtype, quasi, True, rows=517)
    grad_out = torch.randn(x.shape, device=DEVICE).to(dtype)
    runs = []
    for _ in range(2):
        xx, pp, ss = (t.detach().clone().requires_grad_(True) for t in (x, params, scale))
        goft.rotate(xx, pp, ss).backward(grad_out)
        runs.append((xx.grad, pp.grad, ss.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "gradients differ between two identical runs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_and_batched_inputs(dtype):
    d = 1000
    base = torch.randn(4, 7, d + 3, device=DEVICE).to(dtype)
    x = base[..., 1 : d + 1]  # rows d + 3 apart, not 16-byte aligned: the scalar path
    _, params, scale = make_inputs(d, dtype, False, True)
    got = goft.rotate(x, params, scale)
    assert_rows_close(got, reference(x, params, scale), OUT_RTOL[dtype], "strided rows")
    xt = torch.randn(d, 6, device=DEVICE).to(dtype).t()  # features not contiguous: copied
    assert_rows_close(goft.rotate(xt, params), reference(xt, params), OUT_RTOL[dtype], "transposed view")


@pytest.mark.parametrize("quasi", [False, True], ids=["strict", "quasi"])
@pytest.mark.parametrize("transpose", [False, True], ids=["", "T"])
def test_fast_path_matches_fallback(quasi, transpose, monkeypatch):
    """The fused kernels against the simple one-block-per-row kernels (GOFT_CUDA_FALLBACK=1; for
    angles the strict fallback)."""
    for d, dtype in [(12, torch.float32), (768, torch.bfloat16), (4096, torch.float16), (11008, torch.float32)]:
        x, params, scale = make_inputs(d, dtype, quasi, True, rows=65)
        grad_out = torch.randn(x.shape, device=DEVICE).to(dtype)
        outs = []
        for fallback in ("0", "1"):
            monkeypatch.setenv("GOFT_CUDA_FALLBACK", fallback)
            xx, pp, ss = (t.detach().clone().requires_grad_(True) for t in (x, params, scale))
            y = goft.rotate(xx, pp, ss, transpose)
            y.backward(grad_out)
            outs.append((y, xx.grad, pp.grad, ss.grad))
        (y0, gx0, gp0, gs0), (y1, gx1, gp1, gs1) = outs
        # The same operations per row, up to how the compiler contracts them into FMAs.
        assert_rows_close(y0, y1, BETWEEN_KERNELS_RTOL[dtype], f"output d={d}")
        assert_rows_close(gx0, gx1, BETWEEN_KERNELS_RTOL[dtype], f"grad_x d={d}")
        assert_rows_close(gp0.reshape(1, -1), gp1.reshape(1, -1), 1e-4, f"grad_params d={d}")
        assert_rows_close(gs0.reshape(1, -1), gs1.reshape(1, -1), 1e-4, f"grad_scale d={d}")


@pytest.mark.parametrize("quasi", [False, True], ids=["strict", "quasi"])
def test_parameters_of_any_float_type_and_layout(quasi, monkeypatch):
    """The kernels read the parameters themselves (float32 or float64, made contiguous first), in
    the fused kernels' staging and in the fallback's blocks alike."""
    d = 768
    x, params, scale = make_inputs(d, torch.bfloat16, quasi, True, rows=19)
    grad_out = torch.randn(x.shape, device=DEVICE).to(torch.bfloat16)
    want = torch.ops.goft.rotate_backward.default(
        grad_out.double().cpu(), x.double().cpu(), params.double().cpu(), scale.double().cpu(), False,
        [True, True, True])
    want_y = reference(x, params, scale)
    for param_dtype in (torch.float32, torch.float64):
        # Every other entry of a tensor twice as long: a view with stride 2 along the pairs.
        wide = torch.stack([params, torch.full_like(params, float("nan"))], dim=1).to(param_dtype)
        strided = wide[:, 0]
        assert not strided.is_contiguous()
        for fallback in ("0", "1"):
            monkeypatch.setenv("GOFT_CUDA_FALLBACK", fallback)
            what = f"params {param_dtype} strided, fallback={fallback}"
            assert_rows_close(goft.rotate(x, strided, scale), want_y, OUT_RTOL[torch.bfloat16], what)
            got = torch.ops.goft.rotate_backward.default(grad_out, x, strided, scale, False, [True, True, True])
            assert_rows_close(got[0].cpu(), want[0], OUT_RTOL[torch.bfloat16], what + " grad_x")
            assert_rows_close(got[1].cpu().reshape(1, -1), want[1].reshape(1, -1), GRAD_RTOL[torch.bfloat16],
                              what + " grad_params")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layout_overrides_match_the_reference(dtype, monkeypatch):
    """Every fused variant the planner may pick, forced in turn (GOFT_CUDA_CHUNKS, GOFT_CUDA_ROWS,
    GOFT_CUDA_CTA_THREADS): one or two rows per thread group, 1 to 4 chunks, several block sizes."""
    for d in (5, 768, 1000, 4096):
        x, params, scale = make_inputs(d, dtype, True, True, rows=37)  # odd: a group's last row missing
        want = reference(x, params, scale)
        want_t = reference(x, params, scale, True)
        for chunks, rows_per_group in ((1, 1), (1, 2), (2, 1), (4, 1)):
            for cta in (128, 1024):
                monkeypatch.setenv("GOFT_CUDA_CHUNKS", str(chunks))
                monkeypatch.setenv("GOFT_CUDA_ROWS", str(rows_per_group))
                monkeypatch.setenv("GOFT_CUDA_CTA_THREADS", str(cta))
                what = f"d={d} chunks={chunks} rows={rows_per_group} cta={cta}"
                assert_rows_close(goft.rotate(x, params, scale), want, OUT_RTOL[dtype], what)
                assert_rows_close(goft.rotate(x, params, scale, True), want_t, OUT_RTOL[dtype], what + " T")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_strict_backward_kernels_match_the_reference(dtype, monkeypatch):
    """Angle parameters take the strict backward kernels, which rebuild each layer's input from
    its output; GOFT_CUDA_STRICT=0 puts the same gradients on the quasi kernels. Both against the
    float64 CPU op, in every backward layout (GOFT_CUDA_CHUNKS), transposed or not."""
    for d in (5, 768, 1000, 4096):
        x, params, scale = make_inputs(d, dtype, False, True, rows=37)
        grad_out = torch.randn(x.shape, device=DEVICE).to(dtype)
        for transpose in (False, True):
            want = torch.ops.goft.rotate_backward.default(
                grad_out.double().cpu(), x.double().cpu(), params.double().cpu(), scale.double().cpu(),
                transpose, [True, True, True])
            for strict in ("1", "0"):
                for chunks in (0, 1, 2, 4):
                    monkeypatch.setenv("GOFT_CUDA_STRICT", strict)
                    monkeypatch.setenv("GOFT_CUDA_CHUNKS", str(chunks))
                    got = torch.ops.goft.rotate_backward.default(grad_out, x, params, scale, transpose,
                                                                 [True, True, True])
                    what = f"d={d} transpose={transpose} strict={strict} chunks={chunks}"
                    assert_rows_close(got[0].cpu(), want[0], OUT_RTOL[dtype], what + " grad_x")
                    for i, name in ((1, "grad_params"), (2, "grad_scale")):
                        assert_rows_close(got[i].cpu().reshape(1, -1), want[i].reshape(1, -1), GRAD_RTOL[dtype],
                                          f"{what} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_staged_rows_change_no_bit(dtype, monkeypatch):
    """The strict kernels' staged next rows (cp.async into shared memory) move the same bytes as
    plain loads: gradients and rotate_angle_grads are bitwise those of GOFT_CUDA_STAGE=0, with and
    without a scale, for row counts that leave a block's last tile partly empty."""
    for d in (6, 1000, 4096):
        for rows in (1, 37, 301):
            for with_scale in (False, True):
                x, params, scale = make_inputs(d, dtype, False, with_scale, rows=rows)
                grad_out = torch.randn(x.shape, device=DEVICE).to(dtype)
                for transpose in (False, True):
                    got = {}
                    for stage in ("1", "0"):
                        monkeypatch.setenv("GOFT_CUDA_STAGE", stage)
                        got[stage] = torch.ops.goft.rotate_backward.default(
                            grad_out, x, params, scale, transpose, [True, True, with_scale])
                        if not with_scale:
                            got[stage] = (*got[stage][:2],
                                          torch.ops.goft.rotate_angle_grads.default(x, grad_out, params, transpose))
                    what = f"d={d} rows={rows} scale={with_scale} transpose={transpose}"
                    for a, b in zip(got["1"], got["0"]):
                        if a is not None:
                            assert torch.equal(a, b), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_angle_grads_match_the_reference(dtype, monkeypatch):
    """goft::rotate_angle_grads (angle gradients from x and the gradient at x) against the float64
    CPU op: the strict kernels from the output in every backward layout (GOFT_CUDA_CHUNKS), the
    strict fallback where no fused kernel holds the row (float32 rows of 16384, and bf16 ones in
    the forced layouts that cannot hold them), the two-pass form with GOFT_CUDA_STRICT=0, both
    transposes; bitwise the same when repeated."""
    for d in (1, 5, 768, 1000, 4096, 16384):
        x, params, _ = make_inputs(d, dtype, False, False, rows=37 if d < 16384 else 5)
        grad_x = torch.randn(x.shape, device=DEVICE).to(dtype)
        for transpose in (False, True):
            want = torch.ops.goft.rotate_angle_grads.default(
                x.double().cpu(), grad_x.double().cpu(), params.double().cpu(), transpose)
            for strict in ("1", "0"):
                for chunks in (0, 1, 2, 4):
                    monkeypatch.setenv("GOFT_CUDA_STRICT", strict)
                    monkeypatch.setenv("GOFT_CUDA_CHUNKS", str(chunks))
                    got = torch.ops.goft.rotate_angle_grads.default(x, grad_x, params, transpose)
                    again = torch.ops.goft.rotate_angle_grads.default(x, grad_x, params, transpose)
                    what = f"d={d} transpose={transpose} strict={strict} chunks={chunks}"
                    assert torch.equal(got, again), what + ": not reproducible"
                    # The two-pass form (GOFT_CUDA_STRICT=0, and the CPU op's only form) rounds
                    # the gradient at the output to the dtype first.
                    two_pass = strict == "0" or not ON_GPU
                    rtol = 2e-2 if two_pass and dtype == torch.bfloat16 else GRAD_RTOL[dtype]
                    assert_rows_close(got.cpu().reshape(1, -1), want.reshape(1, -1), rtol, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("d", [1, 5, 768, 4096, 11008])
def test_tanh_parameterisation_matches_the_cpu_op(dtype, d, monkeypatch):
    """angle_parameterisation="tanh" (angles pi * tanh(p), mapped by the staging kernels and the
    gradient sums) against the float64 CPU op (itself checked against the dense reference in
    test_ops.py): forward and gradients with and without a scale, both transposes, on the strict
    kernels, the quasi kernels (GOFT_CUDA_STRICT=0) and the fallback; and rotate_angle_grads."""
    x, p, scale = make_inputs(d, dtype, False, True, rows=29)
    p = 2 * p
    grad_out = torch.randn(x.shape, device=DEVICE).to(dtype)
    cpu = [t.detach().double().cpu() for t in (x, p, scale, grad_out)]
    for transpose in (False, True):
        for with_scale in (False, True):
            s, s_cpu = (scale, cpu[2]) if with_scale else (None, None)
            mask = [True, True, with_scale]
            want_y = goft.rotate(cpu[0], cpu[1], s_cpu, transpose, "tanh")
            want = torch.ops.goft.rotate_backward.default(cpu[3], cpu[0], cpu[1], s_cpu, transpose, mask, "tanh")
            for strict, fallback in (("1", "0"), ("0", "0"), ("1", "1")):
                monkeypatch.setenv("GOFT_CUDA_STRICT", strict)
                monkeypatch.setenv("GOFT_CUDA_FALLBACK", fallback)
                what = f"transpose={transpose} scale={with_scale} strict={strict} fallback={fallback}"
                y = goft.rotate(x, p, s, transpose, "tanh")
                assert_rows_close(y.cpu(), want_y, OUT_RTOL[dtype], "output, " + what)
                got = torch.ops.goft.rotate_backward.default(grad_out, x, p, s, transpose, mask, "tanh")
                assert_rows_close(got[0].cpu(), want[0], OUT_RTOL[dtype], "grad_x, " + what)
                for i, name in ((1, "grad_params"), (2, "grad_scale")):
                    if mask[i]:
                        assert_rows_close(got[i].cpu().reshape(1, -1), want[i].reshape(1, -1), GRAD_RTOL[dtype],
                                          f"{name}, {what}")
            monkeypatch.delenv("GOFT_CUDA_STRICT")
            monkeypatch.delenv("GOFT_CUDA_FALLBACK")
        want_angles = torch.ops.goft.rotate_angle_grads.default(cpu[0], cpu[3], cpu[1], transpose, "tanh")
        got_angles = torch.ops.goft.rotate_angle_grads.default(x, grad_out, p, transpose, "tanh")
        two_pass = d == 11008 or not ON_GPU  # see test_angle_grads_match_the_reference
        assert_rows_close(got_angles.cpu().reshape(1, -1), want_angles.reshape(1, -1),
                          2e-2 if dtype == torch.bfloat16 and two_pass else GRAD_RTOL[dtype],
                          f"rotate_angle_grads, transpose={transpose}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quasi,with_scale", [(False, False), (False, True), (True, False)],
                         ids=["strict", "strict-scale", "quasi"])
def test_rotated_linear_matches_the_two_step_form(dtype, quasi, with_scale):
    """goft.rotated_linear (the transform applied to the weight) against rotate-then-linear in
    float64 on the CPU: output and the gradients to x, weight, bias, params and scale (strict
    without a scale: the backward through rotate_angle_grads)."""
    d, out = 768, 256
    x, params, scale = make_inputs(d, dtype, quasi, with_scale, rows=300)
    weight = torch.randn(out, d, device=DEVICE).to(dtype)
    bias = torch.randn(out, device=DEVICE).to(dtype)
    grad_y = torch.randn(300, out, device=DEVICE).to(dtype)
    inputs = [t for t in (x, weight, bias, params, scale)]

    def run(fn, tensors):
        leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
        y = fn(*leaves)
        y.backward(grad_y.to(device=y.device, dtype=y.dtype))
        return y.detach(), [None if t is None else t.grad for t in leaves]

    y, got = run(goft.rotated_linear, inputs)
    cpu64 = [None if t is None else t.detach().double().cpu() for t in inputs]
    y_want, want = run(lambda x, w, b, p, s: torch.nn.functional.linear(goft.rotate(x, p, s), w, b), cpu64)
    # The rotated weight is rounded to the dtype where the two-step form rounds the rotated input.
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert_rows_close(y.cpu(), y_want, tol, "output")
    for name, g, w in zip(("x", "weight", "bias", "params", "scale"), got, want):
        if w is not None:
            assert_rows_close(g.cpu().reshape(1, -1), w.reshape(1, -1), tol, f"grad {name}")


@pytest.mark.parametrize("variant", ["strict", "scale", "quasi"])
def test_givens_linear_rotates_the_weight_for_many_rows(variant, monkeypatch):
    """GivensLinear's automatic choice on CUDA: the weight's rows (goft.rotated_linear) when x has
    at least as many rows as the layer has outputs, else x; both against the float64 CPU layer."""
    skip_off_gpu("GivensLinear's automatic weight side")
    calls = []
    real = goft.layers.rotated_linear
    monkeypatch.setattr(goft.layers, "rotated_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(goft.layers, "WEIGHT_SIDE", None)
    config = {"strict": goft.GOFTConfig(), "scale": goft.GOFTConfig(scale=True),
              "quasi": goft.GOFTConfig(variant="qgoft")}[variant]
    torch.manual_seed(0)
    layer = goft.GivensLinear(torch.nn.Linear(768, 256))
    layer.add_adapter("default", config)
    layer.set_adapter("default")
    with torch.no_grad():
        for p in layer.adapter_parameters("default").values():
            p.add_(0.3 * torch.randn_like(p))
    cpu64 = copy.deepcopy(layer).double()
    layer.to(DEVICE).base_layer.to(torch.bfloat16)  # the adapter's parameters stay float32
    for rows, weight_side in ((300, True), (100, False)):
        calls.clear()
        x = torch.randn(rows, 768)
        grad_y = torch.randn(rows, 256)
        results = []
        runs = ((layer, x.to(DEVICE).bfloat16(), grad_y.to(DEVICE).bfloat16()), (cpu64, x.double(), grad_y.double()))
        for lay, xx, gg in runs:
            xx.requires_grad_(True)
            for p in lay.parameters():
                p.grad = None
            y = lay(xx)
            y.backward(gg)
            results.append([y.detach(), xx.grad] + [p.grad for p in lay.adapter_parameters("default").values()])
        assert bool(calls) == weight_side, f"rows={rows}"
        for i, (g, w) in enumerate(zip(*results)):
            assert_rows_close(g.cpu().reshape(1, -1), w.reshape(1, -1), 3e-2, f"rows={rows} output/grad {i}")


def test_wide_rows_take_the_fallback_and_work():
    for d in (16384, 65536):
        x, params, scale = make_inputs(d, torch.bfloat16, False, True, rows=3)
        got = goft.rotate(x, params, scale)
        assert_rows_close(got, layered_ref(x, params, scale), OUT_RTOL[torch.bfloat16], f"d={d}")
        grad_out = torch.randn(x.shape, device=DEVICE).to(torch.bfloat16)
        x.requires_grad_(True)
        params.requires_grad_(True)
        goft.rotate(x, params, scale).backward(grad_out)
        xr, pr = (t.detach().double().requires_grad_(True) for t in (x, params))
        layered_ref(xr, pr, scale).backward(grad_out.double())
        assert_rows_close(x.grad, xr.grad, OUT_RTOL[torch.bfloat16], f"grad_x d={d}")
        assert_rows_close(params.grad.reshape(1, -1), pr.grad.reshape(1, -1), GRAD_RTOL[torch.bfloat16],
                          f"grad_params d={d}")


def test_many_rows_int64_offsets():
    # More than 2^31 elements: row offsets past the range of 32-bit indices (4 GiB at bf16).
    skip_off_gpu("a 4 GiB input")
    d = 4096
    rows = (1 << 31) // d + 64
    if torch.cuda.get_device_properties(0).total_memory < 3 * rows * d * 2:
        pytest.skip("not enough GPU memory")
    x = torch.empty(rows, d, device=DEVICE, dtype=torch.bfloat16).normal_()
    _, params, _ = make_inputs(d, torch.bfloat16, False, False)
    y = goft.rotate(x, params)
    tail = slice(rows - 5, rows)
    assert_rows_close(y[tail], layered_ref(x[tail], params), OUT_RTOL[torch.bfloat16], "last rows")
    del x, y
    torch.cuda.empty_cache()


def test_opcheck():
    for d, dtype, quasi, with_scale in [(5, torch.float32, False, True), (768, torch.bfloat16, True, False), (1000, torch.float64, True, True)]:
        x, params, scale = make_inputs(d, dtype, quasi, with_scale, rows=6)
        x.requires_grad_(True)
        params.requires_grad_(True)
        for transpose in (False, True):
            torch.library.opcheck(torch.ops.goft.rotate.default, (x, params, scale, transpose))
        grad_out = torch.randn(x.shape, device=DEVICE).to(dtype)
        torch.library.opcheck(
            torch.ops.goft.rotate_backward.default,
            (grad_out, x.detach(), params.detach(), scale, False, [True, True, scale is not None]),
        )
        weight = torch.randn(7, d, device=DEVICE).to(dtype).requires_grad_(True)
        torch.library.opcheck(torch.ops.goft.rotated_linear.default, (x, weight, None, params, scale))
        if not quasi:
            for transpose in (False, True):
                torch.library.opcheck(torch.ops.goft.rotate_angle_grads.default,
                                      (x.detach(), grad_out, params.detach(), transpose))


def test_torch_compile_fullgraph():
    d = 768
    x, params, scale = make_inputs(d, torch.bfloat16, False, True, rows=16)

    def f(x, params, scale):
        return goft.rotate(x, params, scale).float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    xs = [t.detach().clone().requires_grad_(True) for t in (x, params, scale)]
    xc = [t.detach().clone().requires_grad_(True) for t in (x, params, scale)]
    f(*xs).backward()
    compiled(*xc).backward()
    for a, b in zip(xs, xc):
        torch.testing.assert_close(a.grad, b.grad)


def test_cuda_graph_capture_and_replay():
    """The ops inside a captured CUDA graph (as torch.compile's reduce-overhead mode runs them),
    replayed on new inputs: bitwise what eager calls give for the same inputs (goft's kernels)."""
    skip_off_gpu("CUDA graphs")
    x, params, scale = make_inputs(768, torch.bfloat16, False, True, rows=64)
    static_x, static_g = x.clone(), torch.randn_like(x)
    weight = torch.randn(256, 768, device=DEVICE).to(torch.bfloat16)

    def run():
        return (goft.rotate(static_x, params, scale),
                *torch.ops.goft.rotate_backward.default(static_g, static_x, params, scale, False, [True, True, True]),
                torch.ops.goft.rotate_angle_grads.default(static_x, static_g, params, False),
                goft.rotated_linear(static_x, weight, None, params, scale))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture: plans and shared-memory opt-ins
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    static_x.copy_(torch.randn_like(x))
    static_g.copy_(torch.randn_like(x))
    graph.replay()
    eager = run()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(captured[:-1], eager[:-1])):
        assert torch.equal(a, b), f"output {i}"
    # rotated_linear's matmul is cuBLAS's, which promises no bitwise equality across captures.
    torch.testing.assert_close(captured[-1], eager[-1])


def test_givens_linear_under_compile_reduce_overhead():
    """An injected layer on the weight side, compiled with CUDA graphs, against eager."""
    torch.manual_seed(0)
    layer = goft.GivensLinear(torch.nn.Linear(512, 256, device=DEVICE, dtype=torch.bfloat16))
    layer.add_adapter("default", goft.GOFTConfig())
    layer.set_adapter("default")
    with torch.no_grad():
        layer.goft_angles["default"].add_(0.3 * torch.randn(511, device=DEVICE))
    compiled = torch.compile(layer, mode="reduce-overhead")
    for step in range(3):  # the first calls record, later ones replay
        x = torch.randn(1024, 512, device=DEVICE, dtype=torch.bfloat16)
        grads = []
        for fn in (layer, compiled):
            layer.goft_angles["default"].grad = None
            xx = x.clone().requires_grad_(True)
            y = fn(xx)
            y.float().square().sum().backward()
            grads.append((y.detach().clone(), xx.grad, layer.goft_angles["default"].grad.clone()))
        for name, a, b in zip(("output", "grad x", "grad angles"), *grads):
            torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2, msg=lambda m: f"step {step} {name}: {m}")


def test_layered_reference_matches_dense():
    # The wide-row reference itself, against the dense one where both fit.
    for d in (3, 12, 100):
        x, params, scale = make_inputs(d, torch.float64, True, True, device="cpu")
        for transpose in (False, True):
            torch.testing.assert_close(layered_ref(x, params, scale, transpose), rotate_ref(x, params, scale, transpose))
    assert math.ceil(math.log2(11008)) == len(pair_schedule(11008))


def test_output_tolerance_rejects_a_kernel_that_rounds_after_every_layer():
    # OUT_RTOL allows one rounding to the dtype; a kernel that kept its row in the 16-bit dtype
    # between layers would round up to ceil(log2 d) times. The tolerance must tell them apart.
    for dtype in (torch.bfloat16, torch.float16):
        caught = cases = 0
        for d in [d for d in DIMS if d >= 8]:
            for quasi in (False, True):
                x, params, scale = make_inputs(d, dtype, quasi, True, device="cpu")
                want = reference(x, params, scale)
                assert_rows_close(layered_ref(x, params, scale).to(dtype), want, OUT_RTOL[dtype], f"d={d} rounded once")
                rounded = layered_ref(x, params, scale, round_to=dtype).to(dtype)
                try:
                    assert_rows_close(rounded, want, OUT_RTOL[dtype], "rounded every layer")
                except AssertionError:
                    caught += 1
                cases += 1
        assert caught >= 0.8 * cases, f"{dtype}: only {caught} of {cases} per-layer-rounded outputs exceed OUT_RTOL"
