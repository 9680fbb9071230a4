"""``lowrank squeeze-adapter`` (lowrank.compress.squeeze_cli) on a small PEFT adapter directory."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lowrank import cli

pytest.importorskip("safetensors")


def _adapter(tmp_path):
    from lowrank.nn import apply_lora, save_peft_adapter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16))
    apply_lora(model, ["0", "2"], r=8, alpha=16)
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_b.normal_()
    return save_peft_adapter(model, tmp_path / "src")


def test_squeezes_to_the_rank_and_keeps_the_scaling(tmp_path, capsys):
    src = _adapter(tmp_path)
    assert cli.main(["squeeze-adapter", src, "--rank", "3", "--out", str(tmp_path / "dst")]) == 0
    assert "rank [8] -> [3]" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "dst" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] / cfg["r"] == 2.0


def test_bad_arguments_are_refused(tmp_path, capsys):
    src = _adapter(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["squeeze-adapter", src, "--rank", "3", "--energy", "0.9", "--out", str(tmp_path / "d")])
    assert "exactly one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["squeeze-adapter", str(tmp_path / "nope"), "--rank", "3", "--out", str(tmp_path / "d")])
    assert "is not a directory" in capsys.readouterr().err
