"""Finding the layers a whole-model swap (``use_bf16x3``, ``use_onednn``) replaces."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lowrank.ops._backends import Backend, select


def float32_linears(model: nn.Module, who: str, op: str, table: Sequence[Backend],
                    backend: str) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Every float32 ``nn.Linear`` (exact type, not subclasses) inside ``model`` as (parent, attribute name, layer),
    after checking that ``backend`` of ``op`` runs on each of their devices, so that a refused backend raises
    :class:`~lowrank.BackendUnavailableError` before anything is changed. ``who`` names the caller in errors."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.dtype == torch.float32]
    for device in {child.weight.device for _, _, child in targets}:
        select(op, table, backend, device, torch.float32)
    return targets
