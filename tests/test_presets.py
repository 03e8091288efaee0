"""Each preset in goft.presets adapts exactly the linear layers of every transformer block of the installed transformers."""

import re
import warnings

import pytest
import torch
from torch import nn

import goft
from goft.layers import GivensLinear, is_conv1d

from tiny_models import TRANSFORMERS_4, tiny_bert, tiny_deberta, tiny_gpt2, tiny_llama, tiny_vit, transformers

# Special token ids inside the tiny vocabulary, for configs whose defaults lie outside it.
_TOKENS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _vision(cls_name, config_name):
    config = getattr(transformers, config_name)(**_SIZES, image_size=32, patch_size=8)
    return getattr(transformers, cls_name)(config)


def _encoder(cls_name, config_name, **overrides):
    config = getattr(transformers, config_name)(**_SIZES, vocab_size=100, **overrides)
    return getattr(transformers, cls_name)(config)

BUILDERS = {
    "llama": lambda: tiny_llama(),
    "mistral": lambda: tiny_llama("MistralForCausalLM", "MistralConfig"),
    "qwen2": lambda: tiny_llama("Qwen2ForCausalLM", "Qwen2Config"),
    "qwen3": lambda: tiny_llama("Qwen3ForCausalLM", "Qwen3Config"),
    "gemma": lambda: tiny_llama("GemmaForCausalLM", "GemmaConfig", head_dim=8),
    "gemma2": lambda: tiny_llama("Gemma2ForCausalLM", "Gemma2Config", head_dim=8),
    "gemma3_text": lambda: tiny_llama("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=8),
    "olmo": lambda: tiny_llama("OlmoForCausalLM", "OlmoConfig", **_TOKENS),
    "olmo2": lambda: tiny_llama("Olmo2ForCausalLM", "Olmo2Config", **_TOKENS),
    "granite": lambda: tiny_llama("GraniteForCausalLM", "GraniteConfig"),
    "cohere": lambda: tiny_llama("CohereForCausalLM", "CohereConfig", **_TOKENS),
    "smollm3": lambda: tiny_llama("SmolLM3ForCausalLM", "SmolLM3Config", **_TOKENS),
    "phi3": lambda: tiny_llama("Phi3ForCausalLM", "Phi3Config", **_TOKENS),
    "phi": lambda: tiny_llama("PhiForCausalLM", "PhiConfig", **_TOKENS),
    "starcoder2": lambda: tiny_llama("Starcoder2ForCausalLM", "Starcoder2Config", **_TOKENS),
    "gpt2": tiny_gpt2,
    "deit": lambda: _vision("DeiTForImageClassification", "DeiTConfig"),
    "dinov2": lambda: _vision("Dinov2Model", "Dinov2Config"),
    "beit": lambda: _vision("BeitForImageClassification", "BeitConfig"),
    "vit_mae": lambda: _vision("ViTMAEModel", "ViTMAEConfig"),
    "xlm-roberta": lambda: tiny_bert("XLMRobertaForSequenceClassification", "XLMRobertaConfig"),
    "electra": lambda: tiny_bert("ElectraForSequenceClassification", "ElectraConfig"),
    "deberta": lambda: _encoder("DebertaForSequenceClassification", "DebertaConfig"),
    "distilbert": lambda: transformers.DistilBertForSequenceClassification(
        transformers.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=100)),
    "modernbert": lambda: _encoder("ModernBertForSequenceClassification", "ModernBertConfig", cls_token_id=0, sep_token_id=0, **_TOKENS),
    "deberta-v2": tiny_deberta,
    "vit": tiny_vit,
    "bert": tiny_bert,
    "roberta": lambda: tiny_bert("RobertaForSequenceClassification", "RobertaConfig"),
}

# What each block holds, by the suffix after the block index, in transformers 5.
BLOCK_LINEARS = {
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "deberta-v2": {
        "attention.self.query_proj",
        "attention.self.key_proj",
        "attention.self.value_proj",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    },
    "vit": {"attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"},
    "bert": {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"},
}
for _decoder in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "cohere", "smollm3"):
    BLOCK_LINEARS[_decoder] = BLOCK_LINEARS["llama"]
BLOCK_LINEARS["roberta"] = BLOCK_LINEARS["bert"]
BLOCK_LINEARS["phi3"] = {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
BLOCK_LINEARS["phi"] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"}
BLOCK_LINEARS["starcoder2"] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.c_fc", "mlp.c_proj"}
BLOCK_LINEARS["gpt2"] = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
for _vit_like in ("deit", "dinov2", "beit", "vit_mae"):
    BLOCK_LINEARS[_vit_like] = BLOCK_LINEARS["vit"]
BLOCK_LINEARS["xlm-roberta"] = BLOCK_LINEARS["electra"] = BLOCK_LINEARS["bert"]
BLOCK_LINEARS["deberta"] = {"attention.self.in_proj", "attention.output.dense", "intermediate.dense", "output.dense"}
BLOCK_LINEARS["distilbert"] = {"attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2"}
BLOCK_LINEARS["modernbert"] = {"attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"}
if TRANSFORMERS_4:  # the ViT family's names before transformers 5
    _VIT_ATTENTION = {"attention.attention.query", "attention.attention.key", "attention.attention.value",
                      "attention.output.dense"}
    for _vit_like in ("vit", "deit", "beit", "vit_mae"):
        BLOCK_LINEARS[_vit_like] = _VIT_ATTENTION | {"intermediate.dense", "output.dense"}
    BLOCK_LINEARS["dinov2"] = _VIT_ATTENTION | {"mlp.fc1", "mlp.fc2"}
# A module inside block i: "model.layers.1.mlp", "transformer.h.0.attn", "deberta.encoder.layer.1.x", "layers.0.x".
_IN_A_BLOCK = re.compile(r"(^|\.)(layers|layer|h)\.\d+\.")


def test_every_preset_is_tested():
    assert set(goft.DEFAULT_TARGET_MODULES) == set(BUILDERS)


@pytest.mark.parametrize("model_type", sorted(BUILDERS))
def test_preset_targets_all_block_linears(model_type):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BUILDERS[model_type]()
    assert model.config.model_type == model_type
    all_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    goft.inject(model)
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, GivensLinear))
    expected = sorted(n for n in all_linears if any(n.endswith("." + s) for s in BLOCK_LINEARS[model_type]))
    assert adapted == expected
    assert len(adapted) == 2 * len(BLOCK_LINEARS[model_type]), "every linear of both blocks"
    # Every linear of a block, and nothing else: heads, poolers and embeddings stay untouched.
    assert adapted == sorted(n for n in all_linears if _IN_A_BLOCK.search(n))
    # The adapted model runs forward and backward (fused projections, GPT-2's Conv1D included).
    config = model.config
    if model.main_input_name == "pixel_values":
        inputs = {"pixel_values": torch.randn(1, config.num_channels, config.image_size, config.image_size)}
    else:
        inputs = {"input_ids": torch.randint(0, config.vocab_size, (2, 7))}
    output = model(**inputs)
    (output.logits if hasattr(output, "logits") else output.last_hidden_state).float().square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".goft_" in n)
