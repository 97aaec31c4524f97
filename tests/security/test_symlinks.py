"""Links inside a model folder cannot reach files outside the allowed roots (weights, config, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_ops.errors import InputError
from merge_ops.sources import resolve
from tests.security.conftest import auth, spec_body


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("linked", ["model.safetensors", "config.json", "tokenizer.json", "heads/code.safetensors"])
def test_link_to_outside_is_refused(tmp_path, linked):
    root, outside = tmp_path / "root", _model(tmp_path / "elsewhere")
    (outside / "tokenizer.json").write_text("{}")
    (outside / "heads").mkdir()
    save_file({"h": torch.zeros(1)}, str(outside / "heads" / "code.safetensors"))
    folder = _model(root / "m")
    target = folder / linked
    target.parent.mkdir(exist_ok=True)
    target.unlink(missing_ok=True)
    target.symlink_to(outside / linked)
    with pytest.raises(InputError, match=f"{linked} is a link to a file outside"):
        resolve(str(folder), allowed_roots=[root])
    assert resolve(str(folder)).path == folder  # the CLI (no roots) reads what its user points at


def test_linked_subfolder_and_links_inside_the_roots(tmp_path):
    root, outside = tmp_path / "root", _model(tmp_path / "elsewhere")
    blobs = _model(root / "blobs")
    folder = root / "m"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(blobs / "model.safetensors")  # a Hub-cache-style link: fine
    (folder / "config.json").symlink_to(blobs / "config.json")
    assert resolve(str(folder), allowed_roots=[root]).path == folder
    (folder / "extra").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InputError, match="extra is a link"):
        resolve(str(folder), allowed_roots=[root])


def test_submit_refuses_a_folder_with_an_escaping_link(make_client, tmp_path):
    c = make_client()
    root = c.app.state.settings.roots[0]
    outside = _model(tmp_path / "secret")
    for name in ("base", "e1", "e2"):
        _model(root / name)
    (root / "e1" / "model.safetensors").unlink()
    (root / "e1" / "model.safetensors").symlink_to(outside / "model.safetensors")
    r = c.post("/v1/jobs", json=spec_body(root), headers=auth())
    assert r.status_code == 422, r.text
    assert "model.safetensors is a link to a file outside" in r.json()["error"]["message"]
    assert str(outside) not in r.text  # the server's layout is not echoed
