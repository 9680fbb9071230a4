"""Plain-PyTorch oracles: the specification of every op. Tests, benchmarks and the "torch" backend use them."""
from lowrank.reference.bf16x3_linear import bf16x3_linear
from lowrank.reference.gather_logits import gather_logits
from lowrank.reference.lora_linear import lora_linear
from lowrank.reference.multi_lora_linear import multi_lora_linear
from lowrank.reference.onednn_linear import onednn_linear
from lowrank.reference.query_attention_mass import query_attention_mass
from lowrank.reference.rank1_experts_lora import rank1_experts_lora, rank1_experts_lora_dense
from lowrank.reference.rsvd import rsvd
from lowrank.reference.sparse_lowrank_linear import sltrain_linear, sparse_lowrank_linear

__all__ = ["bf16x3_linear", "gather_logits", "lora_linear", "multi_lora_linear", "onednn_linear", "query_attention_mass", "rank1_experts_lora",
           "rank1_experts_lora_dense", "rsvd", "sltrain_linear", "sparse_lowrank_linear"]
