"""Student loading (full or LoRA), the distiller module the DeepSpeed engine wraps, and export."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from student_train.config import TrainConfig
from student_train.data import DistillBatch
from student_train.losses.cma import Projectors, formal_ids
from student_train.losses.objective import (
    ObjectiveConfig,
    ObjectiveInputs,
    ObjectiveOutput,
    compute_objective,
)


class StudentSetupError(ValueError):
    """The student or its tokenizer cannot be used as configured."""


def load_student_tokenizer(cfg: TrainConfig):
    """The student's fast tokenizer with a pad token (the configured one, or an actionable error)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.student.tokenizer or cfg.student.path)
    if tok.pad_token_id is None:
        if cfg.student.pad_token is None:
            raise StudentSetupError(
                f"the student tokenizer ({cfg.student.tokenizer or cfg.student.path}) has no pad token; set "
                "student.pad_token=eos to pad with EOS as DSKD does, or name an existing token"
            )
        tok.pad_token = tok.eos_token if cfg.student.pad_token == "eos" else cfg.student.pad_token
        if tok.pad_token_id is None:
            raise StudentSetupError(
                f"student.pad_token={cfg.student.pad_token!r} is not a token of the student tokenizer"
            )
    return tok


def load_student(cfg: TrainConfig) -> nn.Module:
    """The student causal LM, wrapped with LoRA adapters when ``lora.enabled``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.student.path, dtype=torch.float32)
    if cfg.student.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model

        target = cfg.lora.target_modules or "all-linear"
        model = get_peft_model(
            model,
            PeftLora(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=target,
                task_type="CAUSAL_LM",
            ),
        )
    return model


def _gathered_clone(weight: torch.Tensor) -> torch.Tensor:
    """A detached full copy of a (possibly ZeRO-3 partitioned) parameter."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # already whole (no ZeRO-3, or fetched by a module that is running): a plain copy
    if not hasattr(weight, "ds_id") or weight.ds_status == ZeroParamStatus.AVAILABLE:
        return weight.detach().clone()
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        return weight.detach().clone()


class Distiller(nn.Module):
    """Student + projectors; ``forward(batch)`` returns the objective (a sum over valid tokens).

    The teacher head and embedding table are plain attributes (not parameters or buffers), so DeepSpeed
    neither partitions nor casts them: they stay the exact cached constants.
    """

    def __init__(
        self,
        student: nn.Module,
        projectors: Projectors | None,
        objective: ObjectiveConfig,
        teacher_head: torch.Tensor | None = None,
        teacher_embeddings: torch.Tensor | None = None,
    ):
        super().__init__()
        self.student = student
        self.projectors = projectors
        self.objective = objective
        self.teacher = {"head": teacher_head, "embeddings": teacher_embeddings}

    def forward(self, batch: DistillBatch) -> ObjectiveOutput:
        cfg = self.objective
        out = self.student(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_hidden_states=cfg.needs_teacher,
        )
        if not cfg.needs_teacher:
            return compute_objective(
                cfg, ObjectiveInputs(student_logits=out.logits, student_labels=batch.labels)
            )
        emb = self.student.get_input_embeddings()
        inputs = ObjectiveInputs(
            student_logits=out.logits,
            student_labels=batch.labels,
            student_hidden=out.hidden_states[-1],
            student_input_embeds=emb(formal_ids(batch.input_ids, batch.labels)),
            student_target_embeds=emb(formal_ids(batch.labels, batch.labels)),
            student_head=_gathered_clone(self.student.get_output_embeddings().weight)
            if cfg.needs_cma
            else None,
            teacher_hidden=batch.t_hidden,
            teacher_input_ids=batch.t_input_ids,
            teacher_labels=batch.t_labels,
            teacher_head=self.teacher["head"],
            teacher_embeddings=self.teacher["embeddings"],
            teacher_attention_mask=batch.t_mask,
        )
        return compute_objective(cfg, inputs, self.projectors)

    def zero_loss(self, batch: DistillBatch) -> torch.Tensor:
        """A loss whose backward gives every trainable parameter an exact zero gradient (skipped steps)."""
        out = self.student(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        )
        loss = 0.0 * torch.nan_to_num(out.logits.float(), 0.0, 0.0, 0.0).sum()
        if self.projectors is not None:
            for lin in self.projectors.modules():
                if isinstance(lin, nn.Linear):
                    x = torch.zeros(1, lin.in_features, dtype=lin.weight.dtype, device=batch.input_ids.device)
                    loss = loss + 0.0 * lin(x).float().sum()
        return loss


def export_student(cfg: TrainConfig, state: dict[str, torch.Tensor], tokenizer, out_dir: Path) -> Path:
    """Write an HF-format student (LoRA merged) and ``projectors.safetensors`` from a full fp32 state dict."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    student = load_student(cfg)
    sd = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
    missing, unexpected = student.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied heads are not stored twice
    if missing or unexpected:
        raise RuntimeError(
            f"export: state dict does not match the student (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if cfg.lora.enabled:
        student = student.merge_and_unload()
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    proj = {k[len("projectors.") :]: v.contiguous() for k, v in state.items() if k.startswith("projectors.")}
    if proj:
        save_file(proj, str(out_dir / "projectors.safetensors"))
    return out_dir
