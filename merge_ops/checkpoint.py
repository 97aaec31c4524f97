"""Checkpoint I/O: lazy per-tensor reads of HF safetensors folders and streaming sharded writes.

Reading. We parse safetensors headers ourselves (8-byte little-endian length, then a JSON object)
and check them completely before touching any tensor: a malicious or truncated file must fail
with a message naming the file, never crash or read out of bounds. Tensor bytes are read with
`os.preadv` at their header offsets into a fresh tensor or a caller-supplied buffer: unlike
`safe_open`'s mmap, nothing we have read stays resident after we drop it, so RSS tracks the
tensors in flight, not the files touched (a mapped file counts every page touched in RSS while it
stays open).

Writing. The writer is given the layout (names, shapes, dtypes) up front, which fixes every
shard's header before any data exists. Each tensor is then written with `os.pwrite` at its final
offset as it arrives, so the merged model never sits in RAM and a shard is complete (and closed)
as soon as its last tensor lands. Shards are written under temporary names and renamed at
`finish()`, so a crashed merge never leaves something that looks like a model.

Pickles (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused: loading one runs arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_ops import layers
from merge_ops.errors import PICKLE_SUFFIXES, CheckpointError, pickle_refusal

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; real headers are a few hundred KB
AUX_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)

TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json"})
# vocabulary-indexed tensors (row = token id), as mergekit's architecture files mark them (vocabulary_axis 0)
VOCAB_TENSOR = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|embed_out|tok_embeddings|lm_head|output_layer|"
    r"vocab_projector)(?:\.(?:linear|decoder))?\.(?:weight|bias)$"
    r"|^output\.weight$|^cls\.predictions\.(?:decoder\.)?bias$")
# Buffers transformers does not persist (nn.Buffer(..., persistent=False), or listed in a model's
# _keys_to_ignore_on_load_unexpected): rebuilt from the config when a model is built, so whether a
# checkpoint holds them depends only on the transformers version that saved it (v5 drops BERT's
# position_ids; old GPT-2 checkpoints hold attn.bias/masked_bias, old Llama ones rotary inv_freq).
NON_PERSISTENT_BUFFER = re.compile(
    r"(?:^|\.)embeddings\.(?:position_ids|token_type_ids)$"  # BERT, RoBERTa, CLIP, ... (v5: persistent=False)
    r"|(?:^|\.)(?:original_)?inv_freq$"  # rotary embeddings (Llama, Mistral, Qwen, GPT-NeoX, ...)
    r"|(?:^|\.)(?:attn|crossattention|attn\.attention)\.(?:bias|masked_bias)$"  # GPT-2, GPT-J, GPT-Neo masks
    r"|(?:^|\.)attn\.causal_mask$")  # CodeGen

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}


def dtype_name(dt: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling config.json uses)."""
    return str(dt).removeprefix("torch.")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in `file`
    nbytes: int


# -- reading ---------------------------------------------------------------------------------------
def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _Duplicate(k)
        seen[k] = v
    return seen


class _Duplicate(ValueError):
    pass


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; no tensor data is read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 <= n <= min(MAX_HEADER_BYTES, size - 8) and (
                head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")):
            # torch.save writes a zip (PK..) or a raw pickle (protocol 2-5 starts with 0x80 0x0N)
            raise CheckpointError(f"{path}: this is a pickle (torch.save) file renamed .safetensors; "
                                  "Alloy does not unpickle untrusted files: convert it to safetensors",
                                  param=str(path))
        if n < 0:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)", param=str(path))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header claims {n} bytes (limit {MAX_HEADER_BYTES}); "
                                  "not a valid safetensors file", param=str(path))
        if 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes); "
                                  "the file is truncated or not safetensors", param=str(path))
        raw = f.read(n)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise CheckpointError(f"{path}: tensor {e.args[0]!r} appears twice in the header", param=str(path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); not a safetensors file",
                              param=str(path)) from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: header is not a JSON object", param=str(path))
    data_start, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in doc.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: entry must have exactly dtype, shape, data_offsets", param=str(path))
        dt = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dt is None:
            raise CheckpointError(f"{where}: unknown dtype {entry['dtype']!r}; known: {', '.join(DTYPES)}",
                                  param=str(path))
        shape, offs = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative ints", param=str(path))
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_len):
            raise CheckpointError(f"{where}: data_offsets {offs!r} fall outside the data section "
                                  f"(0..{data_len})", param=str(path))
        nbytes = math.prod(shape) * dt.itemsize
        if offs[1] - offs[0] != nbytes:
            raise CheckpointError(f"{where}: data_offsets span {offs[1] - offs[0]} bytes but dtype and "
                                  f"shape need {nbytes}", param=str(path))
        spans.append((offs[0], offs[1], name))
        out[name] = TensorInfo(name, dt, tuple(shape), path, data_start + offs[0], nbytes)
    spans.sort()
    end, last = 0, ""
    for b0, b1, name in spans:
        if b0 < end and b1 > b0:  # empty tensors take no bytes and cannot overlap
            raise CheckpointError(f"{path}: tensors {last!r} and {name!r} overlap in the file", param=str(path))
        if b1 > end:
            end, last = b1, name
    return out


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            doc = json.loads(index.read_text(), object_pairs_hook=_no_duplicates)
            weight_map = doc["weight_map"]
            files = sorted(set(weight_map.values()))
        except _Duplicate as e:
            raise CheckpointError(f"{index}: tensor {e.args[0]!r} is listed twice", param=str(index)) from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid index (need a JSON object with weight_map): {e}",
                                  param=str(index)) from None
        paths = []
        for fn in files:
            if not isinstance(fn, str) or "/" in fn or not fn.endswith(".safetensors"):
                raise CheckpointError(f"{index}: shard {fn!r} is not a .safetensors file in the folder",
                                      param=str(index))
            p = folder / fn
            if not p.is_file():
                raise CheckpointError(f"{index}: shard {fn} is missing from {folder}", param=str(index))
            paths.append(p)
        return paths
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise pickle_refusal(str(folder), pickles)
    raise CheckpointError(f"{folder} has no {SINGLE_NAME} or {INDEX_NAME}", param=str(folder))


class CheckpointReader:
    """One model folder, read lazily one tensor at a time. Use as a context manager."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder} is not a folder", param=str(self.folder))
        self._info: dict[str, TensorInfo] = {}
        for f in _weight_files(self.folder):
            for name, info in read_header(f).items():
                if name in self._info:
                    raise CheckpointError(f"{self.folder}: tensor {name!r} is in both "
                                          f"{self._info[name].file.name} and {f.name}", param=str(f))
                self._info[name] = info
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for name, fn in weight_map.items():
                if name not in self._info or self._info[name].file.name != fn:
                    raise CheckpointError(f"{index}: tensor {name!r} is not in shard {fn}", param=str(index))
        self._fds: dict[Path, int] = {}

    # -- metadata --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in storage order (shard, then offset): reading in this order is sequential."""
        return sorted(self._info, key=lambda n: (self._info[n].file.name, self._info[n].offset))

    def info(self, name: str) -> TensorInfo:
        try:
            return self._info[name]
        except KeyError:
            raise CheckpointError(f"{self.folder} has no tensor {name!r}", param=str(self.folder)) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._info.values())

    def config(self) -> dict[str, Any]:
        p = self.folder / "config.json"
        if not p.is_file():
            raise CheckpointError(f"{self.folder} has no config.json", param=str(p))
        try:
            doc = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{p}: not valid JSON: {e}", param=str(p)) from None
        if not isinstance(doc, dict):
            raise CheckpointError(f"{p}: must be a JSON object", param=str(p))
        return doc

    # -- data ------------------------------------------------------------------------------------
    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor in its stored dtype. With `buffer` (a uint8 tensor of at least its size) the
        bytes land there and the result is a view of it: reuse one buffer per input across tensors."""
        info = self.info(name)
        if buffer is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        else:
            if buffer.dtype != torch.uint8 or buffer.numel() < info.nbytes:
                raise ValueError(f"buffer too small for {name} ({info.nbytes} bytes)")
            out = buffer[: info.nbytes].view(info.dtype).view(info.shape)
        self._pread(name, info, out, 0)
        return out

    def ranged(self, name: str) -> bool:
        """Whether `read_range` reads only the asked part of `name` (a plain stored tensor)."""
        return name in self._info

    def read_range(self, name: str, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Elements [lo, hi) of the flattened tensor, read into `out` (hi − lo contiguous elements
        of its stored dtype): a streamed merge reads a model-sized tensor piece by piece."""
        info = self.info(name)
        n = 1
        for d in info.shape:
            n *= d
        if not (0 <= lo <= hi <= n and out.numel() == hi - lo and out.dtype == info.dtype and out.is_contiguous()):
            raise ValueError(f"bad range [{lo}, {hi}) of {name} ({n} elements) or output buffer")
        self._pread(name, info, out, lo * out.element_size())
        return out

    def _pread(self, name: str, info: TensorInfo, out: torch.Tensor, skip: int) -> None:
        nbytes = out.numel() * out.element_size()
        if not nbytes:
            return
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        fd = self._fd(info.file)
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], info.offset + skip + done)
            if got <= 0:
                raise CheckpointError(f"{info.file}: unexpected end of file reading {name!r}",
                                      param=str(info.file))
            done += got

    def _fd(self, path: Path) -> int:
        # plain file descriptors: reads do not map the file, so an open shard costs no resident memory
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def align_buffers(ref: CheckpointReader, others: Iterable[CheckpointReader]) -> None:
    """Give every reader in `others` exactly `ref`'s non-persistent buffers (NON_PERSISTENT_BUFFER).

    One `ref` holds and another lacks is read from `ref`'s file; one only another holds is hidden.
    The reference (the base, else the first model) decides both ways because the output takes its
    layout and config.json from it, and a buffer is a function of that config: taking one from
    an expert would make the output's tensor set depend on the order of the experts, and a model
    built from the config recreates any buffer the output lacks. Every other tensor is untouched, so
    a genuinely missing weight is still refused by check_compatible (static) or check_expert_tensor
    (learned) with its name. Call right after opening, before any names() or check."""
    own = {n: i for n, i in ref._info.items() if NON_PERSISTENT_BUFFER.search(n)}
    for r in others:
        for n in [n for n in r._info if n not in own and NON_PERSISTENT_BUFFER.search(n)]:
            del r._info[n]
        for n, info in own.items():
            r._info.setdefault(n, info)  # reads open ref's file by its path: no copy, no shared descriptor


def check_compatible(readers: dict[str, CheckpointReader], ignore: Sequence[str] = (),
                     vocab_rows_may_differ: bool = False) -> list[str]:
    """Same tensor names and shapes in every model (names matching an `ignore` regex excepted);
    with `vocab_rows_may_differ` (a tokenizer merge remaps them), vocabulary tensors only need the
    same shape after their first dimension.

    Returns the shared names in the first model's storage order; raises CheckpointError naming the
    first differing tensor and the model it differs in."""
    pats = [re.compile(p) for p in ignore]

    def kept(r: CheckpointReader) -> list[str]:
        return [n for n in r.names() if not any(p.search(n) for p in pats)]

    (ref_label, ref), *others = readers.items()
    names = kept(ref)
    ref_set = set(names)
    for label, r in others:
        theirs = kept(r)
        missing = next((n for n in names if n not in r), None)
        if missing is not None:
            raise CheckpointError(f"tensor {missing!r} is in {ref_label} but missing from {label} "
                                  f"({r.folder}): the models must share one architecture", param=label)
        extra = next((n for n in theirs if n not in ref_set), None)
        if extra is not None:
            raise CheckpointError(f"tensor {extra!r} is in {label} ({r.folder}) but not in {ref_label}: "
                                  "the models must share one architecture", param=label)
        for n in names:
            a, b = r.shape(n), ref.shape(n)
            if a == b or (vocab_rows_may_differ and VOCAB_TENSOR.search(n) and a[1:] == b[1:] and a):
                continue
            hint = ""
            if VOCAB_TENSOR.search(n) and a[1:] == b[1:] and not vocab_rows_may_differ:
                hint = (": the vocabularies differ; set `tokenizer: {source: base}` (or union, or a model) to "
                        "map every model's rows to one vocabulary by token")
            raise CheckpointError(f"tensor {n!r} has shape {list(a)} in {label} but {list(b)} in {ref_label}{hint}",
                                  param=label)
    return names


# -- writing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class _Shard:
    final: str
    tmp: Path
    header: bytes
    offsets: dict[str, int]  # tensor -> absolute offset in the file
    pending: set[str]
    size: int
    fd: int | None = None


class CheckpointWriter:
    """Sharded safetensors writer with a fixed layout; tensors may arrive in any order.

        with CheckpointWriter(out, layout, shard_size=2_000_000_000) as w:
            for name, t in ...: w.write(name, t)
        # finish() runs on a clean exit: renames shards, writes the index
    """

    def __init__(self, out_dir: str | Path, layout: Iterable[TensorSpec], shard_size: int,
                 metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.layout = list(layout)
        meta = {"format": "pt", **(metadata or {})}
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        for t in self.layout:
            if groups[-1] and size + t.nbytes > shard_size:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        n = len(groups)
        self._shards: list[_Shard] = []
        self._where: dict[str, tuple[_Shard, TensorSpec]] = {}
        for i, group in enumerate(groups):
            final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, rel = _header(group, meta)
            data_start = 8 + len(header)
            shard = _Shard(final, self.out_dir / f".{final}.partial", header,
                           {k: data_start + v for k, v in rel.items()}, {t.name for t in group},
                           data_start + sum(t.nbytes for t in group))
            self._shards.append(shard)
            for t in group:
                if t.name in self._where:
                    raise ValueError(f"tensor {t.name!r} appears twice in the layout")
                self._where[t.name] = (shard, t)
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, spec = self._where[name]
        if name not in shard.pending:
            raise ValueError(f"tensor {name!r} written twice")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"tensor {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, layout says "
                             f"{spec.shape} {spec.dtype}")
        if shard.fd is None:
            shard.fd = os.open(shard.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(shard.fd, shard.size)
            _pwrite_all(shard.fd, struct.pack("<Q", len(shard.header)) + shard.header, 0)
        if spec.nbytes:
            t = tensor.detach().to("cpu").contiguous()
            _pwrite_all(shard.fd, memoryview(t.view(-1).view(torch.uint8).numpy()), shard.offsets[name])
        self.bytes_written += spec.nbytes
        shard.pending.discard(name)
        if not shard.pending:  # the shard is full: close it now rather than at the end
            os.close(shard.fd)
            shard.fd = -1

    def shard_files(self) -> list[str]:
        return [s.final for s in self._shards]

    def finish(self) -> list[Path]:
        missing = [n for s in self._shards for n in s.pending]
        if missing:
            raise ValueError(f"{len(missing)} tensor(s) never written, e.g. {missing[0]!r}")
        for s in self._shards:
            if s.fd is None:  # an empty layout still gets a valid file
                s.fd = os.open(s.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                _pwrite_all(s.fd, struct.pack("<Q", len(s.header)) + s.header, 0)
                os.close(s.fd)
            os.replace(s.tmp, self.out_dir / s.final)
        if len(self._shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in self.layout)},
                     "weight_map": {t.name: self._where[t.name][0].final for t in self.layout}}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [self.out_dir / s.final for s in self._shards]

    def abort(self) -> None:
        for s in self._shards:
            if s.fd not in (None, -1):
                os.close(s.fd)
            s.tmp.unlink(missing_ok=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def _header(group: list[TensorSpec], meta: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    doc: dict[str, Any] = {"__metadata__": meta}
    rel: dict[str, int] = {}
    off = 0
    for t in group:
        doc[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        rel[t.name] = off
        off += t.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), rel  # pad so tensor data starts 8-byte aligned


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def layout_like(reader: CheckpointReader, names: Iterable[str],
                dtype_for: dict[str, torch.dtype] | None = None) -> list[TensorSpec]:
    """The output layout of `names` shaped as in `reader`, with dtypes from `dtype_for` or stored."""
    return [TensorSpec(n, reader.shape(n), (dtype_for or {}).get(n, reader.dtype(n))) for n in names]


def set_depth(doc: dict[str, Any], num_layers: int, layer_types: list[Any] | None = None) -> None:
    """Record a new block count in a config (layer slices stack a model of another depth): the key
    the config has (in `text_config` for multimodal configs), and its per-block `layer_types`.
    Raises CheckpointError when the config has no layer count to change."""
    for d in (doc, doc.get("text_config")):
        if isinstance(d, dict) and (key := next((k for k in layers.DEPTH_KEYS if isinstance(d.get(k), int)), None)):
            d[key] = num_layers
            if isinstance(d.get("layer_types"), list):
                if layer_types is None:
                    d.pop("layer_types")  # transformers rebuilds it from the depth
                else:
                    d["layer_types"] = list(layer_types)
            return
    raise CheckpointError(f"config.json has no layer count ({', '.join(layers.DEPTH_KEYS)}) to set to {num_layers}",
                          param="slices")


def copy_aux_files(src: str | Path, dst: str | Path, out_dtype: torch.dtype | None = None, *,
                   vocab_size: int | None = None, tokenizer_files: bool = True, num_layers: int | None = None,
                   layer_types: list[Any] | None = None) -> list[str]:
    """Copy config.json (with the output dtype, and `vocab_size` when a tokenizer merge changed it,
    recorded), generation config and, unless `tokenizer_files` is False (a merged tokenizer is
    written instead), the tokenizer files."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    cfg = src / "config.json"
    if cfg.is_file():
        try:
            doc = json.loads(cfg.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg}: not valid JSON: {e}", param=str(cfg)) from None
        if out_dtype is not None and isinstance(doc, dict):
            # transformers <4.56 reads torch_dtype, newer versions read dtype
            doc["torch_dtype"] = doc["dtype"] = dtype_name(out_dtype)
        if vocab_size is not None and isinstance(doc, dict):
            text = doc.get("text_config")  # multimodal configs (Gemma 3) keep it there
            where = text if "vocab_size" not in doc and isinstance(text, dict) and "vocab_size" in text else doc
            where["vocab_size"] = vocab_size
        if num_layers is not None and isinstance(doc, dict):
            set_depth(doc, num_layers, layer_types)
        (dst / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
        copied.append("config.json")
    for fn in AUX_FILES:
        if (tokenizer_files or fn not in TOKENIZER_FILES) and (src / fn).is_file():
            shutil.copyfile(src / fn, dst / fn)
            copied.append(fn)
    return copied
