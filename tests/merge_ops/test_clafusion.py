"""CLAFusion: the layer DP against brute force, identity insertion is exact, and a job recovers the
known alignment of a deeper MLP built by inserting identity-like layers into a shallower one."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_ops.context import Callbacks, JobContext, ResolvedModel
from merge_ops.ot.arch import build_module
from merge_ops.ot.layer_align import align_layers, hidden_activations, insert_identity, layer_cost, linear_cka
from merge_ops.runner import run_method
from merge_ops.spec import spec_from_dict

SHALLOW = {"alloy_arch": "mlp", "input_dim": 6, "hidden": [10, 8, 6], "num_classes": 3}
DEEP_MAP = [0, 2, 4]  # identity-like layers inserted after hidden layers 0 and 1


def test_dp_matches_brute_force_with_fixed_ends():
    g = torch.Generator().manual_seed(0)
    for m, n in [(5, 3), (6, 4), (7, 3), (4, 4), (5, 2)]:
        for _ in range(5):
            c = torch.rand(m, n, generator=g, dtype=torch.float64)
            best = min((a for a in itertools.combinations(range(m), n) if a[0] == 0 and a[-1] == m - 1),
                       key=lambda a: float(sum(c[a[k], k] for k in range(n))))
            got = align_layers(c)
            assert float(sum(c[got[k], k] for k in range(n))) == pytest.approx(
                float(sum(c[best[k], k] for k in range(n))), abs=1e-12)
            assert got[0] == 0 and got[-1] == m - 1 and all(b > a for a, b in zip(got, got[1:], strict=False))


def test_linear_cka_formula_and_invariances():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64)
    y = torch.randn(50, 4, generator=g, dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    want = (xc.T @ yc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(float(want), rel=1e-12)
    assert linear_cka(x, x[:, torch.randperm(7, generator=g)] * 3.0) == pytest.approx(1.0, abs=1e-12)


def _shallow(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.double() for k, v in build_module(SHALLOW).state_dict().items()}


def _deep(sd: dict[str, torch.Tensor], eps: float = 0.0) -> tuple[dict[str, torch.Tensor], dict]:
    """The shallow net with an identity-like layer I + eps·N inserted after hidden layers 0 and 1."""
    out, cfg = insert_identity(sd, SHALLOW, DEEP_MAP, 5)
    g = torch.Generator().manual_seed(9)
    for pos in (1, 3):
        w = out[f"layers.{pos}.weight"]
        out[f"layers.{pos}.weight"] = w + eps * torch.randn(w.shape, generator=g, dtype=w.dtype)
    return out, cfg


def test_identity_insertion_is_exact_in_float64():
    sd = _shallow()
    out, cfg = insert_identity(sd, SHALLOW, [0, 3, 4], 6)
    assert cfg["hidden"] == [10, 10, 10, 8, 6, 6]
    x = torch.randn(20, 6, dtype=torch.float64)
    a = build_module(SHALLOW).double()
    a.load_state_dict(sd)
    b = build_module(cfg).double()
    b.load_state_dict(out)
    torch.testing.assert_close(b(x), a(x), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="starting at 0"):
        insert_identity(sd, SHALLOW, [1, 2, 3], 6)


def test_activation_cost_recovers_the_inserted_positions():
    sd = _shallow()
    x = torch.rand(200, 6) * 2 - 1
    # exact identities: an inserted layer repeats the layer before it (cost ties), and ties go to the
    # earlier layer, the original; the copy of hidden layer 0 at position 1 must be skipped
    deep, cfg = _deep(sd)
    c = layer_cost(hidden_activations(cfg, deep, x), hidden_activations(SHALLOW, sd, x), "activation")
    assert align_layers(c) == DEEP_MAP
    assert float(sum(c[DEEP_MAP[k], k] for k in range(3))) < 1e-9 and float(c[1, 1]) > 0.05
    # near-identities (I + 0.02·N): layer 1 is matched to the original or to its near-copy right after
    # it, never to the copy of layer 0, at a near-zero cost
    deep, cfg = _deep(sd, eps=0.02)
    c = layer_cost(hidden_activations(cfg, deep, x), hidden_activations(SHALLOW, sd, x), "activation")
    a = align_layers(c)
    assert a in ([0, 2, 4], [0, 3, 4]) and float(sum(c[a[k], k] for k in range(3))) < 0.01
    assert align_layers(layer_cost([10, 9, 8, 7, 6], [10, 8, 6], "neuron")) == DEEP_MAP


def _write(folder: Path, sd: dict[str, torch.Tensor], cfg: dict) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.float().contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_job_fuses_shallow_into_deep_with_the_known_alignment(tmp_path):
    sd = _shallow()
    deep, deep_cfg = _deep(sd)
    # the shallow parent's hidden units in another order: OT fusion must undo it after the depth match
    perm = [torch.randperm(w, generator=torch.Generator().manual_seed(5 + i)) for i, w in enumerate(SHALLOW["hidden"])]
    shuffled = dict(sd)
    for i, p in enumerate(perm):
        shuffled[f"layers.{i}.weight"] = shuffled[f"layers.{i}.weight"][p]
        shuffled[f"layers.{i}.bias"] = shuffled[f"layers.{i}.bias"][p]
        shuffled[f"layers.{i + 1}.weight"] = shuffled[f"layers.{i + 1}.weight"][:, p]
    cal = tmp_path / "cal.jsonl"
    g = torch.Generator().manual_seed(2)
    cal.write_text("".join(json.dumps({"input": (torch.rand(6, generator=g) * 2 - 1).tolist()}) + "\n"
                           for _ in range(200)))
    folders = {"shallow": _write(tmp_path / "shallow", shuffled, SHALLOW), "deep": _write(tmp_path / "deep", deep, deep_cfg)}
    spec = spec_from_dict({"method": "clafusion",
                           "experts": [{"model": str(p), "name": n} for n, p in folders.items()],
                           "calibration": {"tasks": {"shallow": str(cal)}}})
    ctx = JobContext(spec=spec, base=None, experts=[ResolvedModel(str(p), p) for p in folders.values()],
                     out_dir=tmp_path / "out", calibration={"shallow": cal},
                     channel=Callbacks(lambda *a, **k: None))
    res = run_method(ctx)
    assert res.metrics["layer_maps"] == {"shallow": DEEP_MAP, "deep": [0, 1, 2, 3, 4]}
    assert res.metrics["anchor"] == "deep" and res.metrics["depths"] == {"shallow": 3, "deep": 5}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["hidden"] == [10, 10, 8, 8, 6]
    fused = build_module(cfg, load_file(str(tmp_path / "out" / "model.safetensors")))
    parent = build_module(deep_cfg, {k: v.float() for k, v in deep.items()})
    x = torch.rand(64, 6) * 2 - 1
    with torch.no_grad():
        gap = (fused(x) - parent(x)).abs().max()
        scale = parent(x).abs().max()
    # the parents compute the same function (up to the unit order OT undoes): so does their fusion
    assert float(gap) < 1e-4 * float(scale)
