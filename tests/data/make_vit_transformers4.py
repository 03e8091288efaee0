"""Writes tests/data/vit-transformers4/: a tiny ViT saved by transformers 4.57, goft adapters for it
saved there, and the model's logits with each on a fixed batch. Under transformers 5 the ViT's
modules have other names (vit.layers.0.attention.q_proj, not vit.encoder.layer.0.attention.
attention.query); tests/test_io.py loads these adapters under whichever version runs the tests.

    python tests/data/make_vit_transformers4.py [--which adapter|full-paths]   # transformers 4.57.x

`adapter` (modules_to_save given by short names) was written by the goft of commit 969a057, whose
files do not yet say how they spell names; `adapter-full-paths` (a modules_to_save entry given by
its full 4.57 path, which names nothing under transformers 5) by a later one.
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


SAVED_MODULES = {"adapter": ["classifier", "layernorm_before"],
                 "full-paths": ["classifier", "vit.encoder.layer.1.layernorm_before"]}


def main() -> None:
    if not transformers.__version__.startswith("4."):
        sys.exit(f"run it with transformers 4.x (this is {transformers.__version__})")
    which = sys.argv[sys.argv.index("--which") + 1] if "--which" in sys.argv else "full-paths"
    suffix = "" if which == "adapter" else "-" + which
    model = build("vit")
    if which == "adapter":
        model.save_pretrained(FOLDER / "model")
    goft.inject(model, modules_to_save=SAVED_MODULES[which])
    perturb_adapters(model, 0.2)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
        for name, param in model.named_parameters():
            if "layernorm_before" in name and param.requires_grad:  # the saved ones
                param.add_(0.1)
    goft.save_adapter(model, str(FOLDER / f"adapter{suffix}"))
    pixels = batch("vit")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    safetensors.torch.save_file({"pixel_values": pixels, "logits": logits},
                                str(FOLDER / f"expected{suffix}.safetensors"),
                                metadata={"transformers": transformers.__version__})


if __name__ == "__main__":
    main()
