"""The student job with the real deepspeed launcher (gloo, CPU): invariance, resume, ZeRO-2/3, LoRA, bad input."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _procs import kill_tree

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
DS = str(Path(sys.executable).parent / "deepspeed")
PROJECTORS_FILE = "projectors/projectors.safetensors"
PROBE = "tests/_student_probe.py"  # student_train/main.py, then the evidence of what the process held


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, mistral_tokenizer):
    """A 40-row cache of a tiny Llama teacher, 2 rows per shard (fine-grained rank splits)."""
    import ray

    from pipeline.config import load_config
    from pipeline.tiny import save_tiny_model, synthetic_records, write_jsonl
    from teacher_cache.job import CacheJobConfig, run

    root = tmp_path_factory.mktemp("train")
    teacher = save_tiny_model(root / "teacher", "llama", mistral_tokenizer, hidden=64)
    data = write_jsonl(synthetic_records(40, seed=5), root / "train.jsonl")
    out = root / "cache"
    run(
        load_config(
            CacheJobConfig,
            None,
            [
                f"data.path={data}",
                f"teacher.path={teacher}",
                f"cache.output={out}",
                "cache.rows_per_shard=2",
                "cache.hidden_dtype=float32",
                "ray.batch_size=8",
            ],
        ),
        progress=False,
    )
    ray.shutdown()
    return out


@pytest.fixture(scope="module")
def teacher_dir(cache_dir):
    return cache_dir.parent / "teacher"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, gpt2_tokenizer):
    from pipeline.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("student"), "gpt2", gpt2_tokenizer, hidden=48, dropout=0.0)


@pytest.fixture(scope="module")
def student_dropout_dir(tmp_path_factory, gpt2_tokenizer):
    from pipeline.tiny import save_tiny_model

    return save_tiny_model(
        tmp_path_factory.mktemp("student_do"), "gpt2", gpt2_tokenizer, hidden=48, dropout=0.1
    )


def _args(student, cache, out, *extra):
    return [
        "--no-progress",
        f"student.path={student}",
        "student.pad_token=eos",
        f"data.cache={cache}",
        "train.precision=fp32",
        f"output.dir={out}",
        *extra,
    ]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def launch(args, world: int, timeout=600, check=True):
    if world == 1:
        cmd = [sys.executable, PROBE, *args]
    else:
        port = 29000 + (os.getpid() * 7 + int(time.time() * 1000)) % 2000
        cmd = [DS, "--num_gpus", str(world), "--master_port", str(port), PROBE, *args]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    if world > 1:  # DeepSpeed's CPU all-reduce segments (69 MB each) must not outlive the run in /dev/shm
        assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    return res


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    w = load_file(str(run_dir / "export" / "model.safetensors"))
    w.update({"proj." + k: v for k, v in load_file(str(run_dir / "export" / PROJECTORS_FILE)).items()})
    return w


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_same_update_for_any_split_of_the_global_batch(tmp_path, cache_dir, student_dir):
    """(micro-batch, grad-accum, world) = (4,1,1), (2,2,1), (2,1,2): one DWA-KD step gives the same weights."""
    # Adam's first step is sign(g) * lr, which flips on tiny gradient differences; with a large eps the update
    # is ~ lr * g / eps, linear in the gradient, so equal weights mean equal (normalised) gradients.
    common = [
        "data.shuffle_buffer=0",
        "train.max_steps=1",
        "data.verify_checksums=false",
        "optim.eps=10.0",
        "optim.lr=10.0",
        "optim.projector_lr=10.0",
        "optim.weight_decay=0.0",
    ]
    runs = {
        "4x1x1": (["train.micro_batch=4", "train.grad_accum=1"], 1),
        "2x2x1": (["train.micro_batch=2", "train.grad_accum=2"], 1),
        "2x1x2": (["train.micro_batch=2", "train.grad_accum=1", "train.zero_stage=3"], 2),
    }
    weights, losses = {}, {}
    for name, (extra, world) in runs.items():
        launch(_args(student_dir, cache_dir, tmp_path / name, *common, *extra), world)
        weights[name], losses[name] = _weights(tmp_path / name), _metrics(tmp_path / name)[0]["loss"]
    from safetensors.torch import load_file

    init = load_file(str(student_dir / "model.safetensors"))
    ref = weights["4x1x1"]
    moved = max((ref[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-5, "the step did not change the weights: the test would prove nothing"
    for name in ("2x2x1", "2x1x2"):
        assert abs(losses[name] - losses["4x1x1"]) < 1e-5 * abs(losses["4x1x1"])
        for k, v in ref.items():
            base = init.get(k, torch.zeros_like(v)) if not k.startswith("proj.") else v
            if k.startswith("proj."):
                torch.testing.assert_close(weights[name][k], v, rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")
            else:  # compare the updates, not the weights: equal updates = equal normalised gradients
                torch.testing.assert_close(
                    weights[name][k] - base, v - base, rtol=1e-3, atol=1e-7, msg=f"{name}: {k}"
                )


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, cache_dir, student_dropout_dir):
    """Two processes, ZeRO-2, dropout on: kill -9 after a few checkpoints, resume, compare every later step."""
    extra = [
        "train.micro_batch=2",
        "train.max_steps=14",
        "train.zero_stage=2",
        "output.save_every=1",
        "output.export=false",
    ]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    launch(_args(student_dropout_dir, cache_dir, ref_dir, *extra), 2)
    port = 31000 + os.getpid() % 1000
    cmd = [
        DS,
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        "student_train/main.py",
        *_args(student_dropout_dir, cache_dir, run_dir, *extra),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if latest.exists() and latest.read_text().strip() >= "step-0000004":
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        kill_tree(proc.pid)
    finally:
        proc.wait(timeout=60)
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert 4 <= killed_at < 14, killed_at
    res = launch(_args(student_dropout_dir, cache_dir, run_dir, *extra), 2)
    assert f"resuming at step {killed_at}" in res.stdout
    ref, got = _metrics(ref_dir), _metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, 15))
    for a, b in zip(ref[killed_at:], got[killed_at:]):
        assert a["first_sample"] == b["first_sample"], (a["step"], "a different next batch after resume")
        assert a["samples"] == b["samples"] and len(b["samples"]) == 2, (
            a["step"],
            "another rank's batch differs",
        )
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
    assert any(r["epoch"] == 1 for r in got), "the run should cross an epoch boundary"
    assert len({s for r in ref for s in r["samples"]}) == 2 * 14  # every rank-step consumed other samples


@pytest.mark.parametrize("zero,lora", [(2, True), (3, True), (3, False)])
def test_zero_and_lora_runs_export_loadable_students(tmp_path, cache_dir, student_dir, zero, lora):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    extra = [
        "train.micro_batch=2",
        "train.max_steps=3",
        f"train.zero_stage={zero}",
        f"lora.enabled={str(lora).lower()}",
        "lora.r=4",
        "data.verify_checksums=false",
    ]
    launch(_args(student_dir, cache_dir, out, *extra), 2)
    export = out / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert not any("lora" in n for n, _ in model.named_parameters())
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    # a standard HF directory: only the model at the top level, the projectors in their subfolder, one EOS
    assert sorted(p.name for p in export.glob("*.safetensors")) == ["model.safetensors"]
    assert (export / PROJECTORS_FILE).exists() and model.dtype == torch.float32  # trained in fp32
    config = json.loads((export / "config.json").read_text())
    generation = json.loads((export / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"]
    card = (export / "README.md").read_text()
    assert "dwa_kd" in card and "fingerprint" in card and "term/kd_teacher" in card
    if lora:  # the peft adapter too: base + adapter gives the merged export's logits
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(student_dir)
        with_adapter = PeftModel.from_pretrained(base, export / "adapter").merge_and_unload()
        torch.testing.assert_close(
            with_adapter(torch.tensor([[1, 2, 3]])).logits, logits, rtol=1e-4, atol=1e-4
        )
    info = json.loads((out / "probe.json").read_text())
    assert info["ray_imported"] is False and info["teacher_loader_imported"] is False
    assert all(name.startswith("GPT2") for name in info["models_alive"]), info
    recs = _metrics(out)
    assert len(recs) == 3 and all(r["term/dtw_hidden"] != 0 and r["term/kd_teacher"] > 0 for r in recs)
    assert (out / "loss_curves.png").stat().st_size > 1000 and any((out / "tensorboard").iterdir())


def test_bad_inputs_give_clear_errors(tmp_path, cache_dir, student_dir):
    # a cache from another teacher than the config names
    res = launch(
        _args(student_dir, cache_dir, tmp_path / "a", "data.expect_teacher=/models/other"), 1, check=False
    )
    assert (
        res.returncode != 0 and "cache was built for teacher" in res.stderr and "/models/other" in res.stderr
    )
    # a student tokenizer without a pad token and no pad_token configured
    args = [a for a in _args(student_dir, cache_dir, tmp_path / "b") if a != "student.pad_token=eos"]
    res = launch(args, 1, check=False)
    assert res.returncode != 0 and "has no pad token; set student.pad_token=eos" in res.stderr
    # a missing shard, and a corrupt one (same size: only the checksum can tell)
    bad = tmp_path / "bad"
    shutil.copytree(cache_dir, bad)
    (bad / "shards" / "part-00003.arrow").unlink()
    res = launch(_args(student_dir, bad, tmp_path / "c"), 1, check=False)
    assert res.returncode != 0 and "part-00003.arrow listed in the manifest is missing" in res.stderr
    shutil.copy(cache_dir / "shards" / "part-00003.arrow", bad / "shards" / "part-00003.arrow")
    blob = bytearray((bad / "shards" / "part-00005.arrow").read_bytes())
    blob[len(blob) // 2] ^= 0x55
    (bad / "shards" / "part-00005.arrow").write_bytes(bytes(blob))
    res = launch(_args(student_dir, bad, tmp_path / "d"), 1, check=False)
    assert res.returncode != 0 and "part-00005.arrow checksum" in res.stderr
    assert not (tmp_path / "d" / "checkpoints").exists()


def _poison(cache_dir: Path, out: Path, sample_rows: int) -> Path:
    """Copy a cache and set the hidden states of its first rows to NaN (a corrupted teacher output)."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.ipc as ipc

    shutil.copytree(cache_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for i, entry in enumerate(manifest["shards"][: sample_rows // 2]):
        path = out / entry["file"]
        table = ipc.open_file(pa.memory_map(str(path))).read_all()
        col = table.column("hidden").combine_chunks()
        flat = col.values.values.to_numpy(zero_copy_only=False).copy()
        flat[:] = np.nan
        inner = pa.FixedSizeListArray.from_arrays(
            pa.array(flat, type=col.type.value_type.value_type), col.type.value_type.list_size
        )
        new = pa.LargeListArray.from_arrays(col.offsets, inner)
        table = table.set_column(table.schema.get_field_index("hidden"), table.schema.field("hidden"), new)
        sink = pa.BufferOutputStream()
        with ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        data = sink.getvalue().to_pybytes()
        path.write_bytes(data)
        manifest["shards"][i].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_nan_losses_are_skipped_counted_and_bounded(tmp_path, cache_dir, student_dir):
    bad = _poison(cache_dir, tmp_path / "nan-cache", sample_rows=4)
    common = ["data.shuffle_buffer=0", "train.micro_batch=2", "output.save_every=1"]
    ok = launch(
        _args(student_dir, bad, tmp_path / "skip", *common, "train.max_steps=4", "train.max_nan_skips=5"), 1
    )
    recs = _metrics(tmp_path / "skip")
    assert [r["skipped"] for r in recs] == [True, True, False, False]
    assert recs[-1]["nan_skips"] == 2 and "non-finite loss, step skipped" in ok.stdout
    from safetensors.torch import load_file

    init = load_file(str(student_dir / "model.safetensors"))
    assert json.loads((tmp_path / "skip" / "run_info.json").read_text())["nan_skips"] == 2
    # with a limit of 1 the run stops at the second bad step with a clear message; checkpoints stay loadable
    res = launch(
        _args(student_dir, bad, tmp_path / "stop", *common, "train.max_steps=4", "train.max_nan_skips=1"),
        1,
        check=False,
    )
    assert res.returncode != 0 and "had a non-finite loss (limit train.max_nan_skips=1)" in res.stderr
    latest = (tmp_path / "stop" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-0000001"
    # that checkpoint is intact and holds the initial weights: a skipped step changes no parameter
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "stop" / "checkpoints"), tag=latest)
    for k, v in init.items():
        torch.testing.assert_close(state["student." + k], v, rtol=0, atol=0, msg=k)


def test_objective_from_cache_equals_objective_with_live_teacher(cache_dir, teacher_dir, student_dir):
    """The whole DWA-KD objective (and DSKD) from cached outputs = the same with a live teacher forward (eq
    (14)'s teacher entropy from the cache's column on one side, from the live teacher's logits on the other)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.tokenize import eos_id_of
    from student_train.align import batch_alignment
    from student_train.data import Schedule, ScheduledBatches
    from student_train.losses.cma import Projectors
    from student_train.losses.divergences import entropy_from_logits
    from student_train.losses.objective import ObjectiveConfig
    from student_train.model import Distiller
    from teacher_cache.reader import open_cache
    from teacher_cache.teacher import TeacherConfig, load_teacher

    cache = open_cache(str(cache_dir))
    tok = AutoTokenizer.from_pretrained(student_dir)
    tok.pad_token = tok.eos_token
    sched = Schedule(cache.shard_rows, 0, 1, 4, 0, 0)
    kw = dict(
        tokenizer=tok,
        pad_id=tok.pad_token_id,
        eos_id=eos_id_of(tok),
        max_prompt_length=256,
        max_length=512,
        with_teacher=True,
        alignment=batch_alignment(ObjectiveConfig.preset("dwa_kd"), cache, tok)[0],
    )
    batch = next(iter(ScheduledBatches(cache, sched, 0, 0, kw)))
    teacher = load_teacher(TeacherConfig(path=str(teacher_dir)))
    with torch.no_grad():
        live_out = teacher(
            input_ids=batch.t_input_ids, attention_mask=batch.t_mask, output_hidden_states=True
        )
    live_hidden = live_out.hidden_states[-1] * batch.t_mask[..., None]
    live_entropy = entropy_from_logits(live_out.logits) * batch.t_mask
    assert (batch.t_hidden - live_hidden).abs().max() < 1e-4
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    torch.manual_seed(0)
    proj = Projectors(student.config.n_embd, cache.hidden_size)
    head, emb = cache.load_head()[0], cache.load_embeddings()
    live_head = teacher.get_output_embeddings().weight.detach()
    live_emb = teacher.get_input_embeddings().weight.detach()
    for preset in ("dwa_kd", "dskd"):
        cfg = ObjectiveConfig.preset(preset)
        cached = Distiller(student, proj, cfg, head, emb)(batch)
        live_batch = batch.to("cpu")
        live_batch.t_hidden, live_batch.t_entropy = live_hidden, live_entropy
        live = Distiller(student, proj, cfg, live_head, live_emb)(live_batch)
        torch.testing.assert_close(cached.total, live.total, rtol=1e-5, atol=1e-5)
        for k in cached.terms:
            torch.testing.assert_close(
                cached.terms[k], live.terms[k], rtol=1e-5, atol=1e-5, msg=f"{preset}: {k}"
            )
        assert cached.terms["kd_teacher"] > 0


def test_schedule_and_loader_workers_partition_the_data(cache_dir, student_dir):
    """Ranks get disjoint rows covering the cache (minus the counted drop); workers and resume keep the order."""
    from transformers import AutoTokenizer

    from pipeline.tokenize import eos_id_of
    from student_train.data import IGNORE_INDEX, Schedule, ScheduledBatches
    from teacher_cache.reader import open_cache

    cache = open_cache(str(cache_dir))
    rows = cache.shard_rows
    for world in (1, 2, 3):
        scheds = [Schedule(rows, r, world, 2, seed=7, shuffle_buffer=8) for r in range(world)]
        orders = [s.order(epoch=0) for s in scheds]
        flat = [x for o in orders for x in o]
        assert len(flat) == len(set(flat)) == sum(rows) - scheds[0].dropped_per_epoch
        assert all(len(o) == len(orders[0]) for o in orders)  # ranks stay in step
        assert {s for s, _ in orders[0]} <= set(cache.shard_indices_for(0, world))
    s = Schedule(rows, 0, 1, 2, seed=7, shuffle_buffer=8)
    assert s.order(0) == Schedule(rows, 0, 1, 2, seed=7, shuffle_buffer=8).order(0) != s.order(1)

    tok = AutoTokenizer.from_pretrained(student_dir)
    tok.pad_token = tok.eos_token
    kw = dict(
        tokenizer=tok,
        pad_id=tok.pad_token_id,
        eos_id=eos_id_of(tok),
        max_prompt_length=256,
        max_length=512,
        with_teacher=True,
    )
    plain = [b.sample_ids for b in ScheduledBatches(cache, s, 0, 0, kw)]
    loader = torch.utils.data.DataLoader(ScheduledBatches(cache, s, 0, 0, kw), batch_size=None, num_workers=2)
    assert [b.sample_ids for b in loader] == plain
    assert [b.sample_ids for b in ScheduledBatches(cache, s, 0, 5, kw)] == plain[5:]
    b = next(iter(ScheduledBatches(cache, s, 0, 0, kw)))
    for i in range(b.labels.shape[0]):  # the last prompt position predicts the first response token
        row_valid = b.labels[i].ne(IGNORE_INDEX).nonzero().flatten()
        assert row_valid.numel() > 0 and (row_valid.diff() == 1).all()
        t_valid = b.t_labels[i].ne(IGNORE_INDEX).nonzero().flatten()
        assert b.t_mask[i, t_valid].all() and (b.t_hidden[i, b.t_mask[i] == 0] == 0).all()


@pytest.mark.parametrize(
    "preset,extra",
    [
        ("uld", []),
        ("uld_topk", []),
        ("mined", []),
        ("multilevel_ot", []),
        ("uld", ["objective.pairing=offsets"]),
    ],
)
def test_logit_baselines_train_from_the_cache(tmp_path, cache_dir, student_dir, preset, extra):
    """ULD, MinED and MultiLevelOT through the real student job, from the cache alone (no teacher model)."""
    out = tmp_path / "run"
    args = [
        f"objective.preset={preset}",
        "train.micro_batch=4",
        "train.max_steps=2",
        "train.zero_stage=0",
        *extra,
    ]
    launch(_args(student_dir, cache_dir, out, *args), 1)
    recs = _metrics(out)
    assert len(recs) == 2 and all(r["term/logit_kd"] > 0 and r["term/ce"] > 0 for r in recs)
    assert all(r["term/kd_teacher"] == 0 and r["term/dtw_hidden"] == 0 for r in recs)
    info = json.loads((out / "probe.json").read_text())
    assert info["teacher_loader_imported"] is False and info["ray_imported"] is False
    assert not (out / "export" / "projectors").exists()  # no projectors for logit-level methods


def test_mined_refuses_a_teacher_tokenizer_the_cache_was_not_built_with(tmp_path, cache_dir, student_dir):
    res = launch(
        _args(
            student_dir,
            cache_dir,
            tmp_path / "run",
            "objective.preset=mined",
            f"data.teacher_tokenizer={student_dir}",
        ),
        1,
        check=False,
    )
    assert res.returncode != 0 and "is not the tokenizer this cache was built with" in res.stderr


class _RunsShell:
    """Unpickles to ``os.system(command)``: what a planted checkpoint would do on a weights_only=False load."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize(
    "zero,lora,planted",
    [
        (0, False, "mp_rank_00_model_states.pt"),
        (2, True, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        (3, False, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
    ],
)
def test_resume_loads_weights_only_and_refuses_a_planted_pickle(
    tmp_path, cache_dir, student_dir, zero, lora, planted
):
    """Resume reads DeepSpeed's files with weights_only=True (and a 3-type allow-list): real checkpoints resume
    to the same next step, a file whose unpickling would run a command is refused before anything runs."""
    out = tmp_path / "run"
    extra = [
        "train.micro_batch=2",
        "train.max_steps=3",
        f"train.zero_stage={zero}",
        f"lora.enabled={str(lora).lower()}",
        "lora.r=4",
        "output.save_every=1",
        "output.export=false",
        "data.verify_checksums=false",
    ]
    args = _args(student_dir, cache_dir, out, *extra)
    launch(args, 1)
    first = _metrics(out)
    ckpt = out / "checkpoints"
    (ckpt / "latest").write_text("step-0000002")
    res = launch(args, 1)
    assert "resuming at step 2" in res.stdout
    assert abs(_metrics(out)[2]["loss"] - first[2]["loss"]) <= 1e-6 * abs(first[2]["loss"])

    marker = tmp_path / "pwned"
    evil = ckpt / "step-0000002" / planted
    assert evil.exists(), sorted(p.name for p in evil.parent.iterdir())
    torch.save({"module": {}, "payload": _RunsShell(f"touch {marker}")}, evil)
    (ckpt / "latest").write_text("step-0000002")
    # first line of defence: the file is not the one saved (its sha256 was recorded at save time)
    res = launch(args, 1, check=False)
    assert res.returncode != 0 and "CheckpointIntegrityError" in res.stderr
    assert f"{evil}: its sha256 differs from the one recorded" in res.stderr
    # an attacker who also rewrites the recorded checksum meets the second: nothing is unpickled but tensors
    import hashlib

    for part in (evil.parent / "xtokd_checksums").glob("rank-*.json"):
        sums = json.loads(part.read_text())
        if planted in sums:
            sums[planted] = hashlib.sha256(evil.read_bytes()).hexdigest()
            part.write_text(json.dumps(sums))
    res = launch(args, 1, check=False)
    assert res.returncode != 0
    assert "UnsafeCheckpointError" in res.stderr and f"{evil}: refusing to unpickle" in res.stderr
    assert "posix.system" in res.stderr or "os.system" in res.stderr
    assert not marker.exists(), "the planted pickle ran during resume"
    torch.load(evil, weights_only=False)  # the payload is live: an unguarded load does run it
    assert marker.exists()


def test_student_limits_that_cut_text_the_teacher_saw_are_an_error_unless_asked(
    tmp_path, cache_dir, student_dir
):
    """A student max_prompt_length shorter than the teacher's cut: refused by default, counted with 'warn'."""
    args = ["train.micro_batch=4", "train.max_steps=2", "train.zero_stage=0", "student.max_prompt_length=4"]
    res = launch(_args(student_dir, cache_dir, tmp_path / "a", *args), 1, check=False)
    assert res.returncode != 0 and "the student's token limits keep" in res.stderr
    assert "data.truncation=warn" in res.stderr
    launch(_args(student_dir, cache_dir, tmp_path / "b", *args, "data.truncation=warn"), 1)
    assert all(r["cut_vs_teacher"] > 0 for r in _metrics(tmp_path / "b"))


def test_resume_accepts_a_longer_run_and_names_what_else_changed(tmp_path, cache_dir, student_dir):
    """Training longer resumes (and says so); changing what is trained is refused, naming the key."""
    out = tmp_path / "run"
    base = ["train.micro_batch=4", "train.zero_stage=0", "output.save_every=1", "output.export=false"]
    launch(_args(student_dir, cache_dir, out, *base, "train.max_steps=2"), 1)
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["max_steps"] == 2 and (out / "deepspeed_config.json").exists()
    # how the same objective is computed may change too (the chunk of the teacher-space KL)
    res = launch(
        _args(student_dir, cache_dir, out, *base, "train.max_steps=3", "objective.teacher_chunk_size=7"), 1
    )
    assert "resuming at step 2" in res.stdout and "train.max_steps: 2 -> 3" in res.stdout
    assert "objective.teacher_chunk_size: 0 -> 7" in res.stdout
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
    res = launch(
        _args(student_dir, cache_dir, out, *base, "train.max_steps=4", "optim.lr=0.1"), 1, check=False
    )
    assert res.returncode != 0 and "optim.lr: 0.0005 -> 0.1" in res.stderr
    # a checkpoint of an older release, from before checkpoints recorded their objective (the record taken out,
    # the checksum rewritten as that release wrote it): eq 14's entropy source is not known (its default moved
    # meanwhile), so the resume is refused naming it, and resumes once the run says it
    import hashlib

    state = out / "checkpoints" / "step-0000003" / "mp_rank_00_model_states.pt"
    client = torch.load(state, weights_only=False)
    assert client["objective"]["teacher_entropy"] == "cache" and client["objective"]["method"] == "dwa_kd"
    del client["objective"]
    torch.save(client, state)
    for part in (state.parent / "xtokd_checksums").glob("rank-*.json"):
        sums = json.loads(part.read_text())
        sums[state.name] = hashlib.sha256(state.read_bytes()).hexdigest()
        part.write_text(json.dumps(sums))
    res = launch(_args(student_dir, cache_dir, out, *base, "train.max_steps=4"), 1, check=False)
    assert (
        res.returncode != 0 and "objective.teacher_entropy: \"<unknown: eq 14's teacher entropy" in res.stderr
    )
    assert "set objective.teacher_entropy= to what the checkpoint trained with" in res.stderr
    told = "objective.teacher_entropy=cache"
    res = launch(_args(student_dir, cache_dir, out, *base, "train.max_steps=4", told), 1)
    assert "resuming at step 3" in res.stdout and [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_dskd_cma_ga_trains_checkpoints_and_resumes_its_discriminator(tmp_path, cache_dir, student_dir):
    """DSKD-CMA-GA through the real student job: the discriminator is trained (it leaves its init, unlike
    ga_train_discriminator=false, the DSKD-KQ code's behaviour), and a run stopped at step 2 and resumed to step
    4 ends with the same student, projectors and discriminator as one uninterrupted run of 4 steps (weights
    and optimizer state come back from the checkpoint)."""
    common = [
        "objective.preset=dskd_cma_ga",
        "objective.ga_hidden=16",
        "train.micro_batch=2",
        "train.zero_stage=2",
        "output.save_every=2",
        "data.verify_checksums=false",
        # a constant LR: the cosine schedule's length is train.max_steps, which the split run changes
        "optim.warmup_steps=0",
        "optim.lr=1e-3",
        "optim.eta_min=1e-3",
    ]
    launch(_args(student_dir, cache_dir, tmp_path / "whole", *common, "train.max_steps=4"), 1)
    launch(_args(student_dir, cache_dir, tmp_path / "split", *common, "train.max_steps=2"), 1)
    res = launch(_args(student_dir, cache_dir, tmp_path / "split", *common, "train.max_steps=4"), 1)
    assert "resuming at step 2" in res.stdout
    frozen = [*common, "objective.ga_train_discriminator=false", "train.max_steps=4"]
    launch(_args(student_dir, cache_dir, tmp_path / "frozen", *frozen), 1)
    whole, split, still = (_weights(tmp_path / n) for n in ("whole", "split", "frozen"))
    disc = [k for k in whole if "kq_discriminator" in k]
    assert len(disc) == 6  # highway, linear1, linear2: weight and bias
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-6, atol=1e-7, msg=k)
    assert all(not torch.equal(whole[k], still[k]) for k in disc)  # trained vs left at its (seeded) init
    recs = _metrics(tmp_path / "whole")
    assert all(r["term/kq_adversarial"] > 0 and r["term/kd_teacher"] > 0 for r in recs)


@pytest.mark.parametrize("zero", [2, 3])
def test_optimizer_offload_trains_with_the_runs_own_adamw(tmp_path, cache_dir, student_dir, zero):
    """train.offload=true: optimizer states on the CPU with the run's AdamW (two parameter groups), through the
    real launcher; the loss is finite, the run resumes from its offloaded checkpoint, and the export loads."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    extra = [
        "train.micro_batch=2",
        f"train.zero_stage={zero}",
        "train.offload=true",
        "output.save_every=1",
        "data.verify_checksums=false",
    ]
    launch(_args(student_dir, cache_dir, out, *extra, "train.max_steps=2"), 1)
    res = launch(_args(student_dir, cache_dir, out, *extra, "train.max_steps=3"), 1)
    assert "resuming at step 2" in res.stdout
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in recs)
    assert json.loads((out / "deepspeed_config.json").read_text())["zero_force_ds_cpu_optimizer"] is False
    model = AutoModelForCausalLM.from_pretrained(out / "export")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_projector_prefit_lowers_proj_ce_before_training(tmp_path, cache_dir, student_dir):
    """The pre-fit fits query/t2s on proj_ce alone; the run then starts from those projectors (both ranks)."""
    common = ["objective.preset=dwa_kd", "train.micro_batch=2", "train.max_steps=1", "train.zero_stage=2"]
    plain = launch(_args(student_dir, cache_dir, tmp_path / "plain", *common), 2)
    assert "[prefit]" not in plain.stdout
    res = launch(
        _args(student_dir, cache_dir, tmp_path / "fit", *common, "train.projector_prefit_steps=8"), 2
    )
    fit = [line for line in res.stdout.splitlines() if line.startswith("[prefit] {")]
    assert len(fit) == 1, res.stdout[-3000:]
    info = eval(fit[0][len("[prefit] ") :], {"__builtins__": {}}, {"nan": float("nan")})  # noqa: S307
    assert info["steps"] == 8 and info["last"] < info["first"]
    before, after = _metrics(tmp_path / "plain")[0], _metrics(tmp_path / "fit")[0]
    assert after["term/proj_ce"] < before["term/proj_ce"]
    bad = launch(
        _args(
            student_dir, cache_dir, tmp_path / "sft", "objective.preset=uld", "train.projector_prefit_steps=2"
        ),
        1,
        check=False,
    )
    assert bad.returncode != 0 and "has no cross-model attention projectors" in bad.stderr + bad.stdout


@pytest.mark.slow
def test_planner_predicts_the_student_peak_memory(tmp_path, gpt2_tokenizer, capsys):
    """pipeline.plan's student memory against a real student job's peak: a GPT-2-shaped 51M student (the real
    GPT-2 vocabulary), fp32, ZeRO-2, every micro-batch padded to max_length; the planner is asked through its
    CLI with the student's config.json and the run's settings, and must be within 20% of the growth of the
    job's resident memory from just before the student is built to the end of training (run_info.json)."""
    import random

    from pipeline.plan import main as plan_main
    from pipeline.records import alpaca_prompt
    from pipeline.tiny import _WORDS, save_tiny_model, write_jsonl

    student = save_tiny_model(tmp_path / "student", "gpt2", gpt2_tokenizer, hidden=512, layers=8)
    rng = random.Random(0)
    words = lambda k: " ".join(rng.choice(_WORDS) for _ in range(k))  # noqa: E731
    data = write_jsonl(  # every sample longer than max_length: each micro-batch is max_length wide
        [{"prompt": alpaca_prompt(words(200), ""), "output": words(300)} for _ in range(12)],
        tmp_path / "long.jsonl",
    )
    out = tmp_path / "run"
    launch(
        [
            "--no-progress", f"student.path={student}", "student.pad_token=eos", f"data.sft_path={data}",
            "objective.preset=sft", "train.precision=fp32", f"output.dir={out}", "train.micro_batch=2",
            "train.max_steps=3", "train.zero_stage=2", "student.max_length=256", "student.max_prompt_length=128",
        ],
        1,
    )  # fmt: skip
    measured = json.loads((out / "run_info.json").read_text())["memory_rank0"]["training_growth"]
    cfg = str(student / "config.json")
    capsys.readouterr()
    plan_main(
        [
            "--teacher", cfg, "--student", cfg, "--records", "12", "--mean-tokens", "256", "--method", "sft",
            "--zero", "2", "--gpus", "1", "--micro-batch", "2", "--max-length", "256", "--precision", "fp32",
            "--json",
        ]
    )  # fmt: skip
    predicted = json.loads(capsys.readouterr().out)["student_memory_per_gpu"]["total"]
    assert abs(predicted - measured) <= 0.2 * measured, (predicted, measured)


def test_approximate_teacher_kl_benchmark_is_exact_with_the_whole_vocabulary(cache_dir, student_dir):
    """benchmarks/teacher_kl_approx.py on a real cache and a student forward: a sample as large as the head gives
    the exact KL and gradient; a small one does not; an fp32 cache's entropy column is the rebuilt entropy."""
    res = subprocess.run(
        [sys.executable, "benchmarks/teacher_kl_approx.py", "--cache", str(cache_dir), "--student",
         str(student_dir), "--batches", "1", "--samples", "8,100000", "--seeds", "2", "--reps", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = dict(re.findall(r"^\| (\d+) \| ([^|]+\|[^|]+\|[^|]+)\|$", res.stdout, re.M))
    err, _, cos = (c.strip() for c in rows["100000"].split("|"))
    # exact up to fp32 rounding of 32k-term sums (the float64 unit test asserts equality)
    assert abs(float(err.split("±")[0])) <= 5e-4 and cos.startswith("1.0000"), rows["100000"]
    assert float(rows["8"].split("|")[2].split("(")[0]) < 0.999, rows["8"]
    diff = float(re.search(r"max \|diff\| ([0-9.]+) nats", res.stdout).group(1))
    assert diff < 1e-3
    assert "| sampled 100000 |" in res.stdout and "| exact (auto chunk) |" in res.stdout


def test_a_moved_default_is_seen_on_resume_through_the_resolved_objective(monkeypatch):
    """A checkpoint records the objective it trained, resolved, and a resume compares resolved objectives; a
    field a record lacks counts as ABSENT_MEANT says, any other as its value now; a checkpoint from before the
    record is resolved from its settings, and a field whose default moved meanwhile (teacher_entropy) is left
    open, and must be said, only where it changes the objective."""
    from student_train.losses.config import ObjectiveConfig
    from student_train.trainer import ABSENT_MEANT, changed_objective, checkpoint_objective, objective_record

    def resolved(preset, **kw):
        return objective_record(ObjectiveConfig.from_dict({"preset": preset, "check_inputs": False, **kw}))

    now = resolved("dwa_kd")
    assert now["teacher_entropy"] == "cache" and isinstance(now["span_teacher_layers"], list)
    assert changed_objective(dict(now), now) == {}
    assert changed_objective({**now, "kd_temperature": 1.0}, now) == {"objective.kd_temperature": (1.0, 2.0)}
    # a field a record lacks: its value now, unless ABSENT_MEANT says what it meant (the mechanism, planted)
    old = {k: v for k, v in now.items() if k != "teacher_kl"}
    assert changed_objective(old, now) == {}
    monkeypatch.setitem(ABSENT_MEANT, "teacher_kl", "sampled")
    assert changed_objective(old, now) == {"objective.teacher_kl": ("<absent: 'sampled'>", "exact")}
    # where a field does not change the loss it does not count (SFT has no eq 14)
    assert changed_objective(resolved("sft", teacher_entropy="head"), resolved("sft")) == {}
    assert changed_objective(resolved("dwa_kd", teacher_entropy="head"), now) == {
        "objective.teacher_entropy": ("head", "cache")
    }
    # a record is taken as it is; a dict of another shape is not a record
    assert checkpoint_objective({"objective": now}, {}, {}) == (now, {})
    # before the record: resolved from the settings; teacher_entropy open where eq 14 is on, unless this run says
    legacy, open_ = checkpoint_objective({"objective": {"step": 3}}, {"objective.preset": "dwa_kd"}, {})
    assert legacy == now and list(open_) == ["objective.teacher_entropy"]
    assert "b20a1dd" in open_["objective.teacher_entropy"][0]
    told = {"objective.preset": "dwa_kd", "objective.teacher_entropy": "head"}
    legacy, open_ = checkpoint_objective({}, {"objective.preset": "dwa_kd"}, told)
    assert legacy["teacher_entropy"] == "head" and open_ == {}
    for preset in ("sft", "dskd", "uld", "sra"):
        legacy, open_ = checkpoint_objective({}, {"objective.preset": preset}, {})
        assert legacy == resolved(preset) and open_ == {}, preset
    assert checkpoint_objective({}, {"objective.preset": "dwa_kd", "objective.gone_key": 1}, {}) == (None, {})
