"""Smoke tests of the benchmark scripts at toy sizes: they run, agree with their references, and report.

The figures themselves are not asserted (timings belong in docs/BENCHMARKS.md, not in tests); what is
asserted could fail: teacher_kl.py checks that its two teacher-space KL variants give the same KL, entropy
and gradient before timing them, and soft_dtw.py prints its ratio table and a float64 cross-check.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    res = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.stdout


def test_teacher_kl_benchmark_variants_agree():
    out = _run(
        "benchmarks/teacher_kl.py",
        "--rows",
        "11",
        "--vocab",
        "97",
        "--dim",
        "8",
        "--chunk",
        "4",
        "--reps",
        "1",
        "--chunks",
        "2,8",
    )
    assert re.search(r"recompute / ours = \d+\.\d\d", out)
    assert "| ours |" in out and "| recompute |" in out
    # the chunk sweep and the objective's default (the cached entropy: the KL alone) are timed beside them
    assert "| ours, chunk 2 |" in out and "| ours, no entropy, chunk 16 (auto) |" in out  # d=8: the floor
    assert re.search(r"/ ours, no entropy, chunk 16 \(auto\) = \d+\.\d\d", out)


def test_soft_dtw_benchmark_quick():
    out = _run("benchmarks/soft_dtw.py", "--quick", "--no-memory", "--retry-noisy", "0")
    assert "tslearn / numba (target >= 2)" in out
    # the float64 torch and numba paths must agree (the oracle cross-check the benchmark prints)
    errs = [float(x) for x in re.findall(r"oracle cross-check\): ([0-9.e+-]+)", out)]
    assert errs and max(errs) < 1e-9


def test_quality_table_pools_bpb_on_the_common_slice_and_reports_spread():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    def metrics(rouge, rows):
        return {
            "sets": {
                "a": {"rougeL_mean": rouge, "bits_per_byte": 1.0, "n_bpb": len(rows), "bpb_rows": rows},
                "b": {"rougeL_mean": rouge + 1, "bits_per_byte": 2.0, "n_bpb": len(rows), "bpb_rows": rows},
            },
            "train_seconds": 10.0,
        }

    ln2 = 0.6931471805599453
    rows1 = [[ln2 * 8, 8], [ln2 * 2, 1], None]  # pooled over the first 2 rows: 10 bits / 9 bytes
    rows2 = [[ln2 * 8, 8], [ln2 * 8, 8], [100.0, 1]]
    table, summary = quality.make_table({"sft": [metrics(4.0, rows1), metrics(6.0, rows2)]}, ["a", "b"], 2)
    assert summary["sft"]["sets"]["a"]["rougeL"] == (5.0, 2**0.5)
    cb = summary["sft"]["common_bpb"]
    assert abs(cb[0] - (10 / 9 + 1.0) / 2) < 1e-9
    assert "| sft | 2 | 5.00 ± 1.41 | 6.00 ± 1.41 |" in table and "mean bpb@2" in table


def test_answer_length_cuts_answers_to_a_common_length_before_scoring(tmp_path):
    """answer_length.py: per set, mean words, the share of long answers, ROUGE-L as evaluated and ROUGE-L of the
    answers cut to their first --cap-words words against the set's own references (matched by sample id)."""
    import json

    from pipeline.records import sample_id_of

    ref = "the cat sat on the mat"
    data = tmp_path / "set.jsonl"
    data.write_text(
        json.dumps({"prompt": "p1", "output": ref}) + "\n" + json.dumps({"prompt": "p2", "output": "a b"})
    )
    sid = sample_id_of("p1", ref)
    run = tmp_path / "run" / "eval"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"config": {"sets": [{"name": "toy", "path": str(data)}]}}))
    # a correct answer followed by padding: ROUGE-L as evaluated is low, cut to 6 words it is exact
    long_answer = ref + " and then" * 20
    (run / "generations.jsonl").write_text(
        json.dumps({"set": "toy", "seed": 1, "sample_id": sid, "prediction": long_answer, "rougeL": 1.0})
        + "\n"
    )
    out = _run("benchmarks/answer_length.py", str(run), "--cap-words", "6", "--long-words", "40",
               "--names", "padded", "--json", str(tmp_path / "f.json"))  # fmt: skip
    got = json.loads((tmp_path / "f.json").read_text())["padded"]["toy"]
    assert got["n"] == 1 and got["words"] == 46 and got["long"] == 1.0 and got["rouge"] == 1.0
    assert abs(got["rouge_capped"] - 100.0) < 1e-9
    assert "| padded | 46 w, 100% long, 1.00 -> 100.00 |" in out


def test_stop_probability_reads_p_eos_after_the_reference(tmp_path, gpt2_tokenizer):
    """stop_probability.py: p(EOS) at the position after prompt + first reference, per student; checked against
    the same forward done here."""
    import json
    import math

    import torch

    from pipeline.tiny import save_tiny_model

    student = save_tiny_model(tmp_path / "s", "gpt2", gpt2_tokenizer, hidden=32, layers=1)
    data = tmp_path / "set.jsonl"
    recs = [("Say hi.", "hi there"), ("Count.", "one two three")]
    data.write_text("\n".join(json.dumps({"prompt": p, "output": o}) for p, o in recs))
    out = _run("benchmarks/stop_probability.py", f"tiny={student}", "--data", str(data), "--n", "2")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student).eval()
    want = []
    for p, o in recs:
        ids = gpt2_tokenizer(p + o, return_tensors="pt").input_ids
        with torch.no_grad():
            want.append(model(ids).logits[0, -1].log_softmax(-1)[gpt2_tokenizer.eos_token_id].item())
    row = re.search(r"\| tiny \| (-?\d+\.\d\d) \| (\d\.\d\d\d) \|", out)
    assert row, out
    assert abs(float(row.group(1)) - sum(want) / 2) < 0.006
    assert abs(float(row.group(2)) - math.exp(sum(want) / 2)) < 0.0006  # the median of two is their mean
