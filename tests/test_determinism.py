"""Bitwise determinism of goft.rotate on the CPU: outputs and gradients across runs and across thread counts."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import goft

# (d, leading shape, dtype, quasi, scale, transpose). More than 1000 rows, so the backward splits
# the rows into its maximum of 64 gradient chunks and the forward into several parallel tasks.
CASES = [
    (768, (1100,), torch.float32, False, True, False),
    (768, (1100,), torch.bfloat16, True, False, True),
    (1000, (3, 500), torch.float32, True, False, False),
    (1000, (1500,), torch.float64, False, True, True),
    (1000, (1200,), torch.float16, False, False, False),
    (4099, (257,), torch.float32, False, True, False),
]


def _run(case, threads=None):
    """Output and every gradient of one case, computed from seeded inputs."""
    d, lead, dtype, quasi, with_scale, transpose = case
    if threads is not None:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(d)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(*lead, d, generator=g).to(dtype).requires_grad_()
    if quasi:
        params = (torch.eye(2) + 0.3 * torch.randn(d - 1, 2, 2, generator=g)).to(param_dtype)
    else:
        params = torch.randn(d - 1, generator=g).to(param_dtype)
    params.requires_grad_()
    scale = (0.5 + torch.rand(d, generator=g)).to(param_dtype).requires_grad_() if with_scale else None
    grad_out = torch.randn(*lead, d, generator=g).to(dtype)
    y = goft.rotate(x, params, scale, transpose)
    inputs = [x, params] + ([scale] if with_scale else [])
    grads = torch.autograd.grad(y, inputs, grad_out)
    # Input gradient alone takes another code path (the transposed forward).
    grad_x_only = torch.autograd.grad(goft.rotate(x, params.detach(), None if scale is None else scale.detach(), transpose), [x], grad_out)
    return [y.detach(), *grads, *grad_x_only]


def _assert_bitwise(a, b, what):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape, (what, i)
        # view as integers: bitwise, and NaN-safe
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[u.element_size()]
        assert torch.equal(u.view(bits), v.view(bits)), f"{what}: result {i} differs in its bits"


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", CASES, ids=[f"d{c[0]}-{c[2]}-{'q' if c[3] else 's'}" for c in CASES])
def test_bitwise_identical_across_runs_and_thread_counts_in_process(case, one_thread):
    reference = _run(case, threads=1)
    _assert_bitwise(reference, _run(case, threads=1), "second run, 1 thread")
    _assert_bitwise(reference, _run(case, threads=2), "2 threads")
    _assert_bitwise(reference, _run(case, threads=3), "3 threads (more than cores)")


def test_bitwise_identical_in_fresh_processes_with_different_thread_counts(tmp_path, one_thread):
    # A fresh interpreter per thread count: the thread pool is created with that size from the
    # start (OMP_NUM_THREADS), as in a real job, rather than resized.
    script = textwrap.dedent(
        """
        import sys, torch
        import test_determinism as t
        torch.set_num_threads(int(sys.argv[1]))
        assert torch.get_num_threads() == int(sys.argv[1])
        torch.save([t._run(case) for case in t.CASES], sys.argv[2])
        """
    )
    results = {}
    for threads in (1, 2):
        out = tmp_path / f"threads{threads}.pt"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(
            [sys.executable, "-c", script, str(threads), str(out)],
            cwd=os.path.dirname(__file__), env=env, capture_output=True, text=True, timeout=240,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        results[threads] = torch.load(out)
    here = [_run(case, threads=1) for case in CASES]
    for i, case in enumerate(CASES):
        _assert_bitwise(here[i], results[1][i], f"case {i}: this process vs a 1-thread process")
        _assert_bitwise(here[i], results[2][i], f"case {i}: this process vs a 2-thread process")
