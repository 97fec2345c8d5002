"""DSKD's cross-model attention and projectors (student_train/losses/cma.py)."""

from __future__ import annotations

import torch
from _losses_common import _soft_dtw_kernel, cma_of, make_projectors, make_tensors, reference_kernel, run  # noqa: F401

from student_train.losses.cma import formal_ids

# ------------------------------------------------------------------------------------------ CMA


def test_cma_shapes_and_row_sums():
    t = make_tensors()
    proj = make_projectors()
    s_mask = t["student_labels"].ne(-100)
    t_mask = t["teacher_labels"].ne(-100)
    out = cma_of(t, proj)
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
