"""Training-step benchmark: one AdamW step on a DeBERTaV3-base-shaped encoder and a small LLaMA-shaped decoder.

Random weights, float32, train mode, batch 8 x seq 128. Every linear layer of every block is adapted
(DeBERTa: query_proj, key_proj, value_proj, attention.output.dense, intermediate.dense,
output.dense; LLaMA: q/k/v/o_proj, gate/up/down_proj): goft and qgoft via goft.inject (its presets),
PEFT LoRA r=8, OFT and BOFT (PEFT defaults, as in layer_bench.py) on the same names. The heads
stay frozen. "frozen" adapts nothing and trains one scalar gain on the word-embedding output, so
its step still back-propagates through every block: the floor any adapter method pays.

A step is zero_grad, forward with labels (sequence classification / causal LM loss, plus the
qGOFT orthogonality penalty for qgoft), backward, AdamW step.

    python bench/train_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

import common  # noqa: E402

STEM = "50-train"
VARIANTS = ["frozen", "goft", "qgoft", "lora r=8", "oft", "boft"]
DEBERTA_TARGETS = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]




def deberta_v3_base(quick: bool):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    # microsoft/deberta-v3-base's config.json, written out (no download).
    sizes = dict(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        max_position_embeddings=512, type_vocab_size=0, initializer_range=0.02, layer_norm_eps=1e-7,
        relative_attention=True, max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, pad_token_id=0,
        num_labels=2,
    )
    if quick:
        sizes.update(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=1024)
    return DebertaV2ForSequenceClassification(DebertaV2Config(**sizes)), DEBERTA_TARGETS, "seq_cls"


def llama_small(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    if quick:
        sizes.update(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(LlamaConfig(**sizes)), LLAMA_TARGETS, "causal_lm"


MODELS = {
    "DeBERTaV3-base shape": deberta_v3_base,
    "LLaMA-shaped, 4 layers, hidden 1024": llama_small,
}


class _EmbeddingGain(nn.Module):
    """A trainable scalar on the word-embedding output (the frozen variant's only parameter)."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def hook(self, module, inputs, output):
        return output * self.gain


def adapt(base: nn.Module, variant: str, targets: List[str]):
    """A copy of base adapted by ``variant``; returns (model, extra loss term or None)."""
    import goft
    # Every variant keeps the base weights frozen, so the copies share them (one DeBERTa's
    # 128k-token embedding instead of six); only the module structure is copied.
    model = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
    if variant == "frozen":
        model.requires_grad_(False)
        gain = _EmbeddingGain()
        model.add_module("bench_embedding_gain", gain)
        model.get_input_embeddings().register_forward_hook(gain.hook)
        return model, None
    if variant in ("goft", "qgoft"):
        # target_modules=None: goft's preset for the model type, checked against targets below.
        model = goft.inject(model, goft.GOFTConfig(variant=variant))
        adapted = sorted(n for n, m in model.named_modules() if isinstance(m, goft.GivensLinear))
        expected = sorted(n for n, m in base.named_modules()
                          if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets))
        assert adapted == expected, f"goft's preset adapted {len(adapted)} layers, the bench expects {len(expected)}"
        penalty = (lambda: goft.orthogonality_penalty(model)) if variant == "qgoft" else None
        return model, penalty
    from peft import BOFTConfig, LoraConfig, OFTConfig

    configs = {
        "lora r=8": lambda: LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=targets),
        "oft": lambda: OFTConfig(target_modules=targets, oft_block_size=32),
        "boft": lambda: BOFTConfig(target_modules=targets, boft_block_size=4, boft_n_butterfly_factor=1),
    }
    return common.peft_adapted(model, configs[variant]()), None


def make_step(model: nn.Module, batch: Dict[str, torch.Tensor], penalty) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        opt.step()

    return step


def bench_model(title: str, builder, quick: bool, repeats: int, names: List[str], batch_size: int,
                seq: int) -> Tuple[List[dict], Callable[[], None]]:
    """Times a training step of every variant of one model, interleaved. Returns the records and a
    function that adds each step's peak RSS growth to them: call it after every timing, as the
    probe changes glibc's mmap threshold for the rest of the process (common.peak_rss_growth)."""
    torch.manual_seed(0)
    base, targets, task = builder(quick)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch_size, seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = torch.randint(0, 2, (batch_size,), generator=gen) if task == "seq_cls" else ids
    steps, trainable, total, faults = {}, {}, {}, {}
    for name in names:
        model, penalty = adapt(base, name, targets)
        steps[name], faults[name] = common.counting_faults(make_step(model, batch, penalty))
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total[name] = sum(p.numel() for p in model.parameters())
    del base
    # 15 rounds: a single round's ratio strays 10-30% on a shared 2-core machine, and two 5-round
    # runs an hour apart put goft's step at 0.85x and 1.07x LoRA's. A minute per method caps the
    # slow ones (BOFT: about 40 s a step on DeBERTa) at the minimum of 3 samples.
    samples = common.time_interleaved(steps, repeats, budget_s=60.0, slow_s=float("inf"))
    records = []
    reference = samples.get("lora r=8")
    for name in names:
        t = common.median(samples[name])
        vs_lora = common.ratio_in_shared_rounds(samples[name], reference) if reference else None
        records.append(dict(model=title, variant=name, ms=t * 1e3, n=len(samples[name]), vs_lora=vs_lora,
                            round_ratios=common.round_ratios(samples[name], reference) if reference else [],
                            samples_ms=[s * 1e3 for s in samples[name]],
                            **common.fault_summary(faults[name], len(samples[name])),
                            trainable=trainable[name], total=total[name]))
        print(f"  {title} {name}: {t * 1e3:.0f} ms" + (f" ({vs_lora:.2f}x LoRA)" if reference else ""), flush=True)

    def add_memory() -> None:
        for record in records:
            record["rss_growth"] = common.peak_rss_growth(steps[record["variant"]])

    return records, add_memory


def targets(records: List[dict]) -> List[List[str]]:
    """Issue-5 target rows: (what, measured, limit, status)."""
    rows = []
    for r in records:
        if r["variant"] == "goft" and r["vs_lora"] is not None:
            rows.append([f"goft step time / LoRA r=8, {r['model']}", f"{r['vs_lora']:.3f}x", "<= 1.00x",
                         "holds" if r["vs_lora"] <= 1.0 else "missed"])
    return rows


def render(records: List[dict], info, load_after, wall, command, batch_size, seq) -> str:
    out = [common.run_header(info, load_after, wall, command)]
    out.append(
        f"One AdamW step (zero_grad, forward with loss, backward, optimizer step), float32, train "
        f"mode, batch {batch_size} x seq {seq}, random weights; median over interleaved repeats after "
        "one warm-up step each; time / LoRA: the ratio of the medians over the rounds both were timed in "
        "(a slow method gets fewer); rounds' range: the lowest and highest ratio of a single round. "
        "All linear layers of every block adapted (DeBERTa: query/key/value_proj, "
        "attention.output.dense, intermediate.dense, output.dense; LLaMA: q/k/v/o_proj, "
        "gate/up/down_proj); heads frozen. **frozen**: no adapter, one trainable scalar on the "
        "word-embedding output so backward still runs through every block. goft/qgoft via "
        "`goft.inject` (qgoft adds `goft.orthogonality_penalty` to the loss); PEFT LoRA r=8 (alpha 8), "
        "OFT (oft_block_size=32, Cayley-Neumann), BOFT (boft_block_size=4, butterfly factor 1). "
        "Peak RSS growth: VmHWM over the RSS before one step, after the warm-up (optimizer state "
        "already allocated), i.e. activations, gradients and temporaries of the step. Page faults: "
        "minor faults per timed step (median), and the timed steps with 1000 or more (glibc giving "
        "freed memory back to the kernel and faulting it in again; see the layer section).\n"
    )
    rows = []
    for r in records:
        rows.append([r["model"], r["variant"], f"{r['ms']:.0f}", str(r["n"]),
                     "-" if r["vs_lora"] is None else f"{r['vs_lora']:.3f}x",
                     common.fmt_range(r.get("round_ratios", [])), common.fmt_faults(r),
                     common.fmt_bytes(r["rss_growth"]), f"{r['trainable']:,}",
                     f"{100.0 * r['trainable'] / r['total']:.3f}%"])
    out.append(common.md_table(["model", "variant", "step ms", "n", "time / LoRA", "rounds' range",
                                "page faults / step (steps >= 1000)", "peak RSS growth", "trainable params",
                                "trainable %"], rows, align="llrrrrrrrr"))
    tg = targets(records)
    if tg:
        out.append("\n### Issue 5 targets (training step)\n")
        out.append(common.md_table(["target", "measured", "limit", "status"], tg, align="lrrl"))
    out.append("\n![training-step benchmark](train_bench.png)\n")
    return "\n".join(out)


def plot(records: List[dict], path, batch_size: int, seq: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in records))
    names = list(dict.fromkeys(r["variant"] for r in records))
    by = {(r["model"], r["variant"]): r for r in records}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        xs = [k + (i - (len(models) - 1) / 2) * width for k in range(len(names))]
        vals = [by[(m, n)]["vs_lora"] if (m, n) in by and by[(m, n)]["vs_lora"] else float("nan") for n in names]
        bars = ax.bar(xs, vals, width, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel("AdamW step time / LoRA r=8")
    ax.set_title(f"One AdamW step, float32, batch {batch_size} x seq {seq} (dashed: LoRA)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, for checking the script")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args(argv)
    common.send_outputs_for(args.quick)
    repeats = args.repeats or (3 if args.quick else 15)
    batch_size, seq = (2, 32) if args.quick else (8, 128)
    names = list(dict.fromkeys(args.variants))
    info = common.machine_info()
    t_start = time.perf_counter()
    records = []
    memory_probes = []
    for title in args.models:
        timed, add_memory = bench_model(title, MODELS[title], args.quick, repeats, names, batch_size, seq)
        records += timed
        memory_probes.append(add_memory)
    print("  peak RSS growth, after every timing", flush=True)
    for add_memory in memory_probes:
        add_memory()
    del memory_probes
    wall = time.perf_counter() - t_start
    command = common.command_line(__file__, argv)
    body = render(records, info, common.loadavg(), wall, command, batch_size, seq)
    plot(records, common.output_path("train_bench.png"), batch_size, seq)
    common.write_section(STEM, "Training step: DeBERTaV3-base and a small LLaMA", body,
                         {"machine": info, "command": command, "records": records, "wall_s": wall})
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
