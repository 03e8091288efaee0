"""Every CUDA kernel path of goft's ops once, on small shapes, for NVIDIA's compute-sanitizer
(bench/gpu_check.sh runs it under the memcheck, racecheck and synccheck tools).

The CPU emulator (tests/cpp/test_cuda_emulated.cpp) runs the kernels' bodies one thread per GPU
thread, under ThreadSanitizer too; what it cannot see, the sanitizer checks on the GPU itself:
shared-memory hazards as the hardware orders them (racecheck), barriers and shuffles that some
threads of a block or warp miss (synccheck), and accesses out of bounds or misaligned (memcheck).

Cases: widths whose row groups are one warp (200), several warps (1000, 4096: the warp layers'
exchanges and lead values) and too wide for a fused bfloat16 or float32 backward (11008); float32
and bfloat16; both transposes; angles (the strict kernels, staged and unstaged), angles with a
scale, and qGOFT's blocks; the forward, the backward with every gradient, the angle gradients'
one pass from the output (rotate_angle_grads) and the fallback kernels (GOFT_CUDA_FALLBACK=1).
Prints one line per case and checks that the results are finite (exit 1 otherwise); the
sanitizer's own report says whether any access was wrong.

    compute-sanitizer --tool racecheck python bench/gpu_sanitize.py
    python bench/gpu_sanitize.py --device cpu   # the script's own code (tests/test_gpu_scripts.py)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

import goft
from common import restored_environment

DIMS = (200, 1000, 4096, 11008)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Enough rows for several blocks and partial chunks, few enough to keep a sanitized run short.
ROWS = 48


def run_case(d: int, dtype: torch.dtype, transpose: bool, variant: str, device: str) -> bool:
    """Forward and backward of one case (and rotate_angle_grads for angles without a scale);
    True if every result is finite."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(ROWS, d, generator=gen).to(device, dtype).requires_grad_()
    if variant == "blocks":
        eye = torch.eye(2).expand(d - 1, 2, 2)
        params = (eye + 0.1 * torch.randn(d - 1, 2, 2, generator=gen)).to(device)
    else:
        params = (0.3 * torch.randn(d - 1, generator=gen)).to(device)
    params.requires_grad_()
    scale = None
    if variant == "angles+scale":
        scale = (1 + 0.1 * torch.randn(d, generator=gen)).to(device).requires_grad_()
    grad_out = torch.randn(ROWS, d, generator=gen).to(device, dtype)
    y = goft.rotate(x, params, scale, transpose)
    inputs = [x, params] + ([scale] if scale is not None else [])
    results = [y, *torch.autograd.grad(y, inputs, grad_out)]
    if variant == "angles":
        grad_x = results[1].detach()
        results.append(torch.ops.goft.rotate_angle_grads(x.detach(), grad_x, params.detach(), transpose, "raw"))
    return all(bool(torch.isfinite(r.float()).all()) for r in results)


def cases(dims, dtypes):
    for d, dtype_name, transpose, variant in itertools.product(
            dims, dtypes, (False, True), ("angles", "angles+scale", "blocks")):
        yield d, dtype_name, transpose, variant, {}
        if variant == "angles":
            yield d, dtype_name, transpose, variant, {"GOFT_CUDA_STAGE": "0"}
        if d == 1000:
            yield d, dtype_name, transpose, variant, {"GOFT_CUDA_FALLBACK": "1"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the script itself")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize.py: torch sees no CUDA device", file=sys.stderr)
        return 2
    failed = 0
    start = time.perf_counter()
    for d, dtype_name, transpose, variant, overrides in cases(args.dims, args.dtypes):
        with restored_environment(overrides):  # goft's CUDA launchers read them at each call
            os.environ.update(overrides)
            ok = run_case(d, DTYPES[dtype_name], transpose, variant, args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        settings = " ".join(f"{k}={v}" for k, v in overrides.items())
        print(f"d={d} {dtype_name} transpose={int(transpose)} {variant} {settings}".rstrip()
              + ("" if ok else ": NOT FINITE"), flush=True)
        failed += not ok
    print(f"gpu_sanitize.py: {failed} case(s) with non-finite results, {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
