"""Module and tensor names as transformers' checkpoints spell them, which may differ from a model's.

transformers 5 renamed some models' modules (the ViT family: ``vit.encoder.layer.0.attention.
attention.query`` became ``vit.layers.0.attention.q_proj``) and keeps its checkpoint files in the
old names: it renames on loading and back on saving, so one file loads under 4.x and 5. goft's
adapter files do the same through transformers' own renamings, so an adapter moves between those
versions as the model's checkpoint does. Converters that fuse or split tensors (several
checkpoint tensors for one module) have no one-to-one name for an adapter and are left alone, as
are transformers versions without these renamings (4.x, whose names are the checkpoints').
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

from torch import nn

__all__ = ["to_checkpoint_names", "from_checkpoint_names", "module_renamer", "module_state_names"]

Rename = Callable[[str], Optional[str]]


def to_checkpoint_names(model: nn.Module) -> Rename:
    """A map from ``model``'s parameter and buffer names to its checkpoints' (None: keep the name)."""
    return _renamer(model, reverse=True)


def from_checkpoint_names(model: nn.Module) -> Rename:
    """A map from checkpoint names to ``model``'s (None: keep the name)."""
    return _renamer(model, reverse=False)


def module_renamer(rename: Rename) -> Rename:
    """The same map for module names, by the name of a weight the module would hold."""
    def renamed_module(name: str) -> Optional[str]:
        renamed = rename(name + ".weight")
        return renamed[: -len(".weight")] if renamed and renamed.endswith(".weight") else None

    return renamed_module


def module_state_names(rename: Rename, module_name: str, keys: List[str]) -> Tuple[str, List[str]]:
    """A module's name and its state's keys (``keys``, relative to it) in the other spelling:
    the keys renamed whole, and the module's name the part they share in front of their own
    names (a module may have no weight to name it by: BEiT's relative position bias); neither
    renamed where they do not agree."""
    full = [rename(f"{module_name}.{key}") or f"{module_name}.{key}" for key in keys]
    fronts = {name[: -len(key) - 1] for name, key in zip(full, keys) if name.endswith("." + key)}
    if keys and len(fronts) == 1 and all(name.endswith("." + key) for name, key in zip(full, keys)):
        return fronts.pop(), full
    renamed_module = module_renamer(rename)(module_name) or module_name
    if all(name.startswith(renamed_module + ".") for name in full):
        return renamed_module, full
    return module_name, [f"{module_name}.{key}" for key in keys]


def _renamer(model: nn.Module, reverse: bool) -> Rename:
    renamings, converters, rename_key = _transforms(model, reverse)
    if not renamings:
        return lambda key: None

    def rename(key: str) -> Optional[str]:
        try:
            renamed, converted = rename_key(key, renamings, converters, reverse=reverse)
        except Exception:  # an API of transformers' that changed: names stay as they are
            return None
        return renamed if converted is None and renamed != key else None

    return rename


def _transforms(model: nn.Module, reverse: bool) -> Tuple[List[Any], List[Any], Any]:
    """transformers' WeightRenamings and WeightConverters for ``model``, in the order loading
    (or, reversed, saving) applies them, as its save_pretrained and from_pretrained use them."""
    try:
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return [], [], None
    if not isinstance(model, transformers.PreTrainedModel):
        return [], [], None
    try:
        if reverse:
            # As save_pretrained for a model built from its config: the model's own mapping,
            # without legacy names and prefix changes. Not the one a base was loaded with (its
            # checkpoint may already hold the new names): an adapter's names must not depend on it.
            conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                           if not isinstance(c, PrefixChange)]
            conversions = [c.reverse_transform() for c in conversions[::-1]]
        else:
            # Prefixes are the model's own concern (goft's names are the model's from its root).
            conversions = [c for c in get_model_conversion_mapping(model) if not isinstance(c, PrefixChange)]
    except Exception:
        return [], [], None
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    return renamings, converters, rename_source_key
