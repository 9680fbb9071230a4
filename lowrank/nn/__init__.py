"""Drop-in modules over lowrank ops."""
from lowrank.nn.lora_linear import LoRALinear

__all__ = ["LoRALinear"]
