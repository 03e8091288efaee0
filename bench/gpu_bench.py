"""GPU benchmark of goft's CUDA kernels against the issue-4 targets; writes bench/RESULTS_GPU.md.

Op: goft.rotate on x of shape (16384, 4096) bfloat16, forward and backward (grad_x and the
parameter gradients), timed with CUDA events (warmup, then the median of repeats) and turned into
achieved bandwidth: bytes the pass must move (forward: read x, write y; backward: read x and
grad_out, write grad_x) over time, next to a device-to-device copy of x timed in the same run;
also goft::rotate_angle_grads (reads x and grad_x, writes nothing row-sized), which
goft.rotated_linear's backward runs for angles without a scale.
Layer: one frozen bf16 nn.Linear(4096, 4096) on 16384 rows, forward + backward (grad of the input
and of the adapter), alone, with goft (GivensLinear, strict GOFT: at this shape it applies the
transform to the weight's rows, goft.layers.WEIGHT_SIDE), the same layer with the transform on x
(GOFT_WEIGHT_SIDE=0), goft.rotated_linear called directly, GivensLinear with GOFT* and with
qGOFT, and PEFT LoRA r=8 and OFT when peft is importable, interleaved over LAYER_ROUNDS rounds
(the median ratio to the frozen layer, with the rounds' range); the targets are checked on the
strict GivensLinear row.
Wide rows: the default kernels against the fallback kernels (GOFT_CUDA_FALLBACK=1; for angles in
backward the strict fallback) and, in backward, the general fallback (GOFT_CUDA_STRICT=0 as well)
at d in WIDE_DIMS, bfloat16 and float32, where the fused variants spill registers
(bench/cuda_registers.py): the numbers that decide which kernel such widths should take.

    python bench/gpu_bench.py [--rows 16384] [--dim 4096] [--repeats 50] [--out bench/RESULTS_GPU.md]

Targets (H100): forward >= 85% and backward >= 70% of the copy's bandwidth; goft layer <= 1.10x
the frozen layer and faster than LoRA r=8. Run it through bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys
import traceback
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import common

BENCH_DIR = pathlib.Path(__file__).resolve().parent
# Where the tensors live; tests/test_gpu_scripts.py runs this script's logic on the CPU.
DEVICE = "cuda"


def fail(message: str) -> None:
    print(f"gpu_bench.py: {message}", file=sys.stderr)
    sys.exit(2)


def cuda_time_ms(fn: Callable[[], object], repeats: int, warmup: int = 10) -> float:
    """Median over `repeats` back-to-back calls of fn, each between two CUDA events.

    No synchronisation between calls: the host queues the next call while the GPU runs this one,
    so launch and planning overhead on the host is hidden as it is in training, not counted as
    GPU time (unless the host falls behind the GPU, which then shows as time).
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def op_rows(rows: int, d: int, repeats: int) -> List[Dict[str, object]]:
    import goft

    torch.manual_seed(0)
    dev = DEVICE
    x = torch.randn(rows, d, device=dev, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    y = torch.empty_like(x)
    angles = 0.1 * torch.randn(d - 1, device=dev)
    blocks = torch.eye(2, device=dev).expand(d - 1, 2, 2) + 0.05 * torch.randn(d - 1, 2, 2, device=dev)
    scale = 1 + 0.1 * torch.randn(d, device=dev)
    backward = torch.ops.goft.rotate_backward.default
    x_bytes = x.numel() * x.element_size()

    copy_ms = cuda_time_ms(lambda: y.copy_(x), repeats)
    copy_bw = 2 * x_bytes / copy_ms / 1e6  # GB/s
    cases = [
        ("copy of x (device to device)", 2, lambda: y.copy_(x), None),
        ("forward, strict", 2, lambda: goft.rotate(x, angles), 0.85),
        ("forward, strict + scale", 2, lambda: goft.rotate(x, angles, scale), 0.85),
        ("forward, quasi", 2, lambda: goft.rotate(x, blocks), 0.85),
        ("backward (grad_x, grad_params), strict", 3, lambda: backward(grad, x, angles, None, False, [True, True, False]), 0.70),
        ("backward, strict + scale", 3, lambda: backward(grad, x, angles, scale, False, [True, True, True]), 0.70),
        ("backward, quasi", 3, lambda: backward(grad, x, blocks, None, False, [True, True, False]), 0.70),
        ("backward, grad_x only", 2, lambda: backward(grad, x, angles, None, False, [True, False, False]), None),
        ("angle gradients from x and grad_x (rotate_angle_grads)", 2,
         lambda: torch.ops.goft.rotate_angle_grads.default(x, grad, angles, False), None),
    ]
    out = []
    for name, tensors, fn, target in cases:
        ms = copy_ms if fn is None else cuda_time_ms(fn, repeats)
        bw = tensors * x_bytes / ms / 1e6
        out.append(dict(name=name, ms=ms, gbps=bw, of_copy=bw / copy_bw, target=target))
    return out


# Widths whose fused kernels hold 2 to 4 chunks per thread, where ptxas reports spills
# (bench/cuda_registers.py), and the fallback kernels they could give way to.
WIDE_DIMS = (8192, 11008, 16384)


# The kernel choices the wide-row table compares, as environment overrides (rotate_api.h).
WIDE_PATHS = {
    "fused": {},
    "fallback": {"GOFT_CUDA_FALLBACK": "1"},
    "general fallback": {"GOFT_CUDA_FALLBACK": "1", "GOFT_CUDA_STRICT": "0"},
}


def wide_rows(rows: int, repeats: int) -> List[Dict[str, object]]:
    """The default kernels vs the fallbacks on wide rows, forward and backward (angles)."""
    import os

    import goft

    backward = torch.ops.goft.rotate_backward.default
    out = []
    for dt in (torch.bfloat16, torch.float32):
        for d in WIDE_DIMS:
            torch.manual_seed(0)
            x = torch.randn(rows, d, device=DEVICE, dtype=dt)
            grad = torch.randn_like(x)
            angles = 0.1 * torch.randn(d - 1, device=DEVICE)
            passes = {
                "forward": lambda: goft.rotate(x, angles),
                "backward": lambda: backward(grad, x, angles, None, False, [True, True, False]),
            }
            for name, fn in passes.items():
                times = {}
                for path, env in WIDE_PATHS.items():
                    if name == "forward" and "GOFT_CUDA_STRICT" in env:
                        continue  # the strict kernels are backward kernels
                    os.environ.update(env)
                    try:
                        times[path] = cuda_time_ms(fn, repeats)
                    finally:
                        for key in env:
                            os.environ.pop(key, None)
                out.append(dict(dtype=str(dt).replace("torch.", ""), d=d, name=name, **times))
            del x, grad
    return out


# The rows the layer targets are judged on: GivensLinear as goft.inject builds it, and PEFT's LoRA.
GOFT_LAYER_ROW = "with goft (GivensLinear, strict)"
LORA_LAYER_ROW = "with PEFT LoRA r=8"


def layer_rows(rows: int, d: int, repeats: int) -> List[Dict[str, object]]:
    import goft

    torch.manual_seed(0)
    dev, dt = DEVICE, torch.bfloat16
    base = nn.Linear(d, d, device=dev, dtype=dt).requires_grad_(False)
    x = torch.randn(rows, d, device=dev, dtype=dt, requires_grad=True)
    grad_y = torch.randn(rows, d, device=dev, dtype=dt)

    layers: Dict[str, Optional[nn.Module]] = {"frozen nn.Linear alone": base}
    variants: Dict[str, Optional[nn.Module]] = {}
    try:
        def givens(config):
            layer = goft.GivensLinear(nn.Linear(d, d, device=dev, dtype=dt))
            layer.base_layer.load_state_dict(base.state_dict())
            layer.add_adapter("default", config)
            layer.set_adapter("default")
            return layer

        g = givens(goft.GOFTConfig())
        layers[GOFT_LAYER_ROW] = g
        # The other variants, after the rows the targets are read from.
        variants["with goft (GivensLinear, GOFT*: scale)"] = givens(goft.GOFTConfig(scale=True))
        variants["with goft (GivensLinear, qGOFT)"] = givens(goft.GOFTConfig(variant="qgoft"))

        class ActivationSide(nn.Module):
            """The same layer with the transform applied to x (goft.layers.WEIGHT_SIDE = False)."""

            def __init__(self, layer):
                super().__init__()
                self.layer = layer

            def forward(self, inp):
                saved = goft.layers.WEIGHT_SIDE
                goft.layers.WEIGHT_SIDE = False
                try:
                    return self.layer(inp)
                finally:
                    goft.layers.WEIGHT_SIDE = saved

        if hasattr(goft.layers, "WEIGHT_SIDE"):
            layers["with goft (GivensLinear, x rotated: GOFT_WEIGHT_SIDE=0)"] = ActivationSide(g)
    except Exception as e:  # the layer API is not what this script expects: say so, go on
        print(f"gpu_bench.py: GivensLinear unavailable ({e!r}); goft layer row skipped", file=sys.stderr)
    if hasattr(goft, "rotated_linear"):

        class WeightRotated(nn.Module):
            """GivensLinear's strict transform (pi * tanh(p)) applied to the weight's rows instead."""

            def __init__(self, lin):
                super().__init__()
                self.lin = lin
                self.p = nn.Parameter(torch.zeros(d - 1, device=dev))

            def forward(self, inp):
                return goft.rotated_linear(inp, self.lin.weight, self.lin.bias, self.p,
                                           angle_parameterisation="tanh")

        layers["with goft.rotated_linear (weight rotated, strict)"] = WeightRotated(base)
    layers.update(variants)
    try:
        from peft import LoraConfig, OFTConfig, get_peft_model

        class Wrap(nn.Module):
            def __init__(self, lin):
                super().__init__()
                self.lin = lin

            def forward(self, inp):
                return self.lin(inp)

        def peft_layer(config):
            lin = nn.Linear(d, d, device=dev, dtype=dt)
            lin.load_state_dict(base.state_dict())
            # The adapted module itself, not the PeftModel wrapper, whose Python forward only adds
            # host time (as the CPU benchmarks, bench/common.py's peft_adapted).
            model = get_peft_model(Wrap(lin), config).get_base_model()
            model.to(dev)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(dt)
            return model

        layers[LORA_LAYER_ROW] = peft_layer(
            LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["lin"]))
        # OFT as in bench/layer_bench.py, tried once first: a PEFT version that cannot run it in
        # bfloat16 on this GPU costs this row only. BOFT is left out here: PEFT compiles its CUDA
        # extension on first use, minutes of a short GPU run.
        try:
            oft = peft_layer(OFTConfig(target_modules=["lin"], oft_block_size=32))
            oft(x).backward(grad_y)
            layers["with PEFT OFT (block 32)"] = oft
        except Exception as e:  # noqa: BLE001 (any failure of PEFT's OFT skips just its row)
            print(f"gpu_bench.py: PEFT OFT row skipped ({e!r})", file=sys.stderr)
    except ImportError:
        layers[LORA_LAYER_ROW] = None

    def make_step(layer):
        def step():
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            layer(x).backward(grad_y)

        return step

    # Every round times each layer in turn, so that drift in clocks, temperature or host load
    # touches all layers alike; one block of steps per layer let two runs minutes apart differ by
    # 15% (bench/GPU_NOTES.md, v9 on the H100). Each row reports the median over rounds of its
    # time and of its ratio to the frozen layer's time in the same round, with the ratios' range.
    steps = {name: make_step(layer) for name, layer in layers.items() if layer is not None}
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for round_index in range(LAYER_ROUNDS):
        for name, step in steps.items():
            times[name].append(cuda_time_ms(step, repeats, warmup=10 if round_index == 0 else 3))
    base = next(iter(steps))
    out = []
    for name, layer in layers.items():
        if layer is None:
            out.append(dict(name=name + " (peft not installed)", ms=None, ratio=None, spread=None))
            continue
        ratios = [t / b for t, b in zip(times[name], times[base])]
        out.append(dict(name=name, ms=statistics.median(times[name]), ratio=statistics.median(ratios),
                        spread=(min(ratios), max(ratios))))
    return out


# Rounds of the layer table (layer_rows).
LAYER_ROUNDS = 5


def markdown(op: List[Dict[str, object]], layer: List[Dict[str, object]], wide: List[Dict[str, object]],
             rows: int, d: int, wide_row_count: int, facts: str) -> str:
    lines = [
        "# goft on a GPU",
        "",
        f"`python bench/gpu_bench.py` (via bench/gpu_check.sh); {facts}.",
        "",
        f"## goft.rotate, x of shape ({rows}, {d}) bfloat16",
        "",
        "Median of CUDA-event timings after warmup. Bandwidth counts the bytes the pass must move "
        "(forward: x read, y written; backward: x and grad_out read, grad_x written), and `of copy` "
        "divides it by the bandwidth of a device-to-device copy of x in the same run.",
        "",
        "| pass | time, us | GB/s | of copy | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in op:
        target = "" if r["target"] is None else f">= {r['target']:.0%}: {'holds' if r['of_copy'] >= r['target'] else 'missed'}"
        lines.append(f"| {r['name']} | {1000 * r['ms']:.1f} | {r['gbps']:.0f} | {r['of_copy']:.1%} | {target} |")
    lines += [
        "",
        f"## One frozen bf16 nn.Linear({d}, {d}) on {rows} rows, forward + backward",
        "",
        "Backward computes the input's gradient and the adapter's; the frozen weight gets none. "
        f"{LAYER_ROUNDS} rounds, each timing every layer in turn (the median of back-to-back "
        "steps); a row gives the median over rounds of its time and of its ratio to the frozen "
        "layer's time in the same round, and the range of those ratios.",
        "",
        "| layer | time, ms | vs frozen | rounds' range |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in layer:
        if r["ms"] is None:
            lines.append(f"| {r['name']} | | | |")
        else:
            low, high = r["spread"]
            lines.append(f"| {r['name']} | {r['ms']:.3f} | {r['ratio']:.3f}x | {low:.3f}-{high:.3f}x |")
    # The targets are judged on the layer goft.inject builds, found by its exact name: if it could
    # not be built, no other goft row stands in for it.
    goft_row = next((r for r in layer if r["name"] == GOFT_LAYER_ROW and r["ms"] is not None), None)
    lora_row = next((r for r in layer if r["name"] == LORA_LAYER_ROW and r["ms"] is not None), None)
    if goft_row is not None:
        verdict = "holds" if goft_row["ratio"] <= 1.10 else "missed"
        lines += ["", f"Target goft <= 1.10x frozen: {verdict} ({goft_row['ratio']:.3f}x)."]
        if lora_row is not None:
            # Both are medians of per-round ratios to the frozen layer of the same round.
            faster = "holds" if goft_row["ratio"] < lora_row["ratio"] else "missed"
            lines.append(f"Target goft faster than LoRA r=8: {faster} ({goft_row['ratio']:.3f}x vs "
                         f"{lora_row['ratio']:.3f}x the frozen layer).")
        lines.append("The targets are checked on GivensLinear, what goft.inject builds. With at least "
                     "as many rows as outputs on CUDA it applies the transform to the weight's rows "
                     "(goft.rotated_linear; bench/GPU_NOTES.md, v8); the `x rotated` row is the same "
                     "layer with the transform on the activations.")
    lines += [
        "",
        f"## Wide rows: fused kernels against the fallback kernels, {wide_row_count} rows",
        "",
        "The fused kernels hold 2 to 4 chunks per thread at these widths, where ptxas reports register "
        "spills (the CUDA register section of bench/RESULTS.md); GOFT_CUDA_FALLBACK=1 forces the "
        "one-block-per-row fallback kernels, for angles in backward the strict fallback (the "
        "default where no fused strict kernel holds the row); `general fallback` adds "
        "GOFT_CUDA_STRICT=0 (block gradients, saved pair inputs). Backward: grad_x and the angle "
        "gradients. `default`: what the planner picks.",
        "",
        "| dtype | d | pass | default, us | fallback, us | general fallback, us | default / fallback |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in wide:
        general = f"{1000 * r['general fallback']:.1f}" if "general fallback" in r else "-"
        lines.append(f"| {r['dtype']} | {r['d']} | {r['name']} | {1000 * r['fused']:.1f} | {1000 * r['fallback']:.1f} "
                     f"| {general} | {r['fused'] / r['fallback']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=str(BENCH_DIR / "RESULTS_GPU.md"))
    args = parser.parse_args()

    if not torch.cuda.is_available():
        fail("no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, e.g. bash bench/gpu_check.sh")
    try:
        import goft
        from goft import _C
    except ImportError as e:
        fail(f"cannot import goft ({e}); build it first: pip install --no-build-isolation .")
    if not getattr(_C, "with_cuda", False):
        fail("goft was built without its CUDA kernels (goft._C.with_cuda is False); rebuild on a machine with nvcc")

    props = torch.cuda.get_device_properties(0)
    facts = (
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"goft {goft.__version__} at commit {common.source_commit()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    wide_row_count = max(1, args.rows // 2)
    measure = {
        "op": lambda: op_rows(args.rows, args.dim, args.repeats),
        "layer": lambda: layer_rows(args.rows, args.dim, max(5, args.repeats // 5)),
        "wide": lambda: wide_rows(wide_row_count, max(10, args.repeats // 2)),
    }
    failed = measure_and_write(
        measure, lambda got: markdown(got["op"], got["layer"], got["wide"], args.rows, args.dim, wide_row_count, facts),
        pathlib.Path(args.out))
    print(pathlib.Path(args.out).read_text())
    print(f"written to {args.out}")
    if failed:
        sys.exit(f"gpu_bench.py: sections failed: {', '.join(failed)}")


def measure_and_write(measure: Dict[str, Callable[[], list]], render: Callable[[Dict[str, list]], str],
                      out: pathlib.Path) -> List[str]:
    """Runs each section in turn and rewrites `out` after each; returns the names that failed.

    A GPU run is short and rare: an error in one section (a kernel path that never ran on a GPU)
    must not discard the sections measured before it. After an error that leaves the CUDA context
    unusable (a kernel fault poisons it) the remaining sections are skipped.
    """
    got: Dict[str, list] = {name: [] for name in measure}
    failed: List[str] = []
    for name, run in measure.items():
        try:
            got[name] = run()
        except Exception:
            traceback.print_exc()
            failed.append(name)
        text = render(got)
        if failed:
            text += "\n" + "".join(f"**The {f} section failed** (its traceback is in this run's log).\n" for f in failed)
        out.write_text(text)
        if failed and not _device_usable():
            print("gpu_bench.py: the device no longer runs work; the remaining sections are skipped", file=sys.stderr)
            break
    return failed


def _device_usable() -> bool:
    try:
        torch.ones(1, device=DEVICE).add_(1)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return True
    except Exception:
        return False


if __name__ == "__main__":
    main()
