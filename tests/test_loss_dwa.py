"""DWA-KD's token weights, band and Soft-DTW terms (student_train/losses/dwa.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from _losses_common import _soft_dtw_kernel, make_projectors, make_tensors, reference_kernel, run  # noqa: F401

from student_train.kernels.reference import soft_dtw_reference
from student_train.losses.dwa import (
    band_penalty,
    dtw_loss,
    gather_positions,
    soft_dtw_divergence_batch,
    student_token_weights,
    teacher_token_weights,
)

# -------------------------------------------------------------------------------------- weights


def test_token_weights_sum_to_counts():
    g = torch.Generator().manual_seed(6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    ent = torch.rand(3, 5, generator=g) * 3
    gate = torch.rand(3, 5, generator=g)
    counts = mask.sum(-1).float()
    w_ent = student_token_weights(mask, entropy=ent)
    torch.testing.assert_close(w_ent.sum(-1), counts)
    assert (w_ent[~mask] == 0).all()
    w_gate = student_token_weights(mask, entropy=ent, gate=gate)  # A2 default: sum <= S
    assert (w_gate.sum(-1) <= counts + 1e-5).all()
    torch.testing.assert_close(w_gate, w_ent * gate * mask)
    w_prod = student_token_weights(mask, entropy=ent, gate=gate, normalisation="product")
    torch.testing.assert_close(w_prod.sum(-1), counts)
    torch.testing.assert_close(student_token_weights(mask, gate=gate), gate * mask)
    torch.testing.assert_close(student_token_weights(mask), mask.float())
    h_t = torch.rand(3, 5, generator=g) * math.log(50)
    w_t = teacher_token_weights(h_t, mask, vocab_size=50)
    torch.testing.assert_close(w_t.sum(-1), counts)
    assert (w_t >= 0).all() and (w_t[~mask] == 0).all()
    # certainty: lower entropy -> larger weight
    w_t2 = teacher_token_weights(torch.tensor([[0.1, 1.0, 2.0]]), torch.ones(1, 3, dtype=torch.bool), 50)
    assert w_t2[0, 0] > w_t2[0, 1] > w_t2[0, 2]


# ------------------------------------------------------------------------------------------ DTW


def test_band_linear_centre_penalises_only_outside():
    s = t_len = 9
    attn = torch.rand(1, s, t_len)
    lengths = torch.tensor([s])
    pen = band_penalty(attn, lengths, lengths, alpha=0.0, base_width=2.0, entropy_coef=0.0, penalty=1.5)
    i = torch.arange(s).view(-1, 1)
    k = torch.arange(t_len).view(1, -1)
    expected = ((k - i).abs() > 2).float() * 1.5  # |k - c| == w is inside (A9)
    torch.testing.assert_close(pen[0], expected)
    # uniform attention: centre (T-1)/2, entropy log T -> width w0 + beta log T
    uni = torch.full((1, s, t_len), 1.0 / t_len)
    pen_u = band_penalty(uni, lengths, lengths, alpha=1.0, base_width=1.0, entropy_coef=1.0, penalty=1.0)
    width = 1.0 + math.log(t_len)
    expected_u = ((k.float() - (t_len - 1) / 2).abs() > width).float().expand(s, -1)
    torch.testing.assert_close(pen_u[0], expected_u)
    # unequal lengths: linear centre i*T/S, padded cells get no penalty
    pen2 = band_penalty(
        torch.rand(1, 6, 8),
        torch.tensor([4]),
        torch.tensor([6]),
        alpha=0.0,
        base_width=0.5,
        entropy_coef=0.0,
        penalty=1.0,
    )
    c = torch.arange(4).view(-1, 1) * 6 / 4
    torch.testing.assert_close(pen2[0, :4, :6], ((torch.arange(6).view(1, -1) - c).abs() > 0.5).float())
    assert pen2[0, 4:].abs().sum() == 0 and pen2[0, :, 6:].abs().sum() == 0


def test_divergence_of_identical_sequences_is_zero_and_padding_is_neutral():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 4, generator=g)
    lens = torch.tensor([6, 4])
    x[1, 4:] = 0
    vals, skipped = soft_dtw_divergence_batch(x, x.clone(), lens, lens, gamma=2.0)
    torch.testing.assert_close(vals, torch.zeros(2), atol=1e-5, rtol=0)
    assert skipped == 0
    # batched with padding == one pair at a time
    y = torch.randn(2, 5, 4, generator=g)
    ly = torch.tensor([3, 5])
    y[0, 3:] = 0
    batched, _ = soft_dtw_divergence_batch(x, y, lens, ly, gamma=2.0)
    for b in range(2):
        single, _ = soft_dtw_divergence_batch(
            x[b : b + 1, : lens[b]], y[b : b + 1, : ly[b]], lens[b : b + 1], ly[b : b + 1], gamma=2.0
        )
        torch.testing.assert_close(batched[b : b + 1], single, atol=1e-5, rtol=1e-5)
    # oracle: direct float64 divergence of the unpadded pair
    cost = lambda a, c: (1 - F.normalize(a, dim=-1) @ F.normalize(c, dim=-1).T).clamp(0, 2)[None]  # noqa: E731
    xb, yb = x[1, :4].double(), y[1].double()
    ref = (
        soft_dtw_reference(cost(xb, yb), 2.0)
        - 0.5 * (soft_dtw_reference(cost(xb, xb), 2.0) + soft_dtw_reference(cost(yb, yb), 2.0))
    ).float()
    torch.testing.assert_close(batched[1:2], ref, atol=1e-4, rtol=1e-4)
    # an empty side contributes 0
    vals0, _ = soft_dtw_divergence_batch(x, y, torch.tensor([0, 4]), ly, gamma=2.0)
    assert vals0[0] == 0 and vals0[1] == batched[1]


def test_dtw_positions_response_vs_reference_rows():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    idx, lengths = gather_positions(mask, "response")
    assert lengths.tolist() == [3, 2]
    assert idx.tolist() == [[2, 3, 4], [0, 1, 0]]
    idx_ref, _ = gather_positions(mask, "ref_first_n")
    assert idx_ref.tolist() == [[0, 1, 2], [0, 1, 0]]


def test_dtw_loss_identical_projected_sequences_unbanded_is_zero():
    g = torch.Generator().manual_seed(8)
    h = torch.randn(2, 7, 4, generator=g)
    s_mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    # the teacher has the same response content at different offsets
    t_h = torch.zeros(2, 8, 4)
    t_mask = torch.zeros(2, 8, dtype=torch.bool)
    for b in range(2):
        rows = h[b][s_mask[b]]
        t_h[b, 1 : 1 + len(rows)] = rows
        t_mask[b, 1 : 1 + len(rows)] = True
    res = dtw_loss(
        student_hidden=h,
        student_target_embeds=h,
        teacher_hidden_proj=t_h,
        teacher_target_embeds_proj=t_h,
        student_mask=s_mask,
        teacher_mask=t_mask,
        a_t2s=None,
        gamma=2.0,
    )
    assert abs(float(res.hidden)) < 1e-4 and abs(float(res.embed)) < 1e-4
    assert int(res.pairs) == 2 and int(res.skipped) == 0
    # the reference's first-n rows see the prompt rows instead and do not match
    res_ref = dtw_loss(
        student_hidden=h,
        student_target_embeds=h,
        teacher_hidden_proj=t_h,
        teacher_target_embeds_proj=None,
        student_mask=s_mask,
        teacher_mask=t_mask,
        a_t2s=None,
        gamma=2.0,
        positions="ref_first_n",
    )
    assert abs(float(res_ref.hidden)) > 1e-3
