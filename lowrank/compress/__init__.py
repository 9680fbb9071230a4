"""Compression of trained adapters and models.

- :mod:`lowrank.compress.squeeze`: LoRA-Squeeze, the exact truncated SVD of ΔW = B·A computed from the factors
  (never forming ΔW), for one layer, a batch of layers, a whole model, PEFT adapter files, and rank annealing
  during training.
- :mod:`lowrank.compress.model`: whole-model compression of ``nn.Linear`` layers into
  :class:`lowrank.nn.LowRankLinear` under one global parameter budget (uniform, greedy, WeLore allocation;
  activation whitening / scaling and Fisher weighting from calibration data).
"""
from lowrank.compress.model import CompressionReport, compress_model, load_compressed, read_manifest, save_compressed
from lowrank.compress.anneal import ParamSwap, RankAnnealer, cosine_schedule, linear_schedule, step_schedule
from lowrank.compress.squeeze import LayerSqueeze, SqueezeReport, SqueezeResult, squeeze_lora, squeeze_model
from lowrank.compress.squeeze_peft import squeeze_peft_adapter

__all__ = ["compress_model", "CompressionReport", "save_compressed", "load_compressed", "read_manifest", "squeeze_lora", "squeeze_model", "squeeze_peft_adapter", "SqueezeResult", "SqueezeReport",
           "LayerSqueeze", "RankAnnealer", "ParamSwap", "linear_schedule", "cosine_schedule", "step_schedule"]
