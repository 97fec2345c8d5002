"""Float64 reference Soft-DTW: the plain dynamic programme, the oracle every fast path is tested against.

Differentiable by autograd (slow: O(N*M) Python steps). Use only in tests and on tiny inputs.
"""

from __future__ import annotations

import torch


def _softmin3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, gamma: float) -> torch.Tensor:
    stacked = torch.stack([a, b, c], dim=0) / -gamma
    return -gamma * torch.logsumexp(stacked, dim=0)


def soft_dtw_reference(
    cost: torch.Tensor,
    gamma: float,
    *,
    lengths_x: torch.Tensor | None = None,
    lengths_y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft-DTW value per pair by the textbook recursion (Cuturi & Blondel 2017), in float64.

    Args:
        cost: ``[B, N, M]`` local costs (band penalty already added).
        gamma: smoothing, > 0.
        lengths_x: ``[B]`` valid rows per pair (default N).
        lengths_y: ``[B]`` valid columns per pair (default M).

    Returns:
        ``[B]`` float64 values ``R[n_b, m_b]``, differentiable w.r.t. ``cost``.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    bsz, n, m = cost.shape
    c = cost.to(torch.float64)
    lx = [n] * bsz if lengths_x is None else [int(v) for v in lengths_x]
    ly = [m] * bsz if lengths_y is None else [int(v) for v in lengths_y]
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=cost.device)
    out = []
    for b in range(bsz):
        nb, mb = lx[b], ly[b]
        # rows of R as Python lists of 0-d tensors; R[0][0] = 0, borders = +inf
        prev = [torch.zeros((), dtype=torch.float64, device=cost.device)] + [inf] * mb
        for i in range(1, nb + 1):
            row = [inf]
            for j in range(1, mb + 1):
                row.append(c[b, i - 1, j - 1] + _softmin3(prev[j - 1], prev[j], row[j - 1], gamma))
            prev = row
        out.append(prev[mb])
    return torch.stack(out)
