"""Export: a base model directory plus a saved adapter -> a plain transformers model directory with
the adapter merged into its weights (``goft merge``), which runs at the base model's cost without goft.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from goft.checkpoint_names import from_checkpoint_names
from goft.presets import CLASSIFICATION_HEAD_NAMES

__all__ = ["merge_to_directory"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_to_directory(model_dir: str, adapter_dir: str, output_dir: str, num_labels: Optional[int] = None,
                       dtype: Optional[str] = None, log: Callable[[str], None] = print,
                       adapter_revision: Optional[str] = None, model_revision: Optional[str] = None) -> Path:
    """Loads ``model_dir`` as the class the adapter was trained on, loads the adapter, merges it
    (``goft.merge_and_unload``) and saves the plain model, with the tokenizer or image processor
    of ``model_dir``, to ``output_dir``, which must not exist or be empty.

    The merge runs in float32; the weights are saved in ``dtype`` (float32, bfloat16, float16),
    by default the dtype the base checkpoint was saved in. ``num_labels`` sets the size of a
    classification head that the adapter carries (modules_to_save) when it differs from the base
    config's. ``model_dir`` and ``adapter_dir`` may be Hugging Face Hub repository ids
    (``model_revision``, ``adapter_revision``: branch, tag or commit), downloaded into
    huggingface_hub's cache when no local directory has the name. Raises ValueError
    (FileNotFoundError for missing folders) before writing anything.
    """
    import transformers

    import goft
    from goft.finetune import ensure_pad_token, freshly_initialised
    from goft.folders import (TOKENIZER_FILES, check_model_folder, check_output_folder, directory_path,
                              resolve_model_directory)
    from goft.io import MERGED_ADAPTERS_KEY, SELF_DESCRIBED, _read, merged_into, resolve_adapter_directory

    where = "goft merge"
    model_dir, output_dir = (directory_path(path, where, argument) for argument, path in
                             (("model_dir", model_dir), ("output_dir", output_dir)))
    check_output_folder(output_dir, where, "output")
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{where}: output folder {output_dir!r} exists and is not empty; pick a new one")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    adapter_dir = resolve_adapter_directory(adapter_dir, where, "adapter_dir", revision=adapter_revision)
    description, _ = _read(adapter_dir, f"{where}: adapter {adapter_dir!r}")  # validates the files
    class_name = description.get("model_class")
    model_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        raise ValueError(f"{where}: the adapter was saved from {class_name!r}, which is not a transformers model "
                         "class; merge in Python: goft.load_adapter, goft.merge_and_unload, save_pretrained")
    # The model last: from the Hub it is a download, which a mistake in the arguments above should not cost.
    model_dir = resolve_model_directory(model_dir, where, "model_dir", revision=model_revision)
    check_model_folder(model_dir, where, "model_dir", tokenizer=False)  # an image model has none

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if merged_into(config, description):  # found before the model is loaded
        raise ValueError(f"{where}: this adapter is merged into {model_dir!r} already (its config.json lists it under "
                         f"{MERGED_ADAPTERS_KEY}); merging it again would apply it twice. Pass the base model it "
                         "was trained on")
    saved_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype, None)
    target_dtype = DTYPES[dtype] if dtype is not None else (saved_dtype if saved_dtype in DTYPES.values() else torch.float32)
    # Another number of labels than the base checkpoint's gives a head of another shape, which
    # the adapter must then carry (modules_to_save), as must it every weight the checkpoint lacks.
    overrides = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels is not None else {}
    log(f"loading {class_name} from {model_dir}")
    model, loading = model_class.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32,
                                                 output_loading_info=True, **overrides)
    try:
        with warnings.catch_warnings():  # _read above has warned that the tensors file describes itself
            warnings.filterwarnings("ignore", message=".*" + re.escape(SELF_DESCRIBED), category=UserWarning)
            goft.load_adapter(model, adapter_dir)
    except ValueError as e:
        hint = ("; the adapter's classification head has another number of labels than the base config "
                f"({model.config.num_labels}): pass --num-labels") if num_labels is None and _head_differs(model, description) else ""
        raise ValueError(f"{where}: {e}{hint}") from None
    fresh = freshly_initialised(loading)
    # The adapter's tensors in its checkpoint's spelling and in the model's (goft.checkpoint_names).
    model_key = from_checkpoint_names(model)
    held = {name for key in description.get("tensors", {}) for name in (key, model_key(key)) if name}
    uncovered = sorted(fresh - held)
    if uncovered:
        raise ValueError(f"{where}: weights {uncovered} are not in the checkpoint of {model_dir!r} at these shapes "
                         "and not in the adapter either, so the merged model would hold random values there"
                         + ("; check --num-labels" if num_labels is not None else ""))
    covered = sorted(fresh & held)
    if covered:  # transformers' loading report, printed above, calls them newly initialised
        log(f"weights missing from the base checkpoint, taken from the adapter: {', '.join(covered)}")
    model = goft.merge_and_unload(model)  # records the adapter's checksum in model.config (load_adapter's file)
    check_dtype_holds(model, target_dtype, where)
    model = model.to(target_dtype)
    id2label = {int(k): v for k, v in description.get("id2label", {}).items()}
    if id2label and sorted(id2label) == list(range(getattr(model.config, "num_labels", -1))):
        model.config.id2label = id2label  # the names the adapter's head was trained with
        model.config.label2id = {v: k for k, v in id2label.items()}
    processor = None
    # Only where the folder has the files: without them transformers 4.x tries to convert a
    # tokenizer from nothing and fails in ways of its own (ImportError for protobuf).
    # tokenizer_config.json alone is enough for tokenizers without a vocabulary file (ByT5's bytes).
    for processor_class, files in ((transformers.AutoTokenizer, TOKENIZER_FILES + ("tokenizer_config.json",)),
                                   (transformers.AutoImageProcessor, ("preprocessor_config.json",))):
        if not any(os.path.isfile(os.path.join(model_dir, name)) for name in files):
            continue
        try:
            candidate = processor_class.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError, ImportError):  # the files are of another kind
            continue
        # A WordPiece or BPE tokenizer config without its vocabulary: saved, it would turn every
        # word into [UNK] in a merged folder that looks complete.
        if not (isinstance(candidate, transformers.PreTrainedTokenizerBase) and knows_only_special_tokens(candidate)):
            processor = candidate
            break
    if processor is None and os.path.isfile(os.path.join(model_dir, "tokenizer_config.json")):
        log(f"no tokenizer saved: {model_dir!r} has tokenizer_config.json but no vocabulary (none of "
            f"{', '.join(TOKENIZER_FILES)}); save the base model's tokenizer into the merged folder yourself")
    if class_name.endswith("ForSequenceClassification") and isinstance(processor, transformers.PreTrainedTokenizerBase):
        ensure_pad_token(processor, model)  # as goft finetune trained it; batches need it
    model.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    log(f"merged model ({str(target_dtype).removeprefix('torch.')}) saved to {out}")
    return out


def check_dtype_holds(model: torch.nn.Module, dtype: torch.dtype, where: str) -> None:
    """Raises ValueError, before anything is written, if casting ``model`` to ``dtype`` would turn
    finite values into inf: float16 holds up to 65504, and a merged weight's entries can exceed
    the base's (a rotation keeps a row's norm, not its largest entry; a scale grows it)."""
    from goft.layers import magnitude_beyond

    largest = torch.finfo(dtype).max
    too_large = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or torch.finfo(tensor.dtype).max <= largest:
            continue
        worst = magnitude_beyond(tensor, dtype)
        if worst is not None and bool(torch.isfinite(tensor).all()):  # NaN or inf: not the cast's doing
            too_large[name] = worst
    if too_large:
        names = sorted(too_large, key=too_large.get, reverse=True)
        dtype_name = str(dtype).removeprefix("torch.")
        raise ValueError(f"{where}: {dtype_name} cannot hold the merged model's {', '.join(names[:5])}"
                         f"{f' and {len(names) - 5} more' if len(names) > 5 else ''}: entries up to "
                         f"{too_large[names[0]]:.4g}, above {dtype_name}'s largest, {largest:.6g}; save in bfloat16 "
                         "or float32 (--dtype)")


def knows_only_special_tokens(tokenizer) -> bool:
    """Whether ``tokenizer`` holds no vocabulary beyond its special tokens ([CLS], [UNK], ...)."""
    return len(tokenizer) <= len(set(tokenizer.all_special_ids))


def _head_differs(model, description) -> bool:
    """Whether the adapter carries a classification head of another shape than the model's."""
    state = model.state_dict()
    return any(key.split(".")[0] in CLASSIFICATION_HEAD_NAMES and key in state
               and list(state[key].shape) != spec.get("shape")
               for key, spec in description.get("tensors", {}).items())
