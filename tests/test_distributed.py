"""Two-process training with torch.distributed (gloo, launched by torchrun): DDP, FSDP2 and FSDP1 match one process on the same global batch.

Run directly by torchrun as the worker script: ``torchrun --standalone --nproc-per-node 2 tests/test_distributed.py OUT``.
"""

import contextlib
import gc
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
from torch import nn

import goft

WORLD = 2
GLOBAL_BATCH, SEQ, STEPS = 8, 8, 3

# name -> (model, GOFTConfig overrides, optimizer, engine). Between them: strict GOFT with the
# GOFT* scale and a trainable classification head (SGD with momentum), qGOFT with its penalty
# (AdamW), each under DistributedDataParallel, qGOFT under FSDP2's fully_shard (its penalty in the
# loss, or added by goft.trainer's callback as Trainer would under FSDP2), strict GOFT with the
# scale under FSDP1's FullyShardedDataParallel, qGOFT under Accelerate (which picks DDP for a
# multi-process CPU run), and qGOFT in transformers.Trainer with goft.trainer's callbacks (the
# penalty, the adapter in each checkpoint) and gradient accumulation.
SCENARIOS = {
    "ddp-bert-goft-scale-sgd": ("bert", {"scale": True, "modules_to_save": ["classifier"]}, "sgd", "ddp"),
    "ddp-llama-qgoft-adamw": ("llama", {"variant": "qgoft", "orth_lambda": 0.5}, "adamw", "ddp"),
    "fsdp2-llama-qgoft-adamw": ("llama", {"variant": "qgoft", "orth_lambda": 0.5}, "adamw", "fsdp2"),
    "fsdp2-llama-qgoft-callback-adamw": ("llama", {"variant": "qgoft", "orth_lambda": 0.5}, "adamw", "fsdp2+callback"),
    "fsdp1-llama-goft-scale-adamw": ("llama", {"scale": True, "modules_to_save": ["lm_head"]}, "adamw", "fsdp1"),
    "accelerate-llama-qgoft-adamw": ("llama", {"variant": "qgoft", "orth_lambda": 0.5}, "adamw", "accelerate"),
    "trainer-llama-qgoft-sgd": ("llama", {"variant": "qgoft", "orth_lambda": 0.5}, "sgd", "trainer"),
    "deepspeed-zero3-llama-goft-scale-adamw": ("llama", {"scale": True, "modules_to_save": ["lm_head"]}, "adamw", "deepspeed"),
    "deepspeed-zero2-llama-qgoft-adamw": ("llama", {"variant": "qgoft", "orth_lambda": 0.5}, "adamw", "deepspeed-zero2"),
    "trainer-deepspeed-zero3-llama-goft-scale-adamw": ("llama", {"scale": True}, "adamw", "trainer+deepspeed"),
}
# What the scenarios of an engine need installed beyond torch and transformers.
NEEDS = {"accelerate": "accelerate", "deepspeed": "deepspeed", "deepspeed-zero2": "deepspeed", "trainer+deepspeed": "deepspeed"}

# DeepSpeed ZeRO-3 with every parameter partitioned (no persistence threshold), as the large
# parameters of a real model are; the loops' own torch optimizers, which DeepSpeed wraps.
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True}


def _model(kind: str, overrides) -> nn.Module:
    import transformers

    from tiny_models import HEADS, HIDDEN, INTERMEDIATE, LAYERS, VOCAB

    torch.manual_seed(0)
    sizes = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB)
    if kind == "bert":
        # No dropout: the single process and the two ranks would draw different masks.
        config = transformers.BertConfig(**sizes, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = transformers.BertForSequenceClassification(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes, num_key_value_heads=2))
    goft.inject(model, **overrides)
    return model.train()


def _batch(kind: str, step: int):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 100, (GLOBAL_BATCH, SEQ), generator=g)
    labels = ids.clone() if kind == "llama" else torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)
    return ids, labels


LR = {"sgd": 0.5, "adamw": 0.02}


def _optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR[name], momentum=0.9)
    return torch.optim.AdamW(params, lr=LR[name], weight_decay=0.01)


def _plain(model, make_optimizer):
    return model, make_optimizer(model), lambda loss: loss.backward()


def _ddp(model, make_optimizer):
    model = nn.parallel.DistributedDataParallel(model)
    return model, make_optimizer(model), lambda loss: loss.backward()


def _fsdp2(model, make_optimizer):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    # After sharding: fully_shard replaces the parameters by DTensors the optimizer must hold.
    return model, make_optimizer(model), lambda loss: loss.backward()


def _fsdp1(model, make_optimizer):
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    # Each decoder layer a unit of its own, the rest in the root; use_orig_params, as the
    # adapter's parameters train and the base's are frozen.
    layer_type = type(model.model.layers[0])
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer_type})
    model = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    return model, make_optimizer(model), lambda loss: loss.backward()


def _accelerate(model, make_optimizer):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, make_optimizer(model))
    return model, optimizer, accelerator.backward


class _EngineSteps:
    """The optimizer calls of the training loop, for DeepSpeed, whose engine steps the optimizer
    and clears the gradients itself."""

    def __init__(self, engine):
        self.engine = engine

    def step(self):
        self.engine.step()

    def zero_grad(self):
        pass


def _deepspeed(model, make_optimizer, zero):
    import deepspeed

    config = {**zero, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD, "gradient_accumulation_steps": 1}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model), config=config)
    return engine, _EngineSteps(engine), engine.backward


def _deepspeed_zero3(model, make_optimizer):
    return _deepspeed(model, make_optimizer, ZERO3)


def _deepspeed_zero2(model, make_optimizer):
    # Parameters stay whole (gradients and optimizer states are partitioned): qGOFT's penalty
    # goes into the loss as in any loop.
    return _deepspeed(model, make_optimizer, {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True})


def _whole_under_zero3(params):
    """A context in which DeepSpeed ZeRO-3 parameters are whole on every rank (no-op for others)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


ENGINES = {"ddp": _ddp, "fsdp2": _fsdp2, "fsdp2+callback": _fsdp2, "fsdp1": _fsdp1, "accelerate": _accelerate,
           "deepspeed": _deepspeed_zero3, "deepspeed-zero2": _deepspeed_zero2}


def _train_with_trainer(model, make_optimizer, world: int, out_dir: str, deepspeed: bool = False) -> None:
    """STEPS optimizer steps of transformers.Trainer over the global batch of step 0 (every step
    sees all GLOBAL_BATCH rows, so the sampler's order cannot matter), two micro-batches per step
    and rank; the penalty by goft.trainer.OrthogonalityPenaltyCallback, the adapter written into
    the last checkpoint by SaveAdapterCallback. With ``deepspeed`` (several ranks only), under
    DeepSpeed ZeRO-3 and without the penalty's callback, which refuses DeepSpeed; Trainer then
    builds its own AdamW from the arguments, in one process too (under DeepSpeed it ignores an
    optimizer passed in), so ``make_optimizer`` is not used."""
    import transformers

    from goft.trainer import OrthogonalityPenaltyCallback, SaveAdapterCallback

    ids, labels = _batch("llama", 0)
    rows = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world // 2,
        gradient_accumulation_steps=2, report_to="none", use_cpu=True, save_strategy="steps",
        save_steps=STEPS, disable_tqdm=True, seed=0, ddp_backend="gloo" if world > 1 else None,
        learning_rate=LR["adamw"], weight_decay=0.01,
        # "auto": Trainer's own values, max_grad_norm's clipping included, as without DeepSpeed.
        deepspeed={**ZERO3, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "gradient_clipping": "auto"}
        if deepspeed and world > 1 else None)
    callbacks = [SaveAdapterCallback()] if deepspeed else [OrthogonalityPenaltyCallback(), SaveAdapterCallback()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizers = (None, None) if deepspeed else (make_optimizer(model), None)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, optimizers=optimizers, callbacks=callbacks)
        assert trainer.args.world_size == world, "Trainer must train on every rank of the process group"
        trainer.train()


def _train(name: str, rank: int = 0, world: int = 1, engine=_plain, save_to=None) -> dict:
    """STEPS steps on GLOBAL_BATCH rows split evenly over ``world`` ranks; the trained parameters.

    With ``save_to`` the adapter is saved there too: by rank 0 (replicas), or by every rank for
    FSDP2 and FSDP1, whose save gathers the shards.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    from goft.inject import plain_module_name
    from goft.trainer import OrthogonalityPenaltyCallback

    kind, overrides, optimizer_name, engine_name = SCENARIOS[name]
    model = inner = _model(kind, overrides)

    def make_optimizer(m):
        return _optimizer(optimizer_name, [p for p in m.parameters() if p.requires_grad])

    if engine_name.startswith("trainer"):
        with tempfile.TemporaryDirectory() as scratch:
            checkpoints = save_to or scratch
            _train_with_trainer(model, make_optimizer, world, checkpoints, deepspeed=engine_name.endswith("+deepspeed"))
            if save_to is not None and rank == 0:  # the adapter where the other scenarios save theirs
                shutil.copytree(os.path.join(checkpoints, f"checkpoint-{STEPS}", "goft_adapter"), save_to,
                                dirs_exist_ok=True)
        trained = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        with _whole_under_zero3([p for _, p in trained]):
            return {n: p.detach().clone() for n, p in trained}
    model, optimizer, backward = engine(model, make_optimizer)
    # The penalty through the callback where the scenario says so (only with several ranks: the
    # single process it is compared with puts it in the loss).
    callback = OrthogonalityPenaltyCallback() if engine_name.endswith("+callback") and engine is not _plain else None
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for step in range(STEPS):
        ids, labels = _batch(kind, step)
        # Every rank has as many rows (and tokens) as the others, so the mean of the ranks' mean
        # losses (what DDP and FSDP average the gradients to) is the loss of the global batch.
        loss = model(input_ids=ids[rows], labels=labels[rows]).loss
        backward(loss if callback else loss + goft.orthogonality_penalty(inner))
        if callback:
            callback.on_pre_optimizer_step(None, None, None, model=inner)
        optimizer.step()
        optimizer.zero_grad()
    full = {}
    # FSDP1 keeps flat shards outside forward; its context gathers them (no-op otherwise).
    fsdp1 = isinstance(model, FullyShardedDataParallel)
    with FullyShardedDataParallel.summon_full_params(model, writeback=False) if fsdp1 else contextlib.nullcontext(), \
            _whole_under_zero3(list(inner.parameters())):
        for param_name, param in inner.named_parameters():
            if param.requires_grad:
                value = param.full_tensor() if hasattr(param, "full_tensor") else param
                full[plain_module_name(param_name)] = value.detach().clone()
    if save_to is not None and (rank == 0 or engine in (_fsdp2, _fsdp1, _deepspeed_zero3)):
        goft.save_adapter(model if fsdp1 else inner, save_to)
    return full


def _recorder(results: dict):
    """record(call, run): runs ``run`` and stores under ``call`` its ValueError's message, or "no error"."""

    def record(call, run):
        try:
            run()
            results[call] = "no error"
        except ValueError as e:
            results[call] = str(e)

    return record


def _fsdp1_refusals(out_dir: str) -> dict:
    """What each goft call that needs whole parameters says about a qGOFT model under FSDP1,
    outside forward (where its parameters are flat shards): {call: error message, or "no error"}.
    Wrapped with a unit per decoder layer, and as one unit (named_modules then shows no wrapper)."""
    import types

    from goft.trainer import OrthogonalityPenaltyCallback, SaveAdapterCallback

    results = {}
    record = _recorder(results)

    model = _model("llama", {"variant": "qgoft", "orth_lambda": 0.5})
    goft.save_adapter(model, os.path.join(out_dir, "fsdp1-refusals-adapter"))
    counts = {"before wrapping": goft.count_parameters(model)}
    wrapped, _, _ = _fsdp1(model, lambda m: None)
    counts["the wrapper"] = goft.count_parameters(wrapped)
    args = types.SimpleNamespace(fp16=False, deepspeed=None)
    record("orthogonality_penalty", lambda: goft.orthogonality_penalty(model))
    record("merge", lambda: goft.merge(model))
    record("save_adapter of the inner model", lambda: goft.save_adapter(model, os.path.join(out_dir, "unused")))
    record("inject", lambda: goft.inject(model, adapter_name="second"))
    record("count_parameters of the inner model", lambda: goft.count_parameters(model))
    record("OrthogonalityPenaltyCallback", lambda: OrthogonalityPenaltyCallback().on_train_begin(args, None, None, model=model))
    record("SaveAdapterCallback", lambda: SaveAdapterCallback().on_train_begin(args, None, None, model=model))
    # The wrapped model still trains and saves (every rank gathers, rank 0 writes).
    goft.save_adapter(wrapped, os.path.join(out_dir, "fsdp1-refusals-resaved"))

    from torch.distributed.fsdp import FullyShardedDataParallel

    plain = _model("llama", {})
    goft.unload(plain)
    FullyShardedDataParallel(plain, use_orig_params=True, device_id=torch.device("cpu"))  # one unit
    record("inject into a model wrapped as one unit", lambda: goft.inject(plain, target_modules=["q_proj"]))
    record("load_adapter into a model wrapped as one unit",
           lambda: goft.load_adapter(plain, os.path.join(out_dir, "fsdp1-refusals-adapter")))
    one_unit = _model("llama", {})
    with torch.no_grad():  # the same values on every rank: one seed
        generator = torch.Generator().manual_seed(7)
        for param in (p for n, p in one_unit.named_parameters() if ".goft_" in n):
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    goft.save_adapter(one_unit, os.path.join(out_dir, "fsdp1-one-unit-before"))
    one_unit_wrapped = FullyShardedDataParallel(one_unit, use_orig_params=True, device_id=torch.device("cpu"))
    record("SaveAdapterCallback, one unit", lambda: SaveAdapterCallback().on_train_begin(args, None, None, model=one_unit))
    goft.save_adapter(one_unit_wrapped, os.path.join(out_dir, "fsdp1-one-unit-after"))  # gathers the root unit
    counts["the one-unit wrapper"] = goft.count_parameters(one_unit_wrapped)
    return {"refusals": results, "counts": counts}


def _under_zero3(out_dir: str) -> dict:
    """goft with DeepSpeed ZeRO-3, every parameter partitioned: a base model built under
    deepspeed.zero.Init (as from_pretrained builds it under a ZeRO-3 config) takes an adapter with
    a trained-looking head, then deepspeed.initialize takes the model. Returns {"facts": what was
    found, "refusals": {call: error message, or "no error"}}."""
    import deepspeed
    import torch.distributed as dist
    import transformers

    from tiny_models import HEADS, HIDDEN

    rank = dist.get_rank()
    config = {**ZERO3, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD, "gradient_accumulation_steps": 1}
    facts, refusals = {}, {}
    record = _recorder(refusals)

    # The adapter: random values, the same on every rank, and the head in modules_to_save.
    plain = _model("llama", {"modules_to_save": ["lm_head"]})
    with torch.no_grad():
        generator = torch.Generator().manual_seed(11)
        for param in (p for _, p in plain.named_parameters() if p.requires_grad):
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    saved = os.path.join(out_dir, f"zero3-adapter.rank{rank}")
    goft.save_adapter(plain, saved)
    facts["counts, plain"] = goft.count_parameters(plain)

    with deepspeed.zero.Init(config_dict_or_path=config):
        base = goft.unload(_model("llama", {}))
    facts["base weight shape before inject"] = tuple(base.model.layers[0].self_attn.q_proj.weight.shape)
    goft.load_adapter(base, saved)  # wraps partitioned layers; the head is gathered to be set
    facts["counts, zero.Init model with the adapter"] = goft.count_parameters(base)
    engine, _, _, _ = deepspeed.initialize(model=base, optimizer=torch.optim.AdamW(
        [p for p in base.parameters() if p.requires_grad], lr=LR["adamw"]), config=config)
    facts["adapter shape after initialize"] = tuple(base.model.layers[0].self_attn.q_proj.goft_angles["default"].shape)
    facts["counts, after initialize"] = goft.count_parameters(base)
    resaved = os.path.join(out_dir, "zero3-resaved")
    goft.save_adapter(base, resaved)  # every rank gathers, rank 0 writes
    record("save_adapter of the engine", lambda: goft.save_adapter(engine, os.path.join(out_dir, "unused")))
    record("merge", lambda: goft.merge(base))
    record("inject after initialize", lambda: goft.inject(base, adapter_name="second"))
    record("load_adapter after initialize", lambda: goft.load_adapter(base, saved, adapter_name="second"))

    quasi = _model("llama", {"variant": "qgoft", "orth_lambda": 0.5})
    deepspeed.initialize(model=quasi, optimizer=torch.optim.AdamW(
        [p for p in quasi.parameters() if p.requires_grad], lr=LR["adamw"]), config=config)
    record("orthogonality_penalty", lambda: goft.orthogonality_penalty(quasi))
    # Every parameter under the persistence threshold: whole on every rank, still DeepSpeed's.
    persistent = _model("llama", {})
    persistent_engine, _, _, _ = deepspeed.initialize(model=persistent, optimizer=torch.optim.AdamW(
        [p for p in persistent.parameters() if p.requires_grad], lr=LR["adamw"]),
        config={**config, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10**9}})
    ids, labels = _batch("llama", 0)
    persistent_engine.backward(persistent_engine(input_ids=ids, labels=labels).loss)  # gathers them for good
    persistent_engine.step()
    facts["persistent weight shape"] = tuple(persistent.model.layers[0].self_attn.q_proj.weight.shape)
    record("merge, whole parameters", lambda: goft.merge(persistent))

    # GPT-2's Conv1D keeps its weight (in, out): the width comes from the whole shape.
    with deepspeed.zero.Init(config_dict_or_path=config):
        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=HIDDEN, n_layer=1, n_head=HEADS, vocab_size=100))
    goft.inject(gpt2)
    facts["gpt2 widths"] = {n: m.in_features for n, m in gpt2.named_modules() if isinstance(m, goft.GivensLinear)}
    return {"facts": facts, "refusals": refusals}


def _bfloat16_under_fsdp(out_dir: str) -> dict:
    """How each FSDP takes a bfloat16 LLaMA with goft's float32 adapters, and what goft.merge says
    of the FSDP2-sharded one: {case: outcome}."""
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision

    ids, labels = _batch("llama", 0)
    outcomes = {}

    def step(model):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        # FSDP1 keeps gradients sharded like the parameters; its context shows them whole.
        fsdp1 = isinstance(model, FullyShardedDataParallel)
        with FullyShardedDataParallel.summon_full_params(model, with_grads=True) if fsdp1 else contextlib.nullcontext():
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            return "trained" if grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads) else "no gradients"

    bf16 = _model("llama", {}).to(torch.bfloat16)
    for adapter_param in (p for n, p in bf16.named_parameters() if ".goft_" in n):
        adapter_param.data = adapter_param.data.float()  # as inject makes them on a bf16 model
    try:
        FullyShardedDataParallel(bf16, use_orig_params=True, device_id=torch.device("cpu"))
        outcomes["fsdp1, bfloat16 model"] = "wrapped"
    except ValueError as e:
        outcomes["fsdp1, bfloat16 model"] = str(e)
    mixed = FullyShardedDataParallel(_model("llama", {}), use_orig_params=True, device_id=torch.device("cpu"),
                                     mixed_precision=MixedPrecision(param_dtype=torch.bfloat16))
    outcomes["fsdp1, float32 model, bfloat16 compute"] = step(mixed)
    from torch.distributed.fsdp import fully_shard

    sharded = _model("llama", {}).to(torch.bfloat16)
    goft.unload(sharded)
    goft.inject(sharded)  # float32 adapters on the bfloat16 base
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    outcomes["fsdp2, bfloat16 model"] = step(sharded)
    goft.save_adapter(sharded, os.path.join(out_dir, "fsdp2-bfloat16-adapter"))
    try:
        goft.merge(sharded)
        outcomes["fsdp2, merge"] = "merged"
    except ValueError as e:
        outcomes["fsdp2, merge"] = str(e)
    return outcomes


def _worker(out_dir: str) -> None:
    import faulthandler

    import torch.distributed as dist

    # An abort in C++ (gloo, c10d) then shows where each rank was in Python.
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, (_, _, _, engine) in SCENARIOS.items():
        if engine in NEEDS and importlib.util.find_spec(NEEDS[engine]) is None:
            continue
        trained = _train(name, rank, world, ENGINES.get(engine), save_to=os.path.join(out_dir, name))
        torch.save(trained, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
        # The DDP, FSDP and Accelerate wrappers sit in reference cycles that hold the process
        # group; free them now, while the group and the interpreter are whole.
        gc.collect()
    torch.save(_fsdp1_refusals(out_dir), os.path.join(out_dir, f"fsdp1-refusals.rank{rank}.pt"))
    gc.collect()
    torch.save(_bfloat16_under_fsdp(out_dir), os.path.join(out_dir, f"bfloat16.rank{rank}.pt"))
    gc.collect()
    if importlib.util.find_spec("deepspeed") is not None:
        torch.save(_under_zero3(out_dir), os.path.join(out_dir, f"zero3.rank{rank}.pt"))
        gc.collect()
    dist.barrier()
    # Every rank leaves gloo's barrier once its peers' messages reached it, not its own: a rank
    # that closed its connections right away could fail a peer still finishing the barrier
    # (pytorch/gloo#155). So the ranks meet once more through the launcher's store, which is no
    # gloo connection, before any of them closes.
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    if store.add("goft-test-finished", 1) == world:
        store.set("goft-test-all-finished", "1")
    store.wait(["goft-test-all-finished"])
    dist.destroy_process_group()


def _killed_by_a_signal(launcher_stderr: str) -> bool:
    """Whether torchrun's failure report gives a signal (a negative exit code) as the root cause."""
    root_cause = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", launcher_stderr, re.DOTALL)
    return root_cause is not None and int(root_cause.group(1)) < 0


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    pytest.importorskip("transformers")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a rendezvous on a free localhost port, so parallel CI jobs cannot collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", __file__, str(out)]
    for attempt in range(2):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=os.path.dirname(__file__))
        output = done.stdout[-3000:] + done.stderr[-6000:]
        # A rank killed by a signal inside torch.distributed's C++ (rare: one launch in many
        # aborted with "terminate called without an active exception") gets one more launch;
        # the first one's output stays in the report. A failing check or a Python error in a
        # rank, or a second abort, fails.
        if done.returncode == 0 or attempt == 1 or not _killed_by_a_signal(done.stderr):
            break
        warnings.warn(f"the two-process launch aborted and was run again; its output:\n{output}")
    assert done.returncode == 0, output
    return out


def _results(out, name):
    if not (out / f"{name}.rank0.pt").exists():
        pytest.skip(f"{NEEDS.get(SCENARIOS[name][3], SCENARIOS[name][3])} is not installed")
    return [torch.load(out / f"{name}.rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_match_one_process_on_the_global_batch(two_process_results, name):
    ranks = _results(two_process_results, name)
    single = _train(name)
    untrained = {k: v for k, v in _model(*SCENARIOS[name][:2]).named_parameters() if v.requires_grad}
    assert any(".goft_" in key for key in single) and set(single) == set(untrained)
    optimizer = SCENARIOS[name][2]
    # Only the order of float32 sums differs (one mean over 8 rows vs the average of two means
    # over 4). SGD passes that rounding through as is; Adam divides each gradient by its running
    # RMS, which for a near-zero entry magnifies it, so there the bound is 0.1% of one step.
    atol = 1e-6 if optimizer == "sgd" else 1e-3 * LR[optimizer]
    for rank, trained in enumerate(ranks):
        assert set(trained) == set(single)
        for key, value in single.items():
            assert not torch.equal(value, untrained[key]), f"{key} did not train"
            torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=atol, msg=lambda m: f"rank {rank}, {key}: {m}")
    # The replicas (DDP) or the gathered shards (FSDP2) agree exactly across ranks.
    assert all(torch.equal(ranks[0][key], other[key]) for other in ranks[1:] for key in single)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_adapter_saved_by_the_distributed_run_loads_exactly(two_process_results, name):
    trained = _results(two_process_results, name)[0]
    kind, overrides = SCENARIOS[name][:2]
    fresh = _model(kind, {})
    goft.unload(fresh)  # the same frozen base, no adapter
    goft.load_adapter(fresh, str(two_process_results / name))
    loaded = {k: v for k, v in fresh.named_parameters() if v.requires_grad}
    assert set(loaded) == set(trained)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)


FSDP1_FLAT = r"has shape \(\d+,\), expected \(31, 2, 2\): FullyShardedDataParallel \(FSDP1\) keeps parameters flattened"
FSDP1_REFUSALS = {
    "orthogonality_penalty": rf"goft.orthogonality_penalty: .*{FSDP1_FLAT}.*fsdp_version': 2",
    "merge": rf"goft.merge: .*{FSDP1_FLAT}.*merge a plain model",
    "save_adapter of the inner model": r"goft.save_adapter: model.layers.0 is a FullyShardedDataParallel unit inside the model passed; "
                                       r"call goft.save_adapter on every rank with the FullyShardedDataParallel-wrapped model itself",
    "inject": r"goft.inject: model.layers.0 is wrapped by FullyShardedDataParallel; add goft adapters to the plain model first",
    "count_parameters of the inner model": r"count_parameters: model.embed_tokens.weight is a shard \(FullyShardedDataParallel "
                                           r"\(FSDP1\).*pass the outermost FullyShardedDataParallel wrapper",
    "OrthogonalityPenaltyCallback": rf"goft.trainer.OrthogonalityPenaltyCallback: goft.orthogonality_penalty: .*{FSDP1_FLAT}",
    "SaveAdapterCallback": r"goft.trainer.SaveAdapterCallback: the model is sharded by FSDP1 .*fsdp_version': 2.*"
                           r"goft.save_adapter\(trainer.model, dir\) on every rank",
    "inject into a model wrapped as one unit": r"goft.inject: parameter model.embed_tokens.weight is flattened and sharded by "
                                               r"FullyShardedDataParallel \(FSDP1\); add goft adapters to the plain model first",
    "load_adapter into a model wrapped as one unit": r"goft.load_adapter\(.*\): parameter model.embed_tokens.weight is flattened and "
                                                     r"sharded by FullyShardedDataParallel",
    "SaveAdapterCallback, one unit": r"goft.trainer.SaveAdapterCallback: the model is sharded by FSDP1",
}


@pytest.mark.parametrize("rank", range(WORLD))
def test_calls_that_need_whole_parameters_refuse_fsdp1_shards_by_name(two_process_results, rank):
    # Outside forward, FSDP1 leaves each rank a flat shard of every parameter (empty on some):
    # a penalty, merge or file computed from it would be wrong without an error.
    recorded = torch.load(two_process_results / f"fsdp1-refusals.rank{rank}.pt")
    found = recorded["refusals"]
    assert set(found) == set(FSDP1_REFUSALS)
    for call, pattern in FSDP1_REFUSALS.items():
        assert re.search(pattern, found[call]), f"{call}: {found[call]}"
    # What the wrapped models saved (all ranks gathering) is the adapter each was given: with a
    # unit per decoder layer, and as one unit.
    for before_name, after_name in [("fsdp1-refusals-adapter", "fsdp1-refusals-resaved"),
                                    ("fsdp1-one-unit-before", "fsdp1-one-unit-after")]:
        before = goft.load_adapter(goft.unload(_model("llama", {})), str(two_process_results / before_name))
        after = goft.load_adapter(goft.unload(_model("llama", {})), str(two_process_results / after_name))
        expected = {k: v for k, v in before.named_parameters() if v.requires_grad}
        found = {k: v for k, v in after.named_parameters() if v.requires_grad}
        assert set(found) == set(expected) and all(torch.equal(v, expected[k]) for k, v in found.items()), after_name


@pytest.mark.parametrize("rank", range(WORLD))
def test_parameter_counts_of_an_fsdp1_wrapper_are_the_whole_models(two_process_results, rank):
    # Each rank holds a shard of every parameter (about half here), yet a count is of the model.
    counts = torch.load(two_process_results / f"fsdp1-refusals.rank{rank}.pt")["counts"]
    assert counts["the wrapper"] == counts["before wrapping"]
    assert counts["the one-unit wrapper"] == goft.count_parameters(_model("llama", {}))


ZERO3_REFUSALS = {
    "save_adapter of the engine": r"goft.save_adapter: DeepSpeedEngine wraps the injected model; pass the wrapped model \(model.module",
    "merge": r"goft.merge: parameter goft_angles.default of layer model.layers.0.self_attn.q_proj has shape \(0,\), "
             r"expected \(31,\): DeepSpeed ZeRO-3 partitions parameters .*merge a plain model",
    "merge, whole parameters": r"goft.merge: the weight of layer model.layers.0.self_attn.q_proj is managed by DeepSpeed ZeRO-3 "
                               r".*merge a plain model",
    "inject after initialize": r"goft.inject: the model is already taken by deepspeed.initialize; add goft adapters to the plain model first",
    "load_adapter after initialize": r"goft.load_adapter\(.*\): the model is already taken by deepspeed.initialize",
    "orthogonality_penalty": r"goft.orthogonality_penalty: parameter goft_blocks.default of layer model.layers.0.self_attn.q_proj has "
                             r"shape \(0,\), expected \(31, 2, 2\): DeepSpeed ZeRO-3 partitions parameters .*ZeRO stage 1 or 2",
}


@pytest.mark.parametrize("rank", range(WORLD))
def test_deepspeed_zero3_partitions_are_gathered_to_load_and_save_and_refused_elsewhere(two_process_results, rank):
    if not (two_process_results / f"zero3.rank{rank}.pt").exists():
        pytest.skip("deepspeed is not installed")
    from tiny_models import HIDDEN

    found = torch.load(two_process_results / f"zero3.rank{rank}.pt")
    facts, refusals = found["facts"], found["refusals"]
    assert set(refusals) == set(ZERO3_REFUSALS)
    for call, pattern in ZERO3_REFUSALS.items():
        assert re.search(pattern, refusals[call]), f"{call}: {refusals[call]}"
    # The base was partitioned before the adapter came, and so was the adapter after initialize;
    # the counts are the whole model's throughout.
    assert facts["base weight shape before inject"] == (0,) and facts["adapter shape after initialize"] == (0,)
    assert facts["persistent weight shape"] == (HIDDEN, HIDDEN)
    assert facts["counts, zero.Init model with the adapter"] == facts["counts, plain"]
    assert facts["counts, after initialize"] == facts["counts, plain"]
    assert facts["gpt2 widths"] and set(facts["gpt2 widths"].values()) <= {HIDDEN, 4 * HIDDEN}
    assert facts["gpt2 widths"]["transformer.h.0.mlp.c_proj"] == 4 * HIDDEN
    # What the partitioned model saved is what was loaded into it, the head included.
    loaded = goft.load_adapter(goft.unload(_model("llama", {})), str(two_process_results / f"zero3-adapter.rank{rank}"))
    resaved = goft.load_adapter(goft.unload(_model("llama", {})), str(two_process_results / "zero3-resaved"))
    expected = {k: v for k, v in loaded.named_parameters() if v.requires_grad}
    got = {k: v for k, v in resaved.named_parameters() if v.requires_grad}
    assert "lm_head.weight" in got and any(".goft_" in k for k in got)
    assert set(got) == set(expected) and all(torch.equal(v, expected[k]) for k, v in got.items())


@pytest.mark.parametrize("rank", range(WORLD))
def test_a_bfloat16_model_with_float32_adapters_under_fsdp(two_process_results, rank):
    # What the README tells FSDP users: FSDP1 needs one dtype per unit, so a float32 model with
    # bfloat16 MixedPrecision; FSDP2 keeps each parameter's dtype.
    found = torch.load(two_process_results / f"bfloat16.rank{rank}.pt")
    assert "Must flatten tensors with uniform dtype" in found["fsdp1, bfloat16 model"]
    assert found["fsdp1, float32 model, bfloat16 compute"] == "trained"
    assert found["fsdp2, bfloat16 model"] == "trained"
    assert re.match(r"goft.merge: layer model.layers.0.self_attn.q_proj is sharded \(FSDP2 fully_shard.*\); merge a plain model",
                    found["fsdp2, merge"])
    saved = json.loads((two_process_results / "fsdp2-bfloat16-adapter" / "adapter_config.json").read_text())
    assert {spec["dtype"] for spec in saved["tensors"].values()} == {"float32"}


@pytest.mark.parametrize("ending, by_a_signal", [("os.abort()", True), ("raise RuntimeError('a failing check')", False)])
def test_a_rank_killed_by_a_signal_is_told_apart_from_a_failing_rank(tmp_path, ending, by_a_signal):
    # The launch above is retried only in the first case, so the distinction is checked on
    # torchrun's real failure report.
    script = tmp_path / "rank.py"
    script.write_text(f"import os\nif os.environ['RANK'] == '1':\n    {ending}\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert _killed_by_a_signal(done.stderr) == by_a_signal, done.stderr[-3000:]


@pytest.fixture
def single_process_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("engine, message", [(_ddp, "is wrapped by DistributedDataParallel"), (_fsdp2, "is sharded")])
def test_adding_adapters_after_wrapping_is_refused(single_process_group, tmp_path, engine, message):
    # Adapter parameters added after the wrapper registered its parameters would never be
    # synchronised: every rank would train its own copy, silently.
    saved = _model("llama", {})
    goft.save_adapter(saved, str(tmp_path / "adapter"))
    from tiny_models import tiny_llama

    model = engine(tiny_llama(), lambda m: None)[0]
    with pytest.raises(ValueError, match=f"goft.inject: .*{message}.*add goft adapters to the plain model first"):
        goft.inject(model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=f"goft.load_adapter.*{message}"):
        goft.load_adapter(model, str(tmp_path / "adapter"))
    assert not any(isinstance(m, goft.GivensLinear) for m in model.modules())


def test_a_wrapper_passed_for_the_injected_model_says_to_unwrap(single_process_group, tmp_path):
    model = _ddp(_model("llama", {}), lambda m: None)[0]
    for call in (lambda: goft.save_adapter(model, str(tmp_path)), lambda: goft.merge(model)):
        with pytest.raises(ValueError, match=r"DistributedDataParallel wraps the injected model; pass the wrapped model \(model.module"):
            call()
    goft.save_adapter(model.module, str(tmp_path))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _worker(sys.argv[1])
