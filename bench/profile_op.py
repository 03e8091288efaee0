"""Where goft's time goes: the op's passes against memory roofs, and a layer's overhead taken apart.

Float32, 8192 rows, d in {768, 4096}; strict GOFT angles, no scale.
1. The op's passes, interleaved with two roofs: x.clone() (a fresh output, as every op that returns
   a new tensor gets: the kernel maps and zeroes its pages on first touch) and x copied into a
   preallocated tensor (DRAM bandwidth alone). Passes: forward; the backward's three kinds (grad_x
   only, which is the forward with transpose; angles only; both), each with the least traffic it
   needs (tensors of x's size read or written).
2. The same passes on one thread: a pass bound by memory barely slows down, one bound by its own
   instructions takes about twice as long.
3. The same passes in a child process with THP_MEM_ALLOC_ENABLE=1 (PyTorch then backs large CPU
   tensors with transparent huge pages): how much of each pass is first-touch page faults.
4. One nn.Linear adapted by goft.inject against the frozen layer: fwd + bwd times interleaved,
   and torch.profiler self times grouped into the op's forward, its backward, matmuls and the rest.
Then: the time the layer-level target allows against the op's cost and floors.

    python bench/profile_op.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from typing import Dict, List

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

import common  # noqa: E402
from layer_bench import TIME_TARGETS, OneLinear  # noqa: E402

STEM = "60-profile"
PASSES = ["fwd", "bwd grad_x", "bwd angles", "bwd both"]
# Tensors of x's size each pass must read or write at least.
PASS_TENSORS = {"fwd": 2, "bwd grad_x": 3, "bwd angles": 2, "bwd both": 3, "fwd+bwd": 5}
# torch.profiler event names -> what they are. The Python-registered autograd of goft::rotate
# runs the forward kernel inside an event named GeneratedBackwardFor_goft_rotate_default.
CATEGORIES = {
    "goft::rotate": "goft op, forward",
    "GeneratedBackwardFor_goft_rotate_default": "goft op, forward",
    "goft::rotate_backward": "goft op, backward",
    "GeneratedBackwardFor_goft_rotate_defaultBackward": "goft op, backward",
    "autograd::engine::evaluate_function: GeneratedBackwardFor_goft_rotate_defaultBackward": "goft op, backward",
    "aten::addmm": "matmuls (addmm, mm)",
    "aten::mm": "matmuls (addmm, mm)",
}




def op_passes(goft, d: int, rows: int, repeats: int) -> Dict[str, float]:
    """Median seconds of the two roofs and of each pass of the op."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(rows, d, generator=gen)
    g = torch.randn(rows, d, generator=gen)
    into = torch.empty_like(x)
    angles = (torch.rand(d - 1, generator=gen) * 2 - 1) * torch.pi
    bwd = torch.ops.goft.rotate_backward.default
    fns = {
        "clone": lambda: x.clone(),
        "copy": lambda: into.copy_(x),
        "fwd": lambda: goft.rotate(x, angles),
        "bwd grad_x": lambda: bwd(g, x, angles, None, False, [True, False, False]),
        "bwd angles": lambda: bwd(g, x, angles, None, False, [False, True, False]),
        "bwd both": lambda: bwd(g, x, angles, None, False, [True, True, False]),
    }
    samples = common.time_interleaved(fns, repeats, budget_s=float("inf"), slow_s=float("inf"))
    return {k: common.median(v) for k, v in samples.items()}


def op_passes_thp(d: int, rows: int, repeats: int) -> Dict[str, float]:
    """op_passes in a child process with PyTorch's huge-page allocation switched on."""
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1")
    cmd = [sys.executable, __file__, "--passes-json", str(d), str(rows), str(repeats)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def layer_costs(goft, d: int, rows: int, repeats: int, iters: int) -> dict:
    """Frozen vs goft layer: interleaved fwd + bwd medians, and profiler self ms per category."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(d)
    base = OneLinear(d).requires_grad_(False)
    adapted = goft.inject(OneLinear(d).requires_grad_(False), goft.GOFTConfig(target_modules=["lin"]))
    adapted.lin.base_layer.load_state_dict(base.lin.state_dict())
    x = torch.randn(rows, d).requires_grad_()
    g = torch.randn(rows, d)
    fns = {}
    for name, m in (("frozen", base), ("goft", adapted)):
        params = [x] + [p for p in m.parameters() if p.requires_grad]
        fns[name] = lambda m=m, params=params: torch.autograd.grad(m(x), params, g)
    samples = common.time_interleaved(fns, repeats, budget_s=float("inf"), slow_s=float("inf"))
    out = {"ms": {k: common.median(v) * 1e3 for k, v in samples.items()}, "categories": {}}
    for name, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                fn()
        per = defaultdict(float)
        for evt in prof.key_averages():
            per[CATEGORIES.get(evt.key, "everything else")] += evt.self_cpu_time_total / 1e3 / iters
        out["categories"][name] = dict(per)
    return out


def _floor(t: Dict[str, float], p: str, roof: str) -> float:
    return PASS_TENSORS[p] * t[roof] / 2


def render(results: List[dict], info, load_after, wall, command) -> str:
    out = [common.run_header(info, load_after, wall, command)]
    out.append(
        "Floors: a pass's tensors of x's size (fwd 2, bwd grad_x 3, bwd angles 2, bwd both 3) times "
        "half the time of the roof, timed in the same interleaved rounds: **clone** (a fresh output "
        "tensor, page faults included, as every op that returns a new tensor pays) and **copy** (x "
        "copied into a preallocated tensor: memory bandwidth alone). `bwd grad_x` is `rotate_backward` "
        "asked for grad_x only (the transposed forward), `bwd angles` for the angles only, `bwd both` "
        "for both (a layer with trainable layers below it). THP: the same in a child process with "
        "`THP_MEM_ALLOC_ENABLE=1`.\n"
    )
    out.append("### The op's passes against the roofs, on one thread, and with huge pages\n")
    rows = []
    for r in results:
        t, t1, th = r["passes"], r["passes_1thread"], r["passes_thp"]
        for p in PASSES:
            rows.append([str(r["d"]), p, f"{t[p] * 1e3:.1f}", f"{t[p] / _floor(t, p, 'clone'):.2f}x",
                         f"{t[p] / _floor(t, p, 'copy'):.2f}x", f"{t1[p] * 1e3:.1f} ({t1[p] / t[p]:.2f}x)",
                         f"{th[p] * 1e3:.1f} ({th[p] / t[p]:.2f}x)"])
        for roof in ("clone", "copy"):
            rows.append([str(r["d"]), f"*x.{roof}()*" if roof == "clone" else "*copy into preallocated*",
                         f"{t[roof] * 1e3:.1f}", "", "", f"{t1[roof] * 1e3:.1f} ({t1[roof] / t[roof]:.2f}x)",
                         f"{th[roof] * 1e3:.1f} ({th[roof] / t[roof]:.2f}x)"])
    threads = results[0]["threads"]
    out.append(common.md_table(
        ["d", "pass", f"ms ({threads} threads)", "/ clone floor", "/ copy floor", "ms, 1 thread (/ all)",
         "ms, THP (/ without)"], rows, align="llrrrrr"))
    out.append(f"\n{results[0]['rows']} rows, float32. A pass bound by memory stays near a floor; on "
               "one thread it slows down about as much as the copies do (if one core cannot saturate the "
               "memory, those slow down too), while one bound by its instructions takes about twice as long.\n")

    out.append("### One adapted nn.Linear: goft's overhead taken apart\n")
    rows = []
    for r in results:
        lc = r["layer"]
        f, g = lc["ms"]["frozen"], lc["ms"]["goft"]
        t = r["passes"]
        op = (t["fwd"] + t["bwd both"]) * 1e3
        target = TIME_TARGETS.get(r["d"])
        allowed = (target - 1.0) * f if target else None
        rows.append([str(r["d"]), f"{f:.1f}", f"{g:.1f}", f"{g - f:+.1f} ({g / f:.3f}x)",
                     "-" if target is None else f"{allowed:.1f} ({target:.2f}x)", f"{op:.1f}",
                     f"{_floor(t, 'fwd+bwd', 'clone') * 1e3:.1f}", f"{_floor(t, 'fwd+bwd', 'copy') * 1e3:.1f}"])
    out.append(common.md_table(
        ["d", "frozen ms", "goft ms", "overhead ms", "overhead the target allows", "op fwd + bwd alone ms",
         "clone floor of fwd + bwd", "copy floor of fwd + bwd"], rows, align="lrrrrrrr"))
    out.append("\nLayer times: medians of interleaved fwd + bwd runs (as in the layer section, fewer "
               "repeats). Op alone: the fwd and bwd both passes above. Floors: 5 tensors of x's size.\n")
    cats = ["matmuls (addmm, mm)", "goft op, forward", "goft op, backward", "everything else"]
    rows = []
    for r in results:
        c = r["layer"]["categories"]
        for name in ("frozen", "goft"):
            vals = [c[name].get(k, 0.0) for k in cats]
            rows.append([str(r["d"]), name] + [f"{v:.1f}" for v in vals] + [f"{sum(vals):.1f}"])
    out.append(f"torch.profiler self time per forward + backward, ms ({results[0]['iters']} iterations; "
               "the matmuls vary by several percent from run to run, so compare the goft rows, "
               "not the totals):\n")
    out.append(common.md_table(["d", "layer"] + cats + ["all"], rows, align="llrrrrr"))
    out.append("")
    out.append("### Reading\n")
    for r in results:
        t, th = r["passes"], r["passes_thp"]
        lc = r["layer"]["ms"]
        op = (t["fwd"] + t["bwd both"]) * 1e3
        op_thp = (th["fwd"] + th["bwd both"]) * 1e3
        target = TIME_TARGETS.get(r["d"])
        t1 = r["passes_1thread"]
        scaling = (t1["fwd"] + t1["bwd both"]) / (t["fwd"] + t["bwd both"])
        line = (f"- d={r['d']}: the op's fwd + bwd takes {op:.1f} ms, "
                f"{op / (_floor(t, 'fwd+bwd', 'clone') * 1e3):.2f}x its clone floor and "
                f"{op / (_floor(t, 'fwd+bwd', 'copy') * 1e3):.2f}x its copy floor; with huge pages "
                f"{op_thp:.1f} ms, "
                + (f"so about {op - op_thp:.1f} ms of it is first-touch page faults on its fresh outputs. "
                   if op_thp < op else
                   "slower: outputs of this size otherwise reuse freed heap memory without page faults, "
                   "while huge-page allocations are mapped and zeroed anew each time. "))
        roof_scaling = max(t1["clone"] / t["clone"], t1["copy"] / t["copy"])
        line += (f"On one thread it takes {scaling:.2f}x as long (a plain copy: {roof_scaling:.2f}x): "
                 + ("more than a copy slows down, so its own instructions weigh in. "
                    if scaling > roof_scaling + 0.2 else
                    "about as much as a copy slows down, so this test cannot tell memory from instructions "
                    "here (one core does not saturate this machine's memory). "))
        if target:
            allowed = (target - 1.0) * lc["frozen"]
            overhead = lc["goft"] - lc["frozen"]
            line += (f"The target allows {allowed:.1f} ms over the frozen layer's {lc['frozen']:.1f} ms; "
                     f"goft's measured overhead is {overhead:.1f} ms "
                     f"({'within' if overhead <= allowed else 'over'} it)"
                     + (f", {overhead - op:+.1f} ms beyond the op alone" if abs(overhead - op) > 0.1 * op else "")
                     + ".")
        out.append(line)
    out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for checking the script")
    ap.add_argument("--passes-json", nargs=3, type=int, metavar=("D", "ROWS", "REPEATS"),
                    help=argparse.SUPPRESS)  # child mode of op_passes_thp
    args = ap.parse_args(argv)
    common.send_outputs_for(args.quick)
    import goft
    if args.passes_json:
        print(json.dumps(op_passes(goft, *args.passes_json)))
        return 0
    dims = [256, 768] if args.quick else [768, 4096]
    rows = 1024 if args.quick else 8192
    repeats = 3 if args.quick else 7
    iters = 2 if args.quick else 3
    info = common.machine_info()
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    results = []
    for d in dims:
        passes = op_passes(goft, d, rows, repeats)
        torch.set_num_threads(1)
        try:
            passes1 = op_passes(goft, d, rows, max(3, repeats // 2))
        finally:
            torch.set_num_threads(threads)
        passes_thp = op_passes_thp(d, rows, repeats)
        # A small layer's fwd + bwd takes ~80 ms, so more repeats cost little and keep one noisy
        # round from moving the median (7 rounds once gave 1.39x where the layer section gave 1.08x).
        layer = layer_costs(goft, d, rows, 3 * repeats if d <= 1024 else max(3, repeats // 2), iters)
        results.append(dict(d=d, rows=rows, threads=threads, passes=passes, passes_1thread=passes1,
                            passes_thp=passes_thp, layer=layer, iters=iters))
        print(f"  d={d}: " + ", ".join(f"{k}={v * 1e3:.1f}ms" for k, v in passes.items())
              + f"; layer frozen {layer['ms']['frozen']:.1f} ms, goft {layer['ms']['goft']:.1f} ms", flush=True)
    wall = time.perf_counter() - t_start
    command = common.command_line(__file__, argv)
    body = render(results, info, common.loadavg(), wall, command)
    common.write_section(STEM, "Profile: where goft's time goes on this CPU", body,
                         {"machine": info, "command": command, "results": results, "wall_s": wall})
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
