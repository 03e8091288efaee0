"""Each preset in goft.presets adapts exactly the linear layers of every transformer block of the installed transformers."""

import warnings

import pytest
import torch
from torch import nn

import goft
from goft.layers import GivensLinear

from tiny_models import tiny_bert, tiny_deberta, tiny_llama, tiny_vit

BUILDERS = {
    "llama": lambda: tiny_llama(),
    "mistral": lambda: tiny_llama("MistralForCausalLM", "MistralConfig"),
    "qwen2": lambda: tiny_llama("Qwen2ForCausalLM", "Qwen2Config"),
    "gemma": lambda: tiny_llama("GemmaForCausalLM", "GemmaConfig", head_dim=8),
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
for _decoder in ("mistral", "qwen2", "gemma"):
    BLOCK_LINEARS[_decoder] = BLOCK_LINEARS["llama"]
BLOCK_LINEARS["roberta"] = BLOCK_LINEARS["bert"]


def test_every_preset_is_tested():
    assert set(goft.DEFAULT_TARGET_MODULES) == set(BUILDERS)


@pytest.mark.parametrize("model_type", sorted(BUILDERS))
def test_preset_targets_all_block_linears(model_type):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BUILDERS[model_type]()
    assert model.config.model_type == model_type
    all_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    goft.inject(model)
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, GivensLinear))
    expected = sorted(n for n in all_linears if any(n.endswith("." + s) for s in BLOCK_LINEARS[model_type]))
    assert adapted == expected
    assert len(adapted) == 2 * len(BLOCK_LINEARS[model_type]), "every linear of both blocks"
    # Heads, poolers and embeddings stay untouched.
    assert all(".layer" in n for n in adapted)
