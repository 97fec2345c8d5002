"""Evaluation as the DSKD lineage does it: sampled generation, ROUGE-L over 5 seeds, plus bits-per-byte.

    python -m pipeline.evaluate --checkpoint runs/x/export --config configs/eval/dskd_protocol.yaml [key=value ...]

Protocol (METHOD.md §7): prompts tokenised without special tokens and truncated to their first
``max_prompt_length`` tokens, left-padded; sampling at temperature 1, top-p 1, top-k 0, with
``no_repeat_ngram_size`` (6 in DSKD, silently active there: reported here); at most ``max_new_tokens``;
stop at EOS; the text cut at the first ``<|endoftext|>`` and stripped. ROUGE-L F (rouge_score, Porter
stemmer), max over references, mean over samples, x100; averaged over the seeds per benchmark.
Bits-per-byte of the reference responses given the prompt (teacher-forced, EOS excluded) is comparable
across tokenizers. An optional pairwise LLM judge runs only when ``judge.endpoint`` is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import PRINT_CONFIG_HELP, describe, field, load_config, print_config, to_dict
from pipeline.records import DataConfig, read_records

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dskd"


@dataclass
class EvalSet:
    """One benchmark."""

    name: str = field("", help="display name (e.g. dolly)")
    path: str = field("", help="DSKD-format jsonl (prompt, output as string or list of references)")


@dataclass
class JudgeConfig:
    """Optional pairwise LLM judge against any OpenAI-compatible endpoint (off unless endpoint is set)."""

    endpoint: str | None = field(None, help="base URL of an OpenAI-compatible API, e.g. http://host:8000/v1")
    model: str = field("gpt-4.1", help="judge model name")
    api_key_env: str = field("OPENAI_API_KEY", help="environment variable holding the API key")
    baseline: str | None = field(None, help="metrics.json of the model to compare against (its generations)")
    samples: int = field(100, help="random instructions judged (first eval set)")


@dataclass
class EvalConfig:
    """What to evaluate and how."""

    sets: list[EvalSet] = field(default_factory=list, help="benchmarks")
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50], help="sampling seeds")
    max_samples: int | None = field(
        None, help="generate for at most the first N samples per set (quick runs)"
    )
    bpb_max_samples: int | None = field(
        None, help="bits-per-byte over at most the first N samples per set (null = the whole set)"
    )
    max_prompt_length: int = field(256, help="prompt keeps its first N tokens")
    max_new_tokens: int = field(256, help="generation budget (512 - 256 in DSKD)")
    temperature: float = field(1.0, help="sampling temperature")
    top_p: float = field(1.0, help="nucleus sampling")
    no_repeat_ngram_size: int = field(6, help="DSKD default 6 (0 = off)")
    batch_size: int = field(16, help="prompts per generate call (and sequences per bits-per-byte forward)")
    device: str = field(
        "auto", help="auto (the accelerator when there is one, else cpu), cpu, cuda, cuda:N, mps"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        "float32", help="dtype the model is evaluated in (bfloat16 on accelerators halves memory and time)"
    )
    engine: Literal["hf", "vllm"] = field(
        "hf",
        help="generation engine: hf (transformers generate) or vllm (when installed; it has no "
        "no_repeat_ngram_size, so that must be 0). Bits-per-byte always runs through transformers",
    )
    bits_per_byte: bool = field(True, help="also compute reference bits-per-byte")
    output: str = field(
        "", help="directory for metrics.json, results.md, generations.jsonl (default: <checkpoint>/eval)"
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig, help="optional LLM judge")


def dskd_sets(root: Path = SHARED) -> list[EvalSet]:
    """The paper's four test sets in DSKD's processed copies."""
    return [
        EvalSet("dolly", str(root / "dolly/valid.jsonl")),
        EvalSet("self-inst", str(root / "self-inst/valid.jsonl")),
        EvalSet("vicuna", str(root / "vicuna/valid.jsonl")),
        EvalSet("s-ni", str(root / "sinst/11_/valid.jsonl")),
    ]


def rouge_l(prediction: str, references: list[str] | tuple[str, ...], scorer=None) -> float:
    """ROUGE-L F-measure x100, max over references (rouge_score, Porter stemmer)."""
    from rouge_score import rouge_scorer

    scorer = scorer or rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def clean_generation(text: str) -> str:
    """DSKD post-processing: cut at the first '<|endoftext|>' and strip."""
    return text.split("<|endoftext|>")[0].strip()


def _prompt_ids(tok, prompt: str, max_prompt_length: int) -> list[int]:
    return tok(prompt, add_special_tokens=False)["input_ids"][:max_prompt_length]


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when CUDA is available, else ``mps`` when available, else ``cpu``; an explicit
    accelerator that is not there is an error, not a silent fallback to CPU."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"eval.device={name}: CUDA is not available on this machine (use auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("eval.device=mps: MPS is not available on this machine (use auto or cpu)")
    return name


def check_engine(cfg: EvalConfig) -> None:
    """The vLLM engine must be importable and the protocol expressible in it; a clear error otherwise."""
    if cfg.engine != "vllm":
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "eval.engine=vllm: vLLM is not installed in this environment (pip install vllm, on a CUDA machine); "
            "or use eval.engine=hf"
        )
    if cfg.no_repeat_ngram_size:
        raise ValueError(
            f"eval.engine=vllm has no no_repeat_ngram_size (DSKD's protocol uses {cfg.no_repeat_ngram_size}); set "
            "eval.no_repeat_ngram_size=0 to accept that departure, or use eval.engine=hf"
        )


def generate_vllm(llm, prompts: list[str], tok, cfg: EvalConfig, seed: int) -> list[str]:
    """Sampled continuations with vLLM (same prompt truncation, temperature, top-p, budget and cleaning)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(
        temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=seed
    )
    inputs = [TokensPrompt(prompt_token_ids=_prompt_ids(tok, p, cfg.max_prompt_length)) for p in prompts]
    outs = llm.generate(inputs, params, use_tqdm=False)
    return [clean_generation(o.outputs[0].text) for o in outs]


def generate(model, tok, prompts: list[str], cfg: EvalConfig, seed: int, progress=None) -> list[str]:
    """Sampled continuations of ``prompts`` (left-padded batches), decoded and cleaned."""
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    outs: list[str] = []
    for s in range(0, len(prompts), cfg.batch_size):
        ids = [_prompt_ids(tok, p, cfg.max_prompt_length) for p in prompts[s : s + cfg.batch_size]]
        width = max(len(x) for x in ids)
        x = torch.full((len(ids), width), pad, dtype=torch.long)
        m = torch.zeros_like(x)
        for i, row in enumerate(ids):
            x[i, width - len(row) :] = torch.tensor(row)
            m[i, width - len(row) :] = 1
        device = next(model.parameters()).device
        with torch.no_grad():
            gen = model.generate(
                input_ids=x.to(device),
                attention_mask=m.to(device),
                do_sample=True,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=0,
                no_repeat_ngram_size=cfg.no_repeat_ngram_size or None,
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=pad,
            )
        for row in gen[:, width:]:
            outs.append(clean_generation(tok.decode(row.tolist(), skip_special_tokens=True)))
        if progress is not None:
            progress.update(len(ids))
    return outs


def _bpb_rows(tok, prompts, references, cfg: EvalConfig) -> list[tuple[list[int], int, int] | None]:
    """(prompt+reference ids, first scored target index, reference bytes) per reference (None if empty)."""
    rows: list[tuple[list[int], int, int] | None] = []
    for p, r in zip(prompts, references):
        if not r.strip():
            rows.append(None)
            continue
        p_ids = _prompt_ids(tok, p, cfg.max_prompt_length)
        enc = tok(r, add_special_tokens=False, return_offsets_mapping=True)
        r_ids = enc["input_ids"][: cfg.max_new_tokens]
        if not r_ids:
            rows.append(None)
            continue
        kept = r[: enc["offset_mapping"][len(r_ids) - 1][1]]
        rows.append((p_ids + r_ids, max(len(p_ids) - 1, 0), len(kept.encode("utf-8"))))
    return rows


def bits_per_byte(model, tok, prompts: list[str], references: list[str], cfg: EvalConfig) -> float:
    """Teacher-forced reference bits per UTF-8 byte given the prompt (EOS excluded), pooled over the set.

    References are cut to ``max_new_tokens`` tokens (the generation budget); only the bytes of the kept
    characters count. Rows are scored in right-padded batches of ``batch_size`` sorted by length
    (padding is masked out; causal attention makes each row's scores those of the row alone).
    """
    per_row = bits_per_byte_rows(model, tok, prompts, references, cfg)
    return pooled_bpb(per_row)


def pooled_bpb(per_row: list[list[float] | None]) -> float:
    """Bits per byte pooled over rows of ``[nats, bytes]`` (None rows skipped)."""
    rows = [r for r in per_row if r is not None]
    return sum(r[0] for r in rows) / math.log(2) / max(sum(r[1] for r in rows), 1)


def bits_per_byte_rows(model, tok, prompts, references, cfg: EvalConfig) -> list[list[float] | None]:
    """Per reference ``[nats, bytes]`` (None for an empty one), in input order: any slice pools later."""
    import torch

    rows = _bpb_rows(tok, prompts, references, cfg)
    live = [i for i, r in enumerate(rows) if r is not None]
    order = sorted(live, key=lambda i: len(rows[i][0]))
    device = next(model.parameters()).device
    out: list[list[float] | None] = [None] * len(rows)
    for s in range(0, len(order), max(cfg.batch_size, 1)):
        idx = order[s : s + cfg.batch_size]
        batch = [rows[i] for i in idx]
        width = max(len(ids) for ids, _, _ in batch)
        x = torch.zeros((len(batch), width), dtype=torch.long)
        m = torch.zeros_like(x)
        for i, (ids, _, _) in enumerate(batch):
            x[i, : len(ids)] = torch.tensor(ids)
            m[i, : len(ids)] = 1
        with torch.no_grad():
            logits = model(input_ids=x.to(device), attention_mask=m.to(device)).logits.float()
        for i, (ids, start, nb) in enumerate(batch):
            lp = logits[i, : len(ids) - 1].log_softmax(-1)
            tgt = x[i, 1 : len(ids)].to(device)
            out[idx[i]] = [-lp[torch.arange(start, len(tgt), device=device), tgt[start:]].sum().item(), nb]
    return out


def evaluate(checkpoint: str, cfg: EvalConfig, progress: bool = True) -> dict:
    """Run every set x seed; returns (and writes) the metrics."""
    import torch
    from rouge_score import rouge_scorer
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import resolve

    path = resolve(checkpoint)  # model:NAME -> its prepared HF folder (e.g. to score a teacher)
    tok = AutoTokenizer.from_pretrained(path)
    device = resolve_device(cfg.device)
    check_engine(cfg)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype)).to(device).eval()
    llm = None
    if cfg.engine == "vllm":
        from vllm import LLM

        llm = LLM(model=path, dtype=cfg.dtype, seed=0)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out_dir = Path(cfg.output or Path(checkpoint) / "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"checkpoint": str(checkpoint), "config": to_dict(cfg), "device": device, "sets": {}}
    gens = (out_dir / "generations.jsonl").open("w")
    for es in cfg.sets:
        all_recs = list(read_records(DataConfig(path=es.path, format="dskd")))
        recs = all_recs[: cfg.max_samples]
        bpb_recs = all_recs[: cfg.bpb_max_samples]
        prompts = [r.prompt for r in recs]
        per_seed = []
        bar = tqdm(
            total=len(prompts) * len(cfg.seeds),
            desc=f"eval {es.name}",
            disable=not progress,
            dynamic_ncols=True,
        )
        t = time.time()
        for seed in cfg.seeds:
            if llm is not None:
                preds = generate_vllm(llm, prompts, tok, cfg, seed)
                bar.update(len(prompts))
            else:
                preds = generate(model, tok, prompts, cfg, seed, bar)
            scores = [rouge_l(p, r.references, scorer) for p, r in zip(preds, recs)]
            per_seed.append(statistics.mean(scores))
            for r, p, sc in zip(recs, preds, scores):
                gens.write(
                    json.dumps(
                        {
                            "set": es.name,
                            "seed": seed,
                            "sample_id": r.sample_id,
                            "prediction": p,
                            "rougeL": sc,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
        bar.close()
        entry = {
            "n": len(recs),
            "n_bpb": len(bpb_recs) if cfg.bits_per_byte else 0,
            "rougeL_mean": statistics.mean(per_seed),
            "rougeL_std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
            "rougeL_per_seed": per_seed,
            "seconds": round(time.time() - t, 1),
        }
        if cfg.bits_per_byte:
            t = time.time()
            per_row = bits_per_byte_rows(
                model, tok, [r.prompt for r in bpb_recs], [r.response for r in bpb_recs], cfg
            )
            entry["bits_per_byte"] = pooled_bpb(per_row)
            entry["bpb_rows"] = per_row  # [nats, bytes] per reference, in set order: any prefix pools again
            entry["bpb_seconds"] = round(time.time() - t, 1)
        results["sets"][es.name] = entry
    gens.close()
    means = [v["rougeL_mean"] for v in results["sets"].values()]
    results["rougeL_avg"] = statistics.mean(means) if means else float("nan")
    if cfg.judge.endpoint:
        results["judge"] = run_judge(cfg, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(
        markdown_table({Path(checkpoint).parent.name or str(checkpoint): results})
    )
    return results


def markdown_table(runs: dict[str, dict]) -> str:
    """One row per run: ROUGE-L mean±std per set, the average, and bits-per-byte per set."""
    names = list(next(iter(runs.values()))["sets"]) if runs else []
    head = (
        "| model | "
        + " | ".join(f"{n} ROUGE-L" for n in names)
        + " | avg | "
        + " | ".join(f"{n} bpb" for n in names)
        + " |"
    )
    lines = [head, "|" + "---|" * (2 * len(names) + 2)]
    for run, res in runs.items():
        cells = [f"{res['sets'][n]['rougeL_mean']:.2f} ± {res['sets'][n]['rougeL_std']:.2f}" for n in names]
        bpb = [f"{res['sets'][n].get('bits_per_byte', float('nan')):.3f}" for n in names]
        lines.append(
            f"| {run} | " + " | ".join(cells) + f" | {res['rougeL_avg']:.2f} | " + " | ".join(bpb) + " |"
        )
    return "\n".join(lines) + "\n"


def run_judge(cfg: EvalConfig, out_dir: Path) -> dict:
    """Pairwise judge (positions randomised) of this run's first-seed generations vs a baseline's."""
    import urllib.request

    key = os.environ.get(cfg.judge.api_key_env, "")
    if not cfg.judge.baseline:
        raise ValueError("judge.endpoint is set but judge.baseline (another run's eval dir) is not")
    first = cfg.sets[0].name

    def load(path: Path) -> dict[str, str]:
        rows = [json.loads(x) for x in (path / "generations.jsonl").read_text().splitlines()]
        seed = min(r["seed"] for r in rows)
        return {r["sample_id"]: r["prediction"] for r in rows if r["set"] == first and r["seed"] == seed}

    ours, theirs = load(out_dir), load(Path(cfg.judge.baseline))
    recs = {r.sample_id: r for r in read_records(DataConfig(path=cfg.sets[0].path, format="dskd"))}
    ids = sorted(set(ours) & set(theirs) & set(recs))
    random.Random(0).shuffle(ids)
    wins = ties = losses = 0
    for sid in ids[: cfg.judge.samples]:
        swap = random.random() < 0.5
        a, b = (theirs[sid], ours[sid]) if swap else (ours[sid], theirs[sid])
        prompt = (
            f"Instruction:\n{recs[sid].prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
            "Which response is better? Answer with exactly one of: A, B, TIE."
        )
        body = json.dumps(
            {"model": cfg.judge.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        ).encode()
        req = urllib.request.Request(
            cfg.judge.endpoint.rstrip("/") + "/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            verdict = json.loads(resp.read())["choices"][0]["message"]["content"].strip().upper()
        ours_won = verdict.startswith("B") if swap else verdict.startswith("A")
        theirs_won = verdict.startswith("A") if swap else verdict.startswith("B")
        wins, losses, ties = wins + ours_won, losses + theirs_won, ties + (not ours_won and not theirs_won)
    n = max(wins + ties + losses, 1)
    return {"judged": n, "win_rate": wins / n, "tie_rate": ties / n, "loss_rate": losses / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys:\n" + "\n".join(describe(EvalConfig)),
    )
    ap.add_argument("--checkpoint", required=True, help="an HF model dir (e.g. <run>/export)")
    ap.add_argument("--config", help="YAML (configs/eval/*.yaml); default: the four DSKD test sets")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:  # user mistakes in the config or the device: one line, not a traceback
        cfg = load_config(EvalConfig, args.config, args.overrides)
        resolve_device(cfg.device)
        check_engine(cfg)
    except ValueError as e:
        ap.exit(2, f"error: {e}\n")
    if not cfg.sets:
        cfg.sets = dskd_sets()
    if args.print_config:
        print_config(to_dict(cfg))
        return 0
    missing = [s.path for s in cfg.sets if not Path(s.path).exists()]
    if missing:
        raise FileNotFoundError(
            f"evaluation sets not found: {missing} (the DSKD sets live in ../shared/data/dskd)"
        )
    res = evaluate(args.checkpoint, cfg, progress=not args.no_progress)
    print(markdown_table({args.checkpoint: res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
