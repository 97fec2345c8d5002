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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.tokenize import IGNORE_INDEX
from student_train.losses import baselines
from student_train.losses.adversarial import kq_adversarial_loss
from student_train.losses.cma import CMAOutput, Projectors, apply_linear, cross_model_attention, formal_ids
from student_train.losses.config import PRESETS, TERM_NAMES, TERMS, ObjectiveConfig
from student_train.losses.divergences import (
    compute_dtype,
    entropy_from_logits,
    forward_kl_from_logits,
    sampled_teacher_kl,
    skewed_reverse_kl_from_logits,
    teacher_entropy_and_kl,
)
from student_train.losses.dwa import dtw_loss, gate_from_logits, student_token_weights, teacher_token_weights
from student_train.losses.inputs import ObjectiveInputs
from student_train.losses.span_repr import sra_terms
from student_train.losses.structure import span_structure_loss

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "TERM_NAMES",
    "ObjectiveConfig",
    "ObjectiveInputs",
    "ObjectiveOutput",
    "compute_objective",
    "compute_terms",
    "projected_ce",
]


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


@dataclass
class _Batch:
    """What every term reads: the masks, the flat student response rows and the compute dtype."""

    inputs: ObjectiveInputs
    s_mask: torch.Tensor  # [B, n] bool, student response positions
    t_mask: torch.Tensor | None  # [B, m] bool, teacher response positions
    y: torch.Tensor  # [N_S] labels of the student response positions
    s_logits: torch.Tensor  # [N_S, V_S] their logits in the compute dtype
    dtype: torch.dtype


def compute_terms(
    cfg: ObjectiveConfig, inputs: ObjectiveInputs, projectors: Projectors | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every configured term as a live (differentiable) unweighted sum, plus detached counts.

    Args:
        cfg: objective configuration.
        inputs: the batch tensors (validated here).
        projectors: required when ``cfg.needs_projectors``.

    Returns:
        ``(terms, counts)``: ``terms[name]`` for ``name`` in :data:`TERM_NAMES` (a zero tensor for terms
        not computed) and the counts described in :class:`ObjectiveOutput`.
    """
    inputs.validate(cfg)
    s_mask = inputs.student_labels.ne(IGNORE_INDEX)
    dtype = compute_dtype(inputs.student_logits, inputs.student_hidden)
    device = inputs.student_logits.device
    t_mask = inputs.teacher_labels.ne(IGNORE_INDEX) if cfg.needs_teacher else None
    batch = _Batch(
        inputs, s_mask, t_mask, inputs.student_labels[s_mask], inputs.student_logits[s_mask].to(dtype), dtype
    )
    terms = dict.fromkeys(TERM_NAMES, torch.zeros((), dtype=dtype, device=device))
    counts = {
        name: torch.zeros((), dtype=torch.long, device=device)
        for name in ("teacher_tokens", "kd_student_tokens", "dtw_pairs", "dtw_skipped_pairs")
    }
    counts["student_tokens"] = s_mask.sum()
    if cfg.lambda_ce > 0:
        terms["ce"] = F.cross_entropy(batch.s_logits, batch.y, reduction="sum")
    if not cfg.needs_teacher:
        return terms, counts
    counts["teacher_tokens"] = t_mask.sum()
    if cfg.logit_enabled:
        terms["logit_kd"] = logit_kd_term(cfg, inputs, s_mask, t_mask).to(dtype)
    if not cfg.needs_projectors:
        return terms, counts
    if projectors is None:
        raise ValueError(f"method {cfg.method!r} needs Projectors; got None")
    if cfg.sra_enabled:
        terms.update(_sra_terms(cfg, inputs, projectors, counts["student_tokens"], dtype))
    if cfg.span_enabled:  # a mean over span pairs per micro-batch (the reference's scale, see config)
        terms["span_structure"] = _span_term(cfg, inputs, projectors).to(dtype)
    if not cfg.cma_projectors:
        return terms, counts
    proj = _check_projectors(
        cfg, projectors, inputs.student_hidden.shape[-1], inputs.teacher_hidden.shape[-1]
    )
    t_table = inputs.teacher_embeddings.detach()
    t_target_embeds = F.embedding(formal_ids(inputs.teacher_labels, inputs.teacher_labels), t_table).to(dtype)
    cma = _cma(cfg, batch, proj, t_table, t_target_embeds) if cfg.needs_cma else None
    if cfg.kd_enabled:
        terms.update(_token_kd_terms(cfg, batch, cma, counts))
    if cfg.dtw_enabled:
        terms.update(_dtw_terms(cfg, batch, proj, cma, t_target_embeds, counts))
    if (
        cfg.ga_enabled
    ):  # a mean over positions, as DSKD-KQ's kq_loss (the trainer's token division applies to it too)
        if proj.kq_discriminator is None:
            raise ValueError("the DSKD-CMA-GA term needs Projectors(..., kq_hidden=cfg.ga_hidden)")
        terms["kq_adversarial"] = kq_adversarial_loss(
            proj.kq_discriminator, cma.queries, cma.keys, s_mask, t_mask
        ).to(dtype)
    return terms, counts


def _sra_terms(
    cfg: ObjectiveConfig, x: ObjectiveInputs, proj: Projectors, tokens: torch.Tensor, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """SRA's terms (:mod:`student_train.losses.span_repr`), each a mean over samples as in the reference,
    times the micro-batch's token count so that the trainer's division by tokens gives that mean back."""
    if proj.sra is None or len(proj.sra) != len(cfg.sra_teacher_layers):
        raise ValueError(f"the SRA terms need Projectors(..., sra_pairs={len(cfg.sra_teacher_layers)})")
    out = sra_terms(
        student_layers=x.sra_student_layers,
        teacher_layers=x.sra_teacher_layers,
        student_salience=x.student_salience,
        teacher_salience=x.teacher_salience,
        student_spans=x.chunk_spans[0],
        teacher_spans=x.chunk_spans[1],
        projectors=proj.sra,
        student_head=x.student_output_head if cfg.lambda_sra_logit > 0 else None,
        teacher_head=x.teacher_head,
        teacher_head_bias=x.teacher_head_bias,
        shared_vocab=x.shared_vocab,
        temperature=cfg.kd_temperature,
        power=cfg.sra_power,
        weighted_pooling=cfg.sra_weighted_pooling,
        span_weighting=cfg.sra_span_weighting,
    )
    return {name: (value * tokens).to(dtype) for name, value in out.items()}


def _span_term(cfg: ObjectiveConfig, x: ObjectiveInputs, proj: Projectors) -> torch.Tensor:
    """MTA's span structure term (:mod:`student_train.losses.structure`)."""
    if proj.span is None or len(proj.span) != len(cfg.span_teacher_layers):
        raise ValueError(f"the MTA term needs Projectors(..., span_pairs={len(cfg.span_teacher_layers)})")
    certainty = None
    if cfg.span_weighting == "certainty":
        vocab = x.teacher_head.shape[0]
        certainty = 1.0 - x.teacher_entropy / math.log(vocab)
    t_valid = (
        x.teacher_attention_mask.bool()
        if x.teacher_attention_mask is not None
        else torch.ones(x.teacher_layers[0].shape[:2], dtype=torch.bool, device=x.teacher_layers[0].device)
    )
    return span_structure_loss(
        student_layers=x.student_layers,
        teacher_layers=x.teacher_layers,
        projectors=proj.span,
        student_valid=x.student_attention_mask.bool(),
        teacher_valid=t_valid,
        word_spans=x.word_spans,
        phrase_spans=x.phrase_spans,
        word_pairs=cfg.span_word_pairs,
        teacher_certainty=certainty,
    )


def projected_ce(
    cfg: ObjectiveConfig,
    projectors: Projectors,
    *,
    student_embeddings: torch.Tensor,
    student_head: torch.Tensor,
    student_input_ids: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_input_ids: torch.Tensor,
    teacher_labels: torch.Tensor,
    teacher_embeddings: torch.Tensor,
    teacher_attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``proj_ce`` alone (a sum over student response tokens) and that token count.

    ``proj_ce`` reads the student only through its embedding table and head (both constants here), so it
    needs no student forward: this is what a projector pre-fit minimises. Its gradient reaches the
    ``query`` and ``t2s`` projectors only.
    """
    s_mask = student_labels.ne(IGNORE_INDEX)
    dtype = torch.float64 if teacher_hidden.dtype == torch.float64 else torch.float32
    table = student_embeddings.detach()
    inputs = ObjectiveInputs(
        student_logits=torch.empty(0),
        student_labels=student_labels,
        student_hidden=torch.zeros(*student_input_ids.shape, table.shape[1], dtype=dtype),
        student_input_embeds=F.embedding(formal_ids(student_input_ids, student_labels), table),
        student_target_embeds=F.embedding(formal_ids(student_labels, student_labels), table),
        student_head=student_head.detach(),
        teacher_hidden=teacher_hidden,
        teacher_input_ids=teacher_input_ids,
        teacher_labels=teacher_labels,
        teacher_embeddings=teacher_embeddings,
        teacher_attention_mask=teacher_attention_mask,
    )
    t_mask = teacher_labels.ne(IGNORE_INDEX)
    batch = _Batch(inputs, s_mask, t_mask, student_labels[s_mask], None, dtype)
    t_table = teacher_embeddings.detach()
    t_target_embeds = F.embedding(formal_ids(teacher_labels, teacher_labels), t_table).to(dtype)
    cma = _cma(cfg, batch, projectors, t_table, t_target_embeds)
    return F.cross_entropy(cma.z_t2s, batch.y, reduction="sum"), s_mask.sum()


def _cma(
    cfg: ObjectiveConfig, b: _Batch, proj: Projectors, t_table: torch.Tensor, t_target_embeds: torch.Tensor
) -> CMAOutput:
    """DSKD's cross-model attention between the student and the cached teacher rows (METHOD.md §2)."""
    x = b.inputs
    t_input_embeds = F.embedding(formal_ids(x.teacher_input_ids, x.teacher_labels), t_table).to(b.dtype)
    return cross_model_attention(
        proj,
        student_hidden=x.student_hidden,
        student_input_embeds=x.student_input_embeds,
        student_target_embeds=x.student_target_embeds,
        student_head=x.student_head,
        student_mask=b.s_mask,
        teacher_hidden=x.teacher_hidden,
        teacher_input_embeds=t_input_embeds,
        teacher_target_embeds=t_target_embeds,
        teacher_mask=b.t_mask,
        teacher_valid=None if x.teacher_attention_mask is None else x.teacher_attention_mask.bool(),
        std_scope=cfg.cma_std_scope,
    )


def _token_kd_terms(
    cfg: ObjectiveConfig, b: _Batch, cma: CMAOutput, counts: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """proj_ce, kd_student (accuracy-masked or dual-space weighted, eq 11-12) and kd_teacher (eq 14)."""
    x, s_mask, t_mask, dtype = b.inputs, b.s_mask, b.t_mask, b.dtype
    z_t2s = cma.z_t2s  # [N_S, V_S]
    out = {"proj_ce": F.cross_entropy(z_t2s, b.y, reduction="sum")}
    # student space: the target is sg(z_t2s); the weights are detached
    w_rows = torch.ones_like(b.y, dtype=dtype)
    if cfg.accuracy_mask:
        w_rows = w_rows * z_t2s.detach().argmax(-1).eq(b.y).to(dtype)
    counts["kd_student_tokens"] = w_rows.ne(0).sum()
    if cfg.gate or cfg.entropy_weighting:
        gate = ent = None
        if cfg.gate:
            gate = torch.zeros(s_mask.shape, dtype=dtype, device=s_mask.device)
            gate = gate.masked_scatter(s_mask, gate_from_logits(z_t2s))
        if cfg.entropy_weighting:
            with torch.no_grad():  # eq (7): tau=1, raw student logits, detached
                ent = torch.zeros(s_mask.shape, dtype=dtype, device=s_mask.device)
                ent = ent.masked_scatter(s_mask, entropy_from_logits(b.s_logits.detach()))
        w_s = student_token_weights(
            s_mask, entropy=ent, gate=gate, normalisation=cfg.student_weight_normalisation
        )
        w_rows = w_rows * w_s[s_mask].to(dtype)
    out["kd_student"] = (w_rows * _student_divergence(cfg, z_t2s.detach(), b.s_logits)).sum()
    # teacher space: exact teacher logits rebuilt chunk-wise from cached hidden x head; the entropy of eq (14)
    # from the cache's column (no pass over the vocabulary) or rebuilt alongside the KL
    rebuild = cfg.entropy_weighting and cfg.teacher_entropy == "head"
    if cfg.teacher_kl == "sampled":  # opt-in approximation: top-k + sampled negatives, no pass over the head
        t_ent, t_kl = (
            None,
            sampled_teacher_kl(
                x.teacher_hidden[t_mask],
                x.teacher_head,
                cma.hhat_s2t[t_mask],
                x.teacher_topk_ids[t_mask],
                temperature=cfg.kd_temperature,
                samples=cfg.teacher_kl_samples,
                seed=_batch_seed(x.teacher_input_ids, t_mask),
                teacher_bias=x.teacher_head_bias,
            ),
        )
    else:
        t_ent, t_kl = teacher_entropy_and_kl(
            x.teacher_hidden[t_mask],
            x.teacher_head,
            cma.hhat_s2t[t_mask],
            temperature=cfg.kd_temperature,
            chunk_size=cfg.teacher_chunk_size,
            teacher_bias=x.teacher_head_bias,
            entropy=rebuild,
        )
    if cfg.entropy_weighting:
        if rebuild:
            ent_t = torch.zeros(t_mask.shape, dtype=t_ent.dtype, device=t_mask.device).masked_scatter(
                t_mask, t_ent
            )
        else:
            ent_t = x.teacher_entropy.detach().to(t_kl.dtype) * t_mask
        w_t = teacher_token_weights(ent_t, t_mask, x.teacher_head.shape[0])[t_mask]
        out["kd_teacher"] = (w_t.to(t_kl.dtype) * t_kl).sum().to(dtype)
    else:
        out["kd_teacher"] = t_kl.sum().to(dtype)
    return out


def _batch_seed(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """A seed that is a function of the batch's teacher tokens only (a resumed run draws the same sample)."""
    vals = ids[mask].long()
    pos = torch.arange(1, vals.numel() + 1, device=vals.device)
    return int(((vals * 1_000_003 + pos * 7919) % 2_147_483_647).sum().item()) % 2**62


def _dtw_terms(
    cfg: ObjectiveConfig,
    b: _Batch,
    proj: Projectors,
    cma: CMAOutput | None,
    t_target_embeds: torch.Tensor,
    counts: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The (banded) Soft-DTW terms over hidden states and target embeddings (eq 25)."""
    x = b.inputs
    res = dtw_loss(
        student_hidden=x.student_hidden,
        student_target_embeds=x.student_target_embeds,
        teacher_hidden_proj=apply_linear(proj.t2s, x.teacher_hidden.detach(), b.dtype),
        teacher_target_embeds_proj=apply_linear(proj.dtw_embed_t2s, t_target_embeds, b.dtype),
        student_mask=b.s_mask,
        teacher_mask=b.t_mask,
        a_t2s=cma.a_t2s if cfg.band_enabled else None,
        gamma=cfg.dtw_gamma,
        positions=cfg.dtw_positions,
        alpha=cfg.band_center_alpha,
        base_width=cfg.band_base_width,
        entropy_coef=cfg.band_entropy_coef,
        penalty=cfg.band_penalty,
        detach_teacher_self_term=cfg.detach_teacher_self_term,
    )
    counts["dtw_pairs"], counts["dtw_skipped_pairs"] = res.pairs, res.skipped
    return {"dtw_hidden": res.hidden.to(b.dtype), "dtw_embed": res.embed.to(b.dtype)}


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
    total = None
    for weight in dict.fromkeys(TERMS.values()):  # terms sharing a weight are summed first (TERMS order)
        group = [terms[name] for name, w in TERMS.items() if w == weight]
        part = getattr(cfg, weight) * sum(group[1:], group[0])
        total = part if total is None else total + part
    return ObjectiveOutput(
        total=total,
        terms={k: v.detach() for k, v in terms.items()},
        counts={k: v.detach() for k, v in counts.items()},
    )
