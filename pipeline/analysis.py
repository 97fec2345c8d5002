"""Representation-similarity analysis (the paper's Appendix B), made tokenizer-independent.

    python -m pipeline.analysis --cache runs/demo/cache --student sft=runs/demo/student-sft/export \
        --student dwa_kd=runs/demo/student-dwa_kd/export --out runs/demo/structure.png

Per sample, the structure matrices of METHOD.md §3 Appendix B — ``M_cos = Ĥ Ĥᵀ`` (rows L2-normalised)
and ``M_prod = H Hᵀ`` normalised by its row sums — are compared between student and teacher with
``mean |M^S_cos - M^T_cos|`` and ``mean_i Σ_k |M^S_prod - M^T_prod|``. DSKD's script needs equal token
counts; with different tokenizers we pool each side's final hidden states over the same units, the
whitespace-separated words of the response (found through character offsets), so both matrices are
words x words. Lower is closer to the teacher. A box plot shows the distribution over samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def word_ids(offsets: np.ndarray, text: str, start_char: int) -> np.ndarray:
    """Index of the whitespace-separated word (counted from ``start_char``) each token starts in; -1 outside."""
    bounds, in_word, k = np.full(len(text) + 1, -1), False, -1
    for i in range(start_char, len(text)):
        if text[i].isspace():
            in_word = False
            continue
        if not in_word:
            k, in_word = k + 1, True
        bounds[i] = k
    out = np.full(len(offsets), -1)
    for t, (a, b) in enumerate(offsets):
        for c in range(a, max(b, a + 1)):
            if c < len(text) and bounds[c] >= 0:
                out[t] = bounds[c]
                break
    return out


def pool_words(hidden: torch.Tensor, ids: np.ndarray, n_words: int) -> torch.Tensor:
    """Mean hidden state per word ``[n_words, d]`` (rows of words no token starts in stay zero)."""
    out = torch.zeros(n_words, hidden.shape[1])
    count = torch.zeros(n_words)
    for t, w in enumerate(ids):
        if 0 <= w < n_words:
            out[w] += hidden[t]
            count[w] += 1
    return out / count.clamp_min(1)[:, None]


def student_states(model, tok, row):
    """Student tokenisation of a cached row (METHOD.md §1) and the student's final hidden states ``[L-1, d_S]``."""
    from pipeline.tokenize import eos_id_of, tokenize_pair

    t = tokenize_pair(
        tok, row.prompt, row.response, max_prompt_length=256, max_length=512, eos_id=eos_id_of(tok)
    )
    with torch.no_grad():
        out = model(torch.from_numpy(t.input_ids[None, :-1].astype(np.int64)), output_hidden_states=True)
    return t, out.hidden_states[-1][0]


def structure_distances(h_s: torch.Tensor, h_t: torch.Tensor) -> tuple[float, float]:
    """(cosine-structure distance, product-structure distance) between two ``[n, d_*]`` sequences."""

    def cos(h):
        hn = torch.nn.functional.normalize(h, dim=-1)
        return hn @ hn.T

    def prod(h):
        m = h @ h.T
        s = m.sum(-1, keepdim=True)
        return m / torch.where(s.abs() > 1e-12, s, torch.ones_like(s))

    d_cos = (cos(h_s) - cos(h_t)).abs().mean().item()
    d_prod = (prod(h_s) - prod(h_t)).abs().sum(-1).mean().item()
    return d_cos, d_prod


def analyse(cache_uri: str, students: dict[str, str], samples: int = 64) -> dict[str, dict[str, list[float]]]:
    """Per-sample structure distances of each student to the cached teacher."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from teacher_cache.reader import open_cache

    cache = open_cache(cache_uri)
    rows = []
    for r in cache.iter_rows():
        rows.append(r)
        if len(rows) >= samples:
            break
    out: dict[str, dict[str, list[float]]] = {}
    for name, path in students.items():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        res = {"cos": [], "prod": []}
        for r in rows:
            text = r.prompt + r.response
            t, hs = student_states(model, tok, r)
            ws = word_ids(t.offsets[:-1], text, len(r.prompt))
            wt = word_ids(r.offsets[:-1], text, len(r.prompt))
            n = int(min(ws.max(initial=-1), wt.max(initial=-1))) + 1  # words both sides reached (truncation)
            if n < 2:
                continue
            d_cos, d_prod = structure_distances(pool_words(hs, ws, n), pool_words(r.hidden, wt, n))
            res["cos"].append(d_cos)
            res["prod"].append(d_prod)
        out[name] = res
    return out


def box_plot(results: dict[str, dict[str, list[float]]], out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(3 + 1.2 * len(results), 3.2))
    for ax, key, title in zip(axes, ("cos", "prod"), ("cosine structure", "product structure")):
        ax.boxplot([results[n][key] for n in results], tick_labels=list(results))
        ax.set_title(f"{title}: |M_S - M_T| (lower = closer)", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.analysis",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--cache", required=True)
    ap.add_argument("--student", action="append", required=True, help="NAME=HF_DIR (repeat)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--out", default="structure.png")
    args = ap.parse_args(argv)
    students = dict(s.split("=", 1) for s in args.student)
    res = analyse(args.cache, students, args.samples)
    png = box_plot(res, args.out)
    summary = {n: {k: float(np.mean(v)) for k, v in r.items()} for n, r in res.items()}
    Path(args.out).with_suffix(".json").write_text(json.dumps({"mean": summary, "per_sample": res}, indent=2))
    print(json.dumps(summary, indent=2), f"\n-> {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
