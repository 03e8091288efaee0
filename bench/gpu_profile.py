"""Where goft.rotate's GPU time goes, for tuning the CUDA kernels (not a results benchmark).

    python bench/gpu_profile.py            # kernel breakdown (torch.profiler) + layout sweep
    python bench/gpu_profile.py --once     # one forward and one backward, e.g. under ncu

The breakdown lists every kernel one forward and one backward launch (planning kernels, the
fused kernel, the gradient reductions) with its GPU time. The sweep times the fused forward and
backward on x of shape (rows, d) bfloat16 for each layout override the planner accepts
(GOFT_CUDA_CHUNKS, GOFT_CUDA_ROWS, GOFT_CUDA_CTA_THREADS; cpp/include/goft/cuda/plan.h
FusedTuning), the backward on the strict and on the quasi kernels (GOFT_CUDA_STRICT) and
rotate_angle_grads (the strict kernels from the op's output), beside a device-to-device copy of
x, with the timing of gpu_bench.py. A second breakdown lists the kernels of the bf16 layer,
frozen and with GivensLinear, as gpu_bench.py times it. A short table then compares the strict
kernels with and without their staged next rows (GOFT_CUDA_STAGE=0).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import gpu_bench  # noqa: E402


def make_case(rows: int, d: int, dtype: torch.dtype):
    torch.manual_seed(0)
    x = torch.randn(rows, d, device=gpu_bench.DEVICE, dtype=dtype)
    grad = torch.randn_like(x)
    angles = 0.1 * torch.randn(d - 1, device=gpu_bench.DEVICE)
    return x, grad, angles


def passes(x, grad, angles):
    import goft

    backward = torch.ops.goft.rotate_backward.default
    return {
        "forward": lambda: goft.rotate(x, angles),
        "backward": lambda: backward(grad, x, angles, None, False, [True, True, False]),
        # What goft.rotated_linear's backward runs: the strict kernels from the output.
        "angle grads": lambda: torch.ops.goft.rotate_angle_grads.default(x, grad, angles, False),
    }


def breakdown(rows: int, d: int, dtype: torch.dtype) -> None:
    x, grad, angles = make_case(rows, d, dtype)
    fns = passes(x, grad, angles)
    for fn in fns.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for fn in fns.values():
            for _ in range(5):
                fn()
        torch.cuda.synchronize()
    print(f"== kernels of 5 calls of each pass ({', '.join(fns)}), x ({rows}, {d}) {dtype}")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=70))


def sweep(rows: int, d: int, dtype: torch.dtype, repeats: int) -> None:
    x, grad, angles = make_case(rows, d, dtype)
    fns = passes(x, grad, angles)
    y = torch.empty_like(x)
    copy_us = 1000 * gpu_bench.cuda_time_ms(lambda: y.copy_(x), repeats)
    print(f"== layout sweep, x ({rows}, {d}) {dtype}; copy of x {copy_us:.1f} us")
    print("backward: the strict kernels (angle parameters, the default); quasi: the same gradients with "
          "GOFT_CUDA_STRICT=0")
    print("| chunks | rows per group | cta threads | forward, us | x copy | backward, us | x copy "
          "| angle grads, us | x copy | quasi backward, us | x copy |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    fns = dict(fns, quasi=fns["backward"])
    # Two rows per group exist for the one-chunk forward only (FusedTraits::kRowsPerGroup).
    shapes = [(0, 0), (1, 1), (1, 2), (2, 1), (3, 1), (4, 1)]
    for chunks, group_rows in shapes:
        for cta in (128, 256, 512, 1024):
            os.environ["GOFT_CUDA_CHUNKS"] = str(chunks)
            os.environ["GOFT_CUDA_ROWS"] = str(group_rows)
            os.environ["GOFT_CUDA_CTA_THREADS"] = str(cta)
            cells = []
            for name, fn in fns.items():
                if name != "forward" and group_rows > 1:
                    cells += ["", ""]
                    continue
                os.environ["GOFT_CUDA_STRICT"] = "0" if name == "quasi" else "1"
                try:
                    us = 1000 * gpu_bench.cuda_time_ms(fn, repeats)
                    cells += [f"{us:.1f}", f"{us / copy_us:.2f}"]
                except RuntimeError as e:  # a layout this variant cannot take
                    cells += [f"error: {str(e).splitlines()[0][:40]}", ""]
            print(f"| {chunks or 'auto'} | {group_rows or 'auto'} | {cta} | " + " | ".join(cells) + " |", flush=True)
    for name in ("GOFT_CUDA_CHUNKS", "GOFT_CUDA_ROWS", "GOFT_CUDA_CTA_THREADS", "GOFT_CUDA_STRICT"):
        os.environ.pop(name, None)


def layer_breakdown(rows: int, d: int) -> None:
    """Every kernel of 5 forward + backward steps of a bf16 nn.Linear(d, d) on `rows` rows, frozen
    and with GivensLinear: where the layer's time beyond the frozen one's goes."""
    import torch.nn as nn
    from torch.profiler import ProfilerActivity, profile

    import goft

    torch.manual_seed(0)
    dev, dt = gpu_bench.DEVICE, torch.bfloat16
    base = nn.Linear(d, d, device=dev, dtype=dt).requires_grad_(False)
    adapted = goft.GivensLinear(nn.Linear(d, d, device=dev, dtype=dt))
    adapted.base_layer.load_state_dict(base.state_dict())
    adapted.add_adapter("default", goft.GOFTConfig())
    adapted.set_adapter("default")
    x = torch.randn(rows, d, device=dev, dtype=dt, requires_grad=True)
    grad_y = torch.randn(rows, d, device=dev, dtype=dt)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    for name, layer in (("frozen nn.Linear", base), ("GivensLinear", adapted)):
        def step():  # as gpu_bench.py's layer steps: no gradient of x or of a parameter accumulates
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            layer(x).backward(grad_y)

        for _ in range(3):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(5):
                step()
            if dev == "cuda":
                torch.cuda.synchronize()
        sort = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
        print(f"== kernels of 5 forward + backward steps: {name}, bf16 ({rows}, {d}) x ({d}, {d})")
        print(prof.key_averages().table(sort_by=sort, row_limit=24, max_name_column_width=70))


def staging(rows: int, d: int, dtype: torch.dtype, repeats: int) -> None:
    """The strict kernels with and without their staged next rows (GOFT_CUDA_STAGE=0)."""
    x, grad, angles = make_case(rows, d, dtype)
    fns = passes(x, grad, angles)
    print(f"== staged next rows, x ({rows}, {d}) {dtype}: the strict kernels' cp.async of the next row")
    print("| pass | staged, us | GOFT_CUDA_STAGE=0, us | staged / not |")
    print("| --- | ---: | ---: | ---: |")
    for name in ("backward", "angle grads"):
        times = []
        for stage in ("1", "0"):
            os.environ["GOFT_CUDA_STAGE"] = stage
            times.append(1000 * gpu_bench.cuda_time_ms(fns[name], repeats))
        print(f"| {name} | {times[0]:.1f} | {times[1]:.1f} | {times[0] / times[1]:.2f} |", flush=True)
    os.environ.pop("GOFT_CUDA_STAGE", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--once", action="store_true", help="one forward and one backward, nothing else")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_profile.py: needs a CUDA GPU")
    if args.once:
        x, grad, angles = make_case(args.rows, args.dim, torch.bfloat16)
        for fn in passes(x, grad, angles).values():
            fn()
        torch.cuda.synchronize()
        return
    breakdown(args.rows, args.dim, torch.bfloat16)
    layer_breakdown(args.rows, args.dim)
    staging(args.rows, args.dim, torch.bfloat16, args.repeats)
    sweep(args.rows, args.dim, torch.bfloat16, args.repeats)
    sweep(args.rows // 2, 2 * args.dim, torch.float32, args.repeats)


if __name__ == "__main__":
    main()
