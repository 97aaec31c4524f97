"""STF against known answers (tasks on orthogonal input subspaces: the merge is their sum and reproduces
every kept feature exactly) and against the float64 least-squares formula B·A⁺ written here."""

from __future__ import annotations

import pytest
import torch

from merge_ops.methods import METHODS, stf
from tests.merge_ops.test_methods_data_free import inputs

F64 = torch.float64


def orthogonal_tasks(m: int, n: int, n_tasks: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    """Rank-k task vectors whose right singular spaces are disjoint blocks of one orthonormal basis."""
    g = torch.Generator().manual_seed(seed)
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    out = []
    for t in range(n_tasks):
        u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64))[0]
        s = torch.rand(k, generator=g, dtype=F64) + 0.5
        out.append(u @ torch.diag(s) @ v[:, t * k:(t + 1) * k].T)
    return out


def test_orthogonal_input_subspaces_give_the_exact_sum_and_keep_every_feature():
    taus = orthogonal_tasks(10, 12, 3, 4)
    got = stf.stf(lambda t: taus[t].clone(), 3, 4, ridge=0.0)
    assert torch.allclose(got, sum(taus), atol=1e-12)
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau)
        for i in range(4):  # τ·v = σ·u for each task's own top directions
            assert torch.allclose(got @ vh[i], s[i] * u[:, i], atol=1e-12)


def test_matches_the_least_squares_formula_in_float64():
    g = torch.Generator().manual_seed(4)
    taus = [torch.randn(9, 7, generator=g, dtype=F64) for _ in range(3)]
    k = 2
    a_cols, b_cols = [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        a_cols.append(vh[:k].T)
        b_cols.append(u[:, :k] * s[:k])
    a, b = torch.cat(a_cols, 1), torch.cat(b_cols, 1)
    got = stf.stf(lambda t: taus[t].clone(), 3, k, ridge=0.0)
    assert torch.allclose(got, b @ torch.linalg.pinv(a), atol=1e-10)  # 6 ≤ 7 columns: exact features
    assert torch.allclose(got @ a, b, atol=1e-10)
    lam = 0.3
    ridged = stf.stf(lambda t: taus[t].clone(), 3, k, ridge=lam)
    want = b @ torch.linalg.solve(a.T @ a + lam * torch.eye(6, dtype=F64), a.T)
    assert torch.allclose(ridged, want, atol=1e-10)
    # the equivalent RegMean form: (Σ τₜPₜ)(Σ Pₜ)⁺ with Pₜ the projector on task t's kept inputs
    p = [c @ c.T for c in a_cols]
    assert torch.allclose(got, sum(tau @ pt for tau, pt in zip(taus, p, strict=True)) @ torch.linalg.pinv(sum(p)),
                          atol=1e-9)


def test_merge_tensor_defaults_fallback_and_alpha():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8, 6, generator=g, dtype=F64)
    experts = [base + 0.01 * torch.randn(8, 6, generator=g, dtype=F64) for _ in range(2)]
    x = inputs(base, experts, alpha=0.5, ridge=0.0)
    taus = [e - base for e in experts]
    want = base + 0.5 * stf.stf(lambda t: taus[t].clone(), 2, 3, ridge=0.0)  # k = ⌊6/2⌋
    assert torch.allclose(stf.merge_tensor(x), want, atol=1e-12)
    bias = torch.randn(8, generator=g, dtype=F64)
    eb = [bias + 0.1, bias - 0.3]
    assert torch.allclose(stf.merge_tensor(inputs(bias, eb, name="x.bias")), bias - 0.1, atol=1e-12)
    m = METHODS["stf"]
    assert m.kind == "static" and not m.needs_calibration and "arXiv:2502.10698" in m.paper
    with pytest.raises(ValueError, match="above the maximum"):
        m.param("rank_fraction").validate(1.5, "parameters.rank_fraction")
