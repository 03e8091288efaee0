"""Model-level operations: inject adapters, switch/delete them, merge/unmerge/unload, penalty, counts."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import re
import sys
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

import torch
from torch import nn

from goft.config import GOFTConfig, check_adapter_name, type_and_value
from goft.layers import (
    FLATTENED_BY_FSDP1,
    GivensLinear,
    flattened_by_fsdp1,
    is_adaptable,
    is_conv1d,
    is_fsdp1_unit,
    orthogonality_term,
    whole_numel,
)
from goft.presets import CLASSIFICATION_HEAD_NAMES, default_target_modules

__all__ = [
    "inject",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "active_adapter",
    "adapter_configs",
    "merge",
    "unmerge",
    "unload",
    "merge_and_unload",
    "disable_adapters",
    "orthogonality_penalty",
    "count_parameters",
    "print_trainable_parameters",
    "goft_layers",
]

# Model attributes: {adapter name: GOFTConfig}, whose presence marks an injected model, and the
# active adapter's name. Plain attributes, not buffers: they must not enter the state dict.
CONFIGS_ATTR = "goft_configs"
ACTIVE_ATTR = "goft_active_adapter"
# {adapter name: LoadedAdapter} of the adapters goft.load_adapter loaded from files.
CHECKSUMS_ATTR = "goft_adapter_checksums"
# A merged model's config lists the digests (an adapter file's tensors_sha256; weights_sha256 in
# earlier records) of the adapters merged into it (goft.merge of a loaded adapter, goft merge,
# goft finetune --save-merged), so that loading one of them into it again, which would apply the
# rotation twice, is refused.
MERGED_ADAPTERS_KEY = "goft_merged_adapters"


class LoadedAdapter:
    """An adapter file's tensors digest, and the tensors loaded from it: a merge records the
    digest only while they hold the file's values (not after training on).

    A tensor's version counts the in-place changes made through it (optimizer steps, copy_);
    writes through ``.data`` or raw pointers (some fused optimizers, EMA code) pass it by, so the
    values' bytes are compared too, while the tensor keeps the dtype it was loaded in (a cast
    since, model.to(torch.bfloat16), leaves the version alone)."""

    def __init__(self, digest: str, tensors: List[torch.Tensor]) -> None:
        self.digest = digest
        self._loaded = [(t, t._version, t.dtype, _bytes_digest(t)) for t in tensors]

    def unchanged(self) -> bool:
        return all(t._version == version and (t.dtype != dtype or _bytes_digest(t) == digest)
                   for t, version, dtype, digest in self._loaded)


def _bytes_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's values; of this rank's shard for a DTensor (no collective)."""
    if callable(getattr(tensor, "to_local", None)):
        tensor = tensor.to_local()
    if tensor.is_meta:
        return ""
    data = tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


# The index of a transformer block in a module name: "model.layers.3.mlp" -> 3, "h.0.attn" -> 0.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
# The name components that wrapper modules add in front of the module they wrap: torch.compile's
# OptimizedModule, FSDP1's FullyShardedDataParallel, torch's activation-checkpoint wrapper.
# Adapter files name layers as in the plain model, without them.
_WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})

_Function = TypeVar("_Function", bound=Callable)


def plain_module_name(name: str) -> str:
    """A module's name as in the plain model: ``_orig_mod.model.layers.0`` -> ``model.layers.0``."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)


def _compiled_original(model):
    """The model that ``torch.compile(model)`` wrapped (itself when not compiled)."""
    # torch._dynamo is imported by then if the model was compiled; importing it here would cost
    # every call on a plain model about a second.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def accepts_compiled(function: _Function) -> _Function:
    """Lets a model-level function take a ``torch.compile``'d model.

    It works on the compiled model's original module (whose adapters the compiled one runs), so
    module names, and with them adapter files and target patterns, are the plain model's; where it
    returns that module, the caller gets back what it passed.
    """

    @functools.wraps(function)
    def on_the_original(model, *args, **kwargs):
        original = _compiled_original(model)
        if not isinstance(original, nn.Module):
            raise TypeError(f"goft.{function.__name__}: expected model an nn.Module, got {type_and_value(model)}")
        result = function(original, *args, **kwargs)
        return model if result is original else result

    return on_the_original  # type: ignore[return-value]


@accepts_compiled
def inject(
    model: nn.Module, config: Optional[GOFTConfig] = None, adapter_name: str = "default", **overrides
) -> nn.Module:
    """Adapts ``model`` in place with a GOFT/qGOFT adapter and makes it the active, trainable one.

    Target layers are replaced by GivensLinear wrappers (identity at initialisation); every other
    parameter is frozen except those of ``config.modules_to_save``. Calling it again with a new
    ``adapter_name`` adds that adapter to the layers it targets and activates it.

    Args:
        model: any nn.Module; with ``target_modules=None`` a Hugging Face model whose
            ``config.model_type`` has a preset (goft.presets).
        config: a GOFTConfig; None means GOFTConfig().
        adapter_name: key of this adapter (no ".").
        **overrides: GOFTConfig fields replacing those of ``config``, e.g. ``variant="qgoft"``.

    Returns:
        ``model`` itself.
    """
    _add_adapter(model, adapter_name, config, overrides, "goft.inject")
    set_adapter(model, adapter_name)
    return model


@accepts_compiled
def add_adapter(
    model: nn.Module, adapter_name: str, config: Optional[GOFTConfig] = None, **overrides
) -> nn.Module:
    """Like inject, but leaves the currently active adapter (if any) active and this one frozen."""
    return _add_adapter(model, adapter_name, config, overrides, "goft.add_adapter")


def _add_adapter(model: nn.Module, adapter_name: str, config: Optional[GOFTConfig], overrides: Dict[str, Any],
                 where: str) -> nn.Module:
    if config is not None and not isinstance(config, GOFTConfig):
        hint = {str: f"; to choose the variant, pass variant={config!r}", dict: "; pass GOFTConfig(**config)"}
        raise TypeError(
            f"{where}: expected config a GOFTConfig or None, got {type_and_value(config)}"
            + hint.get(type(config), "")
        )
    config = (config or GOFTConfig()).replace(**overrides)
    targets = find_target_modules(model, config, adapter_name, where=where)
    with undone_on_failure(model, adapter_name):
        _attach(model, targets, adapter_name, config)
    _let_checkpointing_reach_the_adapters(model)
    # Trained by any adapter's modules_to_save (while that adapter is active), trainable by the
    # user's choice, or adapted itself: the user has seen to the head.
    saved = [m for names in _saved_modules(model).values() for m in names]
    head_params = {h: list(model.get_submodule(h).parameters()) for h in _classification_heads(model)}
    frozen_heads = [h for h, params in head_params.items() if params and not any(p.requires_grad for p in params)
                    and not _inside(h, saved) and not any(_inside(t, [h]) for t in targets)]
    if frozen_heads:
        warnings.warn(
            f"{where}: the classification head {frozen_heads} stays frozen; if it is freshly initialised "
            f"(from_pretrained of a checkpoint without it), train it too: modules_to_save={frozen_heads}"
        )
    return model


@accepts_compiled
def find_target_modules(model: nn.Module, config: GOFTConfig, adapter_name: str = "default",
                        where: str = "goft.find_target_modules") -> List[str]:
    """Names of the modules ``config`` selects in ``model``, validated; raises ValueError with the
    reason, led by ``where`` (the function the user called)."""
    check_adapter_name(adapter_name, where)
    _check_not_distributed(model, where)
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(
            f"{where}: adapter {adapter_name!r} is already injected into this model "
            f"(adapters: {list(configs)}); pick another adapter_name or goft.delete_adapter it first"
        )
    # Every path of every module: a module registered under several names (shared between two
    # parents) can be selected by any of them and is adapted once, under its first name.
    paths = list(_candidate_modules(model, remove_duplicate=False))
    modules = dict(paths)
    first_name: Dict[int, str] = {}
    for n, m in paths:
        first_name.setdefault(id(m), n)
    linear_names = [n for n, m in modules.items() if _is_linear(m) and first_name[id(m)] == n]
    target_modules = config.target_modules
    if target_modules is None:
        model_type = _model_type(model)
        target_modules = default_target_modules(model_type)
        if target_modules is None:
            raise ValueError(
                f"{where}: no default target_modules for model_type={model_type!r}; pass target_modules "
                f"(names, a regex or 'all-linear'). Linear layers found: {_preview(linear_names)}"
            )
    save_names = _saved_module_paths(paths, config)
    if target_modules == "all-linear":
        head = _output_head(model)
        names = [n for n in linear_names if modules[n] is not head and not _inside(n, save_names)
                 and not _inside(n, _classification_heads(model))]
    else:
        names = _match_all(modules, target_modules)
    excluded = set() if config.exclude_modules is None else {
        id(modules[n]) for n in _match_all(modules, config.exclude_modules)}

    def kept(candidates: List[str]) -> List[str]:
        wanted = config.layers_to_transform
        return [n for n in candidates if id(modules[n]) not in excluded and (wanted is None or _layer_index(n) in wanted)]

    names = list(dict.fromkeys(first_name[id(modules[n])] for n in kept(names)))
    if not names:
        # A lone name as a string is a regular expression over the whole name, as in PEFT: say so
        # when, as a list, it would have matched.
        hint = ""
        if isinstance(target_modules, str) and target_modules != "all-linear" and kept(_match_all(modules, [target_modules])):
            hint = (f" A string is a regular expression matched against the whole module name; for the layers "
                    f"named {target_modules!r}, pass a list: target_modules=[{target_modules!r}].")
        raise ValueError(
            f"{where}: target_modules={target_modules!r} matched no layer of {type(model).__name__} "
            f"(after exclude_modules={config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r})."
            f"{hint} Linear layers found: {_preview(linear_names)}"
        )
    not_adaptable = [f"{n} ({_describe(modules[n])})" for n in names if not is_adaptable(modules[n])]
    if not_adaptable:
        raise ValueError(
            f"{where}: target_modules={target_modules!r} matched modules that are not linear layers: "
            f"{_preview(not_adaptable)}; GOFT adapts nn.Linear, Conv1D or modules with in_features and weight"
        )
    _check_targets(model, names, config, where)
    return names


def _check_targets(model: nn.Module, names: List[str], config: GOFTConfig, where: str) -> None:
    """What any new adapter's layers and modules_to_save must satisfy, injected or loaded."""
    configs = adapter_configs(model)
    paths = list(_candidate_modules(model, remove_duplicate=False))
    modules = dict(paths)
    save_names = _saved_module_paths(paths, config)
    # torch's own attention and transformer layers read their linears' weights directly
    # (MultiheadAttention's out_proj always, TransformerEncoderLayer's linear1/2 on its eval fast
    # path), so a GivensLinear there would be skipped without a word.
    bypassed = [n for n in names if any(_inside(n, [p]) and n != p for p, m in paths
                                        if isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer,
                                                          nn.TransformerDecoderLayer)))]
    if bypassed:
        raise ValueError(
            f"{where}: {_preview(bypassed)} sit inside torch.nn.MultiheadAttention or nn.Transformer*Layer, "
            "which read their linears' weights directly and would skip the adapter; exclude them (exclude_modules)"
        )
    # transformers re-ties and saves tied weights by their plain names (lm_head.weight), which a
    # wrapper moves (lm_head.base_layer.weight): save_pretrained, and with it every Trainer
    # checkpoint, would fail after training, and tie_weights at once.
    if callable(getattr(model, "tie_weights", None)) and callable(getattr(model, "save_pretrained", None)):
        owners = _parameter_owners(model)
        tied = [(n, others) for n in names if (others := _weight_shared_with(modules[n], owners))]
        if tied:
            name, others = tied[0]
            raise ValueError(
                f"{where}: layer {name} shares its weight with {others} (tied weights, e.g. tie_word_embeddings); "
                "transformers cannot re-tie or save a model with an adapter on one side of tied weights "
                "(save_pretrained and Trainer's checkpoints would fail). Leave it out, or untie it first: "
                f"model.config.tie_word_embeddings = False; model.{name}.weight = "
                f"torch.nn.Parameter(model.{name}.weight.detach().clone())"
            )
    target_ids = {id(modules[n]) for n in names}
    overlap = sorted({n for n, m in paths if id(m) in target_ids and _inside(n, save_names)})
    if overlap:
        raise ValueError(f"{where}: modules {overlap} are both targeted and in (or inside) modules_to_save")
    if config.modules_to_save and not save_names:
        raise ValueError(f"{where}: modules_to_save={config.modules_to_save!r} matched no module")
    # The adapter file holds the saved modules' state dicts, as safetensors: tensors only.
    not_tensors = [f"{n}.{key}" for n in sorted(save_names) for key in non_tensor_state(modules[n])]
    if not_tensors:
        raise ValueError(f"{where}: modules_to_save={config.modules_to_save!r} hold state that is not a tensor "
                         f"({not_tensors}: a module's get_extra_state), which an adapter file cannot hold")
    # A module saved whole (its state dict goes into the adapter file) holding layers of another
    # adapter, or this adapter's layers inside another adapter's saved module: one adapter's file
    # would then hold the other's parameters under the wrapper's names, and would not load.
    adapted = sorted(n for n, m in paths if isinstance(m, GivensLinear) and _inside(n, save_names))
    if adapted:
        raise ValueError(f"{where}: modules_to_save={config.modules_to_save!r} holds layers that adapters "
                         f"{list(configs)} adapt: {_preview(adapted)}; save modules without adapted layers")
    saved_by = {name: _saved_module_paths(paths, other) for name, other in configs.items()}
    saved_by_others = set().union(*saved_by.values())
    inside_saved = sorted({n for n, m in paths if id(m) in target_ids and _inside(n, saved_by_others)})
    if inside_saved:
        raise ValueError(f"{where}: modules {inside_saved} are targeted but inside the modules_to_save of "
                         f"adapters {list(configs)}; target layers outside them")
    # A model holds one copy of a module: two adapters saving the same one (a classification head
    # per task) would share it, and the second would silently replace or retrain the first's,
    # which its next save_adapter would then write into the first's file.
    for other_name, theirs in saved_by.items():
        shared = sorted(n for n in save_names if _inside(n, theirs) or any(_inside(t, [n]) for t in theirs))
        if shared:
            raise ValueError(
                f"{where}: modules_to_save {shared} are also saved by adapter {other_name!r}; the adapters of a "
                "model share one copy of a module, so this adapter would replace (load) or retrain (inject) "
                f"{other_name!r}'s. Use one model instance per adapter with its own head, or "
                f"goft.delete_adapter(model, {other_name!r}) first"
            )


def non_tensor_state(module: nn.Module) -> List[str]:
    """The keys of ``module``'s state dict whose values are not tensors (``get_extra_state``)."""
    return [key for key, value in module.state_dict().items() if not isinstance(value, torch.Tensor)]


def _saved_module_paths(paths: List[Tuple[str, nn.Module]], config: GOFTConfig) -> set:
    """Every path of every module that ``config.modules_to_save`` selects (a shared module by each of its names)."""
    if not config.modules_to_save:
        return set()
    modules = dict(paths)
    save_ids = {id(modules[n]) for n in _match_all(modules, config.modules_to_save)}
    return {n for n, m in paths if id(m) in save_ids}


def _attach(model: nn.Module, names: List[str], adapter_name: str, config: GOFTConfig) -> None:
    """Wraps (or reuses the wrapper of) each named layer and adds the adapter; names are pre-validated.

    A layer registered under several names gets one wrapper at all of them, so every path through
    the model applies the same adapter. Called inside ``undone_on_failure``.
    """
    paths: Dict[int, List[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, GivensLinear):
            wrapper = GivensLinear(module)
            wrapper.layer_name = name
            for path in paths.get(id(module), [name]):
                _set_submodule(model, path, wrapper)
            module = wrapper
        module.add_adapter(adapter_name, config)
    configs = adapter_configs(model)
    configs[adapter_name] = config
    setattr(model, CONFIGS_ATTR, configs)
    _set_trainable(model)


@contextlib.contextmanager
def undone_on_failure(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """Puts ``model`` back as it was if adding ``adapter_name`` stops halfway.

    Validation runs before any layer is touched, so what stops an addition midway is an interrupt
    (Ctrl-C), running out of memory, or a failure while loading the adapter's values. Without the
    undo, some layers would be wrapped and hold the adapter and others not, the base weights would
    be frozen, and a second attempt would fail on the layers that have it.
    """
    modules = list(model.named_modules(remove_duplicate=False))
    trainable = [(param, param.requires_grad) for param in model.parameters()]
    attributes = {a: getattr(model, a) for a in (CONFIGS_ATTR, ACTIVE_ATTR) if hasattr(model, a)}
    try:
        yield
    except BaseException:
        for module in model.modules():  # wrappers made by this addition are dropped below anyway
            if isinstance(module, GivensLinear) and adapter_name in module.adapter_configs:
                module.delete_adapter(adapter_name)
        for path, module in modules:  # parents come before their children
            if path and model.get_submodule(path) is not module:
                _set_submodule(model, path, module)
        for param, requires_grad in trainable:
            param.requires_grad_(requires_grad)
        for attribute in (CONFIGS_ATTR, ACTIVE_ATTR):
            if attribute in attributes:
                setattr(model, attribute, attributes[attribute])
            elif hasattr(model, attribute):
                delattr(model, attribute)
        raise


@accepts_compiled
def set_adapter(model: nn.Module, adapter_name: Optional[str]) -> None:
    """Applies only ``adapter_name`` (None: no adapter) from now on; only its parameters and its
    modules_to_save train (other adapters' modules_to_save are frozen)."""
    configs = _require_injected(model, "goft.set_adapter")
    if adapter_name is not None:
        check_adapter_name(adapter_name, "goft.set_adapter")
    if adapter_name is not None and adapter_name not in configs:
        raise ValueError(f"goft.set_adapter: no adapter {adapter_name!r}; adapters are {list(configs)}")
    for layer in goft_layers(model):
        # Any other merged adapter keeps acting, also when adapter_name is merged itself.
        others = [a for a in layer.merged_adapters if a != adapter_name]
        if others:
            how = "beside it" if adapter_name in layer.merged_adapters else "while it is applied on top"
            warnings.warn(
                f"goft.set_adapter: adapters {others} stay merged into the base weights {how}; goft.unmerge "
                f"first for {adapter_name!r} alone"
            )
            break
    for layer in goft_layers(model):
        layer.set_adapter(adapter_name if adapter_name in layer.adapter_configs else None)
    setattr(model, ACTIVE_ATTR, adapter_name)
    _set_saved_modules_trainable(model, adapter_name)


@accepts_compiled
def active_adapter(model: nn.Module) -> Optional[str]:
    """Name of the adapter applied by ``model`` (None when none is)."""
    return getattr(model, ACTIVE_ATTR, None)


@accepts_compiled
def adapter_configs(model: nn.Module) -> Dict[str, GOFTConfig]:
    """{adapter name: GOFTConfig} of an injected model ({} for a plain one)."""
    return dict(getattr(model, CONFIGS_ATTR, {}))


@accepts_compiled
def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Removes an adapter's parameters from every layer; deleting the active one leaves none active."""
    configs = _require_injected(model, "goft.delete_adapter")
    check_adapter_name(adapter_name, "goft.delete_adapter")
    if adapter_name not in configs:
        raise ValueError(f"goft.delete_adapter: no adapter {adapter_name!r}; adapters are {list(configs)}")
    layers = goft_layers(model)
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(f"goft.delete_adapter: adapter {adapter_name!r} is merged; goft.unmerge(model) first")
    for layer in layers:
        if adapter_name in layer.adapter_configs:  # adapters may target different layers
            layer.delete_adapter(adapter_name)
    del configs[adapter_name]
    setattr(model, CONFIGS_ATTR, configs)
    getattr(model, CHECKSUMS_ATTR, {}).pop(adapter_name, None)
    if active_adapter(model) == adapter_name:
        setattr(model, ACTIVE_ATTR, None)
    _set_trainable(model)


@accepts_compiled
def goft_layers(model: nn.Module) -> List[GivensLinear]:
    return [m for m in model.modules() if isinstance(m, GivensLinear)]


@accepts_compiled
def named_goft_layers(model: nn.Module) -> Iterator[Tuple[str, GivensLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, GivensLinear):
            yield name, module


@accepts_compiled
@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the goft layers compute as their base layers (adapters skipped, not removed).

    Modules in ``modules_to_save`` (e.g. a classification head) are trained in place and shared
    by every adapter, so they keep their trained values here."""
    layers = goft_layers(model)
    if any(layer.merged_adapters for layer in layers):
        raise RuntimeError("goft.disable_adapters: adapters are merged into the base weights; goft.unmerge(model) first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, previous):
            layer.disabled = was_disabled


@accepts_compiled
def merge(model: nn.Module) -> nn.Module:
    """Folds the active adapter into the base weights (``W <- W @ T^T``); forward then skips it.

    Merging an adapter that is already merged warns and changes nothing.
    """
    _require_injected(model, "goft.merge")
    name = active_adapter(model)
    if name is None:
        raise ValueError("goft.merge: no active adapter to merge; goft.set_adapter(model, name) first")
    layers = [layer for layer in goft_layers(model) if layer.active_adapter == name]
    if any(name in layer.merged_adapters for layer in layers):
        warnings.warn(f"goft.merge: adapter {name!r} is already merged; merging it again would apply it twice, skipped")
        return model
    # Every layer is checked before any weight changes: a merge either happens everywhere or nowhere.
    _check_not_merged_already(model, name, "goft.merge")
    _check_mergeable(model, layers, name, invertible=True, where="goft.merge")
    for layer in layers:
        layer.merge(name)
    _record_merge(model, name)
    return model


@accepts_compiled
def unmerge(model: nn.Module) -> nn.Module:
    """Restores the base weights exactly (up to rounding) by inverting every merged adapter.

    Unmerging a model with nothing merged warns and changes nothing.
    """
    _require_injected(model, "goft.unmerge")
    layers = [layer for layer in goft_layers(model) if layer.merged_adapters]
    if not layers:
        warnings.warn("goft.unmerge: no adapter is merged; nothing to unmerge")
        return model
    unmerged = {name for layer in layers for name in layer.merged_adapters}
    for layer in layers:
        layer.unmerge()
    for name in unmerged:
        _record_merge(model, name, merged=False)
    return model


@accepts_compiled
def unload(model: nn.Module) -> nn.Module:
    """Removes every goft module (unmerging first), giving back the base layers; adapters are
    discarded. Modules in ``modules_to_save`` keep their trained values (they are trained in place)."""
    _require_injected(model, "goft.unload")
    for layer in goft_layers(model):
        for name in layer.merged_adapters:
            _record_merge(model, name, merged=False)
        layer.unmerge()
    return _strip(model)


@accepts_compiled
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges the active adapter and returns the plain model with no goft modules (zero inference cost)."""
    _require_injected(model, "goft.merge_and_unload")
    name = active_adapter(model)
    if name is None:
        raise ValueError("goft.merge_and_unload: no active adapter to merge; goft.set_adapter(model, name) first")
    layers = [layer for layer in goft_layers(model) if layer.active_adapter == name and name not in layer.merged_adapters]
    _check_not_merged_already(model, name, "goft.merge_and_unload")
    _check_mergeable(model, layers, name, invertible=False, where="goft.merge_and_unload")
    for layer in layers:
        layer.merge(name)
    _record_merge(model, name)
    return _strip(model)


def record_merged_checksum(model: nn.Module, weights_sha256: str, merged: bool = True) -> None:
    """Adds (or removes) an adapter file's digest to the list of those merged into ``model``'s
    config (MERGED_ADAPTERS_KEY), which save_pretrained writes and goft.load_adapter and goft
    merge then refuse; a model without a config has nowhere to keep it."""
    config = getattr(model, "config", None)
    if config is None:
        return
    recorded = list(getattr(config, MERGED_ADAPTERS_KEY, None) or [])
    if merged and weights_sha256 not in recorded:
        recorded.append(weights_sha256)
    elif not merged and weights_sha256 in recorded:
        recorded.remove(weights_sha256)
    if recorded:
        setattr(config, MERGED_ADAPTERS_KEY, recorded)
    elif hasattr(config, MERGED_ADAPTERS_KEY):
        delattr(config, MERGED_ADAPTERS_KEY)


def _record_merge(model: nn.Module, adapter_name: str, merged: bool = True) -> None:
    """Records (or forgets) a merge of an adapter loaded from a file (goft.load_adapter) that
    still holds the file's values."""
    loaded = getattr(model, CHECKSUMS_ATTR, {}).get(adapter_name)
    if loaded is not None and (loaded.unchanged() or not merged):
        record_merged_checksum(model, loaded.digest, merged)


def _check_not_merged_already(model: nn.Module, adapter_name: str, where: str) -> None:
    """Refuses to merge an adapter whose file is merged into the weights already (loaded twice)."""
    loaded = getattr(model, CHECKSUMS_ATTR, {}).get(adapter_name)
    recorded = getattr(getattr(model, "config", None), MERGED_ADAPTERS_KEY, None) or []
    if loaded is not None and loaded.unchanged() and loaded.digest in recorded:
        raise ValueError(f"{where}: adapter {adapter_name!r} was loaded from a file that is merged into the weights "
                         f"already (model.config.{MERGED_ADAPTERS_KEY} lists it); merging it again would apply it twice")


def _check_mergeable(model: nn.Module, layers: List[GivensLinear], adapter_name: str, invertible: bool,
                     where: str) -> None:
    """Raises before any weight changes if merging into one of ``layers`` would be wrong."""
    owners = _parameter_owners(model)
    for layer in layers:
        layer.check_mergeable(adapter_name, invertible=invertible, where=where)
        # A tied weight (e.g. an output head sharing the input embedding) would carry the merged
        # rotation into the other module too, silently changing what the model computes.
        others = _weight_shared_with(layer, owners)
        if others:
            raise ValueError(
                f"{where}: the weight of layer {layer.layer_name or type(layer.base_layer).__name__} is shared with "
                f"{others} (tied weights); merging would change those modules too. Untie the weights "
                "(e.g. tie_word_embeddings=False) or keep this adapter unmerged"
            )


def _memory_key(param: torch.Tensor) -> tuple:
    """What a parameter's values live in. Two Parameters over the same memory (``head.weight.data
    = emb.weight.data``, how older code ties weights) are as tied as one Parameter held twice.
    Parameters without memory of their own (meta, empty placeholders, tensor subclasses without
    a plain storage) count by identity."""
    if param.device.type != "meta" and param.numel() > 0:
        try:
            address = param.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):
            address = 0
        if address:
            return ("memory", address, param.storage_offset(), tuple(param.shape), param.stride(), param.dtype)
    return ("object", id(param))


def _parameter_owners(model: nn.Module) -> Dict[tuple, List[Tuple[str, nn.Module]]]:
    """{the parameter's memory (_memory_key): [(its full name, the module holding it)]} over every
    path of every module."""
    owners: Dict[tuple, List[Tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(_memory_key(param), []).append((f"{module_name}.{param_name}".lstrip("."), module))
    return owners


def _weight_shared_with(layer: nn.Module, owners: Dict[tuple, List[Tuple[str, nn.Module]]]) -> List[str]:
    """Names under which other modules hold the weight of ``layer`` (or of the layer it wraps): tied weights."""
    base = layer.base_layer if isinstance(layer, GivensLinear) else layer
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return []
    return [name for name, owner in owners.get(_memory_key(weight), []) if owner is not base]


def _strip(model: nn.Module) -> nn.Module:
    # Every path, so a layer registered under several names is restored at each of them.
    for name, layer in list(model.named_modules(remove_duplicate=False)):
        if isinstance(layer, GivensLinear):
            _set_submodule(model, name, layer.base_layer)
    for attr in (CONFIGS_ATTR, ACTIVE_ATTR, CHECKSUMS_ATTR):
        if attr in model.__dict__:
            delattr(model, attr)
    _remove_checkpointing_hook(model)
    return model


@accepts_compiled
def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """The qGOFT penalty lambda * sum <A[:,0], A[:,1]>^2 over the active quasi layers (differentiable).

    A 0-d float32 tensor, zero when no active adapter is qGOFT. Add it to the training loss.
    Under FSDP2 (``fully_shard``) the blocks are sharded DTensors outside forward: each rank sums
    its shards and one all-reduce gives every rank the whole penalty, as a plain tensor that can
    be added to the loss.
    """
    # The layers' blocks are joined into one tensor per lambda and device, so a step costs a few
    # ops whatever the number of layers; a term per layer costs a few small ops and autograd
    # nodes each (bench/host_bench.py: 3.8 against 15.6 ms per step over 224 adapted linears).
    groups: Dict[Tuple[float, torch.device], List[torch.Tensor]] = {}
    sharded = []
    for layer in goft_layers(model):
        found = layer.quasi_blocks()
        if found is None:
            continue
        blocks, orth_lambda = found
        if callable(getattr(blocks, "full_tensor", None)):  # an FSDP2 shard: a term of its own
            sharded.append(orthogonality_term(blocks, orth_lambda))
        else:
            groups.setdefault((orth_lambda, blocks.device), []).append(blocks)
    local = [orthogonality_term(torch.cat(blocks) if len(blocks) > 1 else blocks[0], orth_lambda)
             for (orth_lambda, _), blocks in groups.items()]
    # Layers may sit on several devices (a model split across GPUs): the sum goes to the first's.
    local = [t.to(local[0].device) for t in local]
    parts = ([torch.stack(sharded).sum().full_tensor()] if sharded else []) + ([torch.stack(local).sum()] if local else [])
    if parts:
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.zeros((), device=device)


@accepts_compiled
def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters count once.

    Under FSDP1 pass the wrapper (or count before wrapping): a rank holds only its shard of each
    parameter, and the whole sizes are read from the units' flat parameters. Under DeepSpeed
    ZeRO-3 they are read from the parameters themselves."""
    whole = _fsdp1_whole_numels(model)
    trainable = total = 0
    for name, p in model.named_parameters():
        numel = whole.get(id(p))
        if numel is None:
            if flattened_by_fsdp1(p):
                raise ValueError(
                    f"count_parameters: {name} is a shard ({FLATTENED_BY_FSDP1}) whose unit is outside "
                    "`model`: pass the outermost FullyShardedDataParallel wrapper, or count before wrapping"
                )
            numel = _unpacked_numel(p)
        total += numel
        if p.requires_grad:
            trainable += numel
    return trainable, total


def _unpacked_numel(param: torch.Tensor) -> int:
    """The parameter's number of weights: bitsandbytes packs two 4-bit weights per byte (Params4bit)
    and keeps the matrix's shape in its quant_state; DeepSpeed ZeRO-3 records the whole size
    beside the partition."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else whole_numel(param)


def _fsdp1_whole_numels(model: nn.Module) -> Dict[int, int]:
    """{id(parameter): its whole number of elements} for the parameters that the FSDP1 units in
    ``model`` keep as flat shards: the original parameters (use_orig_params=True) and the flat
    parameters themselves (use_orig_params=False), from the metadata FSDP1 keeps on each."""
    whole = {}
    for module in model.modules():
        flat = getattr(module, "_flat_param", None) if is_fsdp1_unit(module) else None
        numels = getattr(flat, "_numels", None)
        if numels is None:
            continue
        whole[id(flat)] = sum(numels)
        for param, numel in zip(getattr(flat, "_params", None) or (), numels):
            whole[id(param)] = numel
    return whole


@accepts_compiled
def print_trainable_parameters(model: nn.Module) -> None:
    """Prints "trainable params: ... || all params: ... || trainable%: ..." (count_parameters)."""
    trainable, total = count_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")


# ---- helpers ----


def _let_checkpointing_reach_the_adapters(model: nn.Module) -> None:
    """Hooks the input embeddings (once) so that their output requires grad whenever the model
    trains with activation checkpointing, as PEFT and transformers arrange for their adapters.

    Reentrant checkpointing (torch.utils.checkpoint with use_reentrant=True) runs a block's
    backward only if one of the block's inputs requires grad, and with the base model frozen none
    does: the adapters would get no gradient, with only a warning from torch. transformers makes
    the embeddings' output require grad when checkpointing is enabled, but only for models fed
    ``input_ids`` (5.x) or holding adapters of its own PEFT integration (4.x, whose checkpointing
    is reentrant by default): not for image models, nor for any goft model under 4.x, e.g. with
    ``Trainer(gradient_checkpointing=True)``, which enables it after goft.inject. The hook looks
    at each forward, so the order of the two does not matter; without checkpointing it leaves the
    output alone, so backward does no extra work. Embeddings the caller computed (``inputs_embeds``:
    soft prompts, a vision tower's features merged outside the model) never pass the embeddings:
    a pre-hook on each model gives them the same treatment.
    """
    # transformers' switches: the encoder/decoder stacks and (5.x) every checkpointed block.
    switches = [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
    if not switches:
        return
    # Partials of the modules, not closures: deepcopy and pickle then carry them to the copy's.
    models, embeddings = _models_with_input_embeddings(model)
    for module in embeddings:
        if _hook_key(module._forward_hooks, _require_grad_when_checkpointing) is None:
            module.register_forward_hook(functools.partial(_require_grad_when_checkpointing, switches))
    for module in models:
        if _hook_key(module._forward_pre_hooks, _given_embeddings_require_grad) is None:
            module.register_forward_pre_hook(functools.partial(_given_embeddings_require_grad, switches),
                                             with_kwargs=True)


def _models_with_input_embeddings(model: nn.Module) -> Tuple[List[nn.Module], List[nn.Module]]:
    """The models inside ``model`` that have input embeddings (transformers' get_input_embeddings),
    and those embeddings, each once: an encoder-decoder's encoder (Whisper's conv1) and a
    multimodal model's towers have their own, which the top-level model does not return."""
    models, found = [], {}
    for module in model.modules():
        get_embeddings = getattr(module, "get_input_embeddings", None)
        if not callable(get_embeddings):
            continue
        try:
            embeddings = get_embeddings()
        except (NotImplementedError, AttributeError, TypeError):  # a model without one
            continue
        if isinstance(embeddings, nn.Module):
            models.append(module)
            found.setdefault(id(embeddings), embeddings)
    return models, list(found.values())


def _checkpointing(switches: List[nn.Module]) -> bool:
    """Whether a checkpointed part of the model trains, with grad: when the hooks act."""
    return torch.is_grad_enabled() and any(m.gradient_checkpointing and m.training for m in switches)


def _require_grad_when_checkpointing(switches: List[nn.Module], module: nn.Module, args, output):
    # Some embeddings return a tuple led by the embeddings (BEiT's patch embeddings in 4.x: (x, (h, w))).
    embedded = output[0] if isinstance(output, (tuple, list)) and output else output
    if (isinstance(embedded, torch.Tensor) and not embedded.requires_grad and embedded.is_floating_point()
            and _checkpointing(switches)):
        embedded.requires_grad_(True)


# The keyword arguments through which transformers models take embeddings computed by the caller.
GIVEN_EMBEDDINGS = ("inputs_embeds", "decoder_inputs_embeds")


def _given_embeddings_require_grad(switches: List[nn.Module], module: nn.Module, args, kwargs):
    given = {k: v for k in GIVEN_EMBEDDINGS if isinstance(v := kwargs.get(k), torch.Tensor)
             and not v.requires_grad and v.is_floating_point()}
    if not given or not _checkpointing(switches):
        return None
    # An alias requires grad, not the caller's tensor, which then gets no .grad of its own.
    return args, {**kwargs, **{k: v.detach().requires_grad_(True) for k, v in given.items()}}


def _hook_key(hooks: Dict[int, Callable], function: Callable) -> Optional[int]:
    """The key of goft's hook ``function`` (a partial of it) among a module's ``hooks``, if there."""
    for key, hook in hooks.items():
        if isinstance(hook, functools.partial) and hook.func is function:
            return key
    return None


def _remove_checkpointing_hook(model: nn.Module) -> None:
    for module in model.modules():
        key = _hook_key(module._forward_hooks, _require_grad_when_checkpointing)
        if key is not None:
            del module._forward_hooks[key]
        key = _hook_key(module._forward_pre_hooks, _given_embeddings_require_grad)
        if key is not None:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def _set_trainable(model: nn.Module) -> None:
    """Freezes all but the active adapter and its modules_to_save."""
    # Adapter parameters are frozen here too; the layers' set_adapter re-enables the active ones.
    model.requires_grad_(False)
    _set_saved_modules_trainable(model, active_adapter(model))
    for layer in goft_layers(model):
        layer.set_adapter(layer.active_adapter)


def _saved_modules(model: nn.Module) -> Dict[str, List[str]]:
    """{adapter name: the modules its modules_to_save selects} (a module belongs to one adapter at most)."""
    candidates = dict(_candidate_modules(model, remove_duplicate=False))
    return {name: _match_all(candidates, config.modules_to_save) if config.modules_to_save else []
            for name, config in adapter_configs(model).items()}


def _set_saved_modules_trainable(model: nn.Module, active: Optional[str]) -> None:
    """The active adapter's modules_to_save train; every other adapter's stay frozen. They are
    trained in place, one copy each: a head that trained while another adapter was active would
    no longer be the one its own adapter was trained with."""
    for adapter, module_names in _saved_modules(model).items():
        for name in module_names:
            for param in model.get_submodule(name).parameters():
                param.requires_grad_(adapter == active)


def _candidate_modules(model: nn.Module, remove_duplicate: bool = True) -> Iterator[Tuple[str, nn.Module]]:
    """Named modules a config may select: not the root, and nothing inside a GivensLinear.

    With remove_duplicate=False a module registered under several names comes once per name.
    """
    inside = None
    for name, module in model.named_modules(remove_duplicate=remove_duplicate):
        if not name or (inside is not None and name.startswith(inside)):
            continue
        inside = None
        if isinstance(module, GivensLinear):
            inside = name + "."
        yield name, module


def _match_all(modules: Dict[str, nn.Module], selector) -> List[str]:
    if isinstance(selector, str):
        pattern = re.compile(selector)
        return [n for n in modules if pattern.fullmatch(n)]
    return [n for n in modules if any(n == key or n.endswith("." + key) for key in selector)]


def _inside(name: str, module_names) -> bool:
    """Whether module ``name`` is one of ``module_names`` or a submodule of one."""
    return any(name == m or name.startswith(m + ".") for m in module_names)


def _layer_index(name: str) -> Optional[int]:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, GivensLinear)) or is_conv1d(module)


def _classification_heads(model: nn.Module) -> List[str]:
    """Names of the model's top-level classification heads (presets.CLASSIFICATION_HEAD_NAMES).

    A transformers model without a head class around it (``BertModel``: its ``base_model`` is
    itself) has none: its ``pooler`` is pretrained, part of the encoder."""
    if getattr(model, "base_model", None) is model:
        return []
    return [name for name, _ in model.named_children() if name in CLASSIFICATION_HEAD_NAMES]


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    # "all-linear" leaves the vocabulary projection alone: it is often tied to the input
    # embedding, and the paper adapts the transformer blocks only.
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _check_not_distributed(model: nn.Module, where: str) -> None:
    """Refuses a model already wrapped by DistributedDataParallel or sharded by FSDP.

    Those register the parameters they synchronise when they wrap; adapter parameters added
    afterwards would train on each rank's data alone and drift apart with no error.
    """
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.parallel.DistributedDataParallel) or is_fsdp1_unit(module):
            raise ValueError(
                f"{where}: {name or 'the model'} is wrapped by {kind}; add goft adapters to the plain model first "
                "and wrap it afterwards (the wrapper only synchronises the parameters it saw when it wrapped)"
            )
        # deepspeed.initialize numbers every module it takes (ZeRO-3) or wraps it in its engine;
        # a model only built under deepspeed.zero.Init (from_pretrained with a ZeRO-3 config) is
        # not taken yet, and adapters may still be added to it.
        if kind == "DeepSpeedEngine" or isinstance(getattr(module, "ds_id", None), int):
            raise ValueError(
                f"{where}: {name or 'the model'} is already taken by deepspeed.initialize; add goft adapters to the "
                "plain model first and initialize it afterwards (its optimizer only holds the parameters it saw)"
            )
    # FSDP2 (fully_shard) turns parameters into DTensors in place; FSDP1 marks the parameters it
    # flattens, which are all a model wrapped as one unit shows (named_modules finds no wrapper).
    for name, param in model.named_parameters():
        if hasattr(param, "device_mesh"):
            raise ValueError(
                f"{where}: parameter {name} is sharded (FSDP2 fully_shard or another DTensor plan); add goft adapters "
                "to the plain model first and shard it afterwards"
            )
        if flattened_by_fsdp1(param):
            raise ValueError(
                f"{where}: parameter {name} is flattened and sharded by FullyShardedDataParallel (FSDP1); add goft "
                "adapters to the plain model first and wrap it afterwards"
            )


def _require_injected(model: nn.Module, where: str) -> Dict[str, GOFTConfig]:
    # The model's own attribute: a wrapper that forwards unknown attributes to the model it
    # wraps (DeepSpeed's engine) would otherwise pass for it, with its names in front of every
    # layer. FSDP1's wrapper forwards them too, and is what save_adapter gathers FSDP1 units from.
    configs = getattr(model, CONFIGS_ATTR, None) if is_fsdp1_unit(model) else vars(model).get(CONFIGS_ATTR)
    if configs is None:  # {} is still injected: its last adapter was deleted, the wrappers remain
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and getattr(inner, CONFIGS_ATTR, None) is not None:
            raise ValueError(
                f"{where}: {type(model).__name__} wraps the injected model; pass the wrapped model "
                "(model.module, or accelerator.unwrap_model(model))"
            )
        raise ValueError(f"{where}: the model has no goft adapter; goft.inject(model, ...) first")
    return configs


def _describe(module: nn.Module) -> str:
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return f"{type(module).__name__} whose weight is not initialised yet; run one forward pass first"
    if weight is not None and not isinstance(weight, torch.Tensor):
        return f"{type(module).__qualname__} from {type(module).__module__}, whose weight is not a tensor"
    return type(module).__name__


def _preview(names: List[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)" if names else "none"
