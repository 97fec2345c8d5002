"""Typed configs: unknown keys are errors, overrides are typed, every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, describe, load_config, parse_overrides
from teacher_cache.job import CacheJobConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "cache").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_cache_config_loads(path):
    cfg = load_config(CacheJobConfig, path)
    assert cfg.cache.output and cfg.teacher.path and cfg.data.path


def test_unknown_keys_and_bad_types_are_errors(tmp_path):
    base = ["data.path=x.jsonl", "teacher.path=t", "cache.output=o"]
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['cache.hiden_dtype'\]"):
        load_config(CacheJobConfig, None, [*base, "cache.hiden_dtype=int8"])
    with pytest.raises(ConfigError, match="ray.batch_size: expected an integer, found 'four'"):
        load_config(CacheJobConfig, None, [*base, "ray.batch_size=four"])
    with pytest.raises(ValueError, match="cache.hidden_dtype must be one of"):
        load_config(CacheJobConfig, None, [*base, "cache.hidden_dtype=int4"])
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(CacheJobConfig, None, [*base, "data.format=csv"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["ray.batch_size"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(CacheJobConfig, tmp_path / "missing.yaml")


def test_overrides_win_over_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {path: a.jsonl}\nteacher: {path: t}\ncache: {output: o, top_k: 4}\n")
    cfg = load_config(CacheJobConfig, p, ["cache.top_k=8", "ray.gpus_per_actor=0.5"])
    assert cfg.cache.top_k == 8 and cfg.ray.gpus_per_actor == 0.5 and cfg.data.path == "a.jsonl"


def test_help_lists_every_key_with_its_help():
    lines = "\n".join(describe(CacheJobConfig))
    for key in ("data.path", "teacher.gguf_file", "cache.hidden_dtype", "ray.gpus_per_actor"):
        assert key in lines
    assert "storage dtype of hidden states" in lines


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_train_config_loads(path):
    from student_train.config import TrainConfig

    cfg = load_config(TrainConfig, path)
    obj = cfg.objective_config()
    ds = cfg.deepspeed_config(world_size=2)
    assert ds["train_batch_size"] == cfg.train.micro_batch * cfg.train.grad_accum * 2
    from student_train.losses.config import PRESETS

    named = [p for p in PRESETS if path.stem.endswith("_" + p)]
    if named:  # a config named after a method runs that method (pair configs take objective.preset=)
        assert obj.method == max(named, key=len)


def test_train_config_errors():
    from student_train.config import TrainConfig

    with pytest.raises(ValueError, match="needs a teacher cache"):
        load_config(TrainConfig, None, ["student.path=s", "data.sft_path=x.jsonl"])
    with pytest.raises(ValueError, match="unknown objective config keys"):
        load_config(TrainConfig, None, ["student.path=s", "data.cache=c", "objective.lambda_xx=1"])
    with pytest.raises(ValueError, match="zero_stage must be"):
        load_config(TrainConfig, None, ["student.path=s", "data.cache=c", "train.zero_stage=4"])


def test_floats_without_a_dot_are_numbers_and_words_are_errors():
    from student_train.config import TrainConfig

    base = ["student.path=s", "data.sft_path=x.jsonl", "objective.preset=sft"]
    cfg = load_config(TrainConfig, None, [*base, "optim.lr=2e-5"])  # YAML 1.1 reads this as a string
    assert cfg.optim.lr == 2e-5
    with pytest.raises(ConfigError, match="optim.lr: expected a number, found 'abc'"):
        load_config(TrainConfig, None, [*base, "optim.lr=abc"])


def test_student_job_reports_config_mistakes_in_one_line():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    base = [sys.executable, "student_train/main.py", "student.path=s", "data.sft_path=x.jsonl"]
    res = subprocess.run(
        [*base, "objective.preset=sft", "objective.dtw_gamma=abc"], cwd=repo, capture_output=True, text=True
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "error: objective.dtw_gamma: expected a number, found 'abc'" in res.stderr
    res = subprocess.run([*base, "objective.preset=nope"], cwd=repo, capture_output=True, text=True)
    assert (
        res.returncode == 2
        and "unknown objective preset 'nope'" in res.stderr
        and "Traceback" not in res.stderr
    )
    out = subprocess.run([*base[:2], "--help"], cwd=repo, capture_output=True, text=True).stdout
    assert "objective.kd_temperature=2.0" in out and "multilevel_ot" in out


def test_print_config_shows_the_resolved_objective():
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "student_train/main.py", "--config", "configs/train/qwen_smollm2_dolly.yaml",
         "objective.preset=mined", "--print-config"],
        cwd=repo, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    assert cfg["objective"]["logit_kd"] == "mined" and cfg["objective"]["lambda_logit"] == 0.5
    assert cfg["student"]["keep_layers"] == 24 and cfg["data"]["truncation"] == "warn"


@pytest.mark.parametrize(
    "entry,key",
    [
        (
            ["-m", "teacher_cache.job", "--config", "configs/cache/smollm2_dolly.yaml"],
            ("cache", "hidden_dtype"),
        ),
        (["-m", "pipeline.evaluate", "--checkpoint", "x"], ("dtype",)),
        (
            ["student_train/main.py", "--config", "configs/train/smollm2_gpt2_dolly.yaml"],
            ("objective", "lambda_ga"),
        ),
    ],
)
def test_every_entry_point_prints_its_resolved_config_and_refuses_bad_keys_in_one_line(entry, key):
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, *entry, "--print-config"], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    node = yaml.safe_load(res.stdout)
    for k in key:
        node = node[k]
    assert node is not None
    bad = subprocess.run([sys.executable, *entry, "no_such.key=1"], cwd=repo, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_resume_compares_settings_key_by_key_and_tolerates_keys_a_newer_release_added():
    """A checkpoint saved before a config key existed resumes while the run keeps that key at its default;
    moving it off the default, or changing any key both sides have, is a change (named)."""
    from student_train.trainer import changed_settings, default_settings

    defaults = default_settings()
    now = dict(defaults)
    before = {k: v for k, v in now.items() if k != "train.deepspeed_config"}  # saved by an older release
    assert changed_settings(before, now, defaults) == {}
    assert changed_settings(before, {**now, "train.deepspeed_config": "ds.json"}, defaults) == {
        "train.deepspeed_config": ("<absent>", "ds.json")
    }
    assert changed_settings(before, {**now, "optim.lr": 0.1}, defaults) == {
        "optim.lr": (defaults["optim.lr"], 0.1)
    }
    assert (
        changed_settings({**before, "removed.key": 1}, now, defaults) == {}
    )  # a key no release sets any more


def test_fp16_training_has_loss_scaling_and_is_refused_where_deepspeed_lacks_it():
    """train.precision=fp16: DeepSpeed's fp16 section with dynamic loss scaling (and bf16 off); on a device
    without fp16 support (this CPU) the student job stops with one line before building anything."""
    import subprocess
    import sys

    import torch

    from student_train.config import TrainConfig

    cfg = load_config(
        TrainConfig, None, ["data.sft_path=x.jsonl", "objective.preset=sft", "train.precision=fp16"]
    )
    ds = cfg.deepspeed_config(2)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert ds["bf16"] == {"enabled": False}
    if torch.cuda.is_available():
        return
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "student_train/main.py", "student.path=s", "data.sft_path=x.jsonl", "objective.preset=sft",
         "train.precision=fp16"],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "train.precision=fp16: DeepSpeed does not support fp16 on this device (cpu)" in res.stderr
