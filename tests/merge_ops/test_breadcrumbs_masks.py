"""breadcrumbs_ties' band masks entry by entry: they may differ from mergekit's only at ties.

mergekit's magnitude_outliers keeps ascending-magnitude ranks [bot, bot + keep) of an unstable
`torch.sort`; Alloy ranks equal magnitudes by index. So at a band edge where one magnitude lies on
both sides, the two may keep different entries of that magnitude, but the same number of them, and
everywhere else the masks must be identical. The fast tests check Alloy against that rule written
here (with the same unstable sort mergekit calls); the last one runs mergekit 0.1.5 itself from
benchmarks/.venv-peers and is skipped where that environment is absent.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from merge_ops.methods import breadcrumbs_ties
from merge_ops.static import kernels
from merge_ops.static.inputs import TensorInputs

PEERS_PYTHON = Path(__file__).resolve().parents[2] / "benchmarks" / ".venv-peers" / "bin" / "python"
# (density, gamma): the benchmark's; keep + outliers > n (fewer outliers, bot = 0); no outliers;
# a small band; density ≥ 1 keeps everything
CASES = [(0.5, 0.05), (0.9, 0.3), (0.3, 0.0), (0.1, 0.01), (1.0, 0.2)]


def deltas(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Task vectors like bf16 fine-tunes': base + noise rounded to bf16, minus base, exact in fp32.
    Magnitudes repeat often (heavy ties at both band edges); zeros are nudged to 2^-24, so the kept
    entries are exactly the nonzero ones of a masked output."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16().float()
    expert = (base + torch.randn(shape, generator=g) * 0.002).bfloat16().float()
    d = expert - base
    return torch.where(d == 0, torch.full_like(d, 2.0**-24), d)


def band_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(bot, keep) as mergekit 0.1.5 computes them: int() truncation of density·n and gamma·n."""
    keep = int(density * n)
    return max(0, n - keep - int(gamma * n)), keep


def edge_ties(mag: torch.Tensor, density: float, gamma: float) -> list[float]:
    """Magnitudes found on both sides of a band edge: the only ones whose entries may be picked
    differently by two correct implementations."""
    n = mag.numel()
    if density >= 1:
        return []
    bot, keep = band_counts(n, density, gamma)
    s = torch.sort(mag.reshape(-1)).values
    out = []
    if 0 < bot < n and s[bot - 1] == s[bot]:
        out.append(float(s[bot]))
    if 0 < keep and bot + keep < n and s[bot + keep - 1] == s[bot + keep]:
        out.append(float(s[bot + keep - 1]))
    return out


def mergekit_rule(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's magnitude_outliers mask, rewritten: ranks from torch.sort (unstable) of |d|."""
    if density >= 1:
        return torch.ones(d.shape, dtype=torch.bool)
    bot, keep = band_counts(d.numel(), density, gamma)
    m = torch.zeros(d.numel(), dtype=torch.bool)
    m[torch.sort(d.abs().reshape(-1)).indices[bot:bot + keep]] = True
    return m.view(d.shape)


def alloy_mask(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Alloy's mask through the real merge: one expert, weight 1, on a zero base, so the output is
    the trimmed task vector and the kept entries are its nonzero ones."""
    x = TensorInputs(name="model.layers.0.mlp.weight", base=torch.zeros_like(d), experts=[d],
                     model_params=[{"weight": 1.0, "density": density, "gamma": gamma}], params={},
                     compute_dtype=torch.float32, out_dtype=torch.float32, layer=0, n_layers=1,
                     generator=torch.Generator().manual_seed(0))
    out = breadcrumbs_ties.merge_tensor(x)
    assert torch.equal(out[out != 0], d[out != 0])  # kept entries pass unchanged
    return out != 0


def assert_same_outside_ties(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, density: float,
                             gamma: float) -> dict[str, int]:
    """Identical masks except at edge-tie magnitudes, where both keep as many; returns the counts."""
    mag = d.abs()
    bot, keep = band_counts(d.numel(), density, gamma)
    assert int(a.sum()) == int(b.sum()) == (d.numel() if density >= 1 else keep)
    tie = torch.zeros_like(a)
    for v in edge_ties(mag, density, gamma):
        at = mag == v
        assert int(a[at].sum()) == int(b[at].sum()), f"kept counts differ at the tie |τ| = {v}"
        tie |= at
    differ = a != b
    assert not (differ & ~tie).any(), f"{int((differ & ~tie).sum())} mask entries differ outside ties"
    return {"differ": int(differ.sum()), "at_ties": int(tie.sum()), "n": d.numel()}


@pytest.mark.parametrize("density,gamma", CASES)
def test_band_differs_from_mergekits_rule_only_at_ties(density: float, gamma: float,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "BLOCK_CPU", 1000)  # block edges cut through tie runs
    for shape, seed in (((121, 257), 0), ((57,), 1), ((7,), 2)):  # γ·n, density·n not integers
        d = deltas(shape, seed)
        assert_same_outside_ties(alloy_mask(d, density, gamma), mergekit_rule(d, density, gamma), d,
                                 density, gamma)


def test_edge_ties_are_where_the_rules_part() -> None:
    """The check has teeth: a different tie order does differ, and only inside the edge ties;
    a band one rank off (round() instead of int()) fails it."""
    d = deltas((121, 257), 3)
    density, gamma = 0.5, 0.05
    a = alloy_mask(d, density, gamma)
    counts = assert_same_outside_ties(a, mergekit_rule(d, density, gamma), d, density, gamma)
    assert counts["differ"] > 0  # bf16 deltas tie heavily at both edges
    shifted = a.clone().reshape(-1)
    order = torch.sort(d.abs().reshape(-1), stable=True).indices
    bot, keep = band_counts(d.numel(), density, gamma)
    shifted[order[bot + keep]] = True  # one more outlier kept, as round(gamma·n) would do here
    shifted[order[bot]] = False
    with pytest.raises(AssertionError):
        assert_same_outside_ties(a, shifted.view(d.shape), d, density, gamma)


MERGEKIT_SCRIPT = """
import sys, torch
from mergekit.sparsify import magnitude_outliers
cases = torch.load(sys.argv[1])
torch.save([magnitude_outliers(d, density, gamma=gamma) != 0 for d, density, gamma in cases], sys.argv[2])
"""


@pytest.mark.skipif(not PEERS_PYTHON.is_file(), reason="mergekit needs benchmarks/.venv-peers "
                    "(python3.11 -m venv benchmarks/.venv-peers && pip install torch==2.13.0 mergekit==0.1.5)")
def test_band_differs_from_mergekit_only_at_ties(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "BLOCK_CPU", 1000)
    cases = [(deltas(shape, seed), density, gamma)
             for shape, seed in (((255, 301), 4), ((57,), 5)) for density, gamma in CASES]
    torch.save(cases, tmp_path / "in.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(PEERS_PYTHON), "-c", MERGEKIT_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   check=True, env=env, timeout=300)
    masks = torch.load(tmp_path / "out.pt")
    differ = 0
    for (d, density, gamma), mk in zip(cases, masks, strict=True):
        differ += assert_same_outside_ties(alloy_mask(d, density, gamma), mk, d, density, gamma)["differ"]
    assert differ > 0  # ties were exercised: mergekit's pick among equals is not index order
