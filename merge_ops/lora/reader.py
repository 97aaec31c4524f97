"""Read a model with a LoRA adapter applied, tensor by tensor, as if it were the merged checkpoint.

`LoraReader` is a CheckpointReader over the base folder: names, shapes and dtypes are the base's, and
`read(name)` returns the base tensor plus the adapter's delta for that tensor, in the base's stored
dtype (added in float32, float64 for a float64 base, then rounded once). Nothing is materialised on
disk and only the tensor being read exists in memory: the delta is added in row blocks.

PEFT adapter tensors (keys `base_model.model.<module>.…`) map to base tensors as:

    <module>.lora_A.weight  [r, in]   <module>.lora_B.weight  [out, r]   ->  <module>.weight += s·B·A
        (GPT-2's Conv1D stores its weight [in, out]: += s·(B·A)ᵀ, as PEFT's fan_in_fan_out)
    <module>.lora_embedding_A [r, vocab]   <module>.lora_embedding_B [dim, r]   ->  += s·(B·A)ᵀ
    <module>.lora_B.bias  (lora_bias=True)                                          ->  <module>.bias += s·b
    anything else (modules_to_save copies, trained biases, `…base_layer.weight`)  ->  replaces the tensor

with s = the module's scale (config.LoraConfig.scale). Whether a 2-D weight is Linear-like or
Conv1D-like follows its shape; a square one follows `fan_in_fan_out` (or a Conv1D architecture, since
PEFT forces fan_in_fan_out on for Conv1D whatever the config says).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge_ops.checkpoint import CheckpointReader, TensorInfo, read_header
from merge_ops.context import ResolvedModel
from merge_ops.errors import CheckpointError
from merge_ops.lora.config import ADAPTER_WEIGHTS, LoraConfig, check_adapter_folder

PREFIX = "base_model.model."
_LINEAR = re.compile(r"^(?P<m>.+)\.lora_(?P<ab>[AB])\.weight$")
_EMBED = re.compile(r"^(?P<m>.+)\.lora_embedding_(?P<ab>[AB])$")
_BIAS = re.compile(r"^(?P<m>.+)\.lora_B\.bias$")
# architectures whose blocks use transformers' Conv1D (weight stored [in, out])
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
_BLOCK_ELEMS = 1 << 22  # rows per block: about 16 MB of float32 at a time


@dataclass(frozen=True)
class Delta:
    """target += scale · L @ R, with (L, R) = (B, A), or (Aᵀ, Bᵀ) when `transposed`; a bias delta
    (`a` None) is target += scale · b."""

    a: str | None
    b: str
    scale: float
    transposed: bool = False


@dataclass
class LoraPlan:
    deltas: dict[str, Delta]  # base tensor -> its delta
    replaced: dict[str, str]  # base tensor -> the adapter tensor that replaces it


@dataclass
class AdapterKeys:
    """An adapter's tensors by role (header only)."""

    pairs: dict[tuple[str, bool], dict[str, str]]  # (module, embedding?) -> {"A": key, "B": key}
    bias: dict[str, str]  # module -> its lora_B.bias key (lora_bias)
    full: dict[str, str]  # base tensor -> the adapter tensor holding its full value
    base_copies: set[str] = field(default_factory=set)  # of those, a targeted layer's own weight
                                                        # (PEFT saves an embedding's `base_layer` with its LoRA)


def adapter_keys(adapter: dict[str, TensorInfo], what: str) -> AdapterKeys:
    """Sort PEFT adapter tensors by role; refuses what is not plain LoRA."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{what}: {msg}", param=what)

    out = AdapterKeys({}, {}, {})
    for key in adapter:
        if not key.startswith(PREFIX):
            raise bad(f"tensor {key!r} is not a PEFT LoRA tensor (their names start with {PREFIX!r})")
        rest = key[len(PREFIX):]
        if rest.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in rest:
            raise bad("it is a DoRA adapter (lora_magnitude_vector): not plain LoRA, not supported")
        if m := _LINEAR.match(rest):
            out.pairs.setdefault((m["m"], False), {})[m["ab"]] = key
        elif m := _EMBED.match(rest):
            out.pairs.setdefault((m["m"], True), {})[m["ab"]] = key
        elif m := _BIAS.match(rest):
            out.bias[m["m"]] = key
        elif ".lora_" in rest:
            raise bad(f"tensor {key!r} is a LoRA tensor of a kind Alloy cannot apply")
        else:  # a full copy: modules_to_save, a trained bias, an embedding's saved base layer
            target = rest.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
            out.full[target] = key
            if ".base_layer." in rest:
                out.base_copies.add(target)
    for (module, _), ab in out.pairs.items():
        if set(ab) != {"A", "B"}:
            raise bad(f"module {module!r} has a lora_{'A' if 'A' not in ab else 'B'} tensor missing")
        a, b = adapter[ab["A"]], adapter[ab["B"]]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise bad(f"module {module!r}: LoRA on convolutions ({len(a.shape)}-D lora_A) is not supported")
    return out


def plan_adapter(base: dict[str, TensorInfo], adapter: dict[str, TensorInfo], cfg: LoraConfig, *,
                 what: str, model_type: str | None = None) -> LoraPlan:
    """Which base tensor each adapter tensor changes, and how; refuses any tensor it cannot place.
    Works on headers only (no tensor is read)."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{what}: {msg}", param=what)

    keys = adapter_keys(adapter, what)
    pairs, bias, replaced = keys.pairs, keys.bias, keys.full
    for target, key in replaced.items():
        if target not in base:
            raise bad(f"tensor {key!r} replaces {target!r}, which the base model does not have")
        if adapter[key].shape != base[target].shape:
            raise bad(f"tensor {key!r} has shape {list(adapter[key].shape)} but the base's {target!r} has "
                      f"{list(base[target].shape)} (a resized vocabulary?): the adapter does not fit this base")

    deltas: dict[str, Delta] = {}
    for (module, embedding), ab in pairs.items():
        a, b = adapter[ab["A"]], adapter[ab["B"]]
        target = f"{module}.weight"
        r = cfg.rank(module)
        if a.shape[0] != r or b.shape[1] != r:
            raise bad(f"module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not have the "
                      f"rank {r} the config gives it")
        if target not in base:
            raise bad(f"module {module!r} targets {target!r}, which the base model does not have")
        if not base[target].dtype.is_floating_point:
            raise bad(f"{target!r} is stored as {base[target].dtype} (quantised?): LoRA needs a float base")
        shape = base[target].shape
        direct, flipped = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
        if embedding:
            if shape != flipped:
                raise bad(f"embedding {target!r} has shape {list(shape)}, the adapter needs {list(flipped)}")
            transposed = True
        elif direct == flipped:  # square: the shape cannot tell Linear from Conv1D
            if shape != direct:
                raise bad(f"{target!r} has shape {list(shape)}, the adapter needs {list(direct)}")
            transposed = cfg.fan_in_fan_out or model_type in CONV1D_MODEL_TYPES
        elif shape in (direct, flipped):
            transposed = shape == flipped
        else:
            raise bad(f"{target!r} has shape {list(shape)}, the adapter's B·A is {list(direct)}")
        deltas[target] = Delta(ab["A"], ab["B"], cfg.scale(module), transposed)
    for module, key in bias.items():
        target = f"{module}.bias"
        if target not in base:
            raise bad(f"lora_bias: {target!r} is not in the base model")
        if adapter[key].shape != base[target].shape:
            raise bad(f"lora_bias {key!r} has shape {list(adapter[key].shape)}, {target!r} has "
                      f"{list(base[target].shape)}")
        if target in deltas:
            raise bad(f"{target!r} is changed twice")
        deltas[target] = Delta(None, key, cfg.scale(module))
    if not deltas and not replaced:
        raise bad(f"{ADAPTER_WEIGHTS} holds no LoRA tensor")
    return LoraPlan(deltas, replaced)


class _TensorFile(CheckpointReader):
    """One safetensors file (the adapter's), read with the checkpoint reader's checked reads."""

    def __init__(self, path: Path):
        self.folder = path.parent
        self._info = read_header(path)
        self._fds = {}


class LoraReader(CheckpointReader):
    """The base folder with an adapter applied (see the module docstring). Use as a context manager."""

    def __init__(self, base_folder: str | Path, adapter_folder: str | Path, *, what: str | None = None):
        super().__init__(base_folder)
        try:
            self.adapter_folder = Path(adapter_folder)
            what = what or str(adapter_folder)
            self.config_lora = check_adapter_folder(self.adapter_folder, what)
            self._adapter = _TensorFile(self.adapter_folder / ADAPTER_WEIGHTS)
            model_type = None
            if (self.folder / "config.json").is_file():
                model_type = self.config().get("model_type")
            self.plan = plan_adapter(self._info, self._adapter._info, self.config_lora, what=what,
                                     model_type=model_type if isinstance(model_type, str) else None)
        except BaseException:
            super().close()
            raise

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        src = self.plan.replaced.get(name)
        if src is None:
            out = super().read(name, buffer)
        else:
            info = self.info(name)
            out = torch.empty(info.shape, dtype=info.dtype) if buffer is None else \
                buffer[: info.nbytes].view(info.dtype).view(info.shape)
            out.copy_(self._adapter.read(src))
        delta = self.plan.deltas.get(name)
        if delta is not None:
            _add_delta(out, delta, self._adapter)
        return out

    def ranged(self, name: str) -> bool:
        """A tensor the adapter changes is formed whole (base + scale·B·A): no ranged reads."""
        return super().ranged(name) and name not in self.plan.replaced and name not in self.plan.deltas

    def close(self) -> None:
        super().close()
        adapter = getattr(self, "_adapter", None)
        if adapter is not None:
            adapter.close()


def _add_delta(out: torch.Tensor, d: Delta, adapter: CheckpointReader) -> None:
    cd = torch.float64 if out.dtype == torch.float64 else torch.float32
    b = adapter.read(d.b).to(cd)
    if d.a is None:  # lora_bias
        out.copy_(out.to(cd).add_(b, alpha=d.scale))
        return
    a = adapter.read(d.a).to(cd)
    left, right = (a.T, b.T) if d.transposed else (b, a)
    left = left * d.scale
    rows = max(1, _BLOCK_ELEMS // max(1, out.shape[1]))
    for i in range(0, out.shape[0], rows):
        blk = out[i: i + rows]
        blk.copy_(torch.addmm(blk.to(cd), left[i: i + rows], right))


def lora_delta(folder: str | Path, adapter_folder: str | Path, name: str) -> torch.Tensor | None:
    """The delta the adapter adds to base tensor `name` (float32, float64 for a float64 base); None when
    it leaves it alone or replaces it outright. For tests and adapter-level merges."""
    with LoraReader(folder, adapter_folder) as r:
        d = r.plan.deltas.get(name)
        if d is None:
            return None
        info = r.info(name)
        out = torch.zeros(info.shape, dtype=torch.float64 if info.dtype == torch.float64 else torch.float32)
        _add_delta(out, d, r._adapter)
        return out


def open_checkpoint(model: ResolvedModel | str | Path) -> CheckpointReader:
    """The one way to open a model's weights: a folder, or a resolved model (with its adapter applied
    when it has one)."""
    if isinstance(model, ResolvedModel):
        if model.adapter is not None:
            return LoraReader(model.path, model.adapter, what=model.ref)
        return CheckpointReader(model.path)
    return CheckpointReader(model)


def apply_adapter(module: torch.nn.Module, model: ResolvedModel) -> None:
    """Give a module loaded from `model`'s base folder the tensors its adapter changes (evaluation
    loads models with transformers; the adapter is applied in memory, never written out)."""
    assert model.adapter is not None
    state = module.state_dict()
    with LoraReader(model.path, model.adapter, what=model.ref) as r, torch.no_grad():
        for n in [*r.plan.deltas, *r.plan.replaced]:
            if n not in state:
                raise CheckpointError(f"{model.ref}: the adapter changes {n!r}, which the loaded model lacks",
                                      param=model.ref)
            state[n].copy_(r.read(n))


def model_folder(model: ResolvedModel | str | Path) -> Path:
    """Where a model's config and tokenizer files are (an adapter's: its base's)."""
    return model.path if isinstance(model, ResolvedModel) else Path(model)


def check_adapter_fits(base_folder: Path, adapter_folder: Path, what: str) -> LoraConfig:
    """Open the pair once (headers only): every adapter tensor has its place in the base."""
    with LoraReader(base_folder, adapter_folder, what=what) as r:
        return r.config_lora

