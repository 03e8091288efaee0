"""Hugging Face ``Trainer`` callbacks: qGOFT's orthogonality penalty, and adapter files in checkpoints.

    from goft.trainer import OrthogonalityPenaltyCallback, SaveAdapterCallback

    goft.inject(model, variant="qgoft", orth_lambda=0.01)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[OrthogonalityPenaltyCallback(), SaveAdapterCallback()])

Why the penalty is a callback and not a term of the model's loss: ``Trainer`` rescales the loss the
model returns in ways that depend on the model and the settings (divided by the gradient
accumulation steps, or not when the model normalises by the tokens of the whole accumulated batch;
multiplied by the number of processes when it averages tokens across devices). A penalty added to
that loss would be weighted by whichever of these applies, e.g. counted once per micro-batch.
The callback instead adds the penalty's gradient to the adapter's gradients once per optimizer
step, after the task gradients are accumulated and synchronised, so every optimizer step follows
``loss + goft.orthogonality_penalty(model)`` whatever the accumulation, batch normalisation or
number of processes. The one difference from putting the penalty in the loss: ``Trainer`` clips
the gradient norm (``max_grad_norm``) before the callback runs, so the penalty's gradient is not
clipped with the rest.

This module imports transformers; ``import goft`` does not.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from goft.config import check_adapter_name
from goft.inject import active_adapter, adapter_configs, goft_layers, orthogonality_penalty
from goft.io import save_adapter
from goft.layers import flattened_by_fsdp1, is_fsdp1_unit, managed_by_zero3

__all__ = ["OrthogonalityPenaltyCallback", "SaveAdapterCallback", "quantized_base"]


def _require_goft_model(model, who: str) -> None:
    if model is None or not goft_layers(model):
        raise ValueError(f"goft.trainer.{who}: the Trainer's model has no goft layers; call goft.inject(model, ...) "
                         "before creating the Trainer")


def _sharded_by_fsdp1(model) -> bool:
    # The callbacks get the model inside FSDP1's wrapper: it holds the wrappers of nested units,
    # or, wrapped as one unit, parameters that FSDP1 marked as flattened.
    return any(is_fsdp1_unit(m) for m in model.modules()) or any(flattened_by_fsdp1(p) for p in model.parameters())


def _unscale_gradients(optimizer) -> None:
    """Divides the gradients by fp16's loss scale unless that is done already, as the optimizer
    step would (``GradScaler.step`` unscales only what is not unscaled yet)."""
    scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer under fp16
    if scaler is None or not scaler.is_enabled():
        return
    try:
        # The optimizer the scaler knows: accelerate unscales and steps the wrapped one.
        scaler.unscale_(getattr(optimizer, "optimizer", optimizer))
    except RuntimeError as e:
        # Trainer's gradient clipping unscales before the callbacks run; the scaler refuses twice.
        if "already been called" not in str(e):
            raise


_NOT_SET = object()


@contextlib.contextmanager
def quantized_base(model) -> Iterator[None]:
    """Lets ``transformers.Trainer`` take a goft model whose base is quantized (bitsandbytes 4-bit
    or 8-bit, QLoRA-style)::

        with goft.trainer.quantized_base(model):
            trainer = transformers.Trainer(model=model, ...)
        trainer.train()

    ``Trainer.__init__`` refuses a quantized model unless it is a PEFT model or holds adapters of
    transformers' own PEFT integration, which it reads from the model's ``_hf_peft_config_loaded``;
    goft's adapters are neither. The flag is set inside the block only: elsewhere transformers
    takes it to mean that PEFT adapters are loaded (4.x's ``save_pretrained`` would then save them).
    """
    _require_goft_model(model, "quantized_base")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("goft.trainer.quantized_base: the model has nothing to train (no trainable adapter)")
    before = model.__dict__.get("_hf_peft_config_loaded", _NOT_SET)
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if before is _NOT_SET:
            del model._hf_peft_config_loaded
        else:
            model._hf_peft_config_loaded = before


class OrthogonalityPenaltyCallback(transformers.TrainerCallback):
    """Adds the gradient of ``goft.orthogonality_penalty(model)`` (qGOFT's ``lambda * sum <A[:,0],
    A[:,1]>^2``, zero for GOFT adapters) to the adapter's gradients once per optimizer step.

    Under fp16 mixed precision the task gradients are divided by the loss scale first (what the
    optimizer step would do; ``Trainer``'s gradient clipping may have done it already), so the
    penalty's gradient joins them at the same scale, and a step that the scaler skips for an
    overflow skips both.

    Refused at the start of training: DeepSpeed (it owns the gradients) and qGOFT under FSDP1
    (whose flat shards hold no whole blocks outside forward); use FSDP2
    (``fsdp_config={"fsdp_version": 2}``), or add the penalty to the loss in a training loop of
    your own.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _require_goft_model(model, "OrthogonalityPenaltyCallback")
        # args.deepspeed names a config; `accelerate launch --use_deepspeed` sets only the plugin.
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
            raise ValueError(
                "goft.trainer.OrthogonalityPenaltyCallback: DeepSpeed manages the gradients itself; add "
                "goft.orthogonality_penalty(model) to the loss in a compute_loss of your own instead")
        try:  # refuses blocks that are not whole, as FSDP1's are (a model without qGOFT has no penalty)
            with torch.no_grad():
                orthogonality_penalty(model)
        except ValueError as e:
            raise ValueError(f"goft.trainer.OrthogonalityPenaltyCallback: {e}") from None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        penalty = orthogonality_penalty(model)
        if not penalty.requires_grad:  # no active, trainable qGOFT adapter
            return
        _unscale_gradients(optimizer)
        # autograd.grad, then an add: only the penalty's own graph runs, and none of the hooks that
        # wrappers (DDP, FSDP) put on gradient accumulation fire outside their own backward.
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(penalty, params, allow_unused=True)
        with torch.no_grad():
            for param, grad in zip(params, grads):
                if grad is None:
                    continue
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)


def _run_folder(args, state) -> str:
    """The folder Trainer writes this run's checkpoints into: output_dir, or under
    Trainer.hyperparameter_search the trial's own folder inside it."""
    trial = _trial_folder_name(state)
    return os.path.join(args.output_dir, trial) if trial else args.output_dir


def _trial_folder_name(state) -> Optional[str]:
    """Under Trainer.hyperparameter_search, the name of the trial's folder, which a callback is
    told only when the search was given an hp_name (state.trial_name); None outside a search."""
    if not getattr(state, "is_hyper_param_search", False):
        return None
    if not getattr(state, "trial_name", None):
        raise ValueError(
            "goft.trainer.SaveAdapterCallback: under Trainer.hyperparameter_search each trial writes its checkpoints "
            "into a folder of its own, whose name the callback is not told; pass hp_name to hyperparameter_search "
            "(e.g. hp_name=lambda trial: f'run-{trial.number}' with optuna), or leave this callback out")
    return state.trial_name


class SaveAdapterCallback(transformers.TrainerCallback):
    """Writes the active adapter (``goft.save_adapter``: ``adapter_model.safetensors`` and
    ``adapter_config.json``) into ``<checkpoint>/<subfolder>`` whenever ``Trainer`` saves a
    checkpoint, so that every checkpoint holds an adapter that ``goft.load_adapter`` loads into the
    base model; and the trained adapter into ``<output_dir>/<subfolder>`` when training ends
    (``Trainer.save_model`` writes the whole injected model instead, as the checkpoints do).

    Under DeepSpeed ZeRO-3 every rank gathers the partitioned adapter and rank 0 writes it.

    The checkpoint's own ``model.safetensors`` is the injected model's state dict (base weights
    under ``base_layer.weight``), which ``Trainer`` resumes from; a plain ``from_pretrained`` does
    not load it. For a plain model, load the adapter and call ``goft.merge_and_unload``.
    """

    def __init__(self, subfolder: str = "goft_adapter", adapter_name: Optional[str] = None) -> None:
        if adapter_name is not None:
            check_adapter_name(adapter_name, "goft.trainer.SaveAdapterCallback")
        # Not the checkpoint itself: its config.json and model weights beside adapter_config.json
        # would make from_pretrained take the checkpoint for a PEFT adapter.
        if (not isinstance(subfolder, str) or not subfolder or os.path.isabs(subfolder)
                or ".." in subfolder.split(os.sep) or os.path.normpath(subfolder) == "."):
            raise ValueError(f"goft.trainer.SaveAdapterCallback: subfolder must be a relative folder name inside "
                             f"the checkpoint, got {subfolder!r}")
        self.subfolder = subfolder
        self.adapter_name = adapter_name

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _require_goft_model(model, "SaveAdapterCallback")
        _trial_folder_name(state)
        # The first checkpoint would otherwise find out, save_steps into training.
        configs = adapter_configs(model)
        name = active_adapter(model) if self.adapter_name is None else self.adapter_name
        if name not in configs:
            what = f"has no adapter {name!r}" if name is not None else "has no active adapter (goft.set_adapter)"
            raise ValueError(f"goft.trainer.SaveAdapterCallback: the model {what} to save; adapters are {list(configs)}")
        if _sharded_by_fsdp1(model):
            raise ValueError(
                "goft.trainer.SaveAdapterCallback: the model is sharded by FSDP1 (FullyShardedDataParallel), whose "
                "shards a callback cannot gather (it gets the model inside the wrapper); train with FSDP2 "
                "(fsdp_config={'fsdp_version': 2}), or drop this callback and, after training, call "
                "goft.save_adapter(trainer.model, dir) on every rank")

    def on_save(self, args, state, control, model=None, **kwargs):
        checkpoint = os.path.join(_run_folder(args, state), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._save(model, os.path.join(checkpoint, self.subfolder), state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(model, os.path.join(_run_folder(args, state), self.subfolder), state)

    def _save(self, model, folder: str, state) -> None:
        # A model sharded by FSDP2 or partitioned by DeepSpeed ZeRO-3 is gathered by save_adapter
        # on every rank (rank 0 writes); any other model (FSDP1 is refused above) is written by
        # the main process alone.
        sharded = any(callable(getattr(p, "full_tensor", None)) or managed_by_zero3(p) for p in model.parameters())
        if sharded or state.is_world_process_zero:
            save_adapter(model, folder, self.adapter_name)
