"""Tiny random-weight Hugging Face models built from configs (no download) and helpers for the module tests."""

from __future__ import annotations

import warnings
from typing import Callable, Dict

import pytest
import torch
from torch import nn

import goft

transformers = pytest.importorskip("transformers")

# The tiny models' ops take microseconds: with more than one intra-op thread, thread wake-ups
# dominate (about 30x slower on a busy 2-core machine), so these tests run single-threaded.
torch.set_num_threads(1)

HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB = 32, 64, 2, 4, 100

# transformers 5 renamed some layers (ViT's attention.attention.query became attention.q_proj).
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


def bert_tokenizer(vocab_file) -> "transformers.BertTokenizer":
    """A WordPiece tokenizer of a vocabulary file (transformers 5 takes it as vocab=, 4.x as
    vocab_file=; 5 ignores vocab_file=, giving a tokenizer that maps every word to [UNK])."""
    return transformers.BertTokenizer(**{"vocab_file" if TRANSFORMERS_4 else "vocab": str(vocab_file)})


def save_tiny_bert(path, words, **config):
    """A random BertModel (no classifier, as a pretrained encoder's checkpoint) and the WordPiece
    tokenizer of ``words`` saved as a transformers model folder at ``path``; returns ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = bert_tokenizer(path / "vocab.txt")
    assert tokenizer.unk_token_id not in tokenizer(words[-1])["input_ids"]
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=len(words), **config)).save_pretrained(path)
    return path


def tiny_llama(cls_name: str = "LlamaForCausalLM", config_name: str = "LlamaConfig", **overrides) -> nn.Module:
    settings = dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    config = getattr(transformers, config_name)(**{**settings, **overrides})
    return getattr(transformers, cls_name)(config)


def tiny_deberta(**overrides) -> nn.Module:
    config = transformers.DebertaV2Config(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=2,
        **overrides,
    )
    return transformers.DebertaV2ForSequenceClassification(config)


def tiny_bert(cls_name: str = "BertForSequenceClassification", config_name: str = "BertConfig") -> nn.Module:
    config = getattr(transformers, config_name)(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=2,
    )
    return getattr(transformers, cls_name)(config)


def tiny_vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=16,
        patch_size=8,
        num_labels=2,
    )
    return transformers.ViTForImageClassification(config)


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=64)
    config.bos_token_id = config.eos_token_id = 0
    return transformers.GPT2LMHeadModel(config)


# name -> (builder, inputs for a batch of 4 with labels)
def _text_batch(labels: str) -> Callable[[], Dict[str, torch.Tensor]]:
    def make():
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (4, 8), generator=g)
        target = ids.clone() if labels == "tokens" else torch.tensor([0, 1, 1, 0])
        return {"input_ids": ids, "labels": target}

    return make


def _image_batch() -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "labels": torch.tensor([0, 1, 1, 0])}


MODELS = {
    "llama": (tiny_llama, _text_batch("tokens")),
    "deberta-v2": (tiny_deberta, _text_batch("classes")),
    "vit": (tiny_vit, _image_batch),
    "bert": (tiny_bert, _text_batch("classes")),
}

# Classification heads the base models come without: kept trainable via modules_to_save.
HEADS_TO_SAVE = {"llama": None, "deberta-v2": ["pooler", "classifier"], "vit": ["classifier"], "bert": ["classifier"]}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MODELS[name][0]()
    return model.eval()


def batch(name: str) -> Dict[str, torch.Tensor]:
    return MODELS[name][1]()


def linear_names(model: nn.Module):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def perturb_adapters(model: nn.Module, std: float, seed: int = 0) -> None:
    """Moves every adapter parameter away from identity, so tests exercise a non-trivial transform."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".goft_" in name:
            param.add_(torch.randn(param.shape, generator=g) * std)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def snapshot(model: nn.Module):
    """What injecting or loading an adapter changes: parameters, modules at their paths, adapters, grad flags."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        list(model.named_modules(remove_duplicate=False)),
        goft.adapter_configs(model),
        goft.active_adapter(model),
        [p.requires_grad for p in model.parameters()],
    )


def assert_unchanged(model: nn.Module, snapshot) -> None:
    state, modules, configs, active, grads = snapshot
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())
    now_modules = list(model.named_modules(remove_duplicate=False))  # the same objects at the same paths
    assert [n for n, _ in now_modules] == [n for n, _ in modules]
    assert all(a is b for (_, a), (_, b) in zip(now_modules, modules))
    assert goft.adapter_configs(model) == configs and goft.active_adapter(model) == active
    assert [p.requires_grad for p in model.parameters()] == grads


def interrupt_at_call(monkeypatch, owner, name: str, calls_before: int) -> None:
    """Makes ``owner.name`` raise KeyboardInterrupt on its call number ``calls_before + 1``."""
    original, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        if len(calls) == calls_before:
            raise KeyboardInterrupt
        calls.append(None)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
