"""Sequence-classification fine-tuning of a local transformers model with goft or a PEFT baseline.

The reusable part of ``goft finetune`` and ``goft demo`` beside their data (goft.data): tokenisation, a
plain PyTorch training loop, evaluation, a merge check, and a comparison table.
Every method (GOFT, qGOFT, PEFT LoRA, PEFT OFT, head only) is trained by the same loop on the same
batches from the same initial classifier head, so the table compares the methods and nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from goft.data import Split
from goft.folders import check_model_folder, check_output_folder
from goft.layers import is_conv1d
from goft.presets import CLASSIFICATION_HEAD_NAMES

__all__ = [
    "METHODS",
    "RunConfig",
    "RunResult",
    "check_model_dir",
    "linear_layer_names",
    "evaluate",
    "run",
    "run_isolated",
    "compare",
    "compared_configs",
    "format_table",
    "PeakRSS",
]

# goft variants, then the baselines. "head" trains the classifier head alone (a floor to beat).
METHODS = ("goft", "qgoft", "lora", "oft", "head")
GOFT_METHODS = ("goft", "qgoft")


class OptionError(ValueError):
    """An option that does not fit the model, found once it is loaded, before any training."""


def check_output_dir(path) -> None:
    """Raises ValueError unless ``path`` is a folder or can become one: checked before training,
    which would otherwise be lost when its results cannot be written."""
    check_output_folder(path, "goft finetune", "--output-dir")


# What a run writes into its output folder (the adapter and merged/ for goft methods, comparison.*
# with --compare).
RUN_OUTPUTS = ("adapter", "merged", "metrics.json", "comparison.md", "comparison.json")


def check_no_earlier_run(path) -> None:
    """Raises ValueError if ``path`` holds what an earlier run wrote: a trained adapter is not
    replaced without being asked (the command line's --overwrite)."""
    earlier = [name for name in RUN_OUTPUTS if (Path(path) / name).exists()]
    if earlier:
        raise ValueError(f"goft finetune: --output-dir {str(path)!r} holds an earlier run's {', '.join(earlier)}; "
                         "pass --overwrite to replace them, or another --output-dir")


def check_model_dir(path) -> Path:
    """Raises ValueError (FileNotFoundError where nothing is at ``path``) unless ``path`` is a local
    transformers model directory with a tokenizer."""
    return Path(check_model_folder(path, "goft finetune", "--model"))


# ----------------------------------------------------------------------------------------------
# Peak memory


def _proc_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """Peak growth of this process's resident memory over a ``with`` block, in bytes.

    Linux keeps the high-water mark of the resident set (VmHWM); writing "5" to
    /proc/self/clear_refs resets it to the current size, so the growth is exact and covers every
    allocation (weights' gradients, optimizer state, activations saved for backward), not only
    torch's. Where the reset is refused the block is sampled every 5 ms instead (``exact`` False).
    It measures the process, so runs to compare must each start in a fresh process (``run_isolated``):
    memory freed by an earlier run would be reused without showing up.
    """

    def __init__(self):
        self.start = self.peak = 0
        self.exact = False
        self._stop = None
        self._thread = None

    def __enter__(self):
        self.start = (_proc_kib("VmRSS") or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = _proc_kib("VmHWM") is not None
        except OSError:
            self.exact = False
        if not self.exact:
            self.peak = self.start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, (_proc_kib("VmRSS") or 0) * 1024)

    def __exit__(self, *exc):
        if self.exact:
            self.peak = (_proc_kib("VmHWM") or 0) * 1024
        else:
            self._stop.set()
            self._thread.join()
        return False

    @property
    def growth(self) -> Optional[int]:
        return max(0, self.peak - self.start) if self.start else None


# ----------------------------------------------------------------------------------------------
# Runs


# Learning rates chosen per method on the demo's validation set by bench/demo_compare.py
# (bench/demo_results.md: GOFT 79.9% at 4e-3 against 70.3% at 1e-3, qGOFT 80.9% at 8e-3, LoRA r=8
# 80.0% at 1e-3): the defaults of goft finetune and goft demo for these methods.
TUNED_LR = {"goft": 4e-3, "qgoft": 8e-3, "lora": 1e-3}


def tuned_lr(method: str, otherwise: float) -> float:
    """The learning rate tuned for ``method`` (TUNED_LR), or ``otherwise`` for methods without one."""
    return TUNED_LR.get(method, otherwise)


def run_header(config: "RunConfig") -> str:
    return f"--- {config.label} (lr {config.lr:g}, seed {config.seed}) ---"


@dataclasses.dataclass
class RunConfig:
    """Everything one fine-tuning run needs besides the data."""

    model_dir: str
    method: str = "goft"  # one of METHODS
    scale: bool = False  # GOFT*: a learned per-feature scale after the rotation
    orth_lambda: float = 0.01  # qGOFT penalty strength
    lr: float = 1e-3
    epochs: int = 3
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0
    threads: Optional[int] = None  # torch intra-op threads; None keeps torch's default
    target_modules: Optional[List[str]] = None  # None: every linear layer outside the head
    lora_rank: int = 8
    oft_block_size: int = 32
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_batch_size: int = 64
    eval_before: bool = False  # also evaluate the untrained model
    check_merge: bool = False  # merge the adapter and compare the merged model's predictions
    output_dir: Optional[str] = None  # adapter (goft methods) and metrics.json
    # Also write output_dir/merged: the model with the adapter merged into its weights, a plain
    # transformers model directory with the tokenizer (goft methods).
    save_merged: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"goft finetune: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("lr", "epochs", "batch_size", "max_length", "eval_batch_size", "lora_rank", "oft_block_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"goft finetune: {name} must be positive, got {getattr(self, name)}")
        if self.scale and self.method != "goft":
            raise ValueError(f"goft finetune: scale (GOFT*) applies to method 'goft' only, got {self.method!r}")
        if self.save_merged and not self.output_dir:
            raise ValueError("goft finetune: save_merged writes into output_dir; set output_dir")
        if self.orth_lambda < 0:
            raise ValueError(f"goft finetune: orth_lambda must be >= 0, got {self.orth_lambda}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"goft finetune: threads must be >= 1, got {self.threads}")
        if self.output_dir:
            check_output_dir(self.output_dir)


    @property
    def label(self) -> str:
        """The method's name as the tables print it."""
        if self.method == "goft":
            return "GOFT*" if self.scale else "GOFT"
        if self.method == "qgoft":
            return f"qGOFT (lambda={self.orth_lambda:g})"
        if self.method == "lora":
            return f"PEFT LoRA r={self.lora_rank}"
        if self.method == "oft":
            return f"PEFT OFT b={self.oft_block_size}"
        return "head only"


@dataclasses.dataclass
class RunResult:
    """What one run measured. Times in seconds, memory in bytes."""

    method: str
    label: str
    lr: float
    seed: int
    epochs: int
    accuracy: float
    accuracy_before: Optional[float]
    trainable_params: int  # adapter + head
    adapter_params: int  # trainable parameters outside the classifier head
    head_params: int
    total_params: int
    train_seconds: float
    eval_seconds: float
    peak_rss_growth: Optional[int]
    peak_rss_exact: bool
    threads: int
    final_loss: float
    adapted_layers: int = 0
    adapter_path: Optional[str] = None
    adapter_bytes: Optional[int] = None
    merge: Optional[dict] = None  # agreement of merged and unmerged predictions
    merged_path: Optional[str] = None  # the merged model's directory (save_merged)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _load(config: RunConfig, label_names: Sequence[str]):
    """Loads tokenizer and model from a local directory; returns (tokenizer, model, head module names).

    The head is whatever the checkpoint lacked (a fresh classifier; DeBERTa's pooler too) plus
    the model's classifier/score child, so a fine-tuned checkpoint works as well.
    """
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        raise RuntimeError("goft finetune needs transformers: pip install 'transformers>=4.57' accelerate") from None
    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
    # The seed fixes the fresh head's initial weights: every method compared starts from the same.
    torch.manual_seed(config.seed)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        config.model_dir,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        local_files_only=True,
        output_loading_info=True,
        dtype=torch.float32,
        ignore_mismatched_sizes=True,
    )
    ensure_pad_token(tokenizer, model)
    fresh = freshly_initialised(info)
    modules = dict(model.named_modules())
    heads = {key.rsplit(".", 1)[0] for key in fresh if "." in key and key.rsplit(".", 1)[0] in modules}
    # A classifier/score child is the head also when the checkpoint holds it already (a model
    # saved after fine-tuning), which the loading report above does not show.
    heads |= {name for name, _ in model.named_children() if name in CLASSIFICATION_HEAD_NAMES}
    # A head's own layers (RoBERTa's classifier.dense and classifier.out_proj) are part of it:
    # listed beside it, their parameters would be counted twice.
    heads = {h for h in heads if not any(h.startswith(other + ".") for other in heads)}
    return tokenizer, model, sorted(heads)


def freshly_initialised(loading_info) -> set:
    """The weights ``from_pretrained(..., output_loading_info=True)`` did not take from the
    checkpoint: missing, or of another shape (transformers 5 reports those as (name, shapes)
    tuples, 4.x as names)."""
    mismatched = loading_info.get("mismatched_keys", ())
    return set(loading_info.get("missing_keys", ())) | {k if isinstance(k, str) else k[0] for k in mismatched}


def ensure_pad_token(tokenizer, model) -> None:
    """Gives a tokenizer without a pad token (decoder-only models ship without one) its end-of-text
    token as padding, and the model's config that id: a classifier batches padded texts and reads
    the last token before the padding. Any token works under the attention mask."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def linear_layer_names(model: torch.nn.Module, exclude: Sequence[str] = ()) -> List[str]:
    """Full names of the linear layers (nn.Linear, transformers' Conv1D) outside ``exclude``."""
    return [name for name, module in model.named_modules()
            if (isinstance(module, torch.nn.Linear) or is_conv1d(module))
            and not any(name == e or name.startswith(e + ".") for e in exclude)]


def _check_lengths(model, tokenizer, max_length: int, longest: int) -> None:
    """Refuses tokenized texts longer than the model takes: they would fail inside its position
    embeddings at the first batch that holds one, with an error that does not say why."""
    limits = {"max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
              "the tokenizer's model_max_length": getattr(tokenizer, "model_max_length", None)}
    limits = {k: v for k, v in limits.items() if isinstance(v, int) and 0 < v < 1_000_000}  # huge: unset
    if limits and longest > min(limits.values()):
        source = min(limits, key=limits.get)
        raise OptionError(f"goft finetune: --max-length {max_length} keeps texts of up to {longest} tokens, "
                          f"more than the model takes: {limits[source]} ({source}); pass --max-length "
                          f"{limits[source]} or less")


def _resolve_targets(model, config: RunConfig, heads: Sequence[str]) -> List[str]:
    linear = linear_layer_names(model, exclude=heads)
    if not config.target_modules:
        return linear
    chosen = [n for n in linear if any(n == t or n.endswith("." + t) for t in config.target_modules)]
    missing = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise OptionError(
            f"goft finetune: --target-modules {missing} match no linear layer outside the head; "
            f"the model's linear layers end in {short}"
        )
    return chosen


def _apply_method(model, config: RunConfig, targets: List[str], heads: List[str]):
    """Freezes the model and makes the method's parameters (and the head) trainable; returns the model to train."""
    if config.method in GOFT_METHODS:
        import goft

        goft_config = goft.GOFTConfig(
            variant=config.method,
            scale=config.scale,
            orth_lambda=config.orth_lambda if config.method == "qgoft" else 0.0,
            target_modules=targets,
            modules_to_save=heads,
        )
        return goft.inject(model, goft_config)
    if config.method in ("lora", "oft"):
        _check_method_options(model, config, targets)
        import peft

        if config.method == "lora":
            # alpha = 2r is PEFT's and the LoRA paper's common choice; no dropout, like the goft runs.
            peft_config = peft.LoraConfig(
                r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                target_modules=targets, modules_to_save=heads,
            )
        else:
            peft_config = peft.OFTConfig(
                r=0, oft_block_size=config.oft_block_size, target_modules=targets, modules_to_save=heads,
            )
        return peft.get_peft_model(model, peft_config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in heads:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return model


def _check_method_options(model, config: RunConfig, targets: List[str]) -> None:
    """Refuses what a method's own options cannot do on this model (PEFT's methods only)."""
    if config.method in ("lora", "oft") and importlib.util.find_spec("peft") is None:
        raise OptionError(f"goft finetune: --compare {config.method} needs PEFT: pip install peft")
    if config.method == "oft":
        conv1d = [t for t in targets if is_conv1d(model.get_submodule(t))]
        if conv1d:
            shown = ", ".join(conv1d[:3]) + (", ..." if len(conv1d) > 3 else "")
            raise OptionError(f"goft finetune: --compare oft: PEFT's OFT adapts nn.Linear layers, not transformers' "
                              f"Conv1D (GPT-2 style): {shown}; compare with lora there")
        # PEFT would quietly take another block size for such a layer; the table would then
        # name one the run did not use.
        widths = sorted({model.get_submodule(t).in_features for t in targets})
        if any(width % config.oft_block_size for width in widths):
            raise OptionError(f"goft finetune: --oft-block-size {config.oft_block_size} does not divide every "
                              f"adapted layer's input width {widths}; pick a common divisor")


def check_options(configs: Sequence[RunConfig], split: Split) -> None:
    """Raises OptionError for any option that one of ``configs``' runs would refuse once its model
    is loaded: compare() runs the methods one after another, each in a process of its own, so a
    bad option of the last method would otherwise be found after the others had trained.

    Loads the model once (the configs share it) and trains nothing.
    """
    tokenizer, model, heads = _load(configs[0], split.label_names)
    ids = _tokenize(tokenizer, split.train_texts + split.test_texts, max(c.max_length for c in configs))
    _check_lengths(model, tokenizer, max(c.max_length for c in configs), max(map(len, ids)))
    for config in configs:
        _check_method_options(model, config, _resolve_targets(model, config, heads))


def _tokenize(tokenizer, texts: Sequence[str], max_length: int) -> List[List[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def _collate(ids: Sequence[List[int]], labels: Sequence[int], pad_id: int):
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[row, : len(x)] = 1
    return input_ids, mask, torch.tensor(labels, dtype=torch.long)


def _train_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> List[List[int]]:
    # Shuffled, then sorted by length within windows of 16 batches, then the batches shuffled:
    # padding falls from ~2x to a few percent on short texts while every epoch stays random.
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 16 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def evaluate(model, ids: Sequence[List[int]], labels: Sequence[int], pad_id: int, batch_size: int = 64,
             progress: bool = True, desc: str = "eval") -> Tuple[float, torch.Tensor]:
    """Accuracy and the (n, k) float32 logits, in the order of ``ids``."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    logits = [None] * len(ids)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        input_ids, mask, _ = _collate([ids[i] for i in batch], [0] * len(batch), pad_id)
        out = model(input_ids=input_ids, attention_mask=mask).logits.float()
        for row, i in enumerate(batch):
            logits[i] = out[row]
    model.train(was_training)
    logits = torch.stack(logits)
    accuracy = (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()
    return accuracy, logits


def _penalty_fn(model, config: RunConfig) -> Callable[[], Optional[torch.Tensor]]:
    if config.method == "qgoft" and config.orth_lambda > 0:
        import goft

        return lambda: goft.orthogonality_penalty(model)
    return lambda: None


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def learning_rate_factor(step: int, total_steps: int, warmup_ratio: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of the peak: a linear
    warm-up over ``warmup_ratio`` of the steps (at least one), then a linear decay to zero, the
    GLUE recipe the GOFT paper follows."""
    warmup = max(1, int(warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def _train(model, trainable, train_ids, train_labels, pad_id: int, config: RunConfig):
    """The training loop; returns (seconds, PeakRSS of the loop, smoothed final loss)."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = math.ceil(len(train_ids) / config.batch_size) * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total_steps, config.warmup_ratio))
    penalty = _penalty_fn(model, config)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)  # dropout masks
    lengths = [len(x) for x in train_ids]
    model.train()
    running = float("nan")
    start = time.perf_counter()
    with PeakRSS() as memory:
        for epoch in range(config.epochs):
            bar = tqdm(_train_batches(lengths, config.batch_size, rng), desc=f"train epoch {epoch + 1}/{config.epochs}",
                       unit="batch", disable=not config.progress, leave=False)
            for batch in bar:
                input_ids, mask, y = _collate([train_ids[i] for i in batch], [train_labels[i] for i in batch], pad_id)
                logits = model(input_ids=input_ids, attention_mask=mask).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                extra = penalty()
                total = loss if extra is None else loss + extra
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                running = loss.item() if math.isnan(running) else 0.95 * running + 0.05 * loss.item()
                bar.set_postfix(loss=f"{running:.3f}")
            bar.close()
    return time.perf_counter() - start, memory, running


def _merge_check(model, test_ids, test_labels, pad_id: int, logits: torch.Tensor, config: RunConfig) -> dict:
    """Merges the goft adapter into the weights and compares the plain model's test predictions."""
    import goft

    merged = goft.merge_and_unload(model)
    leftover = [n for n, m in merged.named_modules() if type(m).__module__.startswith("goft")]
    merged_accuracy, merged_logits = evaluate(merged, test_ids, test_labels, pad_id, config.eval_batch_size,
                                              config.progress, "eval merged")
    return {
        "same_predictions": (merged_logits.argmax(-1) == logits.argmax(-1)).sum().item(),
        "examples": len(test_ids),
        "accuracy": merged_accuracy,
        "max_abs_logit_diff": (merged_logits - logits).abs().max().item(),
        "goft_modules_left": len(leftover),
    }


def run(config: RunConfig, split: Split, log: Callable[[str], None] = print) -> RunResult:
    """Fine-tunes ``config.model_dir`` on ``split`` with ``config.method`` and evaluates it on the test side.

    Loads the model with a fresh head seeded by ``config.seed``, applies the method, optionally
    evaluates first, trains, evaluates, then (goft methods) saves the adapter and checks the merged
    model; with ``output_dir`` also writes metrics.json.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    tokenizer, model, heads = _load(config, split.label_names)
    pad_id = tokenizer.pad_token_id
    train_ids = _tokenize(tokenizer, split.train_texts, config.max_length)
    test_ids = _tokenize(tokenizer, split.test_texts, config.max_length)
    _check_lengths(model, tokenizer, config.max_length, max(map(len, train_ids + test_ids)))
    head_params = sum(p.numel() for h in heads for p in model.get_submodule(h).parameters())
    total_params = sum(p.numel() for p in model.parameters())
    targets = _resolve_targets(model, config, heads)

    model = _apply_method(model, config, targets, heads)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    if config.method in GOFT_METHODS:
        import goft

        n_trainable = goft.count_parameters(model)[0]
    log(
        f"{config.label}: {len(targets) if config.method != 'head' else 0} adapted linear layers, "
        f"head {', '.join(heads)}; trainable {n_trainable:,} = adapter {n_trainable - head_params:,} "
        f"+ head {head_params:,} of {total_params:,} parameters"
    )

    accuracy_before = None
    if config.eval_before:
        accuracy_before, _ = evaluate(model, test_ids, split.test_labels, pad_id, config.eval_batch_size,
                                      config.progress, "eval before")
        log(f"test accuracy before fine-tuning: {100 * accuracy_before:.2f}%")

    train_seconds, memory, final_loss = _train(model, trainable, train_ids, split.train_labels, pad_id, config)

    start = time.perf_counter()
    accuracy, logits = evaluate(model, test_ids, split.test_labels, pad_id, config.eval_batch_size,
                                config.progress, "eval")
    eval_seconds = time.perf_counter() - start
    log(f"{config.label}: test accuracy {100 * accuracy:.2f}% after {train_seconds:.1f} s of training")

    result = RunResult(
        method=config.method, label=config.label, lr=config.lr, seed=config.seed, epochs=config.epochs,
        accuracy=accuracy, accuracy_before=accuracy_before,
        trainable_params=n_trainable, adapter_params=n_trainable - head_params, head_params=head_params,
        total_params=total_params, train_seconds=train_seconds, eval_seconds=eval_seconds,
        peak_rss_growth=memory.growth, peak_rss_exact=memory.exact, threads=torch.get_num_threads(),
        final_loss=final_loss, adapted_layers=len(targets) if config.method != "head" else 0,
    )

    if config.output_dir and config.method in GOFT_METHODS:
        import goft

        adapter_dir = Path(config.output_dir) / "adapter"
        adapter_dir.mkdir(parents=True, exist_ok=True)
        goft.save_adapter(model, str(adapter_dir))
        result.adapter_path, result.adapter_bytes = str(adapter_dir), _dir_bytes(adapter_dir)
        log(f"adapter saved to {adapter_dir} ({_human_bytes(result.adapter_bytes)})")

    if config.check_merge and config.method in GOFT_METHODS:
        result.merge = _merge_check(model, test_ids, split.test_labels, pad_id, logits, config)
        log(
            f"merged model: {result.merge['same_predictions']}/{len(test_ids)} identical predictions, max |logit "
            f"difference| {result.merge['max_abs_logit_diff']:.2e}, {result.merge['goft_modules_left']} goft modules left"
        )

    if config.save_merged and config.method in GOFT_METHODS:
        import goft
        from goft.inject import record_merged_checksum
        from goft.io import CONFIG_NAME

        merged_dir = Path(config.output_dir) / "merged"
        # _merge_check merged the model in place already; otherwise merge it now.
        plain = model if result.merge is not None else goft.merge_and_unload(model)
        description = json.loads((Path(result.adapter_path) / CONFIG_NAME).read_text())
        record_merged_checksum(plain, description["tensors_sha256"])
        plain.save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
        result.merged_path = str(merged_dir)
        log(f"merged model saved to {merged_dir} (transformers' from_pretrained loads it; no goft needed)")
    elif config.output_dir and (Path(config.output_dir) / "merged").exists():
        log(f"note: {Path(config.output_dir) / 'merged'} is left from an earlier run, not this one's (no --save-merged)")

    if config.output_dir:
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        described = dataclasses.asdict(config)
        if config.method != "qgoft":
            described["orth_lambda"] = None  # only qGOFT has the penalty
        metrics = {"config": described, "split": split.describe(), "result": result.to_json()}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return result


def _run_child(config: RunConfig, split: Split) -> RunResult:
    return run(config, split)


def compared_configs(config: RunConfig, methods: Sequence[str], lr_of: Callable[[str], float],
                     **changes: Any) -> List[RunConfig]:
    """The runs that ``--compare methods`` adds beside ``config``: each method once, unscaled,
    saving nothing, at ``lr_of(method)``, with ``changes``; not the one that would repeat
    ``config`` (its method without a scale: with ``--scale``, plain GOFT is another run)."""
    return [dataclasses.replace(config, method=m, scale=False, lr=lr_of(m), output_dir=None, save_merged=False,
                                **changes)
            for m in dict.fromkeys(methods) if m != config.method or config.scale]


def run_isolated(config: RunConfig, split: Split) -> RunResult:
    """``run`` in a fresh spawned process, so its time and peak memory owe nothing to earlier runs."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_run_child, config, split).result()


def compare(configs: Sequence[RunConfig], split: Split, log: Callable[[str], None] = print,
            options_checked: bool = False) -> List[RunResult]:
    """Runs each config in its own process on the same split, one after another, once all their
    options are checked (``check_options``, unless the caller has: it loads the model)."""
    if not options_checked:
        check_options(configs, split)
    results = []
    for config in configs:
        log(run_header(config))
        results.append(run_isolated(config, split))
    return results


def _human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def format_table(results: Sequence[RunResult]) -> str:
    """A Markdown table: accuracy, trainable parameters, training time and peak memory per method."""
    rows = [
        "| method | lr | test accuracy | trainable adapter params | + head | train time | peak RSS growth |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        mem = _human_bytes(r.peak_rss_growth) + ("" if r.peak_rss_exact or r.peak_rss_growth is None else " (sampled)")
        rows.append(
            f"| {r.label} | {r.lr:g} | {100 * r.accuracy:.2f}% | {r.adapter_params:,} | {r.head_params:,} "
            f"| {r.train_seconds:.1f} s | {mem} |"
        )
    return "\n".join(rows)
