"""SRA's terms against a float64, loop-by-loop transcription of the reference (sonho4ng/SRAv2 d7c7263).

The oracle (``_cos`` .. ``sra_kd_loss``) follows ``run_llm.py`` ``knowledge_distillation_loss`` (l.383-462),
``distillation/utils.py`` ``get_span_hidden_states`` (l.6-43) and ``distillation/loss.py`` line by line, with
the reference's constants (pooling clamp, cosine and normalisation eps); it takes the salience rows as given
(the query-position choice is the documented deviation, student_train/losses/span_repr.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from student_train.losses.span_repr import sra_terms

DT = torch.float64

DEFAULT_CFG = dict(
    p=1.0,
    layer_weights=(1.0, 1.0, 1.0),
    span_der_coef=2.0,
    score_coef=50.0,
    kl_temperature=2.0,
    use_span=True,
    use_der=True,
    use_score=True,
    use_kl=True,
    pool_clamp=1e-5,
    cos_eps=1e-5,
    norm_eps=1e-5,
    pair_clamp=1e-5,
)


def _cos(x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    # torch>=2 F.cosine_similarity: (x / max(|x|, eps)) . (y / max(|y|, eps))
    nx = max(float(x.norm()), eps)
    ny = max(float(y.norm()), eps)
    return float((x / nx * (y / ny)).sum())


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / max(float(x.norm()), eps)  # F.normalize(x, dim=-1, eps)


def centre_of_mass(h: torch.Tensor, row: torch.Tensor, token_idx: Sequence[int], clamp: float):
    """One span, one layer.  utils.py l.30-38:
    a = row / row.sum()                     (normalised over ALL N positions: prompt, response, pad)
    mass = sum_{t in span} a_t              (-> span_weights, "raw")
    com  = sum_{t in span} a_t h_t / max(mass, 1e-5)
    """
    a = row.to(DT) / row.to(DT).sum()
    mass = 0.0
    acc = torch.zeros(h.shape[-1], dtype=DT)
    for t in token_idx:
        mass += float(a[t])
        acc += float(a[t]) * h[t].to(DT)
    com = acc / max(mass, clamp)
    return com, mass


# ----------------------------------------------------------------------------------------------
# 3. Loop-based oracle of the kd loss
# ----------------------------------------------------------------------------------------------
def sra_kd_loss(
    samples: list[dict],
    proj: list[torch.Tensor],
    s_lm_head: torch.Tensor = None,
    t_lm_head: torch.Tensor = None,
    s_ids: torch.Tensor = None,
    t_ids: torch.Tensor = None,
    cfg: dict = None,
) -> dict[str, float]:
    """samples[b] = {
         't_hidden': list over L of [N_t, D_t]   teacher hidden_states[i] for i in teacher_layers_mapping
         't_row'   : list over L of [N_t]        Sigma_heads teacher attn row (salience_row_from_attentions)
         's_hidden': list over L of [N_s, D_s]   student hidden_states[i] for i in student layers (unprojected)
         's_row'   : list over L of [N_s]        student's OWN attention row (student CoM uses student attention)
         'spans'   : list of (student_token_idx_list, teacher_token_idx_list)
       }
       proj[li]: [D_s, D_t] (student @ W, no bias; one per layer pair)             run_llm.py l.160-170, 197-198
       s_lm_head: [V_s, D_s], t_lm_head: [V_t, D_t] (no bias: OPT / Qwen2 heads have none)
       s_ids, t_ids: LongTensor [V_shared] from get_token_mapping (exact vocab-string match)
    Returns the per-term values with the reference reductions (every term = mean over batch of a
    per-sample SUM over spans).
    """
    c = dict(DEFAULT_CFG)
    if cfg:
        c.update(cfg)
    B = len(samples)
    L = len(samples[0]["t_hidden"])
    lw = [float(w) for w in c["layer_weights"]][:L]
    lw = [w / sum(lw) for w in lw]  # l.280-281
    p = max(c["p"], 1e-5)  # l.273

    span_tot = der_tot = score_tot = kl_tot = 0.0
    for smp in samples:
        spans = smp["spans"]
        S = len(spans)
        # ---- pooled states per layer (teacher: teacher attention; student: student attention) ----
        t_com, t_mass, s_com, s_proj = [], [], [], []
        for li in range(L):
            tc, tm, sc = [], [], []
            for s_idx, t_idx in spans:
                com_t, m_t = centre_of_mass(smp["t_hidden"][li], smp["t_row"][li], t_idx, c["pool_clamp"])
                com_s, _ = centre_of_mass(smp["s_hidden"][li], smp["s_row"][li], s_idx, c["pool_clamp"])
                tc.append(com_t)
                tm.append(m_t)
                sc.append(com_s)
            t_com.append(tc)
            t_mass.append(tm)
            s_com.append(sc)
            s_proj.append([x @ proj[li].to(DT) for x in sc])  # decode l.197-198 (pool, then project)

        # ---- span weights: ^p then normalised over spans, per layer (l.392-398) ----
        w_norm = []
        for li in range(L):
            powd = [m**p for m in t_mass[li]]
            z = sum(powd)  # no clamp in reference: 0 spans -> NaN
            w_norm.append([x / z for x in powd])

        # ---- span loss (l.407-416, loss.py l.51-57): sum_l lw_l * sum_k w_k (1 - cos) ----
        if c["use_span"]:
            for li in range(L):
                acc = 0.0
                for k in range(S):
                    acc += w_norm[li][k] * (1.0 - _cos(s_proj[li][k], t_com[li][k], c["cos_eps"]))
                span_tot += lw[li] * acc

        # ---- derivative loss (l.421-424, loss.py l.20-34) ----
        # NOTE: uses teacher_outputs.span_weights = RAW masses (not ^p, not renormalised), of layer l+1;
        # differences of PROJECTED student states (different projector per layer).
        if c["use_der"] and L > 1:
            acc = 0.0
            for li in range(L - 1):
                for k in range(S):
                    ds = s_proj[li + 1][k] - s_proj[li][k]
                    dt = t_com[li + 1][k] - t_com[li][k]
                    acc += t_mass[li + 1][k] * (1.0 - _cos(ds, dt, c["cos_eps"]))
            der_tot += acc / (L - 1)

        # ---- geometric (score) loss (l.400-403, 437-447) ----
        # student side: pooled LAST listed student layer, UNPROJECTED (outputs.embeddings, l.196)
        # teacher side: pooled LAST listed teacher layer; pair weights from normalised last-layer weights
        if c["use_score"]:
            wl = w_norm[L - 1]
            pw = [[(wl[j] * wl[k] if j != k else 0.0) for k in range(S)] for j in range(S)]
            z = max(sum(sum(r) for r in pw), c["pair_clamp"])
            sn = [_normalize(s_com[L - 1][k], c["norm_eps"]) for k in range(S)]
            tn = [_normalize(t_com[L - 1][k], c["norm_eps"]) for k in range(S)]
            acc = 0.0
            for j in range(S):
                for k in range(S):
                    d = float(sn[j] @ sn[k]) - float(tn[j] @ tn[k])
                    acc += (pw[j][k] / z) * d * d
            score_tot += acc

        # ---- aligned span logit KD (l.453-458, 341-355) ----
        # logits of the span CoM of the last listed layer (final-norm output when it is the last layer),
        # restricted to the shared vocabulary, KL(teacher || student) at T, summed over vocab and spans.
        if c["use_kl"]:
            T = c["kl_temperature"]
            Ws = s_lm_head.to(DT)[s_ids]
            Wt = t_lm_head.to(DT)[t_ids]
            acc = 0.0
            for k in range(S):
                zs = Ws @ s_com[L - 1][k]
                zt = Wt @ t_com[L - 1][k]
                if float(zs.abs().sum()) == 0.0:  # mask l.348 (padded spans only)
                    continue
                logq = torch.log_softmax(zs / T, dim=-1)
                pt = torch.softmax(zt / T, dim=-1)
                kl = torch.where(pt > 0, pt * (torch.log(pt) - logq), torch.zeros_like(pt)).sum()
                acc += float(kl)  # no T^2 factor (l.353 commented)
            kl_tot += acc

    out = dict(
        span_loss=span_tot / B,  # cosine_token_weight_loss: .sum(-1).mean() over B
        der_loss=der_tot / B,  # derivative_loss: .sum(-1).mean() over B, then /(L-1)
        score_loss=score_tot / B,  # (score * pair_weights).sum() / B
        kl_loss=kl_tot / B,
    )  # (loss * mask).sum() / B
    out["kd_loss"] = (
        c["span_der_coef"] * (out["span_loss"] + out["der_loss"])
        + c["score_coef"] * out["score_loss"]
        + out["kl_loss"]
    )
    return out


def _case(seed=0, pairs=3, n=(9, 7), m=(11, 8), d_s=5, d_t=6, v_s=13, v_t=17):
    g = torch.Generator().manual_seed(seed)
    B, N, M = len(n), max(n), max(m)
    # spans: student/teacher token ranges over the "response" (sample 1 has fewer spans)
    spans = [
        [([2, 3], [3]), ([4], [4, 5, 6]), ([5, 6, 7], [7, 8]), ([8], [9, 10])],
        [([1], [2]), ([2, 3, 4], [3, 4]), ([5, 6], [5, 6, 7])],
    ]
    s_ids = torch.full((B, N), -1)
    t_ids = torch.full((B, M), -1)
    for b, sp in enumerate(spans):
        for k, (si, ti) in enumerate(sp):
            s_ids[b, si] = k
            t_ids[b, ti] = k
    hs = [torch.randn(B, N, d_s, generator=g, dtype=DT, requires_grad=True) for _ in range(pairs)]
    ht = [torch.randn(B, M, d_t, generator=g, dtype=DT) for _ in range(pairs)]

    def rows(length, lens):
        r = torch.rand(B, length, generator=g, dtype=DT) + 0.05
        for b, ln in enumerate(lens):
            r[b, ln:] = 0
        return r / r.sum(-1, keepdim=True)

    a_s = [rows(N, n) for _ in range(pairs)]
    a_t = [rows(M, m) for _ in range(pairs)]
    a_t[0][0, 4] = 1e-9  # a span of tiny mass: the 1e-5 clamp matters
    projs = nn.ModuleList(nn.Linear(d_s, d_t, bias=False).to(DT) for _ in range(pairs))
    s_head = nn.Linear(d_s, v_s, bias=False).to(DT)
    t_head = torch.randn(v_t, d_t, generator=g, dtype=DT)
    shared = (torch.tensor([0, 2, 3, 5, 8, 11]), torch.tensor([1, 0, 7, 4, 16, 9]))
    return dict(
        spans=spans, s_ids=s_ids, t_ids=t_ids, hs=hs, ht=ht, a_s=a_s, a_t=a_t, projs=projs,
        s_head=s_head, t_head=t_head, shared=shared, n=n, m=m,
    )  # fmt: skip


def _ours(c, **kw):
    return sra_terms(
        student_layers=c["hs"], teacher_layers=c["ht"], student_salience=c["a_s"], teacher_salience=c["a_t"],
        student_spans=c["s_ids"], teacher_spans=c["t_ids"], projectors=c["projs"], student_head=c["s_head"],
        teacher_head=c["t_head"], shared_vocab=c["shared"], **kw,
    )  # fmt: skip


def _oracle(c, **cfg):
    samples = []
    for b in range(len(c["spans"])):
        samples.append(
            dict(
                t_hidden=[h[b].detach() for h in c["ht"]],
                t_row=[a[b] for a in c["a_t"]],
                s_hidden=[h[b].detach() for h in c["hs"]],
                s_row=[a[b] for a in c["a_s"]],
                spans=c["spans"][b],
            )
        )
    proj = [p.weight.detach().T for p in c["projs"]]  # the reference's [d_s, d_t] parameter
    return sra_kd_loss(
        samples, proj, c["s_head"].weight.detach(), c["t_head"], c["shared"][0], c["shared"][1],
        {"layer_weights": (1.0,) * len(c["hs"]), **cfg},
    )  # fmt: skip


@pytest.mark.parametrize("pairs", [1, 3])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_sra_terms_match_the_reference_transcription(pairs, power):
    c = _case(pairs=pairs)
    got = _ours(c, power=power)
    want = _oracle(c, p=power)
    for ours, ref in (("sra_span", "span_loss"), ("sra_delta", "der_loss"), ("sra_geometry", "score_loss"),
                      ("sra_logit", "kl_loss")):  # fmt: skip
        assert float(got[ours].detach()) == pytest.approx(want[ref], rel=1e-9, abs=1e-12), ours
    if pairs == 1:
        assert float(got["sra_delta"]) == 0.0
    total = 2.0 * (got["sra_span"] + got["sra_delta"]) + 50.0 * got["sra_geometry"] + got["sra_logit"]
    assert float(total.detach()) == pytest.approx(want["kd_loss"], rel=1e-9)
    total.backward()  # gradients reach the student layers, projectors and the student head
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in c["hs"])
    assert all(p.weight.grad is not None for p in c["projs"]) and c["s_head"].weight.grad is not None


def test_sra_gradient_is_the_float64_finite_difference():
    c = _case(pairs=2)

    def f(h0, h1):
        c2 = dict(c, hs=[h0, h1])
        t = _ours(c2)
        return 2.0 * (t["sra_span"] + t["sra_delta"]) + 50.0 * t["sra_geometry"] + t["sra_logit"]

    assert torch.autograd.gradcheck(f, tuple(c["hs"]), eps=1e-6, atol=1e-6)


def test_identical_student_gives_zero_and_empty_batches_are_finite():
    c = _case(pairs=2, d_s=6, d_t=6, v_s=17, v_t=17)
    with torch.no_grad():
        for p in c["projs"]:
            p.weight.copy_(torch.eye(6, dtype=DT))
        c["s_head"].weight.copy_(c["t_head"])
    c.update(hs=[h.clone() for h in c["ht"]], a_s=c["a_t"], s_ids=c["t_ids"], shared=(torch.arange(17),) * 2)
    got = _ours(c)
    for name in ("sra_span", "sra_delta", "sra_geometry", "sra_logit"):
        assert float(got[name]) == pytest.approx(0.0, abs=1e-12), name
    c["s_ids"] = torch.full_like(c["s_ids"], -1)
    c["t_ids"] = torch.full_like(c["t_ids"], -1)
    empty = _ours(c)
    assert all(float(v) == 0.0 for v in empty.values())


def test_shared_vocab_keeps_only_ids_both_heads_have_rows_for(gpt2_tokenizer, mistral_tokenizer, caplog):
    from student_train.align import shared_vocab

    s_ids, t_ids = shared_vocab(mistral_tokenizer, gpt2_tokenizer)
    assert len(s_ids) == len(t_ids) > 0 and (s_ids[1:] > s_ids[:-1]).all()
    s_vocab, t_vocab = gpt2_tokenizer.get_vocab(), mistral_tokenizer.get_vocab()
    inv_s = {i: tok for tok, i in s_vocab.items()}
    assert all(t_vocab[inv_s[int(s)]] == int(t) for s, t in zip(s_ids, t_ids))
    # heads smaller than the tokenizers (added tokens past the head): those pairs leave, and the log says so
    s_rows, t_rows = int(s_ids[len(s_ids) // 2]), int(t_ids.max())
    with caplog.at_level("WARNING", logger="student_train.align"):
        s_cut, t_cut = shared_vocab(
            mistral_tokenizer, gpt2_tokenizer, student_rows=s_rows, teacher_rows=t_rows
        )
    keep = (s_ids < s_rows) & (t_ids < t_rows)
    assert (s_cut == s_ids[keep]).all() and (t_cut == t_ids[keep]).all() and 0 < len(s_cut) < len(s_ids)
    assert f"{len(s_ids) - len(s_cut)} of {len(s_ids)} shared token strings" in caplog.text
    with pytest.raises(ValueError, match="share no token string that both output heads"):
        shared_vocab(mistral_tokenizer, gpt2_tokenizer, student_rows=int(s_ids.min()))
