"""Bad checkpoints, written at test time: each case corrupts one model folder and names the error.

    python -m tests.corpus.make_corpus OUT_DIR     # writes every case as OUT_DIR/<case>/{base,expert0,expert1}

A case starts from a valid tiny Llama (base + two experts) and breaks one folder (`target`); the
merge must refuse it with a message naming the offending file (`culprit`, relative to the target
folder) and containing `needle`. Nothing in here is a large file on disk: the "100 MB header" is a
sparse file whose header length field claims more than the safetensors limit.

The pickles carry a payload whose `__reduce__` creates a marker file when unpickled; the tests
assert the marker never appears (nothing was executed).
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ST = "model.safetensors"
MARKER = "PWNED"  # created next to the corpus by the pickle payload if anything unpickles it


class Payload:
    """Unpickling this opens (creates) `path` for writing: proof that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@dataclass(frozen=True)
class Case:
    name: str
    target: str  # the broken folder: base | expert0
    culprit: str  # the file (relative to the target folder) the message must name
    needle: str  # what the message must say
    build: Callable[[Path, Path], None]  # (target folder, marker path) -> corrupts the folder
    reader_refuses: bool = True  # CheckpointReader alone refuses it (False: only the merge can tell)


def raw_safetensors(path: Path, header: str | bytes, data: bytes = b"", declared: int | None = None) -> None:
    """A safetensors-shaped file with a hand-written header (and a possibly lying length field)."""
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ST))


def _rewrite(folder: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    ts = edit(_tensors(folder))
    (folder / ST).unlink()
    save_file(ts, str(folder / ST), metadata={"format": "pt"})


# -- the cases --------------------------------------------------------------------------------------
def header_past_eof(d: Path, _m: Path) -> None:
    raw_safetensors(d / ST, "{}", declared=1_000_000)


def offsets_out_of_range(d: Path, _m: Path) -> None:
    raw_safetensors(d / ST, '{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\0" * 8)


def offsets_overlap(d: Path, _m: Path) -> None:
    raw_safetensors(d / ST, '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                    '"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', b"\0" * 12)


def unknown_dtype(d: Path, _m: Path) -> None:
    raw_safetensors(d / ST, '{"w":{"dtype":"F42","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8)


def huge_header(d: Path, _m: Path) -> None:
    # claims a 100 MB + 1 header and the file really is that long, but sparse: no disk, no memory
    n = 100_000_001
    raw_safetensors(d / ST, b"{", declared=n)
    with open(d / ST, "r+b") as f:
        f.truncate(8 + n)


def duplicated_names(d: Path, _m: Path) -> None:
    raw_safetensors(d / ST, '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                    '"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8)


def pickle_renamed_zip(d: Path, marker: Path) -> None:
    torch.save({"model.norm.weight": Payload(str(marker))}, d / ST)  # torch.save's zip format


def pickle_renamed_raw(d: Path, marker: Path) -> None:
    (d / ST).write_bytes(pickle.dumps({"w": Payload(str(marker))}, protocol=4))


def bin_pickle_only(d: Path, marker: Path) -> None:
    (d / ST).unlink()
    torch.save({"model.norm.weight": Payload(str(marker))}, d / "pytorch_model.bin")


def index_escapes_folder(d: Path, _m: Path) -> None:
    (d / ST).rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "../../../etc/passwd"}}))


def nan_weights(d: Path, _m: Path) -> None:
    def edit(ts):
        ts["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
        return ts
    _rewrite(d, edit)


def inf_weights(d: Path, _m: Path) -> None:
    def edit(ts):
        ts["model.embed_tokens.weight"][3, 1] = float("inf")
        return ts
    _rewrite(d, edit)


def shape_mismatch(d: Path, _m: Path) -> None:
    def edit(ts):
        w = ts["model.norm.weight"]
        ts["model.norm.weight"] = torch.ones(w.shape[0] + 1, dtype=w.dtype)
        return ts
    _rewrite(d, edit)


def name_mismatch(d: Path, _m: Path) -> None:
    def edit(ts):
        ts["model.final_norm.weight"] = ts.pop("model.norm.weight")
        return ts
    _rewrite(d, edit)


def config_not_json(d: Path, _m: Path) -> None:
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 16,')  # cut short


CASES: list[Case] = [
    Case("header_past_eof", "expert0", ST, "runs past the end of the file", header_past_eof),
    Case("offsets_out_of_range", "expert0", ST, "fall outside the data section", offsets_out_of_range),
    Case("offsets_overlap", "expert0", ST, "overlap", offsets_overlap),
    Case("unknown_dtype", "expert0", ST, "unknown dtype 'F42'", unknown_dtype),
    Case("header_100mb", "expert0", ST, "limit 100000000", huge_header),
    Case("duplicated_names", "expert0", ST, "appears twice", duplicated_names),
    Case("pickle_renamed_zip", "expert0", ST, "pickle", pickle_renamed_zip),
    Case("pickle_renamed_raw", "expert0", ST, "pickle", pickle_renamed_raw),
    Case("bin_pickle_only", "expert0", "pytorch_model.bin", "pickle", bin_pickle_only),
    Case("index_escapes_folder", "expert0", "model.safetensors.index.json", "not a .safetensors file",
         index_escapes_folder),
    Case("nan_weights", "expert0", ST, "NaN", nan_weights, reader_refuses=False),
    Case("inf_weights", "expert0", ST, "Inf", inf_weights, reader_refuses=False),
    Case("shape_mismatch", "expert0", "", "model.norm.weight", shape_mismatch, reader_refuses=False),
    Case("name_mismatch", "expert0", "", "model.norm.weight", name_mismatch, reader_refuses=False),
    Case("base_config_not_json", "base", "config.json", "not valid JSON", config_not_json,
         reader_refuses=False),
    Case("expert_config_not_json", "expert0", "config.json", "not valid JSON", config_not_json,
         reader_refuses=False),
]
BY_NAME = {c.name: c for c in CASES}


def write_models(root: Path) -> dict[str, Path]:
    """A valid tiny float32 Llama base and two experts under root (~100 KB in all)."""
    from tests.toy_models import make_experts, write_llama

    base = write_llama(root / "base", hidden=16, layers=1, intermediate=32, vocab=32, heads=2,
                       dtype=torch.float32)
    e0, e1 = make_experts(base, 2, root, scale=0.01, dtype=torch.float32)
    return {"base": base, "expert0": e0, "expert1": e1}


def write_spec(root: Path, models: dict[str, Path]) -> Path:
    spec = root / "spec.yaml"
    spec.write_text(f"method: task_arithmetic\nbase: {models['base']}\nexperts:\n"
                    f"  - model: {models['expert0']}\n  - model: {models['expert1']}\n"
                    "parameters: {lambda: 0.5}\n")
    return spec


def build_case(case: Case, clean: dict[str, Path], root: Path) -> tuple[dict[str, Path], Path]:
    """Copy the clean models under root, break case.target; returns (models, marker path)."""
    models = {k: Path(shutil.copytree(v, root / k)) for k, v in clean.items()}
    marker = root / MARKER
    case.build(models[case.target], marker)
    return models, marker


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "corpus-out")
    clean = write_models(out / "_clean")
    for case in CASES:
        models, _ = build_case(case, clean, out / case.name)
        write_spec(out / case.name, models)
        print(f"{case.name}: {case.target}/{case.culprit} -> expect {case.needle!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
