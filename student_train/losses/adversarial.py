"""DSKD-CMA-GA: adversarial matching of the cross-model attention's queries and keys.

DSKD's queries (projected student index embeddings) and keys (std-normalised teacher index embeddings)
come from different distributions. A discriminator is trained to tell them apart and, through a gradient
reversal layer, the query projector to fool it, in ONE optimizer step (no alternating updates). Written
from ``stellaevat/DSKD-KQ`` (``code/criterions/dual_space_kd_with_cma_plus_kq_matching.py``
``compute_kq_matching_loss`` and ``discriminator``, ``code/distiller.py`` 67-101, commit 375154c):

* the discriminator, per position: ``h = W_h x + b``; ``g = sigmoid(h) relu(h) + (1 - sigmoid(h)) x`` (a
  highway gate); ``Dropout(0.1)`` -> ``Linear(2 d_T -> hidden)`` -> ``LeakyReLU(0.1)`` -> ``Linear(hidden -> 1)``;
* ``loss = BCE(D(GRL(queries)), 1) + BCE(D(GRL(keys).detach()), 0)``, ``BCEWithLogits`` means. The
  reference calls the student queries ``k`` and the teacher keys ``q`` (its CMA returns them in the other
  order); the roles, not the names, are what is reproduced here.

Two documented deviations (docs/BASELINES.md): the means run over the response positions of each side
(the reference also averages prompt rows, all the embedding of the formal id 0, and pad rows); and the
discriminator is trained (in the reference its parameters are never handed to the optimizer, so it stays
at its random init; ``ga_train_discriminator=false`` reproduces that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GradReverse", "KQDiscriminator", "kq_adversarial_loss"]


class GradReverse(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``-beta`` (gradient reversal layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: float) -> torch.Tensor:
        ctx.beta = beta
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.neg() * ctx.beta, None


class KQDiscriminator(nn.Module):
    """Tells student queries from teacher keys, one logit per ``2 d_T`` position vector."""

    def __init__(self, width: int, hidden: int = 768, dropout: float = 0.1) -> None:
        super().__init__()
        self.highway = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.linear1 = nn.Linear(width, hidden)
        self.linear2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, width]`` -> ``[N]`` logits (1 = 'student query', 0 = 'teacher key')."""
        h = self.highway(x)
        gate = torch.sigmoid(h)
        g = gate * F.relu(h) + (1.0 - gate) * x
        return self.linear2(F.leaky_relu(self.linear1(self.dropout(g)), 0.1)).squeeze(-1)


def kq_adversarial_loss(
    discriminator: KQDiscriminator,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_mask: torch.Tensor,
    key_mask: torch.Tensor,
    beta: float = 1.0,
) -> torch.Tensor:
    """The discriminator's BCE on student queries (target 1) and teacher keys (target 0), through a GRL.

    Args:
        discriminator: the :class:`KQDiscriminator` (its parameters minimise the loss).
        queries: ``[B, n, 2 d_T]`` CMA queries (live: the query projector receives the reversed gradient).
        keys: ``[B, m, 2 d_T]`` CMA keys (constants of the cache; detached).
        query_mask, key_mask: boolean ``[B, n]`` / ``[B, m]`` positions that count (the response rows).
        beta: gradient reversal factor.

    Returns:
        0-d ``BCE_mean(queries -> 1) + BCE_mean(keys -> 0)``; 0 when either side has no position.
    """
    q = queries[query_mask]
    k = keys[key_mask]
    if q.shape[0] == 0 or k.shape[0] == 0:
        return queries.sum() * 0.0
    width_dtype = discriminator.linear1.weight.dtype
    out_dtype = torch.promote_types(width_dtype, torch.float32)  # the BCE in fp32 (or fp64) at least
    q_logits = discriminator(GradReverse.apply(q, beta).to(width_dtype)).to(out_dtype)
    k_logits = discriminator(GradReverse.apply(k, beta).detach().to(width_dtype)).to(out_dtype)
    real = F.binary_cross_entropy_with_logits(q_logits, torch.ones_like(q_logits))
    fake = F.binary_cross_entropy_with_logits(k_logits, torch.zeros_like(k_logits))
    return real + fake
