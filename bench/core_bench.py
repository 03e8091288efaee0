"""Issue-2 op targets and the C++ core's bench binary, as one results section (10-core.md).

    python bench/core_bench.py            # float32, 8192 rows, d=4096 (the targets), plus the binary

Targets (float32, 8192 rows, d=4096, same process): goft.rotate forward at most 1.5x the time of
x.clone(), forward + backward (x, angles) at most 3x. Both sides allocate their outputs, as a
training step does; at this size a fresh output costs page faults (the kernel zeroes and maps
each new page on first touch), which weigh on both sides of those ratios. The same rounds also
time a copy of x into a preallocated tensor, memory bandwidth alone, as the floor the passes are
also shown against. The bench binary times the torch-free kernels against memcpy on buffers it
reuses (so its memcpy may be cache-resident where the kernels are not: compare with care).
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

import torch

import common
import goft

ROOT = pathlib.Path(__file__).resolve().parent.parent


def op_targets(rows: int, d: int, repeats: int):
    x = torch.randn(rows, d)
    angles = (0.1 * torch.randn(d - 1)).requires_grad_()
    grad_out = torch.randn(rows, d)
    xg = x.clone().requires_grad_()

    def fwd_bwd():
        y = goft.rotate(xg, angles)
        torch.autograd.grad(y, [xg, angles], grad_out)

    preallocated = torch.empty_like(x)
    samples = common.time_interleaved(
        {"clone": lambda: x.clone(), "copy": lambda: preallocated.copy_(x),
         "forward": lambda: goft.rotate(x, angles.detach()), "forward+backward": fwd_bwd},
        repeats=repeats, budget_s=20.0,
    )
    return samples


def bench_binary(rows: int) -> str:
    build = ROOT / "build" / "bench"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "bench", "-j2"], check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run([str(build / "bench"), "--rows", str(rows), "--repeats", "7"], check=True,
                         capture_output=True, text=True)
    return out.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="1024 rows, to check that it runs")
    args = ap.parse_args(argv)
    common.send_outputs_for(args.quick)
    if args.quick:
        args.rows, args.repeats = 1024, 5
    info = common.machine_info()
    t0 = time.time()
    samples = op_targets(args.rows, args.dim, args.repeats)
    ms = {k: common.median(v) * 1e3 for k, v in samples.items()}
    n = {k: len(v) for k, v in samples.items()}
    binary = bench_binary(args.rows)
    ratios = {k: common.ratio_in_shared_rounds(samples[k], samples["clone"]) for k in samples}
    command = common.command_line(__file__, argv)
    body = common.run_header(info, common.loadavg(), time.time() - t0, command)
    body += (f"\nfloat32 x of shape ({args.rows}, {args.dim}), strict angles; medians of interleaved rounds "
             f"(n = {', '.join(str(n[k]) for k in samples)}); rounds' range: the lowest and highest ratio to "
             "the clone of a single round. copy: x copied into a preallocated tensor (no page faults).\n\n")
    limits = {"forward": 1.5, "forward+backward": 3.0}
    labels = {"clone": "x.clone()", "copy": "copy of x into a preallocated tensor", "forward": "goft.rotate forward",
              "forward+backward": "forward + backward (grad x, angles)"}
    rows = []
    for k in samples:
        limit = limits.get(k)
        rows.append([labels[k], f"{ms[k]:.1f}", f"{ratios[k]:.2f}x",
                     common.fmt_range(common.round_ratios(samples[k], samples["clone"])),
                     f"{common.ratio_in_shared_rounds(samples[k], samples['copy']):.2f}x", f"<= {limit:g}x" if limit else "",
                     ("holds" if ratios[k] <= limit else "missed") if limit else ""])
    body += common.md_table(["pass", "ms", "/ clone", "rounds' range", "/ copy", "target (/ clone)", "status"],
                            rows, align="lrrrrrl")
    body += ("\n\nThe torch-free bench binary (`build/bench/bench`, OpenMP, same machine and run); its memcpy "
             "reuses warm buffers:\n\n```\n" + binary.rstrip() + "\n```\n")
    common.write_section("10-core", "Op targets (issue 2) and the C++ bench binary", body,
                         {"ms": ms, "n": n, "samples_ms": {k: [t * 1e3 for t in v] for k, v in samples.items()},
                          "rows": args.rows, "dim": args.dim, "machine": info, "binary": binary,
                          "command": command})
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
