"""The benchmark's plain PyTorch baselines (bench/baselines.py) against goft.reference's dense float64 T."""

import pathlib
import sys

import pytest
import torch

from goft.reference import dense_transform, pair_schedule, rotate_ref

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

from baselines import layer_slices, rotate_dense, rotate_per_layer  # noqa: E402

DIMS = [1, 2, 3, 5, 8, 12, 17, 100, 768, 1000]


def _params(d: int, quasi: bool) -> torch.Tensor:
    if quasi:
        return torch.eye(2, dtype=torch.float64) + 0.3 * torch.randn(max(d - 1, 0), 2, 2, dtype=torch.float64)
    return (torch.rand(max(d - 1, 0), dtype=torch.float64) * 2 - 1) * torch.pi


@pytest.mark.parametrize("d", [1, 2, 3, 7, 8, 12, 768, 1000, 4096])
def test_layer_slices_match_schedule(d):
    layers = pair_schedule(d)
    slices = layer_slices(d)
    assert len(slices) == len(layers)
    offset = 0
    for (s, m, off), pairs in zip(slices, layers):
        assert off == offset
        assert [(2 * s * k, 2 * s * k + s) for k in range(m)] == pairs
        offset += m
    assert offset == max(d - 1, 0)


@pytest.mark.parametrize("impl", [rotate_per_layer, rotate_dense], ids=["per_layer", "dense"])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("quasi", [False, True], ids=["strict", "quasi"])
@pytest.mark.parametrize("with_scale", [False, True], ids=["noscale", "scale"])
def test_forward_matches_reference(impl, d, quasi, with_scale):
    x = torch.randn(3, 5, d, dtype=torch.float64)
    params = _params(d, quasi)
    scale = torch.rand(d, dtype=torch.float64) + 0.5 if with_scale else None
    torch.testing.assert_close(impl(x, params, scale), rotate_ref(x, params, scale), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", [rotate_per_layer, rotate_dense], ids=["per_layer", "dense"])
@pytest.mark.parametrize("d", [3, 8, 12, 100])
@pytest.mark.parametrize("quasi", [False, True], ids=["strict", "quasi"])
def test_gradients_match_reference(impl, d, quasi):
    x = torch.randn(4, d, dtype=torch.float64)
    params = _params(d, quasi)
    scale = torch.rand(d, dtype=torch.float64) + 0.5
    g = torch.randn(4, d, dtype=torch.float64)

    def grads(fn):
        xs, ps, ss = (t.clone().requires_grad_() for t in (x, params, scale))
        return torch.autograd.grad(fn(xs, ps, ss), (xs, ps, ss), g)

    ref = grads(lambda xs, ps, ss: xs @ dense_transform(ps, d, ss))
    for got, want in zip(grads(impl), ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", [rotate_per_layer, rotate_dense], ids=["per_layer", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_keeps_dtype_and_is_close(impl, dtype):
    d = 768
    x = torch.randn(16, d)
    params = _params(d, False).float()
    out = impl(x.to(dtype), params)
    assert out.dtype == dtype
    want = rotate_ref(x, params)
    err = (out.double() - want).norm() / want.norm()
    # bf16 rounds x, the blocks and every layer's output (8-bit mantissa).
    assert err < (1e-5 if dtype == torch.float32 else 5e-2)
