"""goft: Givens orthogonal fine-tuning (GOFT, GOFT*, qGOFT) with fused CPU and CUDA kernels."""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

from goft.ops import rotate

__version__ = "0.1.0"

__all__ = ["rotate", "__version__"]
