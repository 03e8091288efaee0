"""Layer-level benchmark: one frozen nn.Linear(d, d), alone and adapted by goft and by PEFT, forward + backward.

Every variant wraps a copy of the same frozen nn.Linear(d, d) (with bias) and runs
``torch.autograd.grad(layer(x), [x] + trainable parameters, grad_y)`` on float32 x of shape
(rows, d) that requires grad, as a layer inside a network does (the gradient to x feeds the layers
below). The frozen layer alone is the baseline; its time is measured in the same interleaved rounds.

Variants: goft (strict, angles pi*tanh(p)), goft+scale (GOFT*), qgoft (free 2x2 blocks), all via
goft.inject; goft weight-rotated (goft's strict transform applied to the weight's rows by
goft.rotated_linear, which GivensLinear uses on CUDA for many rows and not on the CPU); PEFT LoRA r=8 (lora_alpha 8, no
dropout), OFT (PEFT defaults: oft_block_size 32, Cayley-Neumann with 5 terms, no COFT, no block
sharing), BOFT (PEFT defaults: boft_block_size 4, boft_n_butterfly_factor 1).

Each step's minor page faults are counted too: glibc returns freed heap memory to the kernel once
the free space at the heap top passes a threshold it adapts at run time, and a step whose large
temporaries then land on fresh pages pays for faulting them in. goft's layer has two more
x-sized temporaries per step than the frozen layer (the rotated input and its gradient), which
makes that happen on some of its steps and not others. The frozen/goft/LoRA comparison is
therefore run a second time in a child process with glibc's thresholds pinned
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), which separates the kernels' cost from the
allocator's.

    python bench/layer_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

import common  # noqa: E402

STEM = "40-layer"
VARIANTS = ["frozen", "goft", "goft+scale", "qgoft", "goft weight-rotated", "lora r=8", "oft", "boft"]
# Issue 5 targets: goft fwd+bwd time over the frozen layer's, per d.
TIME_TARGETS = {4096: 1.10, 768: 1.20}
# glibc's malloc tunables (mallopt(3)) that stop it adapting its mmap and trim thresholds: large
# blocks come from the heap and freed memory stays mapped.
PINNED_HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}
PINNED_VARIANTS = ["frozen", "goft", "lora r=8"]


class OneLinear(nn.Module):
    """A model holding one linear layer named ``lin``, so goft and PEFT target it by name."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class WeightRotated(nn.Module):
    """goft's strict transform (angles pi * tanh(p), as GivensLinear) applied to the frozen
    layer's weight rows by goft.rotated_linear instead of to x (what GivensLinear does on CUDA)."""

    def __init__(self, base: OneLinear):
        super().__init__()
        self.lin = base.lin.requires_grad_(False)
        self.p = nn.Parameter(torch.zeros(base.lin.in_features - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import goft

        return goft.rotated_linear(x, self.lin.weight, self.lin.bias, self.p, angle_parameterisation="tanh")


def build_variants(base: OneLinear, names: List[str]) -> Dict[str, nn.Module]:
    """Each variant as a module taking x; all share the base layer's weights (copied)."""
    import goft
    from peft import BOFTConfig, LoraConfig, OFTConfig

    peft_configs = {
        "lora r=8": lambda: LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["lin"]),
        "oft": lambda: OFTConfig(target_modules=["lin"], oft_block_size=32),
        "boft": lambda: BOFTConfig(target_modules=["lin"], boft_block_size=4, boft_n_butterfly_factor=1),
    }
    goft_configs = {
        "goft": dict(variant="goft"),
        "goft+scale": dict(variant="goft", scale=True),
        "qgoft": dict(variant="qgoft"),
    }
    out = {}
    for name in names:
        m = copy.deepcopy(base)
        if name == "frozen":
            m.requires_grad_(False)
        elif name == "goft weight-rotated":
            m = WeightRotated(m)
        elif name in goft_configs:
            m = goft.inject(m, goft.GOFTConfig(target_modules=["lin"], **goft_configs[name]))
        else:
            m = common.peft_adapted(m, peft_configs[name]())
        out[name] = m
    return out


def bench_dim(d: int, rows: int, repeats: int, names: List[str],
              quiet: bool = False) -> Tuple[List[dict], Callable[[], None]]:
    """Times every variant at width ``d``, interleaved (``quiet``: progress on stderr). Returns the
    records and a function that adds to them what each variant saves for backward and its peak
    RSS growth: call it after every timing, as the RSS probe changes glibc's mmap threshold for
    the rest of the process (common.peak_rss_growth), and with it the page faults of later steps."""
    gen = torch.Generator().manual_seed(d)
    torch.manual_seed(d)
    base = OneLinear(d)
    variants = build_variants(base, names)
    x = torch.randn(rows, d, generator=gen).requires_grad_()
    g = torch.randn(rows, d, generator=gen)
    x_bytes = x.numel() * x.element_size()
    fns, trainable, faults = {}, {}, {}
    for name, m in variants.items():
        params = [p for p in m.parameters() if p.requires_grad]
        trainable[name] = sum(p.numel() for p in params)
        fns[name], faults[name] = common.counting_faults(
            lambda m=m, params=params: torch.autograd.grad(m(x), [x] + params, g))
    samples = common.time_interleaved(fns, repeats, budget_s=float("inf"), slow_s=float("inf"))
    records = []
    for name, m in variants.items():
        t = common.median(samples[name])
        record = dict(d=d, rows=rows, variant=name, ms=t * 1e3, n=len(samples[name]),
                      ratio=common.ratio_in_shared_rounds(samples[name], samples["frozen"]),
                      round_ratios=common.round_ratios(samples[name], samples["frozen"]),
                      samples_ms=[s * 1e3 for s in samples[name]],
                      **common.fault_summary(faults[name], len(samples[name])), trainable=trainable[name],
                      x_bytes=x_bytes)
        records.append(record)
        print(f"  d={d} {name}: {t * 1e3:.1f} ms ({record['ratio']:.3f}x frozen)",
              file=sys.stderr if quiet else sys.stdout, flush=True)

    def add_memory() -> None:
        for record, (name, m) in zip(records, variants.items()):
            owned = list(m.parameters()) + list(m.buffers())
            saved = common.saved_for_backward(lambda m=m: m(x), exclude=owned)
            record.update(saved_total=saved["total"], saved_activations=saved["activations"],
                          saved_count=saved["count"], rss_growth=common.peak_rss_growth(fns[name]))
            print(f"  d={d} {name}: saved {common.fmt_bytes(saved['total'])}", flush=True)

    return records, add_memory


# Plain PyTorch forms of the same transform in front of the frozen layer (bench/baselines.py), for
# the memory they save for backward; their times are in the op section.
MEMORY_BASELINES = {
    "per-layer PyTorch (autograd through each layer)": "rotate_per_layer",
    "dense chain, as the authors' ICML code": "rotate_dense",
}


def saved_by_baselines(d: int, rows: int) -> List[dict]:
    """What autograd saves for one forward of the frozen layer behind each MEMORY_BASELINES form."""
    import baselines

    gen = torch.Generator().manual_seed(d)
    torch.manual_seed(d)
    layer = OneLinear(d).lin.requires_grad_(False)
    x = torch.randn(rows, d, generator=gen).requires_grad_()
    angles = torch.zeros(d - 1, requires_grad=True)
    records = []
    for label, function in MEMORY_BASELINES.items():
        rotate = getattr(baselines, function)
        saved = common.saved_for_backward(lambda: layer(rotate(x, angles)), exclude=[layer.weight, layer.bias, angles])
        records.append(dict(d=d, rows=rows, implementation=label, saved_total=saved["total"],
                            saved_activations=saved["activations"], saved_count=saved["count"],
                            x_bytes=x.numel() * x.element_size()))
        print(f"  d={d} {label}: saved {common.fmt_bytes(saved['total'])}", flush=True)
    return records


def bench_pinned_heap(dims: List[int], rows: int, repeats: Dict[int, int]) -> List[dict]:
    """bench_dim for PINNED_VARIANTS in a child process whose glibc heap thresholds are pinned."""
    cmd = [sys.executable, __file__, "--pinned-heap-child", "--rows", str(rows), "--dims", *map(str, dims),
           "--repeats-per-dim", json.dumps({str(d): r for d, r in repeats.items()})]
    out = subprocess.run(cmd, env=dict(os.environ, **PINNED_HEAP_ENV), check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout)


def targets(records: List[dict], pinned: List[dict] = ()) -> List[List[str]]:
    """Issue-5 target rows: (what, measured, target, holds)."""
    by = {(r["d"], r["variant"]): r for r in records}
    by_pinned = {(r["d"], r["variant"]): r for r in pinned}
    rows = []
    for d, target in TIME_TARGETS.items():
        for where, table in (("", by), (", glibc heap thresholds pinned", by_pinned)):
            r = table.get((d, "goft"))
            if r is None:
                continue
            lora = table.get((d, "lora r=8"))
            extra = f" (LoRA r=8: {lora['ratio']:.2f}x)" if lora else ""
            rows.append([f"goft fwd+bwd / frozen, d={d}, {r['rows']} rows{where}", f"{r['ratio']:.3f}x{extra}",
                         f"<= {target:.2f}x", "holds" if r["ratio"] <= target else "missed"])
    for (d, v), r in sorted(by.items()):
        if v not in ("goft", "goft+scale", "qgoft", "goft weight-rotated"):
            continue
        f = by.get((d, "frozen"))
        if f is None:
            continue
        # Beyond x, the op saves its parameter-sized inputs (the angle parameters, and the scale
        # for GOFT*): O(d) bytes, which the limit allows up to 1% of x.
        excess = r["saved_total"] - f["saved_total"] - r["x_bytes"]
        rows.append([f"{v} saved for backward, d={d}",
                     f"{common.fmt_bytes(r['saved_total'])} = frozen + x {'+' if excess >= 0 else '-'} "
                     f"{common.fmt_bytes(abs(excess))}",
                     f"<= frozen + x = {common.fmt_bytes(f['saved_total'] + r['x_bytes'])} (+1% of x)",
                     "holds" if excess <= 0.01 * r["x_bytes"] else "missed"])
    return rows


def render(records: List[dict], pinned: List[dict], memory: List[dict], info, load_after, wall, command) -> str:
    out = [common.run_header(info, load_after, wall, command)]
    out.append(
        "One `nn.Linear(d, d)` (bias, frozen) on float32 x of shape (rows, d) requiring grad; "
        "forward + `torch.autograd.grad` to x and the trainable parameters; median over interleaved "
        "repeats, ratio to the frozen layer alone measured in the same rounds (rounds' range: the "
        "lowest and highest ratio of a single round). goft variants via "
        "`goft.inject` (strict: angles pi*tanh(p); goft+scale: GOFT* per-feature scale; qgoft: free "
        "2x2 blocks); goft weight-rotated: the strict transform applied to the weight's rows by "
        "`goft.rotated_linear` (what `goft.inject`'s layers run for CUDA inputs with at least as "
        "many rows as outputs; on the CPU they rotate x). PEFT: LoRA r=8 (alpha 8, no "
        "dropout); OFT defaults (oft_block_size=32, "
        "Cayley-Neumann 5 terms); BOFT defaults (boft_block_size=4, boft_n_butterfly_factor=1). "
        "Saved for backward: unique storages packed by `saved_tensors_hooks` during the forward "
        "(total, and activations = excluding the layer's own parameters and buffers). Peak RSS "
        "growth: VmHWM over the RSS before one forward + backward. Page faults: minor faults per "
        "timed step (median), and the number of timed steps with 1000 or more (4 MiB of fresh "
        "pages).\n"
    )
    rows = []
    for r in records:
        rows.append([str(r["d"]), str(r["rows"]), r["variant"], f"{r['ms']:.1f}", str(r["n"]), f"{r['ratio']:.3f}x",
                     common.fmt_range(r["round_ratios"]), common.fmt_faults(r),
                     common.fmt_bytes(r["saved_total"]), common.fmt_bytes(r["saved_activations"]),
                     common.fmt_bytes(r["rss_growth"]), f"{r['trainable']:,}"])
    out.append(common.md_table(
        ["d", "rows", "variant", "ms", "n", "time / frozen", "rounds' range", "page faults / step (steps >= 1000)",
         "saved (total)", "saved (activations)", "peak RSS growth", "trainable"],
        rows, align="lrlrrrrrrrrr"))
    if memory:
        out.append("\nSaved for backward by plain PyTorch forms of the same transform in front of the same "
                   "frozen layer (`bench/baselines.py`; memory only, their times are in the op section):\n")
        out.append(common.md_table(
            ["d", "rows", "implementation", "saved (total)", "saved (activations)", "activations / x"],
            [[str(r["d"]), str(r["rows"]), r["implementation"], common.fmt_bytes(r["saved_total"]),
              common.fmt_bytes(r["saved_activations"]), f"{r['saved_activations'] / r['x_bytes']:.2f}"]
             for r in memory],
            align="lrlrrr"))
    if pinned:
        env = " ".join(f"{k}={v}" for k, v in PINNED_HEAP_ENV.items())
        out.append(f"\nThe same with glibc's heap thresholds pinned (a child process with `{env}`; "
                   "same repeats):\n")
        out.append(common.md_table(
            ["d", "rows", "variant", "ms", "n", "time / frozen", "rounds' range", "page faults / step (steps >= 1000)"],
            [[str(r["d"]), str(r["rows"]), r["variant"], f"{r['ms']:.1f}", str(r["n"]), f"{r['ratio']:.3f}x",
              common.fmt_range(r["round_ratios"]), common.fmt_faults(r)] for r in pinned],
            align="lrlrrrrr"))
        out.append(reading(records, pinned))
    t = targets(records, pinned)
    if t:
        out.append("\n### Issue 5 targets (layer level)\n")
        out.append(common.md_table(["target", "measured", "limit", "status"], t, align="lrrl"))
    out.append("\n![layer benchmark](layer_bench.png)\n")
    return "\n".join(out)


def reading(records: List[dict], pinned: List[dict]) -> str:
    """What the fault counts say, per d, in words computed from the numbers."""
    by = {(r["d"], r["variant"]): r for r in records}
    by_pinned = {(r["d"], r["variant"]): r for r in pinned}
    lines = ["\nReading:\n"]
    for d in sorted({r["d"] for r in pinned}):
        f, g = by.get((d, "frozen")), by.get((d, "goft"))
        fp, gp = by_pinned.get((d, "frozen")), by_pinned.get((d, "goft"))
        if not (f and g and fp and gp):
            continue
        said = (f"- d={d}: with the default allocator goft faulted on {g['faulting_steps']}/{g['n']} "
                f"timed steps (frozen: {f['faulting_steps']}/{f['n']}) and took {g['ratio']:.3f}x the "
                f"frozen layer; with the heap thresholds pinned {gp['faulting_steps']}/{gp['n']} (frozen: "
                f"{fp['faulting_steps']}/{fp['n']}) and {gp['ratio']:.3f}x. ")
        if g["faulting_steps"] - f["faulting_steps"] > gp["faulting_steps"] - fp["faulting_steps"]:
            said += ("The pinned ratio is the cost of goft's kernels and its extra tensors; the rest is "
                     "glibc giving freed memory back to the kernel and faulting it in again, which a "
                     "training process can stop with the same two environment variables.")
        else:
            said += "Page faults do not tell the two runs apart here: they differ by run-to-run noise."
        lines.append(said)
    return "\n".join(lines) + "\n"


def plot(records: List[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["d"] for r in records})
    names = [v for v in VARIANTS if v != "frozen" and any(r["variant"] == v for r in records)]
    by = {(r["d"], r["variant"]): r for r in records}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(dims)
    for i, d in enumerate(dims):
        xs = [k + (i - (len(dims) - 1) / 2) * width for k in range(len(names))]
        vals = [by[(d, n)]["ratio"] if (d, n) in by else float("nan") for n in names]
        bars = ax.bar(xs, vals, width, label=f"d={d}, {by[(d, 'frozen')]['rows']} rows")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        if d in TIME_TARGETS:
            ax.axhline(TIME_TARGETS[d], color=bars.patches[0].get_facecolor(), lw=0.8, ls="--")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel("fwd+bwd time / frozen nn.Linear")
    ax.set_title("One adapted nn.Linear(d, d), float32 (dashed: goft targets)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for checking the script")
    ap.add_argument("--dims", type=int, nargs="+", default=None)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default: 15 at d<=1024, 9 above)")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--pinned-heap-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeats-per-dim", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    common.send_outputs_for(args.quick)
    if args.pinned_heap_child:
        # Timing-only run for bench_pinned_heap: JSON records on stdout, progress on stderr.
        per_dim = json.loads(args.repeats_per_dim)
        records = []
        for d in args.dims:
            records += bench_dim(d, args.rows, per_dim[str(d)], PINNED_VARIANTS, quiet=True)[0]
        print(json.dumps(records))
        return 0
    dims = args.dims or ([256, 768] if args.quick else [768, 4096])
    rows = args.rows or (1024 if args.quick else 8192)
    names = ["frozen"] + [v for v in args.variants if v != "frozen"]
    info = common.machine_info()
    t_start = time.perf_counter()
    records = []
    repeats = {d: args.repeats or (3 if args.quick else (15 if d <= 1024 else 9)) for d in dims}
    memory_probes = []
    for d in dims:
        timed, add_memory = bench_dim(d, rows, repeats[d], names)
        records += timed
        memory_probes.append(add_memory)
    pinned = []
    if all(v in names for v in PINNED_VARIANTS):
        print("  glibc heap thresholds pinned (child process):", flush=True)
        pinned = bench_pinned_heap(dims, rows, repeats)
    print("  memory, after every timing:", flush=True)
    for add_memory in memory_probes:
        add_memory()
    del memory_probes
    memory = [r for d in dims for r in saved_by_baselines(d, rows)]
    wall = time.perf_counter() - t_start
    command = common.command_line(__file__, argv)
    body = render(records, pinned, memory, info, common.loadavg(), wall, command)
    plot(records, common.output_path("layer_bench.png"))
    common.write_section(STEM, "Layer level: one adapted nn.Linear, forward + backward", body,
                         {"machine": info, "command": command, "records": records, "pinned_heap": pinned,
                          "baselines_saved": memory, "wall_s": wall})
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
