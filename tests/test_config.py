"""GOFTConfig: defaults, validation naming the field, JSON round trip."""

import json

import pytest

from goft import GOFTConfig


def test_defaults_are_the_papers_strict_goft():
    c = GOFTConfig()
    assert (c.variant, c.scale, c.angle_parameterisation) == ("goft", False, "tanh")
    assert c.orth_lambda == 0.01, "the paper's qGOFT penalty for LLaMA-2, inside its GLUE range 0.001-0.05"
    assert c.target_modules is None and c.modules_to_save is None
    assert not c.is_quasi and GOFTConfig(variant="qgoft").is_quasi


@pytest.mark.parametrize(
    "field, value",
    [
        ("variant", "oft"),
        ("scale", 1),
        ("scale", True),  # with variant="qgoft" below
        ("angle_parameterisation", "sigmoid"),
        ("orth_lambda", -0.1),
        ("orth_lambda", float("nan")),
        ("orth_lambda", "0.1"),
        ("target_modules", []),
        ("target_modules", ["q_proj", ""]),
        ("target_modules", "("),
        ("target_modules", 3),
        ("exclude_modules", "all-linear"),
        ("layers_to_transform", -1),
        ("layers_to_transform", [0, "1"]),
        ("layers_to_transform", True),
        ("modules_to_save", [1]),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value):
    extra = {"variant": "qgoft"} if (field, value) == ("scale", True) else {}
    with pytest.raises(ValueError, match=f"GOFTConfig.{field}"):
        GOFTConfig(**{field: value}, **extra)


def test_normalises_single_values():
    c = GOFTConfig(layers_to_transform=1, modules_to_save="classifier", target_modules=("q_proj", "v_proj"))
    assert c.layers_to_transform == [1]
    assert c.modules_to_save == ["classifier"]
    assert c.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "config",
    [
        GOFTConfig(),
        GOFTConfig(variant="qgoft", orth_lambda=0.05, target_modules="all-linear", modules_to_save=["classifier"]),
        GOFTConfig(scale=True, angle_parameterisation="raw", target_modules=r".*\.(q|v)_proj", exclude_modules=["lm_head"]),
        GOFTConfig(target_modules=["query", "value"], layers_to_transform=[0, 2]),
    ],
)
def test_json_round_trip(config):
    assert GOFTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown field"):
        GOFTConfig.from_dict({"variant": "goft", "rank": 8})


def test_replace_validates():
    c = GOFTConfig().replace(variant="qgoft")
    assert c.is_quasi
    with pytest.raises(ValueError, match="unknown field"):
        GOFTConfig().replace(varient="qgoft")
    with pytest.raises(ValueError, match="GOFTConfig.scale"):
        c.replace(scale=True)
