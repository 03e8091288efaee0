"""Adapters and models from a Hugging Face Hub repository id: goft.load_adapter, goft merge and goft
finetune resolve it through huggingface_hub's cache; a local directory of the same name comes first."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import goft
import goft.folders
from goft.folders import is_hub_repo_id
from goft.io import CONFIG_NAME, WEIGHTS_NAME

from tiny_models import assert_unchanged, batch, build, perturb_adapters, save_tiny_bert, snapshot

pytest.importorskip("huggingface_hub")

REPO = "goft-tests/tiny-llama-adapter"


def _logits(model):
    with torch.no_grad():
        return model(**{k: v for k, v in batch("llama").items() if k != "labels"}).logits


def _saved_adapter(path, seed):
    """Saves a perturbed GOFT adapter of the tiny LLaMA to ``path``; returns the logits it gives."""
    model = build("llama")
    goft.inject(model)
    perturb_adapters(model, 0.2, seed=seed)
    goft.save_adapter(model, str(path))
    return _logits(model)


def _put_in_cache(cache, repo, folder, revision="main", subfolder="", names=(CONFIG_NAME, WEIGHTS_NAME)):
    """Lays ``folder``'s files (``names``; None: all) out as huggingface_hub's cache holds a download
    of ``repo`` at ``revision``: refs/<revision> names a commit, snapshots/<commit>/ holds the files."""
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    target = root / "snapshots" / commit / subfolder
    target.mkdir(parents=True, exist_ok=True)
    for name in names if names is not None else [p.name for p in folder.iterdir()]:
        shutil.copy(folder / name, target / name)
    return commit


@pytest.fixture
def hub_cache(tmp_path):
    """A cache holding REPO with adapter A on main, adapter B at tag v1 and in main's folder task-b."""
    cache = tmp_path / "hub"
    a = _saved_adapter(tmp_path / "a", seed=1)
    b = _saved_adapter(tmp_path / "b", seed=2)
    assert not torch.allclose(a, b)
    _put_in_cache(cache, REPO, tmp_path / "a")
    _put_in_cache(cache, REPO, tmp_path / "b", revision="v1")
    _put_in_cache(cache, REPO, tmp_path / "b", subfolder="task-b")
    return cache, a, b


def test_an_adapter_loads_from_a_repository_by_revision_and_subfolder(hub_cache):
    cache, a, b = hub_cache
    for options, expected in [({}, a), ({"revision": "v1"}, b), ({"subfolder": "task-b"}, b)]:
        model = build("llama")
        goft.load_adapter(model, REPO, cache_dir=cache, local_files_only=True, **options)
        assert torch.equal(_logits(model), expected), options


def test_a_repository_that_is_not_there_is_refused_naming_both_places(hub_cache):
    cache, _, _ = hub_cache
    model = build("llama")
    before = snapshot(model)
    for repo, options in [("goft-tests/missing", {}), (REPO, {"revision": "v2"}), (REPO, {"subfolder": "task-c"})]:
        with pytest.raises(FileNotFoundError, match=f"{repo}") as error:
            goft.load_adapter(model, repo, cache_dir=cache, local_files_only=True, **options)
        message = str(error.value)
        assert message.startswith("goft.load_adapter: "), message
        assert "no local directory" in message or CONFIG_NAME in message, message
        assert_unchanged(model, before)


def test_a_local_directory_comes_before_a_repository_of_the_same_name(hub_cache, tmp_path, monkeypatch):
    cache, a, _ = hub_cache
    monkeypatch.chdir(tmp_path)
    local = _saved_adapter(tmp_path / REPO, seed=3)
    model = build("llama")
    goft.load_adapter(model, REPO, cache_dir=cache, local_files_only=True)
    assert torch.equal(_logits(model), local) and not torch.equal(local, a)
    with pytest.raises(ValueError, match="revision='v1' applies to Hub repositories"):
        goft.load_adapter(build("llama"), REPO, revision="v1")
    shutil.copytree(tmp_path / REPO, tmp_path / "nested" / "inner")
    model = build("llama")
    goft.load_adapter(model, str(tmp_path / "nested"), subfolder="inner")
    assert torch.equal(_logits(model), local)


@pytest.mark.parametrize("path, is_repo", [
    ("owner/name", True), ("owner/name.v2", True), ("Org-1/model_x", True),
    ("name", False), ("a/b/c", False), ("./a/b", False), ("../a", False), ("/abs/a", False), ("~/a", False),
    ("a/..", False), ("owner/na..me", False), ("a/b.", False), ("a\\b", False), ("owner/", False), ("/name", False),
])
def test_only_owner_slash_name_reads_as_a_repository(path, is_repo):
    assert is_hub_repo_id(path) is is_repo


def test_paths_that_are_not_repositories_give_the_local_error(tmp_path):
    model = build("llama")
    with pytest.raises(FileNotFoundError, match=f"missing {str(tmp_path / 'x' / 'y' / CONFIG_NAME)}"):
        goft.load_adapter(model, str(tmp_path / "x" / "y"))
    _saved_adapter(tmp_path / "adapter", seed=1)
    with pytest.raises(NotADirectoryError, match="is a file; expected the directory save_adapter wrote"):
        goft.load_adapter(model, str(tmp_path / "adapter" / WEIGHTS_NAME))
    with pytest.raises(TypeError, match="expected revision a non-empty string or None, got 3"):
        goft.load_adapter(model, REPO, revision=3)


def test_goft_merge_takes_an_adapter_from_the_hub_cache(hub_cache, tmp_path):
    # A separate process, as a user runs it: the cache and offline mode come from the environment.
    cache, _, b = hub_cache
    base = tmp_path / "base"
    build("llama").save_pretrained(base)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "goft", "merge", "--model", str(base), "--adapter", REPO,
               "--adapter-revision", "v1", "--output", str(tmp_path / "merged")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    merged = type(build("llama")).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged), b, rtol=1e-4, atol=1e-5)
    missing = subprocess.run(command[:7] + ["goft-tests/missing", "--output", str(tmp_path / "m2")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no local directory 'goft-tests/missing'" in missing.stderr, missing.stderr


# ---- base models from the Hub (goft finetune --model, goft merge --model) ----

MODEL_REPO = "goft-tests/tiny-bert"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "bad", "awful", "the", "film", "was"]


def _tiny_bert(path):
    """A 1-layer random BERT with its WordPiece tokenizer, as a transformers model folder."""
    return save_tiny_bert(path, WORDS, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=24, max_position_embeddings=32, initializer_range=0.2)


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    """huggingface_hub's cache, offline, holding MODEL_REPO at tag v1 (its main is another model)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    local = _tiny_bert(tmp_path / "tiny-bert")
    _put_in_cache(cache, MODEL_REPO, local, revision="v1", names=None)
    other = tmp_path / "other"
    shutil.copytree(local, other)
    (other / "config.json").write_text((other / "config.json").read_text().replace('"hidden_act": "gelu"',
                                                                                 '"hidden_act": "relu"'))
    _put_in_cache(cache, MODEL_REPO, other, names=None)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, local


def test_goft_finetune_and_merge_take_a_model_from_the_hub_cache(model_cache, tmp_path):
    import transformers

    from goft import export

    cache, local = model_cache
    rows = ["text,label"] + [f"the film was {w},{'pos' if w in ('good', 'great') else 'neg'}"
                             for w in ("good", "great", "bad", "awful") for _ in range(6)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    # A separate process, as a user runs it: the cache and offline mode come from the environment.
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "goft", "finetune", "--model", MODEL_REPO, "--model-revision", "v1",
               "--data", str(tmp_path / "data.csv"), "--epochs", "1", "--batch-size", "8", "--threads", "1",
               "--no-progress", "--output-dir", str(tmp_path / "run")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    trained_on = metrics["config"]["model_dir"]
    assert trained_on.startswith(str(cache / "models--goft-tests--tiny-bert" / "snapshots")), trained_on
    assert json.loads((Path(trained_on) / "config.json").read_text())["hidden_act"] == "gelu", "not revision v1"

    # goft merge of the adapter into the Hub's v1 gives the model a merge into the local copy gives.
    merged = {}
    for name, base, revision in (("merged-hub", MODEL_REPO, "v1"), ("merged-local", str(local), None)):
        export.merge_to_directory(base, str(tmp_path / "run" / "adapter"), str(tmp_path / name),
                                  model_revision=revision, log=lambda _: None)
        merged[name] = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / name).eval()
    ids = torch.tensor([[2, 9, 10, 11, 5, 3], [2, 9, 10, 11, 8, 3]])
    with torch.no_grad():
        assert torch.equal(merged["merged-hub"](input_ids=ids).logits, merged["merged-local"](input_ids=ids).logits)


def test_a_model_repository_without_weights_or_not_cached_is_refused(model_cache, tmp_path, capsys):
    from goft import cli
    from goft.folders import resolve_model_directory

    cache, local = model_cache
    tokenizer_only = tmp_path / "tokenizer-only"
    tokenizer_only.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "config.json"):
        shutil.copy(local / name, tokenizer_only / name)
    _put_in_cache(cache, "goft-tests/no-weights", tokenizer_only, names=None)
    with pytest.raises(FileNotFoundError, match="'goft-tests/no-weights' has no weights .* in the cache .offline."):
        resolve_model_directory("goft-tests/no-weights", "goft finetune")
    with pytest.raises(FileNotFoundError, match="no local directory 'goft-tests/missing', and the Hugging Face Hub "
                                                "repository 'goft-tests/missing' could not be used"):
        resolve_model_directory("goft-tests/missing", "goft finetune")
    with pytest.raises(ValueError, match="revision='v1' applies to Hub repositories, but --model .* is a local"):
        resolve_model_directory(str(local), "goft finetune", revision="v1")
    with pytest.raises(ValueError, match="expected revision a non-empty string or None, got ''"):
        resolve_model_directory(MODEL_REPO, "goft finetune", revision="")
    (tmp_path / "data.csv").write_text("text,label\n" + "".join(f"good {i},pos\nbad {i},neg\n" for i in range(8)))
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--model", "goft-tests/missing", "--data", str(tmp_path / "data.csv")])
    assert "goft finetune: no local directory 'goft-tests/missing'" in capsys.readouterr().err
    import transformers

    adapter = tmp_path / "adapter"
    base = transformers.BertModel.from_pretrained(local)
    goft.inject(base)
    goft.save_adapter(base, str(adapter))
    with pytest.raises(SystemExit):
        cli.main(["merge", "--model", "goft-tests/missing", "--adapter", str(adapter), "--output",
                  str(tmp_path / "m")])
    assert "goft merge: no local directory 'goft-tests/missing'" in capsys.readouterr().err
    # An empty revision (what a shell's "" gives) is a usage error, not a traceback.
    for command in (["finetune", "--model", MODEL_REPO, "--model-revision", "", "--data", str(tmp_path / "data.csv")],
                    ["merge", "--model", MODEL_REPO, "--model-revision", "", "--adapter", str(adapter), "--output",
                     str(tmp_path / "m")],
                    ["merge", "--model", str(local), "--adapter", "goft-tests/a", "--adapter-revision", "",
                     "--output", str(tmp_path / "m")]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(command)
        assert exit_.value.code == 2 and "expected revision a non-empty string or None, got ''" in capsys.readouterr().err
    # A mistake in the data, the output folder or the adapter is found before the model is looked
    # for (online, that is a download): these name the mistake, not the missing repository.
    for command, mistake in (
            (["finetune", "--model", "goft-tests/missing", "--data", str(tmp_path / "typo.csv")], "typo.csv"),
            (["finetune", "--model", "goft-tests/missing", "--data", str(tmp_path / "data.csv"), "--output-dir",
              str(tmp_path / "data.csv" / "run")], "--output-dir"),
            (["merge", "--model", "goft-tests/missing", "--adapter", str(tmp_path / "no-adapter"), "--output",
              str(tmp_path / "m")], "no-adapter")):
        with pytest.raises(SystemExit):
            cli.main(command)
        err = capsys.readouterr().err
        assert mistake in err and "goft-tests/missing" not in err, err


def test_a_model_id_without_owner_resolves_as_the_hubs_early_models_do(model_cache, tmp_path, monkeypatch):
    from goft.folders import resolve_model_directory

    cache, local = model_cache
    _put_in_cache(cache, "tiny-bert-uncased", local, names=None)
    folder = resolve_model_directory("tiny-bert-uncased", "goft finetune")
    assert (Path(folder) / "config.json").is_file() and str(cache) in folder
    monkeypatch.chdir(tmp_path)
    shutil.copytree(local, tmp_path / "tiny-bert-uncased")  # a local folder of that name comes first
    assert resolve_model_directory("tiny-bert-uncased", "goft finetune") == "tiny-bert-uncased"
    assert is_hub_repo_id("gpt2", bare=True) and not is_hub_repo_id("gpt2")  # adapters: owner/name only
    for path in (".", "..", "~", "a.", "./gpt2", "-x"):
        assert not is_hub_repo_id(path, bare=True), path


def test_a_model_repository_with_pytorch_bin_weights_only_resolves(model_cache, tmp_path):
    from goft.folders import resolve_model_directory

    cache, local = model_cache
    bin_only = tmp_path / "bin-only"
    shutil.copytree(local, bin_only)
    (bin_only / "model.safetensors").unlink()
    (bin_only / "pytorch_model.bin").write_bytes(b"")  # only its name is looked at here
    _put_in_cache(cache, "goft-tests/bin-only", bin_only, names=None)
    folder = resolve_model_directory("goft-tests/bin-only", "goft finetune")
    assert (Path(folder) / "pytorch_model.bin").is_file()


@pytest.fixture
def online_hub(tmp_path, monkeypatch):
    """Online, snapshot_download fetches what allow_patterns select. This machine reaches no Hub, so
    a stand-in serves local folders that way (``repositories``: {repo id: folder}, or an exception to
    raise), through huggingface_hub's own filter, and records each request with its options."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    repositories, requests = {}, []

    def serve(repo_id, allow_patterns, **options):
        requests.append(dict(options, repo_id=repo_id, allow_patterns=list(allow_patterns)))
        remote = repositories[repo_id]
        if isinstance(remote, Exception):
            raise remote
        snapshot = tmp_path / "snapshots" / repo_id.replace("/", "--")
        files = sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file())
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote / name, snapshot / name)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", serve)
    return repositories, requests


def test_a_model_download_asks_for_the_bin_weights_only_without_safetensors(tmp_path, online_hub):
    """The safetensors request, then the .bin one only where the first brought none."""
    from goft.folders import resolve_model_directory

    repositories, requests = online_hub
    local = _tiny_bert(tmp_path / "tiny-bert")
    (local / "tf_model.h5").write_bytes(b"")
    (local / "pytorch_model.bin").write_bytes(b"")
    repositories["owner/with-safetensors"] = local
    folder = Path(resolve_model_directory("owner/with-safetensors", "goft finetune", revision="v1"))
    assert [(r["repo_id"], r["revision"]) for r in requests] == [("owner/with-safetensors", "v1")]
    assert {"config.json", "model.safetensors", "vocab.txt"} <= set(os.listdir(folder))
    assert not {"pytorch_model.bin", "tf_model.h5"} & set(os.listdir(folder))

    remote = tmp_path / "bin-only"
    shutil.copytree(local, remote)
    (remote / "model.safetensors").unlink()
    repositories["owner/bin-only"] = remote
    requests.clear()
    folder = Path(resolve_model_directory("owner/bin-only", "goft finetune"))
    assert [r["allow_patterns"] for r in requests] == [list(goft.folders.MODEL_FILES), list(goft.folders.MODEL_BIN_FILES)]
    assert "pytorch_model.bin" in os.listdir(folder) and "tf_model.h5" not in os.listdir(folder)


def test_hub_options_reach_the_download(tmp_path, online_hub):
    from goft.folders import resolve_model_directory

    repositories, requests = online_hub
    repositories["owner/model"] = _tiny_bert(tmp_path / "tiny-bert")
    options = dict(revision="v2", cache_dir=str(tmp_path / "cache"), token="hf_secret", local_files_only=True)
    resolve_model_directory("owner/model", "goft finetune", **options)
    assert requests == [dict(options, repo_id="owner/model", allow_patterns=list(goft.folders.MODEL_FILES))]

    _saved_adapter(tmp_path / "adapter", seed=1)
    repositories[REPO] = tmp_path / "adapter"
    requests.clear()
    goft.load_adapter(build("llama"), REPO, **options)
    assert requests == [dict(options, repo_id=REPO, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])]


def test_an_adapter_in_a_repositorys_subfolder_is_downloaded_alone(tmp_path, online_hub):
    repositories, requests = online_hub
    remote = tmp_path / "remote"
    a = _saved_adapter(remote, seed=1)
    b = _saved_adapter(remote / "task-b", seed=2)
    (remote / "task-b" / "README.md").write_text("not an adapter file")
    repositories[REPO] = remote
    model = build("llama")
    goft.load_adapter(model, REPO, subfolder="task-b/")
    assert torch.equal(_logits(model), b) and not torch.equal(a, b)
    assert [r["allow_patterns"] for r in requests] == [[f"task-b/{CONFIG_NAME}", f"task-b/{WEIGHTS_NAME}"]]
    snapshot = tmp_path / "snapshots" / REPO.replace("/", "--")
    assert sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()) == [
        f"task-b/{CONFIG_NAME}", f"task-b/{WEIGHTS_NAME}"]
    with pytest.raises(ValueError, match="expected subfolder a non-empty string or None, got ''"):
        goft.load_adapter(build("llama"), REPO, subfolder="")


def test_a_model_repository_without_config_or_that_the_hub_refuses_is_reported(tmp_path, online_hub):
    from huggingface_hub.errors import HFValidationError

    from goft.folders import resolve_model_directory

    repositories, _ = online_hub
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    shutil.copy(_tiny_bert(tmp_path / "tiny-bert") / "model.safetensors", weights_only)
    repositories["owner/weights-only"] = weights_only
    with pytest.raises(FileNotFoundError, match="repository 'owner/weights-only' has no config.json; is it a "
                                                "transformers model"):
        resolve_model_directory("owner/weights-only", "goft finetune")
    # huggingface_hub's errors are not all OSErrors: an id it refuses raises a ValueError.
    repositories["owner/refused"] = HFValidationError("Repo id must use alphanumeric chars")
    with pytest.raises(FileNotFoundError, match=r"repository 'owner/refused' \(revision 'v1'\) could not be used: "
                                                "HFValidationError: Repo id must"):
        resolve_model_directory("owner/refused", "goft finetune", revision="v1")


def test_model_downloads_take_one_copy_of_the_weights():
    """The patterns goft asks snapshot_download for, applied by huggingface_hub's own filter to the
    file list of a typical repository: configuration, tokenizer and safetensors weights, no other
    copy of the weights; the .bin files are a pattern set of their own, for repositories without
    safetensors."""
    from huggingface_hub.utils import filter_repo_objects

    from goft.folders import MODEL_BIN_FILES, MODEL_FILES

    repository = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack",
                  "onnx/model.onnx", "onnx/config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                  "special_tokens_map.json", "README.md", ".gitattributes", "1_Pooling/config.json",
                  "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                  "model.safetensors.index.json", "openvino/openvino_model.bin", "coreml/model.mlpackage",
                  "preprocessor_config.json"]
    taken = set(filter_repo_objects(repository, allow_patterns=list(MODEL_FILES)))
    assert taken == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                     "special_tokens_map.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                     "preprocessor_config.json"}  # an image model's processor
    assert set(filter_repo_objects(repository + ["pytorch_model-00001-of-00002.bin"],
                                   allow_patterns=list(MODEL_BIN_FILES))) == {
        "pytorch_model.bin", "pytorch_model-00001-of-00002.bin"}
