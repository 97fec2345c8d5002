"""The distillation objective as an explicit set of weighted terms (METHOD.md §2.9, §3 "Overall").

``total = lambda_ce * ce + lambda_kd * (proj_ce + kd_student + kd_teacher) + lambda_dtw * (dtw_hidden +
dtw_embed) + lambda_logit * logit_kd``, every term a SUM over valid tokens (the DTW terms a sum over
samples, A6). The trainer divides ``total`` by the global number of valid student label tokens of the
accumulated batch.

A weight of 0 means the term is not computed at all. SFT, DSKD-CMA, DWA-KD, the paper's Table-3
ablations and the logit-level baselines ULD, MinED and MultiLevelOT (``logit_kd``,
:mod:`student_train.losses.baselines`) are named settings of :class:`ObjectiveConfig` (see
:data:`PRESETS`), not code forks.

The teacher enters only through cached tensors: final hidden states, the LM head and the input
embedding table. Exact teacher logits are rebuilt chunk by chunk
(:func:`student_train.losses.divergences.teacher_entropy_and_kl`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.tokenize import IGNORE_INDEX
from student_train.losses import baselines
from student_train.losses.cma import Projectors, apply_linear, cross_model_attention, formal_ids
from student_train.losses.divergences import (
    compute_dtype,
    entropy_from_logits,
    forward_kl_from_logits,
    skewed_reverse_kl_from_logits,
    teacher_entropy_and_kl,
)
from student_train.losses.dwa import (
    dtw_loss,
    gate_from_logits,
    student_token_weights,
    teacher_token_weights,
)

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "TERM_NAMES",
    "ObjectiveConfig",
    "ObjectiveInputs",
    "ObjectiveOutput",
    "compute_objective",
    "compute_terms",
]

TERM_NAMES = ("ce", "proj_ce", "kd_student", "kd_teacher", "dtw_hidden", "dtw_embed", "logit_kd")
LOGIT_KD = ("none", "uld", "uld_topk", "mined", "multilevel_ot")
_PAIRINGS = ("first_n", "offsets")
_MLOT_SORTS = ("token", "batch")
_STUDENT_DIVERGENCES = ("forward_kl", "skewed_reverse_kl")
_STUDENT_NORMS = ("entropy", "product")
_DTW_POSITIONS = ("response", "ref_first_n")
_STD_SCOPES = ("sample", "batch")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ObjectiveConfig:
    """Weights and switches of the distillation objective. Build presets with :meth:`preset`."""

    method: str = field(default="dwa_kd", metadata=_help("label of the method, for logs only"))
    lambda_ce: float = field(default=0.5, metadata=_help("weight of the student CE on labels (>= 0)"))
    lambda_kd: float = field(
        default=0.5, metadata=_help("weight of proj_ce + kd_student + kd_teacher (DSKD alpha_kd) (>= 0)")
    )
    lambda_dtw: float = field(
        default=0.2, metadata=_help("weight of the Soft-DTW terms; 0 disables DTW entirely (>= 0)")
    )
    kd_temperature: float = field(default=2.0, metadata=_help("tau of both KD divergences (> 0)"))
    student_divergence: str = field(
        default="forward_kl",
        metadata=_help("student-space divergence: forward_kl (paper, A3) or skewed_reverse_kl (scripts)"),
    )
    skew_lambda: float = field(
        default=0.1, metadata=_help("skew of skewed_reverse_kl, mass of the student in the mixture [0,1)")
    )
    accuracy_mask: bool = field(
        default=False, metadata=_help("DSKD: keep kd_student only where argmax z_t2s == label")
    )
    entropy_weighting: bool = field(
        default=True, metadata=_help("EW: student entropy weights (eq 12) and teacher certainty (eq 14)")
    )
    gate: bool = field(default=True, metadata=_help("multiply w^S by g_i = max softmax(z_t2s) (eq 11)"))
    student_weight_normalisation: str = field(
        default="entropy",
        metadata=_help("A2: 'entropy' normalises H^S to sum S then x gate (code); 'product' normalises g*H"),
    )
    dtw_gamma: float = field(default=2.0, metadata=_help("Soft-DTW smoothing gamma (> 0)"))
    band_base_width: float = field(default=5.0, metadata=_help("w0: base band half-width in tokens (>= 0)"))
    band_entropy_coef: float = field(
        default=2.0, metadata=_help("beta: band widening per nat of attention entropy (>= 0)")
    )
    band_center_alpha: float = field(
        default=0.7, metadata=_help("alpha: blend of attention centre vs linear centre, in [0, 1]")
    )
    band_penalty: float = field(
        default=1.0, metadata=_help("rho: cost added outside the band; 0 = unbanded DTW (>= 0)")
    )
    cma_std_scope: str = field(
        default="sample",
        metadata=_help(
            "std normalisation of CMA keys/values: 'sample' (per sample over non-pad rows: padding- and "
            "micro-batch-invariant) or 'batch' (one std over the padded batch tensor, the DSKD code)"
        ),
    )
    dtw_positions: str = field(
        default="response",
        metadata=_help("A1: 'response' gathers masked rows; 'ref_first_n' mimics the reference bug"),
    )
    detach_teacher_self_term: bool = field(
        default=False, metadata=_help("A20: detach the teacher self-term sdtw(C^yy) (ablation)")
    )
    teacher_chunk_size: int = field(
        default=256, metadata=_help("teacher positions per chunk when rebuilding teacher logits (>= 1)")
    )
    check_inputs: bool = field(
        default=True, metadata=_help("check finiteness and id ranges of inputs (one host sync each)")
    )
    logit_kd: str = field(
        default="none",
        metadata=_help(
            "logit-level baseline term: none, uld (Boizard et al.), uld_topk (ULD from the cached top-k "
            "only), mined (Wan et al.), multilevel_ot (Cui et al.); see docs/BASELINES.md"
        ),
    )
    lambda_logit: float = field(default=0.0, metadata=_help("weight of the logit_kd term (>= 0)"))
    pairing: str = field(
        default="first_n",
        metadata=_help(
            "ULD/MultiLevelOT position pairing: first_n (k-th response position with k-th, the reference "
            "code) or offsets (positions predicting the same characters, from character offsets)"
        ),
    )
    mlot_sort: str = field(
        default="token",
        metadata=_help(
            "MultiLevelOT column order: token (per-row sort, code at publication) or batch (HEAD)"
        ),
    )
    mlot_top_k: int = field(default=50, metadata=_help("MultiLevelOT kept probability columns (>= 1)"))

    def __post_init__(self) -> None:
        """Range checks; every message names the field and the allowed range."""
        for name in (
            "lambda_ce", "lambda_kd", "lambda_dtw", "lambda_logit", "band_base_width", "band_entropy_coef"
        ):  # fmt: skip
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.band_penalty >= 0:
            raise ValueError(f"band_penalty must be >= 0, got {self.band_penalty}")
        if self.lambda_ce == 0 and self.lambda_kd == 0 and self.lambda_dtw == 0 and self.lambda_logit == 0:
            raise ValueError("at least one of lambda_ce, lambda_kd, lambda_dtw, lambda_logit must be > 0")
        if (self.lambda_logit > 0) != (self.logit_kd != "none"):
            raise ValueError(
                f"logit_kd={self.logit_kd!r} with lambda_logit={self.lambda_logit}: a logit-level term needs "
                "both a method and a weight > 0 (or neither)"
            )
        if self.mlot_top_k < 1:
            raise ValueError(f"mlot_top_k must be >= 1, got {self.mlot_top_k}")
        for name in ("kd_temperature", "dtw_gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.skew_lambda < 1.0:
            raise ValueError(f"skew_lambda must be in [0, 1), got {self.skew_lambda}")
        if not 0.0 <= self.band_center_alpha <= 1.0:
            raise ValueError(f"band_center_alpha must be in [0, 1], got {self.band_center_alpha}")
        if self.teacher_chunk_size < 1:
            raise ValueError(f"teacher_chunk_size must be >= 1, got {self.teacher_chunk_size}")
        for name, allowed in (
            ("student_divergence", _STUDENT_DIVERGENCES),
            ("student_weight_normalisation", _STUDENT_NORMS),
            ("dtw_positions", _DTW_POSITIONS),
            ("cma_std_scope", _STD_SCOPES),
            ("logit_kd", LOGIT_KD),
            ("pairing", _PAIRINGS),
            ("mlot_sort", _MLOT_SORTS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def kd_enabled(self) -> bool:
        """Token-level KD terms (proj_ce, kd_student, kd_teacher) are computed."""
        return self.lambda_kd > 0

    @property
    def dtw_enabled(self) -> bool:
        """The Soft-DTW terms are computed."""
        return self.lambda_dtw > 0

    @property
    def band_enabled(self) -> bool:
        """The DTW cross cost carries the attention-informed band."""
        return self.dtw_enabled and self.band_penalty > 0

    @property
    def logit_enabled(self) -> bool:
        """A logit-level baseline term (ULD, MinED, MultiLevelOT) is computed."""
        return self.lambda_logit > 0

    @property
    def needs_projectors(self) -> bool:
        """Trainable projectors and the teacher embedding table are required (DSKD family)."""
        return self.kd_enabled or self.dtw_enabled

    @property
    def needs_teacher(self) -> bool:
        """Teacher tensors from the cache are required."""
        return self.needs_projectors or self.logit_enabled

    @property
    def needs_teacher_head(self) -> bool:
        """Exact teacher logits (cached hidden states x head) are required."""
        return self.kd_enabled or self.logit_kd in ("uld", "mined", "multilevel_ot")

    @property
    def needs_offsets_pairing(self) -> bool:
        """The batch must carry the character-offset position map."""
        return self.logit_kd in ("uld", "uld_topk", "multilevel_ot") and self.pairing == "offsets"

    @property
    def needs_mined_alignment(self) -> bool:
        """The batch must carry MinED's edit-distance alignment (needs the teacher tokenizer)."""
        return self.logit_kd == "mined"

    @property
    def needs_cma(self) -> bool:
        """Cross-model attention must run (token KD, or the band's attention)."""
        return self.kd_enabled or self.band_enabled

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ObjectiveConfig:
        """A named configuration from :data:`PRESETS`, with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown objective preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ObjectiveConfig:
        """Build from a mapping (e.g. YAML). A ``preset`` key selects the base; unknown keys are errors."""
        from pipeline.config import coerce

        values = dict(values)
        base = cls.preset(values.pop("preset")) if "preset" in values else cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown objective config keys {unknown}; valid keys: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        typed = {k: coerce(v, hints[k], f"objective.{k}") for k, v in values.items()}
        return dataclasses.replace(base, **typed)


_DSKD = dict(
    lambda_ce=0.5,
    lambda_kd=0.5,
    lambda_dtw=0.0,
    kd_temperature=2.0,
    student_divergence="forward_kl",
    accuracy_mask=True,
    entropy_weighting=False,
    gate=False,
)

_LOGIT = dict(
    lambda_ce=0.5,
    lambda_kd=0.0,
    lambda_dtw=0.0,
    lambda_logit=0.5,
    kd_temperature=2.0,
    entropy_weighting=False,
    gate=False,
)

PRESETS: dict[str, ObjectiveConfig] = {
    "sft": ObjectiveConfig(
        method="sft", lambda_ce=1.0, lambda_kd=0.0, lambda_dtw=0.0, entropy_weighting=False, gate=False
    ),
    "dskd": ObjectiveConfig(method="dskd", **_DSKD),
    "dwa_kd": ObjectiveConfig(method="dwa_kd"),
    # Table 3 ablations: DSKD-CMA plus one component.
    "dskd_w_ew": ObjectiveConfig(
        method="dskd_w_ew", **{**_DSKD, "accuracy_mask": False, "entropy_weighting": True, "gate": True}
    ),
    "dskd_w_dtw": ObjectiveConfig(method="dskd_w_dtw", **{**_DSKD, "lambda_dtw": 0.2, "band_penalty": 0.0}),
    "dskd_w_bdtw": ObjectiveConfig(method="dskd_w_bdtw", **{**_DSKD, "lambda_dtw": 0.2, "band_penalty": 1.0}),
    "dwa_kd_wo_gate": ObjectiveConfig(method="dwa_kd_wo_gate", gate=False),
    # Logit-level baselines of Table 1 (docs/BASELINES.md): (1 - a) CE + a * term, as DSKD's criteria.
    "uld": ObjectiveConfig(method="uld", **_LOGIT, logit_kd="uld"),
    "uld_topk": ObjectiveConfig(method="uld_topk", **_LOGIT, logit_kd="uld_topk"),
    "mined": ObjectiveConfig(method="mined", **_LOGIT, logit_kd="mined"),
    # MultiLevelOT: CE (weight 1) + its distillation loss (its 1.5 inside), a per-batch mean in the reference
    "multilevel_ot": ObjectiveConfig(
        method="multilevel_ot", **{**_LOGIT, "lambda_ce": 1.0, "lambda_logit": 1.0}, logit_kd="multilevel_ot"
    ),
    # Fidelity variant: what the reference scripts actually run (SRKL, first-n DTW rows).
    "dwa_kd_reference": ObjectiveConfig(
        method="dwa_kd_reference",
        student_divergence="skewed_reverse_kl",
        dtw_positions="ref_first_n",
        cma_std_scope="batch",
    ),
}
"""Named objectives. Paper Table 3: "w/ EW" = ``dskd_w_ew``, "w/ DTW" = ``dskd_w_dtw`` (rho=0),
"w/ bDTW" = ``dskd_w_bdtw``, "w/o gate" = ``dwa_kd_wo_gate``."""


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
        if cfg.needs_projectors:
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
        missing = [k for k in needed if getattr(self, k) is None]
        if missing:
            raise ValueError(
                f"method {cfg.method!r} needs ObjectiveInputs fields {missing}, which are None; "
                "the trainer must fill them from the student forward and the teacher cache"
            )
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
        if self.teacher_input_ids is not None:
            _expect_shape("teacher_input_ids", self.teacher_input_ids, (bsz, m), "[B, m]")
            _expect_int("teacher_input_ids", self.teacher_input_ids)
        if self.teacher_topk_logprobs is not None:
            _expect_dims("teacher_topk_logprobs", self.teacher_topk_logprobs, 3, "[B, m, k]")
            if tuple(self.teacher_topk_logprobs.shape[:2]) != (bsz, m):
                raise ValueError(
                    f"teacher_topk_logprobs must have shape [B, m, k] with B, m = {bsz}, {m}, got "
                    f"{tuple(self.teacher_topk_logprobs.shape)}"
                )
        if self.teacher_embeddings is not None:
            _expect_dims("teacher_embeddings", self.teacher_embeddings, 2, "[V_T, d_T]")
            if self.teacher_embeddings.shape[1] != d_t:
                raise ValueError(
                    f"teacher_embeddings has width {self.teacher_embeddings.shape[1]} but teacher_hidden has "
                    f"d_T={d_t}; both must come from the same teacher"
                )
        if self.teacher_head is not None:
            _expect_dims("teacher_head", self.teacher_head, 2, "[V_T, d_T]")
            if self.teacher_head.shape[1] != d_t:
                raise ValueError(
                    f"teacher_head has width {self.teacher_head.shape[1]} but teacher_hidden has d_T={d_t}"
                )
        float_fields = [
            "student_hidden",
            "student_input_embeds",
            "student_target_embeds",
            "student_head",
            "teacher_hidden",
            "teacher_head",
            "teacher_embeddings",
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


def _check_ids(name: str, ids: torch.Tensor, vocab: int, *, ignore: bool) -> None:
    valid = ids[ids.ne(IGNORE_INDEX)] if ignore else ids
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
        raise ValueError(
            f"{name} has ids in [{int(valid.min())}, {int(valid.max())}] outside [0, {vocab}); "
            f"non-response positions must be {IGNORE_INDEX}, and the tokenizer must match the model"
        )


@dataclass
class ObjectiveOutput:
    """Result of :func:`compute_objective`.

    Attributes:
        total: 0-d loss, a SUM over valid tokens (DTW: over samples); divide by the global valid
            student-token count of the accumulated batch before ``backward``.
        terms: detached, UNWEIGHTED sums per term (keys :data:`TERM_NAMES`; 0 for terms not computed).
        counts: detached 0-d long tensors: ``student_tokens``, ``teacher_tokens``, ``kd_student_tokens``
            (positions the accuracy mask keeps), ``dtw_pairs``, ``dtw_skipped_pairs``.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]


def _student_divergence(cfg: ObjectiveConfig, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    if cfg.student_divergence == "forward_kl":
        return forward_kl_from_logits(target, logits, temperature=cfg.kd_temperature)
    return skewed_reverse_kl_from_logits(target, logits, temperature=cfg.kd_temperature, skew=cfg.skew_lambda)


def _check_projectors(cfg: ObjectiveConfig, projectors: Projectors | None, d_s: int, d_t: int) -> Projectors:
    if projectors is None:
        raise ValueError(f"method {cfg.method!r} needs Projectors(d_s={d_s}, d_t={d_t}); got None")
    if (projectors.d_s, projectors.d_t) != (d_s, d_t):
        raise ValueError(
            f"projectors were built for d_s={projectors.d_s}, d_t={projectors.d_t} but the inputs have "
            f"d_S={d_s}, d_T={d_t}"
        )
    if cfg.dtw_enabled and projectors.dtw_embed_t2s is None:
        raise ValueError("the DTW term needs projectors.dtw_embed_t2s; build Projectors(..., dtw_embed=True)")
    return projectors


def compute_terms(
    cfg: ObjectiveConfig, inputs: ObjectiveInputs, projectors: Projectors | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every configured term as a live (differentiable) unweighted sum, plus detached counts.

    Args:
        cfg: objective configuration.
        inputs: the batch tensors (validated here).
        projectors: required when ``cfg.needs_teacher``.

    Returns:
        ``(terms, counts)``: ``terms[name]`` for ``name`` in :data:`TERM_NAMES` (a zero tensor for terms
        not computed) and the counts described in :class:`ObjectiveOutput`.
    """
    inputs.validate(cfg)
    labels = inputs.student_labels
    s_mask = labels.ne(IGNORE_INDEX)
    dtype = compute_dtype(inputs.student_logits, inputs.student_hidden)
    device = inputs.student_logits.device
    zero = torch.zeros((), dtype=dtype, device=device)
    terms = dict.fromkeys(TERM_NAMES, zero)
    counts = {
        "student_tokens": s_mask.sum(),
        "teacher_tokens": torch.zeros((), dtype=torch.long, device=device),
        "kd_student_tokens": torch.zeros((), dtype=torch.long, device=device),
        "dtw_pairs": torch.zeros((), dtype=torch.long, device=device),
        "dtw_skipped_pairs": torch.zeros((), dtype=torch.long, device=device),
    }
    y = labels[s_mask]
    s_logits = inputs.student_logits[s_mask].to(dtype)  # [N_S, V_S]
    if cfg.lambda_ce > 0:
        terms["ce"] = F.cross_entropy(s_logits, y, reduction="sum")
    if not cfg.needs_teacher:
        return terms, counts
    t_mask = inputs.teacher_labels.ne(IGNORE_INDEX)
    counts["teacher_tokens"] = t_mask.sum()
    if cfg.logit_enabled:
        terms["logit_kd"] = logit_kd_term(cfg, inputs, s_mask, t_mask).to(dtype)
    if not cfg.needs_projectors:
        return terms, counts

    d_s = inputs.student_hidden.shape[-1]
    d_t = inputs.teacher_hidden.shape[-1]
    proj = _check_projectors(cfg, projectors, d_s, d_t)
    t_table = inputs.teacher_embeddings.detach()
    t_tg_ids = formal_ids(inputs.teacher_labels, inputs.teacher_labels)
    t_tg = F.embedding(t_tg_ids, t_table).to(dtype)

    cma = None
    if cfg.needs_cma:
        t_in = F.embedding(formal_ids(inputs.teacher_input_ids, inputs.teacher_labels), t_table).to(dtype)
        cma = cross_model_attention(
            proj,
            student_hidden=inputs.student_hidden,
            student_input_embeds=inputs.student_input_embeds,
            student_target_embeds=inputs.student_target_embeds,
            student_head=inputs.student_head,
            student_mask=s_mask,
            teacher_hidden=inputs.teacher_hidden,
            teacher_input_embeds=t_in,
            teacher_target_embeds=t_tg,
            teacher_mask=t_mask,
            teacher_valid=None
            if inputs.teacher_attention_mask is None
            else inputs.teacher_attention_mask.bool(),
            std_scope=cfg.cma_std_scope,
        )

    if cfg.kd_enabled:
        z_t2s = cma.z_t2s  # [N_S, V_S]
        terms["proj_ce"] = F.cross_entropy(z_t2s, y, reduction="sum")
        # student space: target is sg(z_t2s); weights are detached
        w_rows = torch.ones_like(y, dtype=dtype)
        if cfg.accuracy_mask:
            w_rows = w_rows * z_t2s.detach().argmax(-1).eq(y).to(dtype)
        counts["kd_student_tokens"] = w_rows.ne(0).sum()
        if cfg.gate or cfg.entropy_weighting:
            gate = None
            if cfg.gate:
                gate = torch.zeros(s_mask.shape, dtype=dtype, device=device)
                gate = gate.masked_scatter(s_mask, gate_from_logits(z_t2s))
            ent = None
            if cfg.entropy_weighting:
                with torch.no_grad():  # eq (7): tau=1, raw student logits, detached
                    ent = torch.zeros(s_mask.shape, dtype=dtype, device=device)
                    ent = ent.masked_scatter(s_mask, entropy_from_logits(s_logits.detach()))
            w_s = student_token_weights(
                s_mask, entropy=ent, gate=gate, normalisation=cfg.student_weight_normalisation
            )
            w_rows = w_rows * w_s[s_mask].to(dtype)
        div = _student_divergence(cfg, z_t2s.detach(), s_logits)
        terms["kd_student"] = (w_rows * div).sum()
        # teacher space: exact teacher logits rebuilt chunk-wise from cached hidden x head
        t_ent, t_kl = teacher_entropy_and_kl(
            inputs.teacher_hidden[t_mask],
            inputs.teacher_head,
            cma.hhat_s2t[t_mask],
            temperature=cfg.kd_temperature,
            chunk_size=cfg.teacher_chunk_size,
            teacher_bias=inputs.teacher_head_bias,
        )
        if cfg.entropy_weighting:
            ent_t = torch.zeros(t_mask.shape, dtype=t_ent.dtype, device=device).masked_scatter(t_mask, t_ent)
            w_t = teacher_token_weights(ent_t, t_mask, inputs.teacher_head.shape[0])[t_mask]
            terms["kd_teacher"] = (w_t.to(t_kl.dtype) * t_kl).sum().to(dtype)
        else:
            terms["kd_teacher"] = t_kl.sum().to(dtype)

    if cfg.dtw_enabled:
        t_hidden_proj = apply_linear(proj.t2s, inputs.teacher_hidden.detach(), dtype)
        t_embed_proj = apply_linear(proj.dtw_embed_t2s, t_tg, dtype)
        res = dtw_loss(
            student_hidden=inputs.student_hidden,
            student_target_embeds=inputs.student_target_embeds,
            teacher_hidden_proj=t_hidden_proj,
            teacher_target_embeds_proj=t_embed_proj,
            student_mask=s_mask,
            teacher_mask=t_mask,
            a_t2s=cma.a_t2s if cfg.band_enabled else None,
            gamma=cfg.dtw_gamma,
            positions=cfg.dtw_positions,
            alpha=cfg.band_center_alpha,
            base_width=cfg.band_base_width,
            entropy_coef=cfg.band_entropy_coef,
            penalty=cfg.band_penalty,
            detach_teacher_self_term=cfg.detach_teacher_self_term,
        )
        terms["dtw_hidden"] = res.hidden.to(dtype)
        terms["dtw_embed"] = res.embed.to(dtype)
        counts["dtw_pairs"] = res.pairs
        counts["dtw_skipped_pairs"] = res.skipped
    return terms, counts


def _pairs_from_map(
    positions: torch.Tensor, s_mask: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (student row, teacher row) indices of the response positions that have a teacher position."""
    keep = s_mask & positions.ge(0)
    b, j = keep.nonzero(as_tuple=True)
    return b * s_mask.shape[1] + j, b * m + positions[b, j]


def logit_kd_term(
    cfg: ObjectiveConfig, inputs: ObjectiveInputs, s_mask: torch.Tensor, t_mask: torch.Tensor
) -> torch.Tensor:
    """The logit-level baseline term (ULD, MinED, MultiLevelOT) as a sum over student tokens.

    MultiLevelOT's reference loss is a per-batch mean; it is multiplied by the micro-batch's number of
    student response tokens so that the trainer's division by the token count gives back that mean.
    """
    s_logits = inputs.student_logits
    bsz, n, v_s = s_logits.shape
    m = inputs.teacher_hidden.shape[1]
    flat_s = s_logits.reshape(bsz * n, v_s)
    flat_h = inputs.teacher_hidden.reshape(bsz * m, -1)
    head, bias = inputs.teacher_head, inputs.teacher_head_bias
    if cfg.logit_kd in ("uld", "uld_topk"):
        if cfg.pairing == "offsets":
            ps, pt = _pairs_from_map(inputs.aligned_positions, s_mask, m)
        else:
            ps, pt = baselines.first_n_pairs(inputs.student_labels, inputs.teacher_labels)
        if cfg.logit_kd == "uld_topk":
            k = inputs.teacher_topk_logprobs.shape[-1]
            return baselines.uld_loss_topk(flat_s[ps], inputs.teacher_topk_logprobs.reshape(bsz * m, k)[pt])
        return baselines.uld_loss(flat_s[ps], baselines.teacher_logits(flat_h[pt], head, bias))
    if cfg.logit_kd == "mined":
        b, j = s_mask.nonzero(as_tuple=True)
        pos = inputs.mined_positions[b, j]
        aligned = pos.ge(0)
        rows = baselines.teacher_logits(flat_h[(b * m + pos)[aligned]], head, bias)  # aligned rows only
        stu_ids, tea_ids = inputs.mined_map
        target = baselines.mined_targets(rows, aligned, inputs.student_labels[b, j], stu_ids, tea_ids, v_s)
        return baselines.mined_loss(s_logits[b, j], target, cfg.kd_temperature)
    # multilevel_ot
    s_rows, t_rows = [], []
    for bb in range(bsz):
        s_pos = s_mask[bb].nonzero(as_tuple=True)[0]
        t_pos = t_mask[bb].nonzero(as_tuple=True)[0]
        if cfg.pairing == "offsets":  # the paired positions only, in order, plus the EOS row MLOT drops
            mapped = inputs.aligned_positions[bb, s_pos]
            keep = mapped.ge(0)
            t_pos = mapped[keep]
            s_pos = torch.cat([s_pos[keep], s_pos[-1:]])
        s_rows.append(s_logits[bb, s_pos])
        t_rows.append(baselines.teacher_logits(inputs.teacher_hidden[bb, t_pos], head, bias))
    mlot = baselines.multilevel_ot_loss(s_rows, t_rows, top_k=cfg.mlot_top_k, sort=cfg.mlot_sort)
    return mlot * s_mask.sum()


def compute_objective(
    cfg: ObjectiveConfig, inputs: ObjectiveInputs, projectors: Projectors | None = None
) -> ObjectiveOutput:
    """The weighted objective (sum over valid tokens; the trainer divides by the global token count).

    ``total = lambda_ce ce + lambda_kd (proj_ce + kd_student + kd_teacher) + lambda_dtw (dtw_hidden +
    dtw_embed)``. SFT: CE only. DSKD: ``0.5 ce + 0.5 (proj_ce + acc-masked kd_student + kd_teacher)``.
    DWA-KD: ``kd_student`` weighted by ``w^S`` (eq 12), ``kd_teacher`` by ``w^T`` (eq 14), plus banded
    Soft-DTW (eq 25).

    Args:
        cfg: objective configuration (see :data:`PRESETS`).
        inputs: batch tensors; shapes documented on :class:`ObjectiveInputs`.
        projectors: the trainable :class:`Projectors`; required unless the method is SFT.

    Returns:
        :class:`ObjectiveOutput`.
    """
    terms, counts = compute_terms(cfg, inputs, projectors)
    total = (
        cfg.lambda_ce * terms["ce"]
        + cfg.lambda_kd * (terms["proj_ce"] + terms["kd_student"] + terms["kd_teacher"])
        + cfg.lambda_dtw * (terms["dtw_hidden"] + terms["dtw_embed"])
        + cfg.lambda_logit * terms["logit_kd"]
    )
    return ObjectiveOutput(
        total=total,
        terms={k: v.detach() for k, v in terms.items()},
        counts={k: v.detach() for k, v in counts.items()},
    )
