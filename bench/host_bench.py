"""Host time of one adapted nn.Linear step: the framework's and Python's share of every step.

On a GPU the kernels run asynchronously, so a layer step costs its host time (Python, autograd,
the dispatcher, launches) or its GPU time, whichever is larger; with small batches the host side
can set the pace. This benchmark measures that host time on the CPU at a tiny shape (d = 16,
8 rows, one torch thread), where the kernels themselves cost next to nothing: forward + backward
(`torch.autograd.grad` to x and the trainable parameters) of the frozen layer and of the
variants of bench/layer_bench.py, plus goft on the weight side (`goft.layers.WEIGHT_SIDE = True`:
GivensLinear through `goft.rotated_linear`, the path it takes on CUDA for many rows). Each sample
runs a batch of steps; the variants are interleaved round by round. Then the host time of
qGOFT's orthogonality penalty over a deep model's adapted linears.

    python bench/host_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

import common  # noqa: E402
import layer_bench  # noqa: E402

STEM = "45-host"
WEIGHT_SIDE = "goft, weight side (as on CUDA)"


def measure(d: int, rows: int, steps: int, repeats: int) -> list:
    import goft

    torch.manual_seed(0)
    base = layer_bench.OneLinear(d)
    names = [v for v in layer_bench.VARIANTS if v != "goft weight-rotated"]
    variants = layer_bench.build_variants(base, names)
    variants[WEIGHT_SIDE] = layer_bench.build_variants(base, ["goft"])["goft"]
    x = torch.randn(rows, d).requires_grad_()
    g = torch.randn(rows, d)

    def batch(model, weight_side):
        params = [p for p in model.parameters() if p.requires_grad]

        def run():
            saved = goft.layers.WEIGHT_SIDE
            goft.layers.WEIGHT_SIDE = True if weight_side else saved
            try:
                for _ in range(steps):
                    torch.autograd.grad(model(x), [x] + params, g)
            finally:
                goft.layers.WEIGHT_SIDE = saved

        return run

    fns = {name: batch(m, name == WEIGHT_SIDE) for name, m in variants.items()}
    samples = common.time_interleaved(fns, repeats, budget_s=float("inf"), slow_s=float("inf"))
    return [dict(variant=name, us_per_step=1e6 * common.median(s) / steps,
                 ratio=common.ratio_in_shared_rounds(s, samples["frozen"]),
                 n=len(s), d=d, rows=rows, steps=steps) for name, s in samples.items()]


def measure_penalty(num_layers: int, steps: int, repeats: int) -> list:
    """Host time of qGOFT's penalty, forward + backward, on a LLaMA of `num_layers` decoder layers
    (hidden 64) with qGOFT on its 7 linears per layer: goft.orthogonality_penalty, which joins the
    layers' blocks into one tensor per lambda, against the sum of the layers' own terms."""
    import warnings

    import goft
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                                      num_attention_heads=4, vocab_size=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(config)
    goft.inject(model, variant="qgoft", orth_lambda=0.01)
    layers = [m for m in model.modules() if isinstance(m, goft.GivensLinear)]

    def run(penalty):
        def steps_fn():
            for _ in range(steps):
                penalty().backward()
        return steps_fn

    fns = {"goft.orthogonality_penalty(model)": run(lambda: goft.orthogonality_penalty(model)),
           "sum of the layers' terms": run(lambda: torch.stack([m.orthogonality_penalty() for m in layers]).sum())}
    samples = common.time_interleaved(fns, repeats, budget_s=float("inf"), slow_s=float("inf"))
    return [dict(variant=name, ms_per_step=1e3 * common.median(s) / steps, n=len(s), layers=len(layers),
                 steps=steps) for name, s in samples.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, for checking the script")
    args = ap.parse_args(argv)
    common.send_outputs_for(args.quick)
    torch.set_num_threads(1)
    d, rows = 16, 8
    steps, repeats = (20, 3) if args.quick else (200, 15)
    info = common.machine_info()
    t0 = time.perf_counter()
    records = measure(d, rows, steps, repeats)
    penalty_layers = 4 if args.quick else 32
    penalty = measure_penalty(penalty_layers, 2 if args.quick else 10, repeats)
    wall = time.perf_counter() - t0
    command = common.command_line(__file__, argv)
    rows_md = [[r["variant"], f"{r['us_per_step']:.1f}", f"{r['ratio']:.2f}x"] for r in records]
    body = common.run_header(info, common.loadavg(), wall, command)
    body += (f"\nForward + backward of nn.Linear({d}, {d}) on {rows} rows, one torch thread: the time "
             f"on the host per step (median of {repeats} interleaved samples of {steps} steps each), "
             "where the kernels cost next to nothing. A GPU step of the same layer takes at least "
             "this long whatever its kernels' time.\n\n")
    body += common.md_table(["layer", "host time per step, us", "vs frozen"], rows_md, align="lrr")
    body += (f"\nqGOFT's orthogonality penalty, forward + backward, on a LLaMA of {penalty_layers} decoder "
             f"layers with qGOFT on all {penalty[0]['layers']} linears (median of {repeats} interleaved "
             f"samples of {penalty[0]['steps']} steps each):\n\n")
    body += common.md_table(["penalty", "host time per step, ms"],
                            [[r["variant"], f"{r['ms_per_step']:.2f}"] for r in penalty], align="lr")
    common.write_section(STEM, "Host time per layer step", body, {"machine": info, "command": command,
                                                                  "records": records, "penalty": penalty,
                                                                  "wall_s": wall})
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
