"""goft.save_adapter / load_adapter: exact round trips, and every bad file or model refused before any change."""

import contextlib
import json
import os
import pathlib
import re
import tempfile
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

import goft
import goft.io
from goft import GivensLinear
from goft.inject import named_goft_layers
from goft.io import CONFIG_NAME, WEIGHTS_NAME

from tiny_models import (
    assert_unchanged, batch, build, interrupt_at_call, perturb_adapters, snapshot, tiny_llama, transformers,
)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


@pytest.fixture
def saved(tmp_path):
    """A trained-looking qGOFT adapter with a classification head, saved from a tiny DeBERTa-v2."""
    model = build("deberta-v2")
    goft.inject(model, variant="qgoft", modules_to_save=["pooler", "classifier"])
    perturb_adapters(model, 0.1)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    goft.save_adapter(model, str(tmp_path))
    return tmp_path, _logits(model, batch("deberta-v2"))


def test_round_trip_is_bitwise(saved):
    path, expected = saved
    assert sorted(os.listdir(path)) == [CONFIG_NAME, WEIGHTS_NAME], "no temporary files left behind"
    # The mode open() gives (0666 less the umask), as for any checkpoint, not the temporary files' 0600.
    mask = os.umask(0o022)
    os.umask(mask)
    assert all(os.stat(path / name).st_mode & 0o777 == 0o666 & ~mask for name in (CONFIG_NAME, WEIGHTS_NAME))
    model = build("deberta-v2")  # same seed: same frozen base
    model.classifier.reset_parameters()
    goft.load_adapter(model, str(path))
    assert goft.active_adapter(model) == "default"
    assert torch.equal(_logits(model, batch("deberta-v2")), expected)


def test_a_loaded_adapter_trains_unless_loaded_for_inference(saved):
    """Loaded as by inject, trainable; is_trainable=False (PEFT's inference loading) freezes the
    adapter and its modules_to_save, computes the same, and set_adapter unfreezes them."""
    path, expected = saved

    def trainable(model):
        return sorted(n for n, p in model.named_parameters() if p.requires_grad)

    injected = build("deberta-v2")
    goft.inject(injected, variant="qgoft", modules_to_save=["pooler", "classifier"])
    trained = build("deberta-v2")
    goft.load_adapter(trained, str(path))
    assert trainable(trained) == trainable(injected)
    assert any(".goft_" in n for n in trainable(trained)) and any(n.startswith("classifier.") for n in trainable(trained))

    frozen = build("deberta-v2")
    goft.load_adapter(frozen, str(path), is_trainable=False)
    assert trainable(frozen) == []
    assert torch.equal(_logits(frozen, batch("deberta-v2")), expected)
    goft.set_adapter(frozen, "default")
    assert trainable(frozen) == trainable(injected)


def test_saved_files_follow_the_umask(tmp_path):
    model = build("llama")
    goft.inject(model)
    previous = os.umask(0o077)
    try:
        goft.save_adapter(model, str(tmp_path))
    finally:
        os.umask(previous)
    assert all(os.stat(tmp_path / name).st_mode & 0o777 == 0o600 for name in (CONFIG_NAME, WEIGHTS_NAME))


def _compile_encoder(model):
    model.deberta.encoder = torch.compile(model.deberta.encoder, backend="eager")
    return model


@pytest.mark.parametrize("compiled", ["the model", "a submodule"])
def test_files_name_layers_as_the_plain_model_whatever_is_compiled(saved, tmp_path, compiled):
    # torch.compile puts "_orig_mod" into the names of what it wraps; an adapter file keyed by
    # those names would load into neither the plain model nor one compiled otherwise.
    path, expected = saved
    model = build("deberta-v2")
    model.classifier.reset_parameters()
    model = torch.compile(model, backend="eager") if compiled == "the model" else _compile_encoder(model)
    assert goft.load_adapter(model, str(path)) is model  # the compiled module, as passed
    assert any("_orig_mod." in name for name, _ in model.named_modules())
    assert torch.equal(_logits(model, batch("deberta-v2")), expected)
    goft.save_adapter(model, str(tmp_path / "resaved"))
    original = json.loads((path / CONFIG_NAME).read_text())
    resaved = json.loads((tmp_path / "resaved" / CONFIG_NAME).read_text())
    assert resaved["tensors"] == original["tensors"] and resaved["modules_to_save"] == original["modules_to_save"]
    assert resaved["model_class"] == original["model_class"] == "DebertaV2ForSequenceClassification"
    plain = build("deberta-v2")
    plain.classifier.reset_parameters()
    goft.load_adapter(plain, str(tmp_path / "resaved"))
    assert torch.equal(_logits(plain, batch("deberta-v2")), expected)


def test_a_saved_module_inside_a_compiled_submodule_is_named_as_in_the_plain_model(tmp_path):
    model = _compile_encoder(build("deberta-v2"))
    goft.inject(model, target_modules=["query_proj"], modules_to_save=["layer.1.output.LayerNorm"])
    with torch.no_grad():
        model.deberta.encoder.layer[1].output.LayerNorm.weight.add_(0.5)
    perturb_adapters(model, 0.1)
    expected = _logits(model, batch("deberta-v2"))
    goft.save_adapter(model, str(tmp_path))
    description = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert description["modules_to_save"] == ["deberta.encoder.layer.1.output.LayerNorm"]
    assert not any("_orig_mod" in key for key in description["tensors"])
    plain = build("deberta-v2")
    goft.load_adapter(plain, str(tmp_path))
    assert torch.equal(_logits(plain, batch("deberta-v2")), expected)


def test_model_level_calls_take_a_compiled_model():
    model = build("llama")
    compiled = torch.compile(model, backend="eager")
    assert goft.inject(compiled, target_modules=["q_proj"]) is compiled
    assert goft.adapter_configs(model) == goft.adapter_configs(compiled) and goft.active_adapter(compiled) == "default"
    names = [name for name, _ in named_goft_layers(compiled)]
    assert names and all(not name.startswith("_orig_mod") for name in names)
    assert goft.merge_and_unload(compiled) is compiled
    assert not any(isinstance(m, GivensLinear) for m in model.modules())


@pytest.mark.parametrize("variant", [{}, {"scale": True, "angle_parameterisation": "raw"}])
def test_round_trip_strict_under_another_name_next_to_an_existing_adapter(tmp_path, variant):
    model = build("llama")
    goft.inject(model, **variant)
    perturb_adapters(model, 0.3)
    expected = _logits(model, batch("llama"))
    goft.save_adapter(model, str(tmp_path))

    other = build("llama")
    goft.inject(other, target_modules=["q_proj"])
    goft.load_adapter(other, str(tmp_path), adapter_name="loaded")
    assert goft.active_adapter(other) == "loaded"
    assert goft.adapter_configs(other)["loaded"] == goft.adapter_configs(model)["default"]
    assert torch.equal(_logits(other, batch("llama")), expected)


@pytest.mark.parametrize("variant", ["goft", "qgoft"])
def test_a_model_cast_with_its_adapter_saves_a_float32_adapter_that_loads(tmp_path, variant):
    # model.to(dtype) after inject casts the adapter too; the file still holds float32 (exact
    # for bfloat16 values), which loads into a float32 model and into a bfloat16 one.
    model = build("llama")
    goft.inject(model, variant=variant, scale=variant == "goft")
    perturb_adapters(model, 0.3)
    model.to(torch.bfloat16)
    cast = {n: p for n, p in model.named_parameters() if ".goft_" in n}
    assert {p.dtype for p in cast.values()} == {torch.bfloat16}
    goft.save_adapter(model, str(tmp_path))
    assert {t.dtype for t in safetensors.torch.load_file(str(tmp_path / WEIGHTS_NAME)).values()} == {torch.float32}
    for dtype in (torch.float32, torch.bfloat16):
        other = goft.load_adapter(build("llama").to(dtype), str(tmp_path))
        for name, param in other.named_parameters():
            if ".goft_" in name:
                assert param.dtype == torch.float32 and torch.equal(param, cast[name].float()), name


def test_a_head_saved_in_another_dtype_loads_cast(tmp_path):
    # A head (modules_to_save) trained on a bfloat16 model loads into a float32 base, and back.
    model = build("llama").to(torch.bfloat16)
    goft.inject(model, modules_to_save=["lm_head"])
    goft.save_adapter(model, str(tmp_path))
    other = goft.load_adapter(build("llama"), str(tmp_path))
    assert other.lm_head.weight.dtype == torch.float32 and torch.equal(other.lm_head.weight, model.lm_head.weight.float())


class _CountingHead(nn.Module):
    """A head with an integer buffer beside its floating weights."""

    def __init__(self, counts_dtype):
        super().__init__()
        self.out = nn.Linear(8, 2)
        self.register_buffer("counts", torch.arange(2, dtype=counts_dtype))


def _with_counting_head(counts_dtype, adapted=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), _CountingHead(counts_dtype))
    if adapted:
        goft.inject(model, target_modules=["0"], modules_to_save=["1"])
    return model


def test_a_head_entry_is_cast_between_floating_dtypes_only(tmp_path):
    # An integer buffer read into a floating one (or back) would change what it means, silently.
    goft.save_adapter(_with_counting_head(torch.int64), str(tmp_path / "int"))
    goft.save_adapter(_with_counting_head(torch.float32), str(tmp_path / "float"))
    for saved, model_dtype in (("int", torch.float32), ("float", torch.int64)):
        model = _with_counting_head(model_dtype, adapted=False)
        before = snapshot(model)
        saved_dtype = torch.int64 if saved == "int" else torch.float32
        with pytest.raises(ValueError, match=re.escape(f"modules_to_save entry 1.counts is {model_dtype} (2,) in the "
                                                       f"model, {saved_dtype} (2,) in the adapter")):
            goft.load_adapter(model, str(tmp_path / saved))
        assert_unchanged(model, before)
    loaded = goft.load_adapter(_with_counting_head(torch.int64, adapted=False), str(tmp_path / "int"))
    assert loaded[1].counts.dtype == torch.int64  # the same dtype loads


def test_saved_files_hold_only_the_adapter(saved):
    path, _ = saved
    tensors = safetensors.torch.load_file(str(path / WEIGHTS_NAME))
    assert all(".goft_blocks" in k or k.split(".")[0] in ("pooler", "classifier") for k in tensors)
    assert not any("base_layer" in k or "embeddings" in k for k in tensors)
    description = json.loads((path / CONFIG_NAME).read_text())
    assert description["model_type"] == "deberta-v2" and description["goft_version"] == goft.__version__
    assert description["config"]["variant"] == "qgoft"
    assert len(description["layers"]) == 12
    layer = "deberta.encoder.layer.0.intermediate.dense"
    assert description["layers"][layer] == {"in_features": 32}
    assert description["tensors"][f"{layer}.goft_blocks"] == {"shape": [31, 2, 2], "dtype": "float32"}


def test_deberta_v3_base_adapter_is_a_few_hundred_kb(tmp_path):
    # Full-size model on the meta device; only the adapter parameters are materialised.
    with torch.device("meta"):
        model = transformers.DebertaV2Model(
            transformers.DebertaV2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        )
    goft.inject(model)
    for layer in model.modules():
        if isinstance(layer, GivensLinear):
            layer.goft_angles.to_empty(device="cpu")
    goft.save_adapter(model, str(tmp_path))
    size = os.path.getsize(tmp_path / WEIGHTS_NAME)
    assert 82_872 * 4 < size < 82_872 * 4 + 20_000


def _rewrite(path, mutate_tensors=None, mutate_description=None, fix_checksum=True):
    """Tampers with a saved adapter, re-signing it so that only the intended defect remains."""
    tensors = safetensors.torch.load_file(str(path / WEIGHTS_NAME))
    description = json.loads((path / CONFIG_NAME).read_text())
    if mutate_tensors:
        mutate_tensors(tensors, description)
    if mutate_description:
        mutate_description(description)
    data = safetensors.torch.save(tensors)
    (path / WEIGHTS_NAME).write_bytes(data)
    if fix_checksum:
        import hashlib

        description["weights_sha256"] = hashlib.sha256(data).hexdigest()
    (path / CONFIG_NAME).write_text(json.dumps(description))


def _first_key(tensors):
    return next(k for k in sorted(tensors) if ".goft_" in k)


def _as_float64(tensors, description):
    key = _first_key(tensors)
    tensors[key] = tensors[key].double()
    description["tensors"][key]["dtype"] = "float64"


def _wrong_shape(tensors, description):
    key = _first_key(tensors)
    tensors[key] = tensors[key][:-1]
    description["tensors"][key]["shape"][0] -= 1


def _extra_tensor(tensors, description):
    tensors["deberta.embeddings.word_embeddings.weight"] = torch.zeros(100, 32)
    description["tensors"]["deberta.embeddings.word_embeddings.weight"] = {"shape": [100, 32], "dtype": "float32"}


def _missing_tensor(tensors, description):
    key = _first_key(tensors)
    del tensors[key]
    del description["tensors"][key]


def _unknown_layer(description):
    description["layers"]["deberta.encoder.layer.5.output.dense"] = {"in_features": 64}


def _bad_config(description):
    description["config"]["variant"] = "lora"


def _newer_format(description):
    description["format_version"] = 99


@pytest.mark.parametrize(
    "tamper, message",
    [
        ({"mutate_tensors": _as_float64}, "expected torch.float32"),
        ({"mutate_tensors": _wrong_shape}, r"expected torch.float32 \(31, 2, 2\)"),
        ({"mutate_tensors": _extra_tensor}, "belongs to no adapter layer"),
        ({"mutate_tensors": _missing_tensor}, "is missing"),
        ({"mutate_description": _unknown_layer}, "layer 5.output.dense is missing|deberta.encoder.layer.5.output.dense is missing"),
        ({"mutate_description": _bad_config}, "invalid config.*GOFTConfig.variant"),
        ({"mutate_description": _newer_format}, "unsupported format_version"),
        ({"mutate_description": lambda d: d.update(id2label=["neg", "pos"])}, "field 'id2label' must be an object"),
        ({"mutate_tensors": lambda t, d: t.update({_first_key(t): t[_first_key(t)] + 1}), "fix_checksum": False}, "checksum"),
        # The two files disagree with each other, each well-formed on its own.
        ({"mutate_tensors": lambda t, d: t.pop(_first_key(t))},
         rf"tensors differ from {CONFIG_NAME}: missing \['deberta\..*goft_blocks'\], unexpected \[\]"),
        ({"mutate_description": lambda d: d["tensors"][_first_key(d["tensors"])].update(shape=[31, 4])},
         rf"tensor deberta\..*goft_blocks is float32 \[31, 2, 2\], {CONFIG_NAME} says float32 \[31, 4\]"),
        ({"mutate_description": lambda d: d["tensors"][_first_key(d["tensors"])].update(dtype="bfloat16")},
         rf"{CONFIG_NAME} says bfloat16 \[31, 2, 2\]"),
    ],
)
def test_tampered_files_are_refused_and_the_model_is_unchanged(saved, tamper, message):
    path, _ = saved
    _rewrite(path, **tamper)
    model = build("deberta-v2")
    goft.inject(model, adapter_name="existing", target_modules=["query_proj"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        goft.load_adapter(model, str(path))
    assert_unchanged(model, before)

def _assert_load_refused(path, message):
    """Loading the adapter at ``path`` into a fresh model raises ValueError(message), model unchanged."""
    model = build("deberta-v2")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        goft.load_adapter(model, str(path))
    assert_unchanged(model, before)



@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_tensors_file_is_refused(saved, keep):
    path, _ = saved
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: int(len(data) * keep)])
    _assert_load_refused(path, "corrupt, truncated")


def test_corrupt_or_missing_json_is_refused(saved):
    path, logits = saved
    text = (path / CONFIG_NAME).read_text()
    (path / CONFIG_NAME).write_text(text[: len(text) // 2])
    model = build("deberta-v2")
    # The tensors file describes itself (and its tensors' digest): it loads alone, with a warning.
    with pytest.warns(UserWarning, match=rf"not valid JSON .*{WEIGHTS_NAME} describes itself"):
        goft.load_adapter(model, str(path))
    torch.testing.assert_close(_logits(model, batch("deberta-v2")), logits, rtol=0, atol=0)
    # A tensors file without that description (written by a goft before it) cannot stand in.
    model = build("deberta-v2")
    before = snapshot(model)
    tensors = safetensors.torch.load_file(str(path / WEIGHTS_NAME))
    safetensors.torch.save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "goft-adapter"})
    with pytest.raises(ValueError, match="not valid JSON"):
        goft.load_adapter(model, str(path))
    (path / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        goft.load_adapter(model, str(path))
    assert_unchanged(model, before)


def test_tensors_damaged_after_saving_do_not_pass_as_their_own_description(saved):
    # The self-description stands in for the JSON only if the tensors match its digest: a byte
    # changed in the data (the header intact) is refused as before.
    path, _ = saved
    data = bytearray((path / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0x40
    (path / WEIGHTS_NAME).write_bytes(bytes(data))
    _assert_load_refused(path, "does not match the checksum")


def test_wrong_models_are_refused_and_unchanged(saved):
    path, _ = saved
    for model, message in [
        (build("bert"), "saved for model_type='deberta-v2', model is model_type='bert'"),
        (build("deberta-v2").deberta, "target layer deberta.encoder.layer.0"),  # the body, not the classifier
    ]:
        before = snapshot(model)
        with pytest.raises(ValueError, match=message):
            goft.load_adapter(model, str(path))
        assert_unchanged(model, before)

    tmp = path.parent / "llama"
    small = build("llama")
    goft.inject(small)
    goft.save_adapter(small, str(tmp))
    torch.manual_seed(0)
    wider = tiny_llama(hidden_size=48, head_dim=12).eval()
    before = snapshot(wider)
    with pytest.raises(ValueError, match="has input width 48, the adapter expects 32"):
        goft.load_adapter(wider, str(tmp))
    assert_unchanged(wider, before)


def test_loading_over_an_existing_adapter_name_is_refused(saved):
    path, _ = saved
    model = build("deberta-v2")
    goft.inject(model, target_modules=["query_proj"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter 'default'"):
        goft.load_adapter(model, str(path))
    assert_unchanged(model, before)


@contextlib.contextmanager
def _interrupted_after_the_block(params, modifier_rank=None):
    yield
    raise KeyboardInterrupt


@pytest.mark.parametrize("stage", ["adding the layers", "copying the adapter", "copying the saved modules"])
def test_a_load_stopped_halfway_leaves_the_model_as_it_was(saved, monkeypatch, stage):
    # Past validation only an interrupt or running out of memory stops a load; it must not leave
    # a half-loaded adapter (or half-overwritten modules_to_save) that a second load then trips on.
    path, expected = saved
    model = build("deberta-v2")
    goft.inject(model, target_modules=["query_proj"], adapter_name="first")
    model.classifier.reset_parameters()
    before = snapshot(model)
    if stage == "adding the layers":
        interrupt_at_call(monkeypatch, GivensLinear, "add_adapter", calls_before=3)
    elif stage == "copying the adapter":
        interrupt_at_call(monkeypatch, GivensLinear, "adapter_parameters", calls_before=2)
    else:  # the head is copied in full, then the load fails
        monkeypatch.setattr(goft.io, "_gathered_by_zero3", _interrupted_after_the_block)
    with pytest.raises(KeyboardInterrupt):
        goft.load_adapter(model, str(path))
    monkeypatch.undo()
    assert_unchanged(model, before)
    goft.load_adapter(model, str(path))
    assert torch.equal(_logits(model, batch("deberta-v2")), expected)


def test_interrupted_save_keeps_the_previous_files(saved, monkeypatch):
    path, _ = saved
    previous = {name: (path / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    model = build("llama")
    goft.inject(model)

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        goft.save_adapter(model, str(path))
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert all((path / name).read_bytes() == data for name, data in previous.items())
    goft.load_adapter(build("deberta-v2"), str(path))


def test_save_errors():
    with pytest.raises(ValueError, match="no goft adapter"):
        goft.save_adapter(build("llama"), "unused")
    model = build("llama")
    goft.inject(model)
    with pytest.raises(ValueError, match="no adapter 'other'"):
        goft.save_adapter(model, "unused", adapter_name="other")


def test_an_adapter_is_not_saved_into_a_model_folder(tmp_path):
    # goft's file names are PEFT's: beside config.json they would make from_pretrained take the
    # model folder for a PEFT adapter, and the model would no longer load.
    model = build("llama")
    model.save_pretrained(tmp_path / "model")
    goft.inject(model)
    with pytest.raises(ValueError, match=r"goft.save_adapter: path '.*model' holds a model \(config.json\); .* "
                                         r"e.g. '.*model/goft_adapter'"):
        goft.save_adapter(model, str(tmp_path / "model"))
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "generation_config.json", "model.safetensors"]
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # still loads
    goft.save_adapter(model, str(tmp_path / "model" / "goft_adapter"))


class _HeadWithExtraState(nn.Linear):
    def get_extra_state(self):
        return {"calibration": 1.5}

    def set_extra_state(self, state):
        pass


def test_modules_to_save_with_state_that_is_not_a_tensor_are_refused():
    model = build("llama")
    model.lm_head.__class__ = _HeadWithExtraState
    with pytest.raises(ValueError, match=r"goft.inject: modules_to_save=\['lm_head'\] hold state that is not a tensor "
                                         r"\(\['lm_head._extra_state'\]"):
        goft.inject(model, target_modules=["q_proj"], modules_to_save=["lm_head"])
    # Gained after inject: save_adapter says so instead of failing inside the file writer.
    model = build("llama")
    goft.inject(model, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model.lm_head.__class__ = _HeadWithExtraState
    with pytest.raises(ValueError, match=r"goft.save_adapter: modules_to_save entry lm_head holds state that is not a "
                                         r"tensor \(\['_extra_state'\]"):
        goft.save_adapter(model, "unused")
    assert not os.path.exists("unused")


def test_load_options_of_the_wrong_kind_are_refused_by_name(saved):
    path, _ = saved
    model = build("deberta-v2")
    before = snapshot(model)
    for options, error, message in [
        ({"subfolder": str(path)}, ValueError, r"subfolder must name a folder inside path .* \(relative, without '..'\)"),
        ({"subfolder": "../elsewhere"}, ValueError, r"subfolder must name a folder inside path"),
        ({"cache_dir": 5}, TypeError, r"expected cache_dir a path \(str or os.PathLike\) or None, got 5"),
        ({"token": 5}, TypeError, r"expected token a string, a bool or None, got 5"),
        ({"local_files_only": "no"}, TypeError, r"expected local_files_only True or False, got 'no'"),
        ({"is_trainable": 0}, TypeError, r"expected is_trainable True or False, got 0"),
    ]:
        with pytest.raises(error, match=r"goft.load_adapter: " + message):
            goft.load_adapter(model, str(path), **options)
        assert_unchanged(model, before)
    # A subfolder may be a path object, as cache_dir may.
    nested = path / "inner"
    nested.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        os.rename(path / name, nested / name)
    goft.load_adapter(model, str(path), subfolder=pathlib.Path("inner"))


def test_a_folder_that_cannot_be_created_is_named_with_the_call(tmp_path, monkeypatch):
    model = build("llama")
    goft.inject(model)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(goft.io.os, "makedirs", refuse)
    with pytest.raises(PermissionError, match=r"goft.save_adapter: cannot create folder '.*new': Permission denied"):
        goft.save_adapter(model, str(tmp_path / "new"))


DATA = os.path.join(os.path.dirname(__file__), "data")


def _vit_of_transformers_4_with(adapter: str, expected: str):
    """The tiny ViT saved by transformers 4.57 with one of the adapters saved there, checked to give
    the logits it gave there (tests/data/make_vit_transformers4.py)."""
    folder = os.path.join(DATA, "vit-transformers4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.ViTForImageClassification.from_pretrained(os.path.join(folder, "model")).eval()
    goft.load_adapter(model, os.path.join(folder, adapter))
    assert len(list(named_goft_layers(model))) == 12
    want = safetensors.torch.load_file(os.path.join(folder, expected))
    with torch.no_grad():
        logits = model(pixel_values=want["pixel_values"]).logits
    torch.testing.assert_close(logits, want["logits"], rtol=1e-5, atol=1e-6)
    return model


def test_an_adapter_saved_under_transformers_4_loads_under_this_version():
    # transformers 5 renamed ViT's modules and keeps its checkpoints in the old names; goft's
    # adapter files follow it (goft.checkpoint_names), so one saved under 4.57 loads here.
    folder = os.path.join(DATA, "vit-transformers4")
    model = _vit_of_transformers_4_with("adapter", "expected.safetensors")
    # Saved again here, the same names as there.
    with tempfile.TemporaryDirectory() as again:
        goft.save_adapter(model, again)
        # The same description, but the checksum (the tensors file now also describes itself) and
        # the fields added since (the names' spelling, the tensors' own digest).
        saved_here, saved_there = (json.loads(open(os.path.join(f, CONFIG_NAME)).read())
                                   for f in (again, os.path.join(folder, "adapter")))
        assert saved_here.pop("weights_sha256") != saved_there.pop("weights_sha256")
        assert saved_here.pop("names") == "checkpoint" and len(saved_here.pop("tensors_sha256")) == 64
        assert saved_here == saved_there


def _tiny_beit():
    torch.manual_seed(0)
    config = transformers.BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     image_size=16, patch_size=8, num_labels=2, use_relative_position_bias=True)
    return transformers.BeitForImageClassification(config).eval()


def test_modules_to_save_given_by_full_paths_of_transformers_4_load_under_this_version():
    # The config keeps the modules_to_save a user gave, here a full 4.57 path that names nothing
    # under transformers 5; loading selects the saved modules by the file's resolved names.
    model = _vit_of_transformers_4_with("adapter-full-paths", "expected-full-paths.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".goft_" not in n}
    layer_norm = "vit.encoder.layer.1.layernorm_before" if transformers.__version__.startswith("4.") \
        else "vit.layers.1.layernorm_before"
    assert trainable == {"classifier.weight", "classifier.bias", f"{layer_norm}.weight", f"{layer_norm}.bias"}


@pytest.mark.parametrize("name, saved_modules, saved_tensors", [
    ("vit", ["classifier", "layernorm_before"], 6),
    # BEiT's relative position bias has no weight to name its module by; its table is renamed.
    ("beit", ["classifier", "relative_position_bias"], 4),
    # transformers' legacy renamings (LayerNorm gamma/beta) are for reading old checkpoints: BERT's
    # are written as weight/bias, and so must the adapter's be.
    ("bert", ["classifier", "LayerNorm"], 12),
])
def test_adapter_files_name_modules_as_the_models_checkpoint_does(tmp_path, name, saved_modules, saved_tensors):
    make = {"vit": lambda: build("vit"), "beit": _tiny_beit, "bert": lambda: build("bert")}[name]
    model = make()
    model.save_pretrained(tmp_path / "model")
    with safetensors.safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as f:
        checkpoint_keys = set(f.keys())
    goft.inject(model, modules_to_save=saved_modules)
    perturb_adapters(model, 0.2)
    with torch.no_grad():  # the saved modules' values too, so that loading them shows
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01)
    goft.save_adapter(model, str(tmp_path / "adapter"))
    description = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert len(description["layers"]) == len(list(named_goft_layers(model))) > 0
    assert description["names"] == "checkpoint"
    assert {f"{layer}.weight" for layer in description["layers"]} <= checkpoint_keys
    saved_state = {k for k in description["tensors"] if ".goft_" not in k}
    assert len(saved_state) == saved_tensors and saved_state <= checkpoint_keys
    assert all(any(k.startswith(m + ".") for k in saved_state) for m in description["modules_to_save"])
    fresh = make()
    goft.load_adapter(fresh, str(tmp_path / "adapter"))
    inputs = {k: v for k, v in batch("bert" if name == "bert" else "vit").items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_a_loaded_adapter_merged_in_python_is_recorded_and_not_loaded_again(tmp_path):
    # The goft merge command records what it merged; goft.merge and merge_and_unload of an adapter
    # loaded from a file do so too (by its tensors' digest), so a merged model saved with
    # save_pretrained refuses it, and a copy of it saved again under another name.
    model = build("llama")
    goft.inject(model)
    perturb_adapters(model, 0.2)
    goft.save_adapter(model, str(tmp_path / "adapter"))
    digest = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["tensors_sha256"]

    loaded = goft.load_adapter(build("llama"), str(tmp_path / "adapter"))
    goft.merge(loaded)
    assert loaded.config.goft_merged_adapters == [digest]
    goft.unmerge(loaded)
    assert not hasattr(loaded.config, "goft_merged_adapters")
    copy = goft.load_adapter(build("llama"), str(tmp_path / "adapter"), "renamed")
    goft.save_adapter(copy, str(tmp_path / "copy"))  # another name: another file checksum, the same tensors
    merged = goft.merge_and_unload(loaded)
    assert merged.config.goft_merged_adapters == [digest]
    merged.save_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    for adapter in ("adapter", "copy"):
        with pytest.raises(ValueError, match=r"this adapter is merged into the model's weights already .*apply it twice"):
            goft.load_adapter(again, str(tmp_path / adapter))

    # The same file loaded under two names: merging the second is refused.
    twice = goft.load_adapter(build("llama"), str(tmp_path / "adapter"), "a1")
    goft.load_adapter(twice, str(tmp_path / "adapter"), "a2")
    goft.set_adapter(twice, "a1")
    goft.merge(twice)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        goft.set_adapter(twice, "a2")
    with pytest.raises(ValueError, match=r"goft.merge: adapter 'a2' was loaded from a file that is merged into the "
                                         r"weights already"):
        goft.merge(twice)
    with pytest.raises(ValueError, match=r"adapter 'a2' was loaded from a file that is merged into the weights already"):
        goft.merge_and_unload(twice)

    # The second copy trained since it was loaded holds other values: it merges, unrecorded.
    twice.get_submodule(next(n for n, _ in named_goft_layers(twice))).goft_angles["a2"].data.add_(0.01)
    goft.merge_and_unload(twice)

    # Trained on after loading, it no longer holds the file's values: nothing is recorded.
    trained = goft.load_adapter(build("llama"), str(tmp_path / "adapter"))
    opt = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.1)
    trained(**batch("llama")).loss.backward()
    opt.step()
    goft.merge(trained)
    assert not getattr(trained.config, "goft_merged_adapters", None)
    # Nor when the values change through .data, which in-place version counts miss (some fused
    # optimizers and EMA code write so); a cast alone changes nothing.
    written = goft.load_adapter(build("llama"), str(tmp_path / "adapter"))
    next(p for n, p in written.named_parameters() if ".goft_" in n).data.add_(0.01)
    goft.merge(written)
    assert not getattr(written.config, "goft_merged_adapters", None)
    cast = goft.load_adapter(build("llama"), str(tmp_path / "adapter"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cast of the adapters is warned about
        cast.to(torch.float64)
    goft.merge(cast)
    assert cast.config.goft_merged_adapters == [digest]
    # A trained adapter that came from no file is not recorded, and deleting one forgets its file.
    goft.merge(model)
    assert not getattr(model.config, "goft_merged_adapters", None)
    other = goft.load_adapter(build("llama"), str(tmp_path / "adapter"), "x")
    goft.delete_adapter(other, "x")
    goft.inject(other, adapter_name="x")
    goft.merge(other)
    assert not getattr(other.config, "goft_merged_adapters", None)


def test_unload_and_merge_and_unload_leave_no_stale_record(tmp_path):
    # unload restores the base weights: the record of the merge goes with it, and the file loads
    # again. merge_and_unload leaves a plain model: no record of loaded files is left on it, so an
    # adapter injected into it afterwards merges.
    model = goft.inject(build("llama"))
    perturb_adapters(model, 0.2)
    goft.save_adapter(model, str(tmp_path))
    loaded = goft.load_adapter(build("llama"), str(tmp_path))
    goft.merge(loaded)
    plain = goft.unload(loaded)
    assert not hasattr(plain.config, "goft_merged_adapters")
    goft.load_adapter(plain, str(tmp_path))
    merged = goft.merge_and_unload(plain)
    assert not hasattr(merged, goft.io.CHECKSUMS_ATTR) and merged.config.goft_merged_adapters
    goft.inject(merged)
    goft.merge(merged)


def test_a_head_trained_after_loading_is_not_recorded_as_the_files(tmp_path):
    # Training only a saved module (the head) after loading also leaves values that are not the
    # file's: a merge must not record the file as merged.
    model = goft.inject(build("bert"), modules_to_save=["classifier"])
    perturb_adapters(model, 0.2)
    goft.save_adapter(model, str(tmp_path))
    loaded = goft.load_adapter(build("bert"), str(tmp_path))
    with torch.no_grad():
        loaded.classifier.weight.add_(0.1)
    goft.merge(loaded)
    assert not getattr(loaded.config, "goft_merged_adapters", None)


@pytest.mark.parametrize("without_json", [False, True], ids=["with its JSON", "tensors file alone"])
def test_a_merge_recorded_by_an_earlier_goft_is_honoured(tmp_path, without_json):
    # Records written before tensors_sha256 existed hold the adapter file's checksum
    # (weights_sha256); such a merged model must refuse that file too, also when the file loads
    # by its own description.
    model = goft.inject(build("llama"))
    perturb_adapters(model, 0.2)
    goft.save_adapter(model, str(tmp_path / "adapter"))
    checksum = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["weights_sha256"]
    if without_json:
        (tmp_path / "adapter" / CONFIG_NAME).unlink()
    base = build("llama")
    base.config.goft_merged_adapters = [checksum]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tensors file alone loads with a warning
        with pytest.raises(ValueError, match=r"this adapter is merged into the model's weights already"):
            goft.load_adapter(base, str(tmp_path / "adapter"))


def test_a_tensors_file_whose_metadata_was_edited_is_refused(saved):
    # Its tensors are still the ones the JSON describes: only the metadata changed (e.g. the
    # angle parameterisation in its own description), which the checksum refuses as before.
    path, _ = saved
    tensors = safetensors.torch.load_file(str(path / WEIGHTS_NAME))
    with safetensors.safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        metadata = f.metadata()
    described = json.loads(metadata[goft.io.DESCRIPTION_KEY])
    described["config"]["variant"] = "goft"
    safetensors.torch.save_file(tensors, str(path / WEIGHTS_NAME),
                                metadata={**metadata, goft.io.DESCRIPTION_KEY: json.dumps(described)})
    _assert_load_refused(path, "does not match the checksum .* its metadata was changed after saving")


def test_a_first_save_stopped_before_its_json_still_loads(saved):
    # The folder's first save: the tensors file in place, the JSON not yet.
    path, logits = saved
    (path / CONFIG_NAME).unlink()
    model = build("deberta-v2")
    with pytest.warns(UserWarning, match=rf"missing .*{CONFIG_NAME}; {WEIGHTS_NAME} describes itself"):
        goft.load_adapter(model, str(path))
    torch.testing.assert_close(_logits(model, batch("deberta-v2")), logits, rtol=0, atol=0)


JSON_EDITS = {
    # Another angle parameterisation would load wrong values without a word.
    "config": lambda d: d["config"].update(angle_parameterisation="raw"),
    # Label names go into a merged model's config.
    "id2label": lambda d: d.update(id2label={"0": "bad", "1": "good"}),
    "model_type": lambda d: d.update(model_type="bert"),
    "modules_to_save": lambda d: d.update(modules_to_save=["classifier"]),
    "adapter_name": lambda d: d.update(adapter_name="other"),
    "note": lambda d: d.update(note="added after saving"),
}


@pytest.mark.parametrize("field", list(JSON_EDITS))
def test_a_json_edited_after_saving_is_refused(saved, field):
    # The checksum covers the tensors file; the JSON is checked against the description saved
    # inside it, every field of it.
    path, _ = saved
    description = json.loads((path / CONFIG_NAME).read_text())
    JSON_EDITS[field](description)
    (path / CONFIG_NAME).write_text(json.dumps(description, indent=2))
    _assert_load_refused(path, rf"{CONFIG_NAME} differs from the description saved inside {WEIGHTS_NAME} in "
                               rf"\['{field}'\]: it was edited after saving")


def test_a_tensors_file_alone_from_a_newer_format_is_refused(saved):
    # Without its JSON the tensors file's own description is checked as the JSON would be.
    path, _ = saved
    (path / CONFIG_NAME).unlink()
    tensors = safetensors.torch.load_file(str(path / WEIGHTS_NAME))
    with safetensors.safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        metadata = f.metadata()
    described = json.loads(metadata[goft.io.DESCRIPTION_KEY])
    described["format_version"] = 2
    safetensors.torch.save_file(tensors, str(path / WEIGHTS_NAME),
                                metadata={**metadata, goft.io.DESCRIPTION_KEY: json.dumps(described)})
    _assert_load_refused(path, "unsupported format_version 2")
