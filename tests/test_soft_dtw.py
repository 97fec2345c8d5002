"""Fast Soft-DTW (student_train/kernels/soft_dtw.py) against the float64 oracle, plus numerics and API checks.

The Triton kernels run on CPU under ``TRITON_INTERPRET=1``, which must be set before triton is imported, so
those checks run in a subprocess (see ``_TRITON_SCRIPT``) and report JSON back.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student_train.kernels import cosine_cost, soft_dtw, soft_dtw_divergence, soft_dtw_reference

sdtw_module = importlib.import_module("student_train.kernels.soft_dtw")  # the package re-exports the function
REPO = Path(__file__).resolve().parents[1]
FAST = ["numba", "torch"]
TINY = torch.finfo(torch.float32).tiny

# (B, N, M, lengths_x, lengths_y): unequal sides, N=1 / M=1, a strip boundary of the numba kernel (32 rows),
# and padded batches whose pairs end at different cells.
CASES = [
    (3, 7, 5, None, None),
    (2, 1, 6, None, None),
    (2, 6, 1, None, None),
    (1, 1, 1, None, None),
    (2, 9, 13, [9, 4], [13, 1]),
    (3, 40, 23, [40, 33, 1], [23, 7, 23]),
    (2, 34, 65, [34, 32], [65, 40]),
]
GAMMAS = [1e-3, 0.1, 2.0]


def _cost(case: int, dtype=torch.float64) -> torch.Tensor:
    bsz, n, m, _, _ = CASES[case]
    gen = torch.Generator().manual_seed(case)
    return torch.rand(bsz, n, m, generator=gen, dtype=torch.float64).to(dtype)


def _lengths(case: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    _, _, _, lx, ly = CASES[case]
    return (None if lx is None else torch.tensor(lx)), (None if ly is None else torch.tensor(ly))


def _upstream(bsz: int) -> torch.Tensor:
    """A non-trivial dL/dvalue per pair (mixed signs: the backward must not assume a positive seed)."""
    return torch.tensor([1.0, -0.5, 2.0, 0.25][:bsz], dtype=torch.float64)


@functools.cache
def _reference(case: int, gamma: float, input_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 oracle value and gradient on the cost as rounded to ``input_dtype``."""
    cost = _cost(case, input_dtype).to(torch.float64).requires_grad_()
    lx, ly = _lengths(case)
    values = soft_dtw_reference(cost, gamma, lengths_x=lx, lengths_y=ly)
    (grad,) = torch.autograd.grad((values * _upstream(len(values))).sum(), cost)
    return values.detach(), grad


def _run(
    cost: torch.Tensor, gamma: float, backend: str, lx=None, ly=None
) -> tuple[torch.Tensor, torch.Tensor]:
    cost = cost.detach().clone().requires_grad_()
    values = soft_dtw(cost, gamma, lengths_x=lx, lengths_y=ly, backend=backend)
    (values * _upstream(len(values)).to(values.dtype)).sum().backward()
    return values.detach(), cost.grad


# ------------------------------------------------------------------------------------- against the oracle


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_float64_reference(case, gamma, dtype, backend):
    ref_val, ref_grad = _reference(case, gamma, dtype)
    lx, ly = _lengths(case)
    values, grad = _run(_cost(case, dtype), gamma, backend, lx, ly)
    assert values.dtype == dtype and grad.dtype == dtype
    scale = ref_val.abs().max().clamp_min(1.0)
    if dtype == torch.float64:
        torch.testing.assert_close(values, ref_val, rtol=0, atol=1e-12 * scale)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-10)
    else:
        torch.testing.assert_close(values.double(), ref_val, rtol=0, atol=2e-6 * scale)
        # near-ties between paths at gamma = 1e-3 amplify float32 rounding of R (~1e-6 * |R| / gamma)
        atol = 2e-3 if gamma < 0.01 else 2e-5
        torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=atol)


@pytest.mark.parametrize("backend", FAST)
def test_padding_cells_get_exactly_zero_gradient(backend):
    case = 5  # lengths (40, 23), (33, 7), (1, 23) inside a [3, 40, 23] batch
    lx, ly = _lengths(case)
    _, grad = _run(_cost(case, torch.float32), 0.1, backend, lx, ly)
    for b in range(grad.shape[0]):
        n, m = int(lx[b]), int(ly[b])
        assert torch.all(grad[b, n:, :] == 0) and torch.all(grad[b, :, m:] == 0)
        assert torch.count_nonzero(grad[b, :n, :m]) >= n + m - 1  # a whole alignment path is non-zero


@pytest.mark.parametrize("backend", FAST)
def test_padding_content_does_not_matter(backend):
    case = 4
    lx, ly = _lengths(case)
    cost = _cost(case, torch.float32)
    noisy = cost.clone()
    noisy[1, 4:, :] = 37.0
    noisy[1, :, 1:] = -5.0
    v1, g1 = _run(cost, 0.1, backend, lx, ly)
    v2, g2 = _run(noisy, 0.1, backend, lx, ly)
    assert torch.equal(v1, v2) and torch.equal(g1, g2)


@pytest.mark.parametrize("backend", FAST)
def test_gradcheck_float64(backend):
    gen = torch.Generator().manual_seed(7)
    cost = torch.rand(2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    lx, ly = torch.tensor([4, 2]), torch.tensor([3, 3])
    for gamma in (0.05, 1.0):
        assert torch.autograd.gradcheck(
            lambda c, g=gamma: soft_dtw(c, g, lengths_x=lx, lengths_y=ly, backend=backend), (cost,)
        )


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    m=st.integers(1, 6),
    gamma=st.floats(1e-2, 2.0),
    cut=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes_match_reference(n, m, gamma, cut, seed):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.randn(2, n, m, generator=gen, dtype=torch.float64)
    lx = torch.tensor([n, max(1, n - cut)])
    ly = torch.tensor([max(1, m - cut), m])
    ref = soft_dtw_reference(cost, gamma, lengths_x=lx, lengths_y=ly)
    for backend in FAST:
        got = soft_dtw(cost, gamma, lengths_x=lx, lengths_y=ly, backend=backend)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_long_sequences_float32_against_float64():
    """200 x 150 (the Python oracle is too slow here): float32 numba/torch vs float64 numba, which the oracle
    tests above validate, cross-checked by the independent float64 torch wavefront."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 200, 32, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 150, 32, generator=gen, dtype=torch.float64)
    cost = cosine_cost(x, y)
    lx, ly = torch.tensor([200, 170]), torch.tensor([150, 99])
    ref_val, ref_grad = _run(cost, 0.1, "numba", lx, ly)
    val_t64, grad_t64 = _run(cost, 0.1, "torch", lx, ly)
    torch.testing.assert_close(val_t64, ref_val, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_t64, ref_grad, rtol=0, atol=1e-12)
    for backend in FAST:
        val, grad = _run(cost.float(), 0.1, backend, lx, ly)
        assert float((val.double() - ref_val).abs().max() / ref_val.abs().max()) < 1e-6
        assert float((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()) < 1e-4


def test_numba_weight_buffers_are_recycled_only_after_the_graph_is_freed():
    gen = torch.Generator().manual_seed(12)
    costs = [torch.rand(2, 40, 33, generator=gen, requires_grad=True) for _ in range(3)]
    expected = []
    for cost in costs:
        (grad,) = torch.autograd.grad(soft_dtw(cost, 0.2).sum(), cost)
        expected.append(grad)
    pool = sdtw_module._WEIGHT_POOL
    pool._free.clear()
    live = [soft_dtw(cost, 0.2) for cost in costs]  # three graphs alive at once: three distinct buffers
    assert len(pool._free) == 0
    for values, cost, grad in zip(live, costs, expected):
        (got,) = torch.autograd.grad(values.sum(), cost)
        assert torch.equal(got, grad)
    del live, values
    assert len(pool._free) == 3
    values = soft_dtw(costs[0], 0.2)  # reuses a pooled buffer
    assert len(pool._free) == 2
    (got,) = torch.autograd.grad(values.sum(), costs[0])
    assert torch.equal(got, expected[0])


# --------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("backend", FAST)
def test_no_denormals_in_gradient(backend):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 128, 64, generator=gen)
    y = torch.randn(4, 128, 64, generator=gen)
    for cost in (cosine_cost(x, y), cosine_cost(x, x)):
        _, grad = _run(cost, 0.1, backend)
        tiny = (grad != 0) & (grad.abs() < TINY)
        assert int(tiny.sum()) == 0
        # the guard had work to do: most of the matrix is flushed to exact zeros
        assert float((grad == 0).float().mean()) > 0.5
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", FAST)
def test_bfloat16_input_accumulates_in_float32(backend):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 48, 32, generator=gen)
    y = torch.randn(2, 40, 32, generator=gen)
    cost16 = cosine_cost(x, y).to(torch.bfloat16)
    values, grad = _run(cost16, 0.1, backend)
    assert values.dtype == torch.float32 and grad.dtype == torch.bfloat16
    # float32 run on the same (bf16-rounded) costs: equal to float32 accuracy, not bf16 accuracy (~4e-3)
    ref_val, ref_grad = _run(cost16.double(), 0.1, "numba")
    assert float((values.double() - ref_val).abs().max() / ref_val.abs().max()) < 1e-6
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-3)  # grad is stored in bf16


@pytest.mark.parametrize("backend", FAST)
def test_float32_small_gamma_is_finite(backend):
    gen = torch.Generator().manual_seed(2)
    cost = cosine_cost(torch.randn(2, 60, 16, generator=gen), torch.randn(2, 45, 16, generator=gen))
    cost = cost + 1.0 * (torch.rand(2, 60, 45, generator=gen) > 0.8)  # a soft band penalty
    for gamma in (1e-3, 1.0):
        values, grad = _run(cost, gamma, backend, torch.tensor([60, 30]), torch.tensor([45, 44]))
        assert torch.isfinite(values).all() and torch.isfinite(grad).all()


# ------------------------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("backend", FAST)
def test_divergence_of_a_sequence_with_itself_is_zero(backend):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 17, 24, generator=gen, requires_grad=True)
    lengths = torch.tensor([17, 9, 1])
    cost = cosine_cost(x, x)
    div = soft_dtw_divergence(cost, cost, cost, 0.5, lengths_x=lengths, lengths_y=lengths, backend=backend)
    assert torch.equal(div, torch.zeros_like(div))
    div.sum().backward()
    assert float(x.grad.abs().max()) < 1e-6


@pytest.mark.parametrize("backend", FAST)
def test_divergence_stacked_equals_three_separate_calls(backend):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 14, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 9, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    lx, ly = torch.tensor([14, 5, 11]), torch.tensor([9, 9, 2])
    gamma = 0.3
    div = soft_dtw_divergence(
        cosine_cost(x, y),
        cosine_cost(x, x),
        cosine_cost(y, y),
        gamma,
        lengths_x=lx,
        lengths_y=ly,
        backend=backend,
    )
    gx, gy = torch.autograd.grad(div.sum(), (x, y))
    xy = soft_dtw(cosine_cost(x, y), gamma, lengths_x=lx, lengths_y=ly, backend=backend)
    xx = soft_dtw(cosine_cost(x, x), gamma, lengths_x=lx, lengths_y=lx, backend=backend)
    yy = soft_dtw(cosine_cost(y, y), gamma, lengths_x=ly, lengths_y=ly, backend=backend)
    separate = xy - 0.5 * (xx + yy)
    rx, ry = torch.autograd.grad(separate.sum(), (x, y))
    torch.testing.assert_close(div, separate, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gy, ry, rtol=1e-10, atol=1e-12)
    ref = soft_dtw_reference(cosine_cost(x, y), gamma, lengths_x=lx, lengths_y=ly) - 0.5 * (
        soft_dtw_reference(cosine_cost(x, x), gamma, lengths_x=lx, lengths_y=lx)
        + soft_dtw_reference(cosine_cost(y, y), gamma, lengths_x=ly, lengths_y=ly)
    )
    torch.testing.assert_close(div, ref, rtol=1e-12, atol=1e-12)


def test_divergence_accepts_the_losses_padded_layout():
    """student_train/losses pads all three costs to one [B, L, L] and passes per-pair lengths."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 12, 8, generator=gen)
    y = torch.randn(2, 12, 8, generator=gen)
    lx, ly = torch.tensor([12, 6]), torch.tensor([7, 12])
    div = soft_dtw_divergence(
        cosine_cost(x, y), cosine_cost(x, x), cosine_cost(y, y), 2.0, lengths_x=lx, lengths_y=ly
    )
    assert div.shape == (2,) and div.dtype == torch.float32 and torch.isfinite(div).all()


# ------------------------------------------------------------------------------------------- cosine cost


def test_cosine_cost_values_and_gradcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    expected = 1 - torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(y, dim=-1).mT
    torch.testing.assert_close(cosine_cost(x, y), expected.clamp(0, 2))
    assert torch.autograd.gradcheck(cosine_cost, (x, y))
    same = cosine_cost(x, x).detach()
    assert float(same.min()) >= 0.0 and float(same.max()) <= 2.0
    assert float(torch.diagonal(same, dim1=1, dim2=2).abs().max()) < 1e-12


# ------------------------------------------------------------------------------------ validation, dispatch


def test_invalid_inputs_raise_actionable_errors():
    cost = torch.rand(2, 5, 4)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        soft_dtw(cost, 0.0)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        soft_dtw(cost, -1.0)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        soft_dtw(cost, float("nan"))
    bad = cost.clone()
    bad[1, 4, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or"):
        soft_dtw(bad, 0.1)
    bad[1, 4, 3] = float("inf")
    with pytest.raises(ValueError, match="padding cells included"):
        soft_dtw(bad, 0.1)
    with pytest.raises(ValueError, match=r"cost must have shape \[B, N, M\]"):
        soft_dtw(cost[0], 0.1)
    with pytest.raises(ValueError, match=r"lengths_x must have shape \[B\] = \[2\]"):
        soft_dtw(cost, 0.1, lengths_x=torch.tensor([5, 5, 5]))
    with pytest.raises(ValueError, match=r"lengths_y must lie in \[1, M=4\]"):
        soft_dtw(cost, 0.1, lengths_y=torch.tensor([4, 5]))
    with pytest.raises(ValueError, match=r"lengths_x must lie in \[1, N=5\].*drop them"):
        soft_dtw(cost, 0.1, lengths_x=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="must hold integers"):
        soft_dtw(cost, 0.1, lengths_x=torch.tensor([5.0, 5.0]))
    with pytest.raises(ValueError, match="too large for the finite sentinel"):
        soft_dtw(cost * 1e8, 0.1)
    with pytest.raises(ValueError, match="backend must be one of"):
        soft_dtw(cost, 0.1, backend="cuda")
    with pytest.raises(TypeError, match="floating"):
        soft_dtw(torch.ones(2, 3, 3, dtype=torch.int64), 0.1)


def test_divergence_validation():
    xy, xx, yy = torch.rand(2, 5, 4), torch.rand(2, 5, 5), torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="batch sizes differ"):
        soft_dtw_divergence(xy, xx[:1], yy, 0.1)
    with pytest.raises(ValueError, match="cost_xx must be square"):
        soft_dtw_divergence(xy, xx[:, :, :4], yy, 0.1)
    with pytest.raises(ValueError, match="cost_yy must be square"):
        soft_dtw_divergence(xy, xx, yy[:, :3, :3], 0.1)
    with pytest.raises(ValueError, match="gamma"):
        soft_dtw_divergence(xy, xx, yy, 0.0)
    with pytest.raises(ValueError, match="share batch size"):
        cosine_cost(torch.rand(2, 3, 4), torch.rand(3, 3, 4))


def test_auto_dispatch_is_explicit(monkeypatch):
    assert sdtw_module._resolve_backend("auto", torch.device("cpu")) == "numba"
    if sdtw_module.triton is not None:
        assert sdtw_module._resolve_backend("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="backend='numba' runs on CPU tensors"):
        sdtw_module._resolve_backend("numba", torch.device("cuda"))
    monkeypatch.setattr(sdtw_module, "triton", None)
    with pytest.raises(ImportError, match="pass backend='torch'"):
        sdtw_module._resolve_backend("auto", torch.device("cuda"))
    assert sdtw_module._resolve_backend("torch", torch.device("cuda")) == "torch"
    monkeypatch.setattr(sdtw_module, "numba", None)
    with pytest.raises(ImportError, match="backend='torch'"):
        soft_dtw(torch.rand(1, 3, 3), 0.1)


@pytest.mark.skipif(sdtw_module.triton is None, reason="triton not installed")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        soft_dtw(torch.rand(1, 3, 3), 0.1, backend="triton")


# ----------------------------------------------------------------------------- Triton (interpreter, CPU)

_TRITON_SCRIPT = textwrap.dedent(
    """
    import importlib, json, torch
    from student_train.kernels import cosine_cost, soft_dtw, soft_dtw_reference, soft_dtw_divergence
    mod = importlib.import_module("student_train.kernels.soft_dtw")
    out = {"cases": []}
    gen = torch.Generator().manual_seed(0)
    cases = [(2, 7, 5, [7, 3], [5, 5], 0.1), (2, 1, 6, None, None, 1.0), (2, 6, 1, None, None, 0.01),
             (3, 20, 18, [20, 20, 4], [18, 2, 18], 0.1), (1, 37, 34, None, None, 0.5)]
    for bsz, n, m, lx, ly, gamma in cases:
        # a 16-wide tile forces several tiles per diagonal on the larger cases
        mod._TRITON_MAX_BLOCK = 16 if n > 30 else 1024
        cost = torch.rand(bsz, n, m, generator=gen, dtype=torch.float64)
        lxt = None if lx is None else torch.tensor(lx)
        lyt = None if ly is None else torch.tensor(ly)
        up = torch.tensor([1.0, -0.5, 2.0][:bsz], dtype=torch.float64)
        c64 = cost.clone().requires_grad_()
        ref = soft_dtw_reference(c64, gamma, lengths_x=lxt, lengths_y=lyt)
        (ref * up).sum().backward()
        for dtype in (torch.float64, torch.float32):
            c = cost.detach().to(dtype).clone().requires_grad_()
            val = soft_dtw(c, gamma, lengths_x=lxt, lengths_y=lyt, backend="triton")
            (val * up.to(val.dtype)).sum().backward()
            pad_ok = True
            for b in range(bsz):
                nb = n if lx is None else lx[b]
                mb = m if ly is None else ly[b]
                pad_ok &= bool((c.grad[b, nb:] == 0).all() and (c.grad[b, :, mb:] == 0).all())
            out["cases"].append({
                "shape": [bsz, n, m], "dtype": str(dtype), "gamma": gamma,
                "val_err": float((val.double() - ref.detach()).abs().max()),
                "grad_err": float((c.grad.double() - c64.grad).abs().max()),
                "pad_zero": pad_ok,
            })
    mod._TRITON_MAX_BLOCK = 1024
    c = torch.rand(2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    out["gradcheck"] = bool(torch.autograd.gradcheck(
        lambda t: soft_dtw(t, 0.3, lengths_x=torch.tensor([4, 2]), backend="triton"), (c,)))
    x = torch.randn(2, 40, 16, generator=gen)
    y = torch.randn(2, 40, 16, generator=gen)
    cst = cosine_cost(x, y).detach().requires_grad_()
    soft_dtw(cst, 0.1, backend="triton").sum().backward()
    g = cst.grad
    out["denormals"] = int(((g != 0) & (g.abs() < torch.finfo(torch.float32).tiny)).sum())
    out["zeros_frac"] = float((g == 0).float().mean())
    cst2 = cst.detach().clone().requires_grad_()
    soft_dtw(cst2, 0.1, backend="numba").sum().backward()
    out["vs_numba"] = float((g - cst2.grad).abs().max())
    c16 = cosine_cost(x, y).to(torch.bfloat16)
    v16 = soft_dtw(c16, 0.1, backend="triton")
    v32 = soft_dtw(c16.double(), 0.1, backend="numba")
    out["bf16_dtype"] = str(v16.dtype)
    out["bf16_rel"] = float((v16.double() - v32).abs().max() / v32.abs().max())
    cxx = cosine_cost(x, x)
    div = soft_dtw_divergence(cxx, cxx, cxx, 0.5, backend="triton")
    out["self_div"] = float(div.abs().max())
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(sdtw_module.triton is None, reason="triton not installed")
def test_triton_kernels_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["cases"]) == 10
    for case in out["cases"]:
        assert case["pad_zero"], case
        if case["dtype"] == "torch.float64":
            assert case["val_err"] < 1e-10 and case["grad_err"] < 1e-10, case
        else:
            assert case["val_err"] < 2e-5 and case["grad_err"] < 2e-4, case
    assert out["gradcheck"]
    assert out["denormals"] == 0 and out["zeros_frac"] > 0.3
    assert out["vs_numba"] < 1e-5
    assert out["bf16_dtype"] == "torch.float32" and out["bf16_rel"] < 1e-6
    assert out["self_div"] == 0.0
