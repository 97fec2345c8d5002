"""SRA (Span Representation Alignment): span centres of mass aligned across layers, geometry and logits.

Reference: sonho4ng/SRAv2 at d7c7263 (``run_llm.py`` ``Trainer.knowledge_distillation_loss``,
``distillation/utils.py`` ``get_span_hidden_states``, ``distillation/loss.py``; docs/BASELINES.md). Spans are
the response chunks both tokenizations cut at (:func:`student_train.align.offset_chunks`), span ``k`` of the
student paired with span ``k`` of the teacher. For each layer pair ``l``:

* salience ``a_t``: the attention row of the last real position in the block that produced the layer, mean
  over heads, normalised over the whole sequence (teacher: the cache's salience column; student: its own
  attention, detached); span mass ``m_k = sum_{t in k} a_t``;
* centre of mass ``c_k = sum a_t h_t / max(m_k, 1e-5)`` (``weighted_pooling=False``: the plain mean); the
  student's is projected by the pair's ``W_l`` (``d_S x d_T``, no bias);
* span weights ``w_k = m_k^p / sum_j m_j^p`` from the teacher (``span_weighting=False``: uniform).

Terms, each a sum over a sample's spans averaged over the samples of the micro-batch:
``span = sum_l (1/L) sum_k w_k (1 - cos(W_l c^S_k, c^T_k))``; ``delta = 1/(L-1) sum_{l<L} sum_k m^T_{l+1,k}
(1 - cos(W_{l+1} c^S_{l+1,k} - W_l c^S_{l,k}, c^T_{l+1,k} - c^T_{l,k}))`` (raw teacher masses, as the
reference); ``geometry = sum_{j != k} pi_jk (cos(c^S_j, c^S_k) - cos(c^T_j, c^T_k))^2`` over the last pair's
unprojected centres, ``pi`` the normalised products of the last layer's span weights; ``logit = sum_k
KL(p_T || q_S)`` at temperature ``T`` between the heads' distributions of the last pair's centres, both
restricted to the vocabulary strings the two tokenizers share (no ``T^2``).

Deviations, because the reference depends on padding: the salience query is each sample's last real position
(the reference takes the padded batch's last row, a pad for all but the longest sample; SRAv4 fixed it the
same way); samples without a span contribute 0 (the reference divides 0 by 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from student_train.losses.structure import span_membership

__all__ = ["SRATerms", "sra_terms"]


class SRATerms(dict):
    """``{"sra_span", "sra_delta", "sra_geometry", "sra_logit"}``: 0-d tensors, each a mean over samples."""


def _pool(h, sal, member, weighted: bool):
    """Centres of mass ``[B, K, D]`` and masses ``[B, K]`` of the spans (``member`` ``[B, K, L]`` 0/1)."""
    a = member * sal[:, None, :] if weighted else member
    mass = (member * sal[:, None, :]).sum(-1)
    return (a @ h) / a.sum(-1).clamp_min(1e-5)[..., None], mass


def sra_terms(
    *,
    student_layers: list[torch.Tensor],
    teacher_layers: list[torch.Tensor],
    student_salience: list[torch.Tensor],
    teacher_salience: list[torch.Tensor],
    student_spans: torch.Tensor,
    teacher_spans: torch.Tensor,
    projectors: nn.ModuleList,
    student_head: nn.Module | None = None,
    teacher_head: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
    shared_vocab: tuple[torch.Tensor, torch.Tensor] | None = None,
    temperature: float = 2.0,
    power: float = 1.0,
    weighted_pooling: bool = True,
    span_weighting: bool = True,
    delta: bool = True,
) -> SRATerms:
    """The four SRA terms (module docstring). Layers, saliences: per pair ``[B, n|m, d]`` / ``[B, n|m]``;
    spans: ``[B, n]`` / ``[B, m]`` shared span ids (``-1`` = none); ``student_head`` the student's output
    module (called, so that ZeRO-3 gathers it), ``teacher_head`` ``[V_T, d_T]`` (constant),
    ``shared_vocab`` ``(student ids [S], teacher ids [S])``. The logit term is skipped (0) without heads."""
    h0 = student_layers[0]
    dtype = torch.float64 if h0.dtype == torch.float64 else torch.float32
    bsz = h0.shape[0]
    num = int(max(student_spans.max(), teacher_spans.max())) + 1 if student_spans.numel() else 0
    zero = h0.new_zeros((), dtype=dtype)
    out = SRATerms(sra_span=zero, sra_delta=zero, sra_geometry=zero, sra_logit=zero)
    if num < 1:  # no span in this micro-batch: exact zeros that still reach every parameter (data parallel)
        touch = sum(h.sum() for h in student_layers) + sum(p.sum() for p in projectors.parameters())
        out["sra_span"] = zero + 0.0 * touch.to(dtype)
        return out
    m_s = span_membership(student_spans, num, dtype)  # [B, K, n]
    m_t = span_membership(teacher_spans, num, dtype)
    present = m_t.sum(-1).gt(0) & m_s.sum(-1).gt(0)  # [B, K]
    pres = present.to(dtype)
    n_pairs = len(student_layers)
    s_com, s_proj, t_com, t_mass = [], [], [], []
    for h_s, h_t, a_s, a_t, proj in zip(
        student_layers, teacher_layers, student_salience, teacher_salience, projectors
    ):
        c_s, _ = _pool(h_s.to(dtype), a_s.detach().to(dtype), m_s, weighted_pooling)
        c_t, mass = _pool(h_t.detach().to(dtype), a_t.detach().to(dtype), m_t, weighted_pooling)
        s_com.append(c_s)
        s_proj.append(proj(c_s.to(proj.weight.dtype)).to(dtype))
        t_com.append(c_t)
        t_mass.append(mass * pres)

    def weights(mass):
        if not span_weighting:
            return pres / pres.sum(-1, keepdim=True).clamp_min(1.0)
        powd = mass.clamp_min(0) ** power * pres
        return powd / powd.sum(-1, keepdim=True).clamp_min(1e-30)

    def dissim(x, y):
        return 1.0 - F.cosine_similarity(x, y, dim=-1, eps=1e-5)

    span = zero
    for li in range(n_pairs):
        span = span + (weights(t_mass[li]) * dissim(s_proj[li], t_com[li])).sum() / n_pairs
    out["sra_span"] = span / bsz
    if delta and n_pairs > 1:
        acc = zero
        for li in range(n_pairs - 1):
            d = dissim(s_proj[li + 1] - s_proj[li], t_com[li + 1] - t_com[li])
            acc = acc + ((t_mass[li + 1] if span_weighting else pres) * d).sum()
        out["sra_delta"] = acc / (n_pairs - 1) / bsz
    w = weights(t_mass[-1])
    eye = torch.eye(num, dtype=torch.bool, device=h0.device)
    pair = (w[:, :, None] * w[:, None, :]).masked_fill(eye, 0.0)
    pair = pair / pair.sum((1, 2), keepdim=True).clamp_min(1e-5)
    sn, tn = F.normalize(s_com[-1], dim=-1, eps=1e-5), F.normalize(t_com[-1], dim=-1, eps=1e-5)
    diff = sn @ sn.transpose(-1, -2) - tn @ tn.transpose(-1, -2)
    out["sra_geometry"] = (diff.square() * pair).sum() / bsz
    if student_head is not None and teacher_head is not None and shared_vocab is not None:
        s_ids, t_ids = shared_vocab
        rows = present.nonzero(as_tuple=True)
        head_w = student_head.weight
        z_s = student_head(s_com[-1][rows].to(head_w.dtype)).to(dtype)[:, s_ids]
        z_t = t_com[-1][rows] @ teacher_head.to(dtype)[t_ids].T
        if teacher_head_bias is not None:
            z_t = z_t + teacher_head_bias.to(dtype)[t_ids]
        log_q = torch.log_softmax(z_s / temperature, dim=-1)
        log_p = torch.log_softmax(z_t / temperature, dim=-1)
        out["sra_logit"] = (log_p.exp() * (log_p - log_q)).sum() / bsz
    return out
