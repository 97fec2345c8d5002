"""How readily a trained student stops: its probability of EOS right after a reference answer.

    python benchmarks/stop_probability.py NAME=EXPORT_DIR [NAME=EXPORT_DIR ...] [--data DSKD_JSONL] [--n 60]

For the first ``--n`` records of ``--data`` (default: DSKD's Dolly test split in ../shared), each student reads
the prompt followed by the first reference (the last 256 tokens at most) and gives ``p(EOS)`` at the next
position: a student that learnt where answers end puts mass there. Prints the mean log-probability and the
median probability per student. A student with a low value writes longer answers (see answer_length.py).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.records import DataConfig, read_records  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "dskd" / "dolly" / "valid.jsonl"


def stop_logprobs(export: str, records, max_tokens: int = 256) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    if tok.eos_token_id is None:
        raise SystemExit(f"{export}: the tokenizer has no EOS token")
    out = []
    for r in records:
        ids = tok(r.prompt + r.references[0], return_tensors="pt").input_ids[:, -max_tokens:]
        with torch.no_grad():
            out.append(model(ids).logits[0, -1].float().log_softmax(-1)[tok.eos_token_id].item())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("students", nargs="+", help="NAME=EXPORT_DIR (an HF directory with its tokenizer)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--n", type=int, default=60)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    if not Path(args.data).exists():
        print(f"{args.data} not found (needs ../shared/data or --data)", file=sys.stderr)
        return 2
    records = list(read_records(DataConfig(path=args.data, format="dskd")))[: args.n]
    print(
        f"{len(records)} records of {args.data}\n\n| student | mean log p(EOS) after the reference | median p(EOS) |"
    )
    print("|---|---|---|")
    for spec in args.students:
        name, _, export = spec.partition("=")
        lps = stop_logprobs(export, records)
        med = statistics.median(lps)
        print(f"| {name} | {statistics.mean(lps):.2f} | {math.exp(med):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
