"""goft.inject on tiny Hugging Face models: targets, freezing, identity, training, adapters, errors, integrations."""

import copy
import dataclasses
import functools
import re
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
from torch import nn

import goft
from goft import GivensLinear
from goft.inject import goft_layers

from tiny_models import (
    HEADS_TO_SAVE, MODELS, TRANSFORMERS_4, assert_unchanged, batch, build, interrupt_at_call, perturb_adapters,
    snapshot, tiny_bert, tiny_gpt2, tiny_llama, transformers,
)

VARIANTS = {"goft": {}, "goft*": {"scale": True}, "qgoft": {"variant": "qgoft"}}


def _output(model, inputs):
    out = model(**{k: v for k, v in inputs.items() if k != "labels"})
    return out.logits


def _adapted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, GivensLinear))


def _train(model, inputs, steps=5, lr=1e-2, penalty=False):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        losses.append(loss.item())
        if penalty:
            loss = loss + goft.orthogonality_penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return losses


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_identity_at_init_then_training_lowers_loss(model_name, variant):
    model = build(model_name)
    inputs = batch(model_name)
    before = _output(model, inputs)
    goft.inject(model, modules_to_save=HEADS_TO_SAVE[model_name], **VARIANTS[variant])
    torch.testing.assert_close(_output(model, inputs), before, rtol=1e-6, atol=1e-6)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(model, inputs, penalty=variant == "qgoft")
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen), "frozen weights moved"


def test_only_the_adapter_and_modules_to_save_train():
    model = build("deberta-v2")
    goft.inject(model, modules_to_save=["pooler", "classifier"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".goft_angles.default" in n or n.split(".")[0] in ("pooler", "classifier") for n in trainable)
    assert {"classifier.weight", "classifier.bias", "pooler.dense.weight"} <= set(trainable)
    n_adapter = sum(m.in_features - 1 for m in model.modules() if isinstance(m, GivensLinear))
    n_head = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("pooler", "classifier"))
    assert goft.count_parameters(model) == (n_adapter + n_head, sum(p.numel() for p in model.parameters()))


def test_print_trainable_parameters(capsys):
    model = build("llama")
    goft.inject(model, target_modules=["q_proj"])
    goft.print_trainable_parameters(model)
    trainable, total = goft.count_parameters(model)
    assert trainable == 2 * 31
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


def test_target_forms_exclude_and_layers_to_transform():
    model = build("llama")
    goft.inject(model, target_modules="all-linear")
    assert len(_adapted(model)) == 14 and "lm_head" not in _adapted(model)

    model = build("llama")
    goft.inject(model, target_modules=r".*\.(q|v)_proj")
    assert [n.rsplit(".", 1)[1] for n in _adapted(model)] == ["q_proj", "v_proj"] * 2

    model = build("llama")
    goft.inject(model, target_modules="all-linear", exclude_modules=["mlp.down_proj", "o_proj"], layers_to_transform=1)
    assert _adapted(model) == [
        f"model.layers.1.{s}" for s in ["mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
    ]

    model = build("deberta-v2")
    goft.inject(model, target_modules="all-linear", modules_to_save=["pooler", "classifier"])
    assert len(_adapted(model)) == 12, "all-linear leaves modules_to_save alone"

    # A regex must match the whole name: "q_proj" alone selects nothing, and ".*q" no "q_proj".
    model = build("llama")
    with pytest.raises(ValueError, match=r"matched no layer .* A string is a regular expression matched against "
                                         r"the whole module name; .* pass a list: target_modules=\['q_proj'\]"):
        goft.inject(model, target_modules=r"q_proj")
    with pytest.raises(ValueError, match=r"matched no layer") as error:
        goft.inject(model, target_modules=r"nothing_here")
    assert "pass a list" not in str(error.value), "the hint only where a list would have matched"
    for filters in ({"layers_to_transform": [5]}, {"exclude_modules": ["q_proj"]}):  # a list would match nothing either
        with pytest.raises(ValueError, match=r"matched no layer") as error:
            goft.inject(model, target_modules=r"q_proj", **filters)
        assert "pass a list" not in str(error.value), filters
    goft.inject(model, target_modules=r".*layers\.0\.self_attn\.q_proj")
    assert _adapted(model) == ["model.layers.0.self_attn.q_proj"]

    # GPT-2 names its blocks "h": transformer.h.1.attn.c_attn is in block 1.
    torch.manual_seed(0)
    model = tiny_gpt2()
    goft.inject(model, target_modules=["c_attn", "c_fc"], layers_to_transform=[1])
    assert _adapted(model) == ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]


_HEADED_MODELS = {
    "llama-classifier": lambda: transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, num_labels=3)),
    "distilbert": lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        dim=32, hidden_dim=64, n_layers=1, n_heads=4, vocab_size=100)),
    "bart": lambda: transformers.BartForSequenceClassification(transformers.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64)),
}


@pytest.mark.parametrize("model_name, heads", [("bert", ["classifier"]), ("deberta-v2", ["pooler", "classifier"]),
                                               ("vit", ["classifier"]), ("llama-classifier", ["score"]),
                                               ("distilbert", ["pre_classifier", "classifier"]),
                                               ("bart", ["classification_head"])])
def test_all_linear_leaves_the_classification_head_and_a_frozen_head_is_warned_about(model_name, heads):
    # A fresh head wrapped and frozen, or left frozen, cannot learn: the run trains in vain.
    # DeBERTa's classification classes add a pooler beside the classifier, DistilBERT's a
    # pre_classifier, fresh as well.
    def make():
        torch.manual_seed(0)
        return _HEADED_MODELS[model_name]() if model_name in _HEADED_MODELS else build(model_name)
    model = make()
    listed = re.escape(repr(heads))
    with pytest.warns(UserWarning, match=rf"the classification head {listed} stays frozen; .*modules_to_save={listed}"):
        goft.inject(model, target_modules="all-linear")
    for head in heads:
        assert not any(n == head or n.startswith(head + ".") for n in _adapted(model))
        assert not any(p.requires_grad for p in model.get_submodule(head).parameters())
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        goft.inject(model, target_modules="all-linear", modules_to_save=heads)
    assert all(p.requires_grad for head in heads for p in model.get_submodule(head).parameters())


def test_a_bare_encoders_pooler_is_no_head():
    # BertModel's pooler is pretrained, part of the encoder: not warned about, and all-linear
    # adapts it as it does inside BertForSequenceClassification.
    torch.manual_seed(0)
    bare = tiny_bert("BertModel")
    assert bare.base_model is bare and isinstance(bare.pooler.dense, torch.nn.Linear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        goft.inject(bare, target_modules="all-linear")
    assert "pooler.dense" in _adapted(bare)
    headed = tiny_bert()
    goft.inject(headed, target_modules="all-linear", modules_to_save=["classifier"])
    assert "bert.pooler.dense" in _adapted(headed)
    assert sorted(n.removeprefix("bert.") for n in _adapted(headed)) == sorted(_adapted(bare))


def test_conv1d_model():
    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    inputs = batch("llama")
    before = _output(model, inputs)
    goft.inject(model, target_modules=["c_attn", "c_proj", "c_fc"], variant="qgoft")
    assert len(_adapted(model)) == 8
    torch.testing.assert_close(_output(model, inputs), before, rtol=1e-6, atol=1e-6)
    losses = _train(model, inputs)
    assert losses[-1] < losses[0]


def test_unknown_architecture_lists_linear_layers():
    torch.manual_seed(0)
    # GPT-NeoX: no preset.
    config = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        vocab_size=100)
    model = transformers.GPTNeoXForCausalLM(config)
    with pytest.raises(ValueError, match=r"model_type='gpt_neox'.*gpt_neox\.layers\.0\.attention\.query_key_value"):
        goft.inject(model)
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"model_type=None.*Linear layers found: \[0, 2\]"):
        goft.inject(plain)
    assert not any(isinstance(m, GivensLinear) for m in plain.modules())
    goft.inject(plain, target_modules=["0"])
    assert isinstance(plain[0], GivensLinear)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_modules": ["nothing_like_this"]}, "matched no layer"),
        ({"target_modules": ["embed_tokens"]}, r"not linear layers: \[model\.embed_tokens \(Embedding\)\]"),
        ({"target_modules": ["mlp"]}, "not linear layers"),
        ({"target_modules": ["q_proj"], "layers_to_transform": [7]}, "matched no layer"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["nope"]}, r"modules_to_save=\['nope'\] matched no module"),
        ({"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"]}, r"both targeted and in \(or inside\) modules_to_save"),
        ({"adapter_name": "a.b"}, "adapter_name"),
        ({"varient": "qgoft"}, "unknown field"),
    ],
)
def test_bad_requests_are_clear_errors_and_change_nothing(kwargs, message):
    model = build("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        goft.inject(model, **kwargs)
    assert not _adapted(model) and not goft.adapter_configs(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_a_second_adapter_cannot_save_or_adapt_across_the_firsts_layers():
    # Its file would hold the other adapter's wrapped layers and would not load (a saved module
    # holding adapted layers), or its layers would sit inside a module another adapter saves.
    model = build("llama")
    goft.inject(model, adapter_name="a", target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"modules_to_save=\['self_attn'\] holds layers that adapters \['a'\] adapt: "
                                         r"\[model.layers.0.self_attn.q_proj"):
        goft.add_adapter(model, "b", target_modules=["up_proj"], modules_to_save=["self_attn"])
    saver = build("llama")
    goft.inject(saver, adapter_name="a", target_modules=["q_proj"], modules_to_save=["mlp"])
    with pytest.raises(ValueError, match=r"modules \[.*model.layers.0.mlp.up_proj.*\] are targeted but inside the "
                                         r"modules_to_save of adapters \['a'\]"):
        goft.add_adapter(saver, "b", target_modules=["up_proj"])
    assert list(goft.adapter_configs(model)) == ["a"] and list(goft.adapter_configs(saver)) == ["a"]
    goft.add_adapter(saver, "b", target_modules=["k_proj"], modules_to_save=["lm_head"])  # another saved module: fine


def test_only_the_active_adapters_modules_to_save_train():
    # Each saved module is trained in place, one copy: a head that trained while another adapter
    # was active would no longer be the head its own adapter was trained with.
    model = build("bert")
    inputs = batch("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a head another adapter saves is not "left frozen"
        goft.inject(model, adapter_name="a", target_modules=["query"], modules_to_save=["classifier"])
        goft.add_adapter(model, "b", target_modules=["value"], modules_to_save=["pooler"])

    def trainable():
        return {n.split(".goft_")[0].split(".")[-1] if ".goft_" in n else n.split(".")[0]
                for n, p in model.named_parameters() if p.requires_grad}

    assert goft.active_adapter(model) == "a" and trainable() == {"query", "classifier"}
    pooler = {k: v.clone() for k, v in model.bert.pooler.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**inputs).loss.backward()
    opt.step()
    assert all(torch.equal(v, pooler[k]) for k, v in model.bert.pooler.state_dict().items())
    goft.set_adapter(model, "b")
    assert trainable() == {"value", "bert"}  # bert.pooler
    assert all(p.requires_grad for p in model.bert.pooler.parameters())
    assert not any(p.requires_grad for p in model.classifier.parameters())
    goft.set_adapter(model, None)
    assert trainable() == set()
    goft.inject(model, adapter_name="c", target_modules=["key"])
    assert trainable() == {"key"}


@pytest.mark.parametrize("first_saves, second_saves", [(["classifier"], ["classifier"]),
                                                        (["pooler"], ["pooler.dense"]),
                                                        (["pooler.dense"], ["pooler"])])
def test_two_adapters_cannot_save_the_same_module(tmp_path, first_saves, second_saves):
    # One copy of a head per model: the second task's head would replace the first's (logits of
    # the first task off, and its next save_adapter would write the second's head into its file).
    model = build("deberta-v2")
    goft.inject(model, adapter_name="sentiment", modules_to_save=first_saves + ["deberta.encoder.rel_embeddings"])
    with pytest.raises(ValueError, match=r"modules_to_save \[.*\] are also saved by adapter 'sentiment'.* "
                                         r"goft.delete_adapter\(model, 'sentiment'\)"):
        goft.add_adapter(model, "topic", target_modules=["query_proj"], modules_to_save=second_saves)
    assert list(goft.adapter_configs(model)) == ["sentiment"]

    topic = build("deberta-v2")
    goft.inject(topic, adapter_name="topic", target_modules=["query_proj"], modules_to_save=second_saves)
    goft.save_adapter(topic, str(tmp_path / "topic"))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"goft.load_adapter\(.*\): modules_to_save \[.*\] are also saved "
                                         r"by adapter 'sentiment'"):
        goft.load_adapter(model, str(tmp_path / "topic"), "topic")
    assert_unchanged(model, before)
    goft.delete_adapter(model, "sentiment")
    # The deleted adapter's saved modules (the head) freeze again with it, as the base is.
    assert not any(p.requires_grad for p in model.parameters())
    goft.load_adapter(model, str(tmp_path / "topic"), "topic")


def test_loading_an_adapter_checks_the_other_adapters_as_inject_does(tmp_path):
    # The files are fine on their own; the model they are loaded into already has an adapter
    # whose layers sit inside the saved module, or which saves a module around the targets.
    saving_attention = build("llama")
    goft.inject(saving_attention, target_modules=["up_proj"], modules_to_save=["self_attn"])
    goft.save_adapter(saving_attention, str(tmp_path / "saves_self_attn"))
    plain_mlp = build("llama")
    goft.inject(plain_mlp, target_modules=["up_proj"])
    goft.save_adapter(plain_mlp, str(tmp_path / "up_proj"))

    model = build("llama")
    goft.inject(model, adapter_name="a", target_modules=["q_proj"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"goft.load_adapter\(.*\): modules_to_save=\['self_attn'\] holds layers that "
                                         r"adapters \['a'\] adapt"):
        goft.load_adapter(model, str(tmp_path / "saves_self_attn"), "b")
    saver = build("llama")
    goft.inject(saver, adapter_name="a", target_modules=["q_proj"], modules_to_save=["mlp"])
    with pytest.raises(ValueError, match=r"goft.load_adapter\(.*\): modules \[.*model.layers.0.mlp.up_proj.*\] are "
                                         r"targeted but inside the modules_to_save of adapters \['a'\]"):
        goft.load_adapter(saver, str(tmp_path / "up_proj"), "b")
    for refused in (model, saver):
        assert list(goft.adapter_configs(refused)) == ["a"]
        assert all(layer.adapter_names == ["a"] for layer in goft_layers(refused))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    goft.load_adapter(build("llama"), str(tmp_path / "saves_self_attn"))  # fine in a model without adapters


def test_injecting_the_same_adapter_twice_is_an_error():
    model = build("llama")
    goft.inject(model)
    with pytest.raises(ValueError, match="adapter 'default' is already injected"):
        goft.inject(model)
    with pytest.raises(ValueError, match="already injected"):
        goft.inject(model, target_modules=["lm_head"])


@pytest.mark.parametrize("first_adapter", [False, True], ids=["plain model", "second adapter"])
def test_an_inject_stopped_halfway_leaves_the_model_as_it_was(monkeypatch, first_adapter):
    # Targets are validated before any layer is touched, so what stops an inject midway is an
    # interrupt or running out of memory; a half-injected model would refuse a second attempt.
    model = build("llama")
    if first_adapter:  # the interrupted inject reuses its wrappers (q, v) and wraps the others
        goft.inject(model, target_modules=["q_proj", "v_proj"], adapter_name="first")
    before = snapshot(model)
    interrupt_at_call(monkeypatch, GivensLinear, "add_adapter", calls_before=3)
    with pytest.raises(KeyboardInterrupt):
        goft.inject(model, target_modules="all-linear", adapter_name="second")
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert hasattr(model, "goft_configs") == first_adapter
    goft.inject(model, target_modules="all-linear", adapter_name="second")
    assert goft.active_adapter(model) == "second" and len(goft_layers(model)) == 7 * 2


def test_multiple_adapters():
    model = build("llama")
    inputs = batch("llama")
    base = _output(model, inputs)
    goft.inject(model)
    perturb_adapters(model, 0.3, seed=1)
    out_default = _output(model, inputs)
    goft.inject(model, adapter_name="second", variant="qgoft", target_modules=["q_proj", "lm_head"])
    assert goft.active_adapter(model) == "second"
    perturb_adapters(model, 0.3, seed=2)  # moves "default" too: it is frozen, not read-only
    out_second = _output(model, inputs)
    second_only = {n for n, p in model.named_parameters() if p.requires_grad}
    assert second_only and all(n.endswith(".goft_blocks.second") for n in second_only)

    goft.set_adapter(model, "default")
    out_default = _output(model, inputs)
    assert not torch.allclose(out_default, out_second)
    assert all(n.endswith(".goft_angles.default") for n, p in model.named_parameters() if p.requires_grad)
    # lm_head carries only "second": with "default" active it is the plain layer.
    assert model.lm_head.active_adapter is None
    with goft.disable_adapters(model):
        torch.testing.assert_close(_output(model, inputs), base, rtol=0, atol=0)
        with goft.disable_adapters(model):  # nested: leaving the inner block keeps the outer one's state
            pass
        torch.testing.assert_close(_output(model, inputs), base, rtol=0, atol=0)
    torch.testing.assert_close(_output(model, inputs), out_default, rtol=0, atol=0)
    # A layer disabled by hand before the block stays disabled after it, even if the block raises.
    model.model.layers[0].self_attn.q_proj.disabled = True
    with pytest.raises(KeyError), goft.disable_adapters(model):
        raise KeyError("inside")
    assert [n for n, m in model.named_modules() if isinstance(m, GivensLinear) and m.disabled] == [
        "model.layers.0.self_attn.q_proj"]
    model.model.layers[0].self_attn.q_proj.disabled = False

    goft.add_adapter(model, "third", target_modules=["v_proj"])
    assert goft.active_adapter(model) == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".third"))

    goft.set_adapter(model, "second")
    torch.testing.assert_close(_output(model, inputs), out_second, rtol=0, atol=0)
    goft.delete_adapter(model, "second")
    assert goft.active_adapter(model) is None and "second" not in goft.adapter_configs(model)
    assert not any(".second" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_output(model, inputs), base, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no adapter 'second'"):
        goft.set_adapter(model, "second")
    with pytest.raises(ValueError, match="no adapter 'second'"):
        goft.delete_adapter(model, "second")


def test_orthogonality_penalty_over_the_model():
    model = build("llama")
    assert goft.orthogonality_penalty(model).item() == 0.0
    goft.inject(model, target_modules=["q_proj"])
    goft.inject(model, adapter_name="quasi", variant="qgoft", orth_lambda=0.1, target_modules=["q_proj", "o_proj"])
    assert goft.orthogonality_penalty(model).item() == 0.0, "identity blocks"
    perturb_adapters(model, 0.2)
    penalty = goft.orthogonality_penalty(model)
    manual = sum(m.orthogonality_penalty() for m in model.modules() if isinstance(m, GivensLinear))
    assert penalty.item() > 0 and penalty.item() == pytest.approx(manual.item(), rel=1e-6)
    penalty.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("goft_blocks.quasi"))
    goft.set_adapter(model, "default")
    assert goft.orthogonality_penalty(model).item() == 0.0, "strict adapters have no penalty"


def test_orthogonality_penalty_mixed_lambdas_and_cost_independent_of_depth():
    # One term per lambda, whatever the number of layers: the autograd graph of the penalty has
    # as many nodes for 6 decoder layers as for 2 (besides each parameter's AccumulateGrad).
    def penalty_graph(num_layers):
        torch.manual_seed(0)
        model = tiny_llama(num_hidden_layers=num_layers)
        goft.inject(model, variant="qgoft", orth_lambda=0.1)
        layers = [m for m in model.modules() if isinstance(m, GivensLinear)]
        for layer in layers[::3]:  # some layers with another lambda
            layer.adapter_configs["default"] = dataclasses.replace(layer.adapter_configs["default"], orth_lambda=0.7)
        perturb_adapters(model, 0.2)
        penalty = goft.orthogonality_penalty(model)
        manual = sum(m.orthogonality_penalty() for m in layers)
        assert penalty.item() > 0 and penalty.item() == pytest.approx(manual.item(), rel=1e-5)
        nodes, stack, seen = 0, [penalty.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            nodes += type(node).__name__ != "AccumulateGrad"
            stack.extend(child for child, _ in node.next_functions)
        penalty.backward()
        grads = [m.goft_blocks["default"].grad for m in layers]
        manual_grads = torch.autograd.grad(sum(m.orthogonality_penalty() for m in layers),
                                           [m.goft_blocks["default"] for m in layers])
        for g, w in zip(grads, manual_grads):
            torch.testing.assert_close(g, w)
        return nodes

    assert penalty_graph(2) == penalty_graph(6)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build("llama")
    goft.inject(model, variant="qgoft")
    perturb_adapters(model, 0.2)
    inputs = batch("llama")
    model.train()
    model(**inputs).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model(**inputs).loss.backward()
    for n, g in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-7)


def _enable_reentrant_checkpointing(model, name="gradient_checkpointing"):
    """``name``: transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable."""
    enable = getattr(model, f"{name}_enable", None)
    if enable is None:
        pytest.skip(f"this transformers has no {name}_enable")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name, under transformers 5
        enable(**{f"{name}_kwargs": {"use_reentrant": True}})


@pytest.mark.parametrize("name", ["gradient_checkpointing", "activation_checkpointing"])
@pytest.mark.parametrize("order", ["checkpointing first", "checkpointing after"])
@pytest.mark.parametrize("add", ["inject", "load_adapter"])
def test_reentrant_checkpointing_of_an_image_model_reaches_the_adapters(tmp_path, add, order, name):
    # transformers makes the embeddings' output require grad for input_ids models only; without
    # it, reentrant checkpointing of ViT's frozen blocks would give the adapters no gradient.
    inputs = batch("vit")
    plain = build("vit")
    goft.inject(plain, modules_to_save=["classifier"])
    perturb_adapters(plain, 0.2)
    goft.save_adapter(plain, str(tmp_path))
    plain.train()
    plain(**inputs).loss.backward()
    expected = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    model = build("vit")
    if order == "checkpointing first":
        _enable_reentrant_checkpointing(model, name)
    if add == "inject":
        goft.inject(model, modules_to_save=["classifier"])
        perturb_adapters(model, 0.2)
    else:
        goft.load_adapter(model, str(tmp_path))
    if order == "checkpointing after":  # as Trainer(gradient_checkpointing=True) does
        _enable_reentrant_checkpointing(model, name)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a checkpointed block's inputs need no grad
        model(**inputs).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == expected.keys() and any(".goft_" in n for n in grads)
    for n, g in expected.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7)


def test_reentrant_checkpointing_reaches_the_adapters_of_embeddings_that_return_a_tuple():
    """BEiT's patch embeddings return (embeddings, (height, width)) under transformers 4.x."""
    def make():
        torch.manual_seed(0)
        config = transformers.BeitConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8, num_labels=3,
                                         drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = transformers.BeitForImageClassification(config)
        goft.inject(model, modules_to_save=["classifier"])
        perturb_adapters(model, 0.2)
        return model.train()

    torch.manual_seed(1)
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 2])}
    plain, checkpointed = make(), make()
    plain(**inputs).loss.backward()
    _enable_reentrant_checkpointing(checkpointed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        checkpointed(**inputs).loss.backward()
    expected = {n: p.grad for n, p in plain.named_parameters() if ".goft_" in n}
    assert len(expected) == 12
    for n, p in checkpointed.named_parameters():
        if n in expected:
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-7)


def test_reentrant_checkpointing_reaches_an_encoder_decoders_encoder_adapters():
    """Whisper's encoder has input embeddings of its own (conv1), which the top-level model's
    get_input_embeddings (the decoder's tokens) does not return."""
    def make():
        torch.manual_seed(0)
        config = transformers.WhisperConfig(
            vocab_size=60, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
            max_source_positions=16, max_target_positions=16, decoder_start_token_id=1, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
        model = transformers.WhisperForConditionalGeneration(config)
        goft.inject(model, target_modules=["q_proj", "v_proj"])
        perturb_adapters(model, 0.2)
        return model.train()

    torch.manual_seed(1)
    inputs = {"input_features": torch.randn(2, 8, 32), "labels": torch.randint(3, 60, (2, 5))}
    plain, checkpointed = make(), make()
    plain(**inputs).loss.backward()
    _enable_reentrant_checkpointing(checkpointed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch warns when a checkpointed block's inputs need no grad
        checkpointed(**inputs).loss.backward()
    expected = {n: p.grad for n, p in plain.named_parameters() if ".goft_" in n}
    assert any(".encoder." in n for n in expected)
    for n, p in checkpointed.named_parameters():
        if n in expected:
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-7)
    hooked = [n for n, m in checkpointed.named_modules() if _goft_hooks(m)]
    assert len(hooked) == 2, hooked  # the encoder's conv1 and the decoder's token embeddings
    goft.unload(checkpointed)
    assert not [n for n, m in checkpointed.named_modules() if _goft_hooks(m)], "goft.unload leaves hooks behind"


def _embeddings_output_requires_grad(model, inputs):
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    try:
        model(**inputs).loss.backward()
    finally:
        handle.remove()
    return seen == [True]


def test_checkpointing_reaches_the_adapters_without_transformers_own_hook():
    """transformers 4.x checkpoints reentrantly by default and makes the embeddings' output require
    grad only for its own PEFT integration: LLaMA without transformers' hook stands for it. The
    hook goft adds acts only while checkpointing is on, survives deepcopy (acting on the copy's
    switches) and goes with goft.unload."""
    inputs = batch("llama")
    model = build("llama")
    goft.inject(model)
    perturb_adapters(model, 0.2)
    model.train()
    twin = copy.deepcopy(model)
    model(**inputs).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    assert not _embeddings_output_requires_grad(model, inputs), "no extra backward work without checkpointing"

    for subject in (twin, model):  # the copy first: its hook must read its own switches
        _enable_reentrant_checkpointing(subject)
        if not TRANSFORMERS_4:  # 4.x adds no hook of its own here
            subject.disable_input_require_grads()  # transformers' own hook (5.x, input_ids models)
        subject.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            subject(**inputs).loss.backward()
        grads = {n: p.grad for n, p in subject.named_parameters() if p.requires_grad}
        assert grads.keys() == expected.keys()
        for n, g in expected.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7)
        subject.zero_grad(set_to_none=True)
        assert _embeddings_output_requires_grad(subject, inputs)

    goft.unload(model)
    assert not model.get_input_embeddings()._forward_hooks, "goft.unload leaves a hook behind"


def test_reentrant_checkpointing_reaches_the_adapters_of_a_model_fed_inputs_embeds():
    """Embeddings computed by the caller (soft prompts, a vision tower's features) never pass the
    input embeddings' hook; the model's own pre-hook makes them require grad, and not the
    caller's tensor."""
    model = build("llama")
    goft.inject(model)
    perturb_adapters(model, 0.2)
    model.train()
    inputs = batch("llama")
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
    model(inputs_embeds=embeds, labels=inputs["labels"]).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    _enable_reentrant_checkpointing(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch warns when a checkpointed block's inputs need no grad
        model(inputs_embeds=embeds, labels=inputs["labels"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(grads[n] is not None for n in expected)
    for n, g in expected.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7)
    assert not embeds.requires_grad and embeds.grad is None
    assert any(_goft_pre_hooks(m) for m in model.modules())
    goft.unload(model)
    assert not any(_goft_pre_hooks(m) for m in model.modules()), "goft.unload leaves a hook behind"


def _goft_pre_hooks(module):
    return [h for h in module._forward_pre_hooks.values()
            if isinstance(h, functools.partial) and h.func.__module__ == "goft.inject"]


def _goft_hooks(module):
    return [h for h in module._forward_hooks.values()
            if isinstance(h, functools.partial) and h.func.__module__ == "goft.inject"]


def _embeddings_output_requires_grad_in_forward(model, inputs):
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    try:
        model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def test_the_checkpointing_hook_acts_only_while_a_checkpointed_model_trains_with_grad():
    """It makes backward reach the embeddings, so it must not act where nothing is checkpointed,
    nor in evaluation or under no_grad; one hook per embeddings however many adapters are added."""
    inputs = batch("llama")
    model = build("llama")
    goft.inject(model)
    goft.add_adapter(model, "second", goft.GOFTConfig(target_modules=["q_proj"]))
    goft.inject(model, adapter_name="third", target_modules=["v_proj"])
    embeddings = model.get_input_embeddings()
    assert len(_goft_hooks(embeddings)) == 1
    _enable_reentrant_checkpointing(model)
    if not TRANSFORMERS_4:
        model.disable_input_require_grads()  # transformers' own hook (5.x, input_ids models)

    model.train()
    assert _embeddings_output_requires_grad_in_forward(model, inputs)
    with torch.no_grad():
        assert not _embeddings_output_requires_grad_in_forward(model, inputs)
    model.eval()
    assert not _embeddings_output_requires_grad_in_forward(model, inputs)
    model.train()
    # One checkpointed part is enough (here the model switches off all but one of them).
    switches = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    assert len(switches) >= 2
    for switch in switches[:-1]:
        switch.gradient_checkpointing = False
    assert _embeddings_output_requires_grad_in_forward(model, inputs)
    switches[-1].gradient_checkpointing = False
    assert not _embeddings_output_requires_grad_in_forward(model, inputs)


class _EmbeddingsNotThere(nn.Module):
    def get_input_embeddings(self):  # a model whose embeddings attribute is missing
        return self.word_embeddings


class _EmbeddingsOfAnotherSignature(nn.Module):
    def get_input_embeddings(self, position):  # a method of the same name that wants an argument
        return None


class _CheckpointedToy(nn.Module):
    """A model with transformers' checkpointing switch, one real embeddings, two submodules whose
    get_input_embeddings fails, and (optionally) embeddings that pass integer ids on."""

    def __init__(self, integer_embeddings=False):
        super().__init__()
        self.gradient_checkpointing = True
        self.embeddings = nn.Identity() if integer_embeddings else nn.Embedding(10, 8)
        self.missing, self.other = _EmbeddingsNotThere(), _EmbeddingsOfAnotherSignature()
        self.proj = nn.Linear(8, 8)

    def get_input_embeddings(self):
        return self.embeddings

    def forward(self, ids):
        embedded = self.embeddings(ids)
        return self.proj(embedded if embedded.is_floating_point() else nn.functional.one_hot(embedded, 8).float())


@pytest.mark.parametrize("integer_embeddings", [False, True], ids=["float-embeddings", "integer-embeddings"])
def test_the_checkpointing_hook_passes_over_what_is_not_input_embeddings(integer_embeddings):
    """Submodules whose get_input_embeddings raises AttributeError or TypeError are not models with
    embeddings; embeddings with an integer output cannot require grad and are left alone."""
    model = _CheckpointedToy(integer_embeddings)
    goft.inject(model, target_modules=["proj"])
    assert len(_goft_hooks(model.embeddings)) == 1
    assert not _goft_hooks(model.missing) and not _goft_hooks(model.other)
    model.train()
    ids = torch.tensor([[1, 2, 3]])
    assert _embeddings_output_requires_grad_in_forward(model, ids) is not integer_embeddings
    model(ids).sum().backward()
    assert model.proj.goft_angles["default"].grad is not None

def test_bf16_autocast_and_bf16_base_weights():
    inputs = batch("llama")
    model = build("llama")
    goft.inject(model, scale=True)
    reference = _output(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits.float(), reference, rtol=0.05, atol=0.05)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)

    model = build("llama").to(torch.bfloat16)
    goft.inject(model, variant="qgoft")
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".goft_" in n)
    losses = _train(model, inputs, lr=3e-2)
    assert losses[-1] < losses[0]


def test_casting_the_adapters_to_16_bit_floats_is_warned_about_once(monkeypatch):
    # Adam's first steps (about lr) round away on blocks that start at 1.0 in bfloat16: the
    # diagonals would never train, silently. The warning's recipe puts them back in float32.
    monkeypatch.setattr(goft.layers, "_LOW_PRECISION_WARNED", False)
    inputs = batch("llama")
    model = build("llama")
    goft.inject(model, variant="qgoft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.to("cpu").float()  # casts nothing of the adapters
    with pytest.warns(UserWarning, match=r"made the adapter parameters bfloat16; trained so, optimizer steps"
                                         r".* where bfloat16 steps by 2\^-8\)"):
        model.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.half().to(torch.bfloat16)  # once per process
    diagonals = [layer.goft_blocks["default"][:, [0, 1], [0, 1]] for layer in goft_layers(model)]
    assert all(d.dtype == torch.bfloat16 for d in diagonals)
    monkeypatch.setattr(goft.layers, "_LOW_PRECISION_WARNED", False)
    half = goft.inject(build("llama"), scale=True)
    with pytest.warns(UserWarning, match=r"made the adapter parameters float16.* where float16 steps by 2\^-11\)"):
        half.half()
    for n, p in model.named_parameters():
        p.data = p.data.float() if ".goft_" in n else p.data
    _train(model, inputs, steps=3, lr=1e-3)
    moved = [(layer.goft_blocks["default"][:, [0, 1], [0, 1]].detach() != d.float()).float().mean().item()
             for layer, d in zip(goft_layers(model), diagonals)]
    assert min(moved) > 0.9, "float32 blocks: Adam moves every diagonal entry"


def test_hf_trainer_run():
    model = build("llama")
    goft.inject(model, variant="qgoft")
    inputs = batch("llama")
    rows = [{"input_ids": ids, "labels": ids.clone()} for ids in inputs["input_ids"]] * 2
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = transformers.TrainingArguments(
            output_dir=out,
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
        )
        result = transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    assert result.global_step == 3
    for n, p in model.named_parameters():
        assert torch.equal(p, start[n]) != (".goft_blocks." in n), n


def test_torch_compile_whole_model_fullgraph():
    model = build("llama")
    goft.inject(model, scale=True)
    perturb_adapters(model, 0.2)
    inputs = batch("llama")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(**inputs).loss
    loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    eager = model(**inputs).loss
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(compiled_grads[n], p.grad, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


# Spec section 6: the paper's trainable counts, from full-size configs on the meta device.
def _deberta_v3_base():
    return transformers.DebertaV2Model(
        transformers.DebertaV2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    )


def _vit_b16():
    config = transformers.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16, image_size=224)
    return transformers.ViTModel(config)


def _llama2_7b():
    config = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "builder, targets, goft_count, qgoft_count",
    [
        (_deberta_v3_base, None, 82_872, 331_488),
        (_vit_b16, ["query", "value"] if TRANSFORMERS_4 else ["q_proj", "v_proj"], 18_408, 73_632),
        (_llama2_7b, ["q_proj", "k_proj", "v_proj", "o_proj"], 524_160, 2_096_640),
    ],
    ids=["deberta-v3-base", "vit-b16", "llama-2-7b"],
)
def test_paper_parameter_counts_on_meta_models(builder, targets, goft_count, qgoft_count):
    for variant, expected in (("goft", goft_count), ("qgoft", qgoft_count)):
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = builder()
        goft.inject(model, target_modules=targets, variant=variant)
        trainable, total = goft.count_parameters(model)
        assert trainable == expected, variant
        assert all(p.is_meta for p in model.parameters())


def test_linears_inside_torch_transformer_layers_are_refused():
    # nn.MultiheadAttention reads out_proj.weight directly and nn.TransformerEncoderLayer's eval
    # fast path reads linear1/linear2's: an adapter there would be skipped without a word.
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), num_layers=1)
    with pytest.raises(ValueError, match=r"layers.0.self_attn.out_proj, layers.0.linear1, layers.0.linear2.*"
                                         r"sit inside torch.nn.MultiheadAttention"):
        goft.inject(model, target_modules="all-linear")
    assert not goft.adapter_configs(model)


def test_submodules_load_on_first_use_after_a_plain_import():
    # The README's `goft.trainer.quantized_base(model)` after `import goft`; the Hugging Face
    # stack loads only then, not with goft itself.
    script = ("import sys, goft\n"
              "assert 'transformers' not in sys.modules\n"
              "assert callable(goft.trainer.quantized_base) and goft.finetune.TUNED_LR and goft.export.DTYPES\n"
              "try:\n    goft.no_such_module\nexcept AttributeError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "module 'goft' has no attribute 'no_such_module'"
