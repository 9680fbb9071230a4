"""Calibration: run a model on a few hundred inputs and record, for each Linear, statistics of its input.

For a Linear with inputs x_t ∈ ℝⁿ over the N calibration tokens t (padding excluded), forward hooks accumulate

    XᵀX = Σ_t x_t·x_tᵀ    [n, n]  (float64; per batch the Gram is formed in float32, one GEMM, then added)
    Σ_t |x_t|              [n]
    N

from which :class:`LayerStats` gives C = XᵀX/N (SVD-LLM whitening, and the output error of any Ŵ:
‖(W − Ŵ)·Xᵀ‖_F²/N = tr((W − Ŵ)·C·(W − Ŵ)ᵀ)) and mean |x| (ASVD). :func:`collect_fisher` accumulates the
FWSVD row importance Iᵢ = Σ_batches Σ_j (∂L/∂W_ij)² from a user loss (batch-level gradients: an approximation
of the per-sample Fisher that FWSVD sums).

Calibration input (:func:`make_batches`), whichever is easiest:
  * a list of strings plus a tokenizer (Hugging Face ``tokenizer(texts, padding=True, truncation=True,
    max_length=..., return_tensors="pt")``): a few hundred sentences are enough;
  * token batches: a dict of tensors (one batch) or a list of them, passed as ``model(**batch)``; an
    ``attention_mask`` entry [B, T] marks real tokens, and only those enter the statistics;
  * tensors (``model(batch)``), or a list of them;
  * a callable ``fn(model)`` that runs the forward passes itself (and returns whatever output it wants
    compared when sensitivities are measured).
:func:`synthetic_token_batches` builds random-token batches for a token model (no data needed).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LayerStats", "Batch", "make_batches", "synthetic_token_batches", "collect_statistics",
           "collect_fisher", "model_outputs", "primary_output"]

Batch = Any  # a dict of tensors (model(**batch)), a tensor (model(batch)), or a callable fn(model)


@dataclass
class LayerStats:
    """Input statistics of one Linear: ``xtx`` = XᵀX [n, n] (float64), ``abs_sum`` = Σ|x| [n], ``count`` = N
    (real tokens)."""
    xtx: torch.Tensor
    abs_sum: torch.Tensor
    count: int

    @property
    def gram(self) -> torch.Tensor:
        """C = XᵀX/N [n, n]."""
        return self.xtx / max(self.count, 1)

    @property
    def abs_mean(self) -> torch.Tensor:
        """mean_t |x_t| [n]."""
        return self.abs_sum / max(self.count, 1)


def make_batches(calibration: object, tokenizer: object = None, *, batch_size: int = 32,
                 max_length: int = 128) -> list[Batch]:
    """Normalize any accepted calibration input (module docstring) into a list of batches.

    Raises:
        ValueError: empty input; texts without a tokenizer; bad batch_size / max_length.
        TypeError: an unsupported input type.
    """
    for name, v in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if calibration is None:
        raise ValueError("calibration must not be None here")
    if callable(calibration) and not isinstance(calibration, (nn.Module, torch.Tensor)):
        return [calibration]
    if isinstance(calibration, (torch.Tensor, Mapping)):
        return [_as_batch(calibration)]
    if isinstance(calibration, str):
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise TypeError(f"calibration must be texts, token batches, tensors or a callable, got "
                        f"{type(calibration).__name__}")
    items = list(calibration)
    if not items:
        raise ValueError("calibration is empty")
    if all(isinstance(t, str) for t in items):
        if tokenizer is None:
            raise ValueError("calibration is a list of texts: pass tokenizer= to tokenize them")
        batches = []
        for i in range(0, len(items), batch_size):
            enc = tokenizer(items[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            batches.append({k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)})
        return batches
    return [_as_batch(b) for b in items]


def _as_batch(b: object) -> Batch:
    if isinstance(b, torch.Tensor):
        return b
    if isinstance(b, Mapping):
        if not b or not all(isinstance(v, torch.Tensor) for v in b.values()):
            raise TypeError("a calibration batch dict must map names to tensors")
        return dict(b)
    raise TypeError(f"a calibration batch must be a dict of tensors or a tensor, got {type(b).__name__}")


def synthetic_token_batches(model: nn.Module, *, n_sequences: int = 64, seq_len: int = 64,
                            batch_size: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random-token batches (ids uniform over ``model.config.vocab_size``, all positions real) for a token
    model.

    Raises:
        ValueError: the model has no ``config.vocab_size`` (it is not a token model: pass calibration data).
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 2:
        raise ValueError(f"synthetic token batches need a token model with config.vocab_size; "
                         f"{type(model).__name__} has none: pass calibration data")
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n_sequences, batch_size):
        b = min(batch_size, n_sequences - i)
        ids = torch.randint(0, vocab, (b, seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return batch


def _run(model: nn.Module, batch: Batch) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    return batch(model)


def _mask_of(batch: Batch) -> torch.Tensor | None:
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].bool()
    return None


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[..., n] → [N, n], keeping only real tokens when x is [B, T, n] and mask is [B, T]."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def collect_statistics(model: nn.Module, layers: Mapping[str, nn.Linear], batches: Sequence[Batch], *,
                       progress: bool = False) -> dict[str, LayerStats]:
    """Run ``model`` on ``batches`` and accumulate :class:`LayerStats` for each Linear in ``layers``.

    Layers that share an input tensor (e.g. query, key and value) share one Gram computation. The model is run
    in eval mode (its training flag is restored) and is otherwise untouched; hooks are always removed.
    """
    stats: dict[str, LayerStats] = {}
    state: dict[str, Any] = {"mask": None, "last": None}

    def hook(name: str, lin: nn.Linear):
        def fn(_mod: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            # the same tensor object fed to consecutive Linears (query / key / value): one Gram. Identity, not
            # the address: a freed activation's memory is reused by later ones of the same shape.
            if state["last"] is not None and state["last"][0] is x:
                xtx, abs_sum, count = state["last"][1]
            else:
                t = _tokens(x.detach(), state["mask"]).float()
                xtx, abs_sum, count = (t.T @ t).double(), t.abs().sum(0).double(), t.shape[0]
                state["last"] = (x, (xtx, abs_sum, count))
            st = stats.get(name)
            if st is None:
                stats[name] = LayerStats(xtx.clone(), abs_sum.clone(), count)
            else:
                st.xtx += xtx
                st.abs_sum += abs_sum
                st.count += count
        return fn

    handles = [lin.register_forward_pre_hook(hook(name, lin)) for name, lin in layers.items()]
    was_training = model.training
    model.eval()
    device = _device_of(model)
    try:
        it: Iterable = batches
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(batches, desc="calibration", unit="batch")
        for b in it:
            b = _to(b, device)
            state["mask"], state["last"] = _mask_of(b), None
            _run(model, b)
        state["last"] = None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [name for name in layers if name not in stats or stats[name].count == 0]
    if missing:
        raise ValueError(f"calibration never reached these layers (no inputs recorded): {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return stats


def collect_fisher(model: nn.Module, layers: Mapping[str, nn.Linear], batches: Sequence[Batch],
                   loss_fn: Callable[[Any, Batch], torch.Tensor]) -> dict[str, torch.Tensor]:
    """FWSVD row importance Iᵢ = Σ_batches Σ_j (∂L/∂W_ij)² [m] (float64) for each Linear in ``layers``.

    ``loss_fn(outputs, batch)`` returns a scalar loss. Gradients are taken with ``torch.autograd.grad`` (no
    ``.grad`` is written); weights that do not require grad are switched on for the call and restored after.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, batch) -> scalar, got {type(loss_fn).__name__}")
    names = list(layers)
    weights = [layers[n].weight for n in names]
    flags = [w.requires_grad for w in weights]
    sums = {n: torch.zeros(layers[n].out_features, dtype=torch.float64) for n in names}
    was_training = model.training
    model.eval()
    device = _device_of(model)
    try:
        for w in weights:
            w.requires_grad_(True)
        for b in batches:
            b = _to(b, device)
            loss = loss_fn(_run(model, b), b)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    sums[n] += (g.detach().double() ** 2).sum(1).cpu()
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
        model.train(was_training)
    return sums


def primary_output(out: Any) -> torch.Tensor:
    """The tensor a model's output is judged by: the tensor itself, ``last_hidden_state``, ``logits``, or the
    first tensor of a mapping / tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("last_hidden_state", "logits"):
        t = getattr(out, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    values = list(out.values()) if isinstance(out, Mapping) else (list(out) if isinstance(out, (tuple, list))
                                                                   else [])
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"cannot find an output tensor in a {type(out).__name__}: pass output_fn")


@torch.no_grad()
def model_outputs(model: nn.Module, batches: Sequence[Batch],
                  output_fn: Callable[[Any, Batch], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The model's outputs on ``batches`` as float32 [N, d] tensors, one per batch (eval mode).

    ``output_fn(outputs, batch)`` picks the tensor to compare (default :func:`primary_output`); rows of a
    [B, T, d] output at padding positions (``attention_mask`` = 0) are dropped.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    res = []
    try:
        for b in batches:
            b = _to(b, device)
            out = _run(model, b)
            y = output_fn(out, b) if output_fn is not None else primary_output(out)
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"output_fn must return a tensor, got {type(y).__name__}")
            y = _tokens(y, _mask_of(b)) if y.dim() >= 2 else y.reshape(1, -1)
            res.append(y.detach().float())
    finally:
        model.train(was_training)
    return res
