"""Every op in torch.ops.lowrank has an opcheck sample in tests/ and a benchmark in benchmarks/.

Test files declare ``OPCHECK_OPS`` and benchmark files ``BENCHMARKED_OPS`` (sets of op names without the
namespace); this test fails for any registered op missing from either.
"""
from __future__ import annotations

import ast
import pathlib

import torch

import lowrank  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _declared(folder: pathlib.Path, pattern: str, name: str) -> set[str]:
    found: set[str] = set()
    for path in folder.rglob(pattern):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
                found |= set(ast.literal_eval(node.value))
    return found


def _registered_ops() -> set[str]:
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lowrank::")}


def test_every_op_has_an_opcheck_sample():
    missing = _registered_ops() - _declared(ROOT / "tests", "test_*.py", "OPCHECK_OPS")
    assert not missing, f"ops without an opcheck test (add them to some OPCHECK_OPS): {sorted(missing)}"


def test_every_op_has_a_benchmark():
    missing = _registered_ops() - _declared(ROOT / "benchmarks", "bench_*.py", "BENCHMARKED_OPS")
    assert not missing, f"ops without a benchmark (add them to some BENCHMARKED_OPS): {sorted(missing)}"


def test_registry_sees_the_ops():
    assert {"lora_linear", "lora_linear_backward"} <= _registered_ops()
