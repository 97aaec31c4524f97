"""Parameter resolution against mergekit's rules, computed by hand."""

from __future__ import annotations

import pytest

from merge_ops.errors import SpecError
from merge_ops.layers import depth_fraction, layer_index, num_layers
from merge_ops.params import resolve
from merge_ops.refs import parse_model_ref


def test_gradient_interpolates_linearly_over_depth():
    g = [0.0, 1.0, 0.0]
    assert resolve(g, "x", 0.0) == 0.0
    assert resolve(g, "x", 0.25) == pytest.approx(0.5)
    assert resolve(g, "x", 0.5) == pytest.approx(1.0)
    assert resolve(g, "x", 1.0) == 0.0


def test_filters_take_the_first_match_and_default():
    v = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0, 1]}, {"value": 0.7}]
    assert resolve(v, "model.layers.0.self_attn.q_proj.weight", 0.3) == 0.1
    assert resolve(v, "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert resolve(v, "model.norm.weight", 1.0) == 0.7
    assert resolve([{"filter": "mlp", "value": 1}], "lm_head.weight", 1.0) is None


def test_bad_value_is_refused():
    with pytest.raises(SpecError):
        resolve({"a": 1}, "x", 0.0)


def test_layer_positions():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.3.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"]
    assert [layer_index(n) for n in names] == [None, 0, 3, None, None]
    assert num_layers(names) == 4
    assert depth_fraction(names[0], 4) == 0.0  # before the blocks
    assert depth_fraction(names[2], 4) == 1.0
    assert depth_fraction("model.layers.1.x", 4) == pytest.approx(1 / 3)
    assert depth_fraction(names[3], 4) == 0.0  # after the blocks: t = 0, as mergekit 0.1.5
    assert layer_index("encoder.layer.11.output.dense.weight") == 11


@pytest.mark.parametrize("raw, local, repo, rev", [
    ("./m", "./m", None, None),
    ("/abs/m", "/abs/m", None, None),
    ("file:///x/y", "/x/y", None, None),
    ("org/name", None, "org/name", None),
    ("org/na.me-1@v1.0", None, "org/na.me-1", "v1.0"),
    ("org/name@refs/pr/1", None, "org/name", "refs/pr/1"),
])
def test_model_refs(raw, local, repo, rev):
    r = parse_model_ref(raw)
    assert (r.local_path, r.repo_id, r.revision) == (local, repo, rev)


@pytest.mark.parametrize("raw", ["", "a b/c", "org/--x", "org/x..y", "justname", "org/name@", "o/n@bad rev"])
def test_bad_model_refs(raw):
    with pytest.raises(SpecError):
        parse_model_ref(raw)
