"""goft.data: reading labelled tables (CSV/TSV, JSON Lines, compressed), label ids, de-duplication, splits."""

import bz2
import gzip
import json

import pytest

from goft import data


def _write(path, rows, sep=",", header=("review", "sentiment")):
    lines = [sep.join(header)] + [f"{t}{sep}{l}" for t, l in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows(n):
    labels = ["pos", "neg"]
    return [(f"review number {i}", labels[i % 2]) for i in range(n)]


def test_read_table_compressed_keep_labels_and_sniffing(tmp_path):
    path = tmp_path / "corpus.csv.bz2"
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write('category,text\nfresh,"A fine, funny film."\nplot,Not a review.\nrotten,Dull.\nfresh,\n')
    texts, labels = data.read_table(path, "text", "category", keep_labels=["fresh", "rotten"])
    assert texts == ["A fine, funny film.", "Dull."] and labels == ["fresh", "rotten"]
    odd = _write(tmp_path / "data.txt", _rows(6), sep=";")
    texts, labels = data.read_table(odd, "review", "sentiment")
    assert len(texts) == 6 and set(labels) == {"pos", "neg"}


def test_read_table_json_lines_and_arrays(tmp_path):
    records = [{"text": "A fine, funny film.", "label": 1, "id": 0}, {"text": "Dull.", "label": 0},
               {"text": "", "label": 1}, {"text": "No label."}, {"text": "True to life.", "label": True}]
    lines = tmp_path / "reviews.jsonl.gz"
    with gzip.open(lines, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n\n")
    array = tmp_path / "reviews.json"
    array.write_text(json.dumps(records, indent=1))
    for path in (lines, array):
        texts, labels = data.read_table(path, "text", "label")
        assert texts == ["A fine, funny film.", "Dull.", "True to life."] and labels == ["1", "0", "True"]
        assert data.read_table(path, "text", "label", keep_labels=["0"]) == (["Dull."], ["0"])
        with pytest.raises(ValueError, match=r"--label-column 'sentiment' is not a column of .*; its columns are "
                                             r"'text', 'label', 'id'"):
            data.read_table(path, "text", "sentiment")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('\n{"text": "ok", "label": 1}\n{"text": "cut off", "lab\n')
    with pytest.raises(ValueError, match=r"broken.jsonl' line 3 is not JSON \(.*\); expected one object per line"):
        data.read_table(broken, "text", "label")
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"text": "ok", "label": 1}\n{"text": ["a", "list"], "label": 0}\n')
    with pytest.raises(ValueError, match=r"column 'text' of .* holds a JSON list, expected a string or a number"):
        data.read_table(nested, "text", "label")
    scalars = tmp_path / "scalars.jsonl"
    scalars.write_text('{"text": "ok", "label": 1}\n"just a string"\n')
    with pytest.raises(ValueError, match=r"scalars.jsonl' line 2 is a JSON str, expected an object"):
        data.read_table(scalars, "text", "label")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="is empty: expected JSON objects"):
        data.read_table(tmp_path / "empty.jsonl", "text", "label")


def test_splits_and_deduplication():
    texts, labels, dropped = data.deduplicate(["a", "b", "a", "c", "c"], ["x", "y", "x", "x", "y"])
    assert texts == ["a", "b"] and labels == ["x", "y"] and dropped == 3
    ids = [0] * 30 + [1] * 10
    train, test = data.stratified_split(ids, 0.2, seed=3)
    assert sorted(train + test) == list(range(40))
    assert [ids[i] for i in test].count(0) == 6 and [ids[i] for i in test].count(1) == 2
    assert data.stratified_split(ids, 0.2, seed=3) == (train, test)
    train, test = data.balanced_split(ids, 8, 6, seed=0)
    assert [ids[i] for i in train].count(1) == 4 and [ids[i] for i in test].count(1) == 3
    assert not set(train) & set(test)
    with pytest.raises(ValueError, match="smallest class has 10"):
        data.balanced_split(ids, 16, 6, seed=0)
    assert data.encode_labels(["10", "2", "2"]) == ([1, 0, 0], ["2", "10"])
    # A cap below the number of labels would be raised to one example per label; it is refused.
    texts3, labels3 = [f"t{i}" for i in range(30)], ["a", "b", "c"] * 10
    assert len(data.make_split(texts3, labels3, n_train=3, n_test=3, seed=0).train_texts) == 3
    for n_train, n_test, option in ((2, None, "--max-train 2"), (None, 1, "--max-test 1")):
        with pytest.raises(ValueError, match=f"{option} is below the number of labels \\(3\\)"):
            data.make_split(texts3, labels3, n_train=n_train, n_test=n_test, seed=0)


def test_every_class_keeps_a_training_example_and_a_test_one():
    # A class of two at a 90% test fraction: one example each side, never all of it in test.
    ids = [0] * 10 + [1] * 2 + [2]
    train, test = data.stratified_split(ids, 0.9, seed=0)
    assert {ids[i] for i in train} == {0, 1, 2} and {ids[i] for i in test} == {0, 1}
    assert sorted(train + test) == list(range(len(ids))) and not set(train) & set(test)


def test_a_given_test_set_is_capped_by_max_test():
    texts, labels = [f"t{i}" for i in range(40)], ["a", "b"] * 20
    test_texts, test_labels = [f"u{i}" for i in range(30)], ["a", "b"] * 15
    split = data.make_split(texts, labels, test_texts=test_texts, test_labels=test_labels, n_train=10, n_test=6, seed=0)
    assert len(split.train_texts) == 10 and len(split.test_texts) == 6
    assert set(split.test_texts) <= set(test_texts) and sorted(split.test_labels) == [0, 0, 0, 1, 1, 1]


def test_only_exact_duplicates_of_test_texts_are_dropped():
    texts, labels, dropped = data.without_texts(["Good film", "good film", "Dull"], ["pos", "pos", "neg"], {"good film"})
    assert texts == ["Good film", "Dull"] and labels == ["pos", "neg"] and dropped == 1
