"""Layer slices and modules, Alloy vs mergekit (`static_vs_mergekit.py --slices`), and mergekit's own
`examples/` configs on tiny local models.

Five small Llama checkpoints, stored in float32 (bf16 inputs make many equal magnitudes, and TIES
breaks ties at its top-k threshold differently from mergekit: a documented difference, measured on
the method rows of static_vs_mergekit.py, not here): a 4-layer base, three experts of it (base +
noise), and an unrelated 6-layer model of the same width (`deep`) for frankenmerges across depths. Each config runs
through `mergekit-yaml` and through Alloy's static driver from the same YAML; the outputs are
compared tensor by tensor (same names required; max |diff|) and by their config's layer count.
`examples/*` rows are mergekit's example configs with its model names swapped for the local ones
(orca / model_a / Mistral-Instruct -> e1, platypus / BioMistral / model_b -> e2, WizardLM -> e3, the
Llama-2 / Mistral base -> base).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

DIMS = dict(hidden=64, intermediate=128, vocab=128, heads=4)
COMMON = {"dtype": "float32", "out_dtype": "float32"}


def build(folder: Path) -> dict[str, Path]:
    import torch

    from tests.toy_models import write_llama

    out = {k: folder / k for k in ("base", "e1", "e2", "e3", "deep")}
    if (folder / "READY").is_file():
        return out
    shutil.rmtree(folder, ignore_errors=True)
    write_llama(out["base"], layers=4, seed=0, dtype=torch.float32, **DIMS)
    for i, k in enumerate(("e1", "e2", "e3")):
        write_llama(out[k], layers=4, seed=10 + i, dtype=torch.float32, perturb_from=out["base"], scale=0.01,
                    **DIMS)
    write_llama(out["deep"], layers=6, seed=5, dtype=torch.float32, **DIMS)
    (folder / "READY").write_text("ok")
    return out


def configs(m: dict[str, Path]) -> dict[str, dict]:
    b, e1, e2, e3, deep = (str(m[k]) for k in ("base", "e1", "e2", "e3", "deep"))
    grad_t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
              {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
    out = {
        # a frankenmerge of two depths: 3 + 4 layers from a 4-layer and a 6-layer model
        "passthrough_frankenmerge": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": b, "layer_range": [0, 3]}]},
            {"sources": [{"model": deep, "layer_range": [2, 6]}]}]} | COMMON,
        # a layer repeated, scaled in one slice (a per-source parameter)
        "passthrough_repeat_scale": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": e1, "layer_range": [0, 2]}]},
            {"sources": [{"model": e1, "layer_range": [1, 3], "parameters": {"scale": 0.5}}]},
            {"sources": [{"model": e1, "layer_range": [3, 4]}]}]} | COMMON,
        # slerp over slices of different ranges: the t gradient runs over each slice
        "slerp_gradient_two_slices": {"merge_method": "slerp", "base_model": b, "slices": [
            {"sources": [{"model": b, "layer_range": [0, 2]}, {"model": e1, "layer_range": [0, 2]}]},
            {"sources": [{"model": b, "layer_range": [1, 4]}, {"model": e1, "layer_range": [1, 4]}],
             "parameters": {"t": [0.9, 0.1]}}],
            "parameters": {"t": grad_t}} | COMMON,
        # ties: per-source densities, a slice-level weight gradient, a global fallback
        "ties_per_slice_params": {"merge_method": "ties", "base_model": b, "slices": [
            {"sources": [{"model": b, "layer_range": [0, 2]},
                         {"model": e1, "layer_range": [0, 2], "parameters": {"density": 0.7}},
                         {"model": e2, "layer_range": [2, 4], "parameters": {"density": [0.2, 0.9]}}]},
            {"sources": [{"model": b, "layer_range": [2, 4]}, {"model": e1, "layer_range": [1, 3]},
                         {"model": e2, "layer_range": [0, 2]}],
             "parameters": {"weight": [1.0, 0.2], "density": 0.5}}],
            "parameters": {"weight": 0.6, "density": 0.4}} | COMMON,
        # task arithmetic with a slice-level base (e1 is the base of the second slice)
        "task_arithmetic_slice_base": {"merge_method": "task_arithmetic", "base_model": b, "slices": [
            {"sources": [{"model": b, "layer_range": [0, 2]}, {"model": e2, "layer_range": [0, 2],
                                                                "parameters": {"weight": 0.7}}]},
            {"base_model": e1, "sources": [{"model": e1, "layer_range": [2, 4]},
                                           {"model": e2, "layer_range": [2, 4], "parameters": {"weight": 0.3}}]}],
            } | COMMON,
        # linear: a base_model among the sources is one more input (mergekit ignores a base for linear)
        "linear_slices_weight_gradient": {"merge_method": "linear", "base_model": b, "slices": [
            {"sources": [{"model": b, "layer_range": [0, 4], "parameters": {"weight": [1, 0]}},
                         {"model": e1, "layer_range": [0, 4], "parameters": {"weight": [0, 1]}},
                         {"model": e2, "layer_range": [0, 4], "parameters": {"weight": 0.5}}]}]} | COMMON,
        # modules: the single-module layout (`default`) with slices and module parameters; a filter
        # list in a slice that matches nothing falls through to the module's value
        "modules_default_slices": {"merge_method": "task_arithmetic", "base_model": b, "modules": {"default": {
            "slices": [
                {"sources": [{"model": b, "layer_range": [0, 3]}, {"model": e1, "layer_range": [0, 3]},
                             {"model": e2, "layer_range": [1, 4]}],
                 "parameters": {"weight": [{"filter": "mlp", "value": [0.2, 0.8]}]}},
                {"sources": [{"model": b, "layer_range": [3, 4]}, {"model": e1, "layer_range": [3, 4]},
                             {"model": e2, "layer_range": [3, 4]}]}],
            "parameters": {"weight": 0.45}}}, "parameters": {"weight": 0.1, "lambda": 0.9}} | COMMON,
        "modules_default_models": {"merge_method": "linear", "modules": {"default": {
            "models": [{"model": e1, "parameters": {"weight": [1.0, 0.0]}}, {"model": e2}],
            "parameters": {"weight": 0.25}}}} | COMMON,
        # mergekit's examples/ on tiny local models
        "examples/orcamini-platy-44layer": {"slices": [
            {"sources": [{"model": e1, "layer_range": [0, 3]}]},
            {"sources": [{"model": e2, "layer_range": [1, 4]}]}], "merge_method": "passthrough",
            "dtype": "float16"},
        "examples/gradient-slerp": {"slices": [
            {"sources": [{"model": e1, "layer_range": [0, 4]}, {"model": e2, "layer_range": [0, 4]}]}],
            "merge_method": "slerp", "base_model": e1, "parameters": {"t": grad_t}, "dtype": "float16"},
        "examples/linear": {"models": [
            {"model": e1, "parameters": {"weight": 1.0}}, {"model": e3, "parameters": {"weight": 0.3}},
            {"model": e2, "parameters": {"weight": 0.5}}], "merge_method": "linear", "dtype": "float16"},
        "examples/ties": {"models": [
            {"model": e1, "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
            {"model": e2, "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
            {"model": e3, "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5},
                                                                       {"value": 0}]}}],
            "merge_method": "ties", "base_model": b, "parameters": {"normalize": True, "int8_mask": True},
            "dtype": "float16"},
        "examples/bio-merge": {"models": [
            {"model": e1, "parameters": {"density": 0.5, "weight": 0.5}},
            {"model": e2, "parameters": {"density": 0.5, "weight": 0.5}}],
            "merge_method": "ties", "base_model": b, "parameters": {"normalize": False, "int8_mask": True},
            "dtype": "float16"},
        "examples/arcee_fusion": {"models": [{"model": e1}, {"model": e2}], "merge_method": "arcee_fusion",
                                  "base_model": e1, "dtype": "bfloat16"},
    }
    # the TIES examples again in float32: float16 arithmetic leaves more equal magnitudes at the top-k
    # threshold, which the two tools break differently
    for k in ("examples/ties", "examples/bio-merge"):
        out[f"{k} (float32)"] = out[k] | {"dtype": "float32"}
    # mergekit writes arcee_fusion's output in float32 whatever `dtype`; asking for that output in
    # both compares the values before Alloy's rounding to the config dtype
    out["examples/arcee_fusion (out_dtype float32)"] = out["examples/arcee_fusion"] | {"out_dtype": "float32"}
    return out


def compare(alloy: Path, mk: Path) -> dict:
    import torch
    from safetensors import safe_open

    def load(p: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(p.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out |= {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
        return out

    xa, xm = load(alloy), load(mk)
    names_differ = sorted(set(xa) ^ set(xm))
    worst, where, dtypes = 0.0, "", set()
    for name in sorted(set(xa) & set(xm)):
        a, b = xa[name], xm[name]
        dtypes.add((str(a.dtype).removeprefix("torch."), str(b.dtype).removeprefix("torch.")))
        if a.shape != b.shape:
            return {"error": f"{name}: shape {tuple(a.shape)} (Alloy) vs {tuple(b.shape)} (mergekit)"}
        d = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        if d > worst:
            worst, where = d, name
    ca, cm = (json.loads((p / "config.json").read_text()) for p in (alloy, mk))
    return {"max_abs_diff": worst, "worst_tensor": where, "tensors": len(xa), "names_differ": names_differ[:5],
            "layers": [ca.get("num_hidden_layers"), cm.get("num_hidden_layers")],
            "dtypes": sorted(dtypes)}


def run_cases(work: Path, run_mergekit: Callable[[Path, Path, int], tuple],
              run_alloy: Callable[[Path, Path, int, str], tuple], device: str, only: str | None = None) -> list[dict]:
    import yaml

    m = build(work.parent / "slices-models-f32")
    cases = []
    for name, doc in configs(m).items():
        if only and only not in name:
            continue
        cfg = work / f"slices_{name.replace('/', '_')}.yaml"
        cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
        row: dict = {"config": name}
        try:
            mk = run_mergekit(cfg, work / "mergekit", 1_000_000_000)
        except SystemExit as e:
            row["mergekit_error"] = str(e)[-300:]
            mk = None
        try:
            al = run_alloy(cfg, work / "alloy", 2_000_000_000, device)
        except SystemExit as e:
            row["alloy_error"] = str(e)[-300:]
            al = None
        if mk is not None and al is not None:
            row |= compare(work / "alloy", work / "mergekit")
            row |= {"alloy_wall_s": round(al[0], 2), "mergekit_wall_s": round(mk[0], 2)}
        cases.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(work / "alloy", ignore_errors=True)
    shutil.rmtree(work / "mergekit", ignore_errors=True)
    return cases
