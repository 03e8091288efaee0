"""The folders goft reads from and writes to: local paths checked before long work, whose results
would otherwise be lost, and Hugging Face Hub repositories downloaded into huggingface_hub's cache
when no local folder has their name. goft's adapter files (goft.io) and the command-line tools
(goft finetune, goft merge) resolve their paths here."""

from __future__ import annotations

import fnmatch
import os
import re
from typing import Any, List, Optional, Union


def directory_path(path: Any, where: str, argument: str = "path") -> str:
    """``path`` as a str; a TypeError or ValueError naming ``argument`` for what cannot be a path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: expected {argument} a directory path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: expected {argument} a non-empty directory path, got {path!r}")
    return path


def check_output_folder(path: Any, where: str, argument: str) -> None:
    """Raises ValueError unless ``path`` is a writable folder or can become one. The command-line
    tools check it before their long work (loading, training, merging), whose results would
    otherwise be lost when they cannot be written."""
    def refuse(reason: str) -> ValueError:
        return ValueError(f"{where}: {argument} {str(path)!r} cannot be a folder: {reason}")

    try:
        # Not os.path.abspath: it drops "link/.." as text, where the kernel follows the link first.
        here = os.path.join(os.getcwd(), os.fspath(path)).rstrip(os.sep) or os.sep
        to_make = []  # the names mkdir would create, innermost first
        while not os.path.lexists(here) and here != os.path.dirname(here):
            here, name = os.path.split(here)
            to_make.append(name)
        if os.path.islink(here) and not os.path.exists(here):
            raise refuse(f"{here!r} is a symbolic link to {os.readlink(here)!r}, which does not exist")
        if not os.path.isdir(here):
            raise refuse(f"{here!r} is a file")
        name_max = os.pathconf(here, "PC_NAME_MAX")
        too_long = [name for name in to_make if len(os.fsencode(name)) > name_max]
        if too_long:  # lexists says False for these, as for a missing name
            raise refuse(f"the name {too_long[0][:40]!r}... is longer than the file system allows ({name_max} bytes)")
        if not os.access(here, os.W_OK):
            raise refuse(f"{here!r} is not writable")
    except OSError as e:
        raise refuse(e.strerror or str(e)) from None


# A transformers model's weights: safetensors (one file, or shards and their index), or PyTorch's
# .bin files, which the Hub's repositories often hold beside them.
SAFETENSORS_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
MODEL_BIN_FILES = ("pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")
# The weight files by name, for messages (the shards match SAFETENSORS_FILES' patterns).
WEIGHT_FILES = tuple(name for name in SAFETENSORS_FILES + MODEL_BIN_FILES if "*" not in name)
# The files a tokenizer is built from (tokenizer_config.json alone builds one of special tokens
# only, but for tokenizers that need no vocabulary file, such as ByT5's bytes).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "spm.model")
# What a model download fetches: configuration, safetensors weights and the preprocessing files.
# Repositories often hold other copies of the weights (PyTorch .bin, ONNX, TensorFlow, Flax,
# GGUF) that would multiply the download; the .bin files are fetched only where no safetensors
# weights came.
MODEL_FILES = ("config.json", "generation_config.json") + SAFETENSORS_FILES + TOKENIZER_FILES + (
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json")


def resolve_model_directory(
    path: Any,
    where: str,
    argument: str = "--model",
    *,
    revision: Optional[str] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    token: Union[str, bool, None] = None,
    local_files_only: bool = False,
) -> str:
    """The local folder of a transformers model: ``path`` itself, or the Hub repository ``path``
    downloaded into huggingface_hub's cache (MODEL_FILES, the .bin weights only where it has no
    safetensors ones) when no local directory has that name. Raises FileNotFoundError naming both
    places when neither has it, and when the repository holds no config.json or weights."""
    path = directory_path(path, where, argument)
    check_hub_options(where, path, argument, revision=revision, cache_dir=cache_dir, token=token,
                      local_files_only=local_files_only)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or not is_hub_repo_id(path, bare=True):
        return path  # the callers' checks say what is wrong with the local path
    options = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    snapshot = download_from_hub(path, where, list(MODEL_FILES), **options)
    if not has_weights(snapshot):
        snapshot = download_from_hub(path, where, list(MODEL_BIN_FILES), **options)
    missing = [what for what, found in (
        ("config.json", os.path.isfile(os.path.join(snapshot, "config.json"))),
        (f"weights (none of {', '.join(WEIGHT_FILES)})", has_weights(snapshot))) if not found]
    if missing:
        raise missing_from_repository(where, path, revision, local_files_only, " and no ".join(missing),
                                       "a transformers model")
    return snapshot


def check_model_folder(path: Any, where: str, argument: str, tokenizer: bool = True) -> str:
    """Raises ValueError (FileNotFoundError where nothing is at ``path``) unless ``path`` is a local
    transformers model folder: config.json, weights and (with ``tokenizer``) the files a tokenizer
    is built from. Returns the path as a string."""
    path = directory_path(path, where, argument)
    if not os.path.isdir(path):
        raise (ValueError if os.path.exists(path) else FileNotFoundError)(
            f"{where}: {argument} {path!r} is not a directory (a local transformers model, or the id of a Hugging Face "
            "Hub repository holding one, owner/name, is expected)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{where}: {argument} {path!r} has no config.json: not a transformers model directory")
    if not has_weights(path):
        raise ValueError(f"{where}: {argument} {path!r} has no weights (none of {', '.join(WEIGHT_FILES)})")
    # Without one, transformers may build a tokenizer of special tokens only, which turns every
    # word into [UNK]: training would run, on nothing.
    if tokenizer and not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ValueError(f"{where}: {argument} {path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                         "save the tokenizer beside the model (tokenizer.save_pretrained)")
    return path


def check_hub_options(where: str, path: str, argument: str, *, revision: Optional[str] = None,
                      subfolder: Optional[str] = None, cache_dir: Union[str, os.PathLike, None] = None,
                      token: Union[str, bool, None] = None, local_files_only: bool = False) -> None:
    """Types as huggingface_hub takes them (TypeError naming the option); revision and subfolder
    not empty (ValueError, as a command line's "" gives); a subfolder inside the folder or
    repository (not absolute, no ".."); a revision is refused for a local directory, where it
    would be ignored."""
    for option, value in (("revision", revision), ("subfolder", subfolder)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{where}: expected {option} a non-empty string or None, got {value!r}")
        if value == "":
            raise ValueError(f"{where}: expected {option} a non-empty string or None, got ''")
    if subfolder is not None and (os.path.isabs(subfolder) or ".." in subfolder.replace("\\", "/").split("/")):
        raise ValueError(f"{where}: subfolder must name a folder inside {argument} {path!r} (relative, without '..'), "
                         f"got {subfolder!r}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"{where}: expected cache_dir a path (str or os.PathLike) or None, got {cache_dir!r}")
    if token is not None and not isinstance(token, (str, bool)):
        raise TypeError(f"{where}: expected token a string, a bool or None, got {token!r}")
    if not isinstance(local_files_only, bool):
        raise TypeError(f"{where}: expected local_files_only True or False, got {local_files_only!r}")
    if revision is not None and os.path.isdir(path):
        raise ValueError(f"{where}: revision={revision!r} applies to Hub repositories, but {argument} {path!r} is a "
                         "local directory")


def has_weights(folder: Union[str, os.PathLike]) -> bool:
    """Whether a model folder holds weights (SAFETENSORS_FILES or MODEL_BIN_FILES)."""
    names = os.listdir(folder)
    return any(fnmatch.fnmatch(name, pattern) for name in names for pattern in SAFETENSORS_FILES + MODEL_BIN_FILES)


def download_from_hub(repo_id: str, where: str, allow_patterns: List[str], **options: Any) -> str:
    """snapshot_download of the files of ``repo_id`` that match ``allow_patterns`` (``options``: revision,
    cache_dir, token, local_files_only); returns the snapshot folder. Every failure is a
    FileNotFoundError that names the local directory not found and the Hub's reason."""
    revision = options.get("revision")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{where}: no local directory {repo_id!r}; to download it from the Hugging Face Hub "
                                "install huggingface_hub (pip install huggingface_hub)") from None
    try:
        return snapshot_download(repo_id, allow_patterns=allow_patterns, **options)
    except Exception as e:  # huggingface_hub's errors: not found, gated, offline and not cached, network
        raise FileNotFoundError(
            f"{where}: no local directory {repo_id!r}, and the Hugging Face Hub repository {repo_id!r}"
            f"{f' (revision {revision!r})' if revision else ''} could not be used: {type(e).__name__}: "
            f"{' '.join(str(e).split())[:500]}"
        ) from e


def missing_from_repository(where: str, repo_id: str, revision: Optional[str], local_files_only: bool,
                             missing: str, expected: str) -> FileNotFoundError:
    # Offline, huggingface_hub returns the cached snapshot without checking that it holds the files.
    return FileNotFoundError(
        f"{where}: the Hugging Face Hub repository {repo_id!r}{f' (revision {revision!r})' if revision else ''} "
        f"has no {missing}{' in the cache (offline)' if local_files_only or hub_offline() else ''}; "
        f"is it {expected}?"
    )


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def is_hub_repo_id(path: str, bare: bool = False) -> bool:
    """Whether ``path`` reads as "owner/name" (a repository id) rather than a file path: exactly one
    "/", no leading "." or "~", nothing but the characters the Hub allows in names. With ``bare``
    a name without owner counts too: the early models' ids ("gpt2", "bert-base-uncased") still
    resolve on the Hub."""
    owner, slash, name = path.partition("/")
    parts = (owner, name) if slash else (owner,)
    allowed = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
    return (bool(slash) or bare) and "/" not in name and all(
        allowed.fullmatch(part) and ".." not in part and not part.endswith(".") for part in parts)
