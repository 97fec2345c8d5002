"""Teacher-space KL from cached hidden states: ours vs recomputing the logits in the backward.

    python benchmarks/teacher_kl.py [--rows 600] [--vocab 49152] [--dim 576] [--reps 5] [--chunks 64,256,1024]

Both variants compute, chunk by chunk over rows, the teacher entropy (tau=1) and
``KL_tau(softmax(W h_T) || softmax(W h_s2t))`` per row, then ``kl.sum().backward()``:

* ``recompute``: the design of session 1 (and of memory-lean KD code in general): the forward keeps only
  the row inputs; the backward recomputes both ``[chunk, V]`` logit slabs and forms the gradient: five
  products with the ``[V, d]`` head per chunk.
* ``ours``: ``student_train.losses.divergences.teacher_entropy_and_kl``: row i's KL depends on row i only,
  so its Jacobian ``(softmax(z_s2t/tau) - softmax(z_T/tau)) / tau @ W`` is formed in the forward, while both
  softmaxes are at hand, and kept as ``[N, d]``; the backward only scales it: three products per chunk.

Then (issue #12) the variants of ours that the objective chooses between, timed side by side: ``ours`` at each
of ``--chunks`` and at the automatic chunk (``divergences.auto_chunk_size``), and ``ours, no entropy`` (the
objective's default since the cache's ``entropy`` column feeds eq (14): the KL alone, no entropy pass). Last,
the change inside each chunk: the two logit slabs as two products with the head (the code before) against one
product of the stacked rows (now), interleaved, at the automatic chunk.

Defaults are SmolLM2-135M's head (V=49,152, d=576) and ~600 response positions (a micro-batch of 4 Dolly
samples). One process, interleaved repetitions after a warm-up, medians; peak RSS is sampled per variant.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_step import PeakRSS  # noqa: E402
from student_train.losses.divergences import auto_chunk_size, teacher_entropy_and_kl  # noqa: E402


class _RecomputeKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s2t_rows, teacher_rows, head, temperature, chunk):
        n = teacher_rows.shape[0]
        kl, ent = s2t_rows.new_zeros(n), s2t_rows.new_zeros(n)
        for s in range(0, n, chunk):
            zt = teacher_rows[s : s + chunk] @ head.T
            lt1 = F.log_softmax(zt, dim=-1)
            ent[s : s + chunk] = -(lt1.exp() * lt1).sum(-1)
            ltt = F.log_softmax(zt / temperature, dim=-1)
            lq = F.log_softmax((s2t_rows[s : s + chunk] @ head.T) / temperature, dim=-1)
            kl[s : s + chunk] = (ltt.exp() * (ltt - lq)).sum(-1)
        ctx.save_for_backward(s2t_rows, teacher_rows, head)
        ctx.temperature, ctx.chunk = temperature, chunk
        return kl, ent

    @staticmethod
    def backward(ctx, grad_kl, grad_ent):
        s2t_rows, teacher_rows, head = ctx.saved_tensors
        tau, grad = ctx.temperature, torch.zeros_like(s2t_rows)
        for s in range(0, teacher_rows.shape[0], ctx.chunk):
            pt = F.softmax((teacher_rows[s : s + ctx.chunk] @ head.T) / tau, dim=-1)
            q = F.softmax((s2t_rows[s : s + ctx.chunk] @ head.T) / tau, dim=-1)
            grad[s : s + ctx.chunk] = ((q - pt) * (grad_kl[s : s + ctx.chunk] / tau).unsqueeze(-1)) @ head
        return grad, None, None, None, None


def recompute(h, head, s2t, temperature, chunk):
    kl, ent = _RecomputeKL.apply(s2t, h, head, temperature, chunk)
    return ent, kl


def ours(h, head, s2t, temperature, chunk):
    return teacher_entropy_and_kl(h, head, s2t, temperature=temperature, chunk_size=chunk)


def ours_no_entropy(h, head, s2t, temperature, chunk):
    _, kl = teacher_entropy_and_kl(h, head, s2t, temperature=temperature, chunk_size=chunk, entropy=False)
    return None, kl


def peak_during(fn) -> tuple[float, float]:
    """Seconds of ``fn()`` and its peak RSS above the RSS it started from, in MB."""
    before = psutil.Process().memory_info().rss / 2**20
    with PeakRSS() as mem:
        start = time.perf_counter()
        fn()
        secs = time.perf_counter() - start
    return secs, mem.peak_mb - before


def products(h, head, s2t, chunk, reps):
    """Median seconds of one chunk's two logit slabs: two products with the head vs one stacked product."""
    a, b = h[:chunk], s2t[:chunk]

    def two():
        return a @ head.T, b @ head.T

    def one():
        z = torch.cat([a, b]) @ head.T
        return z[: len(a)], z[len(a) :]

    x, y = two()
    u, v = one()
    torch.testing.assert_close(x, u)
    torch.testing.assert_close(y, v)
    times = {"two": [], "one": []}
    for r in range(max(reps, 5)):
        for name, fn in (("two", two), ("one", one))[:: 1 if r % 2 else -1]:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return statistics.median(times["two"]), statistics.median(times["one"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--chunks", default="", help="comma-separated chunk sizes timed for ours (beside --chunk)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.rows, args.dim, generator=g) * 0.05
    head = torch.randn(args.vocab, args.dim, generator=g) * 0.05
    s2t0 = torch.randn(args.rows, args.dim, generator=g) * 0.05

    def call(fn, chunk=args.chunk):
        s2t = s2t0.clone().requires_grad_()
        ent, kl = fn(h, head, s2t, args.temperature, chunk)
        kl.sum().backward()
        return kl.detach(), ent, s2t.grad

    ref, mine = call(recompute), call(ours)  # warm-up, and the two must agree
    for a, b, name in zip(ref, mine, ("kl", "entropy", "grad")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    auto = auto_chunk_size(args.vocab, args.dim)
    kl_only, _, g_only = call(ours_no_entropy, auto)
    torch.testing.assert_close(kl_only, mine[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_only, mine[2], rtol=1e-4, atol=1e-6)
    variants = {"recompute": (recompute, args.chunk), "ours": (ours, args.chunk)}
    for c in sorted({int(c) for c in args.chunks.split(",") if c} | {auto}):
        variants[f"ours, chunk {c}{' (auto)' if c == auto else ''}"] = (ours, c)
    variants[f"ours, no entropy, chunk {auto} (auto)"] = (ours_no_entropy, auto)
    times = {k: [] for k in variants}
    peaks = dict.fromkeys(variants, 0.0)
    for r in range(args.reps):
        for name in list(variants)[:: 1 if r % 2 == 0 else -1]:
            fn, chunk = variants[name]
            secs, peak = peak_during(lambda fn=fn, chunk=chunk: call(fn, chunk))
            times[name].append(secs)
            peaks[name] = max(peaks[name], peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"teacher-space KL + entropy, fwd+bwd: N={args.rows} rows, d={args.dim}, V={args.vocab}, chunk {args.chunk}, "
        f"tau {args.temperature}, {args.reps} interleaved reps, {args.threads} threads"
    )
    print("\n| variant | median ms | peak RSS above start MB |\n|---|---|---|")
    for k in variants:
        print(f"| {k} | {med[k] * 1e3:.0f} | {peaks[k]:.0f} |")
    print(f"\nrecompute / ours = {med['recompute'] / med['ours']:.2f}")
    new = f"ours, no entropy, chunk {auto} (auto)"
    print(f"ours (chunk {args.chunk}, entropy pass) / {new} = {med['ours'] / med[new]:.2f}")
    two, one = products(h, head, s2t0, auto, args.reps)
    print(
        f"one chunk's logits ({min(auto, args.rows)} rows per side): two products {two * 1e3:.1f} ms, one stacked product "
        f"{one * 1e3:.1f} ms = {two / one:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
