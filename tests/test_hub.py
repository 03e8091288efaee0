"""Adapters from a Hugging Face Hub repository id: goft.load_adapter and goft merge resolve it
through huggingface_hub's cache; a local directory of the same name comes first."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import goft
from goft.io import CONFIG_NAME, WEIGHTS_NAME, _is_hub_repo_id

from tiny_models import assert_unchanged, batch, build, perturb_adapters, snapshot

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


def _put_in_cache(cache, repo, folder, revision="main", subfolder=""):
    """Lays ``folder``'s adapter files out as huggingface_hub's cache holds a download of ``repo`` at
    ``revision``: refs/<revision> names a commit, snapshots/<commit>/ holds the files."""
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    target = root / "snapshots" / commit / subfolder
    target.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
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
    ("a/..", False), ("a/b.", False), ("a\\b", False), ("owner/", False), ("/name", False),
])
def test_only_owner_slash_name_reads_as_a_repository(path, is_repo):
    assert _is_hub_repo_id(path) is is_repo


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
