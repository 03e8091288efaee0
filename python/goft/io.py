"""Saving and loading adapters: safetensors tensors + a JSON description, validated before use,
from a local folder or a Hugging Face Hub repository (goft.folders resolves the paths).

A saved adapter is a directory with
    adapter_model.safetensors  the adapter tensors (and modules_to_save), nothing of the base model;
                               its metadata holds the description below too, with a digest of
                               the tensors, so the file describes itself
    adapter_config.json        GOFTConfig, adapter name, goft version, model_type and model class,
                               per-layer widths, modules_to_save, the head's label names (id2label),
                               per-tensor shapes and dtypes, and the SHA-256 of the tensors file
Both are written to temporary files in the same directory first and then moved into place with
os.replace, so a save that fails or is interrupted while writing leaves the previous files, and
none is ever truncated. Should a save stop between the two renames, the checksum shows that the
tensors file is not the one its JSON describes, and the adapter loads by the tensors file's own
description, with a warning. A killed save leaves its temporary file behind; the next save into
the folder removes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from goft.checkpoint_names import from_checkpoint_names, module_renamer, module_state_names, to_checkpoint_names
from goft.config import GOFTConfig, check_adapter_name
from goft.folders import (
    check_hub_options, check_output_folder, directory_path, download_from_hub, is_hub_repo_id, missing_from_repository,
)
from goft.inject import (
    CHECKSUMS_ATTR,
    MERGED_ADAPTERS_KEY,
    LoadedAdapter,
    _attach,
    _candidate_modules,
    _check_not_distributed,
    _check_targets,
    _let_checkpointing_reach_the_adapters,
    _match_all,
    _model_type,
    _require_injected,
    accepts_compiled,
    active_adapter,
    adapter_configs,
    named_goft_layers,
    non_tensor_state,
    plain_module_name,
    set_adapter,
    undone_on_failure,
)
from goft.layers import adapter_shapes, input_width, is_adaptable, is_fsdp1_unit, managed_by_zero3, whole_shape

__all__ = ["save_adapter", "load_adapter", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "goft-adapter"
FORMAT_VERSION = 1
# The tensors file's metadata entry holding its description (the JSON but its tensor list and checksum).
DESCRIPTION_KEY = "goft_description"
# What the warning says when an adapter loads by that description (goft merge reads the files twice).
SELF_DESCRIBED = "describes itself and its tensors"


@accepts_compiled
def save_adapter(model: nn.Module, path: Union[str, os.PathLike], adapter_name: Optional[str] = None) -> None:
    """Writes one adapter (default: the active one) and its modules_to_save into directory ``path``.

    Tensor keys are module names plus the store name, e.g.
    ``model.layers.0.self_attn.q_proj.goft_angles``, independent of the adapter's name, so it can
    be loaded under any name. Names are the plain model's as its checkpoints spell them: what
    wrappers add in front of a module (torch.compile's ``_orig_mod``, FSDP1's
    ``_fsdp_wrapped_module``) is left out, and modules that transformers 5 renamed (the ViT family)
    keep the names of transformers 4, as its own checkpoint files do (goft.checkpoint_names).

    A sharded model, by FSDP2 (``fully_shard``), FSDP1 (pass the ``FullyShardedDataParallel``
    it returned) or DeepSpeed ZeRO-3 (pass the model inside the engine): call this on every rank.
    The shards are gathered (a collective, hence every rank) and only rank 0 writes the files.
    """
    import safetensors.torch
    import goft

    configs = _require_injected(model, "goft.save_adapter")
    path = directory_path(path, "goft.save_adapter")
    if adapter_name is not None:
        check_adapter_name(adapter_name, "goft.save_adapter")
    name = active_adapter(model) if adapter_name is None else adapter_name
    if name is None:
        raise ValueError(f"goft.save_adapter: no active adapter to save; pass adapter_name (one of {list(configs)}) "
                         "or goft.set_adapter(model, name) first")
    if name not in configs:
        raise ValueError(f"goft.save_adapter: no adapter {name!r} to save; adapters are {list(configs)}")
    config = configs[name]

    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"goft.save_adapter: {path!r} exists and is not a directory")
    if os.path.islink(path) and not os.path.exists(path):
        raise FileNotFoundError(f"goft.save_adapter: {path!r} is a symbolic link to {os.readlink(path)!r}, "
                                "which does not exist")
    # The rest (a file in the path, a name too long, no write permission) before the shards are
    # gathered, which on a sharded model every rank waits for.
    check_output_folder(path, "goft.save_adapter", "path")
    # goft's file names are PEFT's: beside a model's config.json they would make transformers'
    # from_pretrained and pipeline take the model folder for a PEFT adapter and fail to load it.
    if os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"goft.save_adapter: path {path!r} holds a model (config.json); an adapter saved beside it "
                         "would make transformers' from_pretrained take the folder for a PEFT adapter and fail. "
                         f"Save it into a folder of its own, e.g. {os.path.join(path, 'goft_adapter')!r}")

    # What to read, by the FSDP1 unit that holds it ("" for the root, or for a model without FSDP1).
    units = _fsdp1_units(model)
    layers_by_unit: Dict[str, List[Tuple[str, Any]]] = {}
    for module_name, layer in named_goft_layers(model):
        if name in layer.adapter_configs:
            layers_by_unit.setdefault(_owner(module_name, units), []).append((module_name, layer))
    saved_modules = _modules_to_save(model, config)
    saved_by_unit: Dict[str, List[str]] = {}
    for module_name in saved_modules:
        inner_unit = next((u for u in units if u.startswith(module_name + ".")), None)
        if inner_unit is not None:
            raise ValueError(f"goft.save_adapter: modules_to_save entry {module_name} contains the FullyShardedDataParallel "
                             f"unit {inner_unit}; wrap it as one unit, or inside one")
        saved_by_unit.setdefault(_owner(module_name, units), []).append(module_name)

    # DeepSpeed ZeRO-3 partitions: what is read is gathered at once (the adapter and the
    # modules_to_save, small beside the model) on every rank.
    partitioned = [p for _, layer in named_goft_layers(model) if name in layer.adapter_configs
                   for p in layer.adapter_parameters(name).values() if managed_by_zero3(p)]
    partitioned += [p for n in saved_modules for p in model.get_submodule(n).parameters() if managed_by_zero3(p)]

    tensors: Dict[str, torch.Tensor] = {}
    layers: Dict[str, Dict[str, Any]] = {}
    sharded = bool(units) or bool(partitioned)

    def gathered(value: torch.Tensor) -> torch.Tensor:
        nonlocal sharded
        if callable(getattr(value, "full_tensor", None)):  # a DTensor shard (FSDP2)
            sharded = True
            value = value.full_tensor()
        # A copy even on the CPU: FSDP1 frees a gathered parameter's memory when its context ends.
        return value.detach().cpu().clone(memory_format=torch.contiguous_format)

    # Names as the model's checkpoints spell them (transformers 5 renamed some models' modules and
    # saves their checkpoints in the old names), so that the file loads under either version.
    file_key = to_checkpoint_names(model.module if units else model)
    file_module = module_renamer(file_key)
    saved_module_names: Dict[str, str] = {}
    # FSDP1 gathers one unit at a time, the root first (its first gather sets up the whole tree),
    # so no device holds more than one unit's whole parameters.
    for unit_name in units or [""]:
        with _whole_parameters_of(model.get_submodule(unit_name) if units else None), _gathered_by_zero3(partitioned):
            for module_name, layer in layers_by_unit.get(unit_name, []):
                layer.check_whole(name, "goft.save_adapter", "call goft.save_adapter on every rank with the "
                                  "FullyShardedDataParallel-wrapped model itself, which gathers the shards")
                module_name = plain_module_name(module_name)
                saved_name = file_module(module_name) or module_name
                layers[saved_name] = {"in_features": layer.in_features}
                for store_name, param in layer.adapter_parameters(name).items():
                    if param.is_meta:
                        raise ValueError(f"goft.save_adapter: {module_name}.{store_name} is on the meta device and holds no values")
                    # Adapter files hold float32, the op's parameter dtype, also after the
                    # model was cast with its adapters (model.to(torch.bfloat16)).
                    tensors[f"{saved_name}.{store_name}"] = gathered(param).to(torch.float32)
            for module_name in saved_by_unit.get(unit_name, []):
                # inject refuses such modules; one may have gained extra state since.
                extra = non_tensor_state(model.get_submodule(module_name))
                if extra:
                    raise ValueError(f"goft.save_adapter: modules_to_save entry {module_name} holds state that is not a "
                                     f"tensor ({extra}: its get_extra_state), which an adapter file cannot hold")
                state = model.get_submodule(module_name).state_dict()
                saved_name, saved_keys = module_state_names(file_key, plain_module_name(module_name), list(state))
                saved_module_names[module_name] = saved_name
                for saved_key, value in zip(saved_keys, state.values()):
                    tensors[saved_key] = gathered(value)
    if sharded and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return

    label_names = _label_names(model) if saved_modules else None
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "goft_version": goft.__version__,
        "model_type": _model_type(model),
        # The class of the model the adapter was trained on, not of an FSDP1 wrapper around it.
        "model_class": type(model.module if units else model).__name__,
        "adapter_name": name,
        "config": config.to_dict(),
        "layers": layers,
        "modules_to_save": [saved_module_names.get(n, plain_module_name(n)) for n in saved_modules],
        # The names of a saved classification head's outputs, for whoever rebuilds the model
        # (goft merge writes them into the merged model's config).
        **({"id2label": label_names} if label_names else {}),
        # Layer and tensor names as the model's checkpoints spell them (goft.checkpoint_names).
        "names": "checkpoint",
        "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in tensors.items()},
        # The tensors' own digest, independent of the file's metadata: what a merge records.
        "tensors_sha256": _tensors_digest(tensors),
    }
    # The tensors file describes itself too: if a save stops between its two renames, the folder
    # holds the new tensors beside the previous JSON, and the adapter loads from them alone.
    # Its tensor list is the file's own header, so it is left out there.
    self_description = json.dumps({k: v for k, v in description.items() if k != "tensors"}, separators=(",", ":"))
    weights = safetensors.torch.save(tensors, metadata={"format": FORMAT, DESCRIPTION_KEY: self_description})
    description["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"goft.save_adapter: cannot create folder {path!r}: {e.strerror or e}") from None
    # Tensors first: a save stopped between the two renames leaves a JSON whose checksum no
    # longer matches, and load_adapter loads the new tensors by their own description.
    _write_files_atomically(path, [(WEIGHTS_NAME, weights),
                                   (CONFIG_NAME, (json.dumps(description, indent=2) + "\n").encode())])


@accepts_compiled
def load_adapter(
    model: nn.Module,
    path: Union[str, os.PathLike],
    adapter_name: str = "default",
    *,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    token: Union[str, bool, None] = None,
    local_files_only: bool = False,
    is_trainable: bool = True,
) -> nn.Module:
    """Adds the adapter saved in ``path`` to ``model`` as ``adapter_name`` and makes it active.

    ``path`` is a directory written by save_adapter, or the id of a Hugging Face Hub repository
    holding one (``"owner/name"``, when no such local directory exists), downloaded with
    huggingface_hub into its cache: ``revision`` (branch, tag or commit), ``cache_dir``, ``token``
    and ``local_files_only`` (also ``HF_HUB_OFFLINE=1``) are passed to it. ``subfolder`` is the
    adapter's folder inside the directory or repository.

    The loaded adapter trains, as one that ``inject`` adds does. ``is_trainable=False`` freezes it
    and its modules_to_save for inference (as PEFT's ``is_trainable=False``, which is PEFT's
    default); a later ``set_adapter`` makes them trainable again.

    Everything (JSON, checksum, tensor names/shapes/dtypes, model_type, every target layer and
    its width, modules_to_save entries) is checked before the model is touched; any mismatch
    raises ValueError (FileNotFoundError for a missing file) and leaves the model unchanged.

    A model built under DeepSpeed's ``zero.Init`` (``from_pretrained`` with a ZeRO-3 config):
    load on every rank, before ``deepspeed.initialize``; modules_to_save are gathered to be set.
    """
    check_adapter_name(adapter_name, "goft.load_adapter")
    if not isinstance(is_trainable, bool):
        raise TypeError(f"goft.load_adapter: expected is_trainable True or False, got {is_trainable!r}")
    path = resolve_adapter_directory(path, "goft.load_adapter", revision=revision, subfolder=subfolder,
                                     cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    description, tensors = _read(path)
    config, names, saved_entries = _validate(model, description, tensors, adapter_name, path)
    with undone_on_failure(model, adapter_name), torch.no_grad():
        _attach(model, list(names.values()), adapter_name, config)
        for saved_name, module_name in names.items():
            layer = model.get_submodule(module_name)
            for store_name, param in layer.adapter_parameters(adapter_name).items():
                param.copy_(tensors[f"{saved_name}.{store_name}"])
        with _values_restored_on_failure([t for _, t in saved_entries if not managed_by_zero3(t)]):
            # A model built under DeepSpeed's zero.Init holds partitions: every rank gathers,
            # writes the same values, and rank 0's are partitioned again.
            with _gathered_by_zero3([t for _, t in saved_entries if managed_by_zero3(t)], modifier_rank=0):
                for key, target in saved_entries:
                    target.copy_(tensors[key])
    _let_checkpointing_reach_the_adapters(model)
    set_adapter(model, adapter_name)
    loaded = [p for layer_name in names.values() for p in model.get_submodule(layer_name).adapter_parameters(adapter_name).values()]
    loaded += [t for _, t in saved_entries]
    if not is_trainable:
        for tensor in loaded:
            tensor.requires_grad_(False)
    # A merge of this adapter (goft.merge, merge_and_unload) is then recorded in the model's
    # config, as long as the values are still the file's (the tensors' versions tell).
    setattr(model, CHECKSUMS_ATTR, {**getattr(model, CHECKSUMS_ATTR, {}),
                                    adapter_name: LoadedAdapter(description["tensors_sha256"], loaded)})
    return model


@contextlib.contextmanager
def _values_restored_on_failure(tensors: List[torch.Tensor]) -> Iterator[None]:
    """Gives ``tensors`` their values back if the block fails (modules_to_save half overwritten).

    The copies are kept in CPU memory: a saved module may be a whole embedding. Tensors partitioned
    by DeepSpeed ZeRO-3 are not passed: only a gather would give their values.
    """
    before = [t.detach().to("cpu", copy=True) for t in tensors]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for tensor, value in zip(tensors, before):
                tensor.copy_(value)
        raise


def merged_into(model_config: Any, description: Dict[str, Any]) -> bool:
    """Whether a model's config records the adapter described by ``description`` as merged into it
    (by its tensors' digest, or by the file's checksum, which earlier records hold)."""
    recorded = getattr(model_config, MERGED_ADAPTERS_KEY, None) or []
    return any(description.get(key) in recorded for key in ("tensors_sha256", "weights_sha256"))


def resolve_adapter_directory(
    path: Any,
    where: str,
    argument: str = "path",
    *,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    token: Union[str, bool, None] = None,
    local_files_only: bool = False,
) -> str:
    """The local directory of a saved adapter: ``path`` itself, or the Hub repository ``path``
    downloaded into huggingface_hub's cache (its two files only) when no local directory has
    that name. Raises FileNotFoundError naming both places when neither has it."""
    path = directory_path(path, where, argument)
    subfolder = os.fspath(subfolder) if isinstance(subfolder, os.PathLike) else subfolder
    check_hub_options(where, path, argument, revision=revision, subfolder=subfolder, cache_dir=cache_dir, token=token,
                      local_files_only=local_files_only)
    if os.path.isdir(path):
        return os.path.join(path, subfolder) if subfolder else path
    if os.path.exists(path):
        raise NotADirectoryError(f"{where}: {argument} {path!r} is a file; expected the directory save_adapter wrote")
    if not is_hub_repo_id(path):
        return path  # _read names the missing files
    folder = subfolder.strip("/") if subfolder else ""
    prefix = folder + "/" if folder else ""  # the files' paths inside the repository
    snapshot = download_from_hub(path, where, [prefix + CONFIG_NAME, prefix + WEIGHTS_NAME], revision=revision,
                                  cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    directory = os.path.join(snapshot, folder) if folder else snapshot
    missing = [prefix + name for name in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise missing_from_repository(where, path, revision, local_files_only, " or ".join(missing), "a goft adapter")
    return directory


def _read(path: str, where: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The adapter's description and tensors, checked against each other; raises ValueError (or
    FileNotFoundError for a missing file) led by ``where``, by default goft.load_adapter's."""
    where = where or f"goft.load_adapter({path!r})"
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{where}: missing {weights_path if os.path.isfile(config_path) else config_path}")
    with open(weights_path, "rb") as f:
        weights = f.read()
    checksum = hashlib.sha256(weights).hexdigest()
    if not os.path.isfile(config_path):
        # The first save of a folder stopped before the JSON was in place.
        return _self_description(weights_path, weights, where, FileNotFoundError, f"missing {config_path}")
    try:
        with open(config_path, "rb") as f:
            description = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return _self_description(weights_path, weights, where, ValueError,
                                 f"{CONFIG_NAME} is not valid JSON (corrupt or truncated): {e}")
    _check_description(description, where)
    mismatch = f"{WEIGHTS_NAME} does not match the checksum in {CONFIG_NAME} (corrupt, truncated, or from another save)"
    if description.get("weights_sha256") != checksum:
        tensors, _ = _load_tensors(weights)
        if tensors is not None and description.get("tensors_sha256") == _tensors_digest(tensors):
            # The tensors the JSON describes, in a file whose metadata changed since; or a save of
            # the same tensors with other metadata (another adapter name) stopped between its two
            # renames. The files cannot tell which, and the first must not load.
            raise ValueError(f"{where}: {mismatch}: its metadata was changed after saving, or a save of the same "
                             f"tensors into this folder stopped between writing its two files; if the latter, delete "
                             f"{CONFIG_NAME} and the tensors file loads by its own description")
        return _self_description(weights_path, weights, where, ValueError, mismatch)
    tensors, error = _load_tensors(weights)
    if tensors is None:
        raise ValueError(f"{where}: cannot read {WEIGHTS_NAME}: {error}")
    # The checksum covers the tensors file, not the JSON: a JSON edited after saving (say, another
    # angle parameterisation) would load wrong values silently. The file's own description says.
    own = _own_description(weights_path)
    edited = sorted(k for k in set(own or {}) | set(description) if k not in ("tensors", "weights_sha256")
                    and own is not None and own.get(k) != description.get(k))
    if edited:
        raise ValueError(f"{where}: {CONFIG_NAME} differs from the description saved inside {WEIGHTS_NAME} in "
                         f"{edited}: it was edited after saving; save the adapter again instead")
    # Files written before the digest was added: a merge records it too.
    description.setdefault("tensors_sha256", _tensors_digest(tensors))
    return description, tensors


def _own_description(weights_path: str) -> Optional[Dict[str, Any]]:
    """The description a tensors file holds of itself, if it holds one (files saved since it was added)."""
    import safetensors

    try:
        with safetensors.safe_open(weights_path, framework="pt") as f:
            description = json.loads((f.metadata() or {}).get(DESCRIPTION_KEY) or "null")
    except Exception:  # a damaged file: the caller's own checks say what is wrong
        return None
    return description if isinstance(description, dict) else None


def _check_description(description: Any, where: str, what: str = CONFIG_NAME) -> None:
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise ValueError(f"{where}: {what} is not a goft adapter description")
    if description.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: unsupported format_version {description.get('format_version')!r} (this goft reads {FORMAT_VERSION})"
        )
    _check_description_types(description, where)


def _self_description(weights_path: str, weights: bytes, where: str, error: type,
                      problem: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The description a tensors file holds of itself (files saved since it was added), and its
    tensors, used when the JSON beside it is missing or is not its own: a save that stopped
    between writing the two files left the new tensors beside the previous JSON (or none).
    Raises ``error(problem)`` when the file holds no description that its tensors match."""
    tensors, _ = _load_tensors(weights)
    description = _own_description(weights_path)
    if (tensors is None or not isinstance(description, dict) or description.get("format") != FORMAT
            or description.get("tensors_sha256") != _tensors_digest(tensors)):
        raise error(f"{where}: {problem}")
    description["tensors"] = {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in tensors.items()}
    description["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    _check_description(description, where, f"the description in {WEIGHTS_NAME}")
    warnings.warn(f"{where}: {problem}; {WEIGHTS_NAME} {SELF_DESCRIBED} match, so the adapter loads "
                  f"as it says. A save that stopped between writing the two files, or a tensors file copied in from "
                  f"another save, leaves them so; save the adapter again to rewrite {CONFIG_NAME}", stacklevel=4)
    return description, tensors


def _load_tensors(weights: bytes) -> Tuple[Optional[Dict[str, torch.Tensor]], str]:
    """The tensors of a safetensors file's bytes, or None and why not."""
    import safetensors.torch

    try:
        return safetensors.torch.load(weights), ""
    except Exception as e:  # safetensors raises its own error types for malformed files
        return None, str(e)


def _tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{_dtype_name(value.dtype)}|{list(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_description_types(description: Dict[str, Any], where: str) -> None:
    """The JSON fields' types, so a hand-edited or foreign file fails here, not deep inside loading."""

    def bad(field: str, expected: str) -> ValueError:
        return ValueError(f"{where}: {CONFIG_NAME} field {field!r} must be {expected}, got {description.get(field)!r:.200}")

    if not isinstance(description.get("config"), dict):
        raise bad("config", "an object")
    layers = description.get("layers")
    if not isinstance(layers, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and _is_int(v.get("in_features")) for k, v in layers.items()
    ):
        raise bad("layers", 'an object {module name: {"in_features": int}}')
    described = description.get("tensors")
    if not isinstance(described, dict) or not all(
        isinstance(k, str)
        and isinstance(v, dict)
        and isinstance(v.get("dtype"), str)
        and isinstance(v.get("shape"), list)
        and all(_is_int(n) for n in v["shape"])
        for k, v in described.items()
    ):
        raise bad("tensors", 'an object {tensor name: {"shape": [int, ...], "dtype": str}}')
    saved = description.get("modules_to_save", [])
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise bad("modules_to_save", "a list of module names")
    id2label = description.get("id2label", {})
    if not isinstance(id2label, dict) or not all(
        isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in id2label.items()
    ):
        raise bad("id2label", 'an object {"0": label name, ...}')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(
    model: nn.Module, description: Dict[str, Any], tensors: Dict[str, torch.Tensor], adapter_name: str, path: str
) -> Tuple[GOFTConfig, Dict[str, str], List[Tuple[str, torch.Tensor]]]:
    """The adapter's config, {saved layer name: the layer's name in ``model``} and the
    modules_to_save entries to copy, after checking everything; raises ValueError otherwise."""
    where = f"goft.load_adapter({path!r})"
    try:
        config = GOFTConfig.from_dict(description.get("config"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: invalid config in {CONFIG_NAME}: {e}") from None
    _check_not_distributed(model, where)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"{where}: the model already has an adapter {adapter_name!r}; pass another adapter_name")
    if merged_into(getattr(model, "config", None), description):
        raise ValueError(f"{where}: this adapter is merged into the model's weights already (model.config."
                         f"{MERGED_ADAPTERS_KEY} lists it); loading it would apply it twice. Load it into the base model")
    saved_type, model_type = description.get("model_type"), _model_type(model)
    if saved_type != model_type:
        raise ValueError(f"{where}: adapter saved for model_type={saved_type!r}, model is model_type={model_type!r}")

    described = description.get("tensors", {})
    if set(described) != set(tensors):
        missing, extra = sorted(set(described) - set(tensors)), sorted(set(tensors) - set(described))
        raise ValueError(f"{where}: tensors differ from {CONFIG_NAME}: missing {missing}, unexpected {extra}")
    for key, tensor in tensors.items():
        spec = described[key]
        if list(tensor.shape) != spec.get("shape") or _dtype_name(tensor.dtype) != spec.get("dtype"):
            raise ValueError(
                f"{where}: tensor {key} is {_dtype_name(tensor.dtype)} {list(tensor.shape)}, "
                f"{CONFIG_NAME} says {spec.get('dtype')} {spec.get('shape')}"
            )

    # Saved names are the plain model's as its checkpoints spell them (goft.checkpoint_names); the
    # model's own may have wrappers' components in them, and renamed modules.
    modules = {plain_module_name(n): (n, m) for n, m in _candidate_modules(model)}
    model_key = from_checkpoint_names(model)
    model_module = module_renamer(model_key)
    layers = description.get("layers", {})
    if not layers:
        raise ValueError(f"{where}: the adapter has no layers")
    adapter_keys = set()
    names = {}
    # Files that say so name layers as the checkpoint does: renamed first, where a renaming applies
    # (chained renamings may give one module's checkpoint name to another module of the model).
    # Earlier files hold the model's own names, which a renaming may still match.
    in_checkpoint_names = description.get("names") == "checkpoint"

    def spellings(saved: str, renamed: Optional[str]) -> List[str]:
        """A saved name and its renaming for this model, in the order to try them."""
        return [n for n in ([renamed, saved] if in_checkpoint_names else [saved, renamed]) if n]

    for module_name, info in layers.items():
        found = next((n for n in spellings(module_name, model_module(module_name)) if n in modules), "")
        names[module_name], module = modules.get(found, (None, None))
        if module is None or not is_adaptable(module):
            found = "missing" if module is None else f"a {type(module).__name__}, not a linear layer"
            raise ValueError(f"{where}: target layer {module_name} is {found} in {type(model).__name__}")
        d = input_width(module)
        if d != info.get("in_features"):
            raise ValueError(f"{where}: layer {module_name} has input width {d}, the adapter expects {info.get('in_features')}")
        if adapter_name in getattr(module, "adapter_configs", {}):
            raise ValueError(f"{where}: layer {module_name} already has an adapter {adapter_name!r}")
        for key, shape in adapter_shapes(config, d).items():
            full = f"{module_name}.{key}"
            if full not in tensors:
                raise ValueError(f"{where}: tensor {full} is missing")
            if tuple(tensors[full].shape) != shape or tensors[full].dtype != torch.float32:
                raise ValueError(
                    f"{where}: tensor {full} is {tensors[full].dtype} {tuple(tensors[full].shape)}, "
                    f"expected torch.float32 {shape} for d={d}"
                )
            adapter_keys.add(full)

    # The saved modules by the model's names: the config's modules_to_save may name them by full
    # paths of the other spelling, so the model selects them by the names resolved here.
    state_keys = sorted(set(tensors) - adapter_keys)
    saved_keys = {m: [k[len(m) + 1:] for k in state_keys if k.startswith(m + ".")]
                  for m in description.get("modules_to_save", [])}
    resolved = {}
    for saved, keys in saved_keys.items():
        plain, _ = module_state_names(model_key, saved, keys)
        resolved[saved] = next((n for n in spellings(saved, plain) if n in modules), saved)
    selected = {plain_module_name(n) for n in _match_all(dict(_candidate_modules(model)), config.modules_to_save)} \
        if config.modules_to_save else set()
    if config.modules_to_save and resolved and selected != set(resolved.values()):
        config = config.replace(modules_to_save=sorted(resolved.values()))
    _check_targets(model, list(names.values()), config, where)

    saved_entries = []
    module_names = {plain: name for plain, (name, _) in modules.items()}
    for key in state_keys:
        owner = next((m for m in saved_keys if key.startswith(m + ".")), None)
        if owner is None:
            raise ValueError(f"{where}: tensor {key} belongs to no adapter layer and no modules_to_save")
        target = next((t for t in (_state_entry(model, k, module_names) for k in spellings(key, model_key(key)))
                       if t is not None), None)
        if target is None:
            raise ValueError(f"{where}: modules_to_save entry {key} does not exist in {type(model).__name__}")
        # Another floating dtype is cast on loading, as a head trained in bfloat16 loads into
        # a float32 base (and back).
        cast = target.dtype.is_floating_point and tensors[key].dtype.is_floating_point
        if whole_shape(target) != tensors[key].shape or (target.dtype != tensors[key].dtype and not cast):
            raise ValueError(
                f"{where}: modules_to_save entry {key} is {target.dtype} {tuple(whole_shape(target))} in the model, "
                f"{tensors[key].dtype} {tuple(tensors[key].shape)} in the adapter"
            )
        saved_entries.append((key, target))
    return config, names, saved_entries


def _fsdp1_units(model: nn.Module) -> List[str]:
    """Names of the FSDP1 ``FullyShardedDataParallel`` units in ``model``, the root ("") first.

    Raises ValueError for units inside a model that is not one itself: gathering from a unit that
    is not the root would make it the root of its own tree and break the training that follows.
    """
    units = [name for name, module in model.named_modules() if is_fsdp1_unit(module)]
    if units and units[0] != "":
        raise ValueError(
            f"goft.save_adapter: {units[0]} is a FullyShardedDataParallel unit inside the model passed; call "
            "goft.save_adapter on every rank with the FullyShardedDataParallel-wrapped model itself (the root, e.g. "
            "transformers.Trainer's trainer.model after training), which gathers the shards"
        )
    return units


def _owner(module_name: str, units: List[str]) -> str:
    """The FSDP1 unit whose flat parameter holds the parameters of module ``module_name``: the
    innermost unit around it ("" for the root, or when there are no units)."""
    around = [u for u in units if u == "" or module_name == u or module_name.startswith(u + ".")]
    return max(around, key=len, default="")


def _whole_parameters_of(unit: Optional[nn.Module]):
    """A context in which the parameters that FSDP1 ``unit`` holds itself are whole on every rank."""
    if unit is None:
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False)


def _label_names(model: nn.Module) -> Optional[Dict[str, str]]:
    """A transformers model's output label names {"0": name, ...}, unless they are the defaults."""
    config = getattr(model.module if is_fsdp1_unit(model) else model, "config", None)
    id2label = getattr(config, "id2label", None)
    if not isinstance(id2label, dict) or not id2label:
        return None
    names = {str(k): str(v) for k, v in id2label.items()}
    return None if all(v == f"LABEL_{k}" for k, v in names.items()) else names


def _gathered_by_zero3(params: List[torch.Tensor], modifier_rank: Optional[int] = None):
    """A context in which the DeepSpeed ZeRO-3 parameters ``params`` are whole on every rank (a
    collective); with ``modifier_rank``, that rank's changes are kept when it ends."""
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # imported already: it made the parameters

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _modules_to_save(model: nn.Module, config: GOFTConfig) -> List[str]:
    if not config.modules_to_save:
        return []
    return _match_all(dict(_candidate_modules(model)), config.modules_to_save)


def _state_entry(model: nn.Module, key: str, module_names: Dict[str, str]) -> Optional[torch.Tensor]:
    """The tensor a saved key (plain module name, then attribute) names in ``model``, if any."""
    module_name, _, attr = key.rpartition(".")
    if not module_name:
        module = model
    elif module_name in module_names:
        module = model.get_submodule(module_names[module_name])
    else:
        return None
    value = getattr(module, attr, None)
    return value if isinstance(value, torch.Tensor) else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_files_atomically(directory: str, files: List[Tuple[str, bytes]]) -> None:
    """Writes every (name, data) of ``files`` to a temporary file in ``directory``, fsynced, and
    only then renames them into place, in order. A failure while writing (a full disk, an
    interrupt) leaves the previous files as they were; only a stop between the renames, which
    need no space, can leave new files beside previous ones."""
    _remove_leftovers_of_killed_saves(directory, [name for name, _ in files])
    written: List[Tuple[str, str]] = []
    try:
        for name, data in files:
            written.append((_written_temporary(directory, name, data), name))
        for tmp, name in written:
            os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    _fsync_directory(directory)


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022  # the usual default, where /proc does not say (not Linux)


def _written_temporary(directory: str, name: str, data: bytes) -> str:
    """A new temporary file in ``directory`` holding ``data``, on disk (fsynced); its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}@{socket.gethostname()}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates the file private (0600); give it the mode open() would, as torch.save's
            # checkpoints have: 0666 less the user's umask.
            os.chmod(tmp, 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


# A temporary file of _written_temporary: ".<name>.<pid>@<host>.<mkstemp's random part>.tmp".
_TEMPORARY_FILE = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)@(?P<host>.+)\.[A-Za-z0-9_]+\.tmp")


def _remove_leftovers_of_killed_saves(directory: str, names: List[str]) -> None:
    """Removes the temporary files of ``names`` that earlier saves into ``directory`` left when
    killed before they could clean up (SIGKILL, an out-of-memory kill): hidden files that
    ``huggingface_hub.upload_folder`` would publish. Only files written on this host by processes
    that no longer run; a save in progress elsewhere, here or on another host sharing the folder,
    keeps its own."""
    if os.name != "posix":  # no way to ask whether a process runs without signalling it
        return
    host = socket.gethostname()
    removed = []
    for entry in sorted(os.listdir(directory)):
        found = _TEMPORARY_FILE.fullmatch(entry)
        if not found or found["name"] not in names or found["host"] != host or _runs(int(found["pid"])):
            continue
        try:
            os.remove(os.path.join(directory, entry))
        except OSError:  # gone already, or not ours to remove: the save goes on without it
            continue
        removed.append(entry)
    if removed:
        warnings.warn(f"goft.save_adapter: removed {len(removed)} temporary file(s) that a killed save left in "
                      f"{directory!r}: {', '.join(removed)}", stacklevel=5)


def _runs(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (POSIX: signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it runs, as another user
        return True
    return True


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable (a power cut right after a save keeps the new file); not
    # every platform can open a directory, and there the rename is as durable as it gets.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
