"""The streaming driver shared by every static method.

For each tensor, in the storage order of the base (sequential reads): read it from the base and
every expert, resolve the method's parameters for that tensor (per-layer gradients, filters), call
the method module's `merge_tensor`, check the result is finite, and write it at its place in the
output shards. At any moment only a couple of tensors per input are in memory: one being merged
and the next one, which a reader thread fetches meanwhile so disk/page-cache copies overlap the
arithmetic. Input buffers are allocated once (the size of the largest tensor) and reused.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from merge_ops import layers, memory
from merge_ops.checkpoint import (
    NON_PERSISTENT_BUFFER,
    TORCH_DTYPES,
    CheckpointReader,
    CheckpointWriter,
    TensorSpec,
    align_buffers,
    check_compatible,
    copy_aux_files,
)
from merge_ops.context import JobContext, MethodResult
from merge_ops.errors import CheckpointError, MergeFailed
from merge_ops.heads import HEADS_DIR, write_heads
from merge_ops.lora.reader import open_checkpoint
from merge_ops.methods import implementation
from merge_ops.slices_spec import resolve_scoped
from merge_ops.spec import MergeSpec, parse_size
from merge_ops.static import slices
from merge_ops.static.inputs import TensorInputs
from merge_ops.tokenizer_merge import (
    VocabPlan,
    check_same_vocabulary,
    is_vocab_tensor,
    plan_vocab,
    resolve_chat_template,
    write_tokenizer,
)
from merge_ops.tokenizer_spec import model_index

MergeFn = Callable[[TensorInputs], torch.Tensor]
# Intra-op threads for the merge arithmetic on CPU. The kernels run many small cache-sized ops; each
# is an OpenMP parallel region that waits for all its threads, so on a busy machine every op stalls
# for a scheduler slice (measured on the 302M task_arithmetic, 2 cores under load: 2 threads 137 s
# wall / 24 s CPU, 1 thread 12 s / 2.4 s). One compute thread, with reads and writes on their own
# threads, keeps both cores busy without that stall.
MERGE_THREADS = int(os.environ.get("ALLOY_MERGE_THREADS", "1"))


def load_merge_fn(spec: MergeSpec) -> MergeFn:
    return implementation(spec.method_def()).merge_tensor


def tensor_seed(seed: int, name: str) -> int:
    """A stable per-tensor seed: random methods give the same result whatever the tensor order."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def resolve_params(spec: MergeSpec, name: str, t: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(global params, per-expert model params) of the spec's method for tensor `name` at depth t.
    As mergekit's `resolve_parameter`: the expert's value, else the top-level one, else the default;
    a filter list that matches nothing falls through to the next."""
    m = spec.method_def()
    glob: dict[str, Any] = {}
    per_model: list[dict[str, Any]] = [{} for _ in spec.experts]
    for p in m.params:
        if p.scope == "global":
            v = resolve_scoped([spec.parameters], p.name, name, t)
            glob[p.name] = p.default if v is None else v
        else:
            for i, d in enumerate(per_model):
                v = resolve_scoped([spec.experts[i].parameters, spec.parameters], p.name, name, t)
                d[p.name] = p.default if v is None else v
    return glob, per_model


def _finite(t: torch.Tensor) -> bool:
    # min/max propagate NaN and expose ±Inf; one aminmax pass is ~25x faster than isfinite().all() on bf16
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _merge_one(ctx: JobContext, merge_tensor: MergeFn, name: str, inputs: list[torch.Tensor], n_layers: int,
               compute_dtype: torch.dtype, out_dtype: torch.dtype, step: slices.Step | None = None) -> torch.Tensor:
    """Merge one tensor; a sliced merge's `step` carries its own method, parameters and base."""
    spec, device = ctx.spec, torch.device(ctx.device)
    if device.type != "cpu":
        inputs = [x.to(device) for x in inputs]
    if step is None:
        glob, per_model = resolve_params(spec, name, layers.depth_fraction(name, n_layers))
        has_base, layer = ctx.base is not None, layers.layer_index(name)
    else:
        glob, per_model, has_base, layer = step.params, step.model_params, step.has_base, step.layer
        merge_tensor = implementation(step.method).merge_tensor
    return merge_tensor(TensorInputs(
        name=name, base=inputs[0] if has_base else None, experts=inputs[1:] if has_base else inputs,
        model_params=per_model, params=glob, compute_dtype=compute_dtype, out_dtype=out_dtype,
        layer=layer, n_layers=n_layers,
        generator=torch.Generator(device=device).manual_seed(tensor_seed(spec.seed, name))))


def _vocab_plan(spec: MergeSpec, folders: list, labels: list[str]) -> VocabPlan | None:
    """The tokenizer merge of `spec.tokenizer` (None without one: then rows merge by id, so the
    tokenizers must agree on ids)."""
    if spec.tokenizer is None:
        if spec.slices is None:
            check_same_vocabulary(folders, labels)
        return None
    model_of = {ref: i for _, ref in spec.tokenizer.model_refs() if (i := model_index(spec, ref)) is not None}
    return plan_vocab(spec.tokenizer, folders, labels, model_of, has_base=spec.base is not None)


def run(ctx: JobContext) -> MethodResult:
    spec = ctx.spec
    t0 = time.perf_counter()
    memory.reset_peak(ctx.device)
    merge_tensor = load_merge_fn(spec)
    compute_dtype = TORCH_DTYPES[spec.dtype]
    out_dtype = TORCH_DTYPES[spec.out_dtype] if spec.out_dtype else None
    keep = [re.compile(p) for p in spec.task_specific]

    with ExitStack() as stack:
        if torch.device(ctx.device).type == "cpu":
            stack.enter_context(_intra_op_threads(MERGE_THREADS))
        labels = (["base"] if ctx.base is not None else []) + [f"expert {n}" for n in spec.expert_names()]
        folders = ([ctx.base.path] if ctx.base is not None else []) + [e.path for e in ctx.experts]
        models = ([ctx.base] if ctx.base is not None else []) + list(ctx.experts)
        # open_checkpoint: a model given with a LoRA adapter reads as base + delta, tensor by tensor
        readers = {lab: stack.enter_context(open_checkpoint(m)) for lab, m in zip(labels, models, strict=True)}
        ref = readers[labels[0]]  # the base, or the first expert for base-free methods
        # buffers transformers does not persist (BERT's position_ids under v5): the reference's set, read from it
        align_buffers(ref, list(readers.values())[1:])
        vocab = _vocab_plan(spec, folders, labels)
        order = list(readers.values())
        # a sliced spec reads other blocks of models of any depth: its plan checks each tensor it reads
        sliced = slices.plan(spec, order) if spec.slices is not None else None
        steps = {st.name: st for st in sliced.steps} if sliced is not None else {}
        shared = check_compatible(readers, ignore=spec.task_specific, vocab_rows_may_differ=vocab is not None
                                  ) if sliced is None else sliced.names
        for r in readers.values():  # a config.json that is not JSON is a broken checkpoint too
            if (r.folder / "config.json").is_file():
                r.config()
        # task-specific tensors (e.g. classification heads) are not merged: the reference's copy is kept
        shared_set = set(shared)
        names = [n for n in ref.names() if n in shared_set or any(p.search(n) for p in keep)
                 ] if sliced is None else sliced.names
        n_layers = layers.num_layers(names)
        # a multi-module model (vision tower, text decoder): gradients over each module's own depth
        depth_of = slices.module_depths(ref.folder, names) if sliced is None else None

        def source(n: str) -> tuple[CheckpointReader, str]:  # the reader and name an output tensor is shaped by
            return (ref, n) if sliced is None else (order[steps[n].reads[0][0]], steps[n].reads[0][1])

        def out_dt(n: str) -> torch.dtype:
            r, m = source(n)
            stored = r.dtype(m)
            return out_dtype if out_dtype is not None and stored.is_floating_point else stored

        def out_shape(n: str) -> tuple[int, ...]:  # a tokenizer merge sets the vocabulary tensors' rows
            r, m = source(n)
            s = r.shape(m)
            return (vocab.rows_out, *s[1:]) if vocab is not None and n in shared_set and is_vocab_tensor(n) else s

        layout = [TensorSpec(n, out_shape(n), out_dt(n)) for n in names]
        writer = stack.enter_context(CheckpointWriter(ctx.out_dir, layout, parse_size(spec.shard_size)))
        if sliced is None:
            biggest = max((r.info(n).nbytes for n in shared for r in order), default=0)
            biggest = max([biggest, *(ref.info(n).nbytes for n in names)])
        else:
            biggest = max((order[k].info(m).nbytes for st in sliced.steps for k, m in st.reads), default=0)
        # two buffer sets: one being merged, one being filled by the reader thread. A second thread
        # writes each result while the next tensor is merged (at most one write in flight).
        buffers = [[torch.empty(biggest, dtype=torch.uint8) for _ in order] for _ in range(2)]
        reads = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="alloy-read"))
        writes = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="alloy-write"))

        def fetch(i: int) -> list[torch.Tensor]:
            n = names[i]
            if sliced is not None:
                return [order[k].read(m, b) for (k, m), b in zip(steps[n].reads, buffers[i % 2], strict=False)]
            if n not in shared_set:
                return [ref.read(n, buffers[i % 2][0])]
            return [r.read(n, b) for r, b in zip(order, buffers[i % 2], strict=True)]

        pending = reads.submit(fetch, 0) if names else None
        written: Future[None] | None = None
        n_params = 0
        for i, name in enumerate(names):
            ctx.check_cancel()
            inputs = pending.result()
            pending = reads.submit(fetch, i + 1) if i + 1 < len(names) else None
            n_params += inputs[0].numel()
            if name not in shared_set or not inputs[0].is_floating_point() or NON_PERSISTENT_BUFFER.search(name):
                out = inputs[0].to(out_dt(name))  # a buffer is the reference's too: not a weight to merge
            else:
                if vocab is not None and is_vocab_tensor(name):  # rows in the output vocabulary
                    inputs = vocab.remap(name, inputs, compute_dtype)
                out = _merge_one(ctx, merge_tensor, name, inputs, depth_of(name) if depth_of else n_layers,
                                 compute_dtype, out_dt(name), steps.get(name))
                if tuple(out.shape) != out_shape(name):
                    raise MergeFailed(f"method {spec.method} returned shape {list(out.shape)} for tensor "
                                      f"{name!r}, expected {list(out_shape(name))}")
                if not _finite(out):
                    # a NaN/Inf input is a broken checkpoint: name its file rather than blame the method
                    read = [(labels[k], m) for k, m in steps[name].reads] if sliced else [(lab, name) for lab in labels]
                    bad = next(((lab, m) for (lab, m), x in zip(read, inputs, strict=False) if not _finite(x)), None)
                    if bad is not None:
                        raise CheckpointError(f"{readers[bad[0]].info(bad[1]).file}: tensor {bad[1]!r} holds NaN or "
                                              f"Inf ({bad[0]}); fix or drop this checkpoint", param=bad[0])
                    raise MergeFailed(f"merged tensor {name!r} holds NaN or Inf: check the inputs and "
                                      f"parameters of {spec.method} (e.g. weights summing to 0 with "
                                      "normalize)", param=name)
                out = out.to(out_dt(name)).cpu()
            if any(_same_memory(out, b) for b in buffers[i % 2]):
                out = out.clone()  # the reader refills this buffer while the write is in flight
            if written is not None:
                written.result()
            written = writes.submit(writer.write, name, out)
            ctx.report("merge", i + 1, len(names))
        if written is not None:
            written.result()
        shards = writer.shard_files()
        # each expert's own task-specific tensors (classification heads), as a learned merge leaves
        # them, so that evaluation scores every task with its own head
        experts = order[len(order) - len(ctx.experts):]
        has_heads = bool(keep) and write_heads(ctx.out_dir, {
            e: {n: r.read(n) for n in r.names() if any(p.search(n) for p in keep)}
            for e, r in zip(spec.expert_names(), experts, strict=True)}, out_dtype)
    # the writer finished (renamed shards, wrote the index) when the ExitStack closed
    floats = [t.dtype for t in layout if t.dtype.is_floating_point]
    config_dtype = out_dtype or (max(set(floats), key=floats.count) if floats else None)
    # a sliced model's config is the base's (else its first source's) with the new depth, as mergekit's
    cfg_from = folders[sliced.config_from] if sliced is not None else folders[0]
    depth = {} if sliced is None else {"num_layers": sliced.n_layers,
                                       "layer_types": slices.layer_types(sliced, folders)}
    copy_aux_files(cfg_from, ctx.out_dir, config_dtype, vocab_size=vocab.rows_out if vocab else None,
                   tokenizer_files=vocab is None and spec.chat_template is None, **depth)
    template = resolve_chat_template(spec.chat_template, folders) if spec.chat_template else None
    if vocab is not None or template is not None:
        write_tokenizer(ctx.out_dir, vocab, template, cfg_from)
    elif spec.chat_template is not None:  # `auto` and no model has a template: the files as they are
        copy_aux_files(cfg_from, ctx.out_dir, config_dtype, **depth)
    if sliced is not None:  # mergekit `modules:`: each module's layer count at its config key
        slices.write_depths(sliced, ctx.out_dir)
    return MethodResult(metrics={
        "tensors": len(names),
        "parameters": n_params,
        "shards": len(shards),
        "seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_mb": round(memory.peak_rss_mib(), 1),
    }, artifacts={"heads": HEADS_DIR} if has_heads else {})
