"""The one calibration row format, the typed reference, and the checks made before any model is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merge_ops.calibration import (
    CalibrationRef,
    calibration_files,
    check_calibration,
    parse_calibration_ref,
    parse_rows,
    read_rows,
    validate_upload,
)
from merge_ops.errors import CalibrationError
from merge_ops.spec import load_spec, spec_from_dict


def test_rows_text_ids_and_input_vectors():
    rows = parse_rows(['{"text": "hello", "label": 3}', "", '{"input_ids": [1, 2, 3], "id": "x"}'], "s.jsonl")
    assert [(r.line, r.text, r.input_ids) for r in rows] == [(1, "hello", None), (3, None, (1, 2, 3))]
    vec = parse_rows([b'{"input": [0.5, -1, 2]}\n', b'{"input": [1, 2, 3]}\n'])
    assert [r.input for r in vec] == [(0.5, -1.0, 2.0), (1.0, 2.0, 3.0)] and {r.kind for r in vec} == {"input"}


@pytest.mark.parametrize("lines,message", [
    (['{"text": "ok"}', "{nope"], "s.jsonl:2: not valid JSON"),
    (['{"text": "ok"}', "[1, 2]"], "s.jsonl:2: each line must be a JSON object"),
    (['{"label": 1}'], 's.jsonl:1: a line needs "text"'),
    (['{"text": "  "}'], "s.jsonl:1: text must be a non-empty string"),
    (['{"input_ids": [1, -2]}'], "s.jsonl:1: input_ids must be a non-empty list"),
    (['{"input_ids": [1, true]}'], "s.jsonl:1: input_ids"),
    (['{"input_ids": [4294967296]}'], "s.jsonl:1: input_ids"),
    (['{"input": [1, NaN]}'], "s.jsonl:1: input must be a non-empty list of finite numbers"),
    (['{"input": [1.0]}', '{"text": "x"}'], "s.jsonl:2: a text/input_ids row, but line 1 is an input-vector row"),
    (["", "  "], "s.jsonl has no rows"),
])
def test_row_errors_name_the_line(lines, message):
    with pytest.raises(CalibrationError) as e:
        parse_rows(lines, "s.jsonl")
    assert e.value.message.startswith(message), e.value.message


def test_upload_validation_streams_and_names_lines_without_a_file_name(tmp_path):
    p = tmp_path / "up.jsonl"
    p.write_bytes(b'{"text": "a"}\n\n{"input_ids": [1]}\n')
    assert validate_upload(p) == 2
    p.write_bytes(b'{"text": "a"}\n{"input_ids": []}\n')
    with pytest.raises(CalibrationError, match=r"^line 2: input_ids"):
        validate_upload(p)
    p.write_bytes(b"\n")
    with pytest.raises(CalibrationError, match="has no rows"):
        validate_upload(p)
    p.write_bytes(b'{"input_ids": [1]}\n{"input_ids": [2]}\n{"nope": 3}\n')
    assert [r.input_ids for r in read_rows(p, limit=2)] == [(1,), (2,)]  # reading stops at the limit


def test_a_reference_is_a_set_id_or_a_path():
    assert parse_calibration_ref("cal_0123abcd") == CalibrationRef("cal_0123abcd", set_id="cal_0123abcd")
    assert parse_calibration_ref("./c.jsonl") == CalibrationRef("./c.jsonl", path="./c.jsonl")
    assert parse_calibration_ref("cal_.jsonl").path == "cal_.jsonl"
    for bad in ("", "  ", "a\x00b", 3):
        with pytest.raises(ValueError):
            parse_calibration_ref(bad)
    spec = spec_from_dict({"method": "adamerging", "base": "./b", "experts": [{"model": "./a"}, {"model": "./c"}],
                           "calibration": {"tasks": {"a": "cal_1", "c": "/data/c.jsonl"}}})
    tasks = spec.calibration.tasks
    assert tasks["a"].set_id == "cal_1" and tasks["c"].path == "/data/c.jsonl"
    assert spec.model_dump(mode="json")["calibration"]["tasks"] == {"a": "cal_1", "c": "/data/c.jsonl"}


def _learned(tmp_path: Path, rows: dict[str, str]) -> Path:
    for name, text in rows.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    doc = {"method": "adamerging", "base": "./base", "experts": [{"model": f"./{n}"} for n in rows],
           "calibration": {"tasks": {n: f"{n}.jsonl" for n in rows}}}  # relative: to the spec's folder
    (tmp_path / "spec.yaml").write_text(json.dumps(doc))
    return tmp_path / "spec.yaml"


def test_set_ids_and_files_resolve_to_the_same_thing(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    spec = spec_from_dict({"method": "adamerging", "base": "./b", "experts": [{"model": "./a"}, {"model": "./c"}],
                           "calibration": {"tasks": {"a": str(tmp_path / "a.jsonl"), "c": "cal_abc"}}})
    with pytest.raises(CalibrationError, match=r"calibration.tasks.c: 'cal_abc' is a calibration-set id"):
        calibration_files(spec)
    files = calibration_files(spec, lambda set_id: tmp_path / "a.jsonl" if set_id == "cal_abc" else None)
    assert files == {"a": tmp_path / "a.jsonl", "c": tmp_path / "a.jsonl"}
    with pytest.raises(CalibrationError, match=r"calibration set 'cal_abc' \(for 'c'\) no longer exists"):
        calibration_files(spec, lambda set_id: None)
    assert calibration_files(spec, skip_sets=True) == {"a": tmp_path / "a.jsonl"}


def test_load_spec_reads_the_calibration_files_it_names(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    path = _learned(tmp_path, {"a": '{"input_ids": [1, 2]}\n', "b": '{"text": "x"}\n'})
    with pytest.raises(CalibrationError, match=r"^calibration.tasks.b: line 1 holds text, but the base .* no "
                                               "tokenizer files"):
        load_spec(path)
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    spec = load_spec(path)
    assert spec.calibration.tasks["b"].path == str(tmp_path / "b.jsonl")  # anchored at the spec's folder
    (tmp_path / "b.jsonl").write_text('{"input": [1.0, 2.0]}\n')
    with pytest.raises(CalibrationError, match=r"^calibration.tasks.b: this method reads .*text.* rows"):
        load_spec(path)
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"oops": 1}\n')
    with pytest.raises(CalibrationError, match=r"calibration.tasks.b \(b.jsonl\):2: a line needs"):
        load_spec(path)
    (tmp_path / "b.jsonl").unlink()
    with pytest.raises(CalibrationError, match=r"calibration.tasks.b: .* is not a file"):
        load_spec(path)


def test_hub_bases_and_set_ids_are_left_for_later(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    spec = spec_from_dict({"method": "adamerging", "base": "org/base@v1", "experts": [{"model": "./a"}],
                           "calibration": {"tasks": {"a": str(tmp_path / "a.jsonl")}}})
    check_calibration(spec, {"a": tmp_path / "a.jsonl"})  # a hub base's tokenizer is known after download


def test_ot_reads_input_rows_for_alloy_arch_models(tmp_path):
    for n in ("m0", "m1"):
        (tmp_path / n).mkdir()
        (tmp_path / n / "config.json").write_text(json.dumps({"alloy_arch": "mlp"}))
    (tmp_path / "ids.jsonl").write_text('{"input_ids": [1, 2]}\n')
    (tmp_path / "vec.jsonl").write_text('{"input": [1, 2]}\n')
    spec = spec_from_dict({"method": "ot_fusion", "experts": [{"model": str(tmp_path / "m0")},
                                                              {"model": str(tmp_path / "m1")}],
                           "parameters": {"ground_metric": "activations"},
                           "calibration": {"tasks": {"m0": str(tmp_path / "ids.jsonl")}}})
    with pytest.raises(CalibrationError, match=r"reads \{\"input\": \[...\]\} rows"):
        check_calibration(spec, {"m0": tmp_path / "ids.jsonl"})
    check_calibration(spec, {"m0": tmp_path / "vec.jsonl"})
