"""Typed configuration of a student run; the DeepSpeed config is derived from it, never written by hand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import field
from student_train.losses.config import ObjectiveConfig


@dataclass
class StudentConfig:
    """The student model and tokenizer."""

    path: str = field(
        "",
        help="HF model dir (or hub id) of the student, or model:NAME (a GGUF model of configs/models, "
        "prepared once); its tokenizer is loaded from the same place",
    )
    tokenizer: str | None = field(None, help="tokenizer dir if different from `path`")
    pad_token: str | None = field(
        None, help="pad token to use when the tokenizer has none; 'eos' = the EOS token (DSKD)"
    )
    eos_token: str | None = field(None, help="override the EOS token appended to responses")
    max_length: int = field(512, help="max student tokens of prompt+response+EOS (METHOD.md §1)")
    max_prompt_length: int = field(256, help="the prompt keeps its first N student tokens")
    gradient_checkpointing: bool = field(False, help="trade compute for activation memory")
    keep_layers: int | None = field(
        None,
        help="prune the student to N of its layers, spread out evenly (first and last kept), before "
        "training: Minitron-style 'prune, then distil'; recorded in the export",
    )
    keep_layer_ids: list[int] | None = field(
        None, help="prune to exactly these layer indices (0-based, increasing); exclusive with keep_layers"
    )

    def validate(self) -> None:
        if not self.path:
            raise ValueError(
                "student.path is empty: give the student's HF model directory or model:NAME "
                "(configs/models/NAME.yaml)"
            )
        if self.keep_layers is not None and self.keep_layer_ids is not None:
            raise ValueError("set student.keep_layers or student.keep_layer_ids, not both")
        if self.keep_layers is not None and self.keep_layers < 1:
            raise ValueError(f"student.keep_layers must be >= 1, got {self.keep_layers}")
        ids = self.keep_layer_ids
        if ids is not None and (not ids or min(ids) < 0 or any(b <= a for a, b in zip(ids, ids[1:]))):
            raise ValueError(f"student.keep_layer_ids must be non-empty, >= 0 and increasing, got {ids}")
        if not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError("need 1 <= student.max_prompt_length < student.max_length")


@dataclass
class LoraConfig:
    """LoRA through peft (off = full fine-tuning)."""

    enabled: bool = field(False, help="train LoRA adapters instead of all weights")
    r: int = field(256, help="LoRA rank (METHOD.md §6: 256)")
    alpha: int = field(8, help="LoRA alpha")
    dropout: float = field(0.1, help="LoRA dropout")
    target_modules: list[str] | None = field(None, help="module names to adapt; null = all linear layers")


@dataclass
class DataSection:
    """Where training rows come from."""

    cache: str | None = field(
        None, help="teacher cache (dir or URI); null = SFT from `sft_path` without a teacher"
    )
    sft_path: str | None = field(None, help="records file for SFT without a cache (also teacher SFT)")
    expect_teacher: str | None = field(
        None, help="refuse a cache built from another teacher (manifest teacher.name)"
    )
    expect_tokenizer_sha256: str | None = field(None, help="refuse a cache whose teacher tokenizer differs")
    verify_checksums: bool = field(True, help="recompute the sha256 of this rank's shards before training")
    truncation: Literal["error", "warn"] = field(
        "error",
        help="when the student's token limits keep less of a sample's text (prompt or response) than the "
        "teacher saw: 'error' stops naming the sample; 'warn' trains on and counts them (metrics "
        "'cut_vs_teacher')",
    )
    teacher_tokenizer: str | None = field(
        None,
        help="the teacher tokenizer (dir or model:NAME) for a cache built before caches stored it; MinED "
        "needs its token strings; checked against the cache's tokenizer fingerprint",
    )
    shuffle_buffer: int = field(256, help="rows per seeded shuffle window (0 = no shuffle)")
    num_workers: int = field(0, help="DataLoader workers per rank (each reads its own shards)")


@dataclass
class OptimConfig:
    """AdamW + cosine schedule (METHOD.md §2.11, §6)."""

    lr: float = field(5e-4, help="student learning rate")
    projector_lr: float = field(1e-3, help="learning rate of the projectors (own parameter group)")
    weight_decay: float = field(0.01, help="AdamW weight decay")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], help="AdamW betas")
    eps: float = field(1e-8, help="AdamW epsilon")
    eta_min: float = field(1e-7, help="cosine schedule floor")
    warmup_steps: int = field(0, help="linear warm-up steps (METHOD: none)")
    clip_grad: float = field(1.0, help="gradient clipping norm (0 = off)")


@dataclass
class TrainLoop:
    """Batching, length and bookkeeping."""

    micro_batch: int = field(4, help="samples per rank per micro-step")
    grad_accum: int = field(1, help="micro-steps per optimizer step")
    epochs: int = field(1, help="passes over the data")
    max_steps: int | None = field(None, help="stop after this many optimizer steps (overrides epochs)")
    seed: int = field(10, help="seed of init, shuffling and dropout")
    precision: Literal["fp32", "bf16", "fp16"] = field(
        "bf16",
        help="training precision (bf16 and fp16 keep fp32 master weights; fp16 with DeepSpeed's dynamic loss "
        "scaling, for accelerators without bf16)",
    )
    zero_stage: int = field(1, help="DeepSpeed ZeRO stage 0-3")
    offload: bool = field(False, help="offload optimizer state to CPU (ZeRO >= 1)")
    max_nan_skips: int = field(10, help="stop the run after this many skipped non-finite steps")
    projector_prefit_steps: int = field(
        0,
        help="micro-batches fitting the query/t2s projectors on proj_ce alone before training, student "
        "untouched (not in the papers; student_train/prefit.py). 0 = off",
    )
    log_every: int = field(1, help="optimizer steps between metric records")
    collective_timeout_s: float = field(
        1800.0, help="a collective (all-reduce, barrier) waiting longer than this fails the run with an error"
    )
    deepspeed_config: str | None = field(
        None,
        help="a DeepSpeed JSON merged over the derived dict (any key this config does not own, e.g. "
        "zero_optimization.reduce_bucket_size, activation_checkpointing); a key it owns must agree or is an error",
    )

    def validate(self) -> None:
        if self.micro_batch < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise ValueError("train.micro_batch, train.grad_accum and train.epochs must be >= 1")
        if self.projector_prefit_steps < 0:
            raise ValueError(f"train.projector_prefit_steps must be >= 0, got {self.projector_prefit_steps}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass
class OutputConfig:
    """Checkpoints, export and metrics."""

    dir: str = field(
        "runs/student", help="run directory: checkpoints/, export/, metrics.jsonl, tensorboard/, plots"
    )
    save_every: int = field(0, help="optimizer steps between checkpoints (0 = only at the end)")
    resume: bool = field(True, help="resume from the latest checkpoint in dir/checkpoints when there is one")
    export: bool = field(True, help="write an HF-format student (+ projectors) to dir/export at the end")
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto",
        help="dtype of the exported weights; auto = the training precision (fp32 -> float32, bf16 -> bfloat16, fp16 -> float16)",
    )


@dataclass
class TrainConfig:
    """A student run: model, data, objective, optimizer, loop, outputs."""

    student: StudentConfig = field(default_factory=StudentConfig, help="the student")
    lora: LoraConfig = field(default_factory=LoraConfig, help="LoRA (peft)")
    data: DataSection = field(default_factory=DataSection, help="training rows")
    objective: dict[str, Any] = field(
        default_factory=lambda: {"preset": "dwa_kd"}, help="ObjectiveConfig: `preset` plus overrides"
    )
    optim: OptimConfig = field(default_factory=OptimConfig, help="optimizer and schedule")
    train: TrainLoop = field(default_factory=TrainLoop, help="loop")
    output: OutputConfig = field(default_factory=OutputConfig, help="outputs")

    def validate(self) -> None:
        self.objective_config()  # raises on unknown keys / bad values
        if self.objective_config().needs_teacher and not self.data.cache:
            raise ValueError(
                f"objective {self.objective_config().method!r} needs a teacher cache: set data.cache "
                "(build one with `python -m teacher_cache.job`), or use objective.preset=sft"
            )
        if self.train.projector_prefit_steps and not self.objective_config().needs_cma:
            raise ValueError(
                f"train.projector_prefit_steps={self.train.projector_prefit_steps}: objective "
                f"{self.objective_config().method!r} has no cross-model attention projectors to pre-fit"
            )
        if not self.data.cache and not self.data.sft_path:
            raise ValueError("set data.cache (distillation) or data.sft_path (SFT without a teacher)")

    def objective_config(self) -> ObjectiveConfig:
        # the trainer turns a non-finite loss into a skipped, counted step, so per-input finiteness checks
        # (one host sync each) are off unless asked for
        values = {"check_inputs": False, **self.objective}
        return ObjectiveConfig.from_dict(values)

    def deepspeed_config(self, world_size: int) -> dict:
        """The DeepSpeed dict, derived: batch sizes, ZeRO stage, offload, precision, clipping."""
        t = self.train
        zero: dict[str, Any] = {"stage": t.zero_stage}
        if t.offload and t.zero_stage >= 1:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if t.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        ds = {
            "train_micro_batch_size_per_gpu": t.micro_batch,
            "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.micro_batch * t.grad_accum * world_size,
            "gradient_clipping": self.optim.clip_grad,
            "zero_optimization": zero,
            "bf16": {"enabled": t.precision == "bf16"},
            "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if "offload_optimizer" in zero:
            # the run's own AdamW (two parameter groups) on the offloaded CPU states, instead of DeepSpeed
            # refusing any optimizer but its CPU Adam
            ds["zero_force_ds_cpu_optimizer"] = False
        if t.deepspeed_config:
            ds = merge_deepspeed(ds, _read_json(t.deepspeed_config))
        return ds


# the DeepSpeed keys the training config owns (set through train.* / optim.*): a user JSON may repeat them
# only with the same value
_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch x train.grad_accum x world size",
    "gradient_clipping": "optim.clip_grad",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer": "train.offload",
    "bf16": "train.precision",
    "bf16.enabled": "train.precision",
    "fp16": "train.precision",
    "fp16.enabled": "train.precision",
    "optimizer": "optim.* (the run builds its own AdamW)",
    "scheduler": "optim.* (the run builds its own schedule)",
}


def _read_json(path: str) -> dict:
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"train.deepspeed_config={path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"train.deepspeed_config={path}: must hold a JSON object")
    return data


def merge_deepspeed(derived: dict, user: dict, prefix: str = "") -> dict:
    """``user`` merged over ``derived``: new keys are added (nested dicts merged); a key the training config
    owns (``_OWNED``) must agree with the derived value, otherwise a ValueError names it and its config key."""
    out = dict(derived)
    for key, value in user.items():
        dotted = prefix + key
        if isinstance(value, dict) and isinstance(out.get(key), dict) and dotted not in _OWNED:
            out[key] = merge_deepspeed(out[key], value, dotted + ".")
            continue
        if dotted in _OWNED and (key not in out or out[key] != value):
            raise ValueError(
                f"train.deepspeed_config sets {dotted}={value!r}, which the training config owns "
                f"({_OWNED[dotted]}, derived value {out.get(key)!r}); set it there instead"
            )
        out[key] = value
    return out
