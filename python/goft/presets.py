"""Default target layers per Hugging Face model_type, used when GOFTConfig.target_modules is None.

Names are matched on the module-name suffix. Each entry is checked against the installed
transformers by tests/test_presets.py (tiny models built from configs).
"""

from __future__ import annotations

from typing import Dict, List, Optional

__all__ = ["DEFAULT_TARGET_MODULES", "default_target_modules"]

# Attention q/k/v/o and the gated MLP's three projections: the paper adapts every linear layer
# of each block.
_DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ViT-style vision encoders in transformers >= 5 (attention.{q,k,v,o}_proj, mlp.fc1/fc2).
_VIT = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc1", "mlp.fc2"]

# BERT-style encoders. "output.dense" alone would also match "attention.output.dense"; both are
# listed so the table reads as the six linears of a block.
_BERT = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]

DEFAULT_TARGET_MODULES: Dict[str, List[str]] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "gemma3_text": _DECODER,
    "olmo": _DECODER,
    "olmo2": _DECODER,
    "granite": _DECODER,
    "cohere": _DECODER,
    "smollm3": _DECODER,
    # Phi-3 fuses q/k/v and gate/up into one linear each.
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.c_fc", "mlp.c_proj"],
    # GPT-2's are transformers' Conv1D (weight stored (in, out)), which GivensLinear also wraps.
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"],
    # transformers >= 5 names ViT's layers like a decoder (attention.{q,k,v,o}_proj, mlp.fc1/fc2);
    # the 4.x names (attention.attention.query, ..., intermediate.dense, output.dense) follow so
    # the preset works with either.
    "vit": _VIT + _BERT,
    "deit": _VIT + _BERT,
    "dinov2": _VIT + _BERT,
    "beit": _VIT + _BERT,
    "vit_mae": _VIT + _BERT,
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    # DeBERTa (v1) projects q, k and v with one in_proj.
    "deberta": ["in_proj", "attention.output.dense", "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "ffn.lin1", "ffn.lin2"],
    # ModernBERT: fused Wqkv, and Wi (the GLU's two halves in one linear).
    "modernbert": ["attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"],
}


# The top-level children that hold a transformers model's classification head
# (BertForSequenceClassification's classifier, LlamaForSequenceClassification's score), by the
# names PEFT also uses; the layers some classification classes add before it: DeBERTa's pooler
# (BERT's lives inside the base model) and DistilBERT's pre_classifier; and BART's and T5's
# classification_head. A base checkpoint has none of them.
CLASSIFICATION_HEAD_NAMES = ("classifier", "score", "pooler", "pre_classifier", "classification_head")


def default_target_modules(model_type: Optional[str]) -> Optional[List[str]]:
    """The preset target names for a model_type, or None when goft has no preset for it."""
    if model_type is None:
        return None
    names = DEFAULT_TARGET_MODULES.get(model_type)
    return list(names) if names is not None else None
