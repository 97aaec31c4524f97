"""mergekit's `modules:` for multi-module architectures (a vision-language model: a text decoder, a
vision tower and a projector), each module merged by its own slices or models and parameters.

    merge_method: linear
    modules:
      text_decoder:
        slices: [{sources: [{model: a, layer_range: [0, 24]}, {model: b, layer_range: [0, 24]}]}]
        parameters: {weight: 0.5}
      vision_tower: {models: [{model: a}, {model: b}]}
      multi_modal_projector: {models: [{model: a}, {model: b}]}

In our schema a module's slices are slices tagged `module: <name>`, with the module's parameters
folded into each slice's (they rank between the slice's and the top level's, as in mergekit's
`ConfigReader.parameter_sources`). A `models` entry is one slice whose sources leave out
`layer_range`: all the module's layers of each model, as mergekit 0.1.5's `normalize_config`.

A module is the checkpoint's tensors under its weight prefix (mergekit's `weight_prefix` in
`_data/architectures/*.json`); its blocks are those tensors' layer indices. Per module, as mergekit's
`MergePlanner.plan_module`: output blocks count from 0, gradients run over each slice
(t = offset / (length - 1)), tensors before the blocks come from the module's first slice and those
after them (the module's `post` names) from its last, both at t = 0; the output config's layer count
of each module is written at the module's key.

Alloy knows the architectures whose modules are plain weight prefixes (table below); the others
mergekit 0.1.5 defines by per-tensor name lists (Qwen2/2.5/3-VL, T5, Whisper) or infers from the
tensors (LLaVA, where module names are tensor prefixes) are refused naming the architecture.
Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_ops.errors import SpecError

if TYPE_CHECKING:
    from merge_ops.spec import MergeSpec


@dataclass(frozen=True)
class ModuleDef:
    """One module of an architecture: its tensors' name prefix, the dotted config key of its layer
    count (None: a module without blocks), and its tensors that follow the blocks (after the prefix)."""

    prefix: str
    depth_key: str | None
    post: tuple[str, ...] = ()


_TEXT_POST = ("model.norm.weight", "lm_head.weight")
# from mergekit 0.1.5's modular architecture definitions (names and keys are the checkpoints' own)
ARCHITECTURES: dict[str, dict[str, ModuleDef]] = {
    "Mistral3ForConditionalGeneration": {
        "text_decoder": ModuleDef("language_model.", "text_config.num_hidden_layers", _TEXT_POST),
        "vision_tower": ModuleDef("vision_tower.", "vision_config.num_hidden_layers"),
        "multi_modal_projector": ModuleDef("multi_modal_projector.", None),
    },
    "Gemma3ForConditionalGeneration": {
        "text_decoder": ModuleDef("language_model.", "text_config.num_hidden_layers", _TEXT_POST),
        # hub checkpoints nest the tower in `vision_model.` (mergekit's prefix); transformers 5 saves it flat
        "vision_tower": ModuleDef("vision_tower.", "vision_config.num_hidden_layers",
                                  tuple(f"{p}post_layernorm.{w}" for p in ("vision_model.", "") for w in ("bias", "weight"))),
        "multi_modal_projector": ModuleDef("multi_modal_projector.", None),
    },
}
# mergekit 0.1.5 knows these with modules Alloy does not split by prefix
UNSUPPORTED = {"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
               "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
               "T5ForConditionalGeneration", "WhisperForConditionalGeneration", "Llama4ForConditionalGeneration"}


def architecture_of(config: dict[str, Any]) -> str | None:
    archs = config.get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def module_table(config: dict[str, Any], used: list[str]) -> dict[str, ModuleDef]:
    """The modules of a checkpoint's architecture, checked against the module names a spec uses:
    every one known, and every module of the architecture listed (mergekit leaves a module it is not
    given out of the output; Alloy refuses rather than write a model without it)."""
    arch = architecture_of(config)
    table = ARCHITECTURES.get(arch or "")
    if table is None:
        why = ("mergekit 0.1.5 defines its modules by per-tensor name lists Alloy does not read"
               if arch in UNSUPPORTED else "it is not a multi-module architecture Alloy knows")
        raise SpecError(f"modules: {sorted(used)} given for architecture {arch!r}, but {why}; multi-module "
                        f"architectures Alloy merges: {', '.join(sorted(ARCHITECTURES))} (or use `slices`/"
                        "`models` for a single decoder stack)", param="modules")
    unknown = [m for m in used if m not in table]
    if unknown:
        raise SpecError(f"modules: {arch} has no module(s) {unknown}; its modules: {sorted(table)}",
                        param=f"modules.{unknown[0]}")
    missing = [m for m in table if m not in used]
    if missing:
        raise SpecError(f"modules: list every module of {arch}: {missing} missing (give it `models` to merge "
                        "it whole)", param=f"modules.{missing[0]}")
    return table


def multi_module(config: dict[str, Any]) -> str | None:
    """The architecture's name when it has several modules (top-level `slices` cannot say which)."""
    arch = architecture_of(config)
    return arch if arch in ARCHITECTURES or arch in UNSUPPORTED else None


def config_value(config: dict[str, Any], key: str) -> Any:
    """A dotted key's value (`text_config.num_hidden_layers`), None when absent."""
    d: Any = config
    for part in key.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def set_config_value(config: dict[str, Any], key: str, value: Any) -> bool:
    """Set a dotted key that exists; False when the config lacks it."""
    *path, last = key.split(".")
    d: Any = config
    for part in path:
        d = d.get(part) if isinstance(d, dict) else None
    if not isinstance(d, dict) or last not in d:
        return False
    d[last] = value
    return True


def used_modules(spec: MergeSpec) -> list[str]:
    out: list[str] = []
    for s in spec.slices or []:
        if s.module is not None and s.module not in out:
            out.append(s.module)
    return out


def slice_label(spec: MergeSpec, i: int) -> str:
    """How messages name slice i: `slices[i]`, and for a module's slice where mergekit's config has it."""
    slices = spec.slices or []
    m = slices[i].module
    if m is None:
        return f"slices[{i}]"
    return f"slices[{i}] (modules.{m}.slices[{sum(s.module == m for s in slices[:i])}])"


def check_slice_modules(spec: MergeSpec) -> None:
    """`module` on every slice or on none (ValueError naming the field), from check_slices."""
    slices = spec.slices or []
    tagged = [s.module is not None for s in slices]
    if any(tagged) and not all(tagged):
        i = tagged.index(False)
        raise ValueError(f"slices[{i}].module: give every slice a module, or none (a single decoder stack)")
    for i, s in enumerate(slices):
        for j, src in enumerate(s.sources):
            if src.layer_range is None and s.module is None:
                raise ValueError(f"slices[{i}].sources[{j}].layer_range: required ([start, end), 0-based)")


def check_local_modules(spec: MergeSpec, configs: dict[int, dict[str, Any]]) -> None:
    """Module names and layer ranges against local models' configs (`configs`: driver position ->
    config.json). Raises SpecError naming the field."""
    from merge_ops.slices_spec import model_position

    used = used_modules(spec)
    for pos, cfg in sorted(configs.items()):
        if not used:
            arch = multi_module(cfg)
            if arch is not None and spec.slices:
                raise SpecError(f"slices: {arch} has several modules; stack layers per module with mergekit's "
                                "`modules:` (e.g. text_decoder, vision_tower, multi_modal_projector)",
                                param="slices")
            continue
        table = module_table(cfg, used)
        for i, s in enumerate(spec.slices or []):
            assert s.module is not None
            depth_key = table[s.module].depth_key
            depth = config_value(cfg, depth_key) if depth_key else 0
            for j, src in enumerate(s.sources):
                if model_position(spec, src.model) != pos or src.layer_range is None or not isinstance(depth, int):
                    continue
                if src.layer_range[1] > depth:
                    where = f"slices[{i}].sources[{j}].layer_range"
                    raise SpecError(f"{slice_label(spec, i)}.sources[{j}].layer_range: [{src.layer_range[0]}, "
                                    f"{src.layer_range[1]}] reaches past the "
                                    f"{depth} layers of module {s.module} of {src.model!r}", param=where)


def read_config(folder: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


# -- mergekit ---------------------------------------------------------------------------------
MODULE_KEYS = {"slices", "models", "parameters"}


def module_slices(name: str, mod: Any, base: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A mergekit module -> (its slices in mergekit's form, its parameters). `models` becomes one
    slice of whole-module sources (no `layer_range`), the base added when it is not listed."""
    where = f"modules.{name}"
    if not isinstance(mod, dict):
        raise SpecError(f"mergekit `{where}` maps to {{slices | models, parameters}}", param=where)
    unknown = set(mod) - MODULE_KEYS
    if unknown:
        raise SpecError(f"mergekit `{where}` has keys mergekit does not read: {sorted(unknown)}", param=where)
    if (not mod.get("slices")) == (not mod.get("models")):
        raise SpecError(f"mergekit `{where}`: give exactly one of `slices` or `models`", param=where)
    params = mod.get("parameters") or {}
    if not isinstance(params, dict):
        raise SpecError(f"mergekit `{where}.parameters` is a mapping", param=f"{where}.parameters")
    if mod.get("slices"):
        if not isinstance(mod["slices"], list):
            raise SpecError(f"mergekit `{where}.slices` is a list", param=f"{where}.slices")
        return mod["slices"], params
    models = mod["models"]
    if not isinstance(models, list):
        raise SpecError(f"mergekit `{where}.models` is a list of {{model, parameters}}", param=f"{where}.models")
    sources = []
    for k, m in enumerate(models):
        model = m.get("model") if isinstance(m, dict) else m
        if not isinstance(model, str):
            raise SpecError(f"mergekit `{where}.models[{k}]` needs a `model`", param=f"{where}.models[{k}]")
        sources.append({"model": model, "parameters": (m.get("parameters") or {}) if isinstance(m, dict) else {}})
    if base is not None and all(s["model"] != base for s in sources):
        sources.append({"model": base})
    return [{"sources": sources}], params
