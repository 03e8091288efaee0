"""GOFTConfig: what to adapt and how, validated once and serialisable to JSON."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

__all__ = ["GOFTConfig"]

VARIANTS = ("goft", "qgoft")
ANGLE_PARAMETERISATIONS = ("tanh", "raw")


@dataclass
class GOFTConfig:
    """How goft.inject adapts a model: GOFT, GOFT* or qGOFT (Ma et al., ICML 2024) on which layers.

    Attributes:
        variant: "goft" (strict Givens rotations, one angle per pair) or "qgoft" (a free 2x2
            block per pair, kept near-orthogonal by the penalty ``orth_lambda``).
        scale: GOFT*: a learned per-feature scale (d,) after the rotations. Strict variant only:
            a qGOFT block already has a free norm.
        angle_parameterisation: "tanh" stores p and uses the angle pi * tanh(p), as the
            authors' code does (bounded angles, gradient damped near +-pi); "raw" uses p as the
            angle.
        orth_lambda: strength of the qGOFT penalty lambda * sum <A[:,0], A[:,1]>^2
            (goft.orthogonality_penalty); ignored for strict GOFT.
        target_modules: which layers to adapt. A list (or set) of names matched on the module-name
            suffix ("q_proj" matches "model.layers.0.self_attn.q_proj"), a string taken as a
            regular expression matched against the full module name, "all-linear" (every linear
            layer but the output head: the vocabulary projection, or a top-level ``classifier``
            or ``score`` head), or None for the preset of the model's model_type.
        exclude_modules: same forms as target_modules (but not "all-linear"); matching layers
            are never adapted.
        layers_to_transform: only adapt layers inside these transformer-block indices (the
            number after ".layers.", ".layer.", ".h.", ".blocks." in the module name).
        modules_to_save: modules (same suffix matching) left trainable next to the adapter and
            saved with it, such as a freshly initialised classification head. One copy is shared
            by all adapters of a model (not one per adapter), and loading an adapter overwrites it.
    """

    variant: str = "goft"
    scale: bool = False
    angle_parameterisation: str = "tanh"
    orth_lambda: float = 0.01
    target_modules: Optional[Union[List[str], str]] = None
    exclude_modules: Optional[Union[List[str], str]] = None
    layers_to_transform: Optional[Union[int, List[int]]] = None
    modules_to_save: Optional[List[str]] = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"GOFTConfig.variant: expected one of {VARIANTS}, got {self.variant!r}")
        if not isinstance(self.scale, bool):
            raise ValueError(f"GOFTConfig.scale: expected a bool, got {self.scale!r}")
        if self.scale and self.variant == "qgoft":
            raise ValueError(
                "GOFTConfig.scale: the per-feature scale (GOFT*) exists for variant='goft' only; "
                "qgoft blocks already carry a free norm"
            )
        if self.angle_parameterisation not in ANGLE_PARAMETERISATIONS:
            raise ValueError(
                f"GOFTConfig.angle_parameterisation: expected one of {ANGLE_PARAMETERISATIONS}, "
                f"got {self.angle_parameterisation!r}"
            )
        if isinstance(self.orth_lambda, bool) or not isinstance(self.orth_lambda, numbers.Real) or not (
            0.0 <= _as_float(self.orth_lambda) < math.inf
        ):
            raise ValueError(f"GOFTConfig.orth_lambda: expected a finite number >= 0, got {self.orth_lambda!r}")
        self.orth_lambda = float(self.orth_lambda)
        self.target_modules = _check_module_selector("target_modules", self.target_modules, allow_all_linear=True)
        self.exclude_modules = _check_module_selector("exclude_modules", self.exclude_modules, allow_all_linear=False)
        self.layers_to_transform = _check_layers("layers_to_transform", self.layers_to_transform)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            if not _is_list_of_names(self.modules_to_save):
                raise ValueError(
                    f"GOFTConfig.modules_to_save: expected a list of non-empty module names, got {self.modules_to_save!r}"
                )
            self.modules_to_save = _as_list(self.modules_to_save)

    @property
    def is_quasi(self) -> bool:
        return self.variant == "qgoft"

    def replace(self, **overrides: Any) -> "GOFTConfig":
        """A validated copy with some fields changed; unknown field names raise ValueError."""
        _check_field_names("GOFTConfig.replace", overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return {f.name: _copy_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "GOFTConfig":
        """Inverse of to_dict; unknown keys raise ValueError (a config from a newer goft, or a typo)."""
        if not isinstance(data, dict):
            raise ValueError(f"GOFTConfig.from_dict: expected a dict, got {type(data).__name__}")
        _check_field_names("GOFTConfig.from_dict", data)
        return cls(**data)


def _check_field_names(where: str, names: Dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(GOFTConfig)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(known)}")


def _is_list_of_names(value: Any) -> bool:
    # Sets too: PEFT's configs hold their module names in sets.
    return isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value)


def _as_list(values: Any) -> list:
    """A list of the values; a set's sorted, so that configs and saved files do not depend on hashing."""
    return sorted(values) if isinstance(values, (set, frozenset)) else list(values)


def _check_module_selector(name: str, value: Any, allow_all_linear: bool) -> Optional[Union[List[str], str]]:
    if value is None:
        return None
    if isinstance(value, str):
        if value == "all-linear":
            if not allow_all_linear:
                raise ValueError(f"GOFTConfig.{name}: 'all-linear' is only meaningful for target_modules")
            return value
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"GOFTConfig.{name}: {value!r} is not a valid regular expression ({e})") from None
        return value
    if _is_list_of_names(value) and len(value) > 0:
        return _as_list(value)
    forms = "a non-empty list of module names, a regular expression string"
    forms += ', "all-linear"' if allow_all_linear else ""
    raise ValueError(f"GOFTConfig.{name}: expected {forms} or None, got {value!r}")


def _check_layers(name: str, value: Any) -> Optional[List[int]]:
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value]
    if (
        isinstance(value, (list, tuple, set, frozenset, range))
        and len(value) > 0
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        return [int(v) for v in _as_list(value)]
    raise ValueError(f"GOFTConfig.{name}: expected a layer index >= 0 or a non-empty list of them, got {value!r}")


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return math.inf


def _copy_json(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def check_adapter_name(adapter_name: str, where: str) -> None:
    """An adapter name is a key in module names and adapter files: a non-empty string without '.'."""
    if not isinstance(adapter_name, str):
        raise TypeError(f"{where}: expected adapter_name a string, got {type_and_value(adapter_name)}")
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"{where}: expected adapter_name a non-empty string without '.', got {adapter_name!r}")
    # Adapters are keys of torch's ParameterDict, which refuses its own attribute names.
    from torch import nn

    if hasattr(nn.ParameterDict(), adapter_name):
        raise ValueError(f"{where}: adapter_name {adapter_name!r} is the name of an attribute of torch's "
                         "nn.ParameterDict, which holds the adapters; pick another name")


def type_and_value(value) -> str:
    """An argument of the wrong type as errors show it: its type, and its value when short."""
    if value is None:
        return "None"
    shown = repr(value)
    return type(value).__name__ + ("" if len(shown) > 60 else f" {shown}")
