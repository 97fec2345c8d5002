"""The demo's closing table: mean ± std over training seeds and a verdict of KD against SFT."""

from __future__ import annotations

from pipeline.demo import kd_verdict, seed_table


def _m(rouge: float, bpb: float) -> dict:
    return {"sets": {"t": {"rougeL_mean": rouge, "bits_per_byte": bpb}}}


def test_verdict_compares_the_difference_with_the_seed_spread():
    sft = [_m(10.0, 1.0), _m(12.0, 1.2)]
    assert "beats SFT" in kd_verdict({"sft": sft, "dwa_kd": [_m(20.0, 0.5), _m(21.0, 0.52)]}, "t")[0]
    assert "loses to SFT" in kd_verdict({"sft": sft, "dwa_kd": [_m(2.0, 2.5), _m(3.0, 2.6)]}, "t")[0]
    # better ROUGE-L within the spread: a tie, said with the numbers
    line = kd_verdict({"sft": sft, "dwa_kd": [_m(12.0, 1.0), _m(12.5, 1.1)]}, "t")[0]
    assert line.startswith("dwa_kd ties SFT") and "+1.25" in line and "2 and 2 training seeds" in line
    table = seed_table({"sft": sft}, "t")
    assert "| sft | 2 | 11.00 ± 1.41 | 1.100 ± 0.141 |" in table
