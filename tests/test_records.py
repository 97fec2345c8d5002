"""Record readers: layouts, policies, errors that name file and line."""

from __future__ import annotations

import json

import pytest

from pipeline.records import (
    PROMPT_NO_INPUT,
    DataConfig,
    ReadStats,
    RecordError,
    read_records,
    sample_id_of,
)


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return p


def test_dskd_layout_string_and_list_outputs(tmp_path):
    p = _write(tmp_path, [{"prompt": "P1", "output": "R1"}, {"prompt": "P2", "output": ["A", "B"]}])
    recs = list(read_records(DataConfig(path=str(p))))
    assert [r.prompt for r in recs] == ["P1", "P2"]
    assert recs[1].response == "A" and recs[1].references == ("A", "B")
    assert recs[0].sample_id == sample_id_of("P1", "R1") and len(recs[0].sample_id) == 32


def test_dolly_raw_layout_uses_alpaca_template(tmp_path):
    p = _write(
        tmp_path,
        [
            {"instruction": "Name a fruit", "context": "", "response": "Apple"},
            {"instruction": "Summarise", "context": "Some text", "response": "Short"},
        ],
    )
    recs = list(read_records(DataConfig(path=str(p), format="dolly")))
    assert recs[0].prompt == PROMPT_NO_INPUT.format(instruction="Name a fruit")
    assert "### Input:\nSome text\n\n### Response:\n" in recs[1].prompt


def test_malformed_line_names_file_and_line(tmp_path):
    p = _write(tmp_path, [{"prompt": "a", "output": "b"}, '{"prompt": "x", "output": '])
    with pytest.raises(RecordError, match=r"d\.jsonl:2: malformed JSON"):
        list(read_records(DataConfig(path=str(p))))
    p2 = _write(tmp_path, [{"prompt": "a", "output": "b"}, {"prompt": "x"}], "e.jsonl")
    with pytest.raises(RecordError, match=r"e\.jsonl:2: cannot tell the record layout"):
        list(read_records(DataConfig(path=str(p2))))
    p3 = _write(tmp_path, [{"prompt": 3, "output": "b"}], "f.jsonl")
    with pytest.raises(RecordError, match=r"f\.jsonl:1: field 'prompt' must be a string"):
        list(read_records(DataConfig(path=str(p3))))


def test_empty_responses_and_duplicates_are_counted(tmp_path):
    p = _write(
        tmp_path,
        [
            {"prompt": "a", "output": "  "},
            {"prompt": "a", "output": "b"},
            {"prompt": "a", "output": "b"},
            {"prompt": "c", "output": "d"},
        ],
    )
    stats = ReadStats()
    recs = list(read_records(DataConfig(path=str(p)), stats))
    assert len(recs) == 2
    assert (stats.read, stats.kept, stats.skipped_empty, stats.duplicates) == (4, 2, 1, 1)
    with pytest.raises(RecordError, match=r"d\.jsonl:1: empty response"):
        list(read_records(DataConfig(path=str(p), on_empty="error")))


def test_parquet_and_hf_local_dataset(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "output": f"r{i}"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    assert [r.response for r in read_records(DataConfig(path=str(tmp_path / "x.parquet")))] == [
        f"r{i}" for i in range(5)
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    recs = list(read_records(DataConfig(path=str(tmp_path / "saved"), format="hf")))
    assert [r.prompt for r in recs] == [f"p{i}" for i in range(5)]


def test_max_records_and_unknown_suffix(tmp_path):
    p = _write(tmp_path, [{"prompt": f"p{i}", "output": "r"} for i in range(10)])
    assert len(list(read_records(DataConfig(path=str(p), max_records=3)))) == 3
    with pytest.raises(RecordError, match="cannot infer the format"):
        list(read_records(DataConfig(path=str(tmp_path / "x.csv"))))


@pytest.mark.needs_shared_data
def test_real_dskd_files(shared_data):
    stats = ReadStats()
    recs = list(read_records(DataConfig(path=str(shared_data / "dskd/dolly/dev.jsonl")), stats))
    assert stats.read == 1000 and len(recs) + stats.skipped_empty + stats.duplicates == 1000
    assert all(r.prompt.startswith("Below is an instruction") for r in recs)
    sinst = list(read_records(DataConfig(path=str(shared_data / "dskd/sinst/11_/valid.jsonl"))))
    assert len(sinst) > 1000 and all(r.references for r in sinst)


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    from pipeline.records import DataConfig, RecordError, read_records

    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "output": "b"}\n{"prompt": "caf\xe9", "output": "x"}\n')
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        list(read_records(DataConfig(path=str(path), format="dskd")))


def test_seen_ids_agree_with_a_set_across_merges():
    """The compact de-duplication set: same answers as a Python set, before and after its bulk merges, for
    ids whose last bytes are NUL (numpy's S16 items drop them)."""
    import random

    from pipeline.records import SeenIds, sample_id_of

    rng = random.Random(0)
    ids = [sample_id_of(str(rng.randrange(500)), "r") for _ in range(3000)]
    ids += ["ab" * 15 + "00", "ab" * 14 + "0000", "00" * 16]
    seen, ref = SeenIds(merge_every=7), set()
    for i in ids:
        assert seen.add(i) == (i not in ref)
        ref.add(i)
    assert len(seen) == len(ref) and all(i in seen for i in ref)
    assert sample_id_of("never", "seen") not in seen and "ab" * 16 not in seen
