"""RegMean, RegMean++ and Fisher merging against float64 references written here: HF models run one
calibration row at a time (no padding, no block caching), Grams and Fisher diagonals from plain
forward hooks and autograd, closed forms with torch.linalg.solve. Also the solve's safeguard, the
per-example Fisher estimator against its analytic value, and a job through `alloy merge`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_ops.context import JobContext, ResolvedModel
from merge_ops.errors import SpecError
from merge_ops.learned import gram
from merge_ops.methods import METHODS
from merge_ops.methods.fisher import example_fisher
from merge_ops.runner import run_method
from merge_ops.spec import spec_from_dict
from tests.merge_ops.test_learned_engine import BERT, write_bert_family

F64 = torch.float64


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("regression")
    base, experts = write_bert_family(root)
    cal = {}
    for i, t in enumerate(experts):  # rows of different lengths: padding must not become Gram rows
        rows = [{"input_ids": [(5 * j + 11 * i + m) % 99 + 1 for m in range(2 + (j * 3 + i) % 7)]}
                for j in range(10)]
        cal[t] = root / f"{t}.jsonl"
        cal[t].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base, experts, cal


def run_job(family, out: Path, method: str, **params) -> dict[str, torch.Tensor]:
    base, experts, cal = family
    spec = spec_from_dict({
        "method": method, "base": str(base), "dtype": "float64", "out_dtype": "float64",
        "experts": [{"model": str(p), "name": n} for n, p in experts.items()],
        "parameters": params, "task_specific": [r"^classifier\."],
        "calibration": {"tasks": {n: str(p) for n, p in cal.items()}}, "seed": 3})
    ctx = JobContext(spec=spec, base=ResolvedModel(str(base), base),
                     experts=[ResolvedModel(str(p), p) for p in experts.values()], out_dir=out, calibration=cal)
    res = run_method(ctx)
    assert (out / "heads" / "a.safetensors").is_file() and "coefficients" not in res.artifacts
    return load_file(str(out / "model.safetensors"))


# -- float64 references ------------------------------------------------------------------------------
def sd64(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.to(F64) for k, v in load_file(str(folder / "model.safetensors")).items() if v.is_floating_point()}


def bert(state: dict[str, torch.Tensor]):
    from transformers import BertConfig, BertModel

    m = BertModel(BertConfig(**BERT)).to(F64).eval()
    m.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")}, strict=False)
    return m


def rows_of(path: Path) -> list[list[int]]:
    return [json.loads(line)["input_ids"] for line in path.read_text().splitlines()]


def ref_grams(state: dict[str, torch.Tensor], rows: list[list[int]], only: str = "") -> dict[str, torch.Tensor]:
    """Mean x·xᵀ of every nn.Linear's input under `only` (a module-name prefix), one row at a time."""
    m = bert(state)
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    hooks = []
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith(only):
            def hook(_m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.T @ x
                count[name] = count.get(name, 0) + x.shape[0]
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for r in rows:
            m(input_ids=torch.tensor([r]))
    for h in hooks:
        h.remove()
    return {n: sums[n] / count[n] for n in sums}


def ref_solve(w0: torch.Tensor, taus: list[torch.Tensor], grams: list[torch.Tensor], alpha: float) -> torch.Tensor:
    shr = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in grams]
    c = sum(t @ g for t, g in zip(taus, shr, strict=True))
    return w0 + torch.linalg.solve(sum(shr), c.T).T  # (Σ τG̃)(ΣG̃)⁻¹, ΣG̃ symmetric


def average(b: dict, es: list[dict], n: str) -> torch.Tensor:
    return sum(e[n] for e in es) / len(es)


# -- RegMean / RegMean++ -----------------------------------------------------------------------------
def test_regmean_matches_the_float64_closed_form(family, tmp_path):
    base, experts, cal = family
    got = run_job(family, tmp_path / "out", "regmean", alpha=0.9, ridge=0.0, batch_size=4)
    b, es = sd64(base), [sd64(p) for p in experts.values()]
    grams = [ref_grams(e, rows_of(cal[t])) for e, t in zip(es, experts, strict=True)]
    linears = set(grams[0])
    assert len(linears) == 13  # 2 layers × 6 + the pooler
    for n in b:
        mod = n.rsplit(".", 1)[0]
        if mod in linears and n.endswith(".weight"):
            want = ref_solve(b[n], [e[n] - b[n] for e in es], [g[mod] for g in grams], 0.9)
        else:
            want = average(b, es, n)
        assert torch.allclose(got[n], want, rtol=1e-9, atol=1e-11), n


def test_regmean_plusplus_takes_inputs_from_the_merged_blocks(family, tmp_path):
    base, experts, cal = family
    got = run_job(family, tmp_path / "out", "regmean_plusplus", alpha=0.9, ridge=0.0, batch_size=3)
    b, es = sd64(base), [sd64(p) for p in experts.values()]
    merged = {n: average(b, es, n) for n in b}
    pooler = [ref_grams(e, rows_of(cal[t]), "pooler") for e, t in zip(es, experts, strict=True)]
    w = "pooler.dense.weight"
    merged[w] = ref_solve(b[w], [e[w] - b[w] for e in es], [g["pooler.dense"] for g in pooler], 0.9)
    for layer in range(BERT["num_hidden_layers"]):
        pre = f"encoder.layer.{layer}."
        grams = []
        for e, t in zip(es, experts, strict=True):  # merged layers below, expert t's own layer l
            state = {**merged, **{n: v for n, v in e.items() if n.startswith(pre)}}
            grams.append(ref_grams(state, rows_of(cal[t]), pre))
        for mod in grams[0]:
            n = f"{mod}.weight"
            merged[n] = ref_solve(b[n], [e[n] - b[n] for e in es], [g[mod] for g in grams], 0.9)
    plain = run_job(family, tmp_path / "plain", "regmean", alpha=0.9, ridge=0.0, batch_size=3)
    for n in b:
        assert torch.allclose(got[n], merged[n], rtol=1e-9, atol=1e-11), n
    # layer 0 sees the same (merged = base, frozen) embeddings either way; layer 1 differs
    assert torch.allclose(got["encoder.layer.0.attention.self.query.weight"],
                          plain["encoder.layer.0.attention.self.query.weight"], atol=1e-11)
    assert not torch.allclose(got["encoder.layer.1.attention.self.query.weight"],
                              plain["encoder.layer.1.attention.self.query.weight"], atol=1e-6)


def test_solve_raises_the_ridge_on_a_singular_system():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=F64) @ torch.randn(3, 8, generator=g, dtype=F64)  # rank 3 of 8
    taus = [torch.randn(5, 8, generator=g, dtype=F64) for _ in range(2)]
    reg = gram.Regression()
    for t in taus:
        reg.add(t, x.T @ x / 40, transposed=False)
    w, lam = gram.solve(reg, ridge=0.0)
    assert w is not None and torch.isfinite(w).all() and lam > 0
    s = 2 * x.T @ x / 40
    want = (sum(t @ (x.T @ x / 40) for t in taus)) @ torch.linalg.inv(s + lam * torch.eye(8, dtype=F64))
    assert torch.allclose(w, want, rtol=1e-6, atol=1e-9)
    # on the inputs' row space the fit is the regression mean: X·w ≈ X·(τ₁ + τ₂)/2
    assert torch.allclose(x @ w.T, x @ (sum(taus) / 2).T, rtol=1e-4, atol=1e-4)
    # a well-conditioned system keeps the asked ridge
    reg2 = gram.Regression()
    reg2.add(taus[0], torch.eye(8, dtype=F64), transposed=False)
    assert gram.solve(reg2, ridge=1e-3)[1] == pytest.approx(1e-3)


def test_gram_hooks_skip_padding_and_share_one_product():
    lin = torch.nn.ModuleDict({"q": torch.nn.Linear(4, 3), "k": torch.nn.Linear(4, 2)}).to(F64)
    sites = {n: gram.LinearSite(n, f"{n}.weight", False) for n in ("q", "k")}
    hooks = gram.GramHooks(lin, sites, F64)
    x = torch.randn(2, 5, 4, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    hooks.new_batch(mask)
    lin["q"](x)
    lin["k"](x)
    g = hooks.close()
    real = x[mask.bool()]
    for n in ("q", "k"):
        assert g.rows[n] == 8 and torch.allclose(g.mean(n), real.T @ real / 8)


# -- Fisher -----------------------------------------------------------------------------------------
def test_example_fisher_is_the_analytic_expected_fisher():
    """Logistic model, logits = W·x: ∇_W log p_c = (e_c − p)·xᵀ, so F = Σ_c p_c ((e_c − p) xᵀ)²."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, generator=g, dtype=F64).requires_grad_(True)
    x = torch.randn(3, generator=g, dtype=F64)
    logp = (w @ x).log_softmax(-1)[None]
    got = example_fisher(logp, [w], "expected", 1, g)[0]
    p = logp.detach().exp()[0]
    want = sum(p[c] * ((torch.eye(4, dtype=F64)[c] - p)[:, None] * x[None]) ** 2 for c in range(4))
    assert torch.allclose(got, want, rtol=1e-12)
    # sampled: (∇ log p_y)² averaged over draws y ~ p, the draws those of the seeded generator
    gen = torch.Generator().manual_seed(2)
    draws = [int(torch.multinomial(p[None].float(), 1, generator=gen)) for _ in range(50)]
    logp = (w @ x).log_softmax(-1)[None]
    sampled = example_fisher(logp, [w], "sampled", 50, torch.Generator().manual_seed(2))[0]
    per_class = [((torch.eye(4, dtype=F64)[c] - p)[:, None] * x[None]) ** 2 for c in range(4)]
    assert torch.allclose(sampled, sum(per_class[y] for y in draws) / 50, rtol=1e-12)
    # not the square of a summed gradient (the references' estimator)
    logp = (w @ x).log_softmax(-1)
    summed = torch.autograd.grad((p * logp).sum(), w)[0] ** 2
    assert not torch.allclose(summed, want, rtol=0.1)


def test_fisher_matches_per_example_float64_reference(family, tmp_path):
    base, experts, cal = family
    got = run_job(family, tmp_path / "out", "fisher", floor=1e-6, weight=1.0)
    b, es = sd64(base), [sd64(p) for p in experts.values()]
    num, den = {}, {}
    for e, t in zip(es, experts, strict=True):
        m = bert(e)
        head_w, head_b = e["classifier.weight"], e["classifier.bias"]
        params = dict(m.named_parameters())
        changed = [n for n in params if not torch.equal(e[n], b[n])]
        fisher = {n: torch.zeros_like(params[n]) for n in changed}
        rows = rows_of(cal[t])
        for r in rows:
            h = m(input_ids=torch.tensor([r])).last_hidden_state.mean(1)
            logp = (h @ head_w.T + head_b).log_softmax(-1)[0]
            for c in range(logp.shape[0]):
                grads = torch.autograd.grad(logp[c], [params[n] for n in changed], retain_graph=True,
                                            allow_unused=True)
                for n, gr in zip(changed, grads, strict=True):
                    if gr is not None:
                        fisher[n] += logp[c].exp().detach() * gr ** 2
        for n in changed:
            f = fisher[n] / len(rows) + 1e-6
            num[n] = num.get(n, 0) + f * (e[n] - b[n])
            den[n] = den.get(n, 0) + f
    for n in b:
        want = b[n] + num[n] / den[n] if n in num else b[n]
        assert torch.allclose(got[n], want, rtol=1e-8, atol=1e-12), (n, float((got[n] - want).abs().max()), float((want - b[n]).abs().max()))
    # the pooler gets no gradient under mean pooling: only the floor, hence the plain average
    n = "pooler.dense.weight"
    assert torch.allclose(got[n], average(b, es, n), atol=1e-12)


# -- declarations and the CLI ---------------------------------------------------------------------------
def test_declarations():
    for name in ("regmean", "regmean_plusplus", "fisher"):
        m = METHODS[name]
        assert m.kind == "learned" and m.needs_calibration and "arXiv" in m.paper
    assert METHODS["regmean"].param("alpha").default == 0.95
    with pytest.raises(SpecError, match="alpha"):
        spec_from_dict({"method": "regmean", "base": "org/b", "experts": [{"model": "org/x", "name": "x"},
                                                                          {"model": "org/y", "name": "y"}],
                        "parameters": {"alpha": 1.5}, "calibration": {"tasks": {"x": "a", "y": "b"}}})


def test_alloy_merge_cli_runs_regmean_plusplus_and_lists_the_methods(family, tmp_path, capsys):
    from service.cli import main

    base, experts, cal = family
    spec = tmp_path / "regmean.yaml"
    spec.write_text(yaml.safe_dump({
        "method": "regmean_plusplus", "base": str(base), "dtype": "float64", "out_dtype": "float64",
        "experts": [{"model": str(p), "name": n} for n, p in experts.items()],
        "parameters": {"alpha": 0.9, "ridge": 0.0}, "task_specific": [r"^classifier\."],
        "calibration": {"tasks": {n: str(p) for n, p in cal.items()}}}))
    assert main(["merge", str(spec), "--out", str(tmp_path / "merged"), "-q"]) == 0
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    want = run_job(family, tmp_path / "direct", "regmean_plusplus", alpha=0.9, ridge=0.0)
    assert all(torch.equal(got[n], want[n]) for n in want)
    card = json.loads((tmp_path / "merged" / "alloy_merge.json").read_text())
    assert card["method"] == "regmean_plusplus"
    capsys.readouterr()
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("regmean", "regmean_plusplus", "fisher", "stf"):
        assert f"{name}  [" in out
        for p in METHODS[name].params:
            assert f"      {p.name}" in out, (name, p.name)
