"""goft: Givens orthogonal fine-tuning (GOFT, GOFT*, qGOFT) with fused CPU and CUDA kernels."""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

__version__ = "0.1.0"

from goft.ops import rotate, rotated_linear  # noqa: E402
from goft.config import GOFTConfig  # noqa: E402
from goft.layers import GivensLinear  # noqa: E402
from goft.presets import DEFAULT_TARGET_MODULES  # noqa: E402
from goft.inject import (  # noqa: E402
    active_adapter,
    adapter_configs,
    add_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    inject,
    merge,
    merge_and_unload,
    orthogonality_penalty,
    print_trainable_parameters,
    set_adapter,
    unload,
    unmerge,
)
from goft.io import load_adapter, save_adapter  # noqa: E402

__all__ = [
    "rotate",
    "rotated_linear",
    "GOFTConfig",
    "GivensLinear",
    "DEFAULT_TARGET_MODULES",
    "inject",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "active_adapter",
    "adapter_configs",
    "merge",
    "unmerge",
    "merge_and_unload",
    "unload",
    "disable_adapters",
    "orthogonality_penalty",
    "count_parameters",
    "print_trainable_parameters",
    "save_adapter",
    "load_adapter",
    "__version__",
]
