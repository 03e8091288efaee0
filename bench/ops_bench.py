"""Op-level benchmark: goft.rotate against plain PyTorch GOFT implementations, with x.clone() as roofline.

Methods (strict GOFT, (d-1,) angles, no scale):
  goft       torch.ops.goft.rotate, fused forward and backward
  per-layer  bench/baselines.py rotate_per_layer: one layer at a time, elementwise ops on views
  compiled   torch.compile (inductor) of per-layer; rows marked dynamic, one compile per (d, dtype)
  dense      bench/baselines.py rotate_dense: the authors' ICML-era approach (d x d layer matrices)
Passes: "fwd" is the forward of a training step (x and angles require grad); "fwd+bwd" adds
torch.autograd.grad to x and angles. Achieved bandwidth counts the least traffic the pass needs:
fwd reads x and writes y (2 tensors of x's size), fwd+bwd also reads x and grad_y and writes grad_x
(5). The roofline is x.clone() (2 tensors) timed in the same interleaved rounds.

    python bench/ops_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

import common  # noqa: E402
from baselines import rotate_dense, rotate_per_layer  # noqa: E402

STEM = "30-ops"
METHODS = ["goft", "per-layer", "compiled", "dense"]
PASSES = ["fwd", "fwd+bwd"]
TENSORS_PER_PASS = {"fwd": 2, "fwd+bwd": 5}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The dense method's cost above this d is its float32 chain of d x d products (the same for every
# dtype of x, and timed in the float32 rows); bfloat16 is not rerun there, to fit the time budget.
DENSE_LOW_PRECISION_MAX_D = 1024




def bench_dtype(goft, d: int, dtype: torch.dtype, rows_list: List[int], repeats: int, use_compile: bool):
    """Times every method and pass for one (d, dtype) over the row counts; returns result records."""
    gen = torch.Generator().manual_seed(d)
    angles = (torch.rand(d - 1, generator=gen) * 2 - 1) * torch.pi
    pg = angles.clone().requires_grad_()
    impls = {
        "goft": lambda x, p: goft.rotate(x, p),
        "per-layer": rotate_per_layer,
        "dense": rotate_dense,
    }
    compile_s = None
    if use_compile:
        torch._dynamo.reset()
        impls["compiled"] = torch.compile(rotate_per_layer)
    records = []
    for rows in rows_list:
        x = torch.randn(rows, d, generator=gen).to(dtype)
        xg = x.clone().requires_grad_()
        g = torch.randn(rows, d, generator=gen).to(dtype)
        if use_compile:
            # Rows are dynamic from the first call, so one compile should serve every row count;
            # each row count still gets an untimed first call here, so that a recompile (or
            # anything else done once) never lands in a timed sample.
            if compile_s is None:
                torch._dynamo.mark_dynamic(xg, 0)
            t0 = time.perf_counter()
            y = impls["compiled"](xg, pg)
            t1 = time.perf_counter()
            torch.autograd.grad(y, (xg, pg), g)
            first = {"fwd": t1 - t0, "bwd": time.perf_counter() - t1}
            if compile_s is None:
                compile_s = first
            else:
                compile_s[f"first call at {rows} rows"] = first["fwd"] + first["bwd"]
            del y
        skip = {"dense"} if dtype != torch.float32 and d > DENSE_LOW_PRECISION_MAX_D else set()
        fns = {"clone": lambda: x.clone()}
        for name, f in impls.items():
            if name in skip:
                continue
            fns[f"{name}|fwd"] = lambda f=f: f(xg, pg)
            fns[f"{name}|fwd+bwd"] = lambda f=f: torch.autograd.grad(f(xg, pg), (xg, pg), g)
        samples = common.time_interleaved(fns, repeats)
        elt = x.element_size()
        for key, ts in samples.items():
            method, _, pss = key.partition("|")
            pss = pss or "fwd"
            t = common.median(ts)
            nbytes = TENSORS_PER_PASS[pss] * rows * d * elt
            # The roofline: a clone scaled to the pass's tensors, timed in the same rounds.
            x_roofline = common.ratio_in_shared_rounds(ts, samples["clone"]) * 2 / TENSORS_PER_PASS[pss]
            # Against goft's same pass, over the rounds both ran (a slow method runs in few).
            goft_key = f"goft|{pss}"
            x_goft = common.ratio_in_shared_rounds(ts, samples[goft_key]) if goft_key in samples else None
            records.append(
                dict(d=d, rows=rows, dtype=str(dtype).replace("torch.", ""), method=method, pass_=pss,
                     ms=t * 1e3, n=len(ts), gbps=nbytes / t / common.GB, x_roofline=x_roofline, x_goft=x_goft)
            )
        print(f"  d={d} rows={rows} {dtype}: " + ", ".join(
            f"{k}={common.median(v) * 1e3:.1f}ms" for k, v in samples.items()), flush=True)
    return records, compile_s


def render(records: List[dict], compile_times: Dict[str, dict], info, load_after, wall, command) -> str:
    by = {(r["d"], r["rows"], r["dtype"], r["method"], r["pass_"]): r for r in records}
    configs = sorted({(r["d"], r["rows"], r["dtype"]) for r in records}, key=lambda c: (c[0], c[1], c[2] != "float32"))
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    out = [common.run_header(info, load_after, wall, command)]
    out.append(
        "Strict GOFT on x of shape (rows, d); angles float32; each time is the median over "
        "interleaved repeats (n = samples; a method whose first, untimed run exceeds 3 s is timed once after it). "
        "`fwd` is a training-mode forward (inputs require grad), `fwd+bwd` adds "
        "`torch.autograd.grad` to x and the angles. Methods: **goft** the fused op; **per-layer** "
        "plain PyTorch, one layer at a time with elementwise ops on strided views "
        "(bench/baselines.py, tested against goft.reference); **compiled** `torch.compile` of "
        "per-layer (inductor, CPU); **dense** the authors' ICML-era approach: each layer's d x d "
        "matrix (sparse COO, as in that code) multiplied in turn into T, then `x @ T` in x's dtype.\n"
    )
    out.append("### Median time, ms (in parentheses: multiple of goft's time over the rounds both ran)\n")
    rows_t = []
    for c in configs:
        for p in PASSES:
            cells = []
            for m in methods:
                r = by.get((*c, m, p))
                if r is None:
                    cells.append("-")
                elif m == "goft" or r.get("x_goft") is None:
                    cells.append(f"{r['ms']:.1f}")
                else:
                    cells.append(f"{r['ms']:.1f} ({r['x_goft']:.1f}x)" + ("" if r["n"] > 1 else " n=1"))
            clone = by.get((*c, "clone", "fwd"))
            rows_t.append([str(c[0]), str(c[1]), c[2], p, f"{clone['ms'] * TENSORS_PER_PASS[p] / 2:.1f}"] + cells)
    out.append(common.md_table(["d", "rows", "dtype", "pass", "clone roofline"] + methods, rows_t))
    out.append(
        "\n`clone roofline` is the time x.clone() took in the same rounds, scaled to the pass's "
        "tensor count (fwd 2, fwd+bwd 5 tensors of x's size).\n"
    )
    out.append("### Achieved bandwidth, GB/s (in parentheses: time / clone roofline)\n")
    rows_b = []
    for c in configs:
        for p in PASSES:
            clone = by.get((*c, "clone", "fwd"))
            cells = []
            for m in methods:
                r = by.get((*c, m, p))
                cells.append("-" if r is None else f"{r['gbps']:.2f} ({r['x_roofline']:.1f}x)")
            rows_b.append([str(c[0]), str(c[1]), c[2], p, f"{clone['gbps']:.2f}"] + cells)
    out.append(common.md_table(["d", "rows", "dtype", "pass", "x.clone()"] + methods, rows_b))
    if any(r["method"] == "dense" for r in records):
        out.append(f"\n`-`: not run. dense in bfloat16 is run up to d={DENSE_LOW_PRECISION_MAX_D}: above, its "
                   "time is the float32 chain of d x d products (row-independent, timed in the float32 rows) "
                   "plus one bfloat16 matmul, and a rerun would not fit the time budget.\n")
    if compile_times:
        parts = []
        for k, v in compile_times.items():
            d_, dt = k.split("/")
            later = "".join(f", {name}: {t:.1f}" for name, t in v.items() if name not in ("fwd", "bwd"))
            parts.append(f"d={d_} {dt}: {v['fwd']:.1f} + {v['bwd']:.1f}{later}")
        out.append("\ntorch.compile of per-layer, seconds for the first call and the first backward (inductor's "
                   "on-disk cache shortens them on a rerun); later row counts' untimed first calls (fwd + bwd) "
                   "show whether anything recompiled: " + "; ".join(parts) + ".\n")
    out.append("\n![op benchmark](op_bench.png)\n")
    return "\n".join(out)


def plot(records: List[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["d"], r["rows"], r["dtype"]) for r in records}, key=lambda c: (c[0], c[1], c[2] != "float32"))
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    by = {(r["d"], r["rows"], r["dtype"], r["method"], r["pass_"]): r for r in records}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    width = 0.8 / len(methods)
    for ax, p in zip(axes, PASSES):
        for i, m in enumerate(methods):
            vals = [by[(*c, m, p)]["x_roofline"] if (*c, m, p) in by else float("nan") for c in configs]
            ax.bar([k + (i - (len(methods) - 1) / 2) * width for k in range(len(configs))], vals, width, label=m)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([f"d={c[0]}\n{c[1]} rows\n{'f32' if c[2] == 'float32' else 'bf16'}" for c in configs], fontsize=8)
        ax.set_title(f"{p}: time / x.clone() roofline (lower is better)")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for checking the script")
    ap.add_argument("--dims", type=int, nargs="+", default=None)
    ap.add_argument("--rows", type=int, nargs="+", default=None)
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = ap.parse_args(argv)
    common.send_outputs_for(args.quick)
    dims = args.dims or ([256, 768] if args.quick else [768, 4096])
    rows_list = args.rows or ([512] if args.quick else [2048, 8192])
    repeats = args.repeats or (3 if args.quick else 7)
    import goft
    info = common.machine_info()
    t_start = time.perf_counter()
    records, compile_times = [], {}
    for d in dims:
        for dt in args.dtypes:
            recs, comp = bench_dtype(goft, d, DTYPES[dt], rows_list, repeats, not args.no_compile)
            records += recs
            if comp:
                compile_times[f"{d}/{dt}"] = comp
    wall = time.perf_counter() - t_start
    command = common.command_line(__file__, argv)
    body = render(records, compile_times, info, common.loadavg(), wall, command)
    plot(records, common.output_path("op_bench.png"))
    common.write_section(STEM, "Op level: goft.rotate vs plain PyTorch", body,
                         {"machine": info, "command": command, "records": records, "compile_s": compile_times, "wall_s": wall})
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
