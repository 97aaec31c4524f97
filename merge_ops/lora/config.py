"""A PEFT LoRA adapter folder: what it holds and whether Alloy can apply it (no torch here).

PEFT's scale of a module is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`, where r
and alpha may be overridden per module by `rank_pattern` / `alpha_pattern` (keys matched against the
module name as PEFT does: `(.*\\.)?(key)$`). Variants whose weights are not `W + scale · B · A`
(DoRA's magnitude, aLoRA's activation tokens, weight-modifying initialisations such as PiSSA that
need their own residual base, ...) and other PEFT types are refused with a message, never applied
approximately.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_ops.errors import PICKLE_SUFFIXES, CheckpointError, pickle_refusal

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_MAX_CONFIG = 1_000_000  # bytes; PEFT writes a few KB

# config keys of LoRA variants whose merged weight is not W + scale·B·A -> what they are
_VARIANTS = {
    "use_dora": "DoRA (weight-decomposed LoRA: its magnitude vector rescales the merged weight)",
    "use_qalora": "QA-LoRA (quantisation-aware pooling of the input)",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "aLoRA (active only after its invocation tokens)",
    "layer_replication": "layer replication (changes the model's depth)",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "lora_ga_config": "LoRA-GA (its initialisation changes the base weights)",
}
# initialisations that change the base weights: the adapter needs its own residual base
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None  # base_model_name_or_path, as the adapter recorded it

    def rank(self, module: str) -> int:
        return int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r))

    def scale(self, module: str) -> float:
        alpha = float(self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.alpha))
        r = self.rank(module)
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def _pattern_key(keys: dict[str, Any], module: str) -> str:
    # peft.utils.other.get_pattern_key: the first key that matches the end of the module name
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def is_adapter_folder(folder: Path) -> bool:
    """A folder holding a PEFT adapter rather than a model (a repo with both is read as the model)."""
    return (folder / ADAPTER_CONFIG).is_file() and not any((folder / f).is_file() for f in MODEL_WEIGHTS)


def is_adapter_listing(files: list[str]) -> bool:
    """The same test on a hub repo's top-level file names."""
    return ADAPTER_CONFIG in files and not any(f in files for f in MODEL_WEIGHTS)


def check_adapter_files(names: list[str], what: str) -> None:
    """The adapter's weights are safetensors: a pickled adapter_model.bin is refused, never read."""
    if ADAPTER_WEIGHTS in names:
        return
    pickles = sorted(n for n in names if n.startswith("adapter_model") and n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise pickle_refusal(what, pickles)
    raise CheckpointError(f"{what} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: save the adapter with "
                          "save_pretrained(..., safe_serialization=True)", param=what)


def read_adapter_config(folder: Path, what: str | None = None) -> LoraConfig:
    """The folder's adapter_config.json, checked; CheckpointError naming `what` (default: the folder)."""
    what = what or str(folder)
    p = Path(folder) / ADAPTER_CONFIG
    if not p.is_file():
        raise CheckpointError(f"{what} has no {ADAPTER_CONFIG}: a LoRA adapter is a PEFT folder "
                              f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})", param=what)
    if p.stat().st_size > _MAX_CONFIG:
        raise CheckpointError(f"{what}/{ADAPTER_CONFIG} is larger than {_MAX_CONFIG} bytes: not a PEFT config",
                              param=what)
    try:
        doc = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what}/{ADAPTER_CONFIG} is not valid JSON: {e}", param=what) from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{what}/{ADAPTER_CONFIG} must be a JSON object", param=what)
    return parse_adapter_config(doc, what)


def parse_adapter_config(doc: dict[str, Any], what: str) -> LoraConfig:
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{what}/{ADAPTER_CONFIG}: {msg}", param=what)

    kind = doc.get("peft_type")
    if kind != "LORA":
        raise bad(f"peft_type {kind!r}: only LoRA adapters (peft_type LORA) can be applied; merge other PEFT "
                  "types (IA3, LoHa, LoKr, prompt tuning, ...) into the model with peft first")
    for key, what_it_is in _VARIANTS.items():
        if doc.get(key):
            raise bad(f"{key} is set: {what_it_is} is not plain LoRA (W + scale·B·A) and is not supported; "
                      "merge it into the model with peft (merge_and_unload) and give that model instead")
    init = doc.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise bad(f"init_lora_weights {init!r} changes the base weights: the adapter only reproduces the model "
                  "on its own residual base; convert it to a plain LoRA (save_pretrained with "
                  "path_initial_model_for_weight_conversion) first")
    r, alpha = doc.get("r"), doc.get("lora_alpha")
    if type(r) is not int or r < 1:
        raise bad(f"r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise bad(f"lora_alpha must be a finite number, got {alpha!r}")
    rank_pattern = doc.get("rank_pattern") or {}
    alpha_pattern = doc.get("alpha_pattern") or {}
    for name, pat, ok in (("rank_pattern", rank_pattern, lambda v: type(v) is int and v >= 1),
                          ("alpha_pattern", alpha_pattern,
                           lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v))):
        if not isinstance(pat, dict) or not all(isinstance(k, str) and ok(v) for k, v in pat.items()):
            raise bad(f"{name} must map module-name patterns to {'ranks' if name == 'rank_pattern' else 'numbers'}")
        for k in pat:
            try:
                re.compile(k)
            except re.error as e:
                raise bad(f"{name} key {k!r} is not a regex: {e}") from None
    base = doc.get("base_model_name_or_path")
    return LoraConfig(r=r, alpha=float(alpha), rslora=bool(doc.get("use_rslora")),
                      fan_in_fan_out=bool(doc.get("fan_in_fan_out")), rank_pattern=dict(rank_pattern),
                      alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
                      base_model=base if isinstance(base, str) and base else None)


def check_adapter_folder(folder: Path, what: str | None = None) -> LoraConfig:
    """Config readable and supported, weights in safetensors (no tensor is read)."""
    what = what or str(folder)
    cfg = read_adapter_config(folder, what)
    check_adapter_files([p.name for p in Path(folder).iterdir()], what)
    return cfg


def base_mismatch(cfg: LoraConfig, base_ref: str) -> str | None:
    """A note when the adapter names a different hub base than the one it is applied to.

    Only two hub ids are compared: a local path recorded at training time says nothing, and an adapter
    may be applied to a fine-tune of its base on purpose (mergekit allows it). Shapes are what must
    match; they are checked when the adapter is opened."""
    from merge_ops.refs import is_repo_id, split_adapter_ref

    named = (cfg.base_model or "").partition("@")[0]
    given = split_adapter_ref(base_ref)[0].partition("@")[0]
    if is_repo_id(named) and is_repo_id(given) and named.lower() != given.lower():
        return (f"the adapter was trained on {named!r} but is applied to {given!r}; the tensor shapes match, "
                "so it is applied as asked")
    return None
