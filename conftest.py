"""Root conftest: loaded before any test or benchmark module imports triton.

Triton kernels run on CPU tensors only under Triton's interpreter, which triton reads when it is imported; on a
machine without CUDA the test and benchmark runs turn it on here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
