"""Fast Soft-DTW (Cuturi & Blondel 2017) on precomputed cost matrices, with a hand-written backward.

Layering (design notes: docs/SOFT_DTW.md §5): the cost matrix ``C`` (cosine distance plus the band
penalty) is built in torch, where autograd differentiates it; this module maps ``C [B, N, M] -> values [B]``
through one ``torch.autograd.Function`` whose backward is the expected-alignment recursion
``E = d sdtw / d C``. The divergence runs its three DPs as ``3B`` pairs of that same single call.
Measured figures: docs/BENCHMARKS.md (``benchmarks/soft_dtw.py``).

Numerics, identical on every backend:

* finite sentinel ``SENTINEL = 1e10`` for the ``+inf`` borders (no ``inf - inf`` special cases);
* the forward stores the three soft-min weights of every cell; the backward is the exp-free sum
  ``E[i, j] = sum over successors s of w_s(toward (i, j)) * E[s]`` (~10x more accurate in float32 than
  recomputing the weights from ``R``, and cheaper);
* denormal guards inside the kernels: a weight whose exponent ``(min - R_k) / gamma`` is below -60 is 0, and
  ``|E| < 1e-30`` is flushed to 0, so the gradient never holds float32 denormals (they make the ``bmm``
  backward of the cost matrix crawl);
* float32 accumulation for float32/float16/bfloat16 input, float64 for float64 input (used by gradcheck).

Backends (``backend=``):

* ``"numba"`` (CPU): one compiled kernel, parallel over pairs (``prange``). Inside a pair the rows are
  processed in strips of ``lanes`` rows with a skewed (anti-diagonal) step: at step ``t`` lane ``r`` owns
  cell ``(i0 + r, t - r)``; the lanes of a step are independent, so the soft-min of a whole step is one SIMD
  loop (hand-written float32 ``exp``/``log`` polynomials so LLVM can vectorise them; numba has no vector
  math library). The strip hands its last row to the next strip through a row buffer. Weight buffers
  (12 B per cell) are recycled through a small pool once the autograd graph that owns them is freed.
* ``"torch"``: a pure-PyTorch anti-diagonal wavefront over a skewed copy of ``C`` with the same stored
  weights and exp-free backward. Runs on any device; dispatch-bound (about 10 small ops per diagonal).
* ``"triton"`` (CUDA): one program per pair, the whole wavefront in one launch (a loop over diagonals
  inside the kernel, ``BLOCK``-wide tiles per diagonal, a block barrier per diagonal), forward and backward
  kernels. On CPU tensors it runs only under ``TRITON_INTERPRET=1`` (for tests).
* ``"auto"``: CUDA tensor -> ``"triton"``, CPU tensor -> ``"numba"``. Never falls back silently: a missing
  dependency raises and names the explicit alternative.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:  # numba is a hard project dependency; the guard only turns its absence into an actionable error.
    import numba
    from llvmlite import ir as _llvm_ir
    from numba import njit, prange, types
    from numba.core.extending import intrinsic, overload
except ImportError as _numba_error:  # pragma: no cover - exercised only on installs without numba
    numba = None
    _NUMBA_IMPORT_ERROR: ImportError | None = _numba_error
else:
    _NUMBA_IMPORT_ERROR = None

try:  # triton is optional (dev extra, and bundled with CUDA builds of torch).
    import triton
    import triton.language as tl
except ImportError as _triton_error:  # pragma: no cover - depends on the install
    triton = None
    _TRITON_IMPORT_ERROR: ImportError | None = _triton_error
else:
    _TRITON_IMPORT_ERROR = None

__all__ = ["BACKENDS", "SENTINEL", "cosine_cost", "soft_dtw", "soft_dtw_divergence"]

SENTINEL = 1e10
"""Finite stand-in for the ``+inf`` border of the DP (never ``inf``: no ``inf - inf`` in the backward)."""

BACKENDS = ("auto", "numba", "torch", "triton")

_EXP_FLOOR = -60.0  # soft-min weight exponents below this are exactly 0 (exp(-60) ~ 1e-26, far from denormal)
_E_FLOOR = 1e-30  # |E| below this is flushed to 0 (float32 denormals start at 1.2e-38)
_MAX_PATH_COST = 1e8  # (N + M) * (max|C| + gamma) must stay this far below SENTINEL
_TRITON_MAX_BLOCK = 1024  # widest tile per diagonal; longer diagonals loop over tiles (tests lower it)
_NUMBA_LANES = 32  # rows per strip in the numba kernel: two AVX-512 (or four AVX2) float32 vectors per step


# ------------------------------------------------------------------------------------------ validation


def _as_lengths(
    lengths: Any, name: str, bsz: int, limit: int, limit_name: str, device: torch.device
) -> torch.Tensor:
    if lengths is None:
        return torch.full((bsz,), limit, dtype=torch.int64, device=device)
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.dtype.is_complex:
        raise ValueError(f"{name} must hold integers, got dtype {lengths.dtype}")
    if lengths.dim() != 1 or lengths.numel() != bsz:
        raise ValueError(
            f"{name} must have shape [B] = [{bsz}] (one length per pair), got shape {tuple(lengths.shape)}"
        )
    lengths = lengths.to(device=device, dtype=torch.int64)
    lo, hi = (int(v) for v in torch.aminmax(lengths))
    if lo < 1 or hi > limit:
        raise ValueError(
            f"{name} must lie in [1, {limit_name}={limit}], got min {lo} and max {hi}; "
            "pairs with an empty side have no Soft-DTW value: drop them before the call"
        )
    return lengths


def _check_cost(cost: Any, name: str = "cost") -> None:
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() != 3:
        raise ValueError(
            f"{name} must have shape [B, N, M], got {cost.dim()} dims (shape {tuple(cost.shape)})"
        )
    if not cost.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {cost.dtype}"
        )
    if min(cost.shape) < 1:
        raise ValueError(f"{name} must be non-empty in every dimension, got shape {tuple(cost.shape)}")


def _check_gamma(gamma: Any) -> float:
    if isinstance(gamma, torch.Tensor):
        if gamma.numel() != 1:
            raise ValueError(f"gamma must be a scalar, got a tensor of shape {tuple(gamma.shape)}")
        gamma = gamma.item()
    try:
        gamma = float(gamma)
    except (TypeError, ValueError) as err:
        raise ValueError(f"gamma must be a positive number, got {gamma!r}") from err
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0 (the soft-min temperature), got {gamma}")
    return gamma


def _check_values(cost: torch.Tensor, gamma: float) -> None:
    lo, hi = (float(v) for v in torch.aminmax(cost.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(
            "cost contains NaN or +-inf (padding cells included): Soft-DTW needs finite costs everywhere; "
            "fill padding beyond the lengths with 0 and add band penalties as finite constants"
        )
    bound = (cost.shape[1] + cost.shape[2]) * (max(abs(lo), abs(hi)) + gamma)
    if bound > _MAX_PATH_COST:
        raise ValueError(
            f"cost magnitude too large for the finite sentinel {SENTINEL:g}: (N + M) * (max|cost| + gamma) = "
            f"{bound:.3g} > {_MAX_PATH_COST:g} (max|cost| = {max(abs(lo), abs(hi)):.3g}, gamma = {gamma:g}); "
            "rescale the cost matrix (and gamma with it)"
        )


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "numba" if device.type == "cpu" else "unsupported"
        if backend == "unsupported":
            raise ValueError(
                f"backend='auto' knows CPU (numba) and CUDA (triton) tensors, got device {device}; "
                "pass backend='torch' explicitly to run the portable wavefront"
            )
    if backend == "numba":
        if device.type != "cpu":
            raise ValueError(
                f"backend='numba' runs on CPU tensors, got device {device}; use backend='triton' (CUDA) "
                "or backend='torch', or move the cost to the CPU yourself"
            )
        if numba is None:
            raise ImportError(
                f"backend='numba' needs numba, which failed to import ({_NUMBA_IMPORT_ERROR}); "
                "install numba (a project dependency) or pass backend='torch' for the slower pure-torch path"
            )
    if backend == "triton":
        if triton is None:
            raise ImportError(
                f"backend='triton' needs triton, which failed to import ({_TRITON_IMPORT_ERROR}); "
                "install triton (pip install triton) or pass backend='torch' for the pure-torch wavefront"
            )
        if device.type != "cuda" and not _triton_interpreting():
            raise ValueError(
                f"backend='triton' needs a CUDA tensor, got device {device}; set TRITON_INTERPRET=1 before "
                "importing triton to run the kernels on CPU (tests only)"
            )
    return backend


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------- numba backend

if numba is not None:
    # No "reassoc": the exp below rounds with the 1.5 * 2**23 trick, which reassociation would fold away.
    # No "nnan"/"ninf": inputs are checked finite, but keeping IEEE semantics costs nothing measurable here.
    _FASTMATH = {"contract", "arcp", "nsz"}
    _JIT = {"fastmath": _FASTMATH, "error_model": "numpy", "cache": True}

    @intrinsic
    def _f32_bits(typingctx, x):
        """Reinterpret a float32 as int32 (vectorisable bit cast)."""
        if x != types.float32:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], _llvm_ir.IntType(32))

        return types.int32(types.float32), codegen

    @intrinsic
    def _bits_f32(typingctx, x):
        """Reinterpret the low 32 bits of an integer as float32 (vectorisable bit cast)."""
        if not isinstance(x, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            value = args[0]
            if x.bitwidth > 32:
                value = builder.trunc(value, _llvm_ir.IntType(32))
            return builder.bitcast(value, _llvm_ir.FloatType())

        return types.float32(x), codegen

    @njit(inline="always", **_JIT)
    def _expf(x):
        """Cephes ``expf`` for float32 ``x`` in [-87, 0] (callers flush x < -60 first): ~1 ulp, no libm call."""
        t = x * np.float32(1.4426950408889634) + np.float32(12582912.0)  # round(x / ln 2) in the low bits
        k = t - np.float32(12582912.0)
        ki = _f32_bits(t) - np.int32(0x4B400000)
        r = x - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
        p = np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        y = p * (r * r) + r + np.float32(1.0)
        return y * _bits_f32((ki + np.int32(127)) << np.int32(23))

    @njit(inline="always", **_JIT)
    def _logf(s):
        """Cephes ``logf`` for a normal float32 ``s >= 1`` (the soft-min sum lies in [1, 3]): ~1 ulp."""
        bits = _f32_bits(s)
        e = np.float32((bits >> np.int32(23)) - np.int32(126))
        m = _bits_f32((bits & np.int32(0x007FFFFF)) | np.int32(0x3F000000))  # mantissa in [0.5, 1)
        small = m < np.float32(0.70710678)
        e = e - np.float32(1.0) if small else e
        m = m + m - np.float32(1.0) if small else m - np.float32(1.0)
        z = m * m
        p = np.float32(7.0376836292e-2) * m - np.float32(1.1514610310e-1)
        p = p * m + np.float32(1.1676998740e-1)
        p = p * m - np.float32(1.2420140846e-1)
        p = p * m + np.float32(1.4249322787e-1)
        p = p * m - np.float32(1.6668057665e-1)
        p = p * m + np.float32(2.0000714765e-1)
        p = p * m - np.float32(2.4999993993e-1)
        p = p * m + np.float32(3.3333331174e-1)
        y = p * m * z + np.float32(-2.12194440e-4) * e - np.float32(0.5) * z
        return m + y + np.float32(0.693359375) * e

    def _exp(x):  # typed dispatch stub: float32 -> polynomial, float64 -> libm
        raise NotImplementedError("only callable from numba-compiled code")

    def _log(x):  # typed dispatch stub
        raise NotImplementedError("only callable from numba-compiled code")

    @overload(_exp, inline="always", jit_options={"fastmath": _FASTMATH, "error_model": "numpy"})
    def _exp_overload(x):
        if x == types.float32:
            return lambda x: _expf(x)
        return lambda x: math.exp(x)

    @overload(_log, inline="always", jit_options={"fastmath": _FASTMATH, "error_model": "numpy"})
    def _log_overload(x):
        if x == types.float32:
            return lambda x: _logf(x)
        return lambda x: math.log(x)

    @njit(inline="always", **_JIT)
    def _numba_fwd_step(
        cur, prv, prv2, sc, wu, wl, wd, lanes, t, gamma, inv_gamma, big, exp_floor, one, zero
    ):
        """One skewed step of a strip: lane r computes cell (i0 + r, t - r); vectorised over lanes.

        ``prv[r]`` is the up neighbour of lane r, ``prv[r + 1]`` its left one, ``prv2[r]`` its diagonal one
        (slot 0 of both holds the row above the strip). Writes ``cur[r + 1]`` and the three weights.
        """
        for r in range(lanes):
            up = prv[r]
            le = prv[r + 1]
            dg = prv2[r]
            rmin = min(min(up, le), dg)
            xu = (rmin - up) * inv_gamma
            xl = (rmin - le) * inv_gamma
            xd = (rmin - dg) * inv_gamma
            eu = _exp(xu) if xu >= exp_floor else zero
            el = _exp(xl) if xl >= exp_floor else zero
            ed = _exp(xd) if xd >= exp_floor else zero
            tot = eu + el + ed
            rtot = one / tot
            value = sc[r] + rmin - gamma * _log(tot)
            cur[r + 1] = value if t - r >= 1 else big  # column <= 0 is the left border
            wu[r] = eu * rtot
            wl[r] = el * rtot
            wd[r] = ed * rtot

    @njit(inline="always", **_JIT)
    def _numba_bwd_step(es, pu, pl, pd, nu, nl_, nd2, wu, wl, wd, lanes, lo, hi, e_floor, zero):
        """One reverse skewed step: E of lane r from its three successors' weighted E; vectorised over lanes.

        ``nu[r + 1]``: up-weight * E of the cell below (lane r + 1 at step t + 1, slot ``lanes`` = next strip);
        ``nl_[r]``: left-weight * E of the cell to the right (lane r at step t + 1);
        ``nd2[r + 1]``: diagonal-weight * E of the cell below-right (lane r + 1 at step t + 2).
        Lanes outside ``[lo, hi)`` (cells outside the pair) get exactly 0.
        """
        for r in range(lanes):
            e = nu[r + 1] + nl_[r] + nd2[r + 1]
            keep = (r >= lo) & (r < hi) & (abs(e) >= e_floor)
            e = e if keep else zero
            es[r] = e
            pu[r] = wu[r] * e
            pl[r] = wl[r] * e
            pd[r] = wd[r] * e

    @njit(**_JIT)
    def _numba_fwd_pair(c, n, m, gamma, lanes, consts, w):
        """Forward DP of one pair ``c[:n, :m]``; fills the strip-skewed weights ``w``; returns ``R[n, m]``."""
        big = consts[0]
        exp_floor = consts[1]
        one = consts[3]
        zero = consts[4]
        inv_gamma = one / gamma
        steps = c.shape[1] + lanes
        row = np.full(m + 1, big, dtype=c.dtype)  # R of the row above the strip, columns 0..m
        row[0] = zero
        ring = np.empty((3, lanes + 1), dtype=c.dtype)
        sc = np.empty((m + lanes) * lanes, dtype=c.dtype)
        n_strips = (n + lanes - 1) // lanes
        value = zero
        for s in range(n_strips):
            i0 = s * lanes
            n_rows = min(lanes, n - i0)
            sc[:] = zero
            for r in range(n_rows):
                for j in range(m):
                    sc[(j + 1 + r) * lanes + r] = c[i0 + r, j]
            ring[:, :] = big
            base = s * steps * 3 * lanes
            for t in range(1, m + lanes):
                cur = ring[t % 3]
                prv = ring[(t - 1) % 3]
                prv2 = ring[(t - 2) % 3]
                prv[0] = row[t] if t <= m else big
                prv2[0] = row[t - 1] if t - 1 <= m else big
                o = base + t * 3 * lanes
                _numba_fwd_step(
                    cur,
                    prv,
                    prv2,
                    sc[t * lanes : (t + 1) * lanes],
                    w[o : o + lanes],
                    w[o + lanes : o + 2 * lanes],
                    w[o + 2 * lanes : o + 3 * lanes],
                    lanes,
                    t,
                    gamma,
                    inv_gamma,
                    big,
                    exp_floor,
                    one,
                    zero,
                )
                j_last = t - lanes + 1  # column of the strip's last lane
                if j_last >= 1 and j_last <= m:
                    row[j_last] = cur[lanes]
                if s == n_strips - 1 and t == m + n - 1 - i0:
                    value = cur[n - i0]
            row[0] = big
        return value

    @njit(**_JIT)
    def _numba_bwd_pair(g, n, m, lanes, consts, w, seed):
        """Backward (E) recursion of one pair from the stored weights; writes ``g [N, M]`` (0 outside n x m)."""
        e_floor = consts[2]
        zero = consts[4]
        n_max, m_max = g.shape
        steps = m_max + lanes
        row_u = np.zeros(m + 2, dtype=g.dtype)  # up-weight * E of the row below the strip
        row_d = np.zeros(m + 2, dtype=g.dtype)  # diagonal-weight * E of the row below the strip
        ring_u = np.empty((2, lanes + 1), dtype=g.dtype)
        ring_l = np.empty((2, lanes + 1), dtype=g.dtype)
        ring_d = np.empty((3, lanes + 1), dtype=g.dtype)
        es = np.empty((m + lanes) * lanes, dtype=g.dtype)
        n_strips = (n + lanes - 1) // lanes
        for i in range(n, n_max):
            g[i, :] = zero
        for s in range(n_strips - 1, -1, -1):
            i0 = s * lanes
            n_rows = min(lanes, n - i0)
            ring_u[:, :] = zero
            ring_l[:, :] = zero
            ring_d[:, :] = zero
            base = s * steps * 3 * lanes
            t_end = m + n - 1 - i0 if s == n_strips - 1 else -1
            for t in range(m + lanes - 1, 0, -1):
                pu = ring_u[t % 2]
                nu = ring_u[(t + 1) % 2]
                pl = ring_l[t % 2]
                nl_ = ring_l[(t + 1) % 2]
                pd = ring_d[t % 3]
                nd2 = ring_d[(t + 2) % 3]
                j_last = t - lanes + 1
                nu[lanes] = row_u[j_last] if j_last >= 0 and j_last <= m else zero
                nd2[lanes] = row_d[j_last + 1] if j_last + 1 >= 0 and j_last + 1 <= m else zero
                if t == t_end:
                    nu[n - i0] += seed  # the end cell (n, m) receives dL/dvalue
                o = base + t * 3 * lanes
                _numba_bwd_step(
                    es[t * lanes : (t + 1) * lanes],
                    pu,
                    pl,
                    pd,
                    nu,
                    nl_,
                    nd2,
                    w[o : o + lanes],
                    w[o + lanes : o + 2 * lanes],
                    w[o + 2 * lanes : o + 3 * lanes],
                    lanes,
                    max(0, t - m),
                    min(n_rows, t),
                    e_floor,
                    zero,
                )
                if t <= m:  # lane 0 (the strip's first row) feeds the strip above
                    row_u[t] = pu[0]
                    row_d[t] = pd[0]
            for r in range(n_rows):
                for j in range(m):
                    g[i0 + r, j] = es[(j + 1 + r) * lanes + r]
                for j in range(m, m_max):
                    g[i0 + r, j] = zero

    @njit(inline="always", **_JIT)
    def _source_of(p, starts):
        s = 0
        while p >= starts[s + 1]:
            s += 1
        return s

    @njit(parallel=True, **_JIT)
    def _numba_forward(costs, starts, lx, ly, gamma, lanes, consts, weights, values):
        """Pairs ``starts[s] <= p < starts[s + 1]`` read ``costs[s][p - starts[s]]`` in place (no stacking copy)."""
        for p in prange(values.shape[0]):
            s = _source_of(p, starts)
            q = p - starts[s]
            values[p] = _numba_fwd_pair(costs[s][q], lx[p], ly[p], gamma, lanes, consts, weights[s][q])

    @njit(parallel=True, **_JIT)
    def _numba_backward(grads, starts, lx, ly, lanes, consts, weights, seeds):
        for p in prange(seeds.shape[0]):
            s = _source_of(p, starts)
            q = p - starts[s]
            _numba_bwd_pair(grads[s][q], lx[p], ly[p], lanes, consts, weights[s][q], seeds[p])


def _numba_consts(dtype: np.dtype) -> np.ndarray:
    return np.array([SENTINEL, _EXP_FLOOR, _E_FLOOR, 1.0, 0.0], dtype=dtype)


class _BufferPool:
    """Recycles the numba path's weight buffers (12 B per cell, ~100 MB per call at B=8, N=M=1024).

    Fresh allocations that large are mmap-ed and page-faulted on first touch, which costs ~10% of a whole
    pipeline call at N = 1024. A buffer returns to the pool when its last owner (the autograd graph holding
    the forward's state) is freed; at most ``max_bytes`` of free buffers are kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, count: int, dtype: np.dtype) -> _Workspace:
        nbytes = count * np.dtype(dtype).itemsize
        with self._lock:
            fits = [k for k, buf in enumerate(self._free) if nbytes <= buf.nbytes <= 2 * nbytes]
            base = self._free.pop(min(fits, key=lambda k: self._free[k].nbytes)) if fits else None
        if base is None:
            base = np.empty(nbytes, dtype=np.uint8)
        return _Workspace(base, self)

    def release(self, base: np.ndarray) -> None:
        with self._lock:
            self._free.append(base)
            while sum(buf.nbytes for buf in self._free) > self.max_bytes:
                self._free.pop(0)


class _Workspace:
    """A pooled byte buffer handed back to its pool when garbage-collected."""

    __slots__ = ("base", "pool")

    def __init__(self, base: np.ndarray, pool: _BufferPool) -> None:
        self.base = base
        self.pool = pool

    def view(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        count = math.prod(shape)
        return self.base[: count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def __del__(self) -> None:
        self.pool.release(self.base)


_WEIGHT_POOL = _BufferPool(max_bytes=1 << 30)


def _numba_fwd(
    costs: Sequence[torch.Tensor], gamma: float, lx: torch.Tensor, ly: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """All sources in one parallel region; each keeps its own shape (no padding, no copy for float32)."""
    work = _work_dtype(costs)
    arrays = tuple(c.detach().to(work).contiguous().numpy() for c in costs)
    lanes = _NUMBA_LANES
    starts = np.cumsum([0] + [a.shape[0] for a in arrays]).astype(np.int64)
    dtype = arrays[0].dtype
    # per pair: strips x steps x 3 weights x lanes (the layout _numba_fwd_pair writes)
    shapes = [
        (a.shape[0], ((a.shape[1] + lanes - 1) // lanes) * (a.shape[2] + lanes) * 3 * lanes) for a in arrays
    ]
    workspace = _WEIGHT_POOL.take(sum(math.prod(sh) for sh in shapes), dtype)
    flat = workspace.view((sum(math.prod(sh) for sh in shapes),), dtype)
    weights, offset = [], 0
    for sh in shapes:
        weights.append(flat[offset : offset + math.prod(sh)].reshape(sh))
        offset += math.prod(sh)
    weights = tuple(weights)
    values = np.empty(int(starts[-1]), dtype=dtype)
    lxn, lyn = lx.numpy(), ly.numpy()
    _numba_forward(arrays, starts, lxn, lyn, dtype.type(gamma), lanes, _numba_consts(dtype), weights, values)
    return torch.from_numpy(values), (workspace, weights, starts, lxn, lyn, lanes, [a.shape for a in arrays])


def _numba_bwd(state: Any, grad_out: torch.Tensor) -> list[torch.Tensor]:
    _, weights, starts, lxn, lyn, lanes, shapes = state
    dtype = weights[0].dtype
    grads = tuple(np.empty(shape, dtype=dtype) for shape in shapes)
    work = torch.float64 if dtype == np.float64 else torch.float32
    seeds = grad_out.detach().to(work).contiguous().numpy()
    _numba_backward(grads, starts, lxn, lyn, lanes, _numba_consts(dtype), weights, seeds)
    return [torch.from_numpy(g) for g in grads]


# --------------------------------------------------------------------------------------- torch backend


def _skew_view(buf: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``[B, N, M]`` strided view of a diagonal-major buffer ``buf [B, K, n + 1]``: cell (i, j) (0-indexed) is
    ``buf[b, i + j + 2, i + 1]`` (diagonal ``k = i + j`` in 1-indexed DP coordinates, position = row)."""
    row = buf.shape[2]
    return buf.as_strided(
        (buf.shape[0], n, m), (buf.stride(0), row + 1, row), buf.storage_offset() + 2 * row + 1
    )


def _torch_fwd(
    cost: torch.Tensor, gamma: float, lx: torch.Tensor, ly: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """Anti-diagonal wavefront; ``R`` is kept in units of gamma so the soft-min needs no division."""
    work = torch.float64 if cost.dtype == torch.float64 else torch.float32
    bsz, n, m = cost.shape
    dev = cost.device
    big = SENTINEL / gamma
    r = torch.full((bsz, n + m + 1, n + 1), big, dtype=work, device=dev)
    _skew_view(r, n, m).copy_(cost.detach()).mul_(1.0 / gamma)
    r[:, 0, 0] = 0.0
    w = torch.empty((bsz, n + m + 1, 3, n + 1), dtype=work, device=dev)
    floor = math.exp(_EXP_FLOOR)
    for k in range(2, n + m + 1):
        lo, hi = max(1, k - m), min(n, k - 1)
        stacked = torch.stack(
            (r[:, k - 1, lo - 1 : hi], r[:, k - 1, lo : hi + 1], r[:, k - 2, lo - 1 : hi]), 1
        )
        rmin = stacked.amin(1, keepdim=True)
        wk = w[:, k, :, lo : hi + 1]
        torch.sub(rmin, stacked, out=wk)
        wk.exp_()
        F.threshold_(wk, floor, 0.0)
        tot = wk.sum(1, keepdim=True)
        wk.div_(tot)
        r[:, k, lo : hi + 1].add_((rmin - tot.log_()).squeeze(1))
    idx = torch.arange(bsz, device=dev)
    values = r[idx, lx + ly, lx] * gamma
    return values, (w, lx, ly, (bsz, n, m))


def _torch_bwd(state: Any, grad_out: torch.Tensor) -> torch.Tensor:
    w, lx, ly, (bsz, n, m) = state
    dev, work = w.device, w.dtype
    e = torch.zeros((bsz, n + m + 1, n + 1), dtype=work, device=dev)
    p = torch.zeros((bsz, n + m + 3, 3, n + 2), dtype=work, device=dev)  # weight * E, zero outside the pairs
    g = grad_out.detach().to(work)
    idx = torch.arange(bsz, device=dev)
    # seed |g| so a one-op threshold flushes tiny E (E >= 0 then); the sign is applied at the end
    e[idx, lx + ly, lx] = g.abs()
    for k in range(n + m, 1, -1):
        lo, hi = max(1, k - m), min(n, k - 1)
        ek = e[:, k, lo : hi + 1]
        ek.add_(p[:, k + 1, 0, lo + 1 : hi + 2])  # from (i + 1, j)
        ek.add_(p[:, k + 1, 1, lo : hi + 1])  # from (i, j + 1)
        ek.add_(p[:, k + 2, 2, lo + 1 : hi + 2])  # from (i + 1, j + 1)
        F.threshold_(ek, _E_FLOOR, 0.0)
        torch.mul(w[:, k, :, lo : hi + 1], ek.unsqueeze(1), out=p[:, k, :, lo : hi + 1])
    grad = _skew_view(e, n, m).contiguous()
    return grad.mul_(torch.sign(g).view(bsz, 1, 1))


# -------------------------------------------------------------------------------------- triton backend

if triton is not None:

    @triton.jit
    def _triton_fwd_kernel(
        cost_ptr,
        lx_ptr,
        ly_ptr,
        ring_ptr,
        w_ptr,
        out_ptr,
        stride_cb,
        stride_cn,
        stride_cm,
        gamma,
        inv_gamma,
        big,
        exp_floor,
        row_len,
        w_stride_b,
        BLOCK: tl.constexpr,
        USE_F64: tl.constexpr,
    ):
        """One program per pair: loop over the anti-diagonals k = i + j, BLOCK-wide tiles along each."""
        dt = tl.float64 if USE_F64 else tl.float32
        b = tl.program_id(0)
        n = tl.load(lx_ptr + b).to(tl.int32)
        m = tl.load(ly_ptr + b).to(tl.int32)
        ring = ring_ptr + b.to(tl.int64) * 3 * row_len
        wb = w_ptr + b.to(tl.int64) * w_stride_b
        cb = cost_ptr + b.to(tl.int64) * stride_cb
        offs = tl.arange(0, BLOCK)
        for k in range(2, n + m + 1):
            lo = tl.maximum(k - m, 1)
            hi = tl.minimum(k - 1, n)
            cur = ring + (k % 3) * row_len
            prv = ring + ((k - 1) % 3) * row_len
            prv2 = ring + ((k - 2) % 3) * row_len
            wk = wb + k * 3 * row_len
            for i0 in range(lo, hi + 1, BLOCK):
                i = i0 + offs
                msk = i <= hi
                j = k - i
                up = tl.load(prv + i - 1, mask=msk & (i > 1), other=big).to(dt)
                le = tl.load(prv + i, mask=msk & (j > 1), other=big).to(dt)
                dg = tl.load(prv2 + i - 1, mask=msk & (i > 1) & (j > 1), other=big).to(dt)
                dg = tl.where((i == 1) & (j == 1), 0.0, dg)
                c = tl.load(cb + (i - 1) * stride_cn + (j - 1) * stride_cm, mask=msk, other=0.0).to(dt)
                rmin = tl.minimum(tl.minimum(up, le), dg)
                xu = (rmin - up) * inv_gamma
                xl = (rmin - le) * inv_gamma
                xd = (rmin - dg) * inv_gamma
                eu = tl.where(xu >= exp_floor, tl.exp(xu), 0.0)
                el = tl.where(xl >= exp_floor, tl.exp(xl), 0.0)
                ed = tl.where(xd >= exp_floor, tl.exp(xd), 0.0)
                tot = eu + el + ed
                value = c + rmin - gamma * tl.log(tot)
                tl.store(cur + i, value, mask=msk)
                tl.store(wk + i, eu / tot, mask=msk)
                tl.store(wk + row_len + i, el / tot, mask=msk)
                tl.store(wk + 2 * row_len + i, ed / tot, mask=msk)
            tl.debug_barrier()  # diagonal k complete before k + 1 reads it
        last = ring + ((n + m) % 3) * row_len
        end = tl.load(last + n + offs, mask=offs == 0, other=0.0)
        tl.store(out_ptr + b + offs, end, mask=offs == 0)

    @triton.jit
    def _triton_bwd_kernel(
        w_ptr,
        lx_ptr,
        ly_ptr,
        ring_ptr,
        grad_ptr,
        seed_ptr,
        stride_gb,
        stride_gn,
        stride_gm,
        e_floor,
        row_len,
        w_stride_b,
        BLOCK: tl.constexpr,
        USE_F64: tl.constexpr,
    ):
        """Reverse wavefront: E on diagonal k from the stored weights and E on diagonals k + 1, k + 2."""
        dt = tl.float64 if USE_F64 else tl.float32
        b = tl.program_id(0)
        n = tl.load(lx_ptr + b).to(tl.int32)
        m = tl.load(ly_ptr + b).to(tl.int32)
        seed = tl.load(seed_ptr + b).to(dt)
        ring = ring_ptr + b.to(tl.int64) * 3 * row_len
        wb = w_ptr + b.to(tl.int64) * w_stride_b
        gb = grad_ptr + b.to(tl.int64) * stride_gb
        offs = tl.arange(0, BLOCK)
        for kk in range(0, n + m - 1):
            k = n + m - kk
            lo = tl.maximum(k - m, 1)
            hi = tl.minimum(k - 1, n)
            cur = ring + (k % 3) * row_len
            nx1 = ring + ((k + 1) % 3) * row_len
            nx2 = ring + ((k + 2) % 3) * row_len
            w1 = wb + (k + 1) * 3 * row_len
            w2 = wb + (k + 2) * 3 * row_len
            for i0 in range(lo, hi + 1, BLOCK):
                i = i0 + offs
                msk = i <= hi
                j = k - i
                down = msk & (i < n)  # successor (i + 1, j) on diagonal k + 1
                right = msk & (j < m)  # successor (i, j + 1) on diagonal k + 1
                diag = down & (j < m)  # successor (i + 1, j + 1) on diagonal k + 2
                e = tl.where((i == n) & (j == m), seed, 0.0)
                e += tl.load(w1 + i + 1, mask=down, other=0.0).to(dt) * tl.load(
                    nx1 + i + 1, mask=down, other=0.0
                )
                e += tl.load(w1 + row_len + i, mask=right, other=0.0).to(dt) * tl.load(
                    nx1 + i, mask=right, other=0.0
                )
                e += tl.load(w2 + 2 * row_len + i + 1, mask=diag, other=0.0).to(dt) * tl.load(
                    nx2 + i + 1, mask=diag, other=0.0
                )
                e = tl.where(tl.abs(e) >= e_floor, e, 0.0)
                tl.store(cur + i, e, mask=msk)
                tl.store(gb + (i - 1) * stride_gn + (j - 1) * stride_gm, e, mask=msk)
            tl.debug_barrier()


def _triton_block(n: int, m: int) -> tuple[int, int]:
    """Tile width along a diagonal (a diagonal holds at most min(N, M) cells) and the warp count."""
    block = max(16, min(_TRITON_MAX_BLOCK, triton.next_power_of_2(min(n, m))))
    return block, (4 if block <= 256 else 8)


def _triton_fwd(
    cost: torch.Tensor, gamma: float, lx: torch.Tensor, ly: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    work = torch.float64 if cost.dtype == torch.float64 else torch.float32
    bsz, n, m = cost.shape
    dev = cost.device
    row_len = n + 2
    ring = torch.empty((bsz, 3, row_len), dtype=work, device=dev)
    w = torch.empty((bsz, n + m + 3, 3, row_len), dtype=work, device=dev)
    out = torch.empty(bsz, dtype=work, device=dev)
    block, warps = _triton_block(n, m)
    c = cost.detach()
    _triton_fwd_kernel[(bsz,)](
        c, lx, ly, ring, w, out, c.stride(0), c.stride(1), c.stride(2),
        gamma, 1.0 / gamma, SENTINEL, _EXP_FLOOR, row_len, w.stride(0),
        BLOCK=block, USE_F64=work == torch.float64, num_warps=warps,
    )  # fmt: skip
    return out, (w, lx, ly, (bsz, n, m))


def _triton_bwd(state: Any, grad_out: torch.Tensor) -> torch.Tensor:
    w, lx, ly, (bsz, n, m) = state
    grad = torch.zeros((bsz, n, m), dtype=w.dtype, device=w.device)
    ring = torch.empty((bsz, 3, w.shape[3]), dtype=w.dtype, device=w.device)
    seeds = grad_out.detach().to(w.dtype).contiguous()
    block, warps = _triton_block(n, m)
    _triton_bwd_kernel[(bsz,)](
        w, lx, ly, ring, grad, seeds, grad.stride(0), grad.stride(1), grad.stride(2),
        _E_FLOOR, w.shape[3], w.stride(0),
        BLOCK=block, USE_F64=w.dtype == torch.float64, num_warps=warps,
    )  # fmt: skip
    return grad


# ------------------------------------------------------------------------------------------- autograd


def _work_dtype(costs: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (float16/bfloat16 accumulate in float32)."""
    return torch.float64 if any(c.dtype == torch.float64 for c in costs) else torch.float32


def _stack(costs: Sequence[torch.Tensor]) -> torch.Tensor:
    """One ``[sum B_s, max N_s, max M_s]`` zero-padded batch for the wavefront backends (one launch)."""
    if len(costs) == 1:
        return costs[0].detach()
    work = _work_dtype(costs)
    n = max(c.shape[1] for c in costs)
    m = max(c.shape[2] for c in costs)
    if all(c.shape[1:] == (n, m) for c in costs):
        return torch.cat([c.detach().to(work) for c in costs], 0)
    out = costs[0].new_zeros((sum(c.shape[0] for c in costs), n, m), dtype=work)
    start = 0
    for c in costs:
        out[start : start + c.shape[0], : c.shape[1], : c.shape[2]] = c.detach()
        start += c.shape[0]
    return out


_FORWARD = {"torch": _torch_fwd, "triton": _triton_fwd}
_BACKWARD = {"torch": _torch_bwd, "triton": _triton_bwd}


class _SoftDTW(torch.autograd.Function):
    """``costs [B_s, N_s, M_s] (s = 1..S) -> values [sum B_s]``, all pairs in one kernel call.

    The backward is the stored-weight E recursion of the same backend and returns one gradient per source.
    """

    @staticmethod
    def forward(ctx, gamma, lx, ly, backend, *costs):
        if backend == "numba":
            values, state = _numba_fwd(costs, gamma, lx, ly)
        else:
            values, state = _FORWARD[backend](_stack(costs), gamma, lx, ly)
        ctx.state = state
        ctx.backend = backend
        ctx.sources = [(c.shape, c.dtype) for c in costs]
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.backend == "numba":
            grads = _numba_bwd(ctx.state, grad_out)
        else:
            stacked = _BACKWARD[ctx.backend](ctx.state, grad_out)
            grads, start = [], 0
            for shape, _ in ctx.sources:
                grads.append(stacked[start : start + shape[0], : shape[1], : shape[2]])
                start += shape[0]
        return (None, None, None, None, *(g.to(dtype) for g, (_, dtype) in zip(grads, ctx.sources)))


# ----------------------------------------------------------------------------------------- public API


def soft_dtw(
    cost: torch.Tensor,
    gamma: float,
    *,
    lengths_x: torch.Tensor | Sequence[int] | None = None,
    lengths_y: torch.Tensor | Sequence[int] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Soft-DTW value of every pair from its cost matrix, differentiable w.r.t. ``cost``.

    ``R[i, j] = C[i, j] + min_gamma(R[i-1, j-1], R[i-1, j], R[i, j-1])`` with ``R[0, 0] = 0`` and the other
    borders at ``SENTINEL``; pair ``b`` uses ``cost[b, :lengths_x[b], :lengths_y[b]]`` and returns
    ``R[lengths_x[b], lengths_y[b]]``. Cells outside a pair's block receive exactly zero gradient.

    Args:
        cost: ``[B, N, M]`` local costs (band penalty already added), any float dtype. Must be finite
            everywhere, padding included.
        gamma: soft-min temperature, > 0.
        lengths_x: ``[B]`` integer rows per pair in ``[1, N]`` (default ``N``).
        lengths_y: ``[B]`` integer columns per pair in ``[1, M]`` (default ``M``).
        backend: ``"auto"`` (CUDA -> ``"triton"``, CPU -> ``"numba"``), ``"numba"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``[B]`` values: float64 for float64 ``cost``, float32 otherwise (float16/bfloat16 inputs are
        accumulated in float32). The gradient flowing back to ``cost`` has ``cost``'s dtype.

    Raises:
        ValueError: bad shapes, ``gamma <= 0``, non-finite or oversized costs, lengths outside ``[1, N]`` /
            ``[1, M]``, an unknown backend or a backend that cannot take this device.
        TypeError: ``cost`` is not a floating tensor.
        ImportError: the selected backend's compiler (numba or triton) is not installed.
    """
    _check_cost(cost)
    gamma = _check_gamma(gamma)
    bsz, n, m = cost.shape
    backend = _resolve_backend(backend, cost.device)
    lx = _as_lengths(lengths_x, "lengths_x", bsz, n, "N", cost.device)
    ly = _as_lengths(lengths_y, "lengths_y", bsz, m, "M", cost.device)
    _check_values(cost, gamma)
    return _SoftDTW.apply(gamma, lx, ly, backend, cost)


def soft_dtw_divergence(
    cost_xy: torch.Tensor,
    cost_xx: torch.Tensor,
    cost_yy: torch.Tensor,
    gamma: float,
    *,
    lengths_x: torch.Tensor | Sequence[int] | None = None,
    lengths_y: torch.Tensor | Sequence[int] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Soft-DTW divergence ``sdtw(C^xy) - (sdtw(C^xx) + sdtw(C^yy)) / 2`` with the three DPs in one call.

    The three DPs run as ``3B`` pairs of one kernel call with per-pair end cells ``(lx, ly)``, ``(lx, lx)``,
    ``(ly, ly)``. The numba backend reads the three matrices in place (one parallel region, no stacking
    copy); the wavefront backends (torch, triton) zero-pad them into one ``[3B, P, Q]`` batch
    (``P, Q`` = the largest row / column count) and run one wavefront. No clamping: with a banded cross
    cost the value can be slightly negative.

    Args:
        cost_xy: ``[B, N, M]`` cross cost (band penalty already added).
        cost_xx: ``[B, N', N']`` with ``N' >= N`` rows/cols covering ``lengths_x``: self cost of ``x``.
        cost_yy: ``[B, M', M']`` self cost of ``y`` covering ``lengths_y``.
        gamma: soft-min temperature, > 0.
        lengths_x: ``[B]`` valid lengths of ``x`` in ``[1, N]`` (default ``N``).
        lengths_y: ``[B]`` valid lengths of ``y`` in ``[1, M]`` (default ``M``).
        backend: as in :func:`soft_dtw`.

    Returns:
        ``[B]`` divergences (float32, or float64 for float64 inputs), differentiable w.r.t. all three costs.

    Raises:
        ValueError: as :func:`soft_dtw`, plus mismatched batch sizes or self-cost shapes that are not square
            or do not cover the lengths.
    """
    for name, c in (("cost_xy", cost_xy), ("cost_xx", cost_xx), ("cost_yy", cost_yy)):
        _check_cost(c, name)
    bsz, n, m = cost_xy.shape
    if cost_xx.shape[0] != bsz or cost_yy.shape[0] != bsz:
        raise ValueError(
            f"batch sizes differ: cost_xy has B={bsz}, cost_xx B={cost_xx.shape[0]}, cost_yy B={cost_yy.shape[0]}"
        )
    if cost_xx.shape[1] != cost_xx.shape[2] or cost_xx.shape[1] < n:
        raise ValueError(
            f"cost_xx must be square [B, N', N'] with N' >= N={n}, got shape {tuple(cost_xx.shape)}"
        )
    if cost_yy.shape[1] != cost_yy.shape[2] or cost_yy.shape[1] < m:
        raise ValueError(
            f"cost_yy must be square [B, M', M'] with M' >= M={m}, got shape {tuple(cost_yy.shape)}"
        )
    if len({cost_xy.device, cost_xx.device, cost_yy.device}) != 1:
        raise ValueError(
            f"cost tensors live on different devices: {cost_xy.device}, {cost_xx.device}, {cost_yy.device}"
        )
    gamma = _check_gamma(gamma)
    backend = _resolve_backend(backend, cost_xy.device)
    lx = _as_lengths(lengths_x, "lengths_x", bsz, n, "N", cost_xy.device)
    ly = _as_lengths(lengths_y, "lengths_y", bsz, m, "M", cost_xy.device)
    for c in (cost_xy, cost_xx, cost_yy):
        _check_values(c, gamma)
    lx3, ly3 = torch.cat([lx, lx, ly]), torch.cat([ly, lx, ly])
    values = _SoftDTW.apply(gamma, lx3, ly3, backend, cost_xy, cost_xx, cost_yy)
    return values[:bsz] - 0.5 * (values[bsz : 2 * bsz] + values[2 * bsz :])


class _CosineCost(torch.autograd.Function):
    """``1 - x^ y^T`` clamped to [0, 2] with two fused passes forward and none extra backward.

    The clamp only removes rounding overshoot (``|cos| <= 1`` exactly), so its gradient is taken as the
    identity; autograd through ``bmm``/``rsub``/``clamp`` would spend ~5 extra passes over the ``[B, N, M]``
    matrix (a third of the cost-matrix time at N = 1024).
    """

    @staticmethod
    def forward(ctx, x, y, eps):
        x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)
        y_norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(eps)
        xn, yn = x / x_norm, y / y_norm
        one = torch.ones((1, 1, 1), dtype=x.dtype, device=x.device)
        cost = torch.baddbmm(one, xn, yn.transpose(1, 2), beta=1.0, alpha=-1.0).clamp_(0.0, 2.0)
        ctx.save_for_backward(xn, yn, x_norm, y_norm)
        ctx.eps = eps
        return cost

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xn, yn, x_norm, y_norm = ctx.saved_tensors
        grad = grad.to(xn.dtype)
        gxn = torch.bmm(grad, yn).neg_()  # d/d x^ of -(x^ y^T)
        gyn = torch.bmm(grad.transpose(1, 2), xn).neg_()

        def through_normalize(g, unit, norm):
            # x^ = x / max(|x|, eps): (g - x^ <g, x^>) / |x|, without the radial term where the norm was clamped
            radial = torch.linalg.vecdot(g, unit).unsqueeze(-1) * (norm > ctx.eps)
            return torch.addcmul(g, unit, radial, value=-1.0).div_(norm)

        return through_normalize(gxn, xn, x_norm), through_normalize(gyn, yn, y_norm), None


def cosine_cost(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine distance matrix ``1 - cos(x_i, y_j)``, clamped to ``[0, 2]`` (rounding can overshoot).

    Args:
        x: ``[B, N, D]``.
        y: ``[B, M, D]``.
        eps: lower bound on the vector norms (a zero vector has cosine 0 with everything, i.e. cost 1).

    Returns:
        ``[B, N, M]`` in the inputs' dtype, differentiable w.r.t. ``x`` and ``y`` (the clamp, which only
        trims rounding, passes gradients through unchanged).
    """
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(
            f"x and y must be [B, N, D] and [B, M, D], got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(
            f"x and y must share batch size and feature dim, got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.dtype != y.dtype:
        raise ValueError(f"x and y must share a dtype, got {x.dtype} and {y.dtype}")
    return _CosineCost.apply(x, y, eps)
