"""goft.trainer's callbacks in real transformers.Trainer runs on a tiny LLaMA (CPU)."""

from __future__ import annotations

import copy
import json
import os
import types
import warnings

import pytest
import torch

import goft
from tiny_models import batch, build, perturb_adapters, transformers

from goft.trainer import OrthogonalityPenaltyCallback, SaveAdapterCallback

LR = 0.5


def qgoft_model():
    model = build("llama")
    goft.inject(model, variant="qgoft", orth_lambda=0.05)
    perturb_adapters(model, 0.2)  # identity blocks have zero penalty and gradient
    return model


def rows(copies=2):
    ids = batch("llama")["input_ids"]
    return [{"input_ids": i, "labels": i.clone()} for i in ids] * copies


def run_trainer(model, out, callbacks, dataset=None, **overrides):
    settings = dict(output_dir=out, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    optim="sgd", learning_rate=LR, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant",
                    report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
    settings.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**settings),
                                       train_dataset=rows() if dataset is None else dataset, callbacks=callbacks)
        trainer.train()
    return trainer


@pytest.mark.parametrize("precision", [{}, {"fp16": True}], ids=["float32", "fp16"])
def test_penalty_gradient_is_added_once_per_optimizer_step(tmp_path, precision):
    """One SGD step over two accumulated micro-batches, with and without the callback: the
    adapter's parameters differ by exactly lr * grad(penalty) at the starting point, i.e. the
    penalty counts once per optimizer step, not once per micro-batch, and nothing else moves.
    (fp16 on the CPU runs forward in float16 without a loss scaler; the scaler's part is tested
    below.)"""
    start = qgoft_model()
    penalty_grads = {}
    probe = copy.deepcopy(start)
    penalty = goft.orthogonality_penalty(probe)
    assert penalty.item() > 1e-4
    penalty.backward()
    for name, param in probe.named_parameters():
        if param.grad is not None:
            penalty_grads[name] = param.grad
    assert penalty_grads and all(".goft_blocks." in n for n in penalty_grads)

    with_penalty, without = copy.deepcopy(start), copy.deepcopy(start)
    run_trainer(with_penalty, str(tmp_path / "a"), [OrthogonalityPenaltyCallback()], **precision)
    run_trainer(without, str(tmp_path / "b"), [], **precision)
    params_without = dict(without.named_parameters())
    for name, param in with_penalty.named_parameters():
        moved = params_without[name].detach() - param.detach()
        expected = LR * penalty_grads[name] if name in penalty_grads else torch.zeros_like(moved)
        torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_goft_adapters_have_no_penalty_and_train_as_without(tmp_path):
    model = build("llama")
    goft.inject(model)
    perturb_adapters(model, 0.2)
    twin = copy.deepcopy(model)
    run_trainer(model, str(tmp_path / "a"), [OrthogonalityPenaltyCallback()])
    run_trainer(twin, str(tmp_path / "b"), [])
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("unscaled_before", [False, True], ids=["scaled", "unscaled-by-clipping"])
def test_penalty_gradient_joins_loss_scaled_gradients_at_their_scale(unscaled_before):
    """fp16's loss scaler (accelerate's optimizer wrapper around a real GradScaler): the step
    follows loss + penalty, whether the task gradients still carry the scale when the callback runs
    or gradient clipping has unscaled them; one overflowing gradient skips the whole step."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # the state accelerate's optimizer wrapper reads
    start = qgoft_model()
    inputs = {"input_ids": batch("llama")["input_ids"], "labels": batch("llama")["input_ids"]}

    reference = copy.deepcopy(start)
    (reference(**inputs).loss + goft.orthogonality_penalty(reference)).backward()
    with torch.no_grad():
        for param in reference.parameters():
            if param.grad is not None:
                param -= LR * param.grad

    for overflow in (False, True):
        model = copy.deepcopy(start)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        optimizer = AcceleratedOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR),
                                         scaler=scaler)
        scaler.scale(model(**inputs).loss).backward()
        if overflow:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        if unscaled_before:
            scaler.unscale_(optimizer.optimizer)
        OrthogonalityPenaltyCallback().on_pre_optimizer_step(None, None, None, model=model, optimizer=optimizer)
        optimizer.step()
        assert optimizer.step_was_skipped == overflow
        expected = start if overflow else reference
        for (name, param), want in zip(model.named_parameters(), expected.parameters()):
            torch.testing.assert_close(param, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")



def test_penalty_gradient_reaches_blocks_the_task_loss_did_not():
    """A layer outside a step's forward (an unused branch, an MoE expert without tokens) has no
    .grad: the penalty's gradient is its whole gradient; elsewhere the two are added."""
    model = qgoft_model()
    inputs = {"input_ids": batch("llama")["input_ids"], "labels": batch("llama")["input_ids"]}
    model(**inputs).loss.backward()
    blocks = [p for n, p in model.named_parameters() if n.endswith(".goft_blocks.default")]
    unused, used = blocks[0], blocks[1]
    unused.grad = None
    task_grad = used.grad.clone()
    penalty_grads = torch.autograd.grad(goft.orthogonality_penalty(model), [unused, used])
    assert all(g.abs().max() > 0 for g in penalty_grads)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    OrthogonalityPenaltyCallback().on_pre_optimizer_step(None, None, None, model=model, optimizer=optimizer)
    torch.testing.assert_close(unused.grad, penalty_grads[0], rtol=0, atol=0)
    torch.testing.assert_close(used.grad, task_grad + penalty_grads[1])


def test_a_scaler_error_other_than_unscaling_twice_is_not_hidden():
    """The callback swallows only the scaler's refusal to unscale twice (gradient clipping did it);
    unscaling after the step means the callback runs out of place, and must say so."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    model = qgoft_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    optimizer = AcceleratedOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR),
                                     scaler=scaler)
    inputs = {"input_ids": batch("llama")["input_ids"], "labels": batch("llama")["input_ids"]}
    scaler.scale(model(**inputs).loss).backward()
    scaler.step(optimizer.optimizer)  # stepped, not yet updated
    with pytest.raises(RuntimeError, match="unscale_\\(\\) is being called after step\\(\\)"):
        OrthogonalityPenaltyCallback().on_pre_optimizer_step(None, None, None, model=model, optimizer=optimizer)

@pytest.mark.parametrize("switch", ["gradient_checkpointing", "activation_checkpointing"])
@pytest.mark.parametrize("reentrant", [None, True], ids=["transformers-default", "reentrant"])
@pytest.mark.parametrize("name", ["llama", "vit"])
def test_trainer_with_activation_checkpointing_trains_the_adapters_as_without(tmp_path, name, reentrant, switch):
    """TrainingArguments(gradient_checkpointing=True) (transformers 5: activation_checkpointing)
    enables checkpointing after goft.inject, reentrant by default under transformers 4.x; the
    adapters still train exactly as without it."""
    if switch not in transformers.TrainingArguments.__dataclass_fields__:
        pytest.skip(f"this transformers has no TrainingArguments.{switch}")
    model = build(name)
    goft.inject(model)
    perturb_adapters(model, 0.2)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    twin = copy.deepcopy(model)
    inputs = batch(name)
    dataset = [{k: v[i] for k, v in inputs.items()} for i in range(len(inputs["labels"]))] * 2
    kwargs = {} if reentrant is None else {f"{switch}_kwargs": {"use_reentrant": reentrant}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name, under transformers 5
        run_trainer(model, str(tmp_path / "a"), [], dataset, **{switch: True}, **kwargs)
    run_trainer(twin, str(tmp_path / "b"), [], dataset)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    moved = 0
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        if n in start:
            moved += not torch.equal(p, start[n])
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert moved == len(start)


def test_penalty_callback_refuses_deepspeed_enabled_by_accelerate_launch(tmp_path, monkeypatch):
    """`accelerate launch --use_deepspeed` sets the environment, not TrainingArguments.deepspeed."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    args = transformers.TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    assert not args.deepspeed and args.deepspeed_plugin is not None
    with pytest.raises(ValueError, match="DeepSpeed manages the gradients itself"):
        OrthogonalityPenaltyCallback().on_train_begin(args, None, None, model=qgoft_model())


def test_penalty_callback_refusals(tmp_path):
    callback = OrthogonalityPenaltyCallback()
    model = qgoft_model()
    args = types.SimpleNamespace(fp16=False, deepspeed="ds_config.json")
    with pytest.raises(ValueError, match="DeepSpeed"):
        callback.on_train_begin(args, None, None, model=model)
    with pytest.raises(ValueError, match="no goft layers; call goft.inject"):
        run_trainer(build("llama"), str(tmp_path), [OrthogonalityPenaltyCallback()])


def test_every_checkpoint_and_the_output_folder_hold_a_loadable_adapter(tmp_path):
    model = qgoft_model()
    out = str(tmp_path)
    run_trainer(model, out, [OrthogonalityPenaltyCallback(), SaveAdapterCallback()], max_steps=2,
                gradient_accumulation_steps=1, save_strategy="steps", save_steps=1, learning_rate=0.05)
    saved = {}
    for step in (1, 2):
        folder = os.path.join(out, f"checkpoint-{step}", "goft_adapter")
        assert sorted(os.listdir(folder)) == [goft.io.CONFIG_NAME, goft.io.WEIGHTS_NAME]
        fresh = build("llama")
        goft.load_adapter(fresh, folder)
        saved[step] = {n: p.detach().clone() for n, p in fresh.named_parameters() if ".goft_" in n}
    # And the trained adapter in the output folder at the end of training.
    fresh = build("llama")
    goft.load_adapter(fresh, os.path.join(out, "goft_adapter"))
    saved["end"] = {n: p.detach().clone() for n, p in fresh.named_parameters() if ".goft_" in n}
    trained = {n: p.detach() for n, p in model.named_parameters() if ".goft_" in n}
    for when in (2, "end"):
        assert saved[when].keys() == trained.keys()
        for name, value in trained.items():
            assert torch.equal(saved[when][name], value), f"{when}: {name}"
    assert any(not torch.equal(saved[1][n], saved[2][n]) for n in trained), "step 2 changed nothing"


def test_save_adapter_callback_saves_the_adapter_it_names(tmp_path):
    # A callback named for one adapter writes that one, not the active adapter being trained.
    model = qgoft_model()
    goft.add_adapter(model, "other", target_modules=["q_proj"])
    run_trainer(model, str(tmp_path), [SaveAdapterCallback(adapter_name="other")], max_steps=1,
                save_strategy="steps", save_steps=1)
    for folder in (tmp_path / "checkpoint-1" / "goft_adapter", tmp_path / "goft_adapter"):
        assert json.loads((folder / goft.io.CONFIG_NAME).read_text())["adapter_name"] == "other"
    assert goft.active_adapter(model) == "default"


def test_save_adapter_callback_refusals(tmp_path):
    for bad in ("", "/abs/path", os.path.join("..", "outside"), ".", "./"):
        with pytest.raises(ValueError, match="subfolder must be a relative folder name"):
            SaveAdapterCallback(subfolder=bad)
    with pytest.raises(ValueError, match="no goft layers"):
        run_trainer(build("llama"), str(tmp_path), [SaveAdapterCallback()])
    # An adapter the first checkpoint could not save is refused before the first step.
    model = qgoft_model()
    with pytest.raises(ValueError, match=r"SaveAdapterCallback: the model has no adapter 'defualt' to save; "
                                         r"adapters are \['default'\]"):
        run_trainer(model, str(tmp_path / "typo"), [SaveAdapterCallback(adapter_name="defualt")],
                    save_strategy="steps", save_steps=1)
    goft.set_adapter(model, None)
    with pytest.raises(ValueError, match=r"SaveAdapterCallback: the model has no active adapter"):
        run_trainer(model, str(tmp_path / "none"), [SaveAdapterCallback()], save_strategy="steps", save_steps=1)
    assert not any(name.startswith("checkpoint-") for run in ("typo", "none") if (tmp_path / run).exists()
                   for name in os.listdir(tmp_path / run))


def test_save_adapter_callback_saves_into_each_trials_checkpoints_under_hyperparameter_search(tmp_path):
    # Trainer.hyperparameter_search gives each trial a folder of its own; the callback is told its
    # name only through hp_name, and refuses to guess without it.
    pytest.importorskip("optuna")  # the test extra installs it: transformers' default search backend

    def search(out, **options):
        settings = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, optim="sgd",
                        learning_rate=LR, report_to="none", use_cpu=True, save_strategy="steps", save_steps=1,
                        disable_tqdm=True, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = transformers.Trainer(model_init=qgoft_model, args=transformers.TrainingArguments(**settings),
                                           train_dataset=rows(), eval_dataset=rows(1), callbacks=[SaveAdapterCallback()])
            trainer.hyperparameter_search(
                hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2)},
                compute_objective=lambda metrics: 0.0, n_trials=2, backend="optuna", **options)

    search(tmp_path / "named", hp_name=lambda trial: f"trial-{trial.number}")
    for trial in ("trial-0", "trial-1"):
        for folder in ("checkpoint-1", "checkpoint-2", "."):
            adapter = tmp_path / "named" / trial / folder / "goft_adapter"
            goft.load_adapter(build("llama"), str(adapter))
    assert not (tmp_path / "named" / "checkpoint-1").exists() and not (tmp_path / "named" / "goft_adapter").exists()
    with pytest.raises(ValueError, match=r"SaveAdapterCallback: under Trainer.hyperparameter_search .* pass hp_name"):
        search(tmp_path / "unnamed")
    assert not any(p.name == "goft_adapter" for p in (tmp_path / "unnamed").rglob("*"))
    # Refused when training begins, before the first step: no trial trains to lose its adapter.
    assert not any(p.name.startswith("checkpoint-") for p in (tmp_path / "unnamed").rglob("*"))


def test_resuming_from_a_checkpoint_continues_the_same_training(tmp_path):
    # Trainer's checkpoints hold the injected model's state dict (adapters included) and the
    # optimizer; a fresh process injects the same adapter and resumes from one of them.
    settings = dict(max_steps=4, gradient_accumulation_steps=1, save_strategy="steps", save_steps=2,
                    optim="adamw_torch", learning_rate=0.05)
    start = qgoft_model()
    straight = copy.deepcopy(start)
    run_trainer(straight, str(tmp_path / "straight"), [OrthogonalityPenaltyCallback()], **settings)
    resumed = build("llama")
    goft.inject(resumed, variant="qgoft", orth_lambda=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(
            model=resumed, train_dataset=rows(), callbacks=[OrthogonalityPenaltyCallback()],
            args=transformers.TrainingArguments(
                output_dir=str(tmp_path / "resumed"), per_device_train_batch_size=2, weight_decay=0.0, max_grad_norm=0.0,
                lr_scheduler_type="constant", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, **settings))
        trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    trained = dict(straight.named_parameters())
    adapted = [n for n, _ in resumed.named_parameters() if ".goft_" in n]
    assert adapted and any(not torch.equal(trained[n], start.get_parameter(n)) for n in adapted)
    for name in adapted:
        torch.testing.assert_close(resumed.get_parameter(name), trained[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_quantized_base_sets_transformers_flag_inside_the_block_only():
    """The flag means "PEFT adapters are loaded" to transformers elsewhere; a value the model had
    comes back, and a model with nothing to train is refused before Trainer sees it."""
    from goft.trainer import quantized_base

    model = build("llama")
    goft.inject(model)
    for before in (False, True):
        model._hf_peft_config_loaded = before
        with quantized_base(model):
            assert model._hf_peft_config_loaded is True
        assert model.__dict__["_hf_peft_config_loaded"] is before
    del model._hf_peft_config_loaded
    with pytest.raises(RuntimeError, match="inside"):
        with quantized_base(model):
            raise RuntimeError("inside")
    assert "_hf_peft_config_loaded" not in model.__dict__, "left set after an error in the block"
    goft.set_adapter(model, None)
    with pytest.raises(ValueError, match="quantized_base: the model has nothing to train"):
        with quantized_base(model):
            pass
    assert "_hf_peft_config_loaded" not in model.__dict__
