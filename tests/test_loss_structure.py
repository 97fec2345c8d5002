"""MTA's span structure term against a float64, loop-by-loop transcription of the reference code.

The oracle below follows voluyen/dwa_mta ``code/criterions/span_utils.py`` (cross-tokenizer version) line by
line: ``compute_token_weights``, the weighted span means, ``compute_hidden_span_loss`` and
``compute_overall_span_loss``; with the token weights averaged over the real query rows (the one documented
deviation, see student_train/losses/structure.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from student_train.losses.structure import span_structure_loss, token_weights

DT = torch.float64


def _oracle_token_weights(h, mask):
    L, D = h.shape
    q = [h[i] / (torch.std(h[i]) + 1e-5) for i in range(L)]
    w, rows = torch.zeros(L, dtype=DT), 0
    for i in range(L):
        if not mask[i]:
            continue
        rows += 1
        scores = [
            -math.inf if (not mask[j] or i == j) else float(q[i] @ q[j]) / math.sqrt(D) for j in range(L)
        ]
        top = max(scores)
        if top == -math.inf:
            continue
        ex = [0.0 if s == -math.inf else math.exp(s - top) for s in scores]
        for j in range(L):
            w[j] += ex[j] / sum(ex)
    return w / max(rows, 1)


def _oracle_pair(hs_all, ht_all, s_mask, t_mask, spans, weight, bias, certainty):
    per_sample = []
    for b in range(len(spans)):
        hs, ht = hs_all[b].to(DT), ht_all[b].to(DT)
        ws, wt = _oracle_token_weights(hs, s_mask[b]), _oracle_token_weights(ht, t_mask[b])
        S, T, W = [], [], []
        for s_idx, t_idx in spans[b]:
            s_repr = sum(ws[i] * hs[i] for i in s_idx) / max(float(sum(ws[i] for i in s_idx)), 1e-5)
            t_sum = float(sum(wt[i] for i in t_idx))
            t_repr = sum(wt[i] * ht[i] for i in t_idx) / max(t_sum, 1e-5)
            w_span = t_sum if certainty is None else float(sum(certainty[b][i] for i in t_idx)) / len(t_idx)
            s_proj = weight @ s_repr + bias
            S.append(s_proj / max(float(s_proj.norm()), 1e-12))
            T.append(t_repr / max(float(t_repr.norm()), 1e-12))
            W.append(w_span)
        per_sample.append((S, T, W))
    num = den = 0.0
    for S, T, W in per_sample:
        for i in range(len(S)):
            for j in range(len(S)):
                if i != j:
                    d = float(S[i] @ S[j]) - float(T[i] @ T[j])
                    num += d * d * W[i] * W[j]
                    den += W[i] * W[j]
    return num / max(den, 1e-5)


def _spans_of(s_ids, t_ids):
    out = []
    for b in range(s_ids.shape[0]):
        k = int(max(s_ids[b].max(), t_ids[b].max())) + 1
        out.append(
            [
                ((s_ids[b] == j).nonzero().flatten().tolist(), (t_ids[b] == j).nonzero().flatten().tolist())
                for j in range(k)
            ]
        )
    return out


def _case(seed=0, n=9, m=12, d_s=5, d_t=7, pairs=3):
    g = torch.Generator().manual_seed(seed)
    s_valid = torch.tensor([[True] * 9, [True] * 7 + [False] * 2])
    t_valid = torch.tensor([[True] * 12, [True] * 9 + [False] * 3])
    # span ids shared by both sides; -1 = no span; sample 1 has fewer spans than sample 0
    word_s = torch.tensor([[0, 0, 1, 2, -1, 3, 4, 4, 5], [-1, 0, 1, 1, 2, 3, -1, -1, -1]])
    word_t = torch.tensor([[0, 1, 1, 1, 2, -1, 3, 4, 5, 5, 5, -1], [0, 0, 1, 2, 2, 3, -1, 3, -1, -1, -1, -1]])
    phrase_s = torch.tensor([[0, 0, 0, 1, -1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 1, -1, -1, -1]])
    phrase_t = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, -1], [0, 0, 0, 1, 1, 1, 1, 1, -1, -1, -1, -1]])
    hs = [torch.randn(2, n, d_s, generator=g, dtype=DT, requires_grad=True) for _ in range(pairs)]
    ht = [torch.randn(2, m, d_t, generator=g, dtype=DT) for _ in range(pairs)]
    projs = nn.ModuleList(nn.Linear(d_s, d_t).to(DT) for _ in range(pairs))
    cert = torch.rand(2, m, generator=g, dtype=DT)
    return s_valid, t_valid, (word_s, word_t), (phrase_s, phrase_t), hs, ht, projs, cert


@pytest.mark.parametrize("word_pairs", [0, 1, 3])
@pytest.mark.parametrize("with_certainty", [False, True])
def test_span_structure_matches_the_reference_transcription(word_pairs, with_certainty):
    s_valid, t_valid, words, phrases, hs, ht, projs, cert = _case()
    certainty = cert if with_certainty else None
    got = span_structure_loss(
        student_layers=hs,
        teacher_layers=ht,
        projectors=projs,
        student_valid=s_valid,
        teacher_valid=t_valid,
        word_spans=words,
        phrase_spans=phrases,
        word_pairs=word_pairs,
        teacher_certainty=certainty,
    )
    want = 0.0
    for k in range(len(hs)):
        s_ids, t_ids = words if k < word_pairs else phrases
        lin = projs[k]
        want += _oracle_pair(
            [hs[k][b].detach() for b in range(2)],
            [ht[k][b] for b in range(2)],
            s_valid,
            t_valid,
            _spans_of(s_ids, t_ids),
            lin.weight.detach(),
            lin.bias.detach(),
            certainty,
        )
    want /= len(hs)
    assert got.dtype == DT
    assert float(got.detach()) == pytest.approx(want, rel=1e-10, abs=1e-12)
    # gradients reach the student layers and the projectors, not the (detached) token weights' inputs only
    got.backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in hs)
    assert all(p.weight.grad is not None for p in projs)


def test_span_structure_gradient_is_the_float64_finite_difference(monkeypatch):
    """The token weights are detached (reference): hold them at their value and the rest is exact."""
    import student_train.losses.structure as structure

    s_valid, t_valid, words, phrases, hs, ht, projs, _ = _case(seed=3, pairs=2)
    frozen = {}
    real = structure.token_weights

    def held(h, valid):
        key = (h.data_ptr(), tuple(h.shape))  # gradcheck perturbs the inputs in place
        return frozen.setdefault(key, real(h, valid))

    monkeypatch.setattr(structure, "token_weights", held)

    def f(h0, h1):
        return span_structure_loss(
            student_layers=[h0, h1],
            teacher_layers=ht,
            projectors=projs,
            student_valid=s_valid,
            teacher_valid=t_valid,
            word_spans=words,
            phrase_spans=phrases,
            word_pairs=1,
        )

    f(hs[0], hs[1])  # fixes every layer's weights at this point
    assert torch.autograd.gradcheck(f, (hs[0], hs[1]), eps=1e-6, atol=1e-6)


def test_identical_geometry_gives_zero_and_padding_does_not_matter():
    s_valid, t_valid, words, phrases, hs, ht, projs, _ = _case(seed=5, pairs=1, d_s=7, d_t=7)
    with torch.no_grad():
        projs[0].weight.copy_(torch.eye(7, dtype=DT))
        projs[0].bias.zero_()
    same = span_structure_loss(
        student_layers=[ht[0].clone()[:, :12]],
        teacher_layers=ht,
        projectors=projs,
        student_valid=t_valid,
        teacher_valid=t_valid,
        word_spans=(words[1], words[1]),
        phrase_spans=(phrases[1], phrases[1]),
        word_pairs=0,
    )
    assert float(same) == pytest.approx(0.0, abs=1e-12)
    # extra pad positions (any values) change nothing: weights average over real rows only
    kw = dict(projectors=projs, word_pairs=0, word_spans=words)
    base = span_structure_loss(
        student_layers=[hs[0]], teacher_layers=ht, student_valid=s_valid, teacher_valid=t_valid,
        phrase_spans=phrases, **kw,
    )  # fmt: skip
    pad = lambda x, k, v: torch.cat([x, torch.full((*x.shape[:1], k, *x.shape[2:]), v, dtype=x.dtype)], 1)  # noqa: E731
    padded = span_structure_loss(
        student_layers=[pad(hs[0].detach(), 3, 7.0)], teacher_layers=[pad(ht[0], 2, -3.0)],
        student_valid=pad(s_valid, 3, False), teacher_valid=pad(t_valid, 2, False),
        phrase_spans=(pad(phrases[0], 3, -1), pad(phrases[1], 2, -1)), **kw,
    )  # fmt: skip
    assert float(padded) == pytest.approx(float(base), rel=1e-12)


def test_token_weights_are_a_distribution_over_real_keys():
    h = torch.randn(2, 6, 4, dtype=DT)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    w = token_weights(h, valid)
    assert torch.allclose(w.sum(1), torch.ones(2, dtype=DT))
    assert (w[1, 4:] == 0).all()
