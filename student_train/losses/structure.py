"""MTA's span structure term ("Dynamic Structural Alignment"): the geometry among a sample's spans, per layer pair.

Reference: voluyen/dwa_mta ``code/criterions/span_utils.py`` (cross-tokenizer version, the one its
``dwa_kd.py`` calls; docs/BASELINES.md). For each layer pair ``k`` (teacher layer, student layer):

1. token weights per side, from that side's hidden states of the layer: a parameter-free self-attention over
   ``h / std(h)`` (unbiased std over the features, no centring), scaled by ``1/sqrt(D)``, pad keys and the
   diagonal masked; a token's weight is the attention it receives, averaged over the query rows (detached);
2. span representations per side: the weight-averaged hidden states of the span's tokens
   (``sum w h / max(sum w, 1e-5)``); the student's through the pair's projector ``Linear(d_S, d_T)``;
3. ``sum_{i != j} w_i w_j (cos(s_i, s_j) - cos(t_i, t_j))^2 / sum_{i != j} w_i w_j`` over the span pairs
   of each sample, pooled over the micro-batch, with ``w`` the teacher's span weight (its token weights
   summed over the span, or the span's mean teacher certainty);
4. the first ``word_pairs`` pairs use word spans, the others phrase spans; the term is the sum over pairs
   divided by the number of pairs.

Deviations from the reference, each because the reference's behaviour depends on padding or on a quirk:
the token weights average over the *real* query rows (the reference averages over every row of a batch
padded to ``max_length``, pad rows included, which a cache of real positions cannot reproduce); a span
is used only when both sides have tokens in it (the reference gives a span with no student token the
projector's bias as representation). The reference code has no direct hidden-state term across
tokenizers (its "Hidden Representation Alignment" exists only in the same-tokenizer version), and
neither has this one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["pair_structure_loss", "span_membership", "span_pool", "span_structure_loss", "token_weights"]


def token_weights(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` detached weights: mean over real query rows of the attention each real key receives.

    Args:
        hidden: ``[B, L, D]`` hidden states of one layer.
        valid: ``[B, L]`` bool, real (non-pad) positions.
    """
    with torch.no_grad():
        h = hidden.float() if hidden.dtype in (torch.float16, torch.bfloat16) else hidden
        q = h / (h.std(dim=-1, keepdim=True) + 1e-5)
        scores = q @ q.transpose(-1, -2) / math.sqrt(h.shape[-1])
        eye = torch.eye(h.shape[1], dtype=torch.bool, device=h.device)
        scores = scores.masked_fill(~valid[:, None, :] | eye, float("-inf"))
        attn = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a sample with one real token: no other key
        rows = valid.to(attn.dtype)
        return (attn * rows[:, :, None]).sum(1) / rows.sum(1, keepdim=True).clamp_min(1.0)


def span_membership(span_ids: torch.Tensor, num_spans: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, K, L]`` 0/1 in ``dtype``: position ``l`` of sample ``b`` belongs to span ``k`` (``span_ids``
    ``[B, L]`` long, ``-1`` = none; ``K = num_spans``). Shared by MTA and SRA."""
    return span_ids[:, None, :].eq(torch.arange(num_spans, device=span_ids.device)[None, :, None]).to(dtype)


def span_pool(
    hidden: torch.Tensor, weights: torch.Tensor, member: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-averaged span representations ``[B, K, D]`` and span weight sums ``[B, K]``.

    ``member`` ``[B, K, L]`` is :func:`span_membership` of the positions' span ids.
    """
    a = member.to(hidden.dtype) * weights.to(hidden.dtype)[:, None, :]  # [B, K, L]
    mass = a.sum(-1)
    return (a @ hidden) / mass.clamp_min(1e-5)[..., None], mass


def pair_structure_loss(
    s_reps: torch.Tensor, t_reps: torch.Tensor, span_weights: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """Weighted squared difference of the two spaces' span cosine matrices, pooled over the batch.

    Args:
        s_reps: ``[B, K, d]`` (projected) student span representations.
        t_reps: ``[B, K, d']`` teacher span representations.
        span_weights: ``[B, K]`` teacher span weights.
        present: ``[B, K]`` bool, spans that exist in the sample.
    """
    s, t = F.normalize(s_reps, dim=-1), F.normalize(t_reps, dim=-1)
    diff = s @ s.transpose(-1, -2) - t @ t.transpose(-1, -2)
    eye = torch.eye(s.shape[1], dtype=torch.bool, device=s.device)
    keep = (present[:, :, None] & present[:, None, :] & ~eye).to(diff.dtype)
    w = span_weights[:, :, None].to(diff.dtype) * span_weights[:, None, :].to(diff.dtype) * keep
    return (diff.square() * w).sum() / w.sum().clamp_min(1e-5)


def span_structure_loss(
    *,
    student_layers: list[torch.Tensor],
    teacher_layers: list[torch.Tensor],
    projectors: nn.ModuleList,
    student_valid: torch.Tensor,
    teacher_valid: torch.Tensor,
    word_spans: tuple[torch.Tensor, torch.Tensor],
    phrase_spans: tuple[torch.Tensor, torch.Tensor],
    word_pairs: int,
    teacher_certainty: torch.Tensor | None = None,
) -> torch.Tensor:
    """MTA's span structure term (module docstring): the mean over layer pairs of :func:`pair_structure_loss`.

    Args:
        student_layers: per pair ``[B, n, d_S]`` student hidden states (live).
        teacher_layers: per pair ``[B, m, d_T]`` cached teacher hidden states (constants).
        projectors: per pair ``Linear(d_S, d_T)``.
        student_valid, teacher_valid: ``[B, n]`` / ``[B, m]`` bool real positions.
        word_spans, phrase_spans: ``(student [B, n], teacher [B, m])`` long span ids shared by both sides
            (span ``k`` of a sample is the same characters on both sides), ``-1`` = no span.
        word_pairs: the first this many pairs use word spans, the rest phrase spans.
        teacher_certainty: ``[B, m]`` ``1 - H/log V`` per teacher position: span weight = its mean over
            the span's teacher tokens (else the summed teacher token weights).
    """
    h0 = student_layers[0]
    dtype = torch.float64 if h0.dtype == torch.float64 else torch.float32  # fp16's eps would give 0/0
    total = h0.new_zeros((), dtype=dtype)
    for k, (h_s, h_t) in enumerate(zip(student_layers, teacher_layers)):
        s_ids, t_ids = word_spans if k < word_pairs else phrase_spans
        num = int(max(s_ids.max(), t_ids.max())) + 1 if s_ids.numel() else 0
        proj = projectors[k]
        if num < 2:  # no pair of spans in this micro-batch: an exact zero that still reaches every parameter,
            # so that all data-parallel ranks reduce the same gradients
            total = total + 0.0 * (h_s.sum() + sum(p.sum() for p in proj.parameters())).to(dtype)
            continue
        h_s, h_t = h_s.to(dtype), h_t.detach().to(dtype)
        m_t = span_membership(t_ids, num, dtype)
        s_reps, _ = span_pool(h_s, token_weights(h_s, student_valid), span_membership(s_ids, num, dtype))
        t_reps, t_mass = span_pool(h_t, token_weights(h_t, teacher_valid), m_t)
        if teacher_certainty is not None:
            cert = teacher_certainty.to(dtype)[:, None, :]
            t_mass = (m_t * cert).sum(-1) / m_t.sum(-1).clamp_min(1e-5)
        present = m_t.sum(-1).gt(0)
        s_proj = proj(s_reps.to(proj.weight.dtype)).to(dtype)
        total = total + pair_structure_loss(s_proj, t_reps, t_mass, present)
    return total / len(student_layers)
