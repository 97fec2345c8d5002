"""Evaluation protocol: ROUGE-L as the DSKD lineage computes it, seeded sampling, bits-per-byte, outputs."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.evaluate import EvalConfig, EvalSet, clean_generation, evaluate, markdown_table, rouge_l


def test_rouge_l_matches_rouge_score_conventions():
    assert rouge_l("The cats are running", ["the cat is running"]) == pytest.approx(
        100 * 0.75
    )  # stemmer: cats->cat
    assert rouge_l("completely different words", ["nothing shared here"]) == 0.0
    assert rouge_l("a b c", ["x y z", "a b c"]) == pytest.approx(100.0)  # max over references
    assert clean_generation("  answer here <|endoftext|> junk") == "answer here"


def test_evaluate_writes_metrics_and_is_seeded(tmp_path, gpt2_tokenizer, synthetic_jsonl):
    from pipeline.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "m", "gpt2", gpt2_tokenizer, hidden=32)
    cfg = EvalConfig(
        sets=[EvalSet("syn", str(synthetic_jsonl))],
        seeds=[1, 2],
        max_samples=6,
        max_new_tokens=12,
        batch_size=4,
        output=str(tmp_path / "ev"),
    )
    res = evaluate(str(model_dir), cfg, progress=False)
    again = evaluate(
        str(model_dir), EvalConfig(**{**vars(cfg), "output": str(tmp_path / "ev2")}), progress=False
    )
    s = res["sets"]["syn"]
    assert s["n"] == 6 and len(s["rougeL_per_seed"]) == 2 and 0 <= s["rougeL_mean"] <= 100
    assert s["rougeL_per_seed"] == again["sets"]["syn"]["rougeL_per_seed"]  # same seeds, same samples
    gens = [json.loads(x) for x in (tmp_path / "ev" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 12 and {g["seed"] for g in gens} == {1, 2}
    assert gens[0]["prediction"] != gens[6]["prediction"] or gens[1]["prediction"] != gens[7]["prediction"]
    # a random-init model is close to uniform: bits-per-byte near log2(V) * tokens/bytes
    assert 0.5 < s["bits_per_byte"] < 2 * math.log2(len(gpt2_tokenizer))
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["sets"]["syn"]["n"] == 6
    table = markdown_table({"m": res})
    assert "syn ROUGE-L" in table and "syn bpb" in table


def test_evaluate_runs_in_the_requested_dtype_on_the_resolved_device(
    tmp_path, gpt2_tokenizer, synthetic_jsonl
):
    """dtype=bfloat16 device=auto: the model is evaluated in bf16 on the accelerator when there is one (CPU
    here); an accelerator that is not there is a one-line error, not a silent CPU run."""
    import subprocess
    import sys

    import torch

    from pipeline.evaluate import resolve_device
    from pipeline.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "m", "gpt2", gpt2_tokenizer, hidden=32)
    cfg = EvalConfig(
        sets=[EvalSet("syn", str(synthetic_jsonl))],
        seeds=[1],
        max_samples=4,
        max_new_tokens=8,
        batch_size=4,
        device="auto",
        dtype="bfloat16",
        output=str(tmp_path / "ev"),
    )
    res = evaluate(str(model_dir), cfg, progress=False)
    assert res["device"] == ("cuda" if torch.cuda.is_available() else resolve_device("auto"))
    assert res["config"]["dtype"] == "bfloat16"
    s = res["sets"]["syn"]
    assert s["n"] == 4 and 0.5 < s["bits_per_byte"] < 2 * math.log2(len(gpt2_tokenizer))
    if not torch.cuda.is_available():
        args = [sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(model_dir), "device=cuda:0"]
        out = subprocess.run(args, capture_output=True, text=True)
        assert out.returncode == 2 and "eval.device=cuda:0: CUDA is not available" in out.stderr
        assert "Traceback" not in out.stderr


def test_vllm_engine_is_a_clear_error_when_absent_or_when_the_protocol_needs_what_it_lacks(tmp_path):
    """eval.engine=vllm: without vLLM installed, a one-line error naming the fix (no traceback); with it, the
    DSKD protocol's no_repeat_ngram_size must be turned off explicitly (vLLM has none)."""
    import importlib.util
    import subprocess
    import sys

    import pytest

    from pipeline.evaluate import check_engine

    if importlib.util.find_spec("vllm") is not None:
        with pytest.raises(ValueError, match="no no_repeat_ngram_size"):
            check_engine(EvalConfig(engine="vllm"))
        check_engine(EvalConfig(engine="vllm", no_repeat_ngram_size=0))
        return
    with pytest.raises(ValueError, match="vLLM is not installed"):
        check_engine(EvalConfig(engine="vllm", no_repeat_ngram_size=0))
    args = [sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(tmp_path), "engine=vllm"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "eval.engine=vllm: vLLM is not installed" in out.stderr
    assert "Traceback" not in out.stderr
    check_engine(EvalConfig())  # the default engine needs nothing
