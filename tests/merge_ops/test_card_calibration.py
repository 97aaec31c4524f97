"""Cards record each calibration set's SHA-256 (the bytes the merge read), beside its reference."""

from __future__ import annotations

import hashlib
import json

from merge_ops.card import write_card
from merge_ops.context import MethodResult, ResolvedModel
from merge_ops.spec import spec_from_dict


def test_card_records_calibration_sha256(tmp_path):
    files = {}
    for i, task in enumerate(("code", "math")):
        files[task] = tmp_path / f"{task}.jsonl"
        files[task].write_text(f'{{"input_ids": [{i + 1}, 2, 3]}}\n')
    spec = spec_from_dict({"method": "adamerging", "base": "org/base@v1",
                           "experts": [{"model": "org/code@main", "name": "code"},
                                       {"model": "org/math@main", "name": "math"}],
                           "calibration": {"tasks": {"code": "cal_" + "a" * 32, "math": str(files["math"])}}})
    base = ResolvedModel("org/base@v1", tmp_path / "b", repo_id="org/base", revision="v1", commit="a" * 40)
    experts = [ResolvedModel(f"org/{t}@main", tmp_path / t, repo_id=f"org/{t}", revision="main", commit="b" * 40)
               for t in ("code", "math")]
    out = tmp_path / "out"
    out.mkdir()
    write_card(out, spec, base, experts, MethodResult(), calibration=files)
    sha = {t: hashlib.sha256(p.read_bytes()).hexdigest() for t, p in files.items()}
    facts = json.loads((out / "alloy_merge.json").read_text())
    assert facts["calibration"] == [{"task": "code", "ref": "cal_" + "a" * 32, "sha256": sha["code"]},
                                    {"task": "math", "ref": files["math"].name, "sha256": sha["math"]}]
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and str(tmp_path) not in json.dumps(facts)  # a file by name, never a path
    assert "## Calibration data" in card and f"`{sha['code']}`" in card and f"`{sha['math']}`" in card
