"""Measures the demo's training and evaluation speed per torch thread count and batch size.

Chooses goft.demo.DemoDefaults' threads and batch size. Each configuration times GOFT training
steps (forward, backward, AdamW) and evaluation batches of all-MiniLM-L6-v2 on the demo's
Rotten Tomatoes snippets in interleaved rounds (median, min, max), and the load average is
recorded next to the numbers because the 2 cores are shared. Writes bench/demo_timing.md.

    python bench/demo_timing.py [--threads 1,2] [--batch-sizes 16,32] [--examples 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from goft import demo, finetune


def _load_avg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch-sizes", default="16,32")
    parser.add_argument("--examples", type=int, default=256, help="training and test examples timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=demo.DEFAULTS.max_length)
    parser.add_argument("--out", default=str(Path(__file__).with_name("demo_timing.md")))
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    split = demo.load_split()
    config = finetune.RunConfig(model_dir=str(demo.find_model_dir()), method="goft", max_length=args.max_length)
    tokenizer, model, heads = finetune._load(config, split.label_names)
    targets = finetune._resolve_targets(model, config, heads)
    model = finetune._apply_method(model, config, targets, heads)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    train_ids = finetune._tokenize(tokenizer, split.train_texts, args.max_length)
    test_ids = finetune._tokenize(tokenizer, split.test_texts, args.max_length)
    pad = tokenizer.pad_token_id
    lengths = [len(x) for x in train_ids]
    load_before = _load_avg()

    # Rounds interleave the configurations, so a burst of load from other processes hits them
    # all alike rather than whichever happened to run during it.
    import random

    plan = {bs: finetune._train_batches(lengths, bs, random.Random(0))[: max(1, args.examples // bs)] for bs in batch_sizes}
    train_rates = {(t, bs): [] for t in threads for bs in batch_sizes}
    eval_rates = {t: [] for t in threads}
    loads = []
    for rnd in range(args.rounds + 1):  # round 0 warms allocator and kernels up and is not counted
        for bs in batch_sizes:
            for t in threads:
                torch.set_num_threads(t)
                model.train()
                start = time.perf_counter()
                for batch in plan[bs]:
                    x, m, y = finetune._collate([train_ids[i] for i in batch], [split.train_labels[i] for i in batch], pad)
                    loss = torch.nn.functional.cross_entropy(model(input_ids=x, attention_mask=m).logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                if rnd:
                    train_rates[(t, bs)].append(sum(len(b) for b in plan[bs]) / (time.perf_counter() - start))
        for t in threads:
            torch.set_num_threads(t)
            start = time.perf_counter()
            finetune.evaluate(model, test_ids[: args.examples], split.test_labels[: args.examples], pad, 64, progress=False)
            if rnd:
                eval_rates[t].append(min(args.examples, len(test_ids)) / (time.perf_counter() - start))
        loads.append(_load_avg().split(" / ")[0])
        print(f"round {rnd}: load {loads[-1]}: " + ", ".join(
            f"{t}t/b{bs} {train_rates[(t, bs)][-1]:.0f}" for t in threads for bs in batch_sizes if rnd), flush=True)

    rows = []
    for bs in batch_sizes:
        for t in threads:
            tr, ev = train_rates[(t, bs)], eval_rates[t]
            rows.append((t, bs, statistics.median(tr), min(tr), max(tr), statistics.median(ev)))
    best = max(rows, key=lambda r: r[2])
    demo_seconds = (2 * len(train_ids)) / best[2] + 3 * len(test_ids) / best[5]
    lines = [
        "# goft demo: training speed by thread count and batch size",
        "",
        f"all-MiniLM-L6-v2 + GOFT on all {len(targets)} linear layers outside the head, "
        f"Rotten Tomatoes snippets (max length {args.max_length}, length-grouped batches), "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}).",
        f"Per round and configuration: {args.examples} training examples (forward, backward, AdamW) and "
        f"{args.examples} test examples in batches of 64; {args.rounds} interleaved rounds after one warm-up round.",
        f"Load average (1/5/15 min) before: {load_before}, after: {_load_avg()}; 1-minute load per round: "
        f"{', '.join(loads[1:])} (the 2 cores are shared with other processes).",
        "",
        "| torch threads | batch | train examples/s (median) | min | max | eval examples/s (median) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {t} | {bs} | {tr:.1f} | {lo:.1f} | {hi:.1f} | {ev:.1f} |" for t, bs, tr, lo, hi, ev in rows]
    lines += [
        "",
        f"Fastest training: {best[0]} thread(s), batch {best[1]}. At that speed, 2 epochs of {len(train_ids)} "
        f"examples and three passes over {len(test_ids)} test examples take about {demo_seconds:.0f} s.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
