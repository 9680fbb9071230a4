"""Public ops. Each is a Python function over one or more ``torch.ops.lowrank`` ops, with a ``backend`` argument."""
from lowrank.ops._backends import BackendUnavailableError
from lowrank.ops.gather_logits import gather_logits
from lowrank.ops.lora_linear import lora_linear
from lowrank.ops.query_attention_mass import query_attention_mass
from lowrank.ops.rank1_experts_lora import rank1_experts_lora

__all__ = ["gather_logits", "lora_linear", "query_attention_mass", "rank1_experts_lora", "BackendUnavailableError"]
