"""The mergekit methods added for drop-in configs (breadcrumbs_ties, della, della_linear, sce, nuslerp,
multislerp, karcher, nearswap, arcee_fusion, passthrough, ram, ramplus_tl) against float64 formulas
written from mergekit's definitions."""

import math
from typing import Any

import pytest
import torch

from merge_ops.errors import SpecError
from merge_ops.methods import (
    METHODS,
    arcee_fusion,
    breadcrumbs_ties,
    della,
    della_linear,
    karcher,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    ramplus_tl,
    sce,
)
from merge_ops.spec import spec_from_dict
from merge_ops.static import kernels
from merge_ops.static.inputs import TensorInputs

F64 = torch.float64
NEW = ("breadcrumbs_ties", "della", "della_linear", "sce", "nuslerp", "multislerp", "karcher", "nearswap",
       "arcee_fusion", "passthrough", "ram", "ramplus_tl")


def rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float = 0.05) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale).to(dtype)


def models(shape: tuple[int, ...], n: int, dtype: torch.dtype = torch.float32, seed: int = 0,
           ties: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and n experts near it; with `ties`, deltas are few multiples of 2^-10 (heavy ties)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g, dtype=F64) * 0.05)
    if ties:
        base = torch.round(base * 2**8) / 2**8
    experts = []
    for _ in range(n):
        d = (torch.randint(-3, 4, shape, generator=g).to(F64) * 2.0**-10 if ties
             else torch.randn(shape, generator=g, dtype=F64) * 0.005)
        experts.append((base + d).to(dtype))
    return base.to(dtype), experts


def inputs(base: torch.Tensor | None, experts: list[torch.Tensor], model: list[dict[str, Any]] | None = None,
           out_dtype: torch.dtype = torch.float32, compute: torch.dtype = torch.float32, seed: int = 0,
           **glob: Any) -> TensorInputs:
    return TensorInputs(name="model.layers.0.mlp.weight", base=base, experts=experts,
                        model_params=model or [{} for _ in experts], params=glob, compute_dtype=compute,
                        out_dtype=out_dtype, layer=0, n_layers=1,
                        generator=torch.Generator().manual_seed(seed))


def close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    if out.dtype == torch.bfloat16:
        torch.testing.assert_close(out.to(F64), ref, rtol=2**-8, atol=1e-6)
    else:
        torch.testing.assert_close(out.to(F64), ref, rtol=rtol, atol=atol)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many blocks per tensor: block edges cut rows and tie runs."""
    monkeypatch.setattr(kernels, "BLOCK_CPU", 1000)


def task_arithmetic_ref(base: torch.Tensor, experts: list[torch.Tensor], w: list[float],
                        masks: list[torch.Tensor], consensus: bool, normalize: bool, rescale: bool,
                        lam: float = 1.0) -> torch.Tensor:
    """mergekit's generalized task arithmetic over masked task vectors, float64."""
    b = base.to(F64)
    ds = []
    for e, m, wi in zip(experts, masks, w, strict=True):
        d = e.to(F64) - b
        kept = d * m
        before, after = d.abs().sum(), kept.abs().sum()
        if rescale and before >= 1e-7 and after >= 1e-7:
            kept = kept * (before / after)
        ds.append(kept * wi)
    deltas = torch.stack(ds)
    weights = torch.tensor(w, dtype=F64).view(-1, *[1] * b.dim())
    if consensus:
        agree = torch.sign(deltas) == torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(F64)
        mixed, div = (deltas * agree).sum(0), (weights * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = deltas.sum(0), weights.sum()
        div = torch.ones((), dtype=F64) if div.abs() < 1e-8 else div
    return b + lam * (mixed / div if normalize else mixed)


# -- registry and mergekit YAML ----------------------------------------------------------------

def mergekit_doc(method: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"merge_method": method, "base_model": "org/base",
                           "models": [{"model": "org/a", "parameters": {"weight": 0.6}},
                                      {"model": "org/b", "parameters": {"weight": 0.4}}]}
    if method in {"nearswap", "arcee_fusion"}:
        doc["models"] = doc["models"][:1]
        doc["parameters"] = {"t": 0.001} if method == "nearswap" else {}
    if method == "passthrough":
        doc = {"merge_method": method, "models": [{"model": "org/a", "parameters": {"scale": 0.5}}]}
    if method in {"sce", "karcher", "ram", "ramplus_tl", "nearswap", "arcee_fusion"}:
        for m in doc["models"]:
            m["parameters"] = {}
    return doc


@pytest.mark.parametrize("method", NEW)
def test_every_new_method_is_registered_static_and_reads_a_mergekit_config(method: str) -> None:
    assert METHODS[method].kind == "static"
    spec = spec_from_dict(mergekit_doc(method))
    assert spec.method == method


def test_mergekit_defaults_and_required_parameters() -> None:
    assert METHODS["della"].param("epsilon").default == 0.15
    assert METHODS["della"].param("normalize").default is True
    assert METHODS["della_linear"].param("normalize").default is False
    assert METHODS["della"].param("rescale").default is True
    assert METHODS["breadcrumbs_ties"].param("gamma").default == 0.01
    assert METHODS["breadcrumbs_ties"].param("normalize").default is False
    assert METHODS["sce"].param("select_topk").default == 1.0
    assert METHODS["nuslerp"].param("nuslerp_flatten").default is True
    assert METHODS["nuslerp"].param("nuslerp_row_wise").default is False
    assert METHODS["multislerp"].param("normalize_weights").default is True
    assert METHODS["multislerp"].param("eps").default == 1e-8
    assert METHODS["karcher"].param("max_iter").default == 10
    assert METHODS["karcher"].param("tol").default == 1e-5
    assert METHODS["ram"].param("epsilon").default == 1e-5
    assert (METHODS["ramplus_tl"].param("r").default, METHODS["ramplus_tl"].param("alpha").default) == (0.1, 0.2)
    doc = mergekit_doc("nearswap")
    doc["parameters"] = {}
    with pytest.raises(SpecError, match="needs parameter 't'"):
        spec_from_dict(doc)
    doc = mergekit_doc("nuslerp")
    doc["models"][1]["parameters"] = {}
    with pytest.raises(SpecError, match="weight"):
        spec_from_dict(doc)


def test_della_refuses_epsilon_outside_density_and_passthrough_refuses_a_base() -> None:
    doc = mergekit_doc("della")
    doc["parameters"] = {"density": 0.1, "epsilon": 0.2}
    with pytest.raises(SpecError, match=r"density ± epsilon"):
        spec_from_dict(doc)
    doc = mergekit_doc("passthrough")
    doc["base_model"] = "org/base"
    with pytest.raises(SpecError, match="passthrough copies exactly one model"):
        spec_from_dict(doc)


# -- breadcrumbs_ties --------------------------------------------------------------------------

def band_mask(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's magnitude_outliers band; equal magnitudes ranked by index (a stable sort)."""
    n = d.numel()
    keep, top = int(density * n), int(gamma * n)
    bot = max(0, n - keep - top)
    order = torch.sort(d.abs().reshape(-1), descending=True, stable=True).indices
    m = torch.zeros(n, dtype=torch.bool)
    m[order[n - bot - keep:n - bot]] = True
    return m.view(d.shape)


@pytest.mark.parametrize("heavy_ties", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_ties_matches_formula(heavy_ties: bool, normalize: bool, small_blocks: None) -> None:
    base, experts = models((60, 70), 3, torch.bfloat16, seed=3, ties=heavy_ties)
    w, dens, gam = [0.5, 0.3, -0.2], [0.5, 0.7, 0.4], [0.05, 0.1, 0.0]
    model = [{"weight": a, "density": b, "gamma": c} for a, b, c in zip(w, dens, gam, strict=True)]
    out = breadcrumbs_ties.merge_tensor(inputs(base, experts, model, normalize=normalize, rescale=True))
    masks = [band_mask(e.to(F64) - base.to(F64), d, g) for e, d, g in zip(experts, dens, gam, strict=True)]
    close(out, task_arithmetic_ref(base, experts, w, masks, consensus=True, normalize=normalize, rescale=True))


# -- della / della_linear ----------------------------------------------------------------------

def magprune_probs(d: torch.Tensor, density: float, eps: float) -> torch.Tensor:
    """mergekit's della_magprune keep probabilities, rows along the last dimension, in float32."""
    rows = d.reshape(1, -1) if d.dim() == 1 else d
    c = rows.shape[-1]
    ranks = torch.sort(rows.abs(), dim=-1, stable=True).indices.argsort(dim=-1).to(torch.float32)
    return (ranks * torch.tensor(2 * eps / (c - 1), dtype=torch.float32) + (density - eps)).view(d.shape)


@pytest.mark.parametrize("module,consensus,normalize", [(della, True, True), (della_linear, False, False)])
def test_della_matches_formula_given_its_uniforms(module: Any, consensus: bool, normalize: bool) -> None:
    base, experts = models((40, 90), 3, torch.float32, seed=5)
    w, dens, eps = [0.6, 0.3, 0.4], [0.5, 0.3, 0.7], [0.15, 0.1, 0.2]
    model = [{"weight": a, "density": b, "epsilon": c} for a, b, c in zip(w, dens, eps, strict=True)]
    out = module.merge_tensor(inputs(base, experts, model, seed=11))
    g = torch.Generator().manual_seed(11)  # one block: the uniforms are drawn expert after expert
    masks = []
    for e, d, ep in zip(experts, dens, eps, strict=True):
        u = torch.empty(e.numel(), dtype=torch.float32).uniform_(generator=g).view(e.shape)
        masks.append((u < magprune_probs(e - base, d, ep)).to(F64))
    close(out, task_arithmetic_ref(base, experts, w, masks, consensus=consensus, normalize=normalize,
                                   rescale=True))


def test_della_ranks_along_dimension_one_beyond_two_dimensions() -> None:
    base, (expert,) = models((4, 30, 20), 1, torch.float32, seed=6)
    out = della_linear.merge_tensor(inputs(base, [expert], [{"density": 0.5, "epsilon": 0.3}],
                                           rescale=False, seed=4))
    d = (expert - base).abs()
    ranks = torch.sort(d, dim=1, stable=True).indices.argsort(dim=1).to(torch.float32)
    probs = ranks * torch.tensor(0.6 / 29, dtype=torch.float32) + 0.2
    u = torch.empty(d.numel(), dtype=torch.float32).uniform_(generator=torch.Generator().manual_seed(4))
    mask = (u.view(d.shape) < probs).to(F64)
    close(out, base.to(F64) + (expert.to(F64) - base.to(F64)) * mask)


def test_della_keep_rate_rises_linearly_with_magnitude_rank(small_blocks: None) -> None:
    """Rows of 300 across blocks of 1000 (rows cut by block edges): per rank quintile, the kept share
    is density − ε + 2ε·(mean normalised rank)."""
    base, experts = models((200, 300), 1, torch.float32, seed=7)
    density, eps = 0.5, 0.3
    out = della_linear.merge_tensor(inputs(base, experts, [{"density": density, "epsilon": eps}],
                                           rescale=False, seed=2))
    d = experts[0].to(F64) - base.to(F64)
    kept = (out.to(F64) - base.to(F64)).abs() > 0
    rank = torch.sort(d.abs(), dim=-1, stable=True).indices.argsort(dim=-1).to(F64) / 299
    for q in range(5):
        sel = (rank >= q / 5) & (rank < (q + 1) / 5) if q < 4 else rank >= 0.8
        expected = density - eps + 2 * eps * float(rank[sel].mean())
        assert abs(float(kept[sel].to(F64).mean()) - expected) < 0.02, q
    assert (out.to(F64) - experts[0].to(F64))[kept].abs().max() < 1e-6  # kept entries unscaled


def test_della_density_edges_and_determinism() -> None:
    base, experts = models((30, 40), 2, torch.float32, seed=1)
    full = della.merge_tensor(inputs(base, experts, [{"density": 1.0}] * 2))
    ref = task_arithmetic_ref(base, experts, [1.0, 1.0], [torch.ones(30, 40, dtype=F64)] * 2,
                              consensus=True, normalize=True, rescale=True)
    close(full, ref)
    none = della_linear.merge_tensor(inputs(base, experts, [{"density": 0.0}] * 2))
    assert torch.equal(none, base)
    a = della.merge_tensor(inputs(base, experts, [{"density": 0.4}] * 2, seed=3))
    b = della.merge_tensor(inputs(base, experts, [{"density": 0.4}] * 2, seed=3))
    assert torch.equal(a, b)
    with pytest.raises(SpecError, match="epsilon"):
        della.merge_tensor(inputs(base, experts, [{"density": 0.9, "epsilon": 0.15}] * 2))


# -- sce ---------------------------------------------------------------------------------------

def sce_ref(base: torch.Tensor, experts: list[torch.Tensor], topk: float) -> torch.Tensor:
    b = base.to(F64)
    tvs = torch.stack([e.to(F64) - b for e in experts])
    if topk < 1:
        # population variance with the implementation's order of operations: values tied in real
        # arithmetic then tie in both, and the tie-break (index order) is what is tested
        mean = sum(tvs[1:], tvs[0].clone()) / len(experts)
        var = (sum(((t - mean) ** 2 for t in tvs), torch.zeros_like(mean)) / len(experts)).reshape(-1)
        k = int(int(torch.count_nonzero(var)) * topk) if topk > 0 else 0
        mask = torch.zeros_like(var)
        mask[torch.sort(var, descending=True, stable=True).indices[:k]] = 1
        tvs = tvs * mask.view(b.shape)
    energy = tvs.square().reshape(len(experts), -1).mean(1)
    w = torch.full_like(energy, 1 / len(experts)) if energy.sum().abs() < 1e-6 else energy / energy.sum()
    w = w.view(-1, *[1] * b.dim())
    agree = torch.sign(tvs) == torch.where(tvs.sum(0) >= 0, 1.0, -1.0).to(F64)
    return b + (tvs * w * agree).sum(0) / (w * agree).sum(0).clamp_min(1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.3, 0.0])
def test_sce_matches_formula(topk: float, small_blocks: None) -> None:
    base, experts = models((50, 64), 3, torch.float32, seed=4)
    # float64 compute: the variance ranking is then the reference's exactly
    out = sce.merge_tensor(inputs(base, experts, compute=F64, out_dtype=F64, select_topk=topk))
    torch.testing.assert_close(out, sce_ref(base, experts, topk), rtol=1e-12, atol=1e-15)
    out32 = sce.merge_tensor(inputs(base, experts, select_topk=1.0))
    close(out32, sce_ref(base, experts, 1.0))


def test_sce_selection_with_tied_variances_keeps_exactly_k(small_blocks: None) -> None:
    base, experts = models((40, 50), 3, torch.bfloat16, seed=2, ties=True)
    out = sce.merge_tensor(inputs(base, experts, compute=F64, out_dtype=F64, select_topk=0.4))
    torch.testing.assert_close(out, sce_ref(base, experts, 0.4), rtol=1e-12, atol=1e-15)


# -- nuslerp -----------------------------------------------------------------------------------

def nuslerp_ref(t: float, v0: torch.Tensor, v1: torch.Tensor, mode: str) -> torch.Tensor:
    shape = v0.shape
    if mode == "flatten":
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif mode == "columns":
        a, b = v0.reshape(shape[0], -1).T, v1.reshape(shape[0], -1).T
    else:
        a, b = v0.reshape(-1, shape[-1]), v1.reshape(-1, shape[-1])
    na = a.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    nb = b.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    cos = ((a / na) * (b / nb)).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    res = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * a + t * b, res)
    if mode == "columns":
        res = res.T
    return res.reshape(shape)


@pytest.mark.parametrize("mode", ["flatten", "rows", "columns"])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_formula(mode: str, with_base: bool, small_blocks: None) -> None:
    base, experts = models((48, 70), 2, torch.float32, seed=6)
    w = [0.7, 0.3]
    glob = {"nuslerp_flatten": mode == "flatten", "nuslerp_row_wise": mode == "columns"}
    out = nuslerp.merge_tensor(inputs(base if with_base else None, experts,
                                      [{"weight": v} for v in w], **glob))
    b = base.to(F64) if with_base else torch.zeros((48, 70), dtype=F64)
    t = w[1] / sum(w)
    ref = b + nuslerp_ref(t, experts[0].to(F64) - b, experts[1].to(F64) - b, mode)
    close(out, ref)


def test_nuslerp_colinear_is_lerp_and_zero_weights_are_halfway() -> None:
    a = rand((20, 30), torch.float32, 1)
    out = nuslerp.merge_tensor(inputs(None, [a, a * 3], [{"weight": 1.0}, {"weight": 1.0}]))
    close(out, a.to(F64) * 2)
    out = nuslerp.merge_tensor(inputs(None, [a, -a], [{"weight": 1.0}, {"weight": -1.0}]))  # t = 0.5
    close(out, torch.zeros((20, 30), dtype=F64))


# -- multislerp --------------------------------------------------------------------------------

def multislerp_ref(tensors: list[torch.Tensor], w: list[float], base: torch.Tensor | None,
                   normalize: bool = True, eps: float = 1e-8) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].to(F64)
    x = torch.stack([t.to(F64) for t in tensors])
    if base is not None:
        x = x - base.to(F64)
    flat = x.reshape(len(tensors), -1)
    wt = torch.tensor(w, dtype=F64)
    if normalize:
        wt = wt / wt.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * wt.view(-1, 1)).sum(0)
    mean = mean / mean.norm()
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * wt.view(-1, 1)).sum(0)
    tn = tangent.norm() + eps
    res = (mean * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms.squeeze(-1) * wt).sum()
    res = res.view(x.shape[1:])
    return res + base.to(F64) if base is not None else res


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_formula(with_base: bool, normalize: bool, small_blocks: None) -> None:
    base, experts = models((33, 61), 3, torch.bfloat16, seed=8)
    w = [0.5, 0.3, 0.4]
    out = multislerp.merge_tensor(inputs(base if with_base else None, experts, [{"weight": v} for v in w],
                                         normalize_weights=normalize))
    close(out, multislerp_ref(experts, w, base if with_base else None, normalize))


def test_multislerp_single_expert_and_antipodal_pairs() -> None:
    a = rand((10, 12), torch.float32, 2)
    b = rand((10, 12), torch.float32, 3)
    one = multislerp.merge_tensor(inputs(b, [a], [{"weight": 1.0}]))
    assert torch.equal(one, a)
    out = multislerp.merge_tensor(inputs(None, [a, -a], [{"weight": 1.0}, {"weight": 1.0}]))
    close(out, torch.zeros((10, 12), dtype=F64))  # mean vanishes: linear fallback for two
    with pytest.raises(SpecError, match="weighted mean"):
        multislerp.merge_tensor(inputs(None, [a, -a, torch.zeros_like(a)], [{"weight": 1.0}] * 3))


# -- karcher -----------------------------------------------------------------------------------

def karcher_ref(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    xs = [t.to(F64).reshape(-1) for t in tensors]
    n = len(xs)
    norms = [float(x.norm()) for x in xs]
    units = [x / nm if nm != 0 else torch.zeros_like(x) for x, nm in zip(xs, norms, strict=True)]
    valid = [i for i in range(n) if norms[i] > tol]
    alphas = [1 / len(valid)] * len(valid)
    mean = sum(a * units[i] for a, i in zip(alphas, valid, strict=True))
    mean = units[valid[0]].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, i in zip(alphas, valid, strict=True):
            dot = float(torch.dot(mean, units[i]).clamp(-1, 1))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += a * (theta / math.sin(theta)) * (units[i] - dot * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        if float(mean.norm()) > tol:
            mean = mean / mean.norm()
    return (sum(norms) / n * mean).view(tensors[0].shape)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("max_iter", [0, 1, 10])
def test_karcher_matches_formula(with_base: bool, max_iter: int, small_blocks: None) -> None:
    base, experts = models((30, 50), 3, torch.float32, seed=9)
    experts = [e * s for e, s in zip(experts, (1.0, 2.0, 0.5), strict=True)]  # different norms, angles
    out = karcher.merge_tensor(inputs(base if with_base else None, experts, max_iter=max_iter))
    close(out, karcher_ref([*experts, *([base] if with_base else [])], max_iter=max_iter))


def test_karcher_of_zero_tensors_is_zero_and_of_one_is_it() -> None:
    z = torch.zeros(5, 6)
    assert torch.equal(karcher.merge_tensor(inputs(None, [z, z.clone()])), z)
    a = rand((5, 6), torch.float32, 1)
    assert torch.equal(karcher.merge_tensor(inputs(None, [a])), a)


# -- nearswap ----------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.002, 0.05])
def test_nearswap_matches_formula(t: float, small_blocks: None) -> None:
    base, (expert,) = models((45, 55), 1, torch.bfloat16, seed=10)
    out = nearswap.merge_tensor(inputs(base, [expert], t=t))
    a, b = base.to(F64), expert.to(F64)
    w = (t / (a - b).abs().clamp_min(1e-6)).clamp(0, 1)
    close(out, w * b + (1 - w) * a)


# -- arcee_fusion ------------------------------------------------------------------------------

def fusion_mask(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mergekit's importance mask, op for op in `dtype` (its compute dtype): with a 16-bit dtype the
    rounding of each op decides the selection, so this part cannot be a float64 formula."""
    a, b = a.to(dtype), b.to(dtype)
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    imp = (b - a).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    s = imp.reshape(-1).sort().values
    q1, med, q3 = (s[int(x * (s.numel() - 1))] for x in (0.25, 0.5, 0.75))
    return imp >= med + 1.5 * (q3 - q1)


def fusion_ref(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = F64) -> torch.Tensor:
    """a + (b − a)·mask in float64, with a and b − a rounded to `dtype` as mergekit takes them."""
    ac = a.to(dtype)
    return ac.to(F64) + (b.to(dtype) - ac).to(F64) * fusion_mask(a, b, dtype)


def fusion_inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    base, (expert,) = models(shape, 1, torch.float32, seed=12)
    expert = expert + rand(shape, torch.float32, 13, scale=0.5) * (torch.arange(shape[0]) % 3 == 0).view(
        -1, *[1] * (len(shape) - 1))  # some rows move a lot: a KL spread across rows
    return base, expert


@pytest.mark.parametrize("shape", [(64, 50), (300,)])
def test_arcee_fusion_matches_formula(shape: tuple[int, ...], small_blocks: None) -> None:
    base, expert = fusion_inputs(shape)
    out = arcee_fusion.merge_tensor(inputs(base, [expert], compute=F64, out_dtype=F64))
    ref = fusion_ref(base, expert)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-15)
    assert 0 < int((out != base.to(F64)).sum()) < out.numel()  # a real selection


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 50), (300,)])
def test_arcee_fusion_computes_its_mask_in_the_compute_dtype_as_mergekit(
        shape: tuple[int, ...], compute: torch.dtype, small_blocks: None) -> None:
    """`dtype: bfloat16`: KL, importances and threshold in bf16 (mergekit's selection, which the
    float64 one is not), b − a rounded to bf16, the sum in fp32 (bit-equal with a float32 output)."""
    base, expert = fusion_inputs(shape)
    ref = fusion_ref(base, expert, compute)
    if len(shape) > 1:  # one row: the KL is a common factor, and the selection ranks |b − a| alone
        assert not torch.equal(fusion_mask(base, expert, compute), fusion_mask(base, expert, F64))
    out32 = arcee_fusion.merge_tensor(inputs(base, [expert], compute=compute, out_dtype=torch.float32))
    torch.testing.assert_close(out32.to(F64), ref, rtol=2**-24, atol=0)
    out16 = arcee_fusion.merge_tensor(inputs(base, [expert], compute=compute, out_dtype=torch.bfloat16))
    assert torch.equal(out16, out32.to(torch.bfloat16))  # one rounding, of the fp32 sum


# -- passthrough, ram, ramplus_tl --------------------------------------------------------------

def test_passthrough_copies_or_scales_its_one_model() -> None:
    a = rand((7, 9), torch.bfloat16, 1)
    assert torch.equal(passthrough.merge_tensor(inputs(None, [a], out_dtype=torch.bfloat16)), a)
    close(passthrough.merge_tensor(inputs(None, [a], [{"scale": 0.5}])), a.to(F64) * 0.5)


def ram_ref(base: torch.Tensor, experts: list[torch.Tensor], eps: float, r: float | None = None,
            alpha: float = 0.2) -> torch.Tensor:
    b = base.to(F64).reshape(-1)
    tv = torch.stack([e.to(F64).reshape(-1) - b for e in experts])
    nz = tv.abs() > eps
    c = nz.sum(0, keepdim=True)
    lam = torch.ones(len(experts), 1, dtype=F64)
    if r is not None:
        shared = (nz & (c > 1)).sum(1).to(F64)
        unique = (nz & (c == 1)).sum(1).to(F64)
        lam = (1 + r * (shared / unique.clamp_min(eps)).clamp(0, alpha)).view(-1, 1)
    tz = tv * nz
    merged = (tz * (c == 1) * lam + tz * (c > 1) / c.clamp_min(1)).sum(0)
    return (b + merged).view(base.shape)


@pytest.mark.parametrize("plus", [False, True])
def test_ram_matches_formula(plus: bool, small_blocks: None) -> None:
    base, experts = models((40, 60), 3, torch.bfloat16, seed=14, ties=True)  # many unchanged entries
    eps = 1e-3
    if plus:
        out = ramplus_tl.merge_tensor(inputs(base, experts, epsilon=eps, r=0.5, alpha=0.4))
        ref = ram_ref(base, experts, eps, r=0.5, alpha=0.4)
    else:
        out = ram.merge_tensor(inputs(base, experts, epsilon=eps))
        ref = ram_ref(base, experts, eps)
    close(out, ref)
