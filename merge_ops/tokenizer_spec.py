"""The `tokenizer` and `chat_template` fields of a MergeSpec (mergekit 0.1.5's semantics), validated
at submit; nothing here imports torch or transformers (merge_ops/tokenizer_merge.py runs them).

    tokenizer:
      source: union                  # base | union | a merged model (its ref or expert name)
      tokens:                        # optional: embedding source of single tokens (added if new)
        <|im_start|>: {source: ./models/chat}                 # that model's row
        <|x|>: {source: {kind: model_token, model: ./m, token: "<|y|>"}, force: true}
        <|unused|>: {source: {kind: zero}}
      pad_to_multiple_of: 64         # optional: rows padded with the mean embedding
    chat_template: chatml            # alpaca | chatml | exaone | llama3 | mistral | auto | a Jinja text

mergekit's `tokenizer_source: X` is `tokenizer: {source: X}`; its older `model:<ref>` spelling is
accepted. A model named in `tokenizer` must be the base or an expert: Alloy reads no other checkpoint.
Tokenizer remapping runs in the static driver; learned and OT methods refuse these fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from merge_ops.errors import SpecError

if TYPE_CHECKING:
    from merge_ops.spec import MergeSpec

MAX_TOKENS = 4096
CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
Token = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _strip_model_prefix(v: str) -> str:
    return v[len("model:"):] if v.startswith("model:") else v


class ModelTokenSource(_Strict):
    """Another token's row of one model (by token text or id in that model's own vocabulary)."""
    kind: Literal["model_token"]
    model: ModelName
    token: Token | None = None
    token_id: int | None = Field(None, ge=0, le=2**31 - 1)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return _strip_model_prefix(v)

    @model_validator(mode="after")
    def _one(self) -> ModelTokenSource:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("model_token: give exactly one of `token` or `token_id`")
        return self


class ZeroSource(_Strict):
    kind: Literal["zero"]


class TokenSpec(_Strict):
    source: Annotated[ModelTokenSource | ZeroSource, Field(discriminator="kind")] | ModelName | None = Field(
        None, description="a merged model (its row of this token), {kind: model_token, ...} or {kind: zero}; "
                          "none: mergekit's rule (base's row, else the one model's, else the mean)")
    force: bool = Field(False, description="every model gets this embedding, even one that has the token")

    @field_validator("source", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> Any:  # one clear message rather than one per member of the union
        if isinstance(v, dict) and v.get("kind") not in ("model_token", "zero"):
            raise ValueError("a token's source is a merged model, {kind: model_token, model, token | token_id} "
                             f"or {{kind: zero}}; got kind {v.get('kind')!r}")
        return v

    @field_validator("source")
    @classmethod
    def _src(cls, v: Any) -> Any:
        return _strip_model_prefix(v) if isinstance(v, str) else v


class TokenizerSpec(_Strict):
    source: ModelName = Field("union", description="base | union | a merged model (ref or expert name)")
    tokens: dict[Token, TokenSpec] = Field(default_factory=dict, max_length=MAX_TOKENS)
    pad_to_multiple_of: int | None = Field(None, ge=1, le=1 << 16)

    @field_validator("source")
    @classmethod
    def _src(cls, v: str) -> str:
        return _strip_model_prefix(v)

    def model_refs(self) -> list[tuple[str, str]]:
        """(field, model reference) of every model this block names."""
        out = [] if self.source in ("base", "union") else [("tokenizer.source", self.source)]
        for tok, t in self.tokens.items():
            if isinstance(t.source, str):
                out.append((f"tokenizer.tokens[{tok!r}].source", t.source))
            elif isinstance(t.source, ModelTokenSource):
                out.append((f"tokenizer.tokens[{tok!r}].source.model", t.source.model))
        return out


def model_index(spec: MergeSpec, ref: str) -> int | None:
    """Position of a merged model named by `ref` (its ref as written, or an expert's name) in the
    driver's order (base first, when there is one), or None."""
    refs = ([spec.base] if spec.base else []) + [e.model for e in spec.experts]
    if ref in refs:
        return refs.index(ref)
    names = spec.expert_names()
    if ref in names:
        return names.index(ref) + (1 if spec.base else 0)
    return None


def check_tokenizer_fields(spec: MergeSpec) -> None:
    """Cross-field rules, run from MergeSpec's validator (ValueError naming the field)."""
    if spec.tokenizer is None and spec.chat_template is None:
        return
    m = spec.method_def()
    if m.kind != "static":
        key = "tokenizer" if spec.tokenizer is not None else "chat_template"
        raise ValueError(f"{key}: method {m.name} is {m.kind}; Alloy applies tokenizer settings in the static "
                         f"driver only: remove `{key}` (the base's tokenizer files are kept)")
    if spec.tokenizer is not None:
        for where, ref in spec.tokenizer.model_refs():
            if model_index(spec, ref) is None:
                raise ValueError(f"{where}: {ref!r} is not one of the merged models (the base, or an expert's "
                                 "model or name); Alloy reads no other checkpoint")
    if spec.chat_template is not None:
        check_chat_template(spec.chat_template)


def check_chat_template(v: str) -> None:
    """mergekit's rule: a known name, `auto`, or a Jinja template (holds '{', 20 characters or more)."""
    if v in CHAT_TEMPLATE_NAMES or v == "auto":
        return
    if len(v) < 20 or "{" not in v:
        raise ValueError(f"chat_template: {v[:40]!r} is neither a template name ({', '.join(CHAT_TEMPLATE_NAMES)}, "
                         "auto) nor a Jinja template")


def tokenizer_from_mergekit(doc: dict[str, Any]) -> dict[str, Any]:
    """mergekit's tokenizer_source / tokenizer / chat_template as our spec fields."""
    out: dict[str, Any] = {}
    source, block = doc.get("tokenizer_source"), doc.get("tokenizer")
    if source is not None and block is not None:
        raise SpecError("mergekit config sets both `tokenizer_source` and `tokenizer`: use one (mergekit refuses "
                        "both too)", param="tokenizer")
    if source is not None:
        if not isinstance(source, str):
            raise SpecError(f"mergekit tokenizer_source: {source!r} must be base, union or a model",
                            param="tokenizer_source")
        out["tokenizer"] = {"source": source}
    elif block is not None:
        if not isinstance(block, dict):
            raise SpecError("mergekit `tokenizer` is a mapping {source, tokens, pad_to_multiple_of}",
                            param="tokenizer")
        out["tokenizer"] = block
    if doc.get("chat_template") is not None:
        out["chat_template"] = doc["chat_template"]
    return out
