"""The rank tolerance of the SVD methods (static/spectral.py) in float32: a small but well-separated singular
direction (fine-tuned attention query/key weights fed by a LayerNorm have one, about 80-90·eps·σ_max) is
kept, as the reference codes keep it; exactly rank-deficient inputs still lose their null space."""

from __future__ import annotations

import torch

from merge_ops.methods import iso_c
from merge_ops.static import spectral
from merge_ops.static.inputs import TensorInputs

F32, F64 = torch.float32, torch.float64
EPS32 = torch.finfo(F32).eps


def with_spectrum(s: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """U·diag(s)·Vᵀ with random orthonormal U (m×r), V (n×r), in float64."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=F64))[0]
    return (u * s) @ v.T


def small_direction(m: int = 48, n: int = 48, ratio: float = 40 * EPS32) -> torch.Tensor:
    """float32 matrix whose smallest singular value is `ratio`·σ_max, the others in [0.5, 1]. Square, as
    the attention weights: in a tall one the left vector of σ_n is only known to ~eps/ratio (1e-2 here)."""
    s = torch.linspace(1.0, 0.5, n, dtype=F64)
    s[-1] = ratio
    return with_spectrum(s, m, n).to(F32)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


def test_tolerance_is_the_svd_rounding_level():
    assert spectral.tolerance(1.0, (48, 48), F32) < 40 * EPS32 < spectral.rank_tolerance(1.0, (48, 48), F32)
    assert spectral.tolerance(1.0, (64, 48), F32) == 0.5 * 113 ** 0.5 * EPS32
    assert spectral.rank_tolerance(1.0, (64, 48), F32) == 64 * EPS32  # numpy's rule, Iso-CTS residuals


def test_polar_keeps_a_small_well_separated_direction_in_float32():
    a = small_direction()
    p, _, qh = torch.linalg.svd(a.to(F64), full_matrices=False)
    ref = p @ qh  # full-rank polar factor, float64
    assert rel(spectral.polar(a), ref) < 1e-4  # max(m, n)·eps (48 > 40) dropped it: 14 % off


def test_iso_c_keeps_a_small_well_separated_direction_in_float32():
    tau = small_direction()
    x = TensorInputs(name="w", base=torch.zeros_like(tau), experts=[tau], model_params=[{}], params={"alpha": 1.0},
                     compute_dtype=F32, out_dtype=F64, layer=0, n_layers=1)
    u, s, vh = torch.linalg.svd(tau.to(F64), full_matrices=False)
    assert rel(iso_c.merge_tensor(x), s.mean() * (u @ vh)) < 1e-4


def test_exact_null_space_is_still_dropped_in_float32():
    a = with_spectrum(torch.linspace(1.0, 0.5, 8, dtype=F64), 64, 48).to(F32)  # rank 8, rounded to float32
    s = torch.linalg.svdvals(a)
    assert int((s > spectral.tolerance(s[0], (64, 48), F32)).sum()) == 8
    p = spectral.polar(a)
    assert int((torch.linalg.svdvals(p) > 0.5).sum()) == 8
    u, _, vh = spectral.top_svd(a, 12)
    assert int((u.abs().sum(0) > 0).sum()) == 8 and int((vh.abs().sum(1) > 0).sum()) == 8
