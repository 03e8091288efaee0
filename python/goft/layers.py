"""GivensLinear: the adapter layer that rotates a frozen layer's input, plus its merge/unmerge."""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from goft.config import GOFTConfig, check_adapter_name, type_and_value
from goft.ops import rotate, rotated_linear

__all__ = ["GivensLinear", "ADAPTER_PREFIX", "adapter_shapes", "input_width", "is_adaptable", "is_conv1d"]

# Every adapter parameter's name starts with this, so freezing and saving select them by name.
ADAPTER_PREFIX = "goft_"
# Whether GivensLinear._apply has warned about adapters cast to 16-bit floats (once per process).
_LOW_PRECISION_WARNED = False


def _weight_side_from_env() -> Optional[bool]:
    value = os.environ.get("GOFT_WEIGHT_SIDE", "").strip()
    if value in ("", "auto"):
        return None
    if value in ("0", "1"):
        return value == "1"
    raise ValueError(f"goft: GOFT_WEIGHT_SIDE must be 0, 1 or auto, got {value!r}")


# Where GivensLinear applies the transform when its base layer is a plain nn.Linear: to the
# weight's rows (goft.rotated_linear: x @ (W T^T)^T) or to x. None (GOFT_WEIGHT_SIDE unset or
# "auto"): to the weight for CUDA inputs with at least as many rows as the layer has outputs,
# where the GPU kernels then rotate fewer rows (bench/GPU_NOTES.md, v8), and to x on the CPU,
# where the rotation is a small part of the layer's time and the measured results were taken
# that way. True / False (GOFT_WEIGHT_SIDE=1 / 0): to the weight wherever it can / never; read
# once at import, so set the module attribute to change it at run time.
WEIGHT_SIDE: Optional[bool] = _weight_side_from_env()


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's Conv1D (GPT-2 style), whose weight is stored (in, out)."""
    # Looked up rather than imported: a Conv1D instance implies transformers is already loaded,
    # and goft must not pay transformers' import time (or need it installed) for anything else.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def is_adaptable(module: nn.Module) -> bool:
    """Whether GivensLinear can wrap ``module``: nn.Linear, Conv1D, or anything with in_features and weight.

    Lazy modules (nn.LazyLinear before its first forward) are not: their width is still unknown.
    """
    if isinstance(module, GivensLinear):
        return True
    weight = getattr(module, "weight", None)
    # A tensor: dynamically quantized linears (torch.ao) have a weight() method instead.
    if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
        return False
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    in_features = getattr(module, "in_features", None)
    return isinstance(in_features, int) and not isinstance(in_features, bool) and in_features >= 1


def input_width(module: nn.Module) -> int:
    """The width d of the input that the rotation acts on."""
    if is_conv1d(module):
        return whole_shape(module.weight)[0]
    if isinstance(getattr(module, "in_features", None), int):
        return module.in_features
    raise TypeError(
        f"goft: cannot adapt {type(module).__name__}: expected nn.Linear, transformers' Conv1D or a module "
        "with an integer in_features and a weight"
    )


def adapter_shapes(config: GOFTConfig, d: int) -> Dict[str, Tuple[int, ...]]:
    """The shape of each parameter of an adapter on input width ``d``, by store name."""
    pairs = max(d - 1, 0)
    if config.is_quasi:
        return {"goft_blocks": (pairs, 2, 2)}
    shapes = {"goft_angles": (pairs,)}
    if config.scale:
        shapes["goft_scale"] = (d,)
    return shapes


# FullyShardedDataParallel (FSDP1, use_orig_params=True) keeps each original parameter, outside
# forward, as this rank's part of a flattened, sharded copy: a 1-d view of any length, empty on
# some ranks. Anything computed from it there (a penalty, a saved file, a merge) would be wrong
# without an error, so the code that reads whole parameters checks their shapes first.
FLATTENED_BY_FSDP1 = "FullyShardedDataParallel (FSDP1) keeps parameters flattened and sharded outside forward"


def is_fsdp1_unit(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP1 ``FullyShardedDataParallel`` (named, so torch.distributed
    need not be imported to ask)."""
    return type(module).__name__ == "FullyShardedDataParallel"


def flattened_by_fsdp1(tensor: torch.Tensor) -> bool:
    """Whether FSDP1 manages ``tensor`` as part of a flat parameter (its mark on them)."""
    return bool(getattr(tensor, "_fsdp_flattened", False))


# DeepSpeed ZeRO-3 (deepspeed.initialize, or a model built under deepspeed.zero.Init, as
# transformers' from_pretrained does under a ZeRO-3 config) keeps each parameter, outside the
# forward of its module, as an empty tensor; this rank's partition and the whole shape
# (``ds_shape``) hang off it. goft gathers them where it must read them (save_adapter) and
# refuses them by name elsewhere.
PARTITIONED_BY_ZERO3 = "DeepSpeed ZeRO-3 partitions parameters across ranks outside forward"


def managed_by_zero3(tensor: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 manages ``tensor`` (its marks on them; deepspeed need not be imported)."""
    return hasattr(tensor, "ds_shape") and hasattr(tensor, "ds_id")


def whole_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape of the whole parameter, also while ZeRO-3 holds only a partition of it."""
    return tensor.ds_shape if managed_by_zero3(tensor) else tensor.shape


def whole_numel(tensor: torch.Tensor) -> int:
    """The whole parameter's number of elements (see whole_shape)."""
    return tensor.ds_numel if managed_by_zero3(tensor) else tensor.numel()


# What to do instead, for the calls that refuse such parameters.
PENALTY_UNDER_FSDP1 = (
    "qGOFT's penalty needs whole blocks: shard with FSDP2 (torch.distributed.fsdp.fully_shard; transformers.Trainer: "
    "fsdp_config={'fsdp_version': 2}) or train with DistributedDataParallel"
)
MERGE_UNSHARDED = "merge a plain model: goft.save_adapter, then goft.load_adapter into the unwrapped base model"
PENALTY_UNDER_ZERO3 = (
    "qGOFT's penalty needs whole blocks outside forward: train qGOFT with ZeRO stage 1 or 2, DDP or FSDP2, or "
    "strict GOFT (variant='goft', no penalty) under ZeRO-3"
)
# The ZeRO-3 counterpart of an FSDP1 remedy, where they differ.
ZERO3_REMEDIES = {PENALTY_UNDER_FSDP1: PENALTY_UNDER_ZERO3}


class GivensLinear(nn.Module):
    """Wraps a frozen layer as ``y = base_layer(rotate(x, params, scale))`` (Ma et al., ICML 2024).

    Holds any number of named adapters; one (``active_adapter``) is applied, or none while
    ``disabled``. Per adapter ``name`` the parameters, created float32 whatever the base dtype
    (the op's params are float32, and bf16 angles would lose the small updates of training; a
    later ``model.to(dtype)`` casts them like any parameter, with a warning for 16-bit floats, and
    adapter files hold float32), are:
        goft_angles[name]: (d-1,) strict GOFT; the angle is pi * tanh(p) or p
                           (config.angle_parameterisation); init 0 (identity).
        goft_blocks[name]: (d-1, 2, 2) qGOFT free blocks; init identity.
        goft_scale[name]:  (d,) GOFT* per-feature scale; init ones.

    Args:
        base_layer: nn.Linear (weight (out, in)), transformers' Conv1D (weight (in, out)), or any
            module with ``in_features`` and ``weight`` (e.g. quantized linears; no merging then).
            It is frozen: only adapter parameters train.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if isinstance(base_layer, GivensLinear):
            raise TypeError("GivensLinear: base_layer is a GivensLinear already; add adapters to it (add_adapter)")
        in_features = input_width(base_layer)  # refuses what cannot be adapted, before touching it
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features = in_features
        self.goft_angles = nn.ParameterDict()
        self.goft_blocks = nn.ParameterDict()
        self.goft_scale = nn.ParameterDict()
        self.adapter_configs: Dict[str, GOFTConfig] = {}
        self.active_adapter: Optional[str] = None
        self.disabled = False
        # Adapters merged into base_layer.weight, oldest first, with the exact op arguments
        # (params, scale, angle_parameterisation) used, so unmerge inverts what was applied even
        # if the parameters changed since.
        self.merged_adapters: List[str] = []
        self._merged_transforms: List[Tuple[torch.Tensor, Optional[torch.Tensor], str]] = []
        # The module's name in its model, set by goft.inject, so errors can say which layer failed.
        self.layer_name: Optional[str] = None

    # The spacing of each 16-bit dtype just below 1.0, where GOFT* scales and qGOFT diagonals start.
    _STEP_BELOW_ONE = {"bfloat16": "bfloat16 steps by 2^-8", "float16": "float16 steps by 2^-11"}

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) after goft.inject casts the adapters too. Trained in bfloat16 or
        # float16, an optimizer step below half their spacing rounds away: GOFT* scales and qGOFT's
        # block diagonals start at 1.0 (bfloat16 spacing 2^-8 just below), so at usual learning
        # rates they would never move while the loss still falls. Said once per process, where it
        # happens, since nothing fails later.
        global _LOW_PRECISION_WARNED
        module = super()._apply(fn, recurse)
        if not _LOW_PRECISION_WARNED:
            cast = sorted({str(p.dtype).replace("torch.", "") for store in (self.goft_angles, self.goft_blocks,
                           self.goft_scale) for p in store.values() if p.dtype in (torch.bfloat16, torch.float16)})
            if cast:
                _LOW_PRECISION_WARNED = True
                warnings.warn(
                    f"goft: a cast of the model made the adapter parameters {'/'.join(cast)}; trained so, "
                    "optimizer steps smaller than their rounding are lost (GOFT* scales and qGOFT blocks start at "
                    f"1.0, where {' and '.join(self._STEP_BELOW_ONE[d] for d in cast)}) unless the optimizer keeps "
                    "float32 master weights (DeepSpeed's bf16 mode does). To train, cast the model before goft.inject "
                    "(adapters are created float32), or the adapters back: for n, p in model.named_parameters(): "
                    "p.data = p.data.float() if '.goft_' in n else p.data",
                    stacklevel=2,
                )
        return module

    # Attribute pass-through, so code that reads e.g. ``q_proj.weight.dtype`` keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    @property
    def out_features(self) -> Optional[int]:
        if is_conv1d(self.base_layer):
            return self.base_layer.weight.shape[1]
        return getattr(self.base_layer, "out_features", None)

    @property
    def adapter_names(self) -> List[str]:
        return list(self.adapter_configs)

    def add_adapter(self, adapter_name: str, config: GOFTConfig) -> None:
        """Adds an identity-initialised adapter; it is not made active."""
        check_adapter_name(adapter_name, "GivensLinear.add_adapter")
        if not isinstance(config, GOFTConfig):
            raise TypeError(f"GivensLinear.add_adapter: expected config a GOFTConfig, got {type_and_value(config)}")
        if adapter_name in self.adapter_configs:
            raise ValueError(f"GivensLinear.add_adapter: adapter {adapter_name!r} already exists in this layer")
        shapes = adapter_shapes(config, self.in_features)
        device = self.base_layer.weight.device
        f32 = dict(device=device, dtype=torch.float32)
        if config.is_quasi:
            blocks = torch.eye(2, **f32).expand(shapes["goft_blocks"]).clone()
            self.goft_blocks[adapter_name] = nn.Parameter(blocks)
        else:
            self.goft_angles[adapter_name] = nn.Parameter(torch.zeros(shapes["goft_angles"], **f32))
            if config.scale:
                self.goft_scale[adapter_name] = nn.Parameter(torch.ones(shapes["goft_scale"], **f32))
        self.adapter_configs[adapter_name] = config

    def delete_adapter(self, adapter_name: str) -> None:
        self._require_adapter(adapter_name, "GivensLinear.delete_adapter")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"GivensLinear.delete_adapter: adapter {adapter_name!r} is merged; unmerge it first")
        for store in (self.goft_angles, self.goft_blocks, self.goft_scale):
            if adapter_name in store:
                del store[adapter_name]
        self.adapter_configs.pop(adapter_name, None)
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def set_adapter(self, adapter_name: Optional[str]) -> None:
        """Makes ``adapter_name`` the applied adapter (None: none) and the only trainable one."""
        if adapter_name is not None:
            self._require_adapter(adapter_name, "GivensLinear.set_adapter")
        self.active_adapter = adapter_name
        for store in (self.goft_angles, self.goft_blocks, self.goft_scale):
            for name, param in store.items():
                param.requires_grad_(name == adapter_name)

    def _require_adapter(self, adapter_name: str, where: str) -> None:
        if adapter_name not in self.adapter_configs:
            raise ValueError(f"{where}: no adapter {adapter_name!r} in this layer (has {self.adapter_names})")

    def adapter_parameters(self, adapter_name: str) -> Dict[str, nn.Parameter]:
        """The adapter's parameters keyed by store name ("goft_angles", ...)."""
        found = {}
        for store_name in ("goft_angles", "goft_blocks", "goft_scale"):
            store = getattr(self, store_name)
            if adapter_name in store:
                found[store_name] = store[adapter_name]
        return found

    def check_whole(self, adapter_name: str, where: str, remedy: str) -> None:
        """Raises ValueError unless every parameter of the adapter has its shape (see FLATTENED_BY_FSDP1).

        A sharded DTensor (FSDP2) has its global shape and passes; its values are gathered by
        whoever reads them."""
        for store_name, param in self.adapter_parameters(adapter_name).items():
            self._check_whole_parameter(adapter_name, store_name, param, where, remedy)

    def _check_whole_parameter(self, adapter_name: str, store_name: str, param: torch.Tensor, where: str, remedy: str) -> None:
        # Takes the parameter fetched by the caller: a ParameterDict lookup costs about as much as
        # the rest of the check, which runs for every layer in each step's penalty.
        shape = adapter_shapes(self.adapter_configs[adapter_name], self.in_features)[store_name]
        if param.shape != shape:
            layer = f" {self.layer_name}" if self.layer_name else ""
            why = f"{FLATTENED_BY_FSDP1}; {remedy}"
            if managed_by_zero3(param):
                why = f"{PARTITIONED_BY_ZERO3}; {ZERO3_REMEDIES.get(remedy, remedy)}"
            raise ValueError(
                f"{where}: parameter {store_name}.{adapter_name} of layer{layer} has shape {tuple(param.shape)}, "
                f"expected {shape}: {why}"
            )

    def op_arguments(self, adapter_name: str) -> Tuple[torch.Tensor, Optional[torch.Tensor], str]:
        """The op's (params, scale, angle_parameterisation) for an adapter, float32.

        Strict GOFT passes its stored parameters with the adapter's parameterisation, which the
        op maps to angles itself ("tanh": pi * tanh(p)), so the map costs no extra ops forward or
        backward; qGOFT passes its (d-1, 2, 2) blocks with "raw"."""
        config = self.adapter_configs.get(adapter_name)  # one lookup: this runs on every forward
        if config is None:
            self._require_adapter(adapter_name, "GivensLinear.op_arguments")
        if config.is_quasi:
            return self.goft_blocks[adapter_name].float(), None, "raw"
        scale = self.goft_scale[adapter_name].float() if adapter_name in self.goft_scale else None
        return self.goft_angles[adapter_name].float(), scale, config.angle_parameterisation

    def transform(self, adapter_name: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The adapter's (params, scale) as angles or blocks: (d-1,) angles or (d-1, 2, 2) blocks.

        The angles are mapped here in PyTorch (pi * tanh(p) for "tanh"), a reference for the
        op's own map that forward and merge use (op_arguments)."""
        params, scale, angle_parameterisation = self.op_arguments(adapter_name)
        angles = math.pi * torch.tanh(params) if angle_parameterisation == "tanh" else params
        return angles, scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active_adapter
        if self.disabled or name is None or name in self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        # The op would reject these too, but only in terms of its own arguments; say which layer.
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise RuntimeError(f"{self._where()}: expected input of shape (..., {self.in_features}), got {got}")
        if not x.is_floating_point():
            raise RuntimeError(f"{self._where()}: expected a floating-point input, got {x.dtype}")
        params, scale, angle_parameterisation = self.op_arguments(name)
        if (params.is_meta or (scale is not None and scale.is_meta)) and not x.is_meta:
            raise RuntimeError(
                f"{self._where()}: the adapter's parameters are on the meta device and hold no values: offloaded "
                "(accelerate's cpu_offload or disk offload, device_map entries 'cpu'/'disk' with hooks), which goft "
                "does not support, or never loaded"
            )
        if not args and not kwargs and self._rotates_weight(x):
            base = self.base_layer
            return rotated_linear(x, base.weight, base.bias, params, scale, angle_parameterisation)
        # rotate keeps x's dtype (bf16/fp16/fp32, float32 accumulation), so the base layer sees
        # the dtype it would have seen without goft, under autocast or with bf16 weights alike.
        return self.base_layer(rotate(x, params, scale, angle_parameterisation=angle_parameterisation), *args, **kwargs)

    def _rotates_weight(self, x: torch.Tensor) -> bool:
        """Whether forward computes base_layer(rotate(x)) as rotated_linear (see WEIGHT_SIDE).

        Only where that is the same computation: a plain nn.Linear with x's dtype and no hooks
        (which would miss the call), outside autocast (which would pick the matmul's dtype)."""
        if WEIGHT_SIDE is False or (WEIGHT_SIDE is None and not x.is_cuda):
            return False
        base = self.base_layer
        if type(base) is not nn.Linear or base.weight.dtype != x.dtype:
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks:
            return False
        if base._backward_pre_hooks:
            return False
        module_hooks = torch.nn.modules.module
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                     "_global_backward_pre_hooks"):
            if getattr(module_hooks, name, None):
                return False
        if WEIGHT_SIDE is None:
            return x.numel() >= x.shape[-1] * base.out_features
        return True

    def quasi_blocks(self) -> Optional[Tuple[torch.Tensor, float]]:
        """The active qGOFT adapter's (d-1, 2, 2) blocks (float32) and its lambda; None otherwise."""
        name = self.active_adapter
        if name is None or not self.adapter_configs[name].is_quasi:
            return None
        blocks = self.goft_blocks[name]
        self._check_whole_parameter(name, "goft_blocks", blocks, "goft.orthogonality_penalty", PENALTY_UNDER_FSDP1)
        return blocks.float(), self.adapter_configs[name].orth_lambda

    def orthogonality_penalty(self) -> Optional[torch.Tensor]:
        """lambda * sum_i <A_i[:,0], A_i[:,1]>^2 for an active qGOFT adapter; None otherwise."""
        found = self.quasi_blocks()
        return None if found is None else orthogonality_term(*found)

    def _where(self) -> str:
        layer = f" {self.layer_name}" if self.layer_name else ""
        return f"goft: layer{layer} (GivensLinear, in_features={self.in_features}, adapter {self.active_adapter!r})"

    # ---- merging (GOFT_SPEC.md section 5) ----

    @torch.no_grad()
    def check_mergeable(self, adapter_name: str, invertible: bool = True, where: str = "goft.merge", *,
                        check_fit: bool = True) -> None:
        """Raises, changing nothing, if merging ``adapter_name`` would corrupt the base weight.

        Refused: a weight that is not a floating (out, in) matrix (NotImplementedError), adapter
        parameters or a weight holding NaN or inf (the weight would be poisoned for good), a
        float16 weight whose merged values float16 cannot hold, and, when
        ``invertible`` (a merge meant to be undone), a transform unmerge could not undo: a scale or
        a qGOFT block whose inverse overflows or whose condition exceeds MAX_UNMERGE_CONDITION.
        ``where`` names the function called in the errors. ``check_fit=False`` skips computing the
        merged float16 weight, for a caller that checks the one it computes (merge).
        """
        self._require_adapter(adapter_name, "GivensLinear.merge")
        self.check_whole(adapter_name, where, MERGE_UNSHARDED)
        tensors = [self.base_layer.weight, *self.adapter_parameters(adapter_name).values()]
        if any(hasattr(t, "device_mesh") for t in tensors):
            raise ValueError(f"{where}: layer {self.layer_name or type(self.base_layer).__name__} is sharded (FSDP2 "
                             f"fully_shard or another DTensor plan); {MERGE_UNSHARDED}")
        self._check_weight(where)
        layer = f"layer {self.layer_name}" if self.layer_name else "this layer"
        params, scale, angle_parameterisation = self.op_arguments(adapter_name)
        for what, t in (("parameters", params), ("scale", scale)):
            if t is not None and not t.is_meta and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"{where}: adapter {adapter_name!r} of {layer} has NaN or infinite {what}; "
                    "merging would make the base weight non-finite for good"
                )
        if invertible and not params.is_meta:
            _check_invertible(params, scale, f"{where}: adapter {adapter_name!r} of {layer}",
                              "so goft.unmerge could not restore the weight; goft.merge_and_unload merges for good")
        weight = self.base_layer.weight
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"{where}: the weight of {layer} holds NaN or infinite values already; the transform "
                             "would spread them along its rows, so the weight is left as it was")
        if (check_fit and not params.is_meta
                and torch.finfo(weight.dtype).max < torch.finfo(_compute_dtype(weight)).max):
            # float16 holds up to 65504: a rotation keeps a row's norm, not its largest entry, and
            # a scale or a qGOFT block can grow both. Computed once more here (float16 weights
            # only) so that a model-level merge refuses before any layer changes.
            self._check_fits(self._transformed_weight(_merge_rows(params, scale, angle_parameterisation)), where)

    @torch.no_grad()
    def merge(self, adapter_name: Optional[str] = None) -> bool:
        """Folds the adapter into the base weight: W <- W @ T.T (nn.Linear), W <- T @ W (Conv1D).

        Computed in float32 (float64 for float64 weights) and cast once into the weight's dtype.
        Returns False, with a warning, when that adapter is already merged.
        """
        name = self.active_adapter if adapter_name is None else adapter_name
        if name is None:
            return False
        self._require_adapter(name, "GivensLinear.merge")
        if name in self.merged_adapters:
            warnings.warn(f"goft.merge: adapter {name!r} is already merged into this layer; not merging it again")
            return False
        self.check_mergeable(name, invertible=False, check_fit=False)  # _apply_to_weight checks the fit
        # The op's own arguments, so the merged weight applies exactly the forward's transform.
        params, scale, angle_parameterisation = self.op_arguments(name)
        params, scale = params.detach().clone(), None if scale is None else scale.detach().clone()
        self._apply_to_weight(_merge_rows(params, scale, angle_parameterisation), "goft.merge")
        self.merged_adapters.append(name)
        self._merged_transforms.append((params, scale, angle_parameterisation))
        return True

    @torch.no_grad()
    def unmerge(self) -> List[str]:
        """Removes every merged adapter, newest first, by the exact inverse transform; returns their names.

        With W' = W @ T.T, W = W' @ T^{-T}; T^{-T} = R_L^{-T} ... R_1^{-T} diag(1/scale) has the
        op's own structure, so it is one rotate() call with per-block inverse-transposes: the
        same angles for strict rotations (R^{-T} = R), adj(A)^T / det(A) for qGOFT blocks, and
        1/scale. No dense d x d inverse is ever formed.
        """
        undone = []
        while self.merged_adapters:
            params, scale, angle_parameterisation = self._merged_transforms[-1]
            name = self.merged_adapters[-1]

            def inverse(rows: torch.Tensor) -> torch.Tensor:
                # Inverted in the weight's compute dtype: a float32 inverse would undo a float64
                # merge only to float32 accuracy.
                inverse_params, inverse_scale = _inverse_transposed(_like(params, rows), _like(scale, rows), name)
                return rotate(rows, inverse_params, inverse_scale, False, angle_parameterisation)

            self._apply_to_weight(inverse, "goft.unmerge")
            self._merged_transforms.pop()
            undone.append(self.merged_adapters.pop())
        return undone

    def _check_weight(self, where: str = "goft.merge") -> None:
        weight = self.base_layer.weight
        if isinstance(weight, torch.Tensor) and weight.is_meta:
            raise ValueError(
                f"{where}: the weight of layer {self.layer_name or type(self.base_layer).__name__} is on the meta "
                "device: offloaded (accelerate's cpu_offload or disk offload), or never loaded, so a merge would "
                "change no weight in memory; merge a model whose weights are loaded"
            )
        if isinstance(weight, torch.Tensor) and managed_by_zero3(weight):
            # Even a weight whole on every rank (one below ZeRO-3's persistence threshold) is
            # DeepSpeed's to gather and partition, not goft's to change in place.
            raise ValueError(
                f"{where}: the weight of layer {self.layer_name or type(self.base_layer).__name__} is managed by "
                f"DeepSpeed ZeRO-3 ({PARTITIONED_BY_ZERO3}); {MERGE_UNSHARDED}"
            )
        base_kind = type(self.base_layer).__name__
        stored_in_out = is_conv1d(self.base_layer)
        if not (stored_in_out or isinstance(self.base_layer, nn.Linear)):
            raise NotImplementedError(
                f"{where}: cannot merge into {base_kind} (layer {self.layer_name or base_kind}): merging is defined "
                "for nn.Linear and transformers' Conv1D, whose weight layouts are known; keep this adapter unmerged"
            )
        quantized = isinstance(weight, torch.Tensor) and (
            not weight.is_floating_point() or getattr(weight, "quant_state", None) is not None)
        if quantized and not flattened_by_fsdp1(weight):
            # bitsandbytes' Linear4bit / Linear8bitLt (QLoRA-style training) and other integer
            # weights; 4-bit ones packed into a floating quant_storage (FSDP-QLoRA) too.
            raise NotImplementedError(
                f"{where}: the weight of layer {self.layer_name or base_kind} is quantized ({base_kind}, "
                f"{weight.dtype}): merging would dequantize it, rotate it and round it to the quantized precision "
                "again. Merge into the unquantized base model instead: load it without quantization_config, then "
                "goft.load_adapter(model, <the saved adapter>) and goft.merge_and_unload(model), or run goft merge "
                "--model <base> --adapter <the saved adapter>; the adapter trained on the quantized model applies "
                "there unchanged"
            )
        if (
            not isinstance(weight, torch.Tensor)
            or not weight.is_floating_point()
            or weight.dim() != 2
            or weight.shape[0 if stored_in_out else 1] != self.in_features
        ):
            flattened = flattened_by_fsdp1(weight)
            raise (ValueError if flattened else NotImplementedError)(
                f"{where}: cannot merge into {base_kind}: expected a floating (out, in) "
                f"weight with in={self.in_features}, got {getattr(weight, 'dtype', None)} "
                f"{tuple(getattr(weight, 'shape', ()))}" + (f": {FLATTENED_BY_FSDP1}; {MERGE_UNSHARDED}" if flattened else "")
            )
        # A merge rewrites the stored weight in place. A weight recomputed from other tensors at
        # each access (torch.nn.utils.parametrize: weight_norm, spectral_norm, orthogonal; prune's
        # weight_orig * mask) would lose the merge at the next forward, which then skips the adapter.
        registered = self.base_layer._parameters.get("weight", self.base_layer._buffers.get("weight"))
        if weight is not registered:
            raise NotImplementedError(
                f"{where}: the weight of layer {self.layer_name or base_kind} is recomputed at each access "
                "(a torch.nn.utils.parametrize parametrization such as weight_norm or spectral_norm, or pruning), "
                "so a merge would not stay in it; remove the parametrization first "
                "(torch.nn.utils.parametrize.remove_parametrizations, torch.nn.utils.prune.remove) or keep this "
                "adapter unmerged"
            )
        # A subclass holding more than weight and bias (transformers' IdeficsDecoupledLinear: an
        # additional_fc beside the weight) feeds the rotated input to those too, and a merge
        # reaches only the weight.
        extra = sorted({name for name, _ in self.base_layer.named_parameters(recurse=False)}
                       | {name for name, _ in self.base_layer.named_buffers(recurse=False)}
                       | {name for name, _ in self.base_layer.named_children()})
        extra = [name for name in extra if name not in ("weight", "bias")]
        if extra:
            raise NotImplementedError(
                f"{where}: cannot merge into {base_kind} (layer {self.layer_name or base_kind}): besides its weight "
                f"it holds {extra}, which its forward may apply to the rotated input too, and a merge would change "
                "only the weight; keep this adapter unmerged"
            )

    def _apply_to_weight(self, rows_map, where: str) -> None:
        """Replaces the weight by rows_map applied to its rows over the input dimension."""
        self._check_weight(where)
        new_weight = self._transformed_weight(rows_map)
        self._check_fits(new_weight, where)
        self.base_layer.weight.data.copy_(new_weight)

    def _transformed_weight(self, rows_map) -> torch.Tensor:
        """rows_map applied to the weight's rows, in _compute_dtype, in the weight's layout; not yet stored."""
        weight = self.base_layer.weight
        stored_in_out = is_conv1d(self.base_layer)
        rows = weight.detach().to(_compute_dtype(weight))
        new_rows = rows_map(rows.T if stored_in_out else rows)
        return new_rows.T if stored_in_out else new_rows

    def _check_fits(self, new_weight: torch.Tensor, where: str) -> None:
        """Refuses a new weight that the weight's dtype cannot hold (it would store inf, and NaN
        after an unmerge)."""
        weight = self.base_layer.weight
        worst = magnitude_beyond(new_weight, weight.dtype)
        if worst is None:
            return
        layer = self.layer_name or type(self.base_layer).__name__
        dtype = str(weight.dtype).removeprefix("torch.")
        largest = torch.finfo(weight.dtype).max
        found = "NaN entries" if math.isnan(worst) else f"entries up to {worst:.4g}, above {dtype}'s largest, {largest:.6g}"
        raise ValueError(
            f"{where}: the weight of layer {layer} would not fit in {dtype}: {found}; the weight is left as it "
            "was. Keep this adapter unmerged, or merge a copy of the model in float32 or bfloat16"
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, adapters={self.adapter_names}, active={self.active_adapter!r}, "
            f"merged={self.merged_adapters}, disabled={self.disabled}"
        )


def orthogonality_term(blocks: torch.Tensor, orth_lambda: float) -> torch.Tensor:
    """qGOFT's penalty lambda * sum_i <A_i[:,0], A_i[:,1]>^2 over (..., 2, 2) blocks A_i."""
    column_dots = (blocks[..., 0] * blocks[..., 1]).sum(-1)
    return orth_lambda * column_dots.square().sum()


def magnitude_beyond(tensor: torch.Tensor, dtype: torch.dtype) -> Optional[float]:
    """The largest magnitude in ``tensor`` if ``dtype`` cannot hold it (NaN if it holds NaN), else
    None. Reads its min and max only: no tensor-sized temporary."""
    if not tensor.numel():
        return None
    lowest, highest = (v.item() for v in torch.aminmax(tensor.detach()))
    if math.isnan(lowest) or math.isnan(highest):
        return math.nan
    largest = torch.finfo(dtype).max
    return None if -largest <= lowest and highest <= largest else max(-lowest, highest)


def _merge_rows(params: torch.Tensor, scale: Optional[torch.Tensor], angle_parameterisation: str):
    """The map that merging a transform applies to a weight's rows (over the input dimension)."""
    params, scale = params.detach(), None if scale is None else scale.detach()
    return lambda rows: rotate(rows, _like(params, rows), _like(scale, rows), True, angle_parameterisation)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """What a merge computes in: float32, or float64 for float64 weights."""
    return torch.promote_types(weight.dtype, torch.float32)


def _like(t: Optional[torch.Tensor], rows: torch.Tensor) -> Optional[torch.Tensor]:
    # float64 weights merge in float64 and the op wants params of a float type on the weight's device.
    if t is None:
        return None
    return t.to(device=rows.device, dtype=torch.float64 if rows.dtype == torch.float64 else torch.float32)


# The largest condition number of a scale or a qGOFT block that goft.merge accepts: unmerging
# multiplies the weight's rounding errors by up to this much (float32: to about 1e-3).
MAX_UNMERGE_CONDITION = 1e4


def _check_invertible(params: torch.Tensor, scale: Optional[torch.Tensor], what: str, consequence: str) -> None:
    """Refuses a transform whose inverse is not finite, or so ill-conditioned that merging and
    unmerging would not give the weight back: zero or tiny scale entries, (nearly) singular blocks."""
    params, scale = params.detach().double(), None if scale is None else scale.detach().double()
    if scale is not None and scale.numel():
        magnitude = scale.abs()
        if not bool(torch.isfinite((1.0 / scale).float()).all()) or magnitude.max() > MAX_UNMERGE_CONDITION * magnitude.min():
            raise ValueError(f"{what} has scale entries from {magnitude.min().item():.3g} to {magnitude.max().item():.3g} "
                             f"in magnitude (condition above {MAX_UNMERGE_CONDITION:g}, or a zero); {consequence}")
    if params.dim() == 3 and params.numel():
        det = (params[:, 0, 0] * params[:, 1, 1] - params[:, 0, 1] * params[:, 1, 0]).abs()
        # ||A||_F^2 / |det A| bounds a 2x2 block's condition number from above.
        bound = params.square().sum((-2, -1)) / det
        worst = int(torch.nan_to_num(bound, nan=math.inf).argmax())
        if not bool(torch.isfinite((1.0 / det).float()).all()) or bound[worst] > MAX_UNMERGE_CONDITION:
            raise ValueError(f"{what} has a singular or nearly singular 2x2 block (block {worst}: determinant "
                             f"{det[worst].item():.3g}); {consequence}")


def _inverse_transposed(
    params: torch.Tensor, scale: Optional[torch.Tensor], adapter_name: str
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    # goft.merge refused ill-conditioned transforms (_check_invertible); GivensLinear.merge called
    # directly did not, so exact singularity is still caught here.
    if scale is not None and bool((scale == 0).any()):
        raise ValueError(f"goft.unmerge: adapter {adapter_name!r} has a zero scale entry; its merge is not invertible")
    inverse_scale = None if scale is None else 1.0 / scale
    if params.dim() == 1:
        return params, inverse_scale
    a, b, c, d = params[:, 0, 0], params[:, 0, 1], params[:, 1, 0], params[:, 1, 1]
    det = a * d - b * c
    if bool((det == 0).any()):
        raise ValueError(f"goft.unmerge: adapter {adapter_name!r} has a singular 2x2 block; its merge is not invertible")
    # A^{-T} = [[d, -c], [-b, a]] / det for A = [[a, b], [c, d]].
    inverse_t = torch.stack([torch.stack([d, -c], -1), torch.stack([-b, a], -1)], -2) / det[:, None, None]
    return inverse_t, inverse_scale
