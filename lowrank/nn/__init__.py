"""Drop-in modules over lowrank ops."""
from lowrank.nn.lora_linear import LoRALinear
from lowrank.nn.low_rank_linear import LowRankLinear
from lowrank.nn.rank1_experts_linear import Rank1ExpertsLinear
from lowrank.nn.peft import apply_lora, from_peft, load_peft_state_dict, save_peft_adapter, to_peft_state_dict

__all__ = ["LoRALinear", "LowRankLinear", "Rank1ExpertsLinear", "apply_lora", "from_peft", "load_peft_state_dict",
           "save_peft_adapter", "to_peft_state_dict"]
