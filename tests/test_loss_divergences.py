"""Divergences and the chunked teacher-space terms (student_train/losses/divergences.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from _losses_common import _soft_dtw_kernel, make_projectors, make_tensors, reference_kernel, run  # noqa: F401
from hypothesis import given, settings
from hypothesis import strategies as st

from student_train.losses.divergences import (
    SLAB_BUDGET_BYTES,
    auto_chunk_size,
    entropy_from_logits,
    forward_kl_from_logits,
    sampled_teacher_kl,
    skewed_reverse_kl_from_logits,
    teacher_entropy_and_kl,
)
from student_train.losses.objective import (
    PRESETS,
    ObjectiveInputs,
    compute_objective,
)

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


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_chunked_teacher_terms_equal_unchunked(chunk, tau):
    g = torch.Generator().manual_seed(4)
    n, d, v = 7, 5, 31
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
    # without the entropy (the caller has the cached column): the same KL and gradient, no entropy
    none, kl2 = teacher_entropy_and_kl(h_t, head, s2t, temperature=tau, chunk_size=chunk or n, entropy=False)
    assert none is None
    torch.testing.assert_close(kl2, ref_kl)
    (g3,) = torch.autograd.grad((w * kl2).sum(), s2t)
    torch.testing.assert_close(g3, g2)
    with pytest.raises(ValueError, match="nothing to compute"):
        teacher_entropy_and_kl(h_t, head, None, entropy=False)


def test_auto_chunk_size_keeps_the_slabs_within_the_head_and_the_budget():
    # SmolLM2 49k x 576, Qwen2.5-1.5B 152k x 1536, Qwen2.5-7B 152k x 3584, Mistral-7B 32k x 4096, Gemma 262k x 640;
    # tiny and huge heads hit the bounds
    shapes = [
        (49152, 576),
        (151936, 1536),
        (151936, 3584),
        (32000, 4096),
        (262144, 640),
        (10, 8),
        (10**8, 4096),
    ]
    assert [auto_chunk_size(v, d) for v, d in shapes] == [128, 256, 256, 1024, 128, 16, 16]
    for v, d in [(1000, 64), (32000, 4096), (49152, 576), (151936, 1536), (151936, 3584), (256000, 2304)]:
        c = auto_chunk_size(v, d)
        slabs = 4 * c * v * 4
        assert (slabs <= v * d * 4 and slabs <= SLAB_BUDGET_BYTES) or c == 16
        doubled = 4 * (2 * c) * v * 4  # the largest power of two that fits
        assert c == 1024 or doubled > v * d * 4 or doubled > SLAB_BUDGET_BYTES


def test_objective_invariant_to_teacher_chunk_size():
    t = make_tensors()
    proj = make_projectors()
    totals = [
        run(dataclasses.replace(PRESETS["dwa_kd"], teacher_chunk_size=c), t, proj).total
        for c in (1, 3, 10_000, 0)
    ]
    for other in totals[1:]:
        torch.testing.assert_close(totals[0], other)


@pytest.mark.parametrize("preset", ["dwa_kd", "dskd_w_ew"])
def test_cached_teacher_entropy_equals_the_rebuilt_one(preset):
    """eq (14)'s weights from the cache's entropy column: the same objective and gradients as rebuilding the
    entropy from hidden x head (an fp32 cache), and the column is really what is read."""
    t = make_tensors(seed=3)
    proj = make_projectors()
    cached = dataclasses.replace(PRESETS[preset], teacher_entropy="cache")
    rebuilt = dataclasses.replace(PRESETS[preset], teacher_entropy="head")
    a, b = run(cached, t, proj), run(rebuilt, t, proj)
    torch.testing.assert_close(a.total, b.total, rtol=1e-6, atol=1e-6)
    ga = torch.autograd.grad(a.total, t["student_hidden"])[0]
    gb = torch.autograd.grad(b.total, t["student_hidden"])[0]
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
    moved = dict(t, teacher_entropy=t["teacher_entropy"].flip(-1))
    assert not torch.allclose(run(cached, moved, proj).terms["kd_teacher"], a.terms["kd_teacher"])
    torch.testing.assert_close(run(rebuilt, moved, proj).total, b.total)  # 'head' never reads the column
    with pytest.raises(ValueError, match="teacher_entropy"):
        compute_objective(cached, ObjectiveInputs(**dict(t, teacher_entropy=None)), proj)
    with pytest.raises(ValueError, match="teacher_entropy must have shape"):
        compute_objective(
            cached, ObjectiveInputs(**dict(t, teacher_entropy=t["teacher_entropy"][:, 1:])), proj
        )
    bad = t["teacher_entropy"].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher_entropy"):
        compute_objective(cached, ObjectiveInputs(**dict(t, teacher_entropy=bad)), proj)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sampled_teacher_kl_is_exact_when_the_sample_is_the_vocabulary(tau):
    g = torch.Generator().manual_seed(8)
    n, d, v, k = 9, 6, 37, 5
    h_t = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    head = torch.randn(v, d, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    s2t = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    topk = (h_t @ head.T + bias).topk(k, -1).indices
    _, exact = teacher_entropy_and_kl(h_t, head, s2t, temperature=tau, teacher_bias=bias)
    (ge,) = torch.autograd.grad(exact.sum(), s2t)
    exact = exact.detach()
    for samples in (v, 10 * v):  # every id drawn: the estimate is the exact KL, value and gradient
        approx = sampled_teacher_kl(h_t, head, s2t, topk, temperature=tau, samples=samples, teacher_bias=bias)
        torch.testing.assert_close(approx, exact)
        (ga,) = torch.autograd.grad(approx.sum(), s2t)
        torch.testing.assert_close(ga, ge)
    assert torch.autograd.gradcheck(
        lambda x: sampled_teacher_kl(h_t, head, x, topk, temperature=tau, samples=11, seed=3), (s2t,)
    )
    # fewer draws: an estimate, a function of the seed only
    a = sampled_teacher_kl(h_t, head, s2t, topk, temperature=tau, samples=11, seed=1).detach()
    assert torch.equal(a, sampled_teacher_kl(h_t, head, s2t, topk, temperature=tau, samples=11, seed=1))
    assert not torch.equal(a, sampled_teacher_kl(h_t, head, s2t, topk, temperature=tau, samples=11, seed=2))
    assert not torch.allclose(a, exact)
    # rows in checkpointed chunks: the same value and gradient for any chunk size
    one = sampled_teacher_kl(h_t, head, s2t, topk, temperature=tau, samples=11, seed=1, chunk_size=2)
    (g_one,) = torch.autograd.grad(one.sum(), s2t)
    whole = sampled_teacher_kl(h_t, head, s2t, topk, temperature=tau, samples=11, seed=1, chunk_size=1000)
    (g_whole,) = torch.autograd.grad(whole.sum(), s2t)
    torch.testing.assert_close(one, whole)
    torch.testing.assert_close(g_one, g_whole)
    with pytest.raises(ValueError, match="samples"):
        sampled_teacher_kl(h_t, head, s2t, topk, samples=0)


def test_sampled_teacher_kl_in_the_objective():
    """teacher_kl='sampled' is opt-in; with a sample as large as the head it gives the exact objective."""
    t = make_tensors(seed=5)
    proj = make_projectors()
    v_t = t["teacher_head"].shape[0]
    exact = run(PRESETS["dwa_kd"], t, proj)
    full = run(dataclasses.replace(PRESETS["dwa_kd"], teacher_kl="sampled", teacher_kl_samples=v_t), t, proj)
    torch.testing.assert_close(full.total, exact.total)
    few = dataclasses.replace(PRESETS["dwa_kd"], teacher_kl="sampled", teacher_kl_samples=3)
    a, b = run(few, t, proj), run(few, t, proj)
    assert torch.equal(a.total, b.total) and not torch.allclose(a.total, exact.total)
    assert PRESETS["dwa_kd"].teacher_kl == "exact"
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        compute_objective(few, ObjectiveInputs(**dict(t, teacher_topk_ids=None)), proj)
    bad = t["teacher_topk_ids"].clone()
    bad[0, 0, 0] = v_t
    with pytest.raises(ValueError, match="teacher_topk_ids has ids"):
        compute_objective(few, ObjectiveInputs(**dict(t, teacher_topk_ids=bad)), proj)
    twice = t["teacher_topk_ids"].clone()
    twice[1, 2, 1] = twice[1, 2, 0]
    with pytest.raises(ValueError, match="repeats an id"):
        compute_objective(few, ObjectiveInputs(**dict(t, teacher_topk_ids=twice)), proj)
    with pytest.raises(ValueError, match="teacher_entropy='cache'"):
        dataclasses.replace(few, teacher_entropy="head")


def test_chunked_teacher_kl_gradcheck():
    g = torch.Generator().manual_seed(5)
    h_t = torch.randn(5, 3, generator=g, dtype=torch.float64)
    head = torch.randn(7, 3, generator=g, dtype=torch.float64)
    s2t = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: teacher_entropy_and_kl(h_t, head, x, temperature=2.0, chunk_size=2)[1], (s2t,)
    )
