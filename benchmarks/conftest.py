"""Shared benchmark setup: thread pinning, seeding, collection of ``bench_*.py``, and a warm-up helper.

Run the suite:
    pytest benchmarks --benchmark-disable                    # CI: each case once, no timing (cannot rot)
    pytest benchmarks --benchmark-only --benchmark-warmup=on --benchmark-json=out.json [--threads N]
    python benchmarks/report.py out.json                     # ratio table (see report.py; `--run` does both)

Rules (DESIGN.md, Benchmarks): inputs are built outside the timed call, the peer and the floor share a group,
the thread count is pinned (``--threads``, default 2: this project's CPU machines have 2 cores), every case
is warmed up before it is timed, and medians are what gets reported. Timings on shared machines are noisy:
compare ratios within one run, not absolute times across runs.

The allocator is held steady (``--malloc steady``, the default; ``--malloc default`` leaves glibc as it is):
glibc's malloc adjusts its mmap and trim thresholds as the process runs, so whether a freed multi-megabyte
output goes back to the OS, to be page-faulted in again by the next call, depended on what ran before. Measured
on the 2-core AMD EPYC, same process, 2048×768×768 bf16: nn.Linear forward+backward moved between 12.7 and
18 ms and PEFT's ratio to it between 1.22 and 1.56 from run to run. ``steady`` fixes both thresholds with
``mallopt`` (mmap threshold 32 MiB, glibc's maximum; no trimming), which is what PyTorch's CPU tuning guide gets
at by recommending jemalloc/tcmalloc; it applies to the floor, the peers and lowrank alike.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import fnmatch
import platform

import pytest
import torch

DEFAULT_THREADS = 2
WARMUP_CALLS = 2
# glibc mallopt parameters (malloc.h) and values for --malloc steady.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_STEADY_MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
_STEADY_TRIM_THRESHOLD = (1 << 31) - 1


def steady_malloc() -> str:
    """Fix glibc's mmap and trim thresholds (see the module docstring); returns what was done, for the report."""
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or name is None:
        return "default (not glibc)"
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return "default (no mallopt)"
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _STEADY_MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                _STEADY_TRIM_THRESHOLD)
    if not ok:
        raise RuntimeError("--malloc steady: glibc's mallopt refused the thresholds")
    return "steady (glibc mmap threshold 32 MiB, no trim)"


def pytest_addoption(parser):
    parser.addoption("--threads", type=int, default=DEFAULT_THREADS,
                     help=f"torch.set_num_threads for the benchmarks (default {DEFAULT_THREADS})")
    parser.addoption("--fp32-matmul-precision", choices=("highest", "high", "medium"), default=None,
                     help="torch.set_float32_matmul_precision for the whole run (default: torch's, 'highest'); "
                          "off Intel, 'high' lets lowrank's fp32 LoRA base GEMM run on oneDNN")
    parser.addoption("--malloc", choices=("steady", "default"), default="steady",
                     help="steady (default): fix glibc's mmap/trim thresholds so that freed outputs are not "
                          "page-faulted back on every call, whatever ran before; default: leave glibc as it is")


def pytest_configure(config):
    threads = config.getoption("--threads")
    if threads < 1:
        raise pytest.UsageError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    precision = config.getoption("--fp32-matmul-precision")
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    config._lowrank_malloc = steady_malloc() if config.getoption("--malloc") == "steady" else "default"


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` as test modules (pytest's default pattern is ``test_*.py``).

    pytest's own python plugin already collects a file named on the command line, or one that the project's
    ``python_files`` setting matches; returning ``None`` then avoids collecting it twice.
    """
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pat) for pat in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the ratios depend on next to pytest-benchmark's own machine info in the JSON."""
    machine_info["torch_version"] = torch.__version__
    machine_info["torch_num_threads"] = torch.get_num_threads()
    machine_info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    machine_info["malloc"] = getattr(config, "_lowrank_malloc", "default")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def run_benchmark(benchmark):
    """``run_benchmark(fn)``: warm ``fn`` up with a few untimed calls, then time it with pytest-benchmark.

    Under ``--benchmark-disable`` the warm-up is skipped and ``fn`` runs exactly once (the CI smoke mode).
    pytest-benchmark's own ``--benchmark-warmup=on`` adds a longer warm-up phase on top of this one.
    """
    def run(fn):
        if not benchmark.disabled:
            for _ in range(WARMUP_CALLS):
                fn()
        return benchmark(fn)
    return run


@pytest.fixture
def run_peer_step(run_benchmark):
    """``run_peer_step(peers, impl, mode)``: time one implementation's step of a peers object (``.step(impl,
    mode)``, ``.trainable(impl)``): "fwd" under ``torch.inference_mode``; "fwd+bwd" checks that every trainable
    factor got a gradient and clears them after, as ``zero_grad()`` does."""
    def run(peers, impl: str, mode: str):
        step = peers.step(impl, mode)
        if mode == "fwd":
            with torch.inference_mode():
                return run_benchmark(step)
        out = run_benchmark(step)
        params = peers.trainable(impl)
        assert all(p.grad is not None for p in params), f"{impl}: backward produced no factor gradients"
        for p in params:
            p.grad = None
        return out
    return run


def fp32_linear_case(shape: tuple[int, int, int]):
    """A seeded fp32 ``nn.Linear(in, out)`` for ``shape = (T, in, out)``, an input x [T, in] and the exact product
    x·Wᵀ + b in fp64: the layer, input and oracle of the fp32-linear benchmarks (bf16x3, oneDNN)."""
    t, n_in, n_out = shape
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(n_in, n_out)
    x = torch.randn(t, n_in, generator=g)
    with torch.no_grad():
        exact = x.double() @ lin.weight.double().T + lin.bias.double()
    return lin, x, exact
