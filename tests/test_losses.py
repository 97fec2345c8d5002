"""Property and oracle tests for the DSKD / DWA-KD objective (student_train/losses)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import student_train.kernels as kernels
from student_train.kernels.reference import soft_dtw_reference
from student_train.losses.cma import Projectors, cross_model_attention, formal_ids
from student_train.losses.divergences import (
    entropy_from_logits,
    forward_kl_from_logits,
    skewed_reverse_kl_from_logits,
    teacher_entropy_and_kl,
)
from student_train.losses.dwa import (
    band_penalty,
    dtw_loss,
    gather_positions,
    soft_dtw_divergence_batch,
    student_token_weights,
    teacher_token_weights,
)
from student_train.losses.objective import (
    PRESETS,
    TERM_NAMES,
    ObjectiveConfig,
    ObjectiveInputs,
    compute_objective,
    compute_terms,
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
    for k in ("student_logits", "student_hidden", "student_input_embeds", "student_target_embeds"):
        t[k].requires_grad_(True)
    return t


def make_projectors(d_s=6, d_t=10, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Projectors(d_s, d_t).to(dtype)


def run(cfg, tensors, projectors):
    return compute_objective(cfg, ObjectiveInputs(**tensors), projectors)


# ---------------------------------------------------------------------------------- divergences


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000), vocab=st.integers(2, 40), scale=st.floats(0.1, 20.0), tau=st.floats(0.5, 4)
)
def test_divergences_zero_for_identical_and_nonnegative(seed, vocab, scale, tau):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(5, vocab, generator=g) * scale
    b = torch.randn(5, vocab, generator=g) * scale
    for fn in (forward_kl_from_logits, skewed_reverse_kl_from_logits):
        assert torch.allclose(fn(a, a, temperature=tau), torch.zeros(5), atol=1e-5)
        assert (fn(a, b, temperature=tau) >= -1e-6).all()
    # teacher-space KL through the chunked helper: q^{s2t} = p^T when hhat = teacher hidden
    h = torch.randn(5, 4, generator=g)
    head = torch.randn(vocab, 4, generator=g) * scale
    _, kl_same = teacher_entropy_and_kl(h, head, h.clone(), temperature=tau, chunk_size=2)
    _, kl_diff = teacher_entropy_and_kl(h, head, torch.randn(5, 4, generator=g), temperature=tau)
    assert torch.allclose(kl_same, torch.zeros(5), atol=1e-5)
    assert (kl_diff >= -1e-6).all()
    ent = entropy_from_logits(a)
    assert (ent >= -1e-6).all() and (ent <= math.log(vocab) + 1e-5).all()


def test_teacher_kl_applies_the_head_bias_exactly():
    """A teacher whose LM head has a bias: every rebuilt logit includes it (float64 oracle + gradcheck)."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(6, 5, generator=g, dtype=torch.float64)
    head = torch.randn(11, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(11, generator=g, dtype=torch.float64) * 3
    s2t = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tau = 2.0
    ent, kl = teacher_entropy_and_kl(h, head, s2t, temperature=tau, chunk_size=4, teacher_bias=bias)
    zt, zs = h @ head.T + bias, s2t @ head.T + bias
    torch.testing.assert_close(ent, entropy_from_logits(zt))
    torch.testing.assert_close(kl, forward_kl_from_logits(zt, zs, temperature=tau))
    _, kl_nobias = teacher_entropy_and_kl(h, head, s2t, temperature=tau, chunk_size=4)
    assert (kl - kl_nobias).abs().max() > 1e-3  # the bias matters here, so dropping it would be caught
    torch.autograd.gradcheck(
        lambda x: teacher_entropy_and_kl(h, head, x, temperature=tau, chunk_size=4, teacher_bias=bias)[1],
        (s2t,),
    )
    ent_only, _ = teacher_entropy_and_kl(h, head, teacher_bias=bias)
    torch.testing.assert_close(ent_only, ent)


def test_forward_kl_matches_torch_kl_div():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, 17, generator=g), torch.randn(3, 4, 17, generator=g)
    tau = 2.0
    ref = F.kl_div(
        F.log_softmax(b / tau, -1), F.log_softmax(a / tau, -1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(forward_kl_from_logits(a, b, temperature=tau), ref)


def test_skewed_reverse_kl_matches_formula():
    g = torch.Generator().manual_seed(2)
    q_logits, p_logits = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    p, q = torch.softmax(p_logits / 2, -1), torch.softmax(q_logits / 2, -1)
    ref = (p * (p.log() - (0.9 * q + 0.1 * p).log())).sum(-1)
    out = skewed_reverse_kl_from_logits(q_logits, p_logits, temperature=2.0, skew=0.1)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("which", ["fkl", "srkl", "entropy"])
def test_masked_positions_contribute_exactly_zero(which):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, 13, generator=g)
    b = torch.randn(2, 5, 13, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)

    def loss(a_, b_):
        if which == "fkl":
            out = forward_kl_from_logits(a_, b_, mask, temperature=2.0)
        elif which == "srkl":
            out = skewed_reverse_kl_from_logits(a_, b_, mask, temperature=2.0)
        else:
            out = entropy_from_logits(b_, mask)
        return out

    out1 = loss(a, b)
    assert (out1[~mask] == 0).all()
    (g1,) = torch.autograd.grad(out1.sum(), b)
    a2, b2 = a.clone(), b.detach().clone()
    a2[~mask] = 1e4 * torch.randn_like(a2[~mask])
    b2[~mask] = -3e4
    b2.requires_grad_(True)
    out2 = loss(a2, b2)
    (g2,) = torch.autograd.grad(out2.sum(), b2)
    assert torch.equal(out1, out2)
    assert torch.equal(g1, g2)
    assert (g1[~mask] == 0).all()


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_chunked_teacher_terms_equal_unchunked(chunk):
    g = torch.Generator().manual_seed(4)
    n, d, v, tau = 7, 5, 31, 2.0
    h_t = torch.randn(n, d, generator=g, dtype=torch.bfloat16)  # any float dtype is accepted
    head = torch.randn(v, d, generator=g)
    s2t = torch.randn(n, d, generator=g, requires_grad=True)
    ent, kl = teacher_entropy_and_kl(h_t, head, s2t, temperature=tau, chunk_size=chunk or n)
    zt = h_t.float() @ head.T
    ref_ent = -(torch.softmax(zt, -1) * torch.log_softmax(zt, -1)).sum(-1)
    ref_kl = forward_kl_from_logits(zt, s2t @ head.T, temperature=tau)
    torch.testing.assert_close(ent, ref_ent)
    torch.testing.assert_close(kl, ref_kl)
    w = torch.rand(n, generator=g)
    (g1,) = torch.autograd.grad((w * kl).sum(), s2t)
    (g2,) = torch.autograd.grad((w * ref_kl).sum(), s2t)
    torch.testing.assert_close(g1, g2)
    ent_only, none = teacher_entropy_and_kl(h_t, head, None, chunk_size=chunk or n)
    assert none is None
    torch.testing.assert_close(ent_only, ref_ent)


def test_objective_invariant_to_teacher_chunk_size():
    t = make_tensors()
    proj = make_projectors()
    totals = [
        run(dataclasses.replace(PRESETS["dwa_kd"], teacher_chunk_size=c), t, proj).total
        for c in (1, 3, 10_000)
    ]
    torch.testing.assert_close(totals[0], totals[1])
    torch.testing.assert_close(totals[0], totals[2])


def test_chunked_teacher_kl_gradcheck():
    g = torch.Generator().manual_seed(5)
    h_t = torch.randn(5, 3, generator=g, dtype=torch.float64)
    head = torch.randn(7, 3, generator=g, dtype=torch.float64)
    s2t = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: teacher_entropy_and_kl(h_t, head, x, temperature=2.0, chunk_size=2)[1], (s2t,)
    )


# ------------------------------------------------------------------------------------------ CMA


def test_cma_shapes_and_row_sums():
    t = make_tensors()
    proj = make_projectors()
    s_mask = t["student_labels"].ne(-100)
    t_mask = t["teacher_labels"].ne(-100)
    table = t["teacher_embeddings"]
    out = cross_model_attention(
        proj,
        student_hidden=t["student_hidden"],
        student_input_embeds=t["student_input_embeds"],
        student_target_embeds=t["student_target_embeds"],
        student_head=t["student_head"],
        student_mask=s_mask,
        teacher_hidden=t["teacher_hidden"],
        teacher_input_embeds=table[formal_ids(t["teacher_input_ids"], t["teacher_labels"])],
        teacher_target_embeds=table[formal_ids(t["teacher_labels"], t["teacher_labels"])],
        teacher_mask=t_mask,
    )
    bsz, n, m = 2, 9, 11
    assert out.scores.shape == out.a_t2s.shape == (bsz, n, m)
    assert out.a_s2t.shape == (bsz, m, n)
    assert out.hhat_t2s.shape == (bsz, n, 6) and out.hhat_s2t.shape == (bsz, m, 10)
    assert out.z_t2s.shape == (int(s_mask.sum()), 23)
    assert out.a_t2s.dtype == torch.float32
    for b in range(bsz):
        rows = out.a_t2s[b][s_mask[b]]
        torch.testing.assert_close(rows[:, t_mask[b]].sum(-1), torch.ones(len(rows)))
        assert rows[:, ~t_mask[b]].abs().max() == 0
        cols = out.a_s2t[b][t_mask[b]]
        torch.testing.assert_close(cols[:, s_mask[b]].sum(-1), torch.ones(len(cols)))
    # formal ids: non-response -> 0
    lab = torch.tensor([[-100, 5, 6, -100]])
    assert formal_ids(torch.tensor([[7, 8, 9, 10]]), lab).tolist() == [[0, 8, 9, 0]]
    assert formal_ids(lab, lab).tolist() == [[0, 5, 6, 0]]


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


# ----------------------------------------------------------------------------------- objective


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if not c.logit_enabled))
def test_presets_build_and_run(name):
    """The DSKD family (the logit-level baselines: tests/test_baselines.py)."""
    cfg = ObjectiveConfig.preset(name)
    assert cfg.method == name
    t = make_tensors()
    proj = make_projectors()
    out = run(cfg, t, proj)
    assert out.total.dim() == 0 and torch.isfinite(out.total)
    assert set(out.terms) == set(TERM_NAMES)
    out.total.backward()
    assert torch.isfinite(t["student_logits"].grad).all()
    if cfg.lambda_dtw == 0:
        assert out.terms["dtw_hidden"] == 0 and out.terms["dtw_embed"] == 0
    else:
        assert out.terms["dtw_hidden"] != 0 and int(out.counts["dtw_pairs"]) == 2
    if cfg.lambda_kd == 0:
        assert all(out.terms[k] == 0 for k in ("proj_ce", "kd_student", "kd_teacher"))
    expected = (
        cfg.lambda_ce * out.terms["ce"]
        + cfg.lambda_kd * (out.terms["proj_ce"] + out.terms["kd_student"] + out.terms["kd_teacher"])
        + cfg.lambda_dtw * (out.terms["dtw_hidden"] + out.terms["dtw_embed"])
    )
    assert out.terms["logit_kd"] == 0
    torch.testing.assert_close(out.total.detach(), expected)
    assert int(out.counts["student_tokens"]) == int(t["student_labels"].ne(-100).sum())


def test_preset_switches():
    dskd, dwa = PRESETS["dskd"], PRESETS["dwa_kd"]
    assert (dskd.lambda_ce, dskd.lambda_kd, dskd.lambda_dtw, dskd.kd_temperature) == (0.5, 0.5, 0.0, 2.0)
    assert dskd.accuracy_mask and not dskd.entropy_weighting and not dskd.gate
    assert (dwa.lambda_ce, dwa.lambda_kd, dwa.lambda_dtw) == (0.5, 0.5, 0.2)
    assert dwa.gate and dwa.entropy_weighting and not dwa.accuracy_mask and dwa.band_enabled
    assert dwa.student_divergence == "forward_kl"
    assert (dwa.band_base_width, dwa.band_entropy_coef, dwa.band_center_alpha, dwa.band_penalty) == (
        5.0,
        2.0,
        0.7,
        1.0,
    )
    assert PRESETS["dskd_w_ew"].entropy_weighting and not PRESETS["dskd_w_ew"].dtw_enabled
    assert PRESETS["dskd_w_dtw"].dtw_enabled and not PRESETS["dskd_w_dtw"].band_enabled
    assert PRESETS["dskd_w_bdtw"].band_enabled and not PRESETS["dskd_w_bdtw"].entropy_weighting
    assert not PRESETS["dwa_kd_wo_gate"].gate and PRESETS["dwa_kd_wo_gate"].entropy_weighting
    cfg = ObjectiveConfig.from_dict({"preset": "dskd", "kd_temperature": 1.0})
    assert cfg.accuracy_mask and cfg.kd_temperature == 1.0


def _dense_token_oracle(cfg, t, proj):
    """Token-level terms recomputed densely, per sample, with full teacher logits (no chunking)."""
    s_mask = t["student_labels"].ne(-100)
    t_mask = t["teacher_labels"].ne(-100)
    table = t["teacher_embeddings"]
    cma = cross_model_attention(
        proj,
        student_hidden=t["student_hidden"],
        student_input_embeds=t["student_input_embeds"],
        student_target_embeds=t["student_target_embeds"],
        student_head=t["student_head"],
        student_mask=s_mask,
        teacher_hidden=t["teacher_hidden"],
        teacher_input_embeds=table[formal_ids(t["teacher_input_ids"], t["teacher_labels"])],
        teacher_target_embeds=table[formal_ids(t["teacher_labels"], t["teacher_labels"])],
        teacher_mask=t_mask,
        std_scope=cfg.cma_std_scope,
    )
    tau = cfg.kd_temperature
    z_t2s_full = cma.hhat_t2s @ t["student_head"].T
    z_t = t["teacher_hidden"] @ t["teacher_head"].T
    z_s2t = cma.hhat_s2t @ t["teacher_head"].T
    ce = proj_ce = kd_s = kd_t = 0.0
    for b in range(s_mask.shape[0]):
        sm, tm = s_mask[b], t_mask[b]
        y = t["student_labels"][b][sm]
        zs, zq = t["student_logits"][b][sm], z_t2s_full[b][sm]
        ce = ce + F.cross_entropy(zs, y, reduction="sum")
        proj_ce = proj_ce + F.cross_entropy(zq, y, reduction="sum")
        p_q = torch.softmax(zq.detach() / tau, -1)
        kl_s = (p_q * (torch.log_softmax(zq.detach() / tau, -1) - torch.log_softmax(zs / tau, -1))).sum(-1)
        w = torch.ones(len(y))
        if cfg.accuracy_mask:
            w = w * zq.argmax(-1).eq(y).float()
        if cfg.entropy_weighting:
            h = -(torch.softmax(zs, -1) * torch.log_softmax(zs, -1)).sum(-1).detach()
            w = w * len(y) * h / (h.sum() + 1e-9)
        if cfg.gate:
            w = w * torch.softmax(zq, -1).max(-1).values.detach()
        kd_s = kd_s + (w * kl_s).sum()
        zt, zqt = z_t[b][tm], z_s2t[b][tm]
        pt = torch.softmax(zt / tau, -1)
        kl_t = (pt * (torch.log_softmax(zt / tau, -1) - torch.log_softmax(zqt / tau, -1))).sum(-1)
        wt = torch.ones(len(zt))
        if cfg.entropy_weighting:
            ht = -(torch.softmax(zt, -1) * torch.log_softmax(zt, -1)).sum(-1)
            c = (1 - ht / math.log(zt.shape[-1])).clamp(0, 1)
            wt = len(zt) * c / (c.sum() + 1e-9)
        kd_t = kd_t + (wt * kl_t).sum()
    return {"ce": ce, "proj_ce": proj_ce, "kd_student": kd_s, "kd_teacher": kd_t}


@pytest.mark.parametrize("name", ["dskd", "dskd_w_ew", "dwa_kd_wo_gate"])
def test_token_terms_match_dense_oracle(name):
    cfg = dataclasses.replace(PRESETS[name], lambda_dtw=0.0, teacher_chunk_size=2)
    t = make_tensors(seed=11)
    proj = make_projectors()
    if cfg.accuracy_mask:
        # make the projected-teacher argmax hit the label at some positions
        with torch.no_grad():
            proj.t2s.bias.mul_(0)
    terms, _ = compute_terms(cfg, ObjectiveInputs(**t), proj)
    ref = _dense_token_oracle(cfg, t, proj)
    for k, v in ref.items():
        torch.testing.assert_close(terms[k], v, msg=k)


def test_masked_student_positions_do_not_change_objective():
    cfg = PRESETS["dwa_kd"]
    proj = make_projectors()
    t1 = make_tensors(seed=12)
    s_mask = t1["student_labels"].ne(-100)
    out1 = run(cfg, t1, proj)
    grads1 = torch.autograd.grad(out1.total, [t1["student_logits"], t1["student_hidden"]])
    t2 = make_tensors(seed=12)
    with torch.no_grad():
        for k in ("student_logits", "student_hidden", "student_input_embeds", "student_target_embeds"):
            t2[k][~s_mask] = 50.0 * torch.randn_like(t2[k][~s_mask])
    out2 = run(cfg, t2, proj)
    grads2 = torch.autograd.grad(out2.total, [t2["student_logits"], t2["student_hidden"]])
    torch.testing.assert_close(out1.total, out2.total, rtol=1e-6, atol=1e-6)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-6)
        assert (g1[~s_mask] == 0).all()


@pytest.mark.parametrize("name", ["sft", "dskd", "dwa_kd"])
def test_all_masked_batch_returns_zero(name):
    t = make_tensors()
    t["student_labels"] = torch.full_like(t["student_labels"], -100)
    t["teacher_labels"] = torch.full_like(t["teacher_labels"], -100)
    proj = make_projectors()
    out = run(PRESETS[name], t, proj)
    assert out.total.item() == 0.0
    out.total.backward()
    for k in ("student_logits", "student_hidden"):
        grad = t[k].grad
        assert grad is None or (torch.isfinite(grad).all() and (grad == 0).all())
    for p in proj.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_gradient_routes():
    """METHOD.md §2.10 plus the DTW routes; heads and teacher tensors never receive gradient."""
    cfg = dataclasses.replace(PRESETS["dwa_kd"], accuracy_mask=False)
    t = make_tensors(seed=13)
    for k in ("student_head", "teacher_hidden", "teacher_head", "teacher_embeddings"):
        t[k].requires_grad_(True)
    proj = make_projectors()
    terms, _ = compute_terms(cfg, ObjectiveInputs(**t), proj)
    leaves = {
        "logits": t["student_logits"],
        "hidden": t["student_hidden"],
        "in_emb": t["student_input_embeds"],
        "tg_emb": t["student_target_embeds"],
        "query": proj.query.weight,
        "t2s": proj.t2s.weight,
        "s2t": proj.s2t.weight,
        "dtw_embed": proj.dtw_embed_t2s.weight,
        "W_S": t["student_head"],
        "H_T": t["teacher_hidden"],
        "W_T": t["teacher_head"],
        "E_T": t["teacher_embeddings"],
    }
    expected = {
        "ce": {"logits"},
        "proj_ce": {"query", "t2s"},
        "kd_student": {"logits"},
        "kd_teacher": {"query", "s2t", "hidden"},
        "dtw_hidden": {"hidden", "t2s"},
        "dtw_embed": {"tg_emb", "dtw_embed"},
    }
    names = list(leaves)
    for term, want in expected.items():
        grads = torch.autograd.grad(
            terms[term], [leaves[k] for k in names], allow_unused=True, retain_graph=True
        )
        got = {k for k, g in zip(names, grads) if g is not None and g.abs().sum() > 0}
        assert got == want, (term, got)


def test_gradcheck_token_objective_float64():
    dt = torch.float64
    proj = make_projectors(d_s=3, d_t=4, dtype=dt)
    small = dict(
        bsz=2,
        n=5,
        m=6,
        v_s=7,
        v_t=9,
        d_s=3,
        d_t=4,
        dtype=dt,
        prompt_s=(1, 2),
        prompt_t=(2, 1),
        pad_s=(0, 1),
        pad_t=(1, 0),
    )
    t = make_tensors(seed=14, **small)

    def total(cfg, **override):
        fields = {**t, **override}
        return compute_objective(cfg, ObjectiveInputs(**fields), proj).total

    # full DWA-KD token-level objective w.r.t. student hidden (weights depend only on detached quantities)
    dwa = dataclasses.replace(PRESETS["dwa_kd"], lambda_dtw=0.0, teacher_chunk_size=3)
    assert torch.autograd.gradcheck(
        lambda h: total(dwa, student_hidden=h), (t["student_hidden"],), fast_mode=True
    )
    # logits path (forward KL and skewed reverse KL), gate only: w^S does not depend on the student logits
    for div in ("forward_kl", "skewed_reverse_kl"):
        cfg = dataclasses.replace(dwa, entropy_weighting=False, student_divergence=div)
        assert torch.autograd.gradcheck(
            lambda z, h, c=cfg: total(c, student_logits=z, student_hidden=h),
            (t["student_logits"], t["student_hidden"]),
        )
    # a projector weight. s2t feeds only kd_teacher; the query also moves the detached L^S target and the
    # gate, so a finite-difference check on it would (rightly) disagree with the stop-gradient routes.
    w0 = proj.s2t.weight.detach().clone().requires_grad_(True)

    def with_s2t(w):
        p2 = make_projectors(d_s=3, d_t=4, dtype=dt)
        p2.load_state_dict(proj.state_dict())
        del p2.s2t.weight
        p2.s2t.weight = w
        return compute_objective(dwa, ObjectiveInputs(**t), p2).total

    assert torch.autograd.gradcheck(with_s2t, (w0,), fast_mode=True)


def test_gradcheck_dtw_plumbing_float64(reference_kernel):
    dt = torch.float64
    proj = make_projectors(d_s=3, d_t=4, dtype=dt)
    t = make_tensors(
        seed=15,
        bsz=2,
        n=5,
        m=5,
        v_s=7,
        v_t=9,
        d_s=3,
        d_t=4,
        dtype=dt,
        prompt_s=(1, 2),
        prompt_t=(2, 1),
        pad_s=(0, 1),
        pad_t=(1, 0),
    )
    cfg = dataclasses.replace(PRESETS["dwa_kd"], lambda_ce=0.0, lambda_kd=0.0, band_penalty=0.3)
    assert cfg.needs_cma  # the band needs the attention even without token KD

    def total(h, e):
        return compute_objective(
            cfg, ObjectiveInputs(**{**t, "student_hidden": h, "student_target_embeds": e}), proj
        ).total

    assert torch.autograd.gradcheck(total, (t["student_hidden"], t["student_target_embeds"]), fast_mode=True)


def test_detach_teacher_self_term():
    t = make_tensors(seed=16)
    proj = make_projectors()
    base = dataclasses.replace(PRESETS["dwa_kd"], lambda_ce=0.0, lambda_kd=0.0)
    grads = []
    for detach in (False, True):
        cfg = dataclasses.replace(base, detach_teacher_self_term=detach)
        out = run(cfg, t, proj)
        grads.append(torch.autograd.grad(out.total, proj.dtw_embed_t2s.weight)[0])
    assert not torch.allclose(grads[0], grads[1])


# ---------------------------------------------------------------------------------------- errors


def test_config_range_errors():
    with pytest.raises(ValueError, match="lambda_kd"):
        ObjectiveConfig(lambda_kd=-1)
    with pytest.raises(ValueError, match="kd_temperature"):
        ObjectiveConfig(kd_temperature=0)
    with pytest.raises(ValueError, match="student_divergence"):
        ObjectiveConfig(student_divergence="js")
    with pytest.raises(ValueError, match="dtw_positions"):
        ObjectiveConfig(dtw_positions="all")
    with pytest.raises(ValueError, match="band_center_alpha"):
        ObjectiveConfig(band_center_alpha=1.5)
    with pytest.raises(ValueError, match="at least one"):
        ObjectiveConfig(lambda_ce=0, lambda_kd=0, lambda_dtw=0)
    with pytest.raises(ValueError, match="unknown objective config keys"):
        ObjectiveConfig.from_dict({"lambda_xx": 1})
    with pytest.raises(ValueError, match="unknown objective preset"):
        ObjectiveConfig.preset("dwa")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("student_hidden", torch.zeros(2, 8, 6), "student_hidden"),
        ("student_labels", torch.zeros(2, 9), "integer"),
        ("teacher_hidden", torch.zeros(3, 11, 10), "batch size"),
        ("teacher_head", torch.zeros(29, 7), "teacher_head"),
        ("teacher_labels", torch.zeros(2, 10, dtype=torch.long), "teacher_labels"),
        ("student_head", torch.zeros(23, 5), "student_head"),
        ("student_input_embeds", None, "needs ObjectiveInputs fields"),
    ],
)
def test_shape_errors(field, value, match):
    t = make_tensors()
    t[field] = value
    with pytest.raises(ValueError, match=match):
        run(PRESETS["dwa_kd"], t, make_projectors())


def test_value_errors():
    proj = make_projectors()
    t = make_tensors()
    with torch.no_grad():
        t["teacher_hidden"][0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="teacher_hidden contains 1 NaN"):
        run(PRESETS["dwa_kd"], t, proj)
    t = make_tensors()
    with torch.no_grad():
        t["student_logits"][1, 2, 0] = float("inf")
    with pytest.raises(ValueError, match="student_logits contains"):
        run(PRESETS["sft"], t, proj)
    t = make_tensors()
    t["student_labels"][0, 5] = 23
    with pytest.raises(ValueError, match="outside"):
        run(PRESETS["sft"], t, proj)
    t = make_tensors()
    with pytest.raises(ValueError, match="projectors were built"):
        run(PRESETS["dskd"], t, make_projectors(d_s=5, d_t=10))
    with pytest.raises(ValueError, match="needs Projectors"):
        run(PRESETS["dskd"], t, None)
    with pytest.raises(ValueError, match="dtw_embed"):
        torch.manual_seed(0)
        run(PRESETS["dwa_kd"], t, Projectors(6, 10, dtw_embed=False))
    # SFT needs nothing from the teacher
    sft = ObjectiveInputs(student_logits=t["student_logits"], student_labels=t["student_labels"])
    assert torch.isfinite(compute_objective(PRESETS["sft"], sft).total)


# ------------------------------------------------------------------------- tiny real HF models


def test_end_to_end_with_tiny_hf_models():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    student = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
        )
    )
    teacher = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    ).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def batch(vocab, length, prompts, lengths):
        seq = torch.randint(1, vocab, (2, length + 1))
        inp, lab = seq[:, :-1].clone(), seq[:, 1:].clone()
        attn = torch.ones(2, length, dtype=torch.long)
        for b in range(2):
            lab[b, : prompts[b] - 1] = -100
            lab[b, lengths[b] :] = -100
            inp[b, lengths[b] :] = 0
            attn[b, lengths[b] :] = 0
        return inp, lab, attn

    s_in, s_lab, s_att = batch(128, 14, (4, 6), (14, 11))
    t_in, t_lab, t_att = batch(100, 16, (5, 6), (16, 12))
    with torch.no_grad():
        t_out = teacher(input_ids=t_in, attention_mask=t_att, output_hidden_states=True)
    s_out = student(input_ids=s_in, attention_mask=s_att, output_hidden_states=True)
    emb = student.get_input_embeddings()
    inputs = ObjectiveInputs(
        student_logits=s_out.logits,
        student_labels=s_lab,
        student_hidden=s_out.hidden_states[-1],
        student_input_embeds=emb(formal_ids(s_in, s_lab)),
        student_target_embeds=emb(formal_ids(s_lab, s_lab)),
        student_head=student.get_output_embeddings().weight,
        teacher_hidden=t_out.hidden_states[-1],
        teacher_input_ids=t_in,
        teacher_labels=t_lab,
        teacher_head=teacher.get_output_embeddings().weight,
        teacher_embeddings=teacher.get_input_embeddings().weight,
    )
    # exact teacher logits from hidden x head (the cache contract)
    t_mask = t_lab.ne(-100)
    ent, _ = teacher_entropy_and_kl(t_out.hidden_states[-1][t_mask], inputs.teacher_head, chunk_size=4)
    torch.testing.assert_close(ent, entropy_from_logits(t_out.logits[t_mask]), rtol=1e-5, atol=1e-5)

    proj = Projectors(32, 48)
    out = compute_objective(PRESETS["dwa_kd"], inputs, proj)
    assert torch.isfinite(out.total)
    (out.total / out.counts["student_tokens"]).backward()
    for name, p in list(student.named_parameters()) + [("proj." + k, v) for k, v in proj.named_parameters()]:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())
    assert all(v > 0 for k, v in out.terms.items() if k != "logit_kd"), out.terms


# ------------------------------------------------------------------ micro-batch and padding invariance


def _slice(t, b):
    return {
        k: (
            v[b : b + 1]
            if v.dim() >= 2 and k not in ("student_head", "teacher_head", "teacher_embeddings")
            else v
        )
        for k, v in t.items()
    }


def _pad_teacher(t, extra):
    """Append ``extra`` pad rows to the teacher side (zeros, as the trainer pads cached hidden states)."""
    t = dict(t)
    bsz, m, d = t["teacher_hidden"].shape
    t["teacher_hidden"] = torch.cat([t["teacher_hidden"], torch.zeros(bsz, extra, d)], 1)
    t["teacher_input_ids"] = torch.cat([t["teacher_input_ids"], torch.zeros(bsz, extra, dtype=torch.long)], 1)
    t["teacher_labels"] = torch.cat([t["teacher_labels"], torch.full((bsz, extra), -100)], 1)
    mask = t.get("teacher_attention_mask", torch.ones(bsz, m, dtype=torch.long))
    t["teacher_attention_mask"] = torch.cat([mask, torch.zeros(bsz, extra, dtype=torch.long)], 1)
    return t


def test_sample_std_scope_is_invariant_to_grouping_and_padding():
    """cma_std_scope='sample': the batch objective is the sum of per-sample objectives, padding changes nothing."""
    t = make_tensors(seed=21, pad_t=(0, 0))
    proj = make_projectors()
    cfg = dataclasses.replace(PRESETS["dwa_kd"], cma_std_scope="sample")
    whole = run(cfg, t, proj).total
    parts = sum(run(cfg, _slice(t, b), proj).total for b in range(2))
    torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(cfg, _pad_teacher(t, 4), proj).total, whole, rtol=1e-5, atol=1e-5)
    # the reference 'batch' scope depends on both (that is why 'sample' is the default)
    ref = dataclasses.replace(cfg, cma_std_scope="batch")
    assert not torch.allclose(run(ref, _pad_teacher(t, 4), proj).total, run(ref, t, proj).total)
