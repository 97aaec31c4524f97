"""The method registry: discovered from the method modules, torch-free, and what `alloy methods` prints."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import merge_ops
from merge_ops.declare import MethodDef
from merge_ops.methods import MERGEKIT_NAMES, METHODS, implementation
from merge_ops.spec import from_mergekit

METHODS_DIR = Path(merge_ops.__file__).parent / "methods"
ENTRY = {"static": "merge_tensor", "learned": "learn", "ot": "run"}


def test_declarations_and_registry_import_without_torch():
    code = ("import json, sys\n"
            "import merge_ops, merge_ops.spec, merge_ops.calibration\n"
            "from merge_ops.methods import METHODS\n"
            "from merge_ops.spec import spec_from_dict\n"
            "spec_from_dict({'method': 'ties', 'base': './b', 'experts': [{'model': './a'}]})\n"
            "print(json.dumps({'methods': sorted(METHODS), 'torch': 'torch' in sys.modules,\n"
            "                  'transformers': 'transformers' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(merge_ops.__file__).parents[1])
    got = json.loads(out.stdout)
    modules = sorted(p.stem for p in METHODS_DIR.glob("*.py") if p.stem != "__init__")
    assert got["methods"] == sorted(METHODS) == modules
    assert got["torch"] is False and got["transformers"] is False


def test_every_method_module_is_one_declaration_beside_its_math():
    modules = sorted(p.stem for p in METHODS_DIR.glob("*.py") if p.stem != "__init__")
    assert sorted(m.module.rsplit(".", 1)[1] for m in METHODS.values()) == modules
    for m in METHODS.values():
        assert isinstance(m, MethodDef) and m.paper and m.summary
        assert m.module.rsplit(".", 1)[1] == m.name  # the module is named after the method
        impl = implementation(m)
        assert callable(getattr(impl, ENTRY[m.kind])), m.name
        # the module names itself once, in its declaration
        tree = ast.parse((METHODS_DIR / f"{m.name}.py").read_text())
        names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == m.name]
        assert len(names) == 1, (m.name, len(names))


def test_mergekit_names_come_from_the_declarations():
    assert MERGEKIT_NAMES == {m.name: m.name for m in METHODS.values() if m.kind == "static"}
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "model_stock",
            "slerp"} <= set(MERGEKIT_NAMES)
    doc = from_mergekit({"merge_method": "dare_ties", "base_model": "./b", "models": [{"model": "./a"}]})
    assert doc["method"] == "dare_ties"


def test_alloy_methods_lists_every_method_parameter_and_module(capsys):
    from service.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for m in METHODS.values():
        assert f"{m.name}  [{m.kind};" in out
        assert f"math: merge_ops/methods/{m.name}.py" in out
        for p in m.params:
            assert f"      {p.name}" in out, (m.name, p.name)
    assert "alpha0" in out and "range (0, 1)" in out  # exclusive bounds are shown as such
    assert "temperature" in out and "range > 0" in out
