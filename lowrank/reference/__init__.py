"""Plain-PyTorch oracles: the specification of every op. Tests, benchmarks and the "torch" backend use them."""
from lowrank.reference.lora_linear import lora_linear
from lowrank.reference.rsvd import rsvd

__all__ = ["lora_linear", "rsvd"]
