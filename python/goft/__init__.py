"""goft: Givens orthogonal fine-tuning (GOFT, GOFT*, qGOFT) with fused CPU and CUDA kernels."""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

__version__ = "0.1.0"


def _check_torch_version(built: str, running: str) -> None:
    """Raises ImportError unless goft._C was built against the torch release that is running.

    The extension links to torch's C++ API, which changes between releases; a mismatch would
    otherwise show up as an "undefined symbol" ImportError or a crash. It happens after a plain
    ``pip install`` of goft's source: pip's isolated build compiles against whatever torch it
    downloads. Local version tags (+cpu, +cu130) are not compared.
    """
    if built.split("+")[0] != running.split("+")[0]:
        raise ImportError(
            f"goft: its compiled extension was built against torch {built}, but torch {running} is installed; "
            "rebuild goft against this torch: pip install --no-build-isolation --force-reinstall --no-deps <goft "
            "source folder> (or bash scripts/setup.sh from it)"
        )


try:
    from goft._build_info import TORCH_VERSION as _BUILT_AGAINST
except ImportError:  # an installation without the file (a source tree, an older build)
    _BUILT_AGAINST = None
if _BUILT_AGAINST is not None:
    _check_torch_version(_BUILT_AGAINST, torch.__version__)

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

# Submodules that __init__ does not import (they need the Hugging Face stack, or are tools),
# imported on first use: `goft.trainer.quantized_base` works after a plain `import goft`.
_SUBMODULES_ON_FIRST_USE = ("trainer", "finetune", "export", "data", "demo", "cli", "reference")


def __getattr__(name: str):
    if name in _SUBMODULES_ON_FIRST_USE:
        import importlib

        return importlib.import_module(f"goft.{name}")
    raise AttributeError(f"module 'goft' has no attribute {name!r}")


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
