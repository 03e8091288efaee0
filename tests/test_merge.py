"""goft.merge / unmerge / merge_and_unload / unload on whole models (GOFT_SPEC.md section 5)."""

import warnings

import pytest
import torch

import goft
from goft import GivensLinear

from tiny_models import HEADS_TO_SAVE, MODELS, batch, build, max_rel, perturb_adapters, tiny_gpt2, transformers

VARIANTS = {"goft": {}, "goft*": {"scale": True}, "qgoft": {"variant": "qgoft"}}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def _injected(model_name, variant, std=0.3):
    if model_name == "gpt2":
        torch.manual_seed(0)
        model = tiny_gpt2().eval()
        goft.inject(model, target_modules=["c_attn", "c_proj", "c_fc"], **VARIANTS[variant])
        inputs = batch("llama")
    else:
        model = build(model_name)
        goft.inject(model, modules_to_save=HEADS_TO_SAVE[model_name], **VARIANTS[variant])
        inputs = batch(model_name)
    # qGOFT blocks and GOFT* scales move less than angles do in training; keep T well conditioned.
    perturb_adapters(model, std if variant == "goft" else 0.1)
    return model, inputs


def _base_weights(model):
    return {n: m.base_layer.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, GivensLinear)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_name", list(MODELS) + ["gpt2"])
def test_merge_keeps_outputs_and_unmerge_restores_weights(model_name, variant):
    model, inputs = _injected(model_name, variant)
    adapted = _logits(model, inputs)
    weights = _base_weights(model)
    goft.merge(model)
    assert all(m.merged_adapters == ["default"] for m in model.modules() if isinstance(m, GivensLinear))
    assert max_rel(_logits(model, inputs), adapted) < 1e-5
    assert any(max_rel(w, weights[n]) > 1e-3 for n, w in _base_weights(model).items()), "the merge changed the weights"
    goft.unmerge(model)
    for n, w in _base_weights(model).items():
        assert max_rel(w, weights[n]) < 1e-6, n
    assert max_rel(_logits(model, inputs), adapted) < 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_weight_side_trains_and_merges_the_same_model(variant, monkeypatch):
    # GivensLinear's path on CUDA (rotated_linear: the weight's rows rotated instead of x's), run
    # on the CPU for a whole model: the same loss, gradients and merge as rotating x.
    model, inputs = _injected("llama", variant)
    model.train()
    calls = []
    real = goft.layers.rotated_linear
    monkeypatch.setattr(goft.layers, "rotated_linear", lambda *args: calls.append(None) or real(*args))
    results = {}
    for weight_side in (False, True):
        monkeypatch.setattr(goft.layers, "WEIGHT_SIDE", weight_side)
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        results[weight_side] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(calls) == sum(isinstance(m, GivensLinear) for m in model.modules())  # every layer, second pass only
    (loss_x, grads_x), (loss_w, grads_w) = results[False], results[True]
    torch.testing.assert_close(loss_w, loss_x, rtol=1e-5, atol=1e-6)
    assert grads_w.keys() == grads_x.keys() and len(grads_x) > 0
    for name, grad in grads_x.items():
        assert max_rel(grads_w[name], grad) < 1e-4, name
    model.eval()
    adapted = _logits(model, inputs)
    goft.merge(model)
    assert max_rel(_logits(model, inputs), adapted) < 1e-5


def test_two_merged_adapters_unmerge_newest_first_to_the_base_weights():
    # Rotations of two adapters on one layer do not commute: W T1^T T2^T is undone by T2 first.
    model, inputs = _injected("llama", "goft")
    weights = _base_weights(model)
    goft.add_adapter(model, "second", target_modules=["q_proj", "v_proj"], variant="qgoft")
    perturb_adapters(model, 0.3, seed=1)
    goft.merge(model)
    with pytest.warns(UserWarning, match="stay merged"):
        goft.set_adapter(model, "second")
    goft.merge(model)
    stacked = [m for m in model.modules() if isinstance(m, GivensLinear) and len(m.merged_adapters) == 2]
    assert len(stacked) == 4 and all(m.merged_adapters == ["default", "second"] for m in stacked)
    goft.unmerge(model)
    for n, w in _base_weights(model).items():
        assert max_rel(w, weights[n]) < 1e-5, n


def test_merge_and_unload_returns_the_plain_model():
    model, inputs = _injected("llama", "qgoft")
    plain_keys = set(build("llama").state_dict())
    adapted = _logits(model, inputs)
    result = goft.merge_and_unload(model)
    assert result is model and type(result) is transformers.LlamaForCausalLM
    assert not any(isinstance(m, GivensLinear) for m in result.modules())
    assert set(result.state_dict()) == plain_keys
    assert not hasattr(result, "goft_configs") and not goft.adapter_configs(result)
    assert max_rel(_logits(result, inputs), adapted) < 1e-5


def test_merged_model_saves_and_reloads_with_transformers(tmp_path):
    model, inputs = _injected("bert", "goft")
    adapted = _logits(model, inputs)
    goft.merge_and_unload(model).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert max_rel(_logits(reloaded, inputs), adapted) < 1e-5


def test_unload_gives_back_the_base_model_even_when_merged():
    model = build("llama")
    inputs = batch("llama")
    base = _logits(model, inputs)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    goft.inject(model)
    perturb_adapters(model, 0.3)
    goft.merge(model)
    goft.unload(model)
    assert not any(isinstance(m, GivensLinear) for m in model.modules())
    assert max_rel(_logits(model, inputs), base) < 1e-5
    for n, p in model.named_parameters():
        assert max_rel(p, weights[n]) < 1e-6, n


def test_merge_twice_and_unmerge_unmerged_warn_without_changes():
    model, inputs = _injected("llama", "goft")
    with pytest.warns(UserWarning, match="no adapter is merged"):
        goft.unmerge(model)
    goft.merge(model)
    merged = _base_weights(model)
    with pytest.warns(UserWarning, match="already merged"):
        goft.merge(model)
    assert all(torch.equal(w, merged[n]) for n, w in _base_weights(model).items())
    goft.unmerge(model)
    with pytest.warns(UserWarning, match="no adapter is merged"):
        goft.unmerge(model)


def test_merged_state_guards():
    model, inputs = _injected("llama", "goft")
    goft.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with goft.disable_adapters(model):
            pass
    with pytest.raises(ValueError, match="is merged"):
        goft.delete_adapter(model, "default")
    goft.add_adapter(model, "other", target_modules=["q_proj"])
    with pytest.warns(UserWarning, match=r"adapters \['default'\] stay merged .* while it is applied on top"):
        goft.set_adapter(model, "other")
    # Both merged, one of them active: the other one still acts, and switching says so.
    perturb_adapters(model, 0.1)
    goft.merge(model)
    with pytest.warns(UserWarning, match=r"adapters \['other'\] stay merged into the base weights beside it"):
        goft.set_adapter(model, "default")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        goft.unmerge(model)
        goft.set_adapter(model, "default")  # nothing merged any more: no warning


def test_operations_on_a_plain_model_are_errors():
    model = build("llama")
    for fn in (goft.merge, goft.unmerge, goft.merge_and_unload, goft.unload):
        with pytest.raises(ValueError, match="no goft adapter"):
            fn(model)


def test_merge_into_bf16_weights():
    model = build("llama")
    inputs = batch("llama")
    goft.inject(model, scale=True)
    perturb_adapters(model, 0.1)
    reference = _logits(model, inputs)  # float32 model
    model.to(torch.bfloat16)
    adapted = _logits(model, inputs)
    goft.merge(model)
    assert all(m.base_layer.weight.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, GivensLinear))
    merged = _logits(model, inputs)
    # One bf16 rounding of the merged weights: as close to the float32 model as the unmerged bf16 model is.
    assert max_rel(merged, reference) < 3 * max(max_rel(adapted, reference), 1e-2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float64_weights_unmerge_to_float64_accuracy(variant):
    # The inverse is taken in the weight's dtype: a float32 inverse would leave errors near 1e-7.
    model = build("llama").double()
    inputs = batch("llama")
    goft.inject(model, **VARIANTS[variant])
    perturb_adapters(model, 0.3 if variant == "goft" else 0.1)
    adapted = _logits(model, inputs)
    weights = _base_weights(model)
    goft.merge(model)
    assert max_rel(_logits(model, inputs), adapted) < 1e-12
    goft.unmerge(model)
    for n, w in _base_weights(model).items():
        assert w.dtype == torch.float64 and max_rel(w, weights[n]) < 1e-12, n


def test_unload_after_deleting_every_adapter():
    model = build("llama")
    inputs = batch("llama")
    base = _logits(model, inputs)
    goft.inject(model)
    goft.delete_adapter(model, "default")
    assert goft.adapter_configs(model) == {}
    with pytest.raises(ValueError, match="no active adapter"):
        goft.merge(model)
    goft.unload(model)
    assert not any(isinstance(m, GivensLinear) for m in model.modules())
    assert torch.equal(_logits(model, inputs), base)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_generation_with_the_cache_matches_the_merged_model(model_name):
    # generate() runs the adapted layers on one new token at a time against the KV cache.
    model, inputs = _injected(model_name, "goft", std=1.0)
    prompt = inputs["input_ids"][:1, :4]
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        adapted = model.generate(prompt, **settings)
        uncached = model.generate(prompt, use_cache=False, **settings)
        with goft.disable_adapters(model):
            base = model.generate(prompt, **settings)
        goft.merge(model)
        merged = model.generate(prompt, **settings)
    assert adapted.shape == (1, 10)
    assert torch.equal(adapted, uncached) and torch.equal(adapted, merged)
    assert not torch.equal(adapted, base), "the adapter changed no generated token; the test would not see it skipped"
