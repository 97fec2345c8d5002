"""DSKD-CMA-GA's query/key adversarial term (student_train/losses/adversarial.py) against a float64 oracle
written from the DSKD-KQ code, and through the objective and the student job's checkpoint."""

from __future__ import annotations

import pytest
import torch
from _losses_common import make_projectors, make_tensors, run

from student_train.losses.adversarial import GradReverse, KQDiscriminator, kq_adversarial_loss
from student_train.losses.config import PRESETS, ObjectiveConfig


def _reference_kq_loss(disc: KQDiscriminator, k, q):
    """DSKD-KQ ``compute_kq_matching_loss`` (GAN branch) and ``discriminator``, verbatim in float64 with the
    module's weights; ``k`` = the student queries, ``q`` = the teacher keys (the reference's names), both
    already restricted to the counted positions. No gradient reversal: the caller checks signs."""
    W = {n: p.double() for n, p in disc.named_parameters()}

    def D(x):
        highway = x @ W["highway.weight"].T + W["highway.bias"]
        pred = torch.sigmoid(highway) * torch.relu(highway) + (1.0 - torch.sigmoid(highway)) * x
        hid = torch.nn.functional.leaky_relu(pred @ W["linear1.weight"].T + W["linear1.bias"], 0.1)
        return hid @ W["linear2.weight"].T + W["linear2.bias"]

    bce = torch.nn.BCEWithLogitsLoss()
    k_out_real = D(k)
    d_loss_real = bce(k_out_real, torch.ones_like(k_out_real))
    q_out_fake = D(q.detach())
    d_loss_fake = bce(q_out_fake, torch.zeros_like(q_out_fake))
    return (d_loss_real + d_loss_fake).mean()


def test_kq_loss_and_its_gradients_match_the_reference():
    torch.manual_seed(0)
    width = 8
    disc = KQDiscriminator(width, hidden=5).double().eval()  # eval: dropout off, the oracle has none
    queries = torch.randn(2, 4, width, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 3, width, dtype=torch.float64, requires_grad=True)
    q_mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    k_mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    ours = kq_adversarial_loss(disc, queries, keys, q_mask, k_mask)
    q_ref = queries.detach()[q_mask].clone().requires_grad_(True)
    ref = _reference_kq_loss(disc, q_ref, keys.detach()[k_mask])
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    ours.backward()
    ref_grads = torch.autograd.grad(ref, [q_ref, *disc.parameters()])
    # the query projector is pushed to fool the discriminator: its input gradient is reversed ...
    torch.testing.assert_close(queries.grad[q_mask], -ref_grads[0])
    assert queries.grad[~q_mask].abs().max() == 0  # rows outside the mask do not count
    assert keys.grad is None or keys.grad.abs().max() == 0  # the keys are constants
    # ... while the discriminator descends its own loss
    for p, g in zip(disc.parameters(), ref_grads[1:]):
        torch.testing.assert_close(p.grad, g)


def test_gradient_reversal_scales_by_minus_beta():
    x = torch.randn(3, requires_grad=True)
    GradReverse.apply(x, 0.5).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), -0.5))


def test_dskd_cma_ga_preset_adds_only_the_adversarial_term_to_dskd():
    ga, dskd = PRESETS["dskd_cma_ga"], PRESETS["dskd"]
    assert ga.lambda_ga == 1.0 and ga.ga_hidden == 768 and ga.ga_train_discriminator
    t = make_tensors()
    proj = make_projectors(kq_hidden=16).eval()
    out_ga = run(ga, t, proj)
    out_dskd = run(dskd, make_tensors(), make_projectors(kq_hidden=16).eval())
    for name in ("ce", "proj_ce", "kd_student", "kd_teacher"):
        torch.testing.assert_close(out_ga.terms[name], out_dskd.terms[name])
    assert out_ga.terms["kq_adversarial"] > 0 and out_dskd.terms["kq_adversarial"] == 0
    torch.testing.assert_close(
        out_ga.total.detach(), out_dskd.total.detach() + out_ga.terms["kq_adversarial"]
    )
    out_ga.total.backward()
    assert proj.kq_discriminator.linear2.weight.grad.abs().sum() > 0
    assert proj.query.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs Projectors"):
        run(ga, make_tensors(), make_projectors())
    with pytest.raises(ValueError, match="ga_hidden must be >= 1"):
        ObjectiveConfig.preset("dskd_cma_ga", ga_hidden=0)
