"""Logit-level cross-tokenizer baselines of the paper's Table 1: ULD, MinED and MultiLevelOT.

Pure functions of tensors; each follows one public reference, named on the function, and
docs/BASELINES.md records every choice made where the paper or the code is silent. The teacher enters as
rows of teacher logits rebuilt exactly from the cache (hidden state x LM head, :func:`teacher_logits`),
or, for the top-k ULD variant, as the cached top-k log-probabilities alone.

Position pairing: position ``j`` of a sequence predicts token ``j + 1``; "response positions" are those
whose label is not ``-100`` (the last prompt token .. the token before EOS, METHOD.md §1). ULD and
MultiLevelOT pair the k-th response position of the student with the k-th of the teacher (first-n, as
their reference code); :func:`first_n_pairs` builds those pairs, and any other pairing (e.g. the
character-offset one of :mod:`student_train.align`) can be passed instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.tokenize import IGNORE_INDEX
from student_train.losses.divergences import compute_dtype


def _f(x: torch.Tensor) -> torch.Tensor:
    """fp32 for reductions, fp64 when the input is fp64 (so float64 gradchecks mean something)."""
    return x.to(compute_dtype(x))


MLOT_TOP_K = 50


def response_rows(labels: torch.Tensor) -> list[torch.Tensor]:
    """Per sample, the positions whose label is not ``-100``, in order (``[B, n]`` -> B index tensors)."""
    return [row.ne(IGNORE_INDEX).nonzero(as_tuple=True)[0] for row in labels]


def first_n_pairs(s_labels: torch.Tensor, t_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices (into ``[B*n]`` and ``[B*m]``) of the first ``min(|S_b|, |T_b|)`` response positions.

    DSKD ``universal_logit_distillation.py``: both sequences are shifted so the response starts at 0, and
    positions where both still have a label are compared.
    """
    n, m = s_labels.shape[1], t_labels.shape[1]
    ps, pt = [], []
    for b, (s, t) in enumerate(zip(response_rows(s_labels), response_rows(t_labels))):
        k = min(len(s), len(t))
        ps.append(s[:k] + b * n)
        pt.append(t[:k] + b * m)
    return torch.cat(ps), torch.cat(pt)


@torch.no_grad()
def teacher_logits(
    hidden: torch.Tensor, head: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact teacher logits ``[P, V_T]`` (fp32) of cached final hidden states ``[P, d_T]``; no gradient."""
    out = hidden.float() @ head.float().T
    return out if bias is None else out + bias.float()


def _sorted_l1(a_sorted: torch.Tensor, c_sorted: torch.Tensor) -> torch.Tensor:
    """Row-wise ``sum_v |a_v - c_v|`` of two descending vectors, the shorter zero-padded at the end."""
    k = min(a_sorted.shape[-1], c_sorted.shape[-1])
    head = (a_sorted[..., :k] - c_sorted[..., :k]).abs().sum(-1)
    return head + a_sorted[..., k:].sum(-1) + c_sorted[..., k:].sum(-1)


def uld_loss(student_logits: torch.Tensor, teacher_logits_rows: torch.Tensor) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024), DSKD's version: a SUM over the paired rows.

    ``sum_rows sum_v |sort(softmax(z_s))_v - sort(softmax(z_t))_v|``, both sorted descending over their own
    vocabulary, the smaller vocabulary zero-padded; no temperature (DSKD's code ignores kd_temperature).

    Args:
        student_logits: ``[P, V_S]`` student logits of the paired rows (receives gradient).
        teacher_logits_rows: ``[P, V_T]`` teacher logits of the same rows (constant).
    """
    a = torch.softmax(_f(student_logits), -1).sort(-1, descending=True).values
    c = torch.softmax(teacher_logits_rows.to(a.dtype), -1).sort(-1, descending=True).values
    return _sorted_l1(a, c).sum()


def uld_loss_topk(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor) -> torch.Tensor:
    """ULD with the teacher known only through its cached top-k log-probs (the tail taken as zero).

    The teacher's sorted probabilities are ``exp(top-k log-probs)`` followed by zeros: the error against
    :func:`uld_loss` is at most the teacher's tail mass ``1 - sum(top-k)`` per row (triangle inequality) (measured in
    docs/BENCHMARKS.md). Needs no teacher head.
    """
    a = torch.softmax(_f(student_logits), -1).sort(-1, descending=True).values
    c = teacher_topk_logprobs.to(a.dtype).exp().sort(-1, descending=True).values
    return _sorted_l1(a, c).sum()


def mined_targets(
    teacher_logits_rows: torch.Tensor,
    aligned: torch.Tensor,
    labels: torch.Tensor,
    stu_ids: torch.Tensor,
    tea_ids: torch.Tensor,
    vocab_size: int,
) -> torch.Tensor:
    """MinED's target logits in the student vocabulary (DSKD ``min_edit_dis_kld.py``).

    Aligned rows copy the teacher logit of ``tea_ids[k]`` into student id ``stu_ids[k]`` (the first
    teacher id mapped to each student id), ``-1e5`` for student ids no teacher id maps to; unaligned rows
    are the one-hot logits of the label (``100`` at the label, ``-1e5`` elsewhere).

    Args:
        teacher_logits_rows: ``[A, V_T]`` teacher logits of the aligned rows only, in row order (``A`` =
            ``aligned.sum()``: no vocabulary-sized work for rows that get the one-hot target).
        aligned: ``[P]`` bool, the row has a one-to-one, vocabulary-consistent teacher position.
        labels: ``[P]`` student label ids.
        stu_ids, tea_ids: ``[K]`` the vocabulary map's image in the student vocabulary and, for each, the
            first teacher id mapped to it.
        vocab_size: ``V_S``.
    """
    out = torch.full((labels.shape[0], vocab_size), -1e5, dtype=torch.float32, device=labels.device)
    out.scatter_(1, labels[:, None], 100.0)  # one-hot rows; aligned rows are overwritten below
    projected = torch.full((int(aligned.sum()), vocab_size), -1e5, dtype=torch.float32, device=labels.device)
    projected[:, stu_ids] = teacher_logits_rows.float()[:, tea_ids]
    out[aligned] = projected
    return out


def mined_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sum_rows KL(softmax(z'/tau) || softmax(z_s/tau))`` with no ``tau**2`` (DSKD forward KL)."""
    lp_s = torch.log_softmax(_f(student_logits) / temperature, -1)
    lp_t = torch.log_softmax(target_logits.to(lp_s.dtype) / temperature, -1)
    return (lp_t.exp() * (lp_t - lp_s)).sum()


def _std_normalised_probs(logits: torch.Tensor) -> torch.Tensor:
    """MultiLevelOT's ``softmax(z / (std(z) + 1e-4))`` per row (unbiased std over the vocabulary)."""
    z = _f(logits)
    return torch.softmax(z / (z.std(-1, keepdim=True) + 1e-4), -1)


def _sinkhorn_cost(x: torch.Tensor, y: torch.Tensor, epsilon: float = 0.1, iters: int = 10) -> torch.Tensor:
    """``sum(P * W)`` with ``W = cdist_L1(x, y)``, ``P`` = Sinkhorn scaling of ``exp(-W/eps)`` (reference)."""
    w = torch.cdist(x, y, p=1)
    p = torch.exp(-w / epsilon)
    for _ in range(iters):
        p = p / p.sum(1, keepdim=True)
        p = p / p.sum(0, keepdim=True)
    return (p * w).sum()


def multilevel_ot_loss(
    student_rows: list[torch.Tensor],
    teacher_rows: list[torch.Tensor],
    top_k: int = MLOT_TOP_K,
    sort: str = "token",
) -> torch.Tensor:
    """MultiLevelOT (Cui et al. 2025), 2018cx/Multi-Level-OT ``models/distillation_model.py``, per BATCH.

    Per sample ``b``: ``P_s`` = std-normalised softmax of the student's response rows (its EOS row
    dropped: ``skip_student_eos``), ``P_t`` the teacher's (EOS kept); each row's probabilities sorted
    descending (``sort="token"``, the code at publication, 77e32ae/d8d298f) or all columns ordered by
    their batch-wide mass (``sort="batch"``, the repository's HEAD), cut to ``top_k``; rows zero-padded to
    the batch's longest answer ``L``. Then, with ``k_b = min(|S_b|, |T_b|)``::

        l1   = mean_b mean_{i<k_b} sum_j |P_s - P_t|                    (token level, absolute difference)
        ce   = mean_{b,i<L} -sum_j softmax(P_s)_j log softmax(P_t)_j    (token level, "KL_wo")
        sk   = sum_b 0.001 * Sinkhorn_L1(softmax(P_t/2), softmax(P_s/2)) (sequence level, eps 0.1, 10 iters)
        loss = 1.5 * (l1 + 0.1 * ce + 0.1 * sk)

    Args:
        student_rows: per sample ``[|S_b|, V_S]`` student logits of its response rows INCLUDING the EOS row.
        teacher_rows: per sample ``[|T_b|, V_T]`` teacher logits of its response rows (constant).
        top_k: kept probability columns (reference: 50).
        sort: ``"token"`` or ``"batch"`` (see above).

    Returns:
        0-d tensor: the batch's distillation loss (a MEAN, not a sum: the objective scales it, see
        :func:`student_train.losses.objective.compute_terms`).
    """
    if sort not in ("token", "batch"):
        raise ValueError(f"sort must be 'token' or 'batch', got {sort!r}")
    ps = [_std_normalised_probs(r[:-1]) for r in student_rows]  # skip_student_eos
    pt = [_std_normalised_probs(r).to(ps[0].dtype) for r in teacher_rows]
    length = max(max(len(x) for x in ps), max(len(x) for x in pt))

    def stack(rows: list[torch.Tensor]) -> torch.Tensor:
        width = max(r.shape[-1] for r in rows)
        out = rows[0].new_zeros((len(rows), length, width))
        for b, r in enumerate(rows):
            out[b, : len(r), : r.shape[-1]] = r
        if sort == "token":
            out = out.sort(-1, descending=True).values
        else:
            out = out[:, :, out.sum((0, 1)).argsort(descending=True)]
        return out[:, :, :top_k]

    s, t = stack(ps), stack(pt)
    width = max(s.shape[-1], t.shape[-1])
    s, t = F.pad(s, (0, width - s.shape[-1])), F.pad(t, (0, width - t.shape[-1]))
    l1 = torch.stack(
        [(s[b, :k] - t[b, :k]).abs().sum(-1).mean() if (k := min(len(ps[b]), len(pt[b]))) > 0 else s.new_zeros(())
         for b in range(len(ps))]
    )  # fmt: skip
    ce = -(torch.softmax(s, -1) * torch.log_softmax(t, -1)).sum(-1).mean()
    sk = sum(
        0.001 * _sinkhorn_cost(torch.softmax(t[b] / 2, -1), torch.softmax(s[b] / 2, -1))
        for b in range(len(ps))
    )
    return 1.5 * (l1.mean() + 0.1 * ce + 0.1 * sk)
