"""The alignment graph: which tensor axes carry which hidden dimension ("space").

A *space* is one set of neurons that a transport map T re-orders: the hidden units of an MLP layer,
the channels of a conv, the residual stream of a transformer, the inner dimensions of one attention
block's Q/K, V or MLP. Every tensor axis that indexes those neurons is an *attachment* of the space;
the ones whose rows *produce* the neurons (the weight and bias of the layer that writes them) also
define the neurons' features for the ground metric. Element-wise ops and norms simply attach their
vectors to the space they act on, which is "T passes through, γ/β aligned by T_in". Axes attached
to no space (input pixels, vocabulary, class labels) are never moved.

A *layout* says which rows of an axis belong to one unit of the space:
    repeat=P  unit c owns rows c·P … c·P+P−1. P=1 is a plain axis; a conv→FC flatten repeats each
              channel over its H·W positions; P=g·head_dim makes a whole attention head one unit.
    group=g   (with head_dim) for o_proj's input under GQA: unit (kv head, d) owns dimension d of the
              g query heads that read that kv head's values.

Spaces are listed in the order they are solved: a producer's features use the maps of its other
axes, so those must come first. The one cycle (residual stream → block → residual stream) is broken
in fusion.py by solving the stream from the writers that are ready, then refining it (`refine`).

Supported: `alloy_arch` mlp / cnn configs (see arch.py), BERT-style encoders (`bert`, `roberta`)
and Llama-style decoders (`llama`, `mistral`, `qwen2`) as HF configs. Anything else is refused
with the first module that cannot be aligned.

RoPE (Llama): rotary embedding gives dimension pair (i, i+d/2) of every head its own frequency, so
moving a pair to another index changes the function even when Q and K move together. The only
discrete symmetries are whole kv heads (with their GQA query heads), so the Q/K map of a RoPE model
is over kv heads; V and o_proj's input are aligned per dimension as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from merge_ops.errors import CheckpointError

FIXED_SUFFIXES = ("num_batches_tracked", "position_ids")  # copied from the anchor, never averaged


class UnsupportedArchitecture(CheckpointError):
    code = "unsupported_architecture"


@dataclass(frozen=True)
class Layout:
    repeat: int = 1
    head_dim: int | None = None
    group: int = 1

    def rows(self, axis_len: int) -> torch.Tensor:
        """Index [n_units, rows_per_unit] into an axis of length `axis_len`."""
        idx = torch.arange(axis_len)
        if self.head_dim is None or self.group == 1:
            if axis_len % self.repeat:
                raise CheckpointError(f"axis of length {axis_len} is not a multiple of {self.repeat}")
            return idx.reshape(axis_len // self.repeat, self.repeat)
        g, d = self.group, self.head_dim
        return idx.reshape(-1, g, d).permute(0, 2, 1).reshape(-1, g)


PLAIN = Layout()


@dataclass(frozen=True)
class Attachment:
    param: str
    axis: int
    layout: Layout = PLAIN
    producer: bool = False  # its rows are the neurons' weight features / its module's output their activations
    reads: bool = False  # the axis consumes the space (a layer's input side): row-normalised map


@dataclass
class Space:
    name: str
    attachments: list[Attachment] = field(default_factory=list)
    residual: bool = False  # several writers meet here: their maps are combined (resid_policy)

    def producers(self) -> list[Attachment]:
        return [a for a in self.attachments if a.producer]


@dataclass
class Graph:
    family: str  # mlp | cnn | bert | llama
    spaces: list[Space]
    params: set[str]  # every tensor the graph accounts for (aligned or just averaged)
    fixed: set[str] = field(default_factory=set)  # tensors copied from the anchor

    def attachments_of(self, param: str) -> list[tuple[Space, Attachment]]:
        return [(s, a) for s in self.spaces for a in s.attachments if a.param == param]


class _Builder:
    """Collects spaces while checking that every named tensor exists."""

    def __init__(self, names: Sequence[str]):
        self.names = set(names)
        self.spaces: dict[str, Space] = {}
        self.used: set[str] = set()

    def has(self, p: str) -> bool:
        return p in self.names

    def attach(self, space: str, param: str, axis: int, layout: Layout = PLAIN, *, producer: bool = False,
               reads: bool = False, residual: bool = False, optional: bool = False) -> None:
        if param not in self.names:
            if optional:
                return
            raise UnsupportedArchitecture(f"expected tensor {param!r} is missing from the checkpoint")
        s = self.spaces.setdefault(space, Space(space, residual=residual))
        s.attachments.append(Attachment(param, axis, layout, producer, reads))
        self.used.add(param)

    def linear(self, prefix: str, out_space: str | None, in_space: str | None, *, out_layout: Layout = PLAIN,
               in_layout: Layout = PLAIN, residual_out: bool = False) -> None:
        w, b = f"{prefix}.weight", f"{prefix}.bias"
        self.use(w)
        if out_space is not None:
            self.attach(out_space, w, 0, out_layout, producer=True, residual=residual_out)
            self.attach(out_space, b, 0, out_layout, producer=True, optional=True)
        elif self.has(b):
            self.use(b)
        if in_space is not None:
            self.attach(in_space, w, 1, in_layout, reads=True)

    def vector(self, space: str, prefix: str, names: Sequence[str] = ("weight", "bias")) -> None:
        for n in names:
            self.attach(space, f"{prefix}.{n}", 0, optional=True)

    def use(self, param: str) -> None:
        if param not in self.names:
            raise UnsupportedArchitecture(f"expected tensor {param!r} is missing from the checkpoint")
        self.used.add(param)

    def finish(self, family: str, order: Sequence[str]) -> Graph:
        fixed = {n for n in self.names if n.endswith(FIXED_SUFFIXES)}
        left = sorted(self.names - self.used - fixed, key=_natural)
        if left:
            raise UnsupportedArchitecture(
                f"ot_fusion cannot align module {left[0].rsplit('.', 1)[0]!r} of this {family} model "
                f"(tensor {left[0]!r}): it is not part of the supported {family} layout")
        spaces = [self.spaces[n] for n in order if n in self.spaces]
        return Graph(family, spaces, set(self.names), fixed)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in name.split(".")]


def build_graph(config: Mapping, shapes: Mapping[str, tuple[int, ...]], *, qk: str = "separate") -> Graph:
    """The alignment graph of one model, from its config and its tensor names/shapes."""
    arch = config.get("alloy_arch")
    if arch == "mlp":
        return _mlp(config, shapes)
    if arch == "cnn":
        return _cnn(config, shapes)
    mt = config.get("model_type")
    if mt in ("bert", "roberta"):
        return _bert(config, shapes, qk)
    if mt in ("llama", "mistral", "qwen2"):
        return _llama(config, shapes)
    first = min(shapes, key=_natural) if shapes else "?"
    what = f"alloy_arch {arch!r}" if arch is not None else f"model_type {mt!r}"
    raise UnsupportedArchitecture(
        f"ot_fusion cannot align module {first.rsplit('.', 1)[0]!r}: {what} is not supported "
        "(supported: alloy_arch mlp/cnn, model_type bert/roberta/llama/mistral/qwen2)")


def _mlp(config: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> Graph:
    b = _Builder(list(shapes))
    n = len(config["hidden"]) + 1
    for i in range(n):
        b.linear(f"layers.{i}", f"h{i}" if i < n - 1 else None, f"h{i - 1}" if i > 0 else None)
    return b.finish("mlp", [f"h{i}" for i in range(n - 1)])


def _cnn(config: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> Graph:
    b = _Builder(list(shapes))
    convs, fcs = len(config["channels"]), len(config.get("hidden", [])) + 1
    for i in range(convs):
        b.linear(f"convs.{i}", f"c{i}", f"c{i - 1}" if i > 0 else None)
        if config.get("batch_norm", True):
            b.vector(f"c{i}", f"bns.{i}", ("weight", "bias", "running_mean", "running_var"))
    side = config["image_size"] // 2 ** convs
    for j in range(fcs):
        in_space = f"f{j - 1}" if j > 0 else f"c{convs - 1}"
        b.linear(f"fcs.{j}", f"f{j}" if j < fcs - 1 else None, in_space,
                 in_layout=Layout(repeat=side * side) if j == 0 else PLAIN)
    return b.finish("cnn", [f"c{i}" for i in range(convs)] + [f"f{j}" for j in range(fcs - 1)])


def _bert(config: Mapping, shapes: Mapping[str, tuple[int, ...]], qk: str) -> Graph:
    b = _Builder(list(shapes))
    mt = config["model_type"]
    root = next((r for r in (f"{mt}.", "") if f"{r}embeddings.word_embeddings.weight" in shapes), None)
    if root is None:
        raise UnsupportedArchitecture(f"ot_fusion cannot align this {mt} model: no embeddings.word_embeddings")
    R = "resid"
    for emb in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        b.attach(R, f"{root}embeddings.{emb}.weight", 1, producer=True, residual=True,
                 optional=emb == "token_type_embeddings")
    b.vector(R, f"{root}embeddings.LayerNorm")
    order = [R]
    for i in range(config["num_hidden_layers"]):
        p = f"{root}encoder.layer.{i}"
        q, k = (f"{i}.qk", f"{i}.qk") if qk == "shared" else (f"{i}.q", f"{i}.k")
        b.linear(f"{p}.attention.self.query", q, R)
        b.linear(f"{p}.attention.self.key", k, R)
        b.linear(f"{p}.attention.self.value", f"{i}.v", R)
        b.linear(f"{p}.attention.output.dense", R, f"{i}.v", residual_out=True)
        b.vector(R, f"{p}.attention.output.LayerNorm")
        b.linear(f"{p}.intermediate.dense", f"{i}.mlp", R)
        b.linear(f"{p}.output.dense", R, f"{i}.mlp", residual_out=True)
        b.vector(R, f"{p}.output.LayerNorm")
        order += [q, k, f"{i}.v", f"{i}.mlp"]
    if b.has(f"{root}pooler.dense.weight"):
        b.linear(f"{root}pooler.dense", "pooler", R)
        order.append("pooler")
        if b.has("classifier.weight"):
            b.linear("classifier", None, "pooler")
    elif b.has("classifier.dense.weight"):  # RobertaClassificationHead: dense → out_proj
        b.linear("classifier.dense", "head", R)
        b.linear("classifier.out_proj", None, "head")
        order.append("head")
    return b.finish(mt, list(dict.fromkeys(order)))


def _llama(config: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> Graph:
    b = _Builder(list(shapes))
    mt = config["model_type"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or config["hidden_size"] // heads
    g = heads // kv
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitecture(f"ot_fusion cannot align {mt} with partial_rotary_factor != 1")
    R = "resid"
    b.attach(R, "model.embed_tokens.weight", 1, producer=True, residual=True)
    order = [R]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        b.vector(R, f"{p}.input_layernorm", ("weight",))
        # whole kv heads are the Q/K units: RoPE pins every dimension pair to its frequency
        b.linear(f"{p}.self_attn.q_proj", f"{i}.qk", R, out_layout=Layout(repeat=g * hd))
        b.linear(f"{p}.self_attn.k_proj", f"{i}.qk", R, out_layout=Layout(repeat=hd))
        b.linear(f"{p}.self_attn.v_proj", f"{i}.v", R)
        b.linear(f"{p}.self_attn.o_proj", R, f"{i}.v", in_layout=Layout(head_dim=hd, group=g),
                 residual_out=True)
        b.vector(R, f"{p}.post_attention_layernorm", ("weight",))
        b.linear(f"{p}.mlp.gate_proj", f"{i}.mlp", R)
        b.linear(f"{p}.mlp.up_proj", f"{i}.mlp", R)
        b.linear(f"{p}.mlp.down_proj", R, f"{i}.mlp", residual_out=True)
        order += [f"{i}.qk", f"{i}.v", f"{i}.mlp"]
    b.vector(R, "model.norm", ("weight",))
    for head in ("lm_head", "score"):
        if b.has(f"{head}.weight"):
            b.linear(head, None, R)  # tied or not, the LM head reads the stream with the embedding's map
    return b.finish(mt, order)
