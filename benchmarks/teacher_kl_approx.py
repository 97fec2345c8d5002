"""The opt-in approximate teacher-space KL against the exact one, on a real teacher: error and speed.

    python benchmarks/teacher_kl_approx.py --cache DIR --student DIR [--trained DIR] [--batches 2]
        [--samples 1024,4096,16384] [--seeds 5] [--reps 3]

Rows are real: the teacher's cached final states, its cached top-k ids and its 151,936-row head come from a
cache (``--cache``: the Qwen2.5-Coder-1.5B cache of the pretrained-pair benchmark); the student-to-teacher rows
``hhat_s2t`` are what DWA-KD's cross-model attention gives on the same batches, captured from a real student
forward: ``--student`` (an HF folder, e.g. the untrained pruned SmolLM2, with freshly initialised projectors:
the start of training) and ``--trained`` (an export with its projectors: the end of a DWA-KD run).

For each regime and each sample size: the relative error of the batch's summed KL (mean and spread over
``--seeds`` draws), the median per-row relative error, and the cosine between the approximate and the exact
gradient with respect to ``hhat_s2t``; then fwd+bwd time of both, interleaved, medians, peak RSS beside. Also
the cached entropy column against the entropy rebuilt from the cached (bf16) hidden states, which is what
``objective.teacher_entropy=cache`` changes in eq (14)'s weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_step import PeakRSS  # noqa: E402
from student_train.losses import objective as objective_mod  # noqa: E402
from student_train.losses.divergences import sampled_teacher_kl, teacher_entropy_and_kl  # noqa: E402
from student_train.losses.dwa import teacher_token_weights  # noqa: E402


def capture_rows(cache, student_dir: str, projectors_file: str | None, batches: int, micro_batch: int):
    """Run DWA-KD's objective on the first batches and keep what its teacher-space KL receives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.tokenize import eos_id_of
    from student_train.data import Schedule, ScheduledBatches
    from student_train.losses.cma import Projectors
    from student_train.losses.objective import ObjectiveConfig
    from student_train.model import Distiller

    tok = AutoTokenizer.from_pretrained(student_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    torch.manual_seed(0)
    proj = Projectors(student.config.hidden_size, cache.hidden_size)
    if projectors_file:
        from safetensors.torch import load_file

        proj.load_state_dict(load_file(projectors_file))
    cfg = ObjectiveConfig.preset("dwa_kd", check_inputs=False, lambda_dtw=0.0)
    head, emb = cache.load_head()[0].float(), cache.load_embeddings().float()
    model = Distiller(student, proj, cfg, head, emb)
    sched = Schedule(cache.shard_rows, 0, 1, micro_batch, 0, 0)
    kw = dict(
        tokenizer=tok, pad_id=tok.pad_token_id, eos_id=eos_id_of(tok), max_prompt_length=128, max_length=256,
        with_teacher=True, truncation="warn",
    )  # fmt: skip
    from student_train.align import BatchAlignment

    kw["alignment"] = BatchAlignment(topk=True, entropy=True)
    got = []
    real = objective_mod.teacher_entropy_and_kl

    def spy(teacher_rows, teacher_head, s2t_rows=None, **kwargs):
        got[-1].update(teacher=teacher_rows.detach().clone(), s2t=s2t_rows.detach().clone())
        return real(teacher_rows, teacher_head, s2t_rows, **kwargs)

    objective_mod.teacher_entropy_and_kl = spy
    try:
        for i, b in enumerate(ScheduledBatches(cache, sched, 0, 0, kw)):
            if i >= batches:
                break
            mask = b.t_labels.ne(-100)
            got.append(dict(topk=b.t_topk_ids[mask].long(), entropy=b.t_entropy[mask]))
            with torch.no_grad():
                model(b)
    finally:
        objective_mod.teacher_entropy_and_kl = real
    cat = {k: torch.cat([g[k] for g in got]) for k in got[0]}
    return cat, head


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument(
        "--student", required=True, help="HF folder of the student at the start (fresh projectors)"
    )
    ap.add_argument("--trained", help="an export of a DWA-KD run (its model and projectors)")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--samples", default="1024,4096,16384")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tau", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from student_train.model import projectors_path
    from teacher_cache.reader import open_cache

    cache = open_cache(args.cache)
    regimes = {"start": (args.student, None)}
    if args.trained:
        regimes["end"] = (args.trained, str(projectors_path(Path(args.trained))))
    sizes = [int(s) for s in args.samples.split(",")]
    timing_rows = None
    for name, (folder, pfile) in regimes.items():
        rows, head = capture_rows(cache, folder, pfile, args.batches, args.micro_batch)
        n = rows["teacher"].shape[0]
        s2t = rows["s2t"].float().requires_grad_(True)
        ent, exact = teacher_entropy_and_kl(rows["teacher"], head, s2t, temperature=args.tau)
        (g_exact,) = torch.autograd.grad(exact.sum(), s2t)
        exact = exact.detach()
        print(
            f"\n[{name}] {n} teacher response rows, head {tuple(head.shape)}, top-k {rows['topk'].shape[1]}, "
            f"tau {args.tau}: exact KL mean {exact.mean():.3f} nats/row"
        )
        cached = rows["entropy"].float()
        w_c = teacher_token_weights(cached[None], torch.ones(1, n, dtype=torch.bool), head.shape[0])[0]
        w_r = teacher_token_weights(ent[None], torch.ones(1, n, dtype=torch.bool), head.shape[0])[0]
        print(
            f"cached entropy vs rebuilt from the cached hidden states: max |diff| {(cached - ent).abs().max():.4f} "
            f"nats (mean H {cached.mean():.3f}); eq (14) weights max |diff| {(w_c - w_r).abs().max():.4f}"
        )
        print(
            "\n| samples | summed-KL rel. error (mean ± sd over seeds) | median row rel. error | grad cosine |"
        )
        print("|---|---|---|---|")
        for size in sizes:
            errs, row_errs, coss = [], [], []
            for seed in range(args.seeds):
                approx = sampled_teacher_kl(
                    rows["teacher"], head, s2t, rows["topk"], temperature=args.tau, samples=size, seed=seed
                )
                (g,) = torch.autograd.grad(approx.sum(), s2t)
                errs.append(float((approx.detach().sum() - exact.sum()) / exact.sum()))
                row_errs.append(float(((approx.detach() - exact).abs() / exact.clamp_min(1e-6)).median()))
                coss.append(float(F.cosine_similarity(g.flatten(), g_exact.flatten(), 0)))
            sd = statistics.stdev(errs) if len(errs) > 1 else 0.0
            print(
                f"| {size} | {statistics.mean(errs):+.4f} ± {sd:.4f} | {statistics.median(row_errs):.4f} | "
                f"{statistics.mean(coss):.4f} (min {min(coss):.4f}) |"
            )
        timing_rows = rows
    rows = timing_rows
    s2t = rows["s2t"].float().requires_grad_(True)

    def run_exact():
        _, kl = teacher_entropy_and_kl(rows["teacher"], head, s2t, temperature=args.tau, entropy=False)
        kl.sum().backward()

    variants = {"exact (auto chunk)": run_exact}
    for size in sizes:
        variants[f"sampled {size}"] = lambda size=size: (
            sampled_teacher_kl(
                rows["teacher"], head, s2t, rows["topk"], temperature=args.tau, samples=size, seed=0
            )
            .sum()
            .backward()
        )
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    peaks = dict.fromkeys(variants, 0.0)
    for _ in range(args.reps):
        for k, fn in variants.items():
            s2t.grad = None
            with PeakRSS() as mem:
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
            peaks[k] = max(peaks[k], mem.peak_mb)
    base = statistics.median(times["exact (auto chunk)"])
    print(
        f"\nfwd+bwd over {rows['teacher'].shape[0]} rows, {args.reps} interleaved reps, medians, {args.threads} threads"
    )
    print("\n| variant | median s | speed-up | peak RSS MB |\n|---|---|---|---|")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"| {k} | {m:.3f} | {base / m:.1f}x | {peaks[k]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
