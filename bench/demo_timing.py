"""Measures the demo's training and evaluation speed per torch thread count and batch size.

Chooses goft.demo.DemoDefaults' threads and batch size. Each configuration times GOFT training
steps (forward, backward, AdamW) and evaluation batches of all-MiniLM-L6-v2 on the demo's
Rotten Tomatoes snippets in interleaved rounds (median, min, max). The demo runs on 2 cores
shared with other work, so every measurement is made twice: as the machine is, and with one
extra process spinning on a core (what another job does to the demo), and the load average is
recorded next to the numbers. Writes bench/demo_timing.md.

    python bench/demo_timing.py [--threads 1,2] [--batch-sizes 16,32] [--examples 256] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import common
from goft import demo, finetune


def _load_avg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


class _Setup:
    def __init__(self, max_length: int):
        self.split = demo.load_split()
        config = finetune.RunConfig(model_dir=str(demo.find_model_dir()), method="goft", max_length=max_length)
        tokenizer, model, heads = finetune._load(config, self.split.label_names)
        self.targets = finetune._resolve_targets(model, config, heads)
        self.model = finetune._apply_method(model, config, self.targets, heads)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        self.train_ids = finetune._tokenize(tokenizer, self.split.train_texts, max_length)
        self.test_ids = finetune._tokenize(tokenizer, self.split.test_texts, max_length)
        self.pad = tokenizer.pad_token_id


def measure(s: _Setup, threads, batch_sizes, examples: int, rounds: int):
    """Per (threads, batch): training examples/s over rounds, and eval examples/s per thread count."""
    # Rounds interleave the configurations, so a burst of load from other processes hits them
    # all alike rather than whichever happened to run during it.
    lengths = [len(x) for x in s.train_ids]
    plan = {bs: finetune._train_batches(lengths, bs, random.Random(0))[: max(1, examples // bs)] for bs in batch_sizes}
    train_rates = {(t, bs): [] for t in threads for bs in batch_sizes}
    eval_rates = {t: [] for t in threads}
    loads = []
    for rnd in range(rounds + 1):  # round 0 warms allocator and kernels up and is not counted
        for bs in batch_sizes:
            for t in threads:
                torch.set_num_threads(t)
                s.model.train()
                start = time.perf_counter()
                for batch in plan[bs]:
                    x, m, y = finetune._collate([s.train_ids[i] for i in batch],
                                                [s.split.train_labels[i] for i in batch], s.pad)
                    loss = torch.nn.functional.cross_entropy(s.model(input_ids=x, attention_mask=m).logits, y)
                    s.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    s.optimizer.step()
                if rnd:
                    train_rates[(t, bs)].append(sum(len(b) for b in plan[bs]) / (time.perf_counter() - start))
        for t in threads:
            torch.set_num_threads(t)
            start = time.perf_counter()
            finetune.evaluate(s.model, s.test_ids[:examples], s.split.test_labels[:examples], s.pad, 64, progress=False)
            if rnd:
                eval_rates[t].append(min(examples, len(s.test_ids)) / (time.perf_counter() - start))
        loads.append(_load_avg().split(" / ")[0])
        if rnd:
            print(f"  round {rnd}, load {loads[-1]}: " + ", ".join(
                f"{t} thread(s) batch {bs} {train_rates[(t, bs)][-1]:.0f} ex/s" for t in threads for bs in batch_sizes),
                flush=True)
    rows = []
    for bs in batch_sizes:
        for t in threads:
            tr, ev = train_rates[(t, bs)], eval_rates[t]
            rows.append((t, bs, statistics.median(tr), min(tr), max(tr), statistics.median(ev)))
    return rows, loads[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch-sizes", default="16,32")
    parser.add_argument("--examples", type=int, default=256, help="training and test examples timed per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=demo.DEFAULTS.max_length)
    parser.add_argument("--out", default=str(Path(__file__).with_name("demo_timing.md")))
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    machine = common.machine_info()
    s = _Setup(args.max_length)
    n_train, n_test = len(s.train_ids), len(s.test_ids)

    lines = [
        "# goft demo: training speed by thread count and batch size",
        "",
        f"Written by `{' '.join(['python bench/demo_timing.py'] + sys.argv[1:])}` at commit {machine['commit']}, "
        f"{machine['date']} "
        f"(all-MiniLM-L6-v2 + GOFT on all {len(s.targets)} linear layers outside the head, Rotten Tomatoes "
        f"snippets, max length {args.max_length}, length-grouped batches; torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {machine['cpu']}).",
        f"Per round and configuration: {args.examples} training examples (forward, backward, AdamW) and "
        f"{args.examples} test examples in batches of 64; {args.rounds} interleaved rounds after a warm-up round.",
    ]
    for busy in (0, 1):
        spinner = None
        if busy:
            # Another job on the shared machine, reproducibly: one process spinning on a core.
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1.0)
        title = "with one other process spinning on a core" if busy else "the machine as it is"
        print(f"{title}:", flush=True)
        load_before = _load_avg()
        try:
            rows, loads = measure(s, threads, batch_sizes, args.examples, args.rounds)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        best = max(rows, key=lambda r: r[2])
        demo_seconds = 2 * n_train / best[2] + 3 * n_test / best[5]
        lines += [
            "",
            f"## {title[0].upper() + title[1:]}",
            "",
            f"Load average (1/5/15 min) before: {load_before}; 1-minute load per round: {', '.join(loads)}.",
            "",
            "| torch threads | batch | train examples/s (median) | min | max | eval examples/s (median) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [f"| {t} | {bs} | {tr:.1f} | {lo:.1f} | {hi:.1f} | {ev:.1f} |" for t, bs, tr, lo, hi, ev in rows]
        lines += [
            "",
            f"Fastest: {best[0]} thread(s), batch {best[1]}: 2 epochs of {n_train} examples and three passes "
            f"over {n_test} test examples take about {demo_seconds:.0f} s at that speed.",
        ]
        for t in threads:
            speed = [r for r in rows if r[0] == t and r[1] == max(batch_sizes)][0]
            print(f"  {t} thread(s), batch {max(batch_sizes)}: {speed[2]:.1f} ex/s", flush=True)
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
