"""Property-based tests of goft.rotate against the float64 reference over random widths, shapes, dtypes and variants."""

import math

import pytest
import torch

import goft
from goft.reference import blocks_from_params, num_layers, rotate_ref

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# No example database: CI starts clean every time, and a failure prints its reproduction blob.
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Unit roundoff of the output dtype and of the accumulation (float32, float64 for float64 x).
ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Smallest normal number of the output dtype: below it rounding errors are absolute.
TINY = {dtype: torch.finfo(dtype).tiny for dtype in DTYPES}

# Widths: small ones (every schedule corner: d = 1, 2, odd, powers of two +- 1) are drawn often,
# wide ones up to 2048 less often; 8 leading elements at most keeps an example under ~10 ms.
widths = st.one_of(
    st.integers(1, 40),
    st.sampled_from([63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 2047, 2048]),
    st.integers(41, 2048),
)
leading_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).filter(lambda s: math.prod(s) <= 8)


def _case(seed: int, d: int, lead, dtype, quasi: bool, with_scale: bool):
    g = torch.Generator().manual_seed(seed)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(*lead, d, generator=g).to(dtype)
    if quasi:
        # Blocks near the identity, as training keeps them: far from it a product of ~log2(d)
        # random 2x2 blocks overflows float16 for reasons that have nothing to do with goft.
        params = torch.eye(2) + 0.3 * torch.randn(d - 1, 2, 2, generator=g)
    else:
        params = (torch.rand(d - 1, generator=g) * 2 - 1) * math.pi
    scale = 0.5 + torch.rand(d, generator=g) if with_scale else None
    return x, params.to(param_dtype), None if scale is None else scale.to(param_dtype)


def _error_bound(x, params, scale, transpose, dtype):
    """Elementwise bound on |rotate - exact|: each of the L layers and the scale add at most one
    accumulation rounding relative to |x| @ |T| (the transform with every entry made non-negative),
    and the final cast adds one output rounding. Only the op's own error is bounded: the
    reference is applied to the same (already rounded) x."""
    acc = ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    magnitude = rotate_ref(x.abs(), blocks_from_params(params.double()).abs(), None if scale is None else scale.abs(), transpose)
    steps = num_layers(x.shape[-1]) + 2
    # 4x the first-order bound: each 2x2 update is two products and a sum.
    return (4 * steps * acc + ROUNDOFF[dtype]) * magnitude + TINY[dtype]


@PROPERTY
@given(
    seed=st.integers(0, 2**31 - 1),
    d=widths,
    lead=leading_shapes,
    dtype=st.sampled_from(DTYPES),
    quasi=st.booleans(),
    with_scale=st.booleans(),
    transpose=st.booleans(),
)
def test_matches_the_float64_reference(seed, d, lead, dtype, quasi, with_scale, transpose):
    x, params, scale = _case(seed, d, lead, dtype, quasi, with_scale)
    y = goft.rotate(x, params, scale, transpose)
    assert y.dtype == dtype and y.shape == x.shape
    expected = rotate_ref(x, params, scale, transpose)
    error = (y.double() - expected).abs()
    bound = _error_bound(x, params, scale, transpose, dtype)
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.3g}x the {dtype} bound (d={d}, lead={lead})"


@PROPERTY
@given(
    seed=st.integers(0, 2**31 - 1),
    d=widths,
    lead=leading_shapes,
    quasi=st.booleans(),
    with_scale=st.booleans(),
    transpose=st.booleans(),
)
def test_gradients_match_the_float64_reference(seed, d, lead, quasi, with_scale, transpose):
    x, params, scale = _case(seed, d, lead, torch.float64, quasi, with_scale)
    inputs = [x.requires_grad_(), params.requires_grad_()] + ([scale.requires_grad_()] if with_scale else [])
    grad_out = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    got = torch.autograd.grad(goft.rotate(x, params, scale, transpose), inputs, grad_out)
    want = torch.autograd.grad(rotate_ref(x, params, scale, transpose), inputs, grad_out, allow_unused=True)
    for name, g, w, t in zip(("x", "params", "scale"), got, want, inputs):
        if w is None:  # d = 1 has no angles
            w = torch.zeros_like(t)
        if g.numel():
            magnitude = max(w.abs().max().item(), 1.0)
            assert (g - w).abs().max().item() <= 1e-12 * (num_layers(d) + 2) * magnitude * max(x[..., 0].numel(), 1), name


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), d=widths, lead=leading_shapes, dtype=st.sampled_from(DTYPES))
def test_strict_without_scale_preserves_row_norms(seed, d, lead, dtype):
    x, angles, _ = _case(seed, d, lead, dtype, quasi=False, with_scale=False)
    for transpose in (False, True):
        y = goft.rotate(x, angles, transpose=transpose)
        norm_in, norm_out = x.double().norm(dim=-1), y.double().norm(dim=-1)
        tol = 4 * (num_layers(d) + 2) * ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
        tol += 2 * ROUNDOFF[dtype]
        assert ((norm_out - norm_in).abs() <= tol * norm_in + TINY[dtype]).all()


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), d=widths, lead=leading_shapes, dtype=st.sampled_from(DTYPES))
def test_transpose_undoes_a_strict_rotation(seed, d, lead, dtype):
    x, angles, _ = _case(seed, d, lead, dtype, quasi=False, with_scale=False)
    back = goft.rotate(goft.rotate(x, angles), angles, transpose=True)
    forth = goft.rotate(goft.rotate(x, angles, transpose=True), angles)
    # Two passes, each with its accumulation error and (half types) a rounding of the result.
    tol = 2 * (4 * (num_layers(d) + 2) * ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32] + ROUNDOFF[dtype])
    row_norm = x.double().norm(dim=-1, keepdim=True)
    for result in (back, forth):
        assert result.dtype == dtype
        assert ((result.double() - x.double()).abs() <= tol * row_norm + TINY[dtype]).all()
