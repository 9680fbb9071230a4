"""Drop-in modules over lowrank ops."""
from lowrank.nn.bf16x3_linear import Bf16x3GatedMLP, Bf16x3Linear, use_bf16x3
from lowrank.nn.lora_linear import LoRALinear
from lowrank.nn.low_rank_linear import LowRankLinear
from lowrank.nn.multi_lora_linear import MultiLoRALinear, adapter_context, from_peft_multi
from lowrank.nn.onednn_linear import OneDnnLinear, use_onednn
from lowrank.nn.rank1_experts_linear import Rank1ExpertsLinear
from lowrank.nn.peft import apply_lora, from_peft, load_peft_state_dict, save_peft_adapter, to_peft_state_dict
from lowrank.nn.sparse_lowrank_linear import SparseAdapterLinear, SparseLowRankLinear

__all__ = ["Bf16x3GatedMLP", "Bf16x3Linear", "LoRALinear", "LowRankLinear", "MultiLoRALinear", "OneDnnLinear", "Rank1ExpertsLinear", "SparseAdapterLinear",
           "SparseLowRankLinear", "adapter_context", "apply_lora", "from_peft", "from_peft_multi",
           "load_peft_state_dict", "save_peft_adapter", "to_peft_state_dict", "use_bf16x3", "use_onednn"]
