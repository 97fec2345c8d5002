"""The objective: presets, dense oracles, gradients, errors, invariances (student_train/losses/objective.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from _losses_common import (  # noqa: F401  (fixtures)
    _soft_dtw_kernel,
    add_spans,
    add_sra,
    cma_of,
    make_projectors,
    make_tensors,
    reference_kernel,
    run,
)

from student_train.losses.cma import Projectors, formal_ids
from student_train.losses.config import TERMS
from student_train.losses.divergences import (
    entropy_from_logits,
    teacher_entropy_and_kl,
)
from student_train.losses.objective import (
    PRESETS,
    TERM_NAMES,
    ObjectiveConfig,
    ObjectiveInputs,
    compute_objective,
    compute_terms,
)

# ----------------------------------------------------------------------------------- objective


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if not c.logit_enabled))
def test_presets_build_and_run(name):
    """The DSKD family (the logit-level baselines: tests/test_baselines.py)."""
    cfg = ObjectiveConfig.preset(name)
    assert cfg.method == name
    t = make_tensors()
    pairs = len(cfg.span_teacher_layers) if cfg.span_enabled else 0
    if pairs:
        add_spans(t, pairs)
    sra_pairs = len(cfg.sra_teacher_layers) if cfg.sra_enabled else 0
    if sra_pairs:
        add_sra(t, sra_pairs)
    proj = make_projectors(
        kq_hidden=cfg.ga_hidden if cfg.ga_enabled else None,
        span_pairs=pairs,
        sra_pairs=sra_pairs,
        cma=cfg.cma_projectors,
    )
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
        + cfg.lambda_ga * out.terms["kq_adversarial"]
        + cfg.lambda_span * out.terms["span_structure"]
        + cfg.lambda_sra * (out.terms["sra_span"] + out.terms["sra_delta"])
        + cfg.lambda_sra_geometry * out.terms["sra_geometry"]
        + cfg.lambda_sra_logit * out.terms["sra_logit"]
    )
    assert (out.terms["kq_adversarial"] > 0) == cfg.ga_enabled
    assert (out.terms["span_structure"] > 0) == cfg.span_enabled
    assert (out.terms["sra_span"] > 0 and out.terms["sra_logit"] > 0) == cfg.sra_enabled
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
    cma = cma_of(t, proj, cfg.cma_std_scope)
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


@pytest.mark.usefixtures("reference_kernel")
def test_gradcheck_dtw_plumbing_float64():
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
    # SRA's shared vocabulary: both id lists in range of their heads, the same length
    sra = ObjectiveConfig.preset("sra")
    pairs = len(sra.sra_teacher_layers)
    sra_proj = make_projectors(sra_pairs=pairs)
    assert torch.isfinite(run(sra, add_sra(make_tensors(), pairs), sra_proj).total)
    for bad, match in [
        ((torch.tensor([0, 23]), torch.tensor([0, 1])), r"shared_vocab\[0\] \(student\) has ids"),
        ((torch.tensor([0, 1]), torch.tensor([0, 29])), r"shared_vocab\[1\] \(teacher\) has ids"),
        ((torch.tensor([0, 1]), torch.tensor([0])), "shared_vocab must be"),
    ]:
        t = add_sra(make_tensors(), pairs)
        t["shared_vocab"] = bad
        with pytest.raises(ValueError, match=match):
            run(sra, t, sra_proj)
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
        teacher_entropy=entropy_from_logits(t_out.logits),
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
    weighted = {k for k, w in TERMS.items() if getattr(PRESETS["dwa_kd"], w) > 0}
    assert weighted == set(TERM_NAMES) - {"logit_kd", "kq_adversarial", "span_structure"} - {
        t for t in TERM_NAMES if t.startswith("sra_")
    }
    assert all(out.terms[k] > 0 for k in weighted) and all(
        out.terms[k] == 0 for k in TERMS if k not in weighted
    )


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
    t["teacher_entropy"] = torch.cat([t["teacher_entropy"], torch.zeros(bsz, extra)], 1)
    k = t["teacher_topk_ids"].shape[-1]
    t["teacher_topk_ids"] = torch.cat(
        [t["teacher_topk_ids"], torch.zeros(bsz, extra, k, dtype=torch.long)], 1
    )
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
