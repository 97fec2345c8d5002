"""Teacher cache: the real Ray job on tiny teachers, fidelity against a live teacher, validation, resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _procs import kill_tree
from safetensors.torch import load_file

from pipeline.config import load_config
from teacher_cache.format import HIDDEN_DTYPES, MANIFEST, TEACHER_INFO, decode_hidden, encode_hidden
from teacher_cache.job import CacheJobConfig, run
from teacher_cache.reader import CacheError, CacheExpectation, open_cache
from teacher_cache.teacher import TeacherConfig, TeacherError, load_teacher

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _cfg(data: Path, teacher: Path, out: Path, *extra: str) -> CacheJobConfig:
    return load_config(
        CacheJobConfig,
        None,
        [
            f"data.path={data}",
            f"teacher.path={teacher}",
            f"cache.output={out}",
            "cache.rows_per_shard=16",
            "ray.batch_size=4",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def llama_cache(ray_session, tmp_path_factory, synthetic_jsonl, tiny_llama_dir):
    out = tmp_path_factory.mktemp("cache") / "llama-fp32"
    manifest = run(_cfg(synthetic_jsonl, tiny_llama_dir, out, "cache.hidden_dtype=float32"), progress=False)
    return out, manifest


def _live(model, ids: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(ids[None, :-1].astype(np.int64))).logits[0].float()


def test_cache_matches_live_teacher_fp32(llama_cache, tiny_llama_dir):
    out, manifest = llama_cache
    cache = open_cache(str(out), verify=True)
    assert cache.num_rows == 40 and len(cache.shards) == 3
    model = load_teacher(TeacherConfig(path=str(tiny_llama_dir)))
    head, bias = cache.load_head()
    assert bias is None and torch.equal(head, model.get_output_embeddings().weight)
    assert torch.equal(cache.load_embeddings(), model.get_input_embeddings().weight)
    n = 0
    for row in cache.iter_rows():
        live = _live(model, row.input_ids)
        rec = row.hidden @ head.T
        # fp32 storage: recomputed logits equal live logits up to matmul reassociation
        assert (rec - live).abs().max().item() < 1e-4
        live_lp = live.log_softmax(-1)
        np.testing.assert_allclose(row.logsumexp, torch.logsumexp(live, -1).numpy(), atol=1e-4)
        np.testing.assert_allclose(row.entropy, -(live_lp.exp() * live_lp).sum(-1).numpy(), atol=1e-4)
        vals, _ = live_lp.topk(cache.top_k, dim=-1)
        np.testing.assert_allclose(row.topk_logprobs, vals.numpy(), atol=1e-4)
        gathered = live_lp.gather(1, torch.from_numpy(row.topk_ids.astype(np.int64)))
        np.testing.assert_allclose(gathered.numpy(), row.topk_logprobs, atol=1e-4)
        # offsets point into prompt + response; the response starts where the prompt ends
        text = row.prompt + row.response
        assert (
            row.offsets[row.response_start - 1, 1]
            <= len(row.prompt)
            <= row.offsets[row.response_start, 0] + 1
        )
        assert row.offsets[-1, 0] == len(text) or manifest.stats.truncated_total > 0
        n += 1
    assert n == 40


@pytest.mark.parametrize(
    "dtype,max_kl", [("float32", 1e-9), ("float16", 1e-5), ("bfloat16", 1e-3), ("int8", 1e-2)]
)
def test_hidden_dtype_fidelity(tiny_llama_dir, dtype, max_kl):
    """Mean KL(live || recomputed from stored hidden) per stored dtype; thresholds are documented in CACHE_FORMAT.md."""
    model = load_teacher(TeacherConfig(path=str(tiny_llama_dir)))
    torch.manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (2, 50))
    with torch.no_grad():
        h = model.base_model(input_ids=x).last_hidden_state.reshape(-1, model.config.hidden_size)
    w = model.get_output_embeddings().weight
    values, scale = encode_hidden(h, dtype)
    rec = decode_hidden(values, scale, dtype)
    lp_live = (h @ w.T).log_softmax(-1)
    lp_rec = (rec @ w.T).log_softmax(-1)
    kl = (lp_live.exp() * (lp_live - lp_rec)).sum(-1).mean().item()
    assert 0 <= kl <= max_kl
    assert set(HIDDEN_DTYPES) == {"float32", "float16", "bfloat16", "int8"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_salience_hooks_keep_one_attention_map_and_equal_the_full_maps(arch, tmp_path, mistral_tokenizer):
    """teacher_forward's salience by hooks (each asked-for block reduced as it runs) equals the salience of the
    maps the model returns with output_attentions, on a right-padded batch; the hook path never asks the model
    for the maps (which keeps one [B, H, P, P] per block); a model without eager attention is refused."""
    from pipeline.tiny import save_tiny_model
    from teacher_cache.teacher import _attention_blocks, teacher_forward

    model = load_teacher(
        TeacherConfig(path=str(save_tiny_model(tmp_path / arch, arch, mistral_tokenizer, layers=3)))
    )
    model.set_attn_implementation("eager")
    depth = model.config.num_hidden_layers
    modules, index = _attention_blocks(model, depth)
    assert len(modules) == depth and len({id(m) for m in modules}) == depth and index == 1
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0

    def ours() -> list[str]:  # transformers installs its own recorders on these modules too
        return [
            f.__qualname__
            for m in modules
            for f in m._forward_hooks.values()
            if "teacher_forward" in f.__qualname__
        ]

    asked = []
    forward = model.base_model.forward
    model.base_model.forward = lambda *a, **k: (asked.append(k.get("output_attentions")), forward(*a, **k))[1]
    hooks = teacher_forward(model, ids, mask, top_k=4, layers=(1,), salience=(1, 2, -1))
    full = teacher_forward(
        model, ids, mask, top_k=4, layers=(1,), salience=(1, 2, -1), salience_via="outputs"
    )
    assert asked == [False, True]
    assert sorted(hooks.salience) == [-1, 1, 2]
    for n in (1, 2, -1):
        torch.testing.assert_close(hooks.salience[n], full.salience[n], rtol=0, atol=0)
        assert torch.allclose(hooks.salience[n].sum(-1), torch.ones(3))
        assert (hooks.salience[n][mask == 0] == 0).all()
    assert not torch.equal(hooks.salience[1], hooks.salience[-1])
    assert torch.equal(hooks.hidden, full.hidden) and torch.equal(hooks.layers[1], full.layers[1])
    with torch.no_grad():  # only the asked-for hidden states are kept, and they are the model's own
        every = forward(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.equal(hooks.layers[1], every[1])
    assert not ours()  # removed after the forward
    # the last block named twice (3 and -1): both names, one map
    both = teacher_forward(model, ids, mask, top_k=4, salience=(depth, -1))
    assert sorted(both.salience) == [-1, depth] and torch.equal(both.salience[depth], hooks.salience[-1])
    for wrong in ((1, depth + 1), (0,)):  # refused before any hook is placed
        with pytest.raises(TeacherError, match=r"salience layers \[\d+\] out of range"):
            teacher_forward(model, ids, mask, top_k=4, salience=wrong)
        assert not ours()
    model.set_attn_implementation("sdpa")  # no maps: refused, and the hooks are gone
    with pytest.raises(TeacherError, match="eager attention"):
        teacher_forward(model, ids, mask, top_k=4, salience=(-1,))
    assert not ours()


@pytest.mark.parametrize(
    "dtype,layers", [(d, ()) for d in HIDDEN_DTYPES] + [("int8", (0, 3)), ("bfloat16", (2,))]
)
def test_column_table_round_trip(dtype, layers):
    """Rows -> Arrow table -> decoded rows through the one column table, for every hidden dtype; a row whose
    array has the wrong length or width is refused naming the column."""
    from teacher_cache.format import (
        COLUMNS,
        Layout,
        build_table,
        columns,
        decode_row,
        encode_positions,
        layer_column,
        schema,
    )

    layout = Layout(hidden_size=6, top_k=3, hidden_dtype=dtype, layers=layers)
    rng = np.random.default_rng(0)
    rows = []
    for n in (4, 2, 7):
        h = torch.from_numpy(rng.normal(size=(n - 1, 6)).astype(np.float32))
        per_layer = {k: torch.from_numpy(rng.normal(size=(n - 1, 6)).astype(np.float32)) for k in layers}
        rows.append(
            {
                "sample_id": f"id{n}",
                "source_index": n,
                "prompt": "p" * n,
                "response": "é" * n,
                "input_ids": np.arange(n, dtype=np.int32),
                "offsets": np.stack([np.arange(n), np.arange(n) + 1], 1).astype(np.int32),
                "response_start": 1,
                **encode_positions("hidden", h, layout),
                "topk_ids": rng.integers(0, 9, size=(n - 1, 3)).astype(np.int32),
                "topk_logprobs": rng.normal(size=(n - 1, 3)).astype(np.float32),
                "logsumexp": rng.normal(size=n - 1).astype(np.float32),
                "entropy": rng.random(n - 1).astype(np.float32),
                "_h": h,
                "_layers": per_layer,
            }
        )
        for k, v in per_layer.items():
            rows[-1].update(encode_positions(layer_column(k), v, layout))
    table = build_table(rows, layout)
    assert table.schema.equals(schema(layout), check_metadata=True)
    assert [f.name for f in table.schema] == [c.name for c in columns(layout)]
    assert ("hidden_scale" in table.schema.names) == (dtype == "int8")
    assert table.schema.metadata[b"schema_version"] == (b"2" if layers else b"1")
    batch = table.to_batches()[0]
    for i, r in enumerate(rows):
        got = decode_row(batch, i, layout)
        for c in COLUMNS:
            if c.name != "hidden":
                np.testing.assert_array_equal(np.asarray(getattr(got, c.name)), np.asarray(r[c.name]))
        tol = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2, "int8": 3e-2}[dtype]
        assert (got.hidden - r["_h"]).abs().max().item() <= tol * max(1.0, r["_h"].abs().max().item())
        assert sorted(got.layers) == sorted(layers)
        for k, v in r["_layers"].items():
            assert (got.layers[k] - v).abs().max().item() <= tol * max(1.0, v.abs().max().item())
    bad = dict(rows[0], topk_ids=rows[0]["topk_ids"][:, :2])
    with pytest.raises(ValueError, match=r"row id4: column topk_ids has shape \(3, 2\), expected \(3, 3\)"):
        build_table([bad], layout)
    bad = dict(rows[0], entropy=rows[0]["entropy"][:-1])
    with pytest.raises(ValueError, match=r"column entropy has shape \(2,\), expected \(3,\)"):
        build_table([bad], layout)


@pytest.mark.slow
def test_v2_cache_stores_chosen_layers_and_trains_a_student(
    ray_session, tmp_path, synthetic_jsonl, tiny_llama_dir, gpt2_tokenizer
):
    """cache.layers=[1,0,-1]: each layer stored once per position and equal to the live teacher's
    hidden_states[n]; the manifest records them; a reader asking for a layer the cache lacks is told which it
    has; the student job trains from the v2 cache (no teacher model); a layer the teacher lacks is refused
    before any actor starts."""
    from pipeline.tiny import save_tiny_model

    out = tmp_path / "v2"
    cfg = _cfg(
        synthetic_jsonl, tiny_llama_dir, out, "cache.hidden_dtype=float32", "cache.layers=[1,0,-1]",
        "cache.salience=true",
    )  # fmt: skip
    manifest = run(cfg, progress=False)
    assert manifest.schema_version == 2 and manifest.settings.layers == (-1, 0, 1)
    assert manifest.settings.salience and manifest.layout.salience
    d = manifest.teacher["hidden_size"]
    assert manifest.stats.hidden_bytes_per_position == 3 * d * 4
    cache = open_cache(str(out), expect=CacheExpectation(layers=(0, 1)))
    model = load_teacher(TeacherConfig(path=str(tiny_llama_dir)))
    model.set_attn_implementation("eager")
    for row in list(cache.iter_rows())[:3]:
        with torch.no_grad():
            live = model(
                torch.from_numpy(row.input_ids[None, :-1].astype(np.int64)),
                output_hidden_states=True,
                output_attentions=True,
            )
        assert sorted(row.layers) == [0, 1]
        for n in (0, 1):
            assert (row.layers[n] - live.hidden_states[n][0].float()).abs().max().item() < 1e-5
        assert (row.hidden - live.hidden_states[-1][0].float()).abs().max().item() < 1e-5
        # salience: the last position's attention row in the block that made the layer, mean over heads
        assert sorted(row.salience) == [-1, 1]  # layer 0 (the embeddings) comes from no attention block
        for n, block in ((1, 0), (-1, len(live.attentions) - 1)):
            want = live.attentions[block][0, :, -1].float().mean(0)
            np.testing.assert_allclose(row.salience[n], want.numpy(), rtol=1e-4, atol=1e-6)
            assert abs(float(row.salience[n].sum()) - 1.0) < 1e-5
    with pytest.raises(
        CacheError,
        match=r"needs teacher layer\(s\) \[5\], but this cache holds the final state \(-1\) and layers \[0, 1\]",
    ):
        open_cache(str(out), expect=CacheExpectation(layers=(0, 5)))
    with pytest.raises(TeacherError, match=r"\[7\] out of range; this teacher has 2 blocks"):
        run(_cfg(synthetic_jsonl, tiny_llama_dir, tmp_path / "bad", "cache.layers=[7,-1]"), progress=False)
    assert not (tmp_path / "bad" / "shards").exists()

    student = save_tiny_model(tmp_path / "student", "gpt2", gpt2_tokenizer, hidden=32)
    args = [
        sys.executable, "tests/_student_probe.py", "--no-progress", f"student.path={student}",
        "student.pad_token=eos", f"data.cache={out}", "train.precision=fp32", "train.zero_stage=0",
        "train.micro_batch=4", "train.max_steps=2", f"output.dir={tmp_path / 'run'}",
        # MTA over three layer pairs (the first on words), ZeRO-2 and LoRA: the layers come from the cache
        "objective.preset=mta", "objective.span_teacher_layers=[0,1,-1]",
        "objective.span_student_layers=[1,2,-1]", "objective.span_word_pairs=1", "lora.enabled=true",
        "lora.r=4",
    ]  # fmt: skip
    args[args.index("train.zero_stage=0")] = "train.zero_stage=2"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    probe = json.loads((tmp_path / "run" / "probe.json").read_text())
    assert probe["teacher_loader_imported"] is False and probe["ray_imported"] is False
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["term/span_structure"] > 0 and r["term/kd_teacher"] > 0 for r in recs)
    assert all(r["span_fallbacks"] == 0 for r in recs)  # English records: the chunker parses them
    proj = load_file(str(tmp_path / "run" / "export" / "projectors" / "projectors.safetensors"))
    assert sorted(k for k in proj if k.startswith("span.")) == [
        f"span.{i}.{p}" for i in range(3) for p in ("bias", "weight")
    ]
    # SRA over two layer pairs from the same cache (its salience columns), ZeRO-2 and LoRA
    sra = [a for a in args if not a.startswith(("objective.", "output.dir"))] + [
        "objective.preset=sra", "objective.sra_teacher_layers=[1,-1]", "objective.sra_student_layers=[1,-1]",
        f"output.dir={tmp_path / 'sra'}",
    ]  # fmt: skip
    res = subprocess.run(sra, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "sra" / "metrics.jsonl").read_text().splitlines()]
    terms = ("term/sra_span", "term/sra_delta", "term/sra_geometry", "term/sra_logit")
    assert all(r[t] > 0 for r in recs for t in terms) and all(r["term/kd_teacher"] == 0 for r in recs)
    proj = load_file(str(tmp_path / "sra" / "export" / "projectors" / "projectors.safetensors"))
    assert sorted(proj) == ["sra.0.weight", "sra.1.weight"]  # no DSKD projectors for SRA alone
    # a layer the cache does not hold is refused before training, naming what it holds
    bad = [*args[:-6], "objective.preset=mta", "objective.span_teacher_layers=[5,-1]",
           "objective.span_student_layers=[1,-1]", f"output.dir={tmp_path / 'bad-run'}"]  # fmt: skip
    res = subprocess.run(bad, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode != 0 and "needs teacher layer(s) [5]" in res.stdout + res.stderr


def test_manifest_parses_to_its_typed_form_and_back(llama_cache):
    """The typed manifest keeps every key of the JSON (written -> parsed -> written is the identity)."""
    from teacher_cache.manifest import parse_manifest

    out, manifest = llama_cache
    raw = json.loads((out / MANIFEST).read_text())
    parsed = parse_manifest(raw, str(out))
    assert parsed == manifest and parsed.to_dict() == raw
    assert parsed.stats.rows == sum(e.rows for e in parsed.shards) == 40
    assert parsed.layout.hidden_size == raw["teacher"]["hidden_size"]


def test_mistral_arch_int8_cache_and_expectations(
    ray_session, tmp_path, synthetic_jsonl, tiny_mistral_dir, llama_cache
):
    out = tmp_path / "mistral-int8"
    manifest = run(
        _cfg(synthetic_jsonl, tiny_mistral_dir, out, "cache.hidden_dtype=int8", "cache.top_k=4"),
        progress=False,
    )
    assert manifest.teacher["architecture"] == "MistralForCausalLM"
    assert manifest.stats.hidden_bytes_per_position == 48 + 4
    cache = open_cache(str(out), expect={"teacher_name": str(tiny_mistral_dir), "hidden_size": 48})
    model = load_teacher(TeacherConfig(path=str(tiny_mistral_dir)))
    head, _ = cache.load_head()
    kls = []
    for row in cache.iter_rows():
        lp_live = _live(model, row.input_ids).log_softmax(-1)
        lp_rec = (row.hidden @ head.T).log_softmax(-1)
        kls.append((lp_live.exp() * (lp_live - lp_rec)).sum(-1).mean().item())
        assert row.topk_ids.shape == (len(row.input_ids) - 1, 4)
    assert np.mean(kls) < 1e-2
    # the llama cache must be refused when the mistral teacher is expected, with a message naming both
    llama_out, llama_manifest = llama_cache
    with pytest.raises(CacheError, match="built for teacher .* but the config expects"):
        open_cache(str(llama_out), expect={"teacher_name": str(tiny_mistral_dir)})
    with pytest.raises(CacheError, match="teacher tokenizer"):
        open_cache(str(llama_out), expect=CacheExpectation(tokenizer_sha256=manifest.tokenizer["sha256"]))
    assert manifest.tokenizer["sha256"] != llama_manifest.tokenizer["sha256"]


def test_rerun_is_a_no_op_and_other_config_is_refused(llama_cache, synthetic_jsonl, tiny_llama_dir):
    out, manifest = llama_cache
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run(_cfg(synthetic_jsonl, tiny_llama_dir, out, "cache.hidden_dtype=float32"), progress=False)
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    with pytest.raises(ValueError, match="different config"):
        run(_cfg(synthetic_jsonl, tiny_llama_dir, out, "cache.hidden_dtype=bfloat16"), progress=False)


def test_rerun_repairs_a_damaged_finished_cache(
    llama_cache, synthetic_jsonl, tiny_llama_dir, tmp_path, capsys
):
    """Damage a finished cache every way at once; the same command rebuilds exactly what is damaged."""
    src, manifest = llama_cache
    out = tmp_path / "damaged"
    shutil.copytree(src, out)
    original = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.arrow")}
    (out / "shards/part-00000.arrow").unlink()  # deleted
    part1 = out / "shards/part-00001.arrow"
    data = bytearray(part1.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    part1.write_bytes(bytes(data))
    head = out / "teacher_head.safetensors"
    head.write_bytes(head.read_bytes()[:100])  # truncated
    (out / "teacher_tokenizer" / "tokenizer.json").unlink()
    intact = (out / "shards/part-00002.arrow").stat().st_mtime_ns
    with pytest.raises(CacheError):
        open_cache(str(out), verify=True)
    again = run(_cfg(synthetic_jsonl, tiny_llama_dir, out, "cache.hidden_dtype=float32"), progress=False)
    said = capsys.readouterr().out
    assert "is finished but damaged" in said and "part-00000.arrow missing" in said
    assert "part-00001.arrow checksum differs" in said and "teacher_head.safetensors has 100 bytes" in said
    assert "teacher_tokenizer/tokenizer.json missing" in said
    cache = open_cache(str(out), verify=True)  # every checksum holds again
    assert cache.num_rows == manifest.stats.rows and again.shards == manifest.shards
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.arrow")} == original
    assert (out / "shards/part-00002.arrow").stat().st_mtime_ns == intact  # intact shards are kept


def test_resume_refuses_changed_teacher_weights(ray_session, tmp_path, synthetic_jsonl, mistral_tokenizer):
    """A partial cache is never completed by a different teacher: in the forward actors (shards to do)
    and in the describe task (all shards written, manifest missing)."""
    from pipeline.tiny import save_tiny_model

    teacher = tmp_path / "teacher"
    save_tiny_model(teacher, "llama", mistral_tokenizer, hidden=64)
    out = tmp_path / "cache"
    manifest = run(_cfg(synthetic_jsonl, teacher, out), progress=False)
    assert (
        json.loads((out / TEACHER_INFO).read_text())["weights_fingerprint"]
        == (manifest.teacher["weights_fingerprint"])
    )
    shutil.rmtree(teacher)
    save_tiny_model(teacher, "llama", mistral_tokenizer, hidden=64, seed=7)  # same path, other weights
    (out / MANIFEST).unlink()
    # the describe task cannot hang the driver: past ray.task_timeout_s it is cancelled with a clear error
    with pytest.raises(RuntimeError, match=r"took more than ray.task_timeout_s=0.001 s"):
        run(_cfg(synthetic_jsonl, teacher, out, "ray.task_timeout_s=0.001"), progress=False)
    with pytest.raises(Exception, match="teacher weights changed since this partial cache was started"):
        run(_cfg(synthetic_jsonl, teacher, out), progress=False)
    for f in (out / "shards").glob("part-00001.arrow*"):
        f.unlink()
    with pytest.raises(Exception, match="teacher weights changed since this partial cache was started"):
        run(_cfg(synthetic_jsonl, teacher, out), progress=False)
    assert not (out / "shards" / "part-00001.arrow").exists() and not (out / MANIFEST).exists()


def test_rank_sharding_has_no_overlap_and_no_gap(llama_cache):
    cache = open_cache(str(llama_cache[0]))
    for world in range(1, 6):
        parts = [cache.shard_indices_for(r, world) for r in range(world)]
        flat = sorted(i for p in parts for i in p)
        assert flat == list(range(len(cache.shards)))
    with pytest.raises(ValueError):
        cache.shard_indices_for(3, 3)


def test_damaged_caches_give_clear_errors(llama_cache, tmp_path):
    src, _ = llama_cache
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    shard = bad / "shards" / "part-00001.arrow"
    # a flipped byte keeps the size: only the checksum catches it
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = open_cache(str(bad))
    with pytest.raises(CacheError, match=r"part-00001\.arrow checksum .* does not match"):
        cache.verify()
    # a truncated shard is caught on open, before any decoding
    shard.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(
        CacheError, match=r"part-00001\.arrow has \d+ bytes, the manifest says \d+: the file is truncated"
    ):
        cache.open_shard(1)
    (bad / "shards" / "part-00002.arrow").unlink()
    with pytest.raises(CacheError, match="part-00002.arrow listed in the manifest is missing"):
        cache.open_shard(2)
    # schema version and missing manifest
    m = json.loads((bad / MANIFEST).read_text())
    m["schema_version"] = 99
    (bad / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CacheError, match=r"schema version 99 but this code reads version\(s\) \[1, 2\]"):
        open_cache(str(bad))
    (bad / MANIFEST).unlink()
    with pytest.raises(CacheError, match="no manifest.json; the cache job has not finished"):
        open_cache(str(bad))


def test_pyarrow_filesystem_uri(llama_cache):
    cache = open_cache("file://" + str(llama_cache[0]), verify=True)
    assert sum(1 for _ in cache.iter_rows([0])) == 16


def test_teacher_with_logit_transform_is_refused(tiny_llama_dir, tmp_path):
    from teacher_cache.teacher import check_head_reproduces_logits

    model = load_teacher(TeacherConfig(path=str(tiny_llama_dir)))
    x = torch.randint(0, 100, (1, 12))
    m = torch.ones_like(x)
    assert check_head_reproduces_logits(model, x, m) < 1e-4
    model.lm_head.register_forward_hook(
        lambda mod, inp, out: 0.5 * torch.tanh(out / 0.5)
    )  # Gemma-style soft-capping
    with pytest.raises(TeacherError, match="transforms logits after the head"):
        check_head_reproduces_logits(model, x, m)


def _write_yaml(path: Path, data: Path, teacher: Path, out: Path, rows_per_shard: int, batch: int) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(data)},
                "teacher": {"path": str(teacher)},
                "cache": {"output": str(out), "rows_per_shard": rows_per_shard, "hidden_dtype": "float32"},
                "ray": {"batch_size": batch},
            }
        )
    )
    return path


def test_kill_and_resume_completes_without_duplicates(tmp_path, mistral_tokenizer):
    """SIGKILL a real job (driver and its local Ray cluster) after some shards, resume with a pool of writers,
    check the whole cache."""
    from pipeline.tiny import save_tiny_model, synthetic_records, write_jsonl

    teacher = save_tiny_model(tmp_path / "teacher", "llama", mistral_tokenizer, hidden=256, layers=6)
    data = write_jsonl(synthetic_records(240, seed=7), tmp_path / "data.jsonl")
    out = tmp_path / "cache"
    cfg = _write_yaml(tmp_path / "job.yaml", data, teacher, out, rows_per_shard=8, batch=1)
    cmd = [sys.executable, "-m", "teacher_cache.job", "--config", str(cfg), "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            sidecars = list((out / "progress").glob("part-*.json")) if (out / "progress").exists() else []
            if len(sidecars) >= 3:
                break
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.05)
        kill_tree(proc.pid)
    finally:
        proc.wait(timeout=60)
    written = len(list((out / "progress").glob("part-*.json")))
    assert not (out / MANIFEST).exists(), "the job finished before the kill: make the test job longer"
    assert 3 <= written < 30
    with pytest.raises(CacheError, match="has not finished"):
        open_cache(str(out))
    # the resume runs a pool of three shard writers (shard k -> writer k mod 3): same rows, same order
    done = subprocess.run(
        [*cmd, "ray.writer_concurrency=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"({written} already written, {30 - written} to do)" in done.stdout
    assert not (out / "staging").exists(), "the staged input rows outlived the job"
    resumed = open_cache(str(out), verify=True)
    # no duplicate, no missing sample, source order kept
    from pipeline.records import DataConfig, read_records

    expected = [r.sample_id for r in read_records(DataConfig(path=str(data)))]
    assert [r.sample_id for r in resumed.iter_rows()] == expected
    # every row (from before and after the kill) matches the live teacher
    model = load_teacher(TeacherConfig(path=str(teacher)))
    for row in resumed.iter_rows():
        with torch.no_grad():
            live = model.base_model(
                input_ids=torch.from_numpy(row.input_ids[None, :-1].astype(np.int64))
            ).last_hidden_state[0]
        assert torch.allclose(row.hidden, live, atol=1e-4)
    assert not list(out.rglob("*.tmp-*"))


@pytest.mark.slow
def test_ray_job_submit_against_a_local_head(tmp_path, synthetic_jsonl, tiny_llama_dir):
    """`ray start --head` + `ray job submit` of the cache job; the cache opens and matches; the head is stopped."""
    import secrets

    import ray

    from student_train.trainer import free_port

    # The module's in-process cluster would compete for the 2 CPUs and be killed by `ray stop`.
    ray.shutdown()

    ray_bin = str(Path(sys.executable).parent / "ray")
    gcs, dash = free_port(), free_port()
    env = dict(
        os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0"
    )
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "cache"
    cfg = _write_yaml(tmp_path / "job.yaml", synthetic_jsonl, tiny_llama_dir, out, rows_per_shard=16, batch=4)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: AF_UNIX paths <= 107 bytes
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--temp-dir={ray_tmp}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        # The head's dashboard agent registers a few seconds after `ray start` returns; the job
        # server gives up after 10 s with "No available agent" (HTTP 500, no job created), so a
        # slow machine needs a retry, as Ray's message says (on 2 cores shared with a 1.5B teacher's cache job
        # the agent once took more than 180 s to register).
        deadline = time.monotonic() + 420
        while True:
            sub = _ray_job_submit(ray_bin, dash, cfg, env)
            if sub.returncode == 0 or "No available agent" not in sub.stderr or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        assert "succeeded" in sub.stdout
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    cache = open_cache(str(out), expect={"teacher_name": str(tiny_llama_dir)}, verify=True)
    model = load_teacher(TeacherConfig(path=str(tiny_llama_dir)))
    head, _ = cache.load_head()
    row = next(cache.iter_rows())
    assert (row.hidden @ head.T - _live(model, row.input_ids)).abs().max().item() < 1e-4


def _ray_job_submit(ray_bin, dash, cfg, env):
    return subprocess.run(
        [
            ray_bin,
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dash}",
            f"--working-dir={REPO}",
            "--",
            sys.executable,
            "-m",
            "teacher_cache.job",
            "--config",
            str(cfg),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def test_edited_manifests_are_refused_naming_the_field(llama_cache, tmp_path):
    """A manifest is a file people edit and copy: every field is typed and cross-checked against the shards."""
    src, _ = llama_cache
    good = json.loads((src / MANIFEST).read_text())

    def opened_with(mutate, tag: str):
        bad = tmp_path / tag
        shutil.copytree(src, bad)
        m = json.loads(json.dumps(good))
        out = mutate(m)
        m = out if isinstance(out, list) else m  # mutators edit in place; one replaces the whole manifest
        (bad / MANIFEST).write_text(json.dumps(m))
        return open_cache(str(bad))

    def drop_entry(m):  # the rows of that shard would be silently lost
        m["shards"].pop(1)
        m["stats"]["rows"] -= good["shards"][1]["rows"]

    with pytest.raises(CacheError, match=r"part-00001\.arrow'\] are on disk but not in the manifest"):
        opened_with(drop_entry, "dropped")
    with pytest.raises(CacheError, match=r"stats\.rows is 999 but the shards hold \d+ rows"):
        opened_with(lambda m: m["stats"].update(rows=999), "rows")
    with pytest.raises(CacheError, match=r"field shards\[0\]\.file is '\.\./outside/part\.arrow'"):
        opened_with(lambda m: m["shards"][0].update(file="../outside/part.arrow"), "escape")
    with pytest.raises(CacheError, match=r"field teacher\.hidden_size is missing"):
        opened_with(lambda m: m["teacher"].pop("hidden_size"), "missing")
    with pytest.raises(CacheError, match=r"manifest\.json must be a JSON object, found list"):
        opened_with(lambda m: [m], "list")
    with pytest.raises(CacheError, match=r"settings\.top_k must be int, found str"):
        opened_with(lambda m: m["settings"].update(top_k="16"), "type")
    # shards whose stored dtype or width differ from what the manifest claims are refused on open
    other = "bfloat16" if good["settings"]["hidden_dtype"] != "bfloat16" else "float16"
    cache = opened_with(lambda m: m["settings"].update(hidden_dtype=other), "dtype")
    with pytest.raises(
        CacheError, match=r"part-00000\.arrow does not have the schema the manifest describes"
    ):
        cache.open_shard(0)
    cache = opened_with(
        lambda m: m["teacher"].update(hidden_size=good["teacher"]["hidden_size"] + 1), "width"
    )
    with pytest.raises(CacheError, match=r"column \(found, expected\): \{'hidden'"):
        cache.open_shard(0)


def test_actor_placement_is_counted_per_node():
    from teacher_cache.job import actors_that_fit

    nodes = [
        {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 8.0}},
        {"Alive": True, "Resources": {"CPU": 3.0, "GPU": 4.0}},
        {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
    ]
    assert actors_that_fit(nodes, gpus=1, cpus=2) == 8 + 1
    assert actors_that_fit(nodes, gpus=2, cpus=1) == 4 + 2
    assert actors_that_fit(nodes, gpus=0, cpus=4) == 4
    assert actors_that_fit([{"Resources": {"CPU": 4.0}}], gpus=1, cpus=1) == 0


def test_asking_for_gpus_the_cluster_lacks_fails_in_seconds(
    llama_cache, synthetic_jsonl, tiny_llama_dir, tmp_path
):
    t = time.time()
    with pytest.raises(RuntimeError, match=r"can host 0 of the 1 teacher actor\(s\) .* 1 GPU"):
        run(_cfg(synthetic_jsonl, tiny_llama_dir, tmp_path / "c", "ray.gpus_per_actor=1"), progress=False)
    assert time.time() - t < 60


def test_teacher_actors_that_leave_no_cpu_for_the_light_stages_fail_in_seconds(
    llama_cache, synthetic_jsonl, tiny_llama_dir, tmp_path
):
    """Teacher actors that take every CPU would leave the tokeniser, the shard writers and the read tasks
    waiting forever: refused at once, naming what they need."""
    import ray

    every = int(ray.cluster_resources()["CPU"])
    t = time.time()
    with pytest.raises(RuntimeError, match=r"shard writer\(s\) and read tasks need 0.75 more"):
        run(
            _cfg(synthetic_jsonl, tiny_llama_dir, tmp_path / "c", f"ray.cpus_per_actor={every}"),
            progress=False,
        )
    assert time.time() - t < 60


def test_shard_writer_takes_repeated_rows_of_a_retried_batch_once(llama_cache, tmp_path):
    """Ray Data retries a forward batch whose actor died, so rows can reach a writer twice: the shard is still
    written once, byte for byte the job's, and rows of a written shard or outside the writer's shards are
    handled (ignored / refused)."""
    import pyarrow.ipc as ipc

    from teacher_cache.job import ShardWriter, _ragged

    out, manifest = llama_cache
    table = ipc.open_file(str(out / "shards" / "part-00000.arrow")).read_all()
    n = table.num_rows
    cols = {name: table.column(name).to_pylist() for name in table.column_names}

    def batch(lo: int, hi: int) -> dict:
        b = {
            k: _ragged([np.asarray(x) if isinstance(x, list) else x for x in v[lo:hi]])
            for k, v in cols.items()
        }
        b.update(shard=np.zeros(hi - lo, dtype=np.int64), truncated_prompt=np.zeros(hi - lo, dtype=bool))
        b["truncated_total"] = np.zeros(hi - lo, dtype=bool)
        return b

    w = ShardWriter(
        str(tmp_path), {0: (0, n)}, manifest.settings.top_k, "float32", (), manifest.job_fingerprint
    )
    assert w.add(batch(0, n - 4)) == []
    assert w.add(batch(2, n - 4)) == [] and w.open_shards() == {0: n - 4}  # the retry: nothing counted twice
    (entry,) = w.add(batch(n - 6, n))
    assert json.loads(entry)["rows"] == n and w.open_shards() == {}
    written = (tmp_path / "shards" / "part-00000.arrow").read_bytes()
    assert hashlib.sha256(written).hexdigest() == manifest.shards[0].sha256
    assert w.add(batch(0, 3)) == [] and w.completed() == [entry]  # late repeats of a written shard
    far = batch(0, 1)
    far["shard"][:] = 7
    with pytest.raises(RuntimeError, match="not one of its shards"):
        w.add(far)


def test_standard_arrow_readers_read_the_shard_folder(llama_cache):
    """The documented recipe (docs/CACHE_FORMAT.md): pyarrow.dataset and datasets read shards/ as it is (the
    job's bookkeeping lives in progress/), and decode_hidden turns their hidden values back into floats."""
    import datasets
    import pyarrow.dataset as pads

    from teacher_cache.format import decode_hidden

    out, manifest = llama_cache
    assert sorted(p.suffix for p in (out / "shards").iterdir()) == [".arrow"] * len(manifest.shards)
    table = pads.dataset(out / "shards", format="ipc").to_table()
    assert table.num_rows == manifest.stats.rows
    ds = datasets.load_dataset(
        "arrow", data_dir=str(out / "shards"), split="train", cache_dir=str(out.parent / "hf")
    )
    assert ds.num_rows == manifest.stats.rows
    cache = open_cache(str(out))
    first = next(cache.iter_rows())
    row = next(r for r in ds.with_format("numpy") if r["sample_id"] == first.sample_id)
    hidden = decode_hidden(row["hidden"], row.get("hidden_scale"), manifest.settings.hidden_dtype)
    assert torch.equal(hidden, first.hidden)
    # datasets widens bf16's raw uint16 bits (and int8) to int64; decode_hidden narrows them back
    for dtype in ("bfloat16", "int8"):
        values, scale = encode_hidden(torch.randn(3, 8), dtype)
        torch.testing.assert_close(
            decode_hidden(values.astype(np.int64), scale, dtype), decode_hidden(values, scale, dtype)
        )


def test_tied_embeddings_are_stored_once(ray_session, tmp_path, synthetic_jsonl, gpt2_tokenizer):
    """A teacher whose input embeddings are its head (GPT-2 ties them) gets one tensor file, not two; the
    reader hands the head's weight out as the embedding table."""
    from pipeline.tiny import save_tiny_model
    from teacher_cache.format import EMBED_FILE, HEAD_FILE

    teacher = save_tiny_model(tmp_path / "gpt2-teacher", "gpt2", gpt2_tokenizer, hidden=32)
    out = tmp_path / "cache"
    manifest = run(_cfg(synthetic_jsonl, teacher, out, "data.max_records=8"), progress=False)
    assert manifest.teacher["tied_embeddings"] is True
    assert (
        HEAD_FILE in manifest.files and EMBED_FILE not in manifest.files and not (out / EMBED_FILE).exists()
    )
    model = load_teacher(TeacherConfig(path=str(teacher)))
    cache = open_cache(str(out), verify=True)
    assert torch.equal(cache.load_embeddings(), model.get_input_embeddings().weight)


@pytest.mark.parametrize("extra", [(), ("--layers", "0,1,-1", "--salience", "--hidden-dtype", "int8")])
def test_planner_predicts_the_cache_bytes_exactly(
    llama_cache, synthetic_jsonl, tiny_llama_dir, tmp_path, extra
):
    """python -m pipeline.plan with the records and the teacher tokenizer predicts the shard bytes the job
    writes, to the byte (v1 fp32 here; a v2 int8 cache with layers and salience built for the comparison)."""
    import contextlib
    import io

    from pipeline.plan import main as plan_main

    if extra:
        out = tmp_path / "v2-int8"
        manifest = run(
            _cfg(
                synthetic_jsonl, tiny_llama_dir, out, "cache.hidden_dtype=int8", "cache.layers=[0,1,-1]",
                "cache.salience=true",
            ),
            progress=False,
        )  # fmt: skip
        settings = list(extra)
    else:
        _, manifest = llama_cache
        settings = ["--hidden-dtype", "float32"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        plan_main(
            [
                "--teacher", str(tiny_llama_dir), "--student", "gpt2-120m", "--data", str(synthetic_jsonl),
                "--tokenizer", str(tiny_llama_dir), "--rows-per-shard", "16", "--json", *settings,
            ]
        )  # fmt: skip
    got = json.loads(buf.getvalue())
    assert got["cache"]["exact"] and got["cache"]["rows"] == manifest.stats.rows
    assert got["cache"]["positions"] == manifest.stats.positions
    assert got["cache"]["bytes"] == manifest.stats.bytes


def test_float16_is_the_default_and_refuses_values_beyond_its_range():
    """float16 (same bytes as bf16, far lower KL) is the default hidden dtype; a hidden value it cannot hold
    (an intermediate layer's outlier) is a clear error, never a stored inf."""
    from teacher_cache.format import encode_hidden
    from teacher_cache.job import CacheSettings

    assert CacheSettings().hidden_dtype == "float16"
    ok, _ = encode_hidden(torch.tensor([[1.5, -65504.0]]), "float16")
    assert np.isfinite(ok).all()
    with pytest.raises(ValueError, match=r"reach \|h\| = 7e\+04, beyond float16's range.*bfloat16"):
        encode_hidden(torch.tensor([[1.0, 70000.0]]), "float16")
    with pytest.raises(ValueError, match="hidden states contain NaN"):
        encode_hidden(torch.tensor([[float("nan"), 1.0]]), "float16")
    bf, _ = encode_hidden(torch.tensor([[1.0, 70000.0]]), "bfloat16")  # bf16 holds it
    assert bf.dtype == np.uint16
