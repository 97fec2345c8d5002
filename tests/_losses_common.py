"""Helpers shared by the loss tests (tests/test_loss_*.py): random objective inputs and the Soft-DTW oracle."""

from __future__ import annotations

import pytest
import torch

import student_train.kernels as kernels
from student_train.kernels.reference import soft_dtw_reference
from student_train.losses.cma import Projectors
from student_train.losses.objective import (
    ObjectiveInputs,
    compute_objective,
)


def _reference_divergence(cost_xy, cost_xx, cost_yy, gamma, *, lengths_x=None, lengths_y=None):
    """sdtw(xy) - 0.5 (sdtw(xx) + sdtw(yy)) by the float64 oracle (used while the fast kernel is absent)."""
    bsz, n, m = cost_xy.shape
    lx = torch.full((bsz,), n) if lengths_x is None else lengths_x
    ly = torch.full((bsz,), m) if lengths_y is None else lengths_y
    xy = soft_dtw_reference(cost_xy, gamma, lengths_x=lx, lengths_y=ly)
    xx = soft_dtw_reference(cost_xx, gamma, lengths_x=lx, lengths_y=lx)
    yy = soft_dtw_reference(cost_yy, gamma, lengths_x=ly, lengths_y=ly)
    return xy - 0.5 * (xx + yy)


@pytest.fixture(autouse=True)
def _soft_dtw_kernel(monkeypatch):
    """Use the project kernel when it exists; otherwise the float64 reference (nothing is skipped)."""
    if not hasattr(kernels, "soft_dtw_divergence"):
        try:
            from student_train.kernels import soft_dtw_divergence  # noqa: F401
        except ImportError:
            monkeypatch.setattr(kernels, "soft_dtw_divergence", _reference_divergence, raising=False)


@pytest.fixture
def reference_kernel(monkeypatch):
    """Force the float64 oracle (for float64 gradchecks through the DTW plumbing)."""
    monkeypatch.setattr(kernels, "soft_dtw_divergence", _reference_divergence, raising=False)


# ----------------------------------------------------------------------------------------- helpers


def make_tensors(
    *,
    bsz=2,
    n=9,
    m=11,
    v_s=23,
    v_t=29,
    d_s=6,
    d_t=10,
    dtype=torch.float32,
    seed=0,
    prompt_s=(2, 3),
    prompt_t=(3, 2),
    pad_s=(0, 2),
    pad_t=(1, 0),
):
    """Random ObjectiveInputs fields (leaves with requires_grad on the student side)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def labels(length, vocab, prompts, pads):
        lab = torch.randint(0, vocab, (bsz, length), generator=g)
        for b in range(bsz):
            lab[b, : prompts[b]] = -100
            if pads[b]:
                lab[b, length - pads[b] :] = -100
        return lab

    t = dict(
        student_logits=randn(bsz, n, v_s, scale=3.0),
        student_labels=labels(n, v_s, prompt_s, pad_s),
        student_hidden=randn(bsz, n, d_s),
        student_input_embeds=randn(bsz, n, d_s),
        student_target_embeds=randn(bsz, n, d_s),
        student_head=randn(v_s, d_s, scale=0.7),
        teacher_hidden=randn(bsz, m, d_t),
        teacher_input_ids=torch.randint(0, v_t, (bsz, m), generator=g),
        teacher_labels=labels(m, v_t, prompt_t, pad_t),
        teacher_head=randn(v_t, d_t, scale=0.7),
        teacher_embeddings=randn(v_t, d_t),
    )
    # the cache's entropy column: the teacher distribution's entropy, from its final states x head
    z_t = t["teacher_hidden"].double() @ t["teacher_head"].double().T
    t["teacher_entropy"] = -(z_t.softmax(-1) * z_t.log_softmax(-1)).sum(-1).to(dtype)
    t["teacher_topk_ids"] = z_t.topk(min(4, v_t), dim=-1).indices  # the cache's top-k ids
    for k in ("student_logits", "student_hidden", "student_input_embeds", "student_target_embeds"):
        t[k].requires_grad_(True)
    return t


def add_spans(t, pairs=1, seed=0):
    """MTA's inputs on the tensors of :func:`make_tensors`: ``pairs`` layer pairs (the final states), every
    position real, spans of two positions (words) and of three (phrases) shared by both sides."""
    bsz, n = t["student_labels"].shape
    m = t["teacher_labels"].shape[1]

    def ids(length, size):
        out = torch.arange(length) // size
        return out.expand(bsz, length).clone()

    k_w, k_p = min(n // 2, m // 2), min(n // 3, m // 3)
    word = (ids(n, 2).masked_fill(ids(n, 2) >= k_w, -1), ids(m, 2).masked_fill(ids(m, 2) >= k_w, -1))
    phrase = (ids(n, 3).masked_fill(ids(n, 3) >= k_p, -1), ids(m, 3).masked_fill(ids(m, 3) >= k_p, -1))
    t.update(
        student_layers=[t["student_hidden"]] * pairs,
        teacher_layers=[t["teacher_hidden"]] * pairs,
        student_attention_mask=torch.ones(bsz, n, dtype=torch.long),
        word_spans=word,
        phrase_spans=phrase,
    )
    return t


def add_sra(t, pairs=1, v_shared=7):
    """SRA's inputs on the tensors of :func:`make_tensors`: ``pairs`` layer pairs (the final states), uniform
    salience over real positions, response chunks of two positions shared by both sides, a student head."""
    from torch import nn

    bsz, n = t["student_labels"].shape
    m = t["teacher_labels"].shape[1]
    d_s = t["student_hidden"].shape[-1]
    v_s = t["student_logits"].shape[-1]

    def chunks(labels):
        ids = (torch.arange(labels.shape[1]) // 2).expand_as(labels).clone()
        return ids.masked_fill(labels.eq(-100), -1)

    s_ch, t_ch = chunks(t["student_labels"]), chunks(t["teacher_labels"])
    both = s_ch.max().clamp(max=t_ch.max())
    head = nn.Linear(d_s, v_s, bias=False)
    t.update(
        sra_student_layers=[t["student_hidden"]] * pairs,
        sra_teacher_layers=[t["teacher_hidden"]] * pairs,
        student_salience=[torch.full((bsz, n), 1.0 / n)] * pairs,
        teacher_salience=[torch.full((bsz, m), 1.0 / m)] * pairs,
        chunk_spans=(s_ch.masked_fill(s_ch > both, -1), t_ch.masked_fill(t_ch > both, -1)),
        student_output_head=head,
        shared_vocab=(torch.arange(v_shared), torch.arange(v_shared) * 2),
    )
    return t


def make_projectors(
    d_s=6, d_t=10, dtype=torch.float32, seed=0, kq_hidden=None, span_pairs=0, sra_pairs=0, cma=True
):
    torch.manual_seed(seed)
    return Projectors(d_s, d_t, kq_hidden=kq_hidden, span_pairs=span_pairs, sra_pairs=sra_pairs, cma=cma).to(
        dtype
    )


def run(cfg, tensors, projectors):
    return compute_objective(cfg, ObjectiveInputs(**tensors), projectors)


def cma_of(tensors, projectors, std_scope="batch"):
    """``cross_model_attention`` on the tensors of :func:`make_tensors` (teacher embeddings by formal ids)."""
    from student_train.losses.cma import cross_model_attention, formal_ids

    t = tensors
    table = t["teacher_embeddings"]
    return cross_model_attention(
        projectors,
        student_hidden=t["student_hidden"],
        student_input_embeds=t["student_input_embeds"],
        student_target_embeds=t["student_target_embeds"],
        student_head=t["student_head"],
        student_mask=t["student_labels"].ne(-100),
        teacher_hidden=t["teacher_hidden"],
        teacher_input_embeds=table[formal_ids(t["teacher_input_ids"], t["teacher_labels"])],
        teacher_target_embeds=table[formal_ids(t["teacher_labels"], t["teacher_labels"])],
        teacher_mask=t["teacher_labels"].ne(-100),
        std_scope=std_scope,
    )
