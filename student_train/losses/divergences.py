"""Per-position divergences and entropies computed from logits, plus the chunked teacher-side helper.

All functions are pure functions of tensors. Softmax / log-softmax / entropy run in float32 (float64 when
the inputs are float64, so the float64 gradchecks in the tests are meaningful). Logits must be finite: the
objective checks this once for all its inputs.

Masking convention: ``mask`` is a boolean tensor over the leading (position) dimensions. Masked positions
are never fed to the softmax; their output is an exact 0 and they receive exactly zero gradient, so
their values (even huge ones) cannot influence the loss.

Notation (METHOD.md §2.8, A3): ``KL_tau(a || b) = sum_v softmax(a/tau)_v [log softmax(a/tau)_v -
log softmax(b/tau)_v]``, with no ``tau**2`` factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = [
    "SLAB_BUDGET_BYTES",
    "auto_chunk_size",
    "compute_dtype",
    "entropy_from_logits",
    "forward_kl_from_logits",
    "sampled_teacher_kl",
    "skewed_reverse_kl_from_logits",
    "teacher_entropy_and_kl",
]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype softmax-type reductions run in: float64 if any input is float64, else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _rowwise(
    fn: Callable[..., torch.Tensor], mask: torch.Tensor | None, *logits: torch.Tensor
) -> torch.Tensor:
    """Apply ``fn`` (rows ``[N, V]`` -> ``[N]``) to the unmasked positions, zeros elsewhere.

    Args:
        fn: maps ``k`` tensors of shape ``[N, V]`` (in the compute dtype) to a ``[N]`` tensor.
        mask: boolean ``[...]`` over the leading dims of the logits, or ``None`` for all positions.
        *logits: tensors of shape ``[..., V_k]`` sharing the leading dims.

    Returns:
        ``[...]`` tensor in the compute dtype; exactly 0 at masked positions.
    """
    lead = logits[0].shape[:-1]
    for t in logits[1:]:
        if t.shape[:-1] != lead:
            raise ValueError(
                f"logit tensors must share their leading (position) dims; got {tuple(lead)} and "
                f"{tuple(t.shape[:-1])}"
            )
    dtype = compute_dtype(*logits)
    flat = [t.reshape(-1, t.shape[-1]) for t in logits]
    if mask is None:
        return fn(*(t.to(dtype) for t in flat)).reshape(lead)
    if mask.shape != lead:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the logits' leading dims {tuple(lead)}"
        )
    idx = mask.reshape(-1).nonzero(as_tuple=True)[0]
    vals = fn(*(t.index_select(0, idx).to(dtype) for t in flat))
    out = vals.new_zeros(flat[0].shape[0])
    return out.index_put((idx,), vals).reshape(lead)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def forward_kl_from_logits(
    target_logits: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL ``KL_tau(target || model)`` per position.

    Args:
        target_logits: ``[..., V]`` logits of the target distribution ``a`` (detach it yourself if it
            must not receive gradient).
        logits: ``[..., V]`` logits of the model distribution ``b``.
        mask: boolean ``[...]``; ``False`` positions contribute exactly 0.
        temperature: ``tau > 0``; both sides are divided by it. No ``tau**2`` factor.

    Returns:
        ``[...]`` float32 (float64 for float64 inputs) per-position KL, >= 0.
    """
    _check_temperature(temperature)

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        la = F.log_softmax(a / temperature, dim=-1)
        lb = F.log_softmax(b / temperature, dim=-1)
        return (la.exp() * (la - lb)).sum(-1)

    return _rowwise(fn, mask, target_logits, logits)


def skewed_reverse_kl_from_logits(
    target_logits: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    skew: float = 0.1,
) -> torch.Tensor:
    """Skewed reverse KL (METHOD.md A3) per position.

    ``SRKL = sum_v p_v [log p_v - log((1 - skew) q_v + skew p_v)]`` with ``p = softmax(logits/tau)`` (the
    model) and ``q = softmax(target_logits/tau)``, i.e. ``KL(p || (1-skew) q + skew p)``. The mixture's log
    is computed as a ``logaddexp`` of log-probabilities (no ``log(0)``).

    Args:
        target_logits: ``[..., V]`` logits of the target ``q``.
        logits: ``[..., V]`` logits of the model ``p``.
        mask: boolean ``[...]``; ``False`` positions contribute exactly 0.
        temperature: ``tau > 0``.
        skew: mixing weight ``lambda`` of the model distribution, in ``[0, 1)``.

    Returns:
        ``[...]`` per-position divergence, >= 0.
    """
    _check_temperature(temperature)
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1), got {skew}")

    def fn(q_logits: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
        lq = F.log_softmax(q_logits / temperature, dim=-1)
        lp = F.log_softmax(p_logits / temperature, dim=-1)
        if skew == 0.0:
            lmix = lq
        else:
            lmix = torch.logaddexp(lq + math.log1p(-skew), lp + math.log(skew))
        return (lp.exp() * (lp - lmix)).sum(-1)

    return _rowwise(fn, mask, target_logits, logits)


def entropy_from_logits(
    logits: torch.Tensor, mask: torch.Tensor | None = None, *, temperature: float = 1.0
) -> torch.Tensor:
    """Shannon entropy (natural log) of ``softmax(logits / tau)`` per position.

    Args:
        logits: ``[..., V]``.
        mask: boolean ``[...]``; ``False`` positions are exactly 0.
        temperature: ``tau > 0``.

    Returns:
        ``[...]`` entropies in ``[0, log V]``.
    """
    _check_temperature(temperature)

    def fn(z: torch.Tensor) -> torch.Tensor:
        lz = F.log_softmax(z / temperature, dim=-1)
        return -(lz.exp() * lz).sum(-1)

    return _rowwise(fn, mask, logits)


SLAB_BUDGET_BYTES = 2**30
"""The most the teacher-space KL's live fp32 slabs (four at most) may take when the chunk is automatic."""


def auto_chunk_size(vocab_size: int, width: int, budget_bytes: int = SLAB_BUDGET_BYTES) -> int:
    """Teacher positions per chunk from the head's shape: four ``[chunk, V_T]`` fp32 slabs within the head's
    own size (``chunk <= d_T / 4``: the KL's transient memory does not exceed the head each rank already holds)
    and within ``budget_bytes``; a power of two in ``[16, 1024]`` (the floor of 16 wins over both bounds for
    heads narrower than 64 or wider than ~4M rows).

    Measured (docs/BENCHMARKS.md, ``benchmarks/teacher_kl.py``, 300 positions): at a 152k x 1536 head, chunk 64
    is 1.21x slower than 256 (the head is streamed once per chunk); at 49k x 576 the chunk hardly matters. This
    gives 256 for Qwen2.5-1.5B's head, 128 for SmolLM2's, 1024 for Mistral-7B's.
    """
    fit = min(int(width) // 4, budget_bytes // (16 * max(int(vocab_size), 1)))
    return int(min(1024, max(16, 1 << max(fit.bit_length() - 1, 0))))


def _row_chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


class _ChunkedTeacherKL(torch.autograd.Function):
    """``KL_tau(W h_T || W h_s2t)`` and ``H(softmax(W h_T))`` per row, chunk by chunk over rows.

    At most four ``[chunk, V_T]`` vocabulary slabs are alive at once (never ``N x V_T``). Only ``s2t_rows``
    receives gradient: ``d KL_i / d z_s2t = (softmax(z_s2t/tau) - softmax(z_T/tau)) / tau`` and
    ``d KL_i / d h_s2t_i = (...) @ W``. Row ``i``'s KL depends on row ``i`` only, so that per-row Jacobian
    is formed in the forward, while both softmaxes are at hand, and kept as an ``[N, d_T]`` tensor; the
    backward scales it by the incoming per-row gradient. Three ``[chunk, d_T] x [d_T, V_T]`` products per
    chunk in all (the two logits as one stacked product, one Jacobian), instead of five when the backward
    recomputes the logits.
    """

    @staticmethod
    def forward(ctx, s2t_rows, teacher_rows, head, bias, temperature, chunk_size, with_entropy):
        """Per-row KL and (``with_entropy``) entropy; with a gradient to come, also the per-row Jacobian.

        ``bias`` (``[V_T]`` or None) is the head's bias, added to both logits (it leaves the Jacobian as is).
        At ``tau = 1`` the entropy reuses the KL's log-softmax; otherwise it is one more pass over the slab.
        """
        n = teacher_rows.shape[0]
        kl = s2t_rows.new_zeros(n)
        ent = s2t_rows.new_zeros(n if with_entropy else 0)
        need_grad = ctx.needs_input_grad[0]
        jac = torch.empty_like(s2t_rows) if need_grad else None
        for s, e in _row_chunks(n, chunk_size):
            # both sides' logits in one product: the head is streamed once per chunk, not twice (1.24x on those
            # products at a 152k x 1536 head, chunk 64; docs/BENCHMARKS.md). Live slabs: z (two), then at most
            # two more; the sums are row dot products and the differences in place, so no temporaries.
            z = torch.cat([teacher_rows[s:e], s2t_rows[s:e]]) @ head.T
            if bias is not None:
                z.add_(bias)
            zt, zs = z[: e - s], z[e - s :]
            del z  # the two views keep it alive until both are dropped
            if with_entropy and temperature != 1.0:  # H = lse - <p, z>, with p one slab
                lse = torch.logsumexp(zt, dim=-1, keepdim=True)
                p1 = torch.sub(zt, lse).exp_()
                ent[s:e] = lse.squeeze(-1) - torch.linalg.vecdot(p1, zt)
                del p1
            ltt = F.log_softmax(zt if temperature == 1.0 else zt.div_(temperature), dim=-1)
            del zt
            lq = F.log_softmax(zs.div_(temperature), dim=-1)
            del zs  # z is freed here
            pt = ltt.exp()
            if with_entropy and temperature == 1.0:
                ent[s:e] = -torch.linalg.vecdot(pt, ltt)
            kl[s:e] = torch.linalg.vecdot(pt, ltt.sub_(lq))
            del ltt
            if need_grad:
                jac[s:e] = (lq.exp_().sub_(pt).div_(temperature)) @ head
            del lq, pt
        ctx.save_for_backward(jac)
        ctx.mark_non_differentiable(ent)
        return kl, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl, grad_ent):
        """``grad_kl[i] * J_i``: no vocabulary-sized work."""
        (jac,) = ctx.saved_tensors
        if grad_kl is None:
            return torch.zeros_like(jac), None, None, None, None, None, None
        return jac * grad_kl.to(jac.dtype).unsqueeze(-1), None, None, None, None, None, None


def teacher_entropy_and_kl(
    teacher_rows: torch.Tensor,
    teacher_head: torch.Tensor,
    s2t_rows: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 0,
    teacher_bias: torch.Tensor | None = None,
    entropy: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Teacher entropy (tau=1) and teacher-space KL from cached hidden states, chunked over positions.

    For each teacher position the exact teacher logits ``z^T_j = W^T h^T_j`` are rebuilt from the cached
    final hidden state and the cached LM head, ``chunk_size`` positions at a time, and consumed at once:
    the entropy ``H^T_j`` of ``softmax(z^T_j)`` (METHOD.md eq. 8, always tau=1) and, when ``s2t_rows`` is
    given, ``KL_tau(z^T_j || z^{s2t}_j)`` with ``z^{s2t}_j = W^T hhat^{s2t}_j`` (eq. 15 / §2.9). The
    largest live tensor is ``[chunk_size, V_T]``, in forward and backward.

    Args:
        teacher_rows: ``[N, d_T]`` teacher final hidden states at the positions of interest (any float
            dtype; constant, never receives gradient).
        teacher_head: ``[V_T, d_T]`` teacher LM head (constant; treated as detached). Pass it already in
            float32 to avoid a per-call cast of the whole head.
        s2t_rows: ``[N, d_T]`` student-to-teacher attended states ``hhat^{s2t}``; receives gradient.
        temperature: KL temperature ``tau > 0`` (the entropy is always at tau=1).
        chunk_size: positions per chunk, >= 1; 0 picks :func:`auto_chunk_size` for the head.
        teacher_bias: ``[V_T]`` the LM head's bias, when the teacher's head has one (constant).
        entropy: also compute the entropy; ``False`` skips its pass (the caller has the cached column) and
            needs ``s2t_rows``.

    Returns:
        ``(entropy [N] or None, kl [N] or None)`` in float32 (float64 if ``s2t_rows`` / ``teacher_rows``
        are float64). ``entropy`` is detached.
    """
    _check_temperature(temperature)
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 1 (0: automatic), got {chunk_size}")
    if chunk_size == 0:
        chunk_size = auto_chunk_size(*teacher_head.shape)
    if s2t_rows is None and not entropy:
        raise ValueError("nothing to compute: s2t_rows is None and entropy=False")
    if teacher_rows.dim() != 2 or teacher_head.dim() != 2 or teacher_rows.shape[1] != teacher_head.shape[1]:
        raise ValueError(
            f"expected teacher_rows [N, d_T] and teacher_head [V_T, d_T]; got {tuple(teacher_rows.shape)} "
            f"and {tuple(teacher_head.shape)}"
        )
    dtype = compute_dtype(teacher_rows, s2t_rows)
    head = teacher_head.detach().to(dtype)
    bias = None if teacher_bias is None else teacher_bias.detach().to(dtype)
    if bias is not None and bias.shape != (head.shape[0],):
        raise ValueError(f"teacher_bias must have shape [V_T] = ({head.shape[0]},), got {tuple(bias.shape)}")
    t_rows = teacher_rows.detach().to(dtype)
    if s2t_rows is None:
        n = t_rows.shape[0]
        ent = t_rows.new_zeros(n)
        with torch.no_grad():
            for s, e in _row_chunks(n, chunk_size):
                zt = t_rows[s:e] @ head.T
                lt = F.log_softmax(zt if bias is None else zt + bias, dim=-1)
                ent[s:e] = -(lt.exp() * lt).sum(-1)
        return ent, None
    if s2t_rows.shape != t_rows.shape:
        raise ValueError(
            f"s2t_rows must match teacher_rows [N, d_T]; got {tuple(s2t_rows.shape)} vs {tuple(t_rows.shape)}"
        )
    kl, ent = _ChunkedTeacherKL.apply(
        s2t_rows.to(dtype), t_rows, head, bias, float(temperature), int(chunk_size), bool(entropy)
    )
    return (ent if entropy else None), kl


def sampled_teacher_kl(
    teacher_rows: torch.Tensor,
    teacher_head: torch.Tensor,
    s2t_rows: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    samples: int = 4096,
    seed: int = 0,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int = 512,
) -> torch.Tensor:
    """An APPROXIMATE teacher-space KL (opt-in, never the default): the cached top-k plus sampled negatives.

    The exact term needs ``softmax(W h)`` over all ``V_T`` rows of the teacher head for both sides. Here row
    ``j`` sees only its cached top-k ids ``K_j`` (exact logits, both sides) and ``samples`` ids ``S`` drawn
    uniformly without replacement from the whole vocabulary (shared by the rows; those in ``K_j`` are dropped
    for row ``j``), which stand for the ``V - k`` others with weight ``r_j = (V - k) / |S \\ K_j|``:

    ``log Z ~= logsumexp(z_K / tau, z_{S \\ K} / tau + log r_j)`` (each side), ``p_v = exp(z_v / tau - log Z)``,
    ``KL ~= sum_{v in K} p_v (log p_v - log q_v) + r_j sum_{v in S \\ K} p_v (log p_v - log q_v)``.

    Both normalisers are estimates, so the top-k terms are approximate too; the estimator is biased (the log of
    an unbiased estimate of ``Z``), on real rows slightly low (docs/BENCHMARKS.md: error and gradient cosine
    against the exact term on a real teacher). With ``samples >= V`` it is the exact KL, value and gradient.
    Precondition: a row's top-k ids are distinct (``torch.topk`` at precompute time guarantees it).

    Cost ``O(N (k + samples) d)`` instead of ``O(N V d)``. Rows are processed ``chunk_size`` at a time under
    activation checkpointing, so memory is bounded by one chunk (its ``[chunk, k, d]`` head rows and a few
    ``[chunk, samples]`` tensors), recomputed in the backward.

    Args:
        teacher_rows: ``[N, d_T]`` cached teacher final states (constant).
        teacher_head: ``[V_T, d_T]`` (constant).
        s2t_rows: ``[N, d_T]`` student-to-teacher states; receives gradient.
        topk_ids: ``[N, k]`` the cache's top-k teacher ids of each row (distinct within a row).
        temperature: ``tau > 0``.
        samples: uniform negatives (capped at ``V_T``).
        seed: the sample's seed (the caller makes it a function of the batch, so a resumed run draws the same).
        teacher_bias: ``[V_T]`` or None.
        chunk_size: rows per checkpointed chunk (>= 1).

    Returns:
        ``[N]`` per-row approximate KL (float32, float64 for float64 inputs).
    """
    _check_temperature(temperature)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n, _ = teacher_rows.shape
    if s2t_rows.shape != teacher_rows.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != n:
        raise ValueError(
            f"expected teacher_rows and s2t_rows [N, d_T] and topk_ids [N, k]; got {tuple(teacher_rows.shape)}, "
            f"{tuple(s2t_rows.shape)}, {tuple(topk_ids.shape)}"
        )
    dtype = compute_dtype(teacher_rows, s2t_rows)
    v = teacher_head.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    sample = torch.randperm(v, generator=gen)[: min(samples, v)].to(teacher_head.device)
    # id -> its place in the sample (-1: not drawn)
    where = torch.full((v,), -1, dtype=torch.long, device=teacher_head.device)
    where[sample] = torch.arange(sample.numel(), device=teacher_head.device)
    head = teacher_head.detach()
    w_s = head[sample].to(dtype)  # [S, d]
    b = None if teacher_bias is None else teacher_bias.detach().to(dtype)
    b_s = None if b is None else b[sample]

    def rows_kl(t_rows: torch.Tensor, s_rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        k = ids.shape[1]
        hits = where[ids]  # [c, k]: the sample's place of each top-k id, -1 if not drawn
        in_top = torch.zeros(ids.shape[0], sample.numel() + 1, dtype=torch.bool, device=ids.device)
        in_top.scatter_(1, torch.where(hits >= 0, hits, sample.numel()), True)
        in_top = in_top[:, :-1]  # [c, S]
        others = (~in_top).sum(-1).clamp_min(1).to(dtype)
        log_r = torch.log((v - k) / others).unsqueeze(-1)  # [c, 1]
        w_k = head[ids].to(dtype)  # [c, k, d]

        def log_probs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z_k = torch.einsum("nd,nkd->nk", x, w_k)
            z_s = x @ w_s.T
            if b is not None:
                z_k, z_s = z_k + b[ids], z_s + b_s
            z_k, z_s = z_k / temperature, z_s / temperature
            tail = (z_s + log_r).masked_fill(in_top, float("-inf"))  # a drawn id in K_j is not a tail draw
            log_z = torch.logsumexp(torch.cat([z_k, tail], -1), -1, keepdim=True)
            return z_k - log_z, z_s - log_z

        with torch.no_grad():
            lp_k, lp_s = log_probs(t_rows)
        lq_k, lq_s = log_probs(s_rows)
        top = (lp_k.exp() * (lp_k - lq_k)).sum(-1)
        rest = (lp_s.exp() * (lp_s - lq_s) * (~in_top).to(dtype)).sum(-1)
        return top + log_r.squeeze(-1).exp() * rest

    t_all = teacher_rows.detach().to(dtype)
    s_all = s2t_rows.to(dtype)
    ids_all = topk_ids.long()
    grad = torch.is_grad_enabled() and s_all.requires_grad
    parts = []
    for s, e in _row_chunks(n, chunk_size):
        if grad:
            parts.append(checkpoint(rows_kl, t_all[s:e], s_all[s:e], ids_all[s:e], use_reentrant=False))
        else:
            parts.append(rows_kl(t_all[s:e], s_all[s:e], ids_all[s:e]))
    return torch.cat(parts) if parts else s_all.new_zeros(0)
