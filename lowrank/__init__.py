"""lowrank: compiled kernels for low-rank and sparse compute in PyTorch.

Importing the package loads the compiled extension (which registers the ``torch.ops.lowrank`` schemas and the
CPU / CUDA kernels), the public ops, the modules and ``lowrank.linalg`` (randomized SVD). Nothing here probes
devices or reads environment variables.
"""
import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

from lowrank import _C  # noqa: F401  (registers torch.ops.lowrank)
from lowrank import linalg, nn, ops
from lowrank.ops import BackendUnavailableError

__version__ = "0.1.0"
__all__ = ["ops", "nn", "linalg", "BackendUnavailableError", "__version__"]
