"""DSKD cross-model attention (CMA), METHOD.md §2 steps 1-7 and DWA-KD eqs (1)-(2).

The only ``nn.Module`` of the losses package is :class:`Projectors` (the trainer puts its parameters in
their own optimizer group, LR 1e-3 by default). Everything else is a pure function of tensors; the
teacher side is a set of constants (cached hidden states, embedding lookups into the cached table).

Precision: the projectors run in their own parameter dtype (bf16 under DeepSpeed); Q, K, V, the scores,
both softmaxes and the attended states are float32 (float64 when the student hidden states are float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.tokenize import IGNORE_INDEX
from student_train.losses.divergences import compute_dtype

__all__ = [
    "MASK_SCORE",
    "CMAOutput",
    "Projectors",
    "apply_linear",
    "attention_scores",
    "cross_model_attention",
    "formal_ids",
    "index_embeddings",
    "std_normalise",
]

MASK_SCORE = -1.0e5
"""Additive score for every (i, j) where the student or the teacher position is not a response token."""


class Projectors(nn.Module):
    """Trainable projectors shared by DSKD-CMA and DWA-KD (all ``nn.Linear`` with bias).

    Attributes:
        query: ``2 d_S -> 2 d_T``; queries from student index embeddings ``[e_in; e_tg]``.
        t2s: ``d_T -> d_S``; CMA values (std-normalised ``H^T + E^T_tg``) and, shared, the hidden-state DTW
            (raw ``H^T``, METHOD.md eq. 10 / A13).
        s2t: ``d_S -> d_T``; student values for the teacher-space attention.
        dtw_embed_t2s: ``d_T -> d_S``; teacher target-token embeddings for the embedding DTW (eq. 9). ``None``
            when built with ``dtw_embed=False`` (DSKD runs do not need it; an unused parameter would only
            confuse data-parallel wrappers).
        kq_discriminator: DSKD-CMA-GA's query/key discriminator
            (:class:`student_train.losses.adversarial.KQDiscriminator`) or ``None``; it lives here so that it
            is trained, checkpointed, resumed and exported with the projectors.
        span: MTA's per-layer-pair ``Linear(d_S, d_T)`` (an ``nn.ModuleList``) or ``None``.
        sra: SRA's per-layer-pair ``Linear(d_S, d_T, bias=False)`` (xavier-uniform init, as the reference's
            ``d_S x d_T`` parameters) or ``None``.
    With ``cma=False`` (methods without the cross-model attention or DTW, e.g. SRA alone) ``query``, ``t2s``
    and ``s2t`` are ``None``: a parameter that never gets a gradient would only confuse data-parallel wrappers.
    """

    def __init__(
        self,
        d_s: int,
        d_t: int,
        *,
        dtw_embed: bool = True,
        kq_hidden: int | None = None,
        span_pairs: int = 0,
        sra_pairs: int = 0,
        cma: bool = True,
    ) -> None:
        """Build the projectors.

        Args:
            d_s: student hidden size.
            d_t: teacher hidden size.
            dtw_embed: also build ``dtw_embed_t2s`` (needed iff the DTW term is on).
            kq_hidden: build the GA discriminator with this hidden width (``None``: none).
            span_pairs: build this many MTA span projectors (0: none).
            sra_pairs: build this many SRA projectors (0: none).
            cma: build DSKD's ``query``, ``t2s`` and ``s2t``.
        """
        super().__init__()
        if d_s < 1 or d_t < 1:
            raise ValueError(f"hidden sizes must be >= 1, got d_s={d_s}, d_t={d_t}")
        self.d_s = d_s
        self.d_t = d_t
        self.query = nn.Linear(2 * d_s, 2 * d_t) if cma else None
        self.t2s = nn.Linear(d_t, d_s) if cma else None
        self.s2t = nn.Linear(d_s, d_t) if cma else None
        self.dtw_embed_t2s = nn.Linear(d_t, d_s) if dtw_embed and cma else None
        self.kq_discriminator = None
        if kq_hidden is not None:
            from student_train.losses.adversarial import KQDiscriminator

            self.kq_discriminator = KQDiscriminator(2 * d_t, kq_hidden)
        self.span = nn.ModuleList(nn.Linear(d_s, d_t) for _ in range(span_pairs)) if span_pairs else None
        self.sra = None
        if sra_pairs:
            self.sra = nn.ModuleList(nn.Linear(d_s, d_t, bias=False) for _ in range(sra_pairs))
            for lin in self.sra:
                nn.init.xavier_uniform_(lin.weight)

    def extra_repr(self) -> str:
        """Sizes for ``print(module)``."""
        return f"d_s={self.d_s}, d_t={self.d_t}"


def apply_linear(layer: nn.Linear, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``layer(x)`` evaluated in the layer's parameter dtype, returned in ``dtype``."""
    return layer(x.to(layer.weight.dtype)).to(dtype)


@dataclass
class CMAOutput:
    """Results of :func:`cross_model_attention`. ``n``/``m``: padded student/teacher lengths.

    Attributes:
        scores: ``[B, n, m]`` masked scores ``Z`` (float32).
        a_t2s: ``[B, n, m]`` ``softmax_j(Z)``: row-stochastic over teacher positions.
        a_s2t: ``[B, m, n]`` ``softmax_i(Z^T)``: row-stochastic over student positions.
        hhat_t2s: ``[B, n, d_S]`` teacher values attended by student queries.
        z_t2s: ``[N_S, V_S]`` ``hhat_t2s @ W_S^T`` (``W_S`` detached) at the response positions only,
            in row-major order (the rows of ``x[student_mask]``).
        hhat_s2t: ``[B, m, d_T]`` student values attended from each teacher position.
        queries: ``[B, n, 2 d_T]`` the projected student index embeddings (live through ``query``).
        keys: ``[B, m, 2 d_T]`` the std-normalised teacher index embeddings (constants).
    """

    scores: torch.Tensor
    a_t2s: torch.Tensor
    a_s2t: torch.Tensor
    hhat_t2s: torch.Tensor
    z_t2s: torch.Tensor
    hhat_s2t: torch.Tensor
    queries: torch.Tensor
    keys: torch.Tensor


def formal_ids(ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Replace ids at non-response positions (``labels == ignore_index``) by id 0 (METHOD.md §2.1).

    Use it for both the input ids and the target ids (``formal_ids(labels, labels)``) of each side.

    Args:
        ids: ``[B, L]`` integer ids (input ids, or the labels themselves).
        labels: ``[B, L]`` labels with ``ignore_index`` at non-response positions.
        ignore_index: label value marking non-response positions.

    Returns:
        ``[B, L]`` ids with 0 wherever ``labels == ignore_index``.
    """
    if ids.shape != labels.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and labels {tuple(labels.shape)} must have the same shape")
    return torch.where(labels.ne(ignore_index), ids, torch.zeros_like(ids))


def index_embeddings(input_embeds: torch.Tensor, target_embeds: torch.Tensor) -> torch.Tensor:
    """``u_i = [e_in,i ; e_tg,i]`` (METHOD.md §2.2): ``[B, L, d]`` x 2 -> ``[B, L, 2d]``."""
    return torch.cat([input_embeds, target_embeds], dim=-1)


def std_normalise(x: torch.Tensor, valid: torch.Tensor | None = None, scope: str = "batch") -> torch.Tensor:
    """``x / std(x)``: the scalar std normalisation of METHOD.md §2.3.

    Args:
        x: ``[B, L, D]``.
        valid: boolean ``[B, L]`` real (non-pad) rows; used by ``scope="sample"``.
        scope: ``"batch"`` = ONE unbiased std over every entry of the batch tensor, prompt and pad rows
            included (the DSKD code); ``"sample"`` = one unbiased std per sample over its non-pad rows, which
            makes the result independent of padding and of how samples are grouped into micro-batches.

    The std is floored at 1e-12 so a constant tensor gives large-but-finite values instead of NaN.
    """
    if scope == "batch":
        return x / x.std().clamp_min(1e-12)
    if scope != "sample":
        raise ValueError(f"std scope must be 'batch' or 'sample', got {scope!r}")
    if valid is None:
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    w = valid.to(x.dtype).unsqueeze(-1)
    count = (valid.sum(1) * x.shape[-1]).to(x.dtype).clamp_min(2.0)
    mean = (x * w).sum((1, 2)) / count
    var = (((x - mean[:, None, None]) ** 2) * w).sum((1, 2)) / (count - 1)
    return x / var.sqrt().clamp_min(1e-12)[:, None, None]


def attention_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    student_mask: torch.Tensor,
    teacher_mask: torch.Tensor,
) -> torch.Tensor:
    """``Z_ij = q_i . k_j / sqrt(2 d_T) - 1e5 (1 - m^S_i m^T_j)`` (METHOD.md §2.5).

    Args:
        queries: ``[B, n, 2 d_T]``.
        keys: ``[B, m, 2 d_T]``.
        student_mask: boolean ``[B, n]`` response mask ``m^S``.
        teacher_mask: boolean ``[B, m]`` response mask ``m^T``.

    Returns:
        ``[B, n, m]`` scores in the queries' dtype.
    """
    two_dt = keys.shape[-1]
    z = queries @ keys.transpose(-1, -2) / math.sqrt(two_dt)
    pair = student_mask.unsqueeze(-1).to(z.dtype) * teacher_mask.unsqueeze(1).to(z.dtype)
    return z + (1.0 - pair) * MASK_SCORE


def cross_model_attention(
    projectors: Projectors,
    *,
    student_hidden: torch.Tensor,
    student_input_embeds: torch.Tensor,
    student_target_embeds: torch.Tensor,
    student_head: torch.Tensor,
    student_mask: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_input_embeds: torch.Tensor,
    teacher_target_embeds: torch.Tensor,
    teacher_mask: torch.Tensor,
    teacher_valid: torch.Tensor | None = None,
    std_scope: str = "batch",
) -> CMAOutput:
    """DSKD cross-model attention in both directions (METHOD.md §2 steps 2-7).

    ``q = query([e^S_in; e^S_tg])`` (embeddings detached), ``k = N([E^T_in; E^T_tg])``,
    ``v^T = t2s(N(H^T) + N(E^T_tg))``, ``v^S = s2t(h^S)``; ``A^{t2s} = softmax_j(Z)``,
    ``A^{s2t} = softmax_i(Z^T)``; ``hhat^{t2s} = A^{t2s} v^T``, ``z^{t2s} = hhat^{t2s} W_S^T`` (``W_S``
    detached), ``hhat^{s2t} = A^{s2t} v^S``.

    Args:
        projectors: the trainable :class:`Projectors`.
        student_hidden: ``[B, n, d_S]`` student final hidden states (receives gradient through ``s2t``).
        student_input_embeds: ``[B, n, d_S]`` student embeddings of the formal input ids (detached here).
        student_target_embeds: ``[B, n, d_S]`` student embeddings of the formal target ids (detached here).
        student_head: ``[V_S, d_S]`` student LM head (detached here: no gradient reaches it).
        student_mask: boolean ``[B, n]`` student response mask.
        teacher_hidden: ``[B, m, d_T]`` cached teacher final hidden states (constant).
        teacher_input_embeds: ``[B, m, d_T]`` teacher embeddings of the formal input ids (constant).
        teacher_target_embeds: ``[B, m, d_T]`` teacher embeddings of the formal target ids (constant).
        teacher_mask: boolean ``[B, m]`` teacher response mask.
        teacher_valid: boolean ``[B, m]`` non-pad teacher rows (for ``std_scope="sample"``).
        std_scope: scope of the std normalisation of keys and values (see :func:`std_normalise`).

    Returns:
        :class:`CMAOutput`.
    """
    dtype = compute_dtype(student_hidden)
    t_hidden = teacher_hidden.detach().to(dtype)
    t_in = teacher_input_embeds.detach().to(dtype)
    t_tg = teacher_target_embeds.detach().to(dtype)

    u_s = index_embeddings(student_input_embeds.detach(), student_target_embeds.detach())
    queries = apply_linear(projectors.query, u_s, dtype)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return std_normalise(x, teacher_valid, std_scope)

    keys = norm(index_embeddings(t_in, t_tg))
    v_t = apply_linear(projectors.t2s, norm(t_hidden) + norm(t_tg), dtype)
    v_s = apply_linear(projectors.s2t, student_hidden, dtype)

    scores = attention_scores(queries, keys, student_mask, teacher_mask)
    a_t2s = torch.softmax(scores, dim=-1)
    a_s2t = torch.softmax(scores.transpose(-1, -2), dim=-1)
    hhat_t2s = a_t2s @ v_t
    hhat_s2t = a_s2t @ v_s
    z_t2s = F.linear(hhat_t2s[student_mask], student_head.detach().to(dtype))
    return CMAOutput(
        scores=scores,
        a_t2s=a_t2s,
        a_s2t=a_s2t,
        hhat_t2s=hhat_t2s,
        z_t2s=z_t2s,
        hhat_s2t=hhat_s2t,
        queries=queries,
        keys=keys,
    )
