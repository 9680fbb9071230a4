"""Public ops. Each is a Python function over one or more ``torch.ops.lowrank`` ops, with a ``backend`` argument."""
from lowrank.ops._backends import BackendUnavailableError
from lowrank.ops.bf16x3_linear import bf16x3_linear, pack_bf16x3
from lowrank.ops.gather_logits import gather_logits
from lowrank.ops.lora_linear import lora_linear
from lowrank.ops.multi_lora_linear import AdapterSegments, adapter_segments, multi_lora_linear
from lowrank.ops.onednn_linear import onednn_linear
from lowrank.ops.query_attention_mass import query_attention_mass
from lowrank.ops.rank1_experts_lora import rank1_experts_lora
from lowrank.ops.sparse_layout import SparseLayout
from lowrank.ops.sparse_lowrank_linear import sparse_lowrank_linear

__all__ = ["AdapterSegments", "adapter_segments", "bf16x3_linear", "pack_bf16x3", "gather_logits", "lora_linear", "multi_lora_linear",
           "onednn_linear", "query_attention_mass", "rank1_experts_lora", "sparse_lowrank_linear", "SparseLayout",
           "BackendUnavailableError"]
