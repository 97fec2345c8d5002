"""Soft-DTW full-pipeline benchmark: cosine cost -> DP forward -> backward, all variants in one process.

Variants (each one call = fresh leaf ``x [B, N, D]``, ``y [B, M, D]`` -> cost -> values -> ``sum().backward()``):

* ``numba``       our CPU path (``soft_dtw(..., backend="numba")``)
* ``torch``       our pure-torch wavefront with the stored-weight custom backward (``backend="torch"``)
* ``tslearn``     ``tslearn.metrics.SoftDTWLossPyTorch(gamma, dist_func=cosine_cost)``: its public API takes a
                  distance function, so it runs on the *same* cost matrix (its numba DP, float32 in/out)
* ``pysdtw``      ``pysdtw.SoftDTW(gamma, dist_func=cosine_cost, use_cuda=False)``: same cost matrix
* ``wf_autograd`` a plain torch anti-diagonal wavefront differentiated by autograd (defined below)
* ``cost_only``   cosine cost forward + backward alone (the share no DP can remove)
* ``div``         our divergence: three cost matrices + ``soft_dtw_divergence`` (3B pairs in one call)
* ``div_3calls``  the same divergence as three separate ``soft_dtw`` calls

Protocol: ``torch.set_num_threads(2)``, ``NUMBA_NUM_THREADS=2``; per size one warm-up call per variant, then
``--reps`` rounds; in every round each variant runs once in a rotated order (interleaved A/B), each rep
repeats the call until it has run >= ``--min-rep-s`` seconds and records the mean per call; the tables show
medians over rounds. CPU used by *other* processes during the timed section is measured from /proc/stat
minus this process's own rusage and printed (figures are suspect above ~0.15 cores).

Peak memory: each variant runs in a fresh subprocess: one warm-up call (JIT compilation, allocator pools),
then the peak RSS is reset (``/proc/self/clear_refs``) and one more call's peak (``VmHWM``) is reported next
to the RSS just before that call; "peak - setup" is what one call needs beyond its inputs.

Run: ``.venv/bin/python benchmarks/soft_dtw.py`` (all of it, a few minutes), ``--quick`` (small sizes,
smoke test), ``--sizes 256 512 --reps 7``, ``--no-memory``, ``--ftz`` (``torch.set_flush_denormal``).
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_NUM_THREADS", "2")  # before numba is imported anywhere

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student_train.kernels import cosine_cost, soft_dtw, soft_dtw_divergence  # noqa: E402

GAMMA = 0.1
BATCH = 8
DIM = 256
NOISY_CORES = 0.15  # CPU used by other processes above which a size's timings are suspect (SOFT_DTW.md §6)


# --------------------------------------------------------------------------------- autograd wavefront


def wavefront_autograd(cost: torch.Tensor, gamma: float, big: float = 1e10) -> torch.Tensor:
    """Soft-DTW by an anti-diagonal wavefront in plain torch, differentiated by autograd.

    Args:
        cost: ``[B, N, M]``.
        gamma: > 0.
        big: finite border sentinel.

    Returns:
        ``[B]`` values ``R[N, M]``.
    """
    bsz, n, m = cost.shape
    # differentiable skew: skew[b, i, i + j] = cost[b, i, j] (pad each row, re-read the flat buffer with a shorter row)
    skew = F.pad(cost, (0, n + 1)).reshape(bsz, -1)[:, : n * (m + n)].reshape(bsz, n, m + n)
    prev2 = torch.full((bsz, n + 1), big, dtype=cost.dtype)
    prev2[:, 0] = 0.0
    prev = torch.full((bsz, n + 1), big, dtype=cost.dtype)
    for k in range(2, n + m + 1):
        lo, hi = max(1, k - m), min(n, k - 1)
        stacked = torch.stack((prev[:, lo - 1 : hi], prev[:, lo : hi + 1], prev2[:, lo - 1 : hi]))
        soft = -gamma * torch.logsumexp(stacked / -gamma, dim=0)
        vals = skew[:, lo - 1 : hi, k - 2] + soft
        parts = [prev.new_full((bsz, lo), big), vals, prev.new_full((bsz, n - hi), big)]
        prev2, prev = prev, torch.cat(parts, dim=1)
    return prev[:, n]


# ---------------------------------------------------------------------------------------- variants


def _inputs(n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, n, DIM, generator=gen)
    y = torch.randn(BATCH, m, DIM, generator=gen)
    return x, y


def make_variants() -> dict[str, Callable[[torch.Tensor, torch.Tensor], None]]:
    """Name -> one full pipeline call on leaf copies of ``x``, ``y``."""
    from pysdtw import SoftDTW as PySDTW
    from tslearn.metrics import SoftDTWLossPyTorch

    tslearn_loss = SoftDTWLossPyTorch(gamma=GAMMA, dist_func=cosine_cost)
    pysdtw_loss = PySDTW(gamma=GAMMA, dist_func=cosine_cost, use_cuda=False)

    def leaf(x, y):
        return x.clone().requires_grad_(), y.clone().requires_grad_()

    def ours(backend):
        def run(x, y):
            x, y = leaf(x, y)
            soft_dtw(cosine_cost(x, y), GAMMA, backend=backend).sum().backward()

        return run

    def tslearn(x, y):
        x, y = leaf(x, y)
        tslearn_loss(x, y).sum().backward()

    def pysdtw(x, y):
        x, y = leaf(x, y)
        pysdtw_loss(x, y).sum().backward()

    def wf_autograd(x, y):
        x, y = leaf(x, y)
        wavefront_autograd(cosine_cost(x, y), GAMMA).sum().backward()

    dense_grads: dict[torch.Size, torch.Tensor] = {}

    def cost_only(x, y):
        # a dense, contiguous upstream gradient like the DP's (sum().backward() would hand bmm a stride-0 one)
        x, y = leaf(x, y)
        cost = cosine_cost(x, y)
        if cost.shape not in dense_grads:
            dense_grads[cost.shape] = torch.rand(cost.shape, generator=torch.Generator().manual_seed(0))
        cost.backward(dense_grads[cost.shape])

    def div(x, y):
        x, y = leaf(x, y)
        out = soft_dtw_divergence(
            cosine_cost(x, y), cosine_cost(x, x), cosine_cost(y, y), GAMMA, backend="numba"
        )
        out.sum().backward()

    def div_3calls(x, y):
        x, y = leaf(x, y)
        xy = soft_dtw(cosine_cost(x, y), GAMMA, backend="numba")
        xx = soft_dtw(cosine_cost(x, x), GAMMA, backend="numba")
        yy = soft_dtw(cosine_cost(y, y), GAMMA, backend="numba")
        (xy - 0.5 * (xx + yy)).sum().backward()

    return {
        "numba": ours("numba"),
        "torch": ours("torch"),
        "tslearn": tslearn,
        "pysdtw": pysdtw,
        "wf_autograd": wf_autograd,
        "cost_only": cost_only,
        "div": div,
        "div_3calls": div_3calls,
    }


# ------------------------------------------------------------------------------------------ timing


def _busy_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def time_size(
    n: int, variants: dict, names: list[str], reps: int, min_rep_s: float, max_calls: int
) -> tuple[dict[str, list[float]], float]:
    """Interleaved timing at N = M = n. Returns per-variant per-rep seconds/call and other-process cores."""
    x, y = _inputs(n, n)
    per_call = {}
    for name in names:  # warm-up (JIT compile, caches) and calibration of calls per rep
        t0 = time.perf_counter()
        variants[name](x, y)
        per_call[name] = time.perf_counter() - t0
    calls = {name: max(1, min(max_calls, math.ceil(min_rep_s / max(per_call[name], 1e-6)))) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    busy0, own0, wall0 = _busy_seconds(), _own_seconds(), time.perf_counter()
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                variants[name](x, y)
            times[name].append((time.perf_counter() - t0) / calls[name])
    wall = time.perf_counter() - wall0
    others = max(0.0, (_busy_seconds() - busy0) - (_own_seconds() - own0)) / wall
    return times, others


def time_dp_only(n: int, reps: int) -> dict[str, float]:
    """DP alone on a fixed cost matrix (no cost-matrix work): our forward, our forward + backward, tslearn's
    forward + backward. Medians in seconds, interleaved."""
    from tslearn.metrics import SoftDTWLossPyTorch

    x, y = _inputs(n, n)
    cost = cosine_cost(x, y).detach()
    tslearn_loss = SoftDTWLossPyTorch(gamma=GAMMA, dist_func=lambda a, b: a)

    def ours_fwd():
        soft_dtw(cost.clone().requires_grad_(), GAMMA, backend="numba")

    def ours_fwd_bwd():
        soft_dtw(cost.clone().requires_grad_(), GAMMA, backend="numba").sum().backward()

    def tslearn_fwd_bwd():
        c = cost.clone().requires_grad_()
        tslearn_loss(c, c).sum().backward()

    fns = {"numba fwd": ours_fwd, "numba fwd+bwd": ours_fwd_bwd, "tslearn fwd+bwd": tslearn_fwd_bwd}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(reps, 5) * 3):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------------------------------ accuracy


def gradient_error(n: int, gamma: float = GAMMA, seed: int = 0) -> dict[str, float | str]:
    """fp32 gradient error vs float64 (max|dg| / max|g|), B=2, D=64, y = time-warped noisy x, N = M = n.

    The float64 oracle is our numba path in float64 (the Python reference is too slow at N=1024; the float64
    path equals the reference to ~1e-13 in tests). The float64 torch backend is an independent check of it.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 64, generator=gen, dtype=torch.float64).cumsum(1) / math.sqrt(n)
    warp = (torch.linspace(0, 1, n, dtype=torch.float64) ** 1.5 * (n - 1)).long()
    y = x[:, warp] + 0.05 * torch.randn(2, n, 64, generator=gen, dtype=torch.float64)

    def grads(dtype, fn):
        xx = x.detach().to(dtype).clone().requires_grad_()
        yy = y.detach().to(dtype).clone().requires_grad_()
        cost = cosine_cost(xx, yy)
        cost.retain_grad()
        fn(cost).sum().backward()
        return cost.grad.double(), xx.grad.double()

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    ref_cost, ref_x = grads(torch.float64, lambda c: soft_dtw(c, gamma, backend="numba"))
    t_cost, t_x = grads(torch.float64, lambda c: soft_dtw(c, gamma, backend="torch"))
    out = {"float64 torch vs float64 numba, d/dC (oracle cross-check)": rel(t_cost, ref_cost)}
    from pysdtw import SoftDTW as PySDTW
    from tslearn.metrics import SoftDTWLossPyTorch

    runs = {
        "numba fp32": lambda c: soft_dtw(c, gamma, backend="numba"),
        "torch fp32": lambda c: soft_dtw(c, gamma, backend="torch"),
        "tslearn fp32": lambda c: SoftDTWLossPyTorch(gamma=gamma, dist_func=lambda a, b: c)(c, c),
        "pysdtw fp32": lambda c: PySDTW(gamma=gamma, dist_func=lambda a, b: c, use_cuda=False)(c, c),
    }
    for name, fn in runs.items():
        g_cost, g_x = grads(torch.float32, fn)
        denormals = int(((g_cost != 0) & (g_cost.abs() < torch.finfo(torch.float32).tiny)).sum())
        out[name] = (
            f"d/dC {rel(g_cost, ref_cost):.3g}, d/dx {rel(g_x, ref_x):.3g}, "
            f"float32 denormals in d/dC: {denormals}"
        )
    return out


# -------------------------------------------------------------------------------------------- memory


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))


def memory_probe(name: str, n: int) -> None:
    """Child process: build inputs, warm the variant up (JIT compiles, allocator pools), reset the peak RSS
    (``/proc/self/clear_refs``), run it again and print JSON with RSS before the call and the call's peak.

    Without the reset the peak is the JIT compiler's (numba/LLVM compiles every kernel on first use, for
    tslearn and pysdtw as well as ours), which is the same for every variant and says nothing about the DP.
    """
    torch.set_num_threads(2)
    variants = make_variants()
    x, y = _inputs(n, n)
    variants[name](x, y)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    rss_setup = _status_kb("VmRSS")
    variants[name](x, y)
    peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"setup_mb": rss_setup / 1024, "peak_mb": peak / 1024, "reset": reset}))


def measure_memory(name: str, n: int) -> dict[str, float] | None:
    cmd = [sys.executable, __file__, "--probe", name, str(n)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        print(f"  memory probe {name} N={n} failed: {res.stderr.strip()[-300:]}")
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main


def _fmt_ms(values: list[float]) -> str:
    ms = sorted(v * 1e3 for v in values)
    return f"{statistics.median(ms):.1f} [{ms[0]:.1f}-{ms[-1]:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024], help="N = M values")
    parser.add_argument(
        "--reps", type=int, default=5, help="interleaved rounds per size (>= 5 for reported figures)"
    )
    parser.add_argument(
        "--min-rep-s", type=float, default=0.2, help="repeat a call within a rep up to this long"
    )
    parser.add_argument("--max-calls", type=int, default=50, help="cap on calls per rep")
    parser.add_argument("--quick", action="store_true", help="smoke test: sizes 32 64, 3 reps, short reps")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-RSS subprocesses")
    parser.add_argument(
        "--no-autograd-above", type=int, default=1024, help="skip wf_autograd for N above this"
    )
    parser.add_argument("--grad-n", type=int, default=1024, help="N for the fp32-vs-fp64 gradient error")
    parser.add_argument(
        "--retry-noisy", type=int, default=1, help="re-time a size this often if others used CPU"
    )
    parser.add_argument("--ftz", action="store_true", help="torch.set_flush_denormal(True) for the whole run")
    parser.add_argument("--variants", nargs="+", default=None, help="subset of variants to time")
    parser.add_argument("--probe", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        memory_probe(args.probe[0], int(args.probe[1]))
        return
    if args.quick:
        args.sizes, args.reps, args.min_rep_s, args.grad_n = [32, 64], 3, 0.02, 128
    torch.set_num_threads(2)
    if args.ftz:
        torch.set_flush_denormal(True)
    import numba

    variants = make_variants()
    names = args.variants or list(variants)
    print(
        f"# soft-DTW pipeline benchmark: B={BATCH} D={DIM} gamma={GAMMA} torch={torch.__version__} "
        f"numba={numba.__version__} threads torch={torch.get_num_threads()} numba={numba.config.NUMBA_NUM_THREADS} "
        f"ftz={args.ftz} cpu={os.cpu_count()} load={os.getloadavg()[0]:.2f}"
    )
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    results: dict[int, dict[str, list[float]]] = {}
    for n in args.sizes:
        active = [v for v in names if not (v == "wf_autograd" and n > args.no_autograd_above)]
        times, others = time_size(n, variants, active, args.reps, args.min_rep_s, args.max_calls)
        for attempt in range(
            args.retry_noisy
        ):  # another process stole CPU: time this size again, keep the quietest
            if others <= NOISY_CORES:
                break
            print(
                f"# N={n}: other processes used {others:.2f} cores, retrying ({attempt + 1}/{args.retry_noisy})"
            )
            retry, retry_others = time_size(n, variants, active, args.reps, args.min_rep_s, args.max_calls)
            if retry_others < others:
                times, others = retry, retry_others
        results[n] = times
        print(
            f"\n## N = M = {n}  (other processes used {others:.2f} cores during timing"
            f"{'; FIGURES SUSPECT' if others > NOISY_CORES else ''}; threading layer {numba.threading_layer()})"
        )
        print("| variant | median ms [min-max] |\n|---|---|")
        for name in active:
            print(f"| {name} | {_fmt_ms(times[name])} |")

    med = {n: {k: statistics.median(v) for k, v in res.items()} for n, res in results.items()}
    ratios = [
        ("tslearn / numba (target >= 2)", "tslearn", "numba"),
        ("pysdtw / numba", "pysdtw", "numba"),
        ("wf_autograd / numba (target >= 15)", "wf_autograd", "numba"),
        ("wf_autograd / torch (G1 fallback >= 2.5)", "wf_autograd", "torch"),
        ("torch / numba", "torch", "numba"),
        ("numba / cost_only (G3 <= 8)", "numba", "cost_only"),
        ("div / numba (target <= 4)", "div", "numba"),
        ("div / div_3calls (G5 <= 1)", "div", "div_3calls"),
    ]
    print("\n## Ratios of medians (full pipeline)\n")
    print("| ratio | " + " | ".join(f"N={n}" for n in med) + " |")
    print("|---|" + "---|" * len(med))
    for label, a, b in ratios:
        cells = [f"{m[a] / m[b]:.2f}" if a in m and b in m else "-" for m in med.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\n## DP only (fixed cost matrix, no cost-matrix work), median ms\n")
    print(
        "| N | numba fwd | numba bwd | bwd / fwd (G7 <= 0.5) | numba fwd+bwd | tslearn fwd+bwd | tslearn / numba |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        dp = time_dp_only(n, args.reps)
        fwd, both, ts = dp["numba fwd"], dp["numba fwd+bwd"], dp["tslearn fwd+bwd"]
        print(
            f"| {n} | {fwd * 1e3:.2f} | {(both - fwd) * 1e3:.2f} | {(both - fwd) / fwd:.2f} | {both * 1e3:.2f} | "
            f"{ts * 1e3:.2f} | {ts / both:.1f} |"
        )
    sizes = sorted(med)
    for lo, hi in zip(sizes, sizes[1:]):
        if "numba" in med[lo] and "numba" in med[hi]:
            print(f"\nscaling numba N={lo}->{hi}: {med[hi]['numba'] / med[lo]['numba']:.2f}x")

    for gamma in (GAMMA, 1e-3):
        print(
            f"\n## fp32 gradient error vs float64, N = M = {args.grad_n}, gamma = {gamma} (max|dg| / max|g|)\n"
        )
        for key, val in gradient_error(args.grad_n, gamma).items():
            print(f"- {key}: {val:.3g}" if isinstance(val, float) else f"- {key}: {val}")

    if not args.no_memory:
        n = max(args.sizes)
        print(f"\n## Peak memory at N = M = {n} (fresh subprocess per variant, peak of the second call)\n")
        print(
            "| variant | RSS before the call MB | peak RSS MB | peak - before MB | median ms |\n|---|---|---|---|---|"
        )
        for name in names:
            if name == "wf_autograd" and n > args.no_autograd_above:
                continue
            mem = measure_memory(name, n)
            if mem:
                t = f"{med[n][name] * 1e3:.1f}" if name in med[n] else "-"
                print(
                    f"| {name} | {mem['setup_mb']:.0f} | {mem['peak_mb']:.0f} | "
                    f"{mem['peak_mb'] - mem['setup_mb']:.0f} | {t} |"
                )


if __name__ == "__main__":
    main()
