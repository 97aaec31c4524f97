"""mergekit tokenizer settings are honoured or refused, never dropped (a silently different model)."""

from __future__ import annotations

import pytest

from merge_ops.errors import SpecError
from merge_ops.spec import spec_from_dict

BASE = {"merge_method": "task_arithmetic", "base_model": "org/base", "models": [{"model": "org/e1"}]}


def test_tokenizer_source_base_is_what_alloy_does():
    assert spec_from_dict({**BASE, "tokenizer_source": "base"}).method == "task_arithmetic"


@pytest.mark.parametrize("extra,field", [
    ({"tokenizer_source": "union"}, "tokenizer_source"),
    ({"tokenizer_source": "model:org/e1"}, "tokenizer_source"),
    ({"tokenizer": {"source": "union"}}, "tokenizer"),
    ({"chat_template": "chatml"}, "chat_template"),
])
def test_other_tokenizer_settings_are_refused_naming_the_field(extra, field):
    with pytest.raises(SpecError) as e:
        spec_from_dict({**BASE, **extra})
    assert field in e.value.message and "not supported yet" in e.value.message


def test_tokenizer_source_base_without_a_base_is_refused():
    with pytest.raises(SpecError, match="tokenizer_source"):
        spec_from_dict({"merge_method": "linear", "models": [{"model": "org/a"}, {"model": "org/b"}],
                        "tokenizer_source": "base"})
