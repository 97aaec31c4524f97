"""task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs and LiNeS against float64 formulas."""

from typing import Any

import pytest
import torch

from merge_ops import layers
from merge_ops import params as pv
from merge_ops.errors import SpecError
from merge_ops.methods import breadcrumbs, dare_ties, task_arithmetic, ties
from merge_ops.methods import dare_linear as dare
from merge_ops.static import kernels
from merge_ops.static.inputs import TensorInputs

F64 = torch.float64


def models(shape: tuple[int, ...], n_experts: int, dtype: torch.dtype, seed: int = 0,
           ties: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and experts near it. With `ties`, deltas are few multiples of 2^-10: heavy ties."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g, dtype=F64) * 0.05).to(dtype)
    experts = []
    for _ in range(n_experts):
        if ties:
            d = torch.randint(-3, 4, shape, generator=g).to(F64) * 2.0 ** -10
            base = torch.round(base.to(F64) * 2**8).div(2**8).to(dtype)  # exact grid: exact deltas
        else:
            d = torch.randn(shape, generator=g, dtype=F64) * 0.005
        experts.append((base.to(F64) + d).to(dtype))
    return base, experts


def inputs(base: torch.Tensor | None, experts: list[torch.Tensor], model: list[dict[str, Any]] | None = None,
           out_dtype: torch.dtype = torch.float32, layer: int | None = None, n_layers: int = 1,
           seed: int = 0, compute: torch.dtype = torch.float32, **glob: Any) -> TensorInputs:
    return TensorInputs(name="model.layers.0.mlp.weight", base=base, experts=experts,
                        model_params=model or [{} for _ in experts], params=glob, compute_dtype=compute,
                        out_dtype=out_dtype, layer=layer, n_layers=n_layers,
                        generator=torch.Generator().manual_seed(seed))


def topk_mask(d: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest |d|, ties by index order (a stable descending sort)."""
    m = torch.zeros(d.numel(), dtype=torch.bool)
    m[torch.sort(d.abs().reshape(-1), descending=True, stable=True).indices[:k]] = True
    return m.view(d.shape)


def band_mask(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's magnitude_outliers band, ranks taken from the same stable descending order."""
    n = d.numel()
    keep, top = int(density * n), int(gamma * n)
    bot = max(0, n - keep - top)
    order = torch.sort(d.abs().reshape(-1), descending=True, stable=True).indices
    m = torch.zeros(n, dtype=torch.bool)
    m[order[n - bot - keep:n - bot]] = True
    return m.view(d.shape)


def reference(base: torch.Tensor, experts: list[torch.Tensor], w: list[float],
              masks: list[torch.Tensor] | None = None, consensus: bool = False, normalize: bool = False,
              lam: float = 1.0, rescale: bool = False) -> torch.Tensor:
    """mergekit's generalized task arithmetic, in float64."""
    b = base.to(F64)
    ds = []
    for i, e in enumerate(experts):
        d = e.to(F64) - b
        if masks is not None:
            kept = d * masks[i]
            before, after = d.abs().sum(), kept.abs().sum()
            if rescale and before >= 1e-7 and after >= 1e-7:
                kept = kept * (before / after)
            d = kept
        ds.append(d * w[i])
    deltas = torch.stack(ds)
    weights = torch.tensor(w, dtype=F64).view(-1, *[1] * b.dim())
    if consensus:
        majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(F64)
        agree = torch.sign(deltas) == majority
        mixed = (deltas * agree).sum(0)
        div = (weights * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed = deltas.sum(0)
        div = weights.sum()
        div = torch.ones((), dtype=F64) if div.abs() < 1e-8 else div
    if normalize:
        mixed = mixed / div
    return b + lam * mixed


def close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 outputs within fp32 rounding of the float64 formula; bf16 within one bf16 rounding."""
    if out.dtype == torch.bfloat16:
        torch.testing.assert_close(out.to(F64), ref, rtol=2**-8, atol=1e-6)
    else:
        torch.testing.assert_close(out.to(F64), ref, rtol=1e-5, atol=1e-7)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force many blocks per tensor, so block edges and tie runs across blocks are exercised."""
    monkeypatch.setattr(kernels, "BLOCK_CPU", 1000)


# -- task arithmetic --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_task_arithmetic_matches_formula(dtype: torch.dtype, out_dtype: torch.dtype, small_blocks: None) -> None:
    base, experts = models((64, 50), 3, dtype)
    w = [0.7, -0.3, 1.2]
    model = [{"weight": x} for x in w]
    for normalize in (False, True):
        out = task_arithmetic.merge_tensor(inputs(base, experts, model, out_dtype, **{"lambda": 0.8},
                                                  normalize=normalize))
        assert out.dtype == out_dtype and out.shape == base.shape
        close(out, reference(base, experts, w, normalize=normalize, lam=0.8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_expert_with_weight_one_reproduces_it(dtype: torch.dtype) -> None:
    base, experts = models((300,), 1, dtype)
    out = task_arithmetic.merge_tensor(inputs(base, experts, [{"weight": 1.0}], out_dtype=dtype))
    assert torch.equal(out, experts[0])


@pytest.mark.parametrize("module", [task_arithmetic, ties, dare, dare_ties, breadcrumbs])
def test_identical_models_merge_to_the_model(module: Any) -> None:
    base, _ = models((40, 30), 1, torch.bfloat16)
    model = [{"weight": 0.6, "density": 0.5, "gamma": 0.1} for _ in range(3)]
    out = module.merge_tensor(inputs(base, [base.clone() for _ in range(3)], model, torch.bfloat16))
    assert torch.equal(out, base)


def test_task_vector_methods_need_a_base() -> None:
    _, experts = models((10,), 2, torch.float32)
    with pytest.raises(SpecError, match="base"):
        task_arithmetic.merge_tensor(inputs(None, experts))


def test_per_layer_gradients_give_each_expert_its_own_weight() -> None:
    """Weights resolved from per-expert gradients at two depths reach the right experts."""
    n_layers = 4
    gradients = [[0.0, 1.0], [1.0, 0.0, 0.5]]
    base, experts = models((20, 8), 2, torch.float32, seed=5)
    for layer in (1, 3):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        t = layers.depth_fraction(name, n_layers)
        w = [float(pv.resolve(g, name, t)) for g in gradients]
        x = inputs(base, experts, [{"weight": v} for v in w], layer=layer, n_layers=n_layers)
        close(task_arithmetic.merge_tensor(x), reference(base, experts, w))
    assert w == [1.0, 0.5]  # last block: end of each gradient


# -- TIES -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heavy_ties", [False, True])
def test_ties_matches_formula(dtype: torch.dtype, heavy_ties: bool, small_blocks: None) -> None:
    base, experts = models((50, 81), 3, dtype, seed=1, ties=heavy_ties)
    n = base.numel()
    # weights whose sums cannot cancel exactly: an exact 0 elects +, a rounding residue decides
    cases = [
        ([0.7, 0.5, 1.3], [0.5, 0.3, 0.7], {}),
        ([1.0, -0.5, 1.0], [0.4, 0.4, 0.4], {"normalize": False, "lambda": 1.3}),
        ([0.7, 0.5, 1.2], [0.2, 0.9, 0.001], {"rescale": True}),
        ([1.0, 1.0, 0.0], [1.0, 0.0, 0.5], {}),
        ([1.0, -0.61803, 0.41421], [0.6, 0.6, 0.6], {}),  # normalize, a negative weight: zero divisors
    ]
    for w, density, glob in cases:
        model = [{"weight": a, "density": d} for a, d in zip(w, density, strict=True)]
        out = ties.merge_tensor(inputs(base, experts, model, **glob))
        deltas = [e.to(F64) - base.to(F64) for e in experts]
        masks = [topk_mask(d, ties.top_k(p, n)) for d, p in zip(deltas, density, strict=True)]
        ref = reference(base, experts, w, masks, consensus=True, normalize=glob.get("normalize", True),
                        lam=glob.get("lambda", 1.0), rescale=glob.get("rescale", False))
        close(out, ref)


def test_ties_keeps_exactly_k_with_ties_by_index_order(small_blocks: None) -> None:
    base = torch.zeros(5000)
    expert = torch.zeros(5000)
    expert[::2] = 1.0  # 2500 tied magnitudes, spread over several blocks
    expert[7] = 3.0
    out = ties.merge_tensor(inputs(base, [expert], [{"density": 0.1}], normalize=False))
    kept = out.nonzero().squeeze(1)
    assert kept.numel() == 500
    assert kept.tolist() == [0, 2, 4, 6, 7] + list(range(8, 2 * 495 + 8, 2))[:495]


def test_ties_with_density_one_and_one_expert_is_task_arithmetic() -> None:
    base, experts = models((33, 17), 1, torch.bfloat16, seed=2)
    a = ties.merge_tensor(inputs(base, experts, [{"density": 1.0}], **{"lambda": 0.9}))
    b = task_arithmetic.merge_tensor(inputs(base, experts, **{"lambda": 0.9}))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)  # same sum, different rounding order
    model = [{"weight": 0.6, "density": 1.0}]
    a = ties.merge_tensor(inputs(base, experts, model, normalize=False))
    b = task_arithmetic.merge_tensor(inputs(base, experts, model))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_ties_density_zero_returns_the_base() -> None:
    base, experts = models((100,), 2, torch.float32)
    out = ties.merge_tensor(inputs(base, experts, [{"density": 0.0}, {"density": 0.0}]))
    assert torch.equal(out, base)


# -- DARE -------------------------------------------------------------------------------------

def dare_masks(shape: tuple[int, ...], density: list[float], seed: int) -> list[torch.Tensor]:
    """The documented mask stream, for a tensor in one block: per expert, 16-bit uniforms (four per
    int64 draw of the generator), kept when below round(density·2^16)."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod())
    out = []
    for p in density:
        words = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(1 << 63), None, generator=g)
        lanes = words.view(torch.int16)[:n].to(torch.int32) + 32768
        out.append((lanes < round(p * 65536)).view(shape))
    return out


@pytest.mark.parametrize("module,consensus", [(dare, False), (dare_ties, True)])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_matches_formula(module: Any, consensus: bool, rescale: bool) -> None:
    base, experts = models((40, 60), 3, torch.bfloat16, seed=3)
    w, density = [0.9, 0.4, 1.1], [0.3, 0.5, 0.9]
    model = [{"weight": a, "density": d} for a, d in zip(w, density, strict=True)]
    out = module.merge_tensor(inputs(base, experts, model, seed=11, rescale=rescale, **{"lambda": 0.7}))
    masks = dare_masks(base.shape, density, seed=11)
    close(out, reference(base, experts, w, masks, consensus=consensus, lam=0.7, rescale=rescale))


def test_dare_keeps_density_and_rescale_preserves_the_mean() -> None:
    n = 200_000
    base = torch.zeros(n)
    expert = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 0.5  # positive task vector
    for density in (0.1, 0.5, 0.9):
        plain = dare.merge_tensor(inputs(base, [expert], [{"density": density}], rescale=False))
        kept = float((plain != 0).double().mean())
        assert abs(kept - density) < 0.01  # binomial sd <= 0.0012
        scaled = dare.merge_tensor(inputs(base, [expert], [{"density": density}], rescale=True))
        assert torch.equal(scaled != 0, plain != 0)  # same seed, same mask
        torch.testing.assert_close(scaled.double().sum(), expert.double().sum(), rtol=1e-5, atol=0)
        assert abs(float(scaled.mean()) / float(expert.mean()) - 1) < 1e-5


def test_dare_is_deterministic_per_seed() -> None:
    base, experts = models((50, 50), 2, torch.bfloat16)
    model = [{"density": 0.5}, {"density": 0.5}]
    a = dare_ties.merge_tensor(inputs(base, experts, model, seed=1))
    b = dare_ties.merge_tensor(inputs(base, experts, model, seed=1))
    c = dare_ties.merge_tensor(inputs(base, experts, model, seed=2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_masks_do_not_depend_on_the_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    base, experts = models((30, 100), 2, torch.float32)
    model = [{"density": 0.4}, {"density": 0.6}]
    whole = dare.merge_tensor(inputs(base, experts, model, seed=4))
    monkeypatch.setattr(kernels, "BLOCK_CPU", 1000)
    blocked = dare.merge_tensor(inputs(base, experts, model, seed=4))
    # the stream is drawn block by block and expert by expert: masks differ, statistics do not
    assert whole.shape == blocked.shape
    for out in (whole, blocked):
        kept = (out != base).double().mean()
        assert 0.4 < float(kept) < 0.85


# -- Breadcrumbs ------------------------------------------------------------------------------

@pytest.mark.parametrize("heavy_ties", [False, True])
def test_breadcrumbs_matches_formula(heavy_ties: bool, small_blocks: None) -> None:
    base, experts = models((60, 70), 2, torch.bfloat16, seed=4, ties=heavy_ties)
    w = [0.8, 1.3]
    for density, gamma, glob in ((0.8, 0.05, {}), (0.9, 0.3, {}), (0.5, 0.0, {"rescale": True}),
                                 (0.3, 0.01, {"normalize": True})):
        model = [{"weight": a, "density": density, "gamma": gamma} for a in w]
        out = breadcrumbs.merge_tensor(inputs(base, experts, model, **glob))
        masks = [band_mask(e.to(F64) - base.to(F64), density, gamma) for e in experts]
        assert all(int(m.sum()) == int(density * base.numel()) for m in masks)
        close(out, reference(base, experts, w, masks, normalize=glob.get("normalize", False),
                             rescale=glob.get("rescale", False)))


def test_breadcrumbs_with_density_one_is_task_arithmetic() -> None:
    base, experts = models((20, 20), 2, torch.float32)
    a = breadcrumbs.merge_tensor(inputs(base, experts, [{"density": 1.0, "gamma": 0.2}] * 2))
    b = task_arithmetic.merge_tensor(inputs(base, experts))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- LiNeS ------------------------------------------------------------------------------------

def test_lines_scales_linearly_with_depth() -> None:
    base, experts = models((16, 16), 2, torch.float32, seed=6)
    w = [1.0, 0.5]
    model = [{"weight": a} for a in w]
    n_layers, alpha, beta = 5, 0.3, 0.6
    for layer in (None, 0, 2, 4):
        x = inputs(base, experts, model, layer=layer, n_layers=n_layers, lines=True,
                   lines_alpha=alpha, lines_beta=beta, **{"lambda": 2.0})
        scale = alpha if layer is None else alpha + beta * layer / (n_layers - 1)
        close(task_arithmetic.merge_tensor(x), reference(base, experts, w, lam=2.0 * scale))


def test_lines_default_alpha_is_one_over_n_for_sums_and_one_for_means() -> None:
    base, experts = models((16, 16), 3, torch.float32, seed=7)
    w = [1.0, 1.0, 1.0]
    x = inputs(base, experts, layer=None, n_layers=4, lines=True)
    close(task_arithmetic.merge_tensor(x), reference(base, experts, w, lam=1 / 3))
    x = inputs(base, experts, layer=3, n_layers=4, lines=True, lines_beta=0.5, normalize=True)
    close(task_arithmetic.merge_tensor(x), reference(base, experts, w, normalize=True, lam=1.5))
    model = [{"density": 0.5} for _ in range(3)]
    x = inputs(base, experts, model, layer=0, n_layers=4, lines=True)
    masks = [topk_mask(e.to(F64) - base.to(F64), base.numel() // 2) for e in experts]
    close(ties.merge_tensor(x), reference(base, experts, w, masks, consensus=True, normalize=True))


def test_float64_compute_is_exact_to_float64() -> None:
    base, experts = models((30, 30), 2, F64, seed=8)
    model = [{"weight": 0.4, "density": 0.6}, {"weight": 0.9, "density": 0.6}]
    out = ties.merge_tensor(inputs(base, experts, model, out_dtype=F64, compute=F64))
    masks = [topk_mask(e - base, int(0.6 * base.numel())) for e in experts]
    ref = reference(base, experts, [0.4, 0.9], masks, consensus=True, normalize=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-15)
