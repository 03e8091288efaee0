"""The `goft` command line: `goft demo`, `goft finetune` and `goft merge`. It parses and checks the
options and the data, then leaves the work to goft.demo, goft.finetune and goft.export."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from goft.export import DTYPES
from goft.finetune import GOFT_METHODS, METHODS, TUNED_LR


def _number(text: str, kind: type, expected: str, accept) -> float:
    # argparse reports a ValueError by the converter's name ("invalid _positive_int value"); say
    # what is expected instead.
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v >= 1)


def _positive_float(text: str) -> float:
    return _number(text, float, "a positive finite number", lambda v: 0 < v < math.inf)


def _non_negative_float(text: str) -> float:
    return _number(text, float, "a finite number >= 0", lambda v: 0 <= v < math.inf)


def _method_list(text: str) -> List[str]:
    methods = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(METHODS)}, got {text!r}")
    return methods


def _name_list(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_training_options(p: argparse.ArgumentParser, *, epochs: int, batch_size: int,
                          max_length: int, seed: int, threads: Optional[int], orth_lambda: float) -> None:
    g = p.add_argument_group("method and training")
    g.add_argument("--variant", choices=GOFT_METHODS, default="goft",
                   help="goft: strict Givens rotations; qgoft: free 2x2 blocks kept near-orthogonal (default goft)")
    g.add_argument("--scale", action="store_true", help="GOFT*: also learn a per-feature scale (goft variant only)")
    # None until _check_common: an --orth-lambda that no qGOFT run would use is refused there.
    g.add_argument("--orth-lambda", type=_non_negative_float, default=None,
                   help=f"qGOFT orthogonality penalty strength (default {orth_lambda:g}; qgoft runs only)")
    p.set_defaults(default_orth_lambda=orth_lambda)
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="AdamW learning rate (default: the variant's rate tuned on the demo's data, " +
                        ", ".join(f"{method} {TUNED_LR[method]:g}" for method in GOFT_METHODS) +
                        ": bench/demo_results.md)")
    g.add_argument("--epochs", type=_positive_int, default=epochs, help=f"default {epochs}")
    g.add_argument("--batch-size", type=_positive_int, default=batch_size, help=f"default {batch_size}")
    g.add_argument("--max-length", type=_positive_int, default=max_length,
                   help=f"truncate texts to this many tokens (default {max_length})")
    g.add_argument("--seed", type=int, default=seed, help=f"seed of the head's init, shuffling and dropout (default {seed})")
    g.add_argument("--threads", type=_positive_int, default=threads,
                   help="torch intra-op threads" + (f" (default {threads}, measured fastest)" if threads else
                                                    " (default: torch's choice)"))
    g.add_argument("--compare", type=_method_list, action="extend", default=[], metavar="METHODS",
                   help="also train these on the same split, each in a fresh process, and print a table: "
                        "comma-separated lora (PEFT LoRA r=8), oft (PEFT OFT), goft, qgoft, head (head only)")
    g.add_argument("--compare-lr", type=_positive_float, default=None,
                   help="learning rate of the compared methods (default: each method's tuned rate, " +
                        ", ".join(f"{method} {lr:g}" for method, lr in TUNED_LR.items()) + "; the others --lr)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from goft.demo import DEFAULTS, INSTALL_COMMAND

    parser = argparse.ArgumentParser(prog="goft", description="Givens orthogonal fine-tuning (GOFT, qGOFT).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,finetune,merge}")

    demo = sub.add_parser(
        "demo", help="fine-tune pretrained all-MiniLM-L6-v2 on Rotten Tomatoes sentiment, offline, in minutes",
        description="Fine-tunes the pretrained all-MiniLM-L6-v2 encoder with GOFT on a balanced split of "
                    "Rotten Tomatoes snippets, reports accuracy before and after, merges the adapter and "
                    f"checks the merged predictions, and saves the adapter. Needs: {INSTALL_COMMAND}",
    )
    _add_training_options(demo, epochs=DEFAULTS.epochs, batch_size=DEFAULTS.batch_size,
                          max_length=DEFAULTS.max_length, seed=DEFAULTS.seed, threads=DEFAULTS.threads,
                          orth_lambda=DEFAULTS.orth_lambda)
    d = demo.add_argument_group("data and output")
    d.add_argument("--max-train", type=_positive_int, default=DEFAULTS.n_train,
                   help=f"training examples, balanced (default {DEFAULTS.n_train})")
    d.add_argument("--max-test", type=_positive_int, default=DEFAULTS.n_test,
                   help=f"test examples, balanced (default {DEFAULTS.n_test})")
    d.add_argument("--output-dir", default="runs/demo", help="adapter and metrics.json (default runs/demo)")

    ft = sub.add_parser(
        "finetune", help="sequence classification with a transformers model and a CSV/TSV or JSON Lines file",
        description="Fine-tunes a transformers model (a local directory or a Hugging Face Hub repository) for "
                    "sequence classification on a CSV or TSV file (header row required) or JSON Lines with GOFT "
                    "or qGOFT, optionally next to PEFT baselines.",
    )
    io = ft.add_argument_group("model and data")
    io.add_argument("--model", required=True, help="transformers model: a local directory (config.json, weights, "
                    "tokenizer) or a Hugging Face Hub repository id (owner/name, or an early model's bare name such as "
                    "bert-base-uncased), downloaded into its cache")
    io.add_argument("--model-revision", default=None, help="branch, tag or commit of the --model Hub repository")
    io.add_argument("--data", required=True, help="CSV/TSV file (.csv, .tsv) with a header row, or JSON Lines (.jsonl: "
                    "one object per line, keyed by column); also compressed (.gz/.bz2/.xz)")
    io.add_argument("--test-data", default=None, help="a separate test file with the same columns "
                                                     "(default: a seeded stratified split of --data)")
    io.add_argument("--text-column", default="text", help="default 'text'")
    io.add_argument("--label-column", default="label", help="default 'label'")
    io.add_argument("--keep-labels", type=_name_list, default=None, metavar="A,B,...",
                    help="only keep rows with these labels")
    io.add_argument("--test-fraction", type=float, default=None,
                    help="test share when splitting --data (default 0.2; not with --test-data)")
    io.add_argument("--max-train", type=_positive_int, default=None, help="cap on training examples (stratified)")
    io.add_argument("--max-test", type=_positive_int, default=None, help="cap on test examples (stratified)")
    io.add_argument("--split-seed", type=int, default=0, help="seed of the train/test split (default 0)")
    io.add_argument("--target-modules", type=_name_list, default=None, metavar="NAMES",
                    help="comma-separated layer names or suffixes to adapt, for every method "
                         "(default: every linear layer outside the classifier head)")
    io.add_argument("--lora-rank", type=_positive_int, default=8, help="rank of --compare lora (default 8)")
    io.add_argument("--oft-block-size", type=_positive_int, default=32, help="block size of --compare oft (default 32)")
    io.add_argument("--output-dir", default=None, help="where to write the adapter and metrics.json")
    io.add_argument("--overwrite", action="store_true",
                    help="replace the results of an earlier run in --output-dir (refused without it)")
    io.add_argument("--save-merged", action="store_true",
                    help="also write OUTPUT_DIR/merged: the model with the adapter merged into its weights and the "
                         "tokenizer, a plain transformers model directory (no goft needed to run it)")
    _add_training_options(ft, epochs=3, batch_size=32, max_length=128, seed=0, threads=None,
                          orth_lambda=0.01)

    mg = sub.add_parser(
        "merge", help="merge a saved adapter into its base model: a plain transformers model folder",
        description="Loads the base model as the class the adapter was trained on, merges the adapter into its "
                    "weights and saves the plain model (with the base folder's tokenizer or image processor), which "
                    "transformers runs at the base model's cost without goft.",
    )
    mg.add_argument("--model", required=True, help="the base model: a local transformers folder or a Hugging Face "
                    "Hub repository id (owner/name)")
    mg.add_argument("--model-revision", default=None, help="branch, tag or commit of the --model Hub repository")
    mg.add_argument("--adapter", required=True,
                    help="folder written by goft.save_adapter (or goft finetune), or a Hugging Face Hub repository "
                         "id (owner/name) holding one")
    mg.add_argument("--adapter-revision", default=None, help="branch, tag or commit of the --adapter Hub repository")
    mg.add_argument("--output", required=True, help="new (or empty) folder for the merged model")
    mg.add_argument("--num-labels", type=_positive_int, default=None,
                    help="labels of the classification head the adapter carries, if not the base config's")
    mg.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                    help="dtype of the saved weights (default: that of the base checkpoint)")
    return parser


def _check_common(parser: argparse.ArgumentParser, args) -> None:
    if args.scale and args.variant == "qgoft":
        parser.error("--scale (GOFT*) applies to --variant goft only: qGOFT blocks already learn a norm")
    if args.orth_lambda is not None and args.variant != "qgoft" and "qgoft" not in args.compare:
        parser.error("--orth-lambda sets qGOFT's penalty, which no run here has: pass --variant qgoft (or "
                     "--compare qgoft)")
    if args.orth_lambda is None:
        args.orth_lambda = args.default_orth_lambda


def _demo(parser, args) -> int:
    from goft import demo

    _check_common(parser, args)
    try:
        demo.run_demo(
            variant=args.variant, scale=args.scale, lr=args.lr, orth_lambda=args.orth_lambda, epochs=args.epochs,
            batch_size=args.batch_size, max_length=args.max_length, threads=args.threads, seed=args.seed,
            n_train=args.max_train, n_test=args.max_test, output_dir=args.output_dir,
            compare=args.compare, compare_lr=args.compare_lr, progress=not args.no_progress,
        )
    except demo.MissingDemoPackage as e:
        print(str(e), file=sys.stderr)
        return 1
    except demo.DemoOptionError as e:
        parser.error(str(e))
    return 0


def _finetune(parser, args) -> int:
    from goft import data, finetune
    from goft.folders import resolve_model_directory

    _check_common(parser, args)
    # Everything that can be wrong with the inputs fails here, before a model is loaded.
    try:
        texts, labels = data.read_table(args.data, args.text_column, args.label_column, args.keep_labels)
        absent = sorted(set(args.keep_labels or ()) - set(labels))
        if absent:  # a misspelt label would otherwise just shrink the task
            raise ValueError(f"goft finetune: --keep-labels {', '.join(map(repr, absent))} do not occur in the "
                             f"{args.label_column!r} column of {args.data!r}")
        texts, labels, dropped = data.deduplicate(texts, labels)
        test_texts = test_labels = None
        in_test = 0
        if args.test_data:
            if args.test_fraction is not None:
                raise ValueError("goft finetune: --test-fraction splits --data, which --test-data replaces; "
                                 "pass one of them")
            test_texts, test_labels = data.read_table(args.test_data, args.text_column, args.label_column,
                                                      args.keep_labels)
            test_texts, test_labels, _ = data.deduplicate(test_texts, test_labels)
            # A training text in the test set would count as a test success it was trained on.
            texts, labels, in_test = data.without_texts(texts, labels, set(test_texts))
        split = data.make_split(
            texts, labels, test_texts=test_texts, test_labels=test_labels,
            test_fraction=0.2 if args.test_fraction is None else args.test_fraction,
            n_train=args.max_train, n_test=args.max_test, seed=args.split_seed,
        )
        if args.output_dir:
            finetune.check_output_dir(args.output_dir)
            if not args.overwrite:
                finetune.check_no_earlier_run(args.output_dir)
        # The model last: from the Hub it is a download, which a mistake in the data or the
        # options above should not cost.
        model_dir = resolve_model_directory(args.model, "goft finetune", revision=args.model_revision)
        finetune.check_model_dir(model_dir)
        config = finetune.RunConfig(
            model_dir=model_dir, method=args.variant, scale=args.scale, orth_lambda=args.orth_lambda,
            lr=args.lr or finetune.TUNED_LR[args.variant],
            epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
            threads=args.threads, target_modules=args.target_modules, lora_rank=args.lora_rank,
            oft_block_size=args.oft_block_size, output_dir=args.output_dir, save_merged=args.save_merged,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    if dropped:
        print(f"dropped {dropped} repeated or contradictory texts")
    if in_test:
        print(f"dropped {in_test} training texts that also occur in --test-data")
    print(f"data: {split.describe()}; labels {', '.join(split.label_names)}")
    if not args.output_dir:  # said before training, when it can still be changed
        print("no --output-dir: the adapter and the metrics will not be saved")

    if not args.compare:
        print(finetune.run_header(config))
        try:
            finetune.run(config, split)
        except finetune.OptionError as e:
            parser.error(str(e))
        if args.output_dir:
            print(f"metrics written to {Path(args.output_dir) / 'metrics.json'}")
        return 0

    compared_lr = lambda method: args.compare_lr or finetune.tuned_lr(method, config.lr)  # noqa: E731
    configs = [config] + finetune.compared_configs(config, args.compare, compared_lr)
    try:
        results = finetune.compare(configs, split)
    except finetune.OptionError as e:  # raised in a method's own process; the first one finds it
        parser.error(str(e))
    table = finetune.format_table(results)
    print()
    print(table)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(table + "\n")
        (out / "comparison.json").write_text(json.dumps(
            {"split": split.describe(), "results": [r.to_json() for r in results]}, indent=2) + "\n")
        print(f"adapter, metrics.json and comparison.{{md,json}} written to {out}")
    return 0


def _merge(parser, args) -> int:
    from goft import export

    try:
        export.merge_to_directory(args.model, args.adapter, args.output, num_labels=args.num_labels, dtype=args.dtype,
                                  adapter_revision=args.adapter_revision, model_revision=args.model_revision)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        parser.error(str(e))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(parser, args)
    if args.command == "merge":
        return _merge(parser, args)
    return _finetune(parser, args)


if __name__ == "__main__":
    sys.exit(main())
