"""The objective's configuration: option types, term names and weights, named presets.

Importable without the compute code (no torch): a config, a sweep or a CLI's ``--help`` reads this module
only. Every option is a ``Literal`` type, checked once in :meth:`ObjectiveConfig.__post_init__`; every
term of the objective is a row of :data:`TERMS` (its name and the weight field that multiplies it), which
is what the objective sums and what the trainer logs.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

StudentDivergence = Literal["forward_kl", "skewed_reverse_kl"]
StudentNorm = Literal["entropy", "product"]
DTWPositions = Literal["response", "ref_first_n"]
StdScope = Literal["sample", "batch"]
LogitKD = Literal["none", "uld", "uld_topk", "mined", "multilevel_ot"]
Pairing = Literal["first_n", "offsets"]
MLOTSort = Literal["token", "batch"]
SpanWeighting = Literal["attention", "certainty"]
TeacherEntropy = Literal["cache", "head"]
TeacherKL = Literal["exact", "sampled"]
LOGIT_KD: tuple[str, ...] = typing.get_args(LogitKD)

# term name -> the ObjectiveConfig field that weighs it; total = sum of weight * term (a term with weight 0
# is not computed). Terms that share a weight are summed first, in this order.
TERMS: dict[str, str] = {
    "ce": "lambda_ce",
    "proj_ce": "lambda_kd",
    "kd_student": "lambda_kd",
    "kd_teacher": "lambda_kd",
    "dtw_hidden": "lambda_dtw",
    "dtw_embed": "lambda_dtw",
    "logit_kd": "lambda_logit",
    "kq_adversarial": "lambda_ga",
    "span_structure": "lambda_span",
    "sra_span": "lambda_sra",
    "sra_delta": "lambda_sra",
    "sra_geometry": "lambda_sra_geometry",
    "sra_logit": "lambda_sra_logit",
}
TERM_NAMES: tuple[str, ...] = tuple(TERMS)

__all__ = ["LOGIT_KD", "PRESETS", "TERMS", "TERM_NAMES", "ObjectiveConfig"]


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
    student_divergence: StudentDivergence = field(
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
    student_weight_normalisation: StudentNorm = field(
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
    cma_std_scope: StdScope = field(
        default="sample",
        metadata=_help(
            "std normalisation of CMA keys/values: 'sample' (per sample over non-pad rows: padding- and "
            "micro-batch-invariant) or 'batch' (one std over the padded batch tensor, the DSKD code)"
        ),
    )
    dtw_positions: DTWPositions = field(
        default="response",
        metadata=_help("A1: 'response' gathers masked rows; 'ref_first_n' mimics the reference bug"),
    )
    detach_teacher_self_term: bool = field(
        default=False, metadata=_help("A20: detach the teacher self-term sdtw(C^yy) (ablation)")
    )
    teacher_chunk_size: int = field(
        default=0,
        metadata=_help(
            "teacher positions per chunk when rebuilding teacher logits (>= 1); 0 = from the head's size "
            "(four [chunk, V_T] fp32 slabs within the head's size and 1 GiB, see divergences.auto_chunk_size)"
        ),
    )
    teacher_kl: TeacherKL = field(
        default="exact",
        metadata=_help(
            "teacher-space KL: 'exact' over the whole head; 'sampled' (opt-in, APPROXIMATE) over each row's "
            "cached top-k plus teacher_kl_samples uniform negatives (divergences.sampled_teacher_kl)"
        ),
    )
    teacher_kl_samples: int = field(
        default=4096, metadata=_help("negatives of teacher_kl='sampled' (>= 1; capped at the head's rows)")
    )
    teacher_entropy: TeacherEntropy = field(
        default="cache",
        metadata=_help(
            "source of the teacher entropy H^T of eq (14): 'cache' reads the cached column (the teacher's own "
            "fp32 distribution at precompute time; no vocabulary pass), 'head' rebuilds it from the cached "
            "hidden state x head (through the cache's hidden dtype)"
        ),
    )
    check_inputs: bool = field(
        default=True, metadata=_help("check finiteness and id ranges of inputs (one host sync each)")
    )
    logit_kd: LogitKD = field(
        default="none",
        metadata=_help(
            "logit-level baseline term: none, uld (Boizard et al.), uld_topk (ULD from the cached top-k "
            "only), mined (Wan et al.), multilevel_ot (Cui et al.); see docs/BASELINES.md"
        ),
    )
    lambda_logit: float = field(default=0.0, metadata=_help("weight of the logit_kd term (>= 0)"))
    lambda_ga: float = field(
        default=0.0,
        metadata=_help("DSKD-CMA-GA: weight of the query/key adversarial term (DSKD-KQ kq_rate) (>= 0)"),
    )
    ga_hidden: int = field(default=768, metadata=_help("DSKD-CMA-GA discriminator hidden width (>= 1)"))
    ga_train_discriminator: bool = field(
        default=True,
        metadata=_help(
            "train the GA discriminator (the paper); false keeps it at its random init, which is what the "
            "DSKD-KQ code does (its parameters never reach the optimizer)"
        ),
    )
    pairing: Pairing = field(
        default="first_n",
        metadata=_help(
            "ULD/MultiLevelOT position pairing: first_n (k-th response position with k-th, the reference "
            "code) or offsets (positions predicting the same characters, from character offsets)"
        ),
    )
    mlot_sort: MLOTSort = field(
        default="token",
        metadata=_help(
            "MultiLevelOT column order: token (per-row sort, code at publication) or batch (HEAD)"
        ),
    )
    mlot_top_k: int = field(default=50, metadata=_help("MultiLevelOT kept probability columns (>= 1)"))
    lambda_span: float = field(
        default=0.0,
        metadata=_help(
            "MTA: weight of the span structure term (kd_rate x w_span of the reference, 0.5 x 2.0); a mean "
            "over span pairs per micro-batch, divided by the token count like every term, as the reference "
            "(>= 0)"
        ),
    )
    span_teacher_layers: tuple[int, ...] = field(
        default=(),
        metadata=_help(
            "MTA: teacher layers of the pairs, HF hidden_states indices (-1 = the final normed state); the "
            "cache must hold them (cache.layers)"
        ),
    )
    span_student_layers: tuple[int, ...] = field(
        default=(),
        metadata=_help(
            "MTA: student layers of the pairs, HF hidden_states indices (-1 = final), same length"
        ),
    )
    span_word_pairs: int = field(
        default=1,
        metadata=_help("MTA: the first this many pairs align word spans, the rest phrase spans (>= 0)"),
    )
    span_weighting: SpanWeighting = field(
        default="attention",
        metadata=_help(
            "MTA span weight: attention (teacher token weights summed over the span) or certainty (mean "
            "1 - H/log V of the span's teacher tokens, the reference's --entropy-weight)"
        ),
    )

    lambda_sra: float = field(
        default=0.0,
        metadata=_help(
            "SRA: weight of its span and inter-layer delta terms (reference (1 - alpha) x 2 = 1.0); every SRA "
            "term is a mean over the micro-batch's samples (>= 0)"
        ),
    )
    lambda_sra_geometry: float = field(
        default=0.0, metadata=_help("SRA: weight of the span geometry term (reference 0.5 x 50 = 25) (>= 0)")
    )
    lambda_sra_logit: float = field(
        default=0.0,
        metadata=_help("SRA: weight of the span logit KL over the shared vocabulary (reference 0.5) (>= 0)"),
    )
    sra_teacher_layers: tuple[int, ...] = field(
        default=(-1,),
        metadata=_help(
            "SRA: teacher layers of the pairs, HF hidden_states indices >= 1 (-1 = final); the cache must hold "
            "them with their salience (cache.layers, cache.salience=true); the last pair feeds geometry and logits"
        ),
    )
    sra_student_layers: tuple[int, ...] = field(
        default=(-1,), metadata=_help("SRA: student layers of the pairs (>= 1 or -1), same length")
    )
    sra_power: float = field(default=1.0, metadata=_help("SRA: span weight = mass^p / sum mass^p (> 0)"))
    sra_weighted_pooling: bool = field(
        default=True, metadata=_help("SRA: attention-weighted centre of mass (false: plain mean of the span)")
    )
    sra_span_weighting: bool = field(
        default=True, metadata=_help("SRA: salience span weights (false: uniform over the sample's spans)")
    )

    def __post_init__(self) -> None:
        """Range checks; every message names the field and the allowed range."""
        for name in (
            *dict.fromkeys(TERMS.values()), "band_base_width", "band_entropy_coef"
        ):  # fmt: skip
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.band_penalty >= 0:
            raise ValueError(f"band_penalty must be >= 0, got {self.band_penalty}")
        weights = list(dict.fromkeys(TERMS.values()))
        if all(getattr(self, w) == 0 for w in weights):
            raise ValueError(f"at least one of {', '.join(weights)} must be > 0")
        if self.ga_hidden < 1:
            raise ValueError(f"ga_hidden must be >= 1, got {self.ga_hidden}")
        if (self.lambda_logit > 0) != (self.logit_kd != "none"):
            raise ValueError(
                f"logit_kd={self.logit_kd!r} with lambda_logit={self.lambda_logit}: a logit-level term needs "
                "both a method and a weight > 0 (or neither)"
            )
        if len(self.span_teacher_layers) != len(self.span_student_layers):
            raise ValueError(
                f"span_teacher_layers {list(self.span_teacher_layers)} and span_student_layers "
                f"{list(self.span_student_layers)} must pair up (same length)"
            )
        bad = [n for n in (*self.span_teacher_layers, *self.span_student_layers) if n < -1]
        if bad:
            raise ValueError(f"MTA layers must be HF hidden_states indices >= 0 or -1 (final), got {bad}")
        if self.lambda_span > 0 and not self.span_teacher_layers:
            raise ValueError(
                "lambda_span > 0 needs the layer pairs: set objective.span_teacher_layers and "
                "objective.span_student_layers (e.g. [6,12,18,-1] and [2,4,6,-1])"
            )
        if not 0 <= self.span_word_pairs <= max(len(self.span_teacher_layers), 1):
            raise ValueError(
                f"span_word_pairs must be in [0, {len(self.span_teacher_layers)}], got {self.span_word_pairs}"
            )
        if len(self.sra_teacher_layers) != len(self.sra_student_layers) or not self.sra_teacher_layers:
            raise ValueError(
                f"sra_teacher_layers {list(self.sra_teacher_layers)} and sra_student_layers "
                f"{list(self.sra_student_layers)} must pair up (same length, at least one pair)"
            )
        bad = [n for n in (*self.sra_teacher_layers, *self.sra_student_layers) if n == 0 or n < -1]
        if bad:
            raise ValueError(f"SRA layers must be >= 1 or -1 (layer 0 has no attention block), got {bad}")
        if not self.sra_power > 0:
            raise ValueError(f"sra_power must be > 0, got {self.sra_power}")
        if self.mlot_top_k < 1:
            raise ValueError(f"mlot_top_k must be >= 1, got {self.mlot_top_k}")
        for name in ("kd_temperature", "dtw_gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.skew_lambda < 1.0:
            raise ValueError(f"skew_lambda must be in [0, 1), got {self.skew_lambda}")
        if not 0.0 <= self.band_center_alpha <= 1.0:
            raise ValueError(f"band_center_alpha must be in [0, 1], got {self.band_center_alpha}")
        if self.teacher_kl_samples < 1:
            raise ValueError(f"teacher_kl_samples must be >= 1, got {self.teacher_kl_samples}")
        if self.teacher_kl == "sampled" and self.entropy_weighting and self.teacher_entropy == "head":
            raise ValueError(
                "teacher_kl='sampled' avoids the pass over the teacher head that teacher_entropy='head' needs; "
                "use teacher_entropy='cache'"
            )
        if self.teacher_chunk_size < 0:
            raise ValueError(
                f"teacher_chunk_size must be >= 1 (or 0 for automatic), got {self.teacher_chunk_size}"
            )
        for name, hint in typing.get_type_hints(type(self)).items():  # every option field is a Literal
            allowed = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
            if allowed and getattr(self, name) not in allowed:
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
        return self.cma_projectors or self.span_enabled or self.sra_enabled

    @property
    def cma_projectors(self) -> bool:
        """DSKD's projectors (query, t2s, s2t) and the teacher embedding table are needed."""
        return self.kd_enabled or self.dtw_enabled or self.ga_enabled

    @property
    def sra_enabled(self) -> bool:
        """An SRA term is computed (needs cached teacher layers with their salience, and student attentions)."""
        return self.lambda_sra > 0 or self.lambda_sra_geometry > 0 or self.lambda_sra_logit > 0

    @property
    def span_enabled(self) -> bool:
        """MTA's span structure term is computed (needs teacher layers from the cache and text spans)."""
        return self.lambda_span > 0

    @property
    def ga_enabled(self) -> bool:
        """DSKD-CMA-GA's adversarial query/key term is computed (it needs the CMA and its discriminator)."""
        return self.lambda_ga > 0

    @property
    def needs_teacher(self) -> bool:
        """Teacher tensors from the cache are required."""
        return self.needs_projectors or self.logit_enabled

    @property
    def needs_teacher_head(self) -> bool:
        """Exact teacher logits (cached hidden states x head) are required."""
        return (
            self.kd_enabled or self.logit_kd in ("uld", "mined", "multilevel_ot") or self.lambda_sra_logit > 0
        )

    @property
    def needs_teacher_entropy(self) -> bool:
        """The batch must carry the cached teacher entropy (eq 14's weights from the cache, or MTA's certainty)."""
        eq14 = self.kd_enabled and self.entropy_weighting and self.teacher_entropy == "cache"
        return eq14 or (self.span_enabled and self.span_weighting == "certainty")

    @property
    def needs_teacher_topk_ids(self) -> bool:
        """The batch must carry the cached top-k ids (the sampled teacher-space KL)."""
        return self.kd_enabled and self.teacher_kl == "sampled"

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
        return self.kd_enabled or self.band_enabled or self.ga_enabled

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
    # DSKD-CMA-GA (stellaevat/DSKD-KQ, scripts/gpt2/dskd_cma_plus_kq_gpt2_base.sh: kq_rate 1.0, GAN variant)
    "dskd_cma_ga": ObjectiveConfig(method="dskd_cma_ga", **{**_DSKD, "lambda_ga": 1.0}),
    # MTA (voluyen/dwa_mta: DWA-KD + the span structure term, kd_rate 0.5 x w_span 2.0). The layer pairs depend on
    # the models; the preset's one pair (final states, phrases) runs on any pair, the reference scripts use 4-6
    # (e.g. span_teacher_layers=[6,12,18,24] span_student_layers=[2,4,6,8] span_word_pairs=1; docs/BASELINES.md).
    # Ablations of its scripts: all pairs on words (span_word_pairs = number of pairs) or on phrases (0).
    "mta": ObjectiveConfig(
        method="mta", lambda_span=1.0, span_teacher_layers=(-1,), span_student_layers=(-1,), span_word_pairs=0
    ),
    # SRA (sonho4ng/SRAv2 d7c7263: loss = 0.5 CE + 0.5 (2 (span + delta) + 50 geometry + KL), T = 2). Its scripts
    # pair three layers (e.g. Qwen2.5-7B [24,26,28] <- OPT-2.7B [28,30,32]); the preset's one final pair runs on
    # any cache built with cache.salience=true (docs/BASELINES.md).
    "sra": ObjectiveConfig(
        method="sra",
        lambda_ce=0.5,
        lambda_kd=0.0,
        lambda_dtw=0.0,
        lambda_sra=1.0,
        lambda_sra_geometry=25.0,
        lambda_sra_logit=0.5,
        kd_temperature=2.0,
        entropy_weighting=False,
        gate=False,
    ),
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
