"""linear, model_stock and slerp against float64 formulas."""

import itertools
import math
from typing import Any

import pytest
import torch

from merge_ops.errors import SpecError
from merge_ops.methods import linear, model_stock, slerp
from merge_ops.static import kernels
from merge_ops.static.inputs import TensorInputs

F64 = torch.float64


def rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float = 0.05) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale).to(dtype)


def inputs(base: torch.Tensor | None, experts: list[torch.Tensor], model: list[dict[str, Any]] | None = None,
           out_dtype: torch.dtype = torch.float32, **glob: Any) -> TensorInputs:
    return TensorInputs(name="w", base=base, experts=experts, model_params=model or [{} for _ in experts],
                        params=glob, compute_dtype=torch.float32, out_dtype=out_dtype, layer=None, n_layers=1)


def close(out: torch.Tensor, ref: torch.Tensor) -> None:
    if out.dtype == torch.bfloat16:
        torch.testing.assert_close(out.to(F64), ref, rtol=2**-8, atol=1e-6)
    else:
        torch.testing.assert_close(out.to(F64), ref, rtol=1e-5, atol=1e-7)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "BLOCK_CPU", 1000)


# -- linear -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_formula(dtype: torch.dtype, out_dtype: torch.dtype, small_blocks: None) -> None:
    models = [rand((70, 30), dtype, seed) for seed in range(3)]
    w = [0.2, 1.5, 0.7]
    model = [{"weight": a} for a in w]
    total = sum(a * m.to(F64) for a, m in zip(w, models, strict=True))
    close(linear.merge_tensor(inputs(None, models, model, out_dtype)), total / sum(w))
    close(linear.merge_tensor(inputs(None, models, model, out_dtype, normalize=False)), total)


def test_linear_of_one_model_or_identical_models_is_that_model() -> None:
    m = rand((128,), torch.bfloat16, 0)
    assert torch.equal(linear.merge_tensor(inputs(None, [m], out_dtype=torch.bfloat16)), m)
    out = linear.merge_tensor(inputs(None, [m, m.clone(), m.clone()], [{"weight": 0.3}, {"weight": 1.0},
                                                                        {"weight": 2.0}], torch.bfloat16))
    assert torch.equal(out, m)


def test_linear_refuses_weights_that_sum_to_zero() -> None:
    m = rand((8,), torch.float32, 0)
    with pytest.raises(SpecError, match="sum to 0"):
        linear.merge_tensor(inputs(None, [m, m], [{"weight": 1.0}, {"weight": -1.0}]))


# -- model stock ------------------------------------------------------------------------------

def stock_reference(base: torch.Tensor, experts: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """Model Stock as mergekit computes it, in float64."""
    b = base.to(F64)
    rows = b.reshape(-1, b.shape[-1]) if filter_wise and b.dim() > 1 else b.reshape(1, -1)
    taus = [e.to(F64).reshape(rows.shape) - rows for e in experts]
    cos = []
    for x, y in itertools.combinations(taus, 2):
        c = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-6)
        cos.append(c.clamp(-1, 1))
    c = torch.stack(cos).mean(0)
    k = len(experts)
    t = k * c / (1 + (k - 1) * c)
    t = torch.where((1 + (k - 1) * c).abs() < 1e-6, 0.0, t).unsqueeze(-1)
    mean = sum(e.to(F64).reshape(rows.shape) for e in experts) / k
    return (t * mean + (1 - t) * rows).reshape(base.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_formula(dtype: torch.dtype, filter_wise: bool, small_blocks: None) -> None:
    base = rand((40, 60), dtype, 0)
    shared = rand((40, 60), F64, 9, 0.004)  # a common direction: positive cosines
    for k in (2, 3, 4):
        experts = [(base.to(F64) + shared + rand((40, 60), F64, 10 + i, 0.004)).to(dtype) for i in range(k)]
        out = model_stock.merge_tensor(inputs(base, experts, filter_wise=filter_wise))
        close(out, stock_reference(base, experts, filter_wise))


def test_model_stock_ratio_is_not_clamped() -> None:
    """Opposed task vectors give t < 0, as in mergekit (documented decision)."""
    base = torch.zeros(1000)
    tau = rand((1000,), torch.float32, 1)
    experts = [base + tau, base - 0.8 * tau + 0.3 * rand((1000,), torch.float32, 2)]
    g = kernels.gram(experts, base, torch.float32)
    t = float(model_stock.ratio(g)[0])
    assert t < 0
    close(model_stock.merge_tensor(inputs(base, experts)), stock_reference(base, experts, False))


def test_model_stock_of_identical_models_is_the_model_and_needs_two_experts() -> None:
    base = rand((20, 20), torch.bfloat16, 3)
    out = model_stock.merge_tensor(inputs(base, [base.clone(), base.clone()], out_dtype=torch.bfloat16))
    assert torch.equal(out, base)
    with pytest.raises(SpecError, match="two experts"):
        model_stock.merge_tensor(inputs(base, [base]))


def test_model_stock_one_dimensional_tensors_are_one_filter() -> None:
    base = rand((500,), torch.float32, 4)
    experts = [base + rand((500,), torch.float32, 5 + i, 0.01) for i in range(3)]
    a = model_stock.merge_tensor(inputs(base, experts, filter_wise=True))
    b = model_stock.merge_tensor(inputs(base, experts, filter_wise=False))
    assert torch.equal(a, b)


# -- slerp ------------------------------------------------------------------------------------

def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    x, y = a.to(F64).reshape(-1), b.to(F64).reshape(-1)
    na, nb = x.norm(), y.norm()
    dot = float(((x / na) * (y / nb)).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        out = (1 - t) * x + t * y
    else:
        th = math.acos(dot)
        out = math.sin((1 - t) * th) / math.sin(th) * x + math.sin(t * th) / math.sin(th) * y
    return out.reshape(a.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_slerp_matches_formula(dtype: torch.dtype, small_blocks: None) -> None:
    a, b = rand((50, 70), dtype, 0), rand((50, 70), dtype, 1)
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        close(slerp.merge_tensor(inputs(a, [b], t=t)), slerp_reference(a, b, t))
    assert torch.equal(slerp.merge_tensor(inputs(a, [b], out_dtype=dtype, t=0.0)), a)
    assert torch.equal(slerp.merge_tensor(inputs(a, [b], out_dtype=dtype, t=1.0)), b)


def test_slerp_falls_back_to_lerp_when_collinear() -> None:
    a = rand((300,), torch.float32, 2)
    b = 1.5 * a + 1e-4 * rand((300,), torch.float32, 3)  # cos > 0.9995
    out = slerp.merge_tensor(inputs(a, [b], t=0.3))
    torch.testing.assert_close(out.to(F64), 0.7 * a.to(F64) + 0.3 * b.to(F64), rtol=1e-6, atol=1e-8)
    close(out, slerp_reference(a, b, 0.3))
    m = a.to(torch.bfloat16)  # identical models come back exactly in their stored dtype
    assert torch.equal(slerp.merge_tensor(inputs(m, [m.clone()], out_dtype=torch.bfloat16, t=0.4)), m)


def test_slerp_needs_t_and_one_expert() -> None:
    a = rand((10,), torch.float32, 0)
    with pytest.raises(SpecError, match="`t`"):
        slerp.merge_tensor(inputs(a, [a]))
    with pytest.raises(SpecError, match="exactly one expert"):
        slerp.merge_tensor(inputs(a, [a, a], t=0.5))
