"""DWA-KD specific pieces: token weights (METHOD.md eqs 11-15) and the banded Soft-DTW term (eqs 17-25).

Pure functions of tensors. All weights, the gate and the band are computed at tau=1 and detached
(METHOD.md §5.6). The Soft-DTW recursion itself lives in :mod:`student_train.kernels`; this module builds
the cost matrices (cosine, clamped to [0, 2]), the attention-informed band and the per-pair lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from student_train.losses.config import DTWPositions, StudentNorm
from student_train.losses.divergences import compute_dtype

__all__ = [
    "WEIGHT_EPS",
    "DTWResult",
    "band_penalty",
    "cosine_cost",
    "dtw_loss",
    "gate_from_logits",
    "gather_positions",
    "soft_dtw_divergence_batch",
    "student_token_weights",
    "teacher_token_weights",
]

WEIGHT_EPS = 1e-9
"""epsilon of eqs (12), (14) and of the band renormalisation (19), as in the reference code."""


# --------------------------------------------------------------------------------------- token weights


def gate_from_logits(z_t2s_rows: torch.Tensor) -> torch.Tensor:
    """Eq. (11): ``g_i = max_v softmax(z^{t2s}_i)_v`` at tau=1, stop-gradient.

    Args:
        z_t2s_rows: ``[N, V_S]`` projected-teacher logits at response positions.

    Returns:
        ``[N]`` detached float32 (float64 for float64 input) values in ``(0, 1]``.
    """
    with torch.no_grad():
        dtype = compute_dtype(z_t2s_rows)
        return torch.softmax(z_t2s_rows.to(dtype), dim=-1).amax(dim=-1)


def student_token_weights(
    mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    normalisation: StudentNorm = "entropy",
    eps: float = WEIGHT_EPS,
) -> torch.Tensor:
    """Eq. (12) student-space weights ``w^S`` per position (detached; 0 at masked positions).

    With ``S`` = number of response positions of the sample:
      * ``normalisation="entropy"`` (METHOD.md A2 default, reference code): ``w_i = g_i * S H_i / (sum_k H_k
        + eps)`` -- the entropy factor sums to ``S``; the gate then shrinks it (``sum w <= S``).
      * ``normalisation="product"`` (the paper's prose): ``w_i = S g_i H_i / (sum_k g_k H_k + eps)`` -- the
        weights themselves sum to ``S``.

    ``entropy=None`` (no entropy weighting) gives ``w_i = g_i`` (or 1 without a gate); ``gate=None`` means
    ``g_i = 1`` (the "w/o gate" ablation).

    Args:
        mask: boolean ``[B, n]`` response mask.
        entropy: ``[B, n]`` student entropies ``H^S`` (tau=1); values at masked positions are ignored.
        gate: ``[B, n]`` gate values ``g``; values at masked positions are ignored.
        normalisation: ``"entropy"`` or ``"product"``.
        eps: denominator epsilon.

    Returns:
        ``[B, n]`` detached weights.
    """
    if normalisation not in ("entropy", "product"):
        raise ValueError(f"normalisation must be 'entropy' or 'product', got {normalisation!r}")
    with torch.no_grad():
        ref = entropy if entropy is not None else gate
        dtype = compute_dtype(ref) if ref is not None else torch.float32
        m = mask.to(dtype)
        g = m if gate is None else gate.to(dtype) * m
        if entropy is None:
            return g
        h = entropy.to(dtype) * m
        count = m.sum(-1, keepdim=True)
        if normalisation == "entropy":
            return g * count * h / (h.sum(-1, keepdim=True) + eps)
        gh = g * h
        return count * gh / (gh.sum(-1, keepdim=True) + eps)


def teacher_token_weights(
    entropy: torch.Tensor, mask: torch.Tensor, vocab_size: int, *, eps: float = WEIGHT_EPS
) -> torch.Tensor:
    """Eq. (14): ``c_j = clip(1 - H^T_j / log|V_T|, 0, 1)``, ``w^T_j = T c_j / (sum_k c_k + eps)``.

    Args:
        entropy: ``[B, m]`` teacher entropies (tau=1, over the full head width).
        mask: boolean ``[B, m]`` teacher response mask.
        vocab_size: ``|V_T|`` = number of teacher LM-head rows, padded vocab included (METHOD.md A18).
        eps: denominator epsilon.

    Returns:
        ``[B, m]`` detached weights summing to the sample's response count ``T`` (0 at masked positions).
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 for log|V_T| > 0, got {vocab_size}")
    with torch.no_grad():
        dtype = compute_dtype(entropy)
        m = mask.to(dtype)
        c = (1.0 - entropy.to(dtype) / math.log(vocab_size)).clamp(0.0, 1.0) * m
        return m.sum(-1, keepdim=True) * c / (c.sum(-1, keepdim=True) + eps)


# ------------------------------------------------------------------------------------------ Soft-DTW


def gather_positions(
    mask: torch.Tensor, mode: DTWPositions = "response", length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample position indices entering the DTW (METHOD.md A1).

    Args:
        mask: boolean ``[B, L]`` response mask.
        mode: ``"response"`` gathers the positions where the mask is true (recommended);
            ``"ref_first_n"`` takes the first ``n_b`` positions, ``n_b = mask[b].sum()`` (the reference
            code's behaviour, which lets prompt positions in).
        length: pad the index tensor to this many columns (default: the largest count).

    Returns:
        ``(idx [B, Lmax] long, lengths [B] long)``; ``idx[b, k]`` is valid for ``k < lengths[b]`` and 0
        elsewhere.
    """
    if mode not in ("response", "ref_first_n"):
        raise ValueError(f"dtw_positions must be 'response' or 'ref_first_n', got {mode!r}")
    lengths = mask.sum(-1)
    if length is not None:
        width = length
    else:
        width = int(lengths.max().item()) if lengths.numel() else 0
    if mode == "response":
        # a stable sort of the "not response" key puts the response positions first, in order
        order = torch.sort((~mask).to(torch.int32), dim=-1, stable=True).indices
    else:
        order = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    idx = order[:, :width] if width <= mask.shape[1] else F.pad(order, (0, width - mask.shape[1]))
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
    return torch.where(valid, idx, torch.zeros_like(idx)), lengths


def _take_rows(x: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, k]]`` for ``k < lengths[b]``, zeros beyond: ``[B, L, d]`` -> ``[B, K, d]``."""
    rows = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    valid = torch.arange(idx.shape[1], device=idx.device).unsqueeze(0) < lengths.unsqueeze(1)
    return rows * valid.unsqueeze(-1).to(rows.dtype)


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eqs (17)-(18): ``C_ik = 1 - cos(x_i, y_k)``, clamped to ``[0, 2]`` (METHOD.md A19).

    The fused kernel of :func:`student_train.kernels.cosine_cost` (one normalisation per side, a backward
    that recomputes the normalised inputs instead of keeping them), in ``x``'s dtype.

    Args:
        x: ``[B, N, d]``.
        y: ``[B, M, d]``.

    Returns:
        ``[B, N, M]`` costs (zero-padded rows give cost 1; callers mask them by lengths).
    """
    from student_train import kernels

    return kernels.cosine_cost(x, y.to(x.dtype))


def band_penalty(
    attn: torch.Tensor,
    lengths_x: torch.Tensor,
    lengths_y: torch.Tensor,
    *,
    alpha: float,
    base_width: float,
    entropy_coef: float,
    penalty: float,
    eps: float = WEIGHT_EPS,
) -> torch.Tensor:
    """Attention-informed band, eqs (19)-(22), batched over pairs (detached, no gradient).

    Per pair with ``S`` student rows and ``T`` teacher columns: ``Abar_ik = (A_ik + eps) / (sum_k' A_ik' +
    eps)`` on the ``S x T`` block; centre ``c_i = alpha sum_k Abar_ik k + (1 - alpha) i T / S`` (0-indexed,
    A7); width ``w_i = w0 + beta H^A_i`` with ``H^A_i = -sum_k Abar_ik log Abar_ik`` (natural log, A10);
    penalty ``rho`` where ``|k - c_i| > w_i`` (inside iff ``<=``, A9).

    Args:
        attn: ``[B, N, M]`` student-to-teacher attention restricted to the DTW positions (row ``i`` of pair
            ``b`` is valid for ``i < lengths_x[b]``, column ``k`` for ``k < lengths_y[b]``).
        lengths_x: ``[B]`` student lengths ``S``.
        lengths_y: ``[B]`` teacher lengths ``T``.
        alpha: centre blend in ``[0, 1]``.
        base_width: ``w0 >= 0``.
        entropy_coef: ``beta >= 0``.
        penalty: ``rho >= 0``.
        eps: renormalisation epsilon.

    Returns:
        ``[B, N, M]`` penalty (0 or ``rho`` inside each pair's block, 0 outside it).
    """
    with torch.no_grad():
        dtype = compute_dtype(attn)
        _, n, m = attn.shape
        rows = torch.arange(n, device=attn.device, dtype=dtype)
        cols = torch.arange(m, device=attn.device, dtype=dtype)
        lx = lengths_x.to(dtype).view(-1, 1)
        ly = lengths_y.to(dtype).view(-1, 1)
        row_ok = rows.view(1, -1) < lx  # [B, N]
        col_ok = (cols.view(1, -1) < ly).unsqueeze(1)  # [B, 1, M]
        a = attn.detach().to(dtype) * col_ok
        abar = (a + eps) / (a.sum(-1, keepdim=True) + eps) * col_ok
        soft_centre = (abar * cols).sum(-1)  # [B, N]
        lin_centre = rows.view(1, -1) * (ly / lx.clamp_min(1.0))
        centre = alpha * soft_centre + (1.0 - alpha) * lin_centre
        ent = -torch.special.xlogy(abar, abar).sum(-1)
        width = base_width + entropy_coef * ent
        outside = (cols.view(1, 1, -1) - centre.unsqueeze(-1)).abs() > width.unsqueeze(-1)
        block = row_ok.unsqueeze(-1) & col_ok
        return (outside & block).to(dtype) * penalty


def _kernel_divergence():
    # Imported at call time: the compiled kernels (numba/Triton) are only loaded by runs that use DTW.
    from student_train.kernels import soft_dtw_divergence

    return soft_dtw_divergence


def soft_dtw_divergence_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    lengths_x: torch.Tensor,
    lengths_y: torch.Tensor,
    *,
    gamma: float,
    penalty: torch.Tensor | None = None,
    detach_y_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (23) per pair: ``sdtw(C^{xy} + band) - 0.5 (sdtw(C^{xx}) + sdtw(C^{yy}))``, self terms unbanded.

    The three cost matrices are padded to one common ``[B, L, L]`` (``L = max(N, M)``) and handed to
    :func:`student_train.kernels.soft_dtw_divergence` with per-pair lengths (rows ``lengths_x``, columns
    ``lengths_y``; the self terms use ``(lengths_x, lengths_x)`` and ``(lengths_y, lengths_y)``). Pairs
    with an empty side contribute 0; pairs whose value is not finite are zeroed and counted
    (METHOD.md A19). The divergence is not clamped (it may be slightly negative with a band).

    Args:
        x: ``[B, N, d]`` student sequences (zero-padded beyond ``lengths_x``).
        y: ``[B, M, d]`` projected teacher sequences (zero-padded beyond ``lengths_y``).
        lengths_x: ``[B]`` long.
        lengths_y: ``[B]`` long.
        gamma: Soft-DTW smoothing > 0.
        penalty: optional ``[B, N, M]`` band penalty added to the cross cost only.
        detach_y_self: detach ``y`` in the teacher self-term (METHOD.md A20 ablation).

    Returns:
        ``(values [B], n_skipped)``: per-pair divergences (0 for skipped/empty pairs) and a 0-d long
        count of non-finite pairs.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    bsz, n, _ = x.shape
    m = y.shape[1]
    out = x.new_zeros(bsz)
    keep = ((lengths_x > 0) & (lengths_y > 0)).nonzero(as_tuple=True)[0]
    if keep.numel() == 0:
        return out, torch.zeros((), dtype=torch.long, device=x.device)
    size = max(n, m)
    xk = F.pad(x.index_select(0, keep), (0, 0, 0, size - n))
    yk = F.pad(y.index_select(0, keep), (0, 0, 0, size - m))
    lx = lengths_x.index_select(0, keep)
    ly = lengths_y.index_select(0, keep)
    cost_xy = cosine_cost(xk, yk)
    if penalty is not None:
        cost_xy = cost_xy + F.pad(penalty.index_select(0, keep).to(cost_xy.dtype), (0, size - m, 0, size - n))
    cost_xx = cosine_cost(xk, xk)
    y_self = yk.detach() if detach_y_self else yk
    cost_yy = cosine_cost(y_self, y_self)
    # pairs with a non-finite cost (e.g. a NaN hidden state) are skipped before the kernel, which refuses them
    ok = torch.stack([c.isfinite().flatten(1).all(1) for c in (cost_xy, cost_xx, cost_yy)]).all(0)
    n_bad = (~ok).sum()
    if not bool(ok.any()):
        return out, n_bad
    sel = ok.nonzero(as_tuple=True)[0]
    values = _kernel_divergence()(
        cost_xy[sel], cost_xx[sel], cost_yy[sel], gamma, lengths_x=lx[sel], lengths_y=ly[sel]
    )
    values = values.to(out.dtype)
    finite = torch.isfinite(values)
    values = torch.where(finite, values, torch.zeros_like(values))
    return out.index_put((keep[sel],), values), n_bad + (~finite).sum()


@dataclass
class DTWResult:
    """Output of :func:`dtw_loss`: batch sums (over samples, METHOD.md A6) and diagnostics.

    Attributes:
        hidden: 0-d ``sum_b D(H^S_b, t2s(H^T_b))``.
        embed: 0-d ``sum_b D(E^S_b, dtw_embed_t2s(E^T_b))``.
        pairs: 0-d long, pairs with both sides non-empty.
        skipped: 0-d long, non-finite pair values zeroed (hidden + embed).
    """

    hidden: torch.Tensor
    embed: torch.Tensor
    pairs: torch.Tensor
    skipped: torch.Tensor


def dtw_loss(
    *,
    student_hidden: torch.Tensor,
    student_target_embeds: torch.Tensor,
    teacher_hidden_proj: torch.Tensor | None,
    teacher_target_embeds_proj: torch.Tensor | None,
    student_mask: torch.Tensor,
    teacher_mask: torch.Tensor,
    a_t2s: torch.Tensor | None,
    gamma: float,
    positions: DTWPositions = "response",
    alpha: float = 0.7,
    base_width: float = 5.0,
    entropy_coef: float = 2.0,
    penalty: float = 1.0,
    detach_teacher_self_term: bool = False,
) -> DTWResult:
    """Eq. (25): ``L_DTW = sum_b [D(H^S, t2s(H^T)) + D(E^S_tg, dtw_embed_t2s(E^T_tg))]``.

    The teacher-side sequences arrive already projected by the caller (so this stays a function of
    tensors); rows outside the gathered positions are ignored.

    Args:
        student_hidden: ``[B, n, d_S]`` student final hidden states.
        student_target_embeds: ``[B, n, d_S]`` student embeddings of the (formal) target ids, NOT detached.
        teacher_hidden_proj: ``[B, m, d_S]`` ``t2s(H^T)`` (raw teacher hidden, A13), or ``None`` to skip.
        teacher_target_embeds_proj: ``[B, m, d_S]`` ``dtw_embed_t2s(E^T_tg)``, or ``None`` to skip.
        student_mask: boolean ``[B, n]``.
        teacher_mask: boolean ``[B, m]``.
        a_t2s: ``[B, n, m]`` CMA attention (detached here) for the band, or ``None`` for no band.
        gamma: Soft-DTW smoothing.
        positions: ``"response"`` or ``"ref_first_n"`` (A1).
        alpha: band centre blend.
        base_width: ``w0``.
        entropy_coef: ``beta``.
        penalty: ``rho``; 0 disables the band.
        detach_teacher_self_term: A20 ablation.

    Returns:
        :class:`DTWResult`.
    """
    idx_s, len_s = gather_positions(student_mask, positions)
    idx_t, len_t = gather_positions(teacher_mask, positions)
    pen = None
    if a_t2s is not None and penalty > 0:
        a = a_t2s.detach().gather(1, idx_s.unsqueeze(-1).expand(-1, -1, a_t2s.shape[-1]))
        a = a.gather(2, idx_t.unsqueeze(1).expand(-1, a.shape[1], -1))
        pen = band_penalty(
            a,
            len_s,
            len_t,
            alpha=alpha,
            base_width=base_width,
            entropy_coef=entropy_coef,
            penalty=penalty,
        )
    zero = student_hidden.new_zeros((), dtype=compute_dtype(student_hidden))
    results: dict[str, torch.Tensor] = {"hidden": zero, "embed": zero}
    skipped = torch.zeros((), dtype=torch.long, device=student_hidden.device)
    pairs = ((len_s > 0) & (len_t > 0)).sum()
    sides = (
        ("hidden", student_hidden, teacher_hidden_proj),
        ("embed", student_target_embeds, teacher_target_embeds_proj),
    )
    for name, xs, ys in sides:
        if ys is None:
            continue
        dtype = compute_dtype(xs, ys)
        x = _take_rows(xs.to(dtype), idx_s, len_s)
        y = _take_rows(ys.to(dtype), idx_t, len_t)
        vals, n_bad = soft_dtw_divergence_batch(
            x, y, len_s, len_t, gamma=gamma, penalty=pen, detach_y_self=detach_teacher_self_term
        )
        results[name] = vals.sum()
        skipped = skipped + n_bad
    return DTWResult(hidden=results["hidden"], embed=results["embed"], pairs=pairs, skipped=skipped)
