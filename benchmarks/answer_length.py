"""Answer length beside ROUGE-L, and ROUGE-L with every answer cut to a common length, for finished evaluations.

    python benchmarks/answer_length.py RUN_EVAL_DIR [RUN_EVAL_DIR ...] [--cap-words 50] [--names a,b,...]

ROUGE-L is an F-measure of the longest common subsequence: against long references a longer answer scores more
recall, so a method that learns to stop later can gain ROUGE-L without better content. For each evaluation
directory (what ``pipeline.evaluate`` wrote: ``generations.jsonl`` and ``metrics.json``, whose config names the
sets) this prints, per set, the mean answer length in words, the share of answers of at least ``--long-words``
words, the ROUGE-L as evaluated, and the ROUGE-L of the same answers cut to their first ``--cap-words`` words
(the scorer and references of ``pipeline.evaluate``): with every answer held to the same length, what remains
of a gap is content, not length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.evaluate import rouge_l  # noqa: E402
from pipeline.records import DataConfig, read_records  # noqa: E402


def summarise(eval_dir: Path, cap_words: int, long_words: int, scorer) -> dict[str, dict]:
    """``{set: {n, words, long, rouge, rouge_capped}}`` for one evaluation directory."""
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    paths = {s["name"]: s["path"] for s in metrics["config"]["sets"]}
    refs = {
        n: {r.sample_id: r.references for r in read_records(DataConfig(path=p, format="dskd"))}
        for n, p in paths.items()
    }
    rows: dict[str, list[dict]] = {}
    with (eval_dir / "generations.jsonl").open() as f:
        for line in f:
            r = json.loads(line)
            rows.setdefault(r["set"], []).append(r)
    out = {}
    for name, rs in rows.items():
        words = [len(r["prediction"].split()) for r in rs]
        capped = [
            rouge_l(" ".join(r["prediction"].split()[:cap_words]), refs[name][r["sample_id"]], scorer)
            for r in rs
        ]
        out[name] = {
            "n": len(rs),
            "words": statistics.mean(words),
            "long": sum(w >= long_words for w in words) / len(words),
            "rouge": statistics.mean(r["rougeL"] for r in rs),
            "rouge_capped": statistics.mean(capped),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dirs", nargs="+", help="directories written by pipeline.evaluate")
    ap.add_argument("--names", default=None, help="comma-separated row names (default: the parent dir names)")
    ap.add_argument("--cap-words", type=int, default=50, help="cut every answer to its first N words")
    ap.add_argument("--long-words", type=int, default=90, help="count answers of at least N words")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    dirs = [Path(d) for d in args.eval_dirs]
    names = args.names.split(",") if args.names else [d.parent.name for d in dirs]
    if len(names) != len(dirs):
        print("--names needs one name per directory", file=sys.stderr)
        return 2
    table = {n: summarise(d, args.cap_words, args.long_words, scorer) for n, d in zip(names, dirs)}
    sets = list(next(iter(table.values())))
    print(
        f"per set: mean words | share >= {args.long_words} words | ROUGE-L as evaluated | ROUGE-L of the first "
        f"{args.cap_words} words\n"
    )
    print("| run | " + " | ".join(sets) + " |")
    print("|---|" + "---|" * len(sets))
    for n, res in table.items():
        cells = [
            f"{r['words']:.0f} w, {100 * r['long']:.0f}% long, {r['rouge']:.2f} -> {r['rouge_capped']:.2f}"
            for r in (res[s] for s in sets)
        ]
        print(f"| {n} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
