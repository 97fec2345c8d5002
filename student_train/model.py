"""Student loading (full or LoRA), the distiller module the DeepSpeed engine wraps, and export."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline.models import resolve as resolve_model
from student_train.config import TrainConfig
from student_train.data import DistillBatch
from student_train.losses.cma import Projectors, formal_ids
from student_train.losses.objective import (
    ObjectiveConfig,
    ObjectiveInputs,
    ObjectiveOutput,
    compute_objective,
)

PROJECTORS_FILE = "projectors/projectors.safetensors"  # a subfolder: loaders that glob *.safetensors skip it
MODEL_CARD = "README.md"


def projectors_path(export_dir: Path) -> Path:
    """The projectors of an export (the subfolder; exports written before it kept them beside the model)."""
    new, old = Path(export_dir) / PROJECTORS_FILE, Path(export_dir) / "projectors.safetensors"
    return new if new.exists() or not old.exists() else old


class StudentSetupError(ValueError):
    """The student or its tokenizer cannot be used as configured."""


def load_student_tokenizer(cfg: TrainConfig):
    """The student's fast tokenizer with a pad token (the configured one, or an actionable error)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.student.tokenizer or cfg.student.path))
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


def spread_layers(total: int, keep: int) -> list[int]:
    """``keep`` of ``total`` layer indices spread out evenly, first and last always kept."""
    if not 1 <= keep <= total:
        raise StudentSetupError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the decoder layers and the attribute name (Llama/Qwen/Mistral/Gemma, GPT-2)."""
    base = getattr(model, "model", None)
    if base is not None and isinstance(getattr(base, "layers", None), nn.ModuleList):
        return base, "layers"
    base = getattr(model, "transformer", None)
    if base is not None and isinstance(getattr(base, "h", None), nn.ModuleList):
        return base, "h"
    raise StudentSetupError(f"layer pruning does not know where {type(model).__name__} keeps its layers")


def kept_layer_ids(cfg: TrainConfig, total: int) -> list[int] | None:
    """The layer indices the configured pruning keeps (None: no pruning)."""
    if cfg.student.keep_layer_ids is not None:
        ids = list(cfg.student.keep_layer_ids)
        if ids[-1] >= total:
            raise StudentSetupError(f"student.keep_layer_ids={ids}: the student has only {total} layers")
        return ids
    if cfg.student.keep_layers is not None:
        return spread_layers(total, cfg.student.keep_layers)
    return None


def prune_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the decoder layers ``keep`` (in order); the config and per-layer indices follow."""
    holder, attr = _layer_list(model)
    layers = getattr(holder, attr)
    setattr(holder, attr, nn.ModuleList([layers[i] for i in keep]))
    for new, layer in enumerate(getattr(holder, attr)):
        for mod in layer.modules():  # KV-cache slots are indexed by layer
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new
    cfg = model.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, len(keep))
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return model


def load_student(cfg: TrainConfig) -> nn.Module:
    """The student causal LM, pruned when configured, wrapped with LoRA adapters when ``lora.enabled``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.student.path), dtype=torch.float32)
    if cfg.objective_config().sra_enabled:  # SRA pools with the student's own attention probabilities
        model.set_attn_implementation("eager")
    keep = kept_layer_ids(cfg, model.config.num_hidden_layers)
    if keep is not None:
        prune_layers(model, keep)
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
        mined_map: tuple[torch.Tensor, torch.Tensor] | None = None,
        teacher_head_bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.student = student
        self.projectors = projectors
        self.objective = objective
        self.teacher = {
            "head": teacher_head,
            "bias": teacher_head_bias,
            "embeddings": teacher_embeddings,
            "mined_map": mined_map,
        }

    def forward(self, batch: DistillBatch) -> ObjectiveOutput:
        return compute_objective(self.objective, self.objective_inputs(batch), self.projectors)

    def objective_inputs(self, batch: DistillBatch) -> ObjectiveInputs:
        """The student forward and the cached teacher tensors, as the objective's inputs (live graph)."""
        cfg = self.objective
        out = self.student(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_hidden_states=cfg.needs_projectors,
            output_attentions=cfg.sra_enabled,
        )
        if not cfg.needs_teacher:
            return ObjectiveInputs(student_logits=out.logits, student_labels=batch.labels)
        mined_map = self.teacher["mined_map"]
        if mined_map is not None:
            mined_map = tuple(t.to(out.logits.device) for t in mined_map)
        inputs = ObjectiveInputs(
            student_logits=out.logits,
            student_labels=batch.labels,
            teacher_hidden=batch.t_hidden,
            teacher_input_ids=batch.t_input_ids,
            teacher_labels=batch.t_labels,
            teacher_head=self.teacher["head"],
            teacher_head_bias=self.teacher["bias"],
            teacher_embeddings=self.teacher["embeddings"],
            teacher_attention_mask=batch.t_mask,
            teacher_topk_logprobs=batch.t_topk_logprobs,
            teacher_topk_ids=batch.t_topk_ids if cfg.needs_teacher_topk_ids else None,  # checked only then
            aligned_positions=batch.aligned_positions,
            mined_positions=batch.mined_positions,
            mined_map=mined_map,
        )
        if cfg.needs_teacher_entropy:  # eq (14)'s weights or MTA's certainty, from the cache's column
            inputs.teacher_entropy = batch.t_entropy
        if cfg.cma_projectors:  # the DSKD family also needs student states and embeddings
            emb = self.student.get_input_embeddings()
            inputs.student_hidden = out.hidden_states[-1]
            inputs.student_input_embeds = emb(formal_ids(batch.input_ids, batch.labels))
            inputs.student_target_embeds = emb(formal_ids(batch.labels, batch.labels))
            if cfg.needs_cma:
                inputs.student_head = _gathered_clone(self.student.get_output_embeddings().weight)
        if cfg.span_enabled:  # MTA: the layer pairs, the spans and the real positions
            inputs.student_layers = [out.hidden_states[n] for n in cfg.span_student_layers]
            inputs.teacher_layers = [
                batch.t_hidden if n < 0 else batch.t_layers[n] for n in cfg.span_teacher_layers
            ]
            inputs.student_attention_mask = batch.attention_mask
            inputs.word_spans, inputs.phrase_spans = batch.word_spans, batch.phrase_spans
        if cfg.sra_enabled:  # SRA: layer pairs, salience (the student's from its own attention), chunks
            from teacher_cache.format import attention_salience

            depth = len(out.attentions)
            inputs.sra_student_layers = [out.hidden_states[n] for n in cfg.sra_student_layers]
            inputs.sra_teacher_layers = [
                batch.t_hidden if n < 0 else batch.t_layers[n] for n in cfg.sra_teacher_layers
            ]
            inputs.student_salience = [
                attention_salience(out.attentions[(depth if n < 0 else n) - 1].detach(), batch.attention_mask)
                for n in cfg.sra_student_layers
            ]
            inputs.teacher_salience = [batch.t_salience[n] for n in cfg.sra_teacher_layers]
            inputs.chunk_spans = batch.chunk_spans
            inputs.student_output_head = self.student.get_output_embeddings()
            shared = self.teacher.get("shared_vocab")
            inputs.shared_vocab = None if shared is None else tuple(t.to(out.logits.device) for t in shared)
        return inputs

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


def export_student(
    cfg: TrainConfig, state: dict[str, torch.Tensor], tokenizer, out_dir: Path, card: dict | None = None
) -> Path:
    """Write a standard HF directory from a full fp32 state dict: the student (LoRA merged) in the export dtype,
    its tokenizer, ``adapter/`` (the peft adapter, LoRA runs), ``projectors/projectors.safetensors`` (fp32, kept
    out of the top level so that loaders globbing ``*.safetensors`` read the model only), a model card and
    ``xtokd_student.json`` (provenance: the source model and the layers a pruned student kept)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from pipeline.tokenize import eos_id_of

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
        student.save_pretrained(out_dir / "adapter")  # the adapter alone, loadable with peft over the base
        student = student.merge_and_unload()
    dtype = cfg.output.export_dtype
    if dtype == "auto":
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.train.precision, "float32")
    student = student.to(getattr(torch, dtype))
    # one EOS everywhere: the token the student was trained to end its answers with
    eos = eos_id_of(tokenizer, cfg.student.eos_token)
    student.config.eos_token_id = eos
    if student.generation_config is not None:
        student.generation_config.eos_token_id = eos
        student.generation_config.pad_token_id = tokenizer.pad_token_id
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    source = resolve_model(cfg.student.path)
    total = AutoConfig.from_pretrained(source).num_hidden_layers
    (out_dir / "xtokd_student.json").write_text(
        json.dumps(
            {
                "student_path": cfg.student.path,
                "source_layers": total,
                "kept_layer_ids": kept_layer_ids(cfg, total),
                "lora": cfg.lora.enabled,
                "dtype": dtype,
            },
            indent=2,
        )
    )
    proj = {k[len("projectors.") :]: v.contiguous() for k, v in state.items() if k.startswith("projectors.")}
    if proj:
        (out_dir / PROJECTORS_FILE).parent.mkdir(exist_ok=True)
        save_file(proj, str(out_dir / PROJECTORS_FILE))
    (out_dir / MODEL_CARD).write_text(model_card(cfg, dtype, card or {}))
    return out_dir


def model_card(cfg: TrainConfig, dtype: str, facts: dict) -> str:
    """A short HF model card: what the student is, how it was trained, from which cache, final metrics."""
    objective = cfg.objective_config()
    metrics = facts.get("final_metrics") or {}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [distillation, cross-tokenizer, xtokd]",
        "---",
        f"# {Path(cfg.output.dir).name}",
        "",
        f"A student distilled with **{objective.method}** by xtokd from a cached teacher (no teacher model in "
        "the training job).",
        "",
        "| | |",
        "|---|---|",
        f"| student | `{cfg.student.path}`"
        + (f", {cfg.student.keep_layers} layers kept" if cfg.student.keep_layers else "")
        + " |",
        f"| teacher | `{facts.get('teacher', '-')}` |",
        f"| teacher cache | `{cfg.data.cache or '-'}` (fingerprint `{str(facts.get('cache_fingerprint') or '-')[:16]}`) |",
        f"| method | `{objective.method}` (objective: `{cfg.objective}`) |",
        f"| training | {facts.get('steps', '?')} steps, micro-batch {cfg.train.micro_batch} x grad-accum "
        f"{cfg.train.grad_accum}, lr {cfg.optim.lr:g}, {cfg.train.precision}, ZeRO-{cfg.train.zero_stage}"
        + (f", LoRA r={cfg.lora.r} (merged; adapter in `adapter/`)" if cfg.lora.enabled else "")
        + " |",
        f"| weights | {dtype}; projectors (training only) in `{PROJECTORS_FILE}` |",
    ]
    if metrics:
        lines += ["", "Final training metrics (last logged step, per label token):", ""]
        lines += [f"- {k}: {v:.4g}" for k, v in metrics.items() if isinstance(v, float)]
    lines += ["", "The full resolved configuration is `config.json` of the run directory."]
    return "\n".join(lines) + "\n"


def build_distiller(cfg: TrainConfig, objective, student: nn.Module, cache, mined=None) -> Distiller:
    """The student with what its objective needs: projectors (DSKD family), the teacher's head and bias (exact
    teacher logits), its embedding table, MinED's vocabulary map. Cached constants only, never a teacher model."""
    projectors = t_head = t_bias = t_emb = None
    if objective.needs_projectors:
        d_s = student.get_input_embeddings().weight.shape[1]
        kq_hidden = objective.ga_hidden if objective.ga_enabled else None
        span_pairs = len(objective.span_teacher_layers) if objective.span_enabled else 0
        projectors = Projectors(
            d_s,
            cache.hidden_size,
            dtw_embed=objective.dtw_enabled,
            kq_hidden=kq_hidden,
            span_pairs=span_pairs,
            sra_pairs=len(objective.sra_teacher_layers) if objective.sra_enabled else 0,
            cma=objective.cma_projectors,
        )
        if kq_hidden is not None and not objective.ga_train_discriminator:
            projectors.kq_discriminator.requires_grad_(False)  # DSKD-KQ's code: never in the optimizer
        if objective.cma_projectors:
            t_emb = cache.load_embeddings().float()
    if objective.needs_teacher_head:
        t_head, t_bias = cache.load_head()  # the bias, when the teacher's head has one, is applied too
        t_head, t_bias = t_head.float(), (None if t_bias is None else t_bias.float())
    mined_map = tuple(torch.from_numpy(a) for a in mined.image()) if mined is not None else None
    distiller = Distiller(student, projectors, objective, t_head, t_emb, mined_map, t_bias)
    if objective.lambda_sra_logit > 0:  # SRA's logits over the token strings both vocabularies hold
        from student_train.align import shared_vocab

        pair = shared_vocab(
            cache.load_teacher_tokenizer(cfg.data.teacher_tokenizer),
            load_student_tokenizer(cfg),
            student_rows=student.get_output_embeddings().weight.shape[0],
            teacher_rows=t_head.shape[0],
        )
        distiller.teacher["shared_vocab"] = tuple(torch.from_numpy(a) for a in pair)
    return distiller


def export_trained(
    cfg: TrainConfig, engine, ckpt_dir: Path, step: int, tokenizer, out_dir: Path, card: dict | None = None
) -> Path:
    """Export the trained student from the engine (ZeRO-0) or from the checkpoint of ``step`` (ZeRO-1/2/3:
    fp32 weights reconstructed from every rank's partition, read under the weights-only guard of resume)."""
    if cfg.train.zero_stage == 0:
        state = {k: v.float().cpu() for k, v in engine.module.state_dict().items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from student_train.trainer import checkpoint_safe_globals, weights_only_loads

        with weights_only_loads(checkpoint_safe_globals()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=f"step-{step:07d}")
    return export_student(cfg, state, tokenizer, out_dir, card)
