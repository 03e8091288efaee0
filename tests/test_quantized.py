"""GOFT on a bitsandbytes-quantized base model (QLoRA-style): a tiny LLaMA loaded by transformers in
4-bit NF4 or 8-bit on the CPU, against a float model holding the dequantized weights."""

import warnings

import pytest
import torch

import goft
from tiny_models import assert_unchanged, batch, build, perturb_adapters, snapshot, transformers

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    build("llama").save_pretrained(path)
    return path


def _quantized(base_dir, bits):
    options = ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32}
               if bits == 4 else {"load_in_8bit": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # float32 for the layers left unquantized (transformers 4.x would pick float16 for them).
        return transformers.LlamaForCausalLM.from_pretrained(
            base_dir, quantization_config=transformers.BitsAndBytesConfig(**options), device_map="cpu",
            dtype=torch.float32)


def _dequantized_twin(quantized, base_dir):
    """The float model with every 4-bit weight replaced by its dequantized value: the reference
    for what the quantized model computes."""
    twin = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    count = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = module.weight
                twin.get_submodule(name).weight.copy_(bnb.functional.dequantize_4bit(weight.data, weight.quant_state))
                count += 1
    assert count == 14  # q, k, v, o, gate, up, down in each of the two layers
    return twin


def _loss_and_adapter_grads(model):
    model.zero_grad()
    loss = model(**batch("llama")).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "goft_" in n}


def test_training_on_a_4bit_base_follows_the_dequantized_weights(base_dir):
    quantized = _quantized(base_dir, 4)
    twin = _dequantized_twin(quantized, base_dir)
    for model in (quantized, twin):
        goft.inject(model)
        perturb_adapters(model, 0.2, seed=1)
    loss, grads = _loss_and_adapter_grads(quantized)
    twin_loss, twin_grads = _loss_and_adapter_grads(twin)
    torch.testing.assert_close(loss, twin_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == twin_grads.keys() and len(grads) == 14
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, twin_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # Parameters are counted as weights, not as the bytes 4-bit packing stores them in.
    assert goft.count_parameters(quantized) == goft.count_parameters(twin)


def test_an_adapter_trained_on_a_4bit_base_merges_into_the_float_base(base_dir, tmp_path):
    quantized = _quantized(base_dir, 4)
    goft.inject(quantized)
    perturb_adapters(quantized, 0.2, seed=2)
    before = snapshot(quantized)
    for merge in (goft.merge, goft.merge_and_unload):
        with pytest.raises(NotImplementedError, match=r"layer model\.layers\.0\.self_attn\.q_proj is quantized "
                                                      r"\(Linear4bit, torch\.uint8\).*goft\.load_adapter"):
            merge(quantized)
        assert_unchanged(quantized, before)

    goft.save_adapter(quantized, str(tmp_path / "adapter"))
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    goft.load_adapter(base, str(tmp_path / "adapter"))
    trained = {n: p for n, p in quantized.named_parameters() if "goft_" in n}
    loaded = {n: p for n, p in base.named_parameters() if "goft_" in n}
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[n], loaded[n]) for n in trained)
    inputs = {"input_ids": batch("llama")["input_ids"]}
    with torch.no_grad():
        adapted = base(**inputs).logits
        plain = goft.merge_and_unload(base)
        merged = plain(**inputs).logits
    assert not any(isinstance(m, goft.GivensLinear) for m in plain.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_an_8bit_base_trains_and_refuses_a_merge(base_dir):
    quantized = _quantized(base_dir, 8)
    twin = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    for model in (quantized, twin):
        goft.inject(model)
        perturb_adapters(model, 0.2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LLM.int8 says it casts the activations to float16
        loss, grads = _loss_and_adapter_grads(quantized)
    twin_loss, twin_grads = _loss_and_adapter_grads(twin)
    # LLM.int8 rounds the activations as well as the weights: close to the float model, not equal.
    assert abs(loss - twin_loss) < 0.05 * twin_loss
    for name, grad in grads.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), twin_grads[name].flatten(), dim=0)
        assert cosine > 0.9, (name, cosine)
    assert goft.count_parameters(quantized) == goft.count_parameters(twin)
    with pytest.raises(NotImplementedError, match=r"is quantized \(Linear8bitLt, torch\.int8\)"):
        goft.merge(quantized)


def test_peft_kbit_preparation_and_reentrant_checkpointing_give_the_same_gradients(base_dir):
    """PEFT's prepare_model_for_kbit_training (reentrant activation checkpointing, embeddings'
    output requiring grad), then goft.inject: the adapters get the gradients they get without it."""
    peft = pytest.importorskip("peft")
    plain = _quantized(base_dir, 4)
    prepared = peft.prepare_model_for_kbit_training(_quantized(base_dir, 4),
                                                gradient_checkpointing_kwargs={"use_reentrant": True})
    assert any(getattr(m, "gradient_checkpointing", False) for m in prepared.modules())
    for model in (plain, prepared):
        goft.inject(model)
        perturb_adapters(model, 0.2, seed=3)
        model.train()
    loss, grads = _loss_and_adapter_grads(plain)
    prepared_loss, prepared_grads = _loss_and_adapter_grads(prepared)
    torch.testing.assert_close(prepared_loss, loss)
    assert grads.keys() == prepared_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(prepared_grads[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_a_merge_into_4bit_weights_in_a_floating_storage_is_refused_as_quantized():
    """FSDP-QLoRA keeps the packed 4-bit weights in a floating tensor (quant_storage)."""
    layer = bnb.nn.Linear4bit(32, 16, quant_type="nf4", compute_dtype=torch.float32, quant_storage=torch.float32)
    model = torch.nn.Sequential(layer.to("cpu"))
    assert model[0].weight.is_floating_point()
    goft.inject(model, target_modules=["0"])
    with pytest.raises(NotImplementedError, match=r"layer 0 is quantized \(Linear4bit, torch\.float32\)"):
        goft.merge(model)


def test_trainer_takes_a_4bit_goft_model_inside_quantized_base(base_dir, tmp_path):
    """Trainer refuses a quantized model without PEFT's adapters; goft.trainer.quantized_base lets
    it take goft's, for a run with activation checkpointing and the adapter callback, and leaves
    transformers' PEFT flag as it was."""
    from goft.trainer import SaveAdapterCallback, quantized_base

    model = _quantized(base_dir, 4)
    goft.inject(model)
    perturb_adapters(model, 0.2, seed=4)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "goft_" in n}
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}
    ids = batch("llama")["input_ids"]
    rows = [{"input_ids": i, "labels": i.clone()} for i in ids] * 2
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, optim="sgd", learning_rate=0.5,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, gradient_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="purely quantized"):
            transformers.Trainer(model=model, args=args, train_dataset=rows)
        with quantized_base(model):
            trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[SaveAdapterCallback()])
        assert "_hf_peft_config_loaded" not in model.__dict__
        trainer.train()
    trained = {n: p for n, p in model.named_parameters() if "goft_" in n}
    assert all(not torch.equal(trained[n], start[n]) for n in start), "every adapter trains"
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed), "the 4-bit base stays"
    float_base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    goft.load_adapter(float_base, str(tmp_path / "goft_adapter"))
    loaded = dict(float_base.named_parameters())
    assert all(torch.equal(loaded[n], trained[n]) for n in trained)
    with pytest.raises(ValueError, match="quantized_base: the Trainer's model has no goft layers"):
        with quantized_base(_quantized(base_dir, 4)):
            pass
