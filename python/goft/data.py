"""Labelled text tables for fine-tuning: CSV/TSV and JSON Lines files (plain or compressed), label
ids, de-duplication, and seeded stratified or balanced train/test splits (``goft finetune``, ``goft demo``)."""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import itertools
import json
import lzma
import random
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "Split",
    "read_table",
    "encode_labels",
    "deduplicate",
    "without_texts",
    "stratified_split",
    "balanced_split",
    "make_split",
]


def _open_text(path: Path):
    name = path.name.lower()
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8-sig", newline="")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, "rt", encoding="utf-8-sig", newline="")


def _format_name(path: Path) -> str:
    """The file name without a compression suffix, lower-cased: what says the format."""
    name = path.name.lower()
    for suffix in (".bz2", ".gz", ".xz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _delimiter(path: Path, sample: str) -> str:
    name = _format_name(path)
    if name.endswith((".tsv", ".tab")):
        return "\t"
    if name.endswith(".csv"):
        return ","
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        return ","


def _csv_rows(f, path: Path) -> Tuple[List[str], Iterator[Dict[str, Any]]]:
    sample = f.read(64 * 1024)
    f.seek(0)
    reader = csv.DictReader(f, delimiter=_delimiter(path, sample))
    if not reader.fieldnames:
        raise ValueError(f"goft finetune: {str(path)!r} is empty: expected a header row naming the columns")
    return list(reader.fieldnames), iter(reader)


def _json_rows(f, path: Path) -> Tuple[List[str], Iterator[Dict[str, Any]]]:
    """JSON Lines (one object per line) or one JSON array of objects; columns are the first object's keys."""
    first, first_line = "", 0
    while not first.strip():
        first, first_line = f.readline(), first_line + 1
        if not first:
            raise ValueError(f"goft finetune: {str(path)!r} is empty: expected JSON objects with the columns as keys")
    if first.lstrip().startswith("["):
        records = iter(json.loads(first + f.read()))
        lines: Iterator[Tuple[int, Any]] = ((i, r) for i, r in enumerate(records, 1))
        where = "entry"
    else:
        def parsed():
            for number, line in enumerate(itertools.chain([first], f), first_line):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"goft finetune: {str(path)!r} line {number} is not JSON ({e.msg}, column "
                                     f"{e.colno}); expected one object per line (JSON Lines)") from None
                yield number, record
        lines, where = parsed(), "line"

    def objects():
        for number, record in lines:
            if not isinstance(record, dict):
                raise ValueError(f"goft finetune: {str(path)!r} {where} {number} is a JSON {type(record).__name__}, "
                                 "expected an object with the columns as keys")
            yield record

    rows = objects()
    head = next(rows, None)
    if head is None:
        raise ValueError(f"goft finetune: {str(path)!r} holds no JSON object")
    return list(head), itertools.chain([head], rows)


def _cell(value: Any, column: str, path: Path) -> str:
    # JSON labels are often numbers or booleans; a list or an object is no text or label.
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise ValueError(f"goft finetune: column {column!r} of {str(path)!r} holds a JSON {type(value).__name__}, "
                         "expected a string or a number")
    return str(value).strip()


def read_table(
    path,
    text_column: str,
    label_column: str,
    keep_labels: Optional[Sequence[str]] = None,
) -> Tuple[List[str], List[str]]:
    """Reads (text, label) string pairs from a CSV or TSV file with a header row, or from JSON
    Lines (.jsonl, .ndjson; .json may also hold one array) of objects keyed by column.

    The format comes from the extension (.csv, .tsv, .tab, .jsonl, .ndjson, .json; also compressed
    as .gz, .bz2, .xz), else it is sniffed as CSV. Rows with an empty text or label are skipped;
    JSON numbers and booleans are read as their text; with ``keep_labels`` only rows whose label is
    listed are kept. Raises FileNotFoundError or ValueError (naming the file and the column)
    before anything is trained.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"goft finetune: data file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"goft finetune: data path {str(path)!r} is not a file")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    is_json = _format_name(path).endswith((".jsonl", ".ndjson", ".json"))
    kind = "JSON Lines" if is_json else "CSV/TSV"
    try:
        with _open_text(path) as f:
            columns, rows = (_json_rows if is_json else _csv_rows)(f, path)
            for option, column in (("--text-column", text_column), ("--label-column", label_column)):
                if column not in columns:
                    raise ValueError(
                        f"goft finetune: {option} {column!r} is not a column of {str(path)!r}; "
                        f"its columns are {', '.join(repr(c) for c in columns)}"
                    )
            keep = set(keep_labels) if keep_labels else None
            texts, labels = [], []
            for row in rows:
                text = _cell(row.get(text_column), text_column, path)
                label = _cell(row.get(label_column), label_column, path)
                if not text or not label or (keep is not None and label not in keep):
                    continue
                texts.append(text)
                labels.append(label)
    except json.JSONDecodeError as e:
        raise ValueError(f"goft finetune: cannot read {str(path)!r} as {kind}: {e}") from None
    except (UnicodeDecodeError, OSError, EOFError, lzma.LZMAError, csv.Error) as e:
        raise ValueError(f"goft finetune: cannot read {str(path)!r} as a UTF-8 {kind} file: {e}") from None
    return texts, labels


def encode_labels(labels: Sequence[str], names: Optional[Sequence[str]] = None) -> Tuple[List[int], List[str]]:
    """Maps label strings to ids 0..k-1, in numeric order when every label is an integer, else sorted.

    With ``names`` (the training set's labels) the same mapping is reused; an unknown label raises.
    """
    if names is None:
        distinct = set(labels)
        try:
            names = sorted(distinct, key=int)
        except ValueError:
            names = sorted(distinct)
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"goft finetune: labels {unknown[:5]} of the test data do not occur in the training data")
    return [index[label] for label in labels], list(names)


def deduplicate(texts: Sequence[str], labels: Sequence[str]) -> Tuple[List[str], List[str], int]:
    """Keeps the first copy of each repeated text and drops texts seen with different labels.

    Repeated texts would otherwise land on both sides of a split and inflate test accuracy.
    Returns (texts, labels, number of rows dropped).
    """
    seen: Dict[str, Optional[str]] = {}
    for text, label in zip(texts, labels):
        if text not in seen:
            seen[text] = label
        elif seen[text] != label:
            seen[text] = None
    kept = [(t, l) for t, l in seen.items() if l is not None]
    return [t for t, _ in kept], [l for _, l in kept], len(texts) - len(kept)


def without_texts(texts: Sequence[str], labels: Sequence[str], excluded: set) -> Tuple[List[str], List[str], int]:
    """The rows whose text is not in ``excluded``, and how many were dropped."""
    kept = [(t, l) for t, l in zip(texts, labels) if t not in excluded]
    return [t for t, _ in kept], [l for _, l in kept], len(texts) - len(kept)


def _by_class(labels: Sequence[int], seed: int) -> Dict[int, List[int]]:
    rng = random.Random(seed)
    groups: Dict[int, List[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    for y in sorted(groups):
        rng.shuffle(groups[y])
    return groups


def stratified_split(labels: Sequence[int], test_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Seeded split of example indices keeping each class's share; every class with two or more
    examples has at least one on each side."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"goft finetune: --test-fraction must be in (0, 1), got {test_fraction}")
    train, test = [], []
    for _, idx in sorted(_by_class(labels, seed).items()):
        n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
        test += idx[:n_test]
        train += idx[n_test:]
    return sorted(train), sorted(test)


def balanced_split(labels: Sequence[int], n_train: int, n_test: int, seed: int) -> Tuple[List[int], List[int]]:
    """Seeded split with the same number of examples of every class on each side.

    ``n_train`` and ``n_test`` are totals, divided evenly between the k classes.
    """
    groups = _by_class(labels, seed)
    k = len(groups)
    per_train, per_test = n_train // k, n_test // k
    smallest = min(len(idx) for idx in groups.values())
    if per_train + per_test > smallest:
        raise ValueError(
            f"goft: a balanced split of {n_train} train + {n_test} test examples needs "
            f"{per_train + per_test} per class, but the smallest class has {smallest}"
        )
    train, test = [], []
    for _, idx in sorted(groups.items()):
        test += idx[:per_test]
        train += idx[per_test : per_test + per_train]
    return sorted(train), sorted(test)


def _cap(indices: List[int], labels: Sequence[int], n: Optional[int], seed: int) -> List[int]:
    # Stratified subsample: keeps class shares, so a small cap still sees every class.
    if n is None or n >= len(indices):
        return indices
    keep, _ = stratified_split([labels[i] for i in indices], 1.0 - n / len(indices), seed)
    return sorted(indices[i] for i in keep)


@dataclasses.dataclass
class Split:
    """A labelled train/test split; labels are ids into ``label_names``."""

    train_texts: List[str]
    train_labels: List[int]
    test_texts: List[str]
    test_labels: List[int]
    label_names: List[str]

    def describe(self) -> str:
        def counts(labels):
            return ", ".join(f"{name} {labels.count(i)}" for i, name in enumerate(self.label_names))

        return (
            f"{len(self.train_texts)} train ({counts(self.train_labels)}), "
            f"{len(self.test_texts)} test ({counts(self.test_labels)})"
        )


def make_split(
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    test_texts: Optional[Sequence[str]] = None,
    test_labels: Optional[Sequence[str]] = None,
    test_fraction: float = 0.2,
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    balanced: bool = False,
    seed: int = 0,
) -> Split:
    """Builds a Split from string labels: a given test set, or a seeded (stratified or balanced) split.

    Raises ValueError when there are fewer than two labels or too few examples.
    """
    ids, names = encode_labels(labels)
    if len(names) < 2:
        raise ValueError(
            f"goft finetune: classification needs at least two labels, the label column has "
            f"{len(names)} ({', '.join(repr(n) for n in names) or 'no rows with a text and a label'})"
        )
    if not balanced:  # a stratified sample keeps one example of every label at the least
        for option, n in (("--max-train", n_train), ("--max-test", n_test)):
            if n is not None and n < len(names):
                raise ValueError(f"goft finetune: {option} {n} is below the number of labels ({len(names)}); "
                                 "every label needs an example on each side")
    if test_texts is not None:
        test_ids, _ = encode_labels(test_labels, names)
        train_idx = _cap(list(range(len(ids))), ids, n_train, seed)
        test_idx = _cap(list(range(len(test_ids))), test_ids, n_test, seed)
        split = Split(
            [texts[i] for i in train_idx], [ids[i] for i in train_idx],
            [test_texts[i] for i in test_idx], [test_ids[i] for i in test_idx], names,
        )
    else:
        if len(ids) < 4:
            raise ValueError(f"goft finetune: {len(ids)} labelled rows are too few to split into train and test")
        if balanced:
            train_idx, test_idx = balanced_split(ids, n_train, n_test, seed)
        else:
            train_idx, test_idx = stratified_split(ids, test_fraction, seed)
            train_idx, test_idx = _cap(train_idx, ids, n_train, seed), _cap(test_idx, ids, n_test, seed)
        split = Split(
            [texts[i] for i in train_idx], [ids[i] for i in train_idx],
            [texts[i] for i in test_idx], [ids[i] for i in test_idx], names,
        )
    if not split.train_texts or not split.test_texts:
        raise ValueError("goft finetune: the split left the training or the test set empty")
    return split
