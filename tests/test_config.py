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
        ("layers_to_transform", [1.0]),
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


def test_takes_the_containers_and_numbers_peft_users_pass():
    """Sets of names (PEFT's configs hold sets), sorted so the saved JSON does not depend on
    hashing; ranges and numpy integers as layer indices; numpy floats as lambda."""
    import numpy as np

    c = GOFTConfig(variant="qgoft", target_modules={"v_proj", "q_proj"}, exclude_modules=frozenset({"lm_head"}),
                   modules_to_save={"score", "classifier"}, layers_to_transform=range(1, 3), orth_lambda=np.float32(0.5))
    assert c.target_modules == ["q_proj", "v_proj"] and c.exclude_modules == ["lm_head"]
    assert c.modules_to_save == ["classifier", "score"]
    assert c.layers_to_transform == [1, 2] and all(type(i) is int for i in c.layers_to_transform)
    assert c.orth_lambda == 0.5 and type(c.orth_lambda) is float
    names = {f"layer_{c}" for c in "qwertyuiop"}  # ten names: 1 in 10! to come out sorted by chance
    c = GOFTConfig(target_modules=names, exclude_modules=frozenset(names), modules_to_save=set(names))
    assert c.target_modules == c.exclude_modules == c.modules_to_save == sorted(names)
    for layers in (np.int64(3), [np.int64(3)]):
        c = GOFTConfig(layers_to_transform=layers)
        assert c.layers_to_transform == [3] and type(c.layers_to_transform[0]) is int, layers  # JSON-serialisable
    assert GOFTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    for field, value in (("layers_to_transform", range(0)), ("orth_lambda", np.float64("inf")),
                         ("layers_to_transform", np.bool_(True)), ("target_modules", set())):
        with pytest.raises(ValueError, match=f"GOFTConfig.{field}"):
            GOFTConfig(**{field: value})


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
