"""Writes tests/data/vit-transformers4/: a tiny ViT saved by transformers 4.57, a goft adapter for it
saved there, and its logits on a fixed batch. Under transformers 5 the ViT's modules have other
names (vit.layers.0.attention.q_proj, not vit.encoder.layer.0.attention.attention.query);
tests/test_io.py loads this adapter under whichever version runs the tests.

    python tests/data/make_vit_transformers4.py   # with transformers 4.57.x installed
"""

import pathlib
import sys

import safetensors.torch
import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import goft  # noqa: E402
from tiny_models import batch, build, perturb_adapters  # noqa: E402

FOLDER = pathlib.Path(__file__).resolve().parent / "vit-transformers4"


def main() -> None:
    if not transformers.__version__.startswith("4."):
        sys.exit(f"run it with transformers 4.x (this is {transformers.__version__})")
    model = build("vit")
    model.save_pretrained(FOLDER / "model")
    goft.inject(model, modules_to_save=["classifier", "layernorm_before"])
    perturb_adapters(model, 0.2)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
        for name, param in model.named_parameters():
            if "layernorm_before" in name:
                param.add_(0.1)
    goft.save_adapter(model, str(FOLDER / "adapter"))
    pixels = batch("vit")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    safetensors.torch.save_file({"pixel_values": pixels, "logits": logits}, str(FOLDER / "expected.safetensors"),
                                metadata={"transformers": transformers.__version__})


if __name__ == "__main__":
    main()
