"""Model sources: turn a spec's model reference into a local folder plus where it came from.

    ./models/code, /abs/path, file:///abs   a local folder holding safetensors
    org/name, org/name@revision             a hub repo, downloaded with huggingface_hub
    model+adapter                           a PEFT LoRA adapter (folder or hub repo) applied to a model
    an adapter alone                        an expert: applied to the spec's base (`lora_base`)

Hub downloads are pinned: the revision is resolved to a commit sha first and that exact commit is
downloaded, so the recorded commit is the one that was merged even if the branch moves meanwhile.
Only safetensors, JSON and tokenizer files are fetched; pickled weights (.bin/.pt/.pth) never are.
`HF_ENDPOINT` and `HF_TOKEN` are read at call time; explicit arguments win.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from pathlib import Path

from merge_ops.context import ResolvedModel
from merge_ops.errors import PICKLE_SUFFIXES, AlloyError, CheckpointError, InputError, pickle_refusal
from merge_ops.lora.config import (
    ADAPTER_CONFIG,
    base_mismatch,
    check_adapter_files,
    check_adapter_folder,
    is_adapter_folder,
    is_adapter_listing,
)
from merge_ops.refs import ModelRef, parse_model_ref, split_adapter_ref

log = logging.getLogger(__name__)

# What a merge needs from a repo: weights (safetensors only), configs, tokenizer files.
HUB_ALLOW_PATTERNS = [
    "*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.jinja", "vocab.txt", "merges.txt",
]
_SAMPLES = 16  # data blocks sampled per safetensors file by the local fingerprint
_BLOCK = 4096
_MAX_HEADER = 100_000_000  # safetensors' own header limit


def resolve(ref: str, *, token: str | None = None, endpoint: str | None = None,
            cache_dir: str | Path | None = None, allowed_roots: list[Path] | None = None,
            lora_base: ResolvedModel | None = None, adapter_alone: bool = False) -> ResolvedModel:
    """A local folder or a hub repo as a ResolvedModel with its commit (hub sha or local fingerprint).

    A LoRA adapter comes back as the model it is applied to (`path`: that model's folder, `adapter`:
    the adapter's, `commit`: "<model commit>+<adapter commit>"): written `model+adapter`, or alone when
    `lora_base` (the spec's base) is given. Adapter folders pass the same root and link checks.
    `adapter_alone`: a bare adapter comes back as its own folder (for adapter-level tools)."""
    def one(x: str) -> ResolvedModel:
        r = parse_model_ref(x)
        if r.is_local:
            return _resolve_local(r, allowed_roots)
        return _resolve_hub(r, token=token, endpoint=endpoint, cache_dir=cache_dir)

    model_ref, adapter_ref = split_adapter_ref(ref)
    if adapter_ref is not None:
        model = one(model_ref)
        if model.adapter is not None or is_adapter_folder(model.path):
            raise InputError(f"{ref!r}: {model_ref!r} is itself a LoRA adapter; write model+adapter with a "
                             "model first", param=ref)
        adapter = one(adapter_ref)
        if not is_adapter_folder(adapter.path):
            raise InputError(f"{ref!r}: {adapter_ref!r} is not a PEFT adapter (no {ADAPTER_CONFIG}, or it holds "
                             "a full model): after '+' give a LoRA adapter folder or hub repo", param=ref)
        return _with_adapter(ref, model, adapter)
    m = one(ref)
    if not is_adapter_folder(m.path) or adapter_alone:
        return m
    if lora_base is None:
        raise InputError(f"{ref!r} is a LoRA adapter, and there is no base model to apply it to: write it as "
                         "model+adapter, or set the spec's `base`", param=ref)
    if lora_base.adapter is not None:
        raise InputError(f"{ref!r} is a LoRA adapter and the base {lora_base.ref!r} already has one: write this "
                         "expert as model+adapter with a plain model", param=ref)
    return _with_adapter(ref, lora_base, m)


def _with_adapter(ref: str, model: ResolvedModel, adapter: ResolvedModel) -> ResolvedModel:
    from merge_ops.lora.reader import check_adapter_fits  # torch: only once an adapter is met

    cfg = check_adapter_fits(model.path, adapter.path, ref)  # every tensor placed, from the headers
    if (note := base_mismatch(cfg, model.ref)) is not None:
        log.warning("%s: %s", ref, note)
    hub = model.repo_id is not None and adapter.repo_id is not None
    return ResolvedModel(ref=ref, path=model.path, repo_id=adapter.repo_id if hub else None,
                         revision=adapter.revision if hub else None, commit=f"{model.commit}+{adapter.commit}",
                         adapter=adapter.path)


def head_commit(ref: str, *, token: str | None = None, endpoint: str | None = None,
                allowed_roots: list[Path] | None = None) -> str:
    """The commit `ref` points at now, without downloading weights (for on-new-revision polling);
    "<model>+<adapter>" for a model with an adapter."""
    model_ref, adapter_ref = split_adapter_ref(ref)
    if adapter_ref is not None:
        return "+".join(head_commit(x, token=token, endpoint=endpoint, allowed_roots=allowed_roots)
                        for x in (model_ref, adapter_ref))
    r = parse_model_ref(ref)
    if r.is_local:
        return _resolve_local(r, allowed_roots).commit or ""
    sha, _ = _hub_info(r, token=token, endpoint=endpoint)
    return sha


# -- local folders --------------------------------------------------------------------------------
def _resolve_local(r: ModelRef, allowed_roots: list[Path] | None) -> ResolvedModel:
    path = Path(r.local_path or "").expanduser().resolve()
    if allowed_roots is not None:
        roots = [Path(a).expanduser().resolve() for a in allowed_roots]
        if not any(path.is_relative_to(root) for root in roots):
            raise InputError(
                f"local model path {r.raw!r} lies outside the folders this server may read "
                f"({', '.join(str(x) for x in roots) or 'none'}): use a path inside them or a hub id "
                "org/name@revision", param=r.raw)
    if not path.is_dir():
        raise CheckpointError(f"model folder {r.raw!r} does not exist (or is not a folder)", param=r.raw)
    if allowed_roots is not None:
        check_links(path, roots, r.raw)
    if is_adapter_folder(path):
        check_adapter_folder(path, r.raw)
    else:
        check_weights(path, r.raw)
    return ResolvedModel(ref=r.raw, path=path, commit=local_fingerprint(path))


_MAX_ENTRIES = 10_000  # a model folder holds tens of files; more is a folder we will not walk


def check_links(folder: Path, roots: list[Path], what: str) -> None:
    """Refuse a folder whose files or subfolders are symlinks leading outside the allowed roots.

    Resolving only the folder is not enough: a `model.safetensors` or `tokenizer.json` linked to
    another tenant's output or to /etc would be read, merged and republished. Links that stay inside
    the roots (a Hub-style cache of blobs) are fine.
    """
    seen = 0
    for dirpath, dirnames, filenames in os.walk(folder):  # never follows directory links
        for name in [*dirnames, *filenames]:
            seen += 1
            if seen > _MAX_ENTRIES:
                raise InputError(f"model folder {what!r} holds more than {_MAX_ENTRIES} entries: it is not a "
                                 "checkpoint folder", param=what)
            entry = Path(dirpath) / name
            if entry.is_symlink() and not any(entry.resolve().is_relative_to(root) for root in roots):
                rel = entry.relative_to(folder)
                raise InputError(f"{what}/{rel} is a link to a file outside the folders this server may read: "
                                 "copy the file into the model folder instead", param=what)


def check_weights(folder: Path, what: str) -> None:
    """Refuse a folder with no safetensors; name pickles when that is all it has."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise pickle_refusal(what, pickles)
    raise CheckpointError(f"{what} holds no *.safetensors weights", param=what)


def local_fingerprint(folder: Path) -> str:
    """'local:' + sha256 over config.json, the safetensors headers, and sampled data blocks.

    Cheap (a few small reads per file, never the whole model) and independent of the folder's
    location and timestamps. Headers alone would not notice retrained weights (same names, shapes
    and offsets), so evenly spaced 4 KiB blocks of the data are hashed too: retraining changes
    essentially every block, while a single edited element can go unnoticed (this is not a
    cryptographic hash of the content).
    """
    h = hashlib.sha256()
    for name in ("config.json", ADAPTER_CONFIG):  # an adapter's alpha and rank change its weights too
        cfg = folder / name
        if cfg.is_file():
            h.update(name.encode() + b"\0" + cfg.read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{f} is not a safetensors file (shorter than its header)", param=str(f))
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):  # never read a header of any claimed size into memory
                from merge_ops.checkpoint import read_header  # its precise reason: pickle, truncated, too big

                read_header(f)
                raise CheckpointError(f"{f} is not a safetensors file (header length {n} > file size)",
                                      param=str(f))
            h.update(fh.read(n))
            span = size - 8 - n
            if span <= _BLOCK * _SAMPLES:  # small file: all of it is as cheap as a sample
                h.update(fh.read(span))
                continue
            for i in range(_SAMPLES):
                fh.seek(8 + n + (span - _BLOCK) * i // (_SAMPLES - 1))
                h.update(fh.read(_BLOCK))
    return "local:" + h.hexdigest()


# -- hub repos ------------------------------------------------------------------------------------
def _settings(token: str | None, endpoint: str | None) -> tuple[str | None, str | None]:
    return (token or os.environ.get("HF_TOKEN") or None,
            (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None)


def _hub_info(r: ModelRef, *, token: str | None, endpoint: str | None) -> tuple[str, list[str]]:
    """(commit sha, file names) of r's revision."""
    from huggingface_hub import HfApi

    token, endpoint = _settings(token, endpoint)
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(r.repo_id, revision=r.revision)
    except Exception as e:  # every failure becomes a message naming what to fix
        raise hub_error(e, r, endpoint, token) from None
    if not info.sha:
        raise AlloyError(f"the hub at {endpoint or 'huggingface.co'} returned no commit for {r.raw!r}")
    return info.sha, [s.rfilename for s in info.siblings or []]


def _resolve_hub(r: ModelRef, *, token: str | None, endpoint: str | None,
                 cache_dir: str | Path | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    sha, files = _hub_info(r, token=token, endpoint=endpoint)
    top = [f for f in files if "/" not in f]
    if is_adapter_listing(top):  # a PEFT adapter: its safetensors weights, never adapter_model.bin
        check_adapter_files(top, f"hub repo {r.repo_id}@{r.revision or 'main'} (commit {sha[:12]})")
    elif not any(f.endswith(".safetensors") for f in top):
        where = f"hub repo {r.repo_id}@{r.revision or 'main'} (commit {sha[:12]})"
        pickles = [f for f in top if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise pickle_refusal(where, pickles)
        raise CheckpointError(f"{where} has no *.safetensors weights: push a safetensors copy "
                              "(save_pretrained(..., safe_serialization=True))", param=r.raw)
    token, endpoint = _settings(token, endpoint)
    try:
        folder = snapshot_download(r.repo_id, revision=sha, endpoint=endpoint, token=token,
                                   cache_dir=str(cache_dir) if cache_dir else None,
                                   allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as e:
        raise hub_error(e, r, endpoint, token) from None
    if is_adapter_folder(Path(folder)):
        check_adapter_folder(Path(folder), r.raw)
    return ResolvedModel(ref=r.raw, path=Path(folder), repo_id=r.repo_id, revision=r.revision or "main",
                         commit=sha)


def scrub(text: str, *secrets: str | None) -> str:
    """Remove tokens from text that may reach a user or a log."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    return re.sub(r"\bhf_[A-Za-z0-9]{8,}\b", "hf_***", text)


def hub_error(e: Exception, r: ModelRef, endpoint: str | None, token: str | None) -> AlloyError:
    """A huggingface_hub failure as an error that says what to fix (and never shows the token)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = endpoint or "huggingface.co"
    rev = r.revision or "main"
    if isinstance(e, GatedRepoError):
        msg = (f"hub repo {r.repo_id} on {where} is gated: accept its terms on the hub with the account whose "
               "token the server uses (HF_TOKEN)")
        return InputError(msg, param=r.raw)
    if isinstance(e, RepositoryNotFoundError):
        msg = (f"hub repo {r.repo_id!r} not found on {where} (or it is private and the configured token "
               "cannot read it): check the id, or set a token with read access (HF_TOKEN)")
        return InputError(msg, param=r.raw)
    if isinstance(e, RevisionNotFoundError):
        return InputError(f"revision {rev!r} not found in hub repo {r.repo_id} on {where}: use a branch, "
                          "tag or commit sha that exists", param=r.raw)
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status in (401, 403):
        return InputError(f"the hub at {where} refused the credentials for {r.repo_id} (HTTP {status}): "
                          "set a valid token with read access (HF_TOKEN)", param=r.raw)
    detail = scrub(str(e), token).strip().splitlines()
    return AlloyError(f"hub request for {r.raw} on {where} failed: {detail[0] if detail else type(e).__name__}")
