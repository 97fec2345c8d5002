"""What the objective consumes: :class:`ObjectiveInputs` and its validation against a config.

Every check names the field, the expected shape and what to do; ``ObjectiveConfig.check_inputs`` turns the
checks that need a host sync (finiteness, id ranges) off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.tokenize import IGNORE_INDEX
from student_train.losses.config import ObjectiveConfig


@dataclass
class ObjectiveInputs:
    """Tensors the objective consumes. ``B`` batch, ``n``/``m`` padded student/teacher lengths.

    Student tensors come from the student forward (the trainer owns it); teacher tensors come from the
    cache and are constants (never receive gradient). Only the fields the configured terms need must be
    set: SFT needs the first two.

    Attributes:
        student_logits: ``[B, n, V_S]`` student logits (any float dtype; fp32 inside).
        student_labels: ``[B, n]`` long next-token labels, ``-100`` at non-response / pad positions.
        student_hidden: ``[B, n, d_S]`` student final hidden states (HF ``hidden_states[-1]``).
        student_input_embeds: ``[B, n, d_S]`` student input-embedding lookups of the FORMAL input ids
            (:func:`~student_train.losses.cma.formal_ids`); detached inside the CMA.
        student_target_embeds: ``[B, n, d_S]`` lookups of the formal target ids. NOT detached: the
            embedding DTW sends gradient into the student embedding table (METHOD.md §5.3).
        student_head: ``[V_S, d_S]`` student LM head weight (used detached; receives no gradient).
        teacher_hidden: ``[B, m, d_T]`` cached teacher final hidden states (any float dtype).
        teacher_input_ids: ``[B, m]`` long teacher input ids (raw; made formal inside).
        teacher_labels: ``[B, m]`` long teacher target ids, ``-100`` at non-response / pad positions.
        teacher_head: ``[V_T, d_T]`` teacher LM head (constant; pass fp32 to avoid a per-step cast).
        teacher_embeddings: ``[V_T', d_T]`` teacher input-embedding table (constant).
        teacher_attention_mask: ``[B, m]`` 1 on real (non-pad) teacher rows; default: all rows real.
        teacher_topk_logprobs: ``[B, m, k]`` cached top-k next-token log-probs (``uld_topk``).
        teacher_head_bias: ``[V_T]`` the teacher LM head's bias, when it has one: added wherever teacher
            logits are rebuilt from hidden states.
        aligned_positions: ``[B, n]`` long, for each student response position the teacher position that
            predicts the same characters, ``-1`` if none (``pairing="offsets"``;
            :func:`student_train.align.aligned_next_token_positions`).
        mined_positions: ``[B, n]`` long, MinED's aligned teacher position per student response position,
            ``-1`` where the one-hot target is used (:func:`student_train.align.mined_aligned_positions`).
        mined_map: ``(stu_ids [K], tea_ids [K])`` long, the vocabulary map's image in the student vocabulary
            and the first teacher id mapped to each (``mined``).
        student_layers: MTA, per layer pair ``[B, n, d_S]`` student hidden states (live).
        teacher_layers: MTA, per layer pair ``[B, m, d_T]`` cached teacher hidden states.
        student_attention_mask: ``[B, n]`` 1 on real (non-pad) student positions (MTA's token weights).
        word_spans, phrase_spans: MTA, ``(student [B, n], teacher [B, m])`` long span ids shared by both sides
            (:mod:`student_train.spans`), ``-1`` = no span.
        teacher_topk_ids: ``[B, m, k]`` long, the cached top-k teacher ids (``teacher_kl="sampled"``).
        teacher_entropy: ``[B, m]`` cached entropy of the teacher's next-token distribution (eq 14's teacher
            weights with ``teacher_entropy="cache"``, MTA's ``span_weighting="certainty"``).
        sra_student_layers, sra_teacher_layers: SRA, per layer pair ``[B, n, d_S]`` (live) / ``[B, m, d_T]``.
        student_salience, teacher_salience: SRA, per pair ``[B, n]`` / ``[B, m]`` attention salience (the
            student's from its own attention, the teacher's from the cache).
        chunk_spans: SRA, ``(student [B, n], teacher [B, m])`` long ids of the response chunks both
            tokenizations cut at (shared numbering), ``-1`` = none.
        student_output_head: the student's output module (SRA's span logits; called, so ZeRO-3 gathers it).
        shared_vocab: ``(student ids [S], teacher ids [S])`` the token strings both vocabularies hold (SRA).
    """

    student_logits: torch.Tensor
    student_labels: torch.Tensor
    student_hidden: torch.Tensor | None = None
    student_input_embeds: torch.Tensor | None = None
    student_target_embeds: torch.Tensor | None = None
    student_head: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    teacher_input_ids: torch.Tensor | None = None
    teacher_labels: torch.Tensor | None = None
    teacher_head: torch.Tensor | None = None
    teacher_embeddings: torch.Tensor | None = None
    teacher_attention_mask: torch.Tensor | None = None
    teacher_topk_logprobs: torch.Tensor | None = None
    teacher_head_bias: torch.Tensor | None = None
    aligned_positions: torch.Tensor | None = None
    mined_positions: torch.Tensor | None = None
    mined_map: tuple[torch.Tensor, torch.Tensor] | None = None
    student_layers: list[torch.Tensor] | None = None
    teacher_layers: list[torch.Tensor] | None = None
    student_attention_mask: torch.Tensor | None = None
    word_spans: tuple[torch.Tensor, torch.Tensor] | None = None
    phrase_spans: tuple[torch.Tensor, torch.Tensor] | None = None
    teacher_entropy: torch.Tensor | None = None
    teacher_topk_ids: torch.Tensor | None = None
    sra_student_layers: list[torch.Tensor] | None = None
    sra_teacher_layers: list[torch.Tensor] | None = None
    student_salience: list[torch.Tensor] | None = None
    teacher_salience: list[torch.Tensor] | None = None
    chunk_spans: tuple[torch.Tensor, torch.Tensor] | None = None
    student_output_head: torch.nn.Module | None = None
    shared_vocab: tuple[torch.Tensor, torch.Tensor] | None = None

    def validate(self, cfg: ObjectiveConfig) -> None:
        """Raise ``ValueError`` on missing, mis-shaped, non-finite or out-of-range inputs for ``cfg``."""
        _expect_dims("student_logits", self.student_logits, 3, "[B, n, V_S]")
        bsz, n, v_s = self.student_logits.shape
        _expect_shape("student_labels", self.student_labels, (bsz, n), "[B, n]")
        _expect_int("student_labels", self.student_labels)
        _expect_float("student_logits", self.student_logits)
        if cfg.check_inputs:
            _check_finite("student_logits", self.student_logits)
            _check_ids("student_labels", self.student_labels, v_s, ignore=True)
        if not cfg.needs_teacher:
            return
        needed = ["teacher_hidden", "teacher_labels"]
        if cfg.sra_enabled:
            needed += ["sra_student_layers", "sra_teacher_layers", "student_salience", "teacher_salience"]
            needed += ["chunk_spans"]
            if cfg.lambda_sra_logit > 0:
                needed += ["student_output_head", "shared_vocab", "teacher_head"]
        if cfg.cma_projectors:
            needed += ["student_hidden", "student_target_embeds", "teacher_embeddings"]
        if cfg.needs_teacher_head:
            needed += ["teacher_head"]
        if cfg.logit_kd == "uld_topk":
            needed += ["teacher_topk_logprobs"]
        if cfg.needs_offsets_pairing:
            needed += ["aligned_positions"]
        if cfg.needs_mined_alignment:
            needed += ["mined_positions", "mined_map", "teacher_input_ids"]
        if cfg.needs_cma:
            needed += ["student_input_embeds", "student_head", "teacher_input_ids"]
        if cfg.kd_enabled:
            needed += ["teacher_head"]
        if cfg.span_enabled:
            needed += [
                "student_layers",
                "teacher_layers",
                "student_attention_mask",
                "word_spans",
                "phrase_spans",
            ]
            if cfg.span_weighting == "certainty":
                needed += ["teacher_head"]
        if cfg.needs_teacher_entropy:
            needed += ["teacher_entropy"]
        if cfg.needs_teacher_topk_ids:
            needed += ["teacher_topk_ids"]
        missing = [k for k in needed if getattr(self, k) is None]
        if missing:
            raise ValueError(
                f"method {cfg.method!r} needs ObjectiveInputs fields {missing}, which are None; "
                "the trainer must fill them from the student forward and the teacher cache"
            )
        if cfg.span_enabled:
            self._validate_spans(cfg, bsz, n)
        for name in ("aligned_positions", "mined_positions"):
            if getattr(self, name) is not None:
                _expect_shape(name, getattr(self, name), (bsz, n), "[B, n]")
                _expect_int(name, getattr(self, name))
        if self.student_hidden is not None:
            _expect_dims("student_hidden", self.student_hidden, 3, "[B, n, d_S]")
            d_s = self.student_hidden.shape[-1]
            _expect_shape("student_hidden", self.student_hidden, (bsz, n, d_s), "[B, n, d_S]")
            for name in ("student_input_embeds", "student_target_embeds"):
                if getattr(self, name) is not None:
                    _expect_shape(name, getattr(self, name), (bsz, n, d_s), "[B, n, d_S]")
            if self.student_head is not None:
                _expect_shape("student_head", self.student_head, (v_s, d_s), "[V_S, d_S]")
        _expect_dims("teacher_hidden", self.teacher_hidden, 3, "[B, m, d_T]")
        if self.teacher_hidden.shape[0] != bsz:
            raise ValueError(
                f"teacher_hidden has batch size {self.teacher_hidden.shape[0]} but the student batch has "
                f"{bsz}; student and teacher rows must describe the same samples in the same order"
            )
        m, d_t = self.teacher_hidden.shape[1:]
        _expect_shape("teacher_labels", self.teacher_labels, (bsz, m), "[B, m]")
        _expect_int("teacher_labels", self.teacher_labels)
        if self.teacher_entropy is not None:
            _expect_shape("teacher_entropy", self.teacher_entropy, (bsz, m), "[B, m]")
        if self.teacher_topk_ids is not None:
            _expect_topk("teacher_topk_ids", self.teacher_topk_ids, bsz, m)
            _expect_int("teacher_topk_ids", self.teacher_topk_ids)
            if cfg.check_inputs and self.teacher_head is not None:
                _check_ids(
                    "teacher_topk_ids", self.teacher_topk_ids, self.teacher_head.shape[0], ignore=False
                )
                # at the response positions the sampled KL reads (pad rows are zeros), each id once
                ids = self.teacher_topk_ids[self.teacher_labels.ne(IGNORE_INDEX)].sort(-1).values
                if bool((ids[..., 1:] == ids[..., :-1]).any()):
                    raise ValueError(
                        "teacher_topk_ids repeats an id within a position; the cache's top-k ids are distinct "
                        "(torch.topk), so the cache or the collation is damaged"
                    )
        if self.teacher_input_ids is not None:
            _expect_shape("teacher_input_ids", self.teacher_input_ids, (bsz, m), "[B, m]")
            _expect_int("teacher_input_ids", self.teacher_input_ids)
        if self.teacher_topk_logprobs is not None:
            _expect_topk("teacher_topk_logprobs", self.teacher_topk_logprobs, bsz, m)
        for name in ("teacher_embeddings", "teacher_head"):
            table = getattr(self, name)
            if table is not None:
                _expect_dims(name, table, 2, "[V_T, d_T]")
                if table.shape[1] != d_t:
                    raise ValueError(
                        f"{name} has width {table.shape[1]} but teacher_hidden has d_T={d_t}; both must come "
                        "from the same teacher"
                    )
        float_fields = [
            "student_hidden",
            "student_input_embeds",
            "student_target_embeds",
            "student_head",
            "teacher_hidden",
            "teacher_head",
            "teacher_embeddings",
            "teacher_entropy",
        ]
        for name in float_fields:
            if getattr(self, name) is not None:
                _expect_float(name, getattr(self, name))
                if cfg.check_inputs:
                    _check_finite(name, getattr(self, name))
        if cfg.check_inputs and self.teacher_embeddings is not None:
            v_emb = self.teacher_embeddings.shape[0]
            t_mask = self.teacher_labels.ne(IGNORE_INDEX)
            _check_ids("teacher_labels", self.teacher_labels, v_emb, ignore=True)
            if self.teacher_input_ids is not None:
                _check_ids("teacher_input_ids", self.teacher_input_ids[t_mask], v_emb, ignore=False)
        if cfg.check_inputs and self.teacher_head is not None:
            _check_ids("teacher_labels", self.teacher_labels, self.teacher_head.shape[0], ignore=True)
        if self.shared_vocab is not None:
            s_ids, t_ids = self.shared_vocab
            if s_ids.dim() != 1 or tuple(t_ids.shape) != tuple(s_ids.shape):
                raise ValueError(
                    "shared_vocab must be (student ids [S], teacher ids [S]), got shapes "
                    f"{tuple(s_ids.shape)} and {tuple(t_ids.shape)}"
                )
            _expect_int("shared_vocab[0] (student)", s_ids)
            _expect_int("shared_vocab[1] (teacher)", t_ids)
            if cfg.check_inputs:
                hint = "each id must have a row in its output head (student_train.align.shared_vocab keeps those)"
                _check_ids("shared_vocab[0] (student)", s_ids, v_s, ignore=False, hint=hint)
                if self.teacher_head is not None:
                    v_t = self.teacher_head.shape[0]
                    _check_ids("shared_vocab[1] (teacher)", t_ids, v_t, ignore=False, hint=hint)

    def _validate_spans(self, cfg: ObjectiveConfig, bsz: int, n: int) -> None:
        pairs = len(cfg.span_teacher_layers)
        for name in ("student_layers", "teacher_layers"):
            if len(getattr(self, name)) != pairs:
                raise ValueError(
                    f"{name} holds {len(getattr(self, name))} layers but the objective pairs {pairs}"
                )
        m = self.teacher_layers[0].shape[1]
        _expect_shape("student_attention_mask", self.student_attention_mask, (bsz, n), "[B, n]")
        for name in ("word_spans", "phrase_spans"):
            s_ids, t_ids = getattr(self, name)
            _expect_shape(f"{name}[0] (student)", s_ids, (bsz, n), "[B, n]")
            _expect_shape(f"{name}[1] (teacher)", t_ids, (bsz, m), "[B, m]")
        for k, (h_s, h_t) in enumerate(zip(self.student_layers, self.teacher_layers)):
            _expect_dims(f"student_layers[{k}]", h_s, 3, "[B, n, d_S]")
            _expect_dims(f"teacher_layers[{k}]", h_t, 3, "[B, m, d_T]")
            if tuple(h_s.shape[:2]) != (bsz, n) or tuple(h_t.shape[:2]) != (bsz, m):
                raise ValueError(
                    f"layer pair {k}: student {tuple(h_s.shape)} / teacher {tuple(h_t.shape)} do not match the "
                    f"batch [B, n] = [{bsz}, {n}] / [B, m] = [{bsz}, {m}]"
                )


def _expect_dims(name: str, t: torch.Tensor, dims: int, spec: str) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name} must have shape {spec}, got {tuple(t.shape)}")


def _expect_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], spec: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {spec} = {tuple(shape)}, got {tuple(t.shape)}")


def _expect_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _expect_int(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of token ids, got dtype {t.dtype}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{name} contains {bad} NaN/inf values; check the forward pass (fp16 overflow?) or the "
            "teacher cache shard that produced this batch"
        )


def _expect_topk(name: str, t: torch.Tensor, bsz: int, m: int) -> None:
    _expect_dims(name, t, 3, "[B, m, k]")
    if tuple(t.shape[:2]) != (bsz, m):
        raise ValueError(f"{name} must have shape [B, m, k] with B, m = {bsz}, {m}, got {tuple(t.shape)}")


def _check_ids(name: str, ids: torch.Tensor, vocab: int, *, ignore: bool, hint: str | None = None) -> None:
    valid = ids[ids.ne(IGNORE_INDEX)] if ignore else ids
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
        hint = (
            hint or f"non-response positions must be {IGNORE_INDEX}, and the tokenizer must match the model"
        )
        raise ValueError(
            f"{name} has ids in [{int(valid.min())}, {int(valid.max())}] outside [0, {vocab}); {hint}"
        )
