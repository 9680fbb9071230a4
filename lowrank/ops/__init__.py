"""Public ops. Each is a Python function over one or more ``torch.ops.lowrank`` ops, with a ``backend`` argument."""
from lowrank.ops._backends import BackendUnavailableError
from lowrank.ops.lora_linear import lora_linear

__all__ = ["lora_linear", "BackendUnavailableError"]
