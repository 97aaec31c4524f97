"""Model sources: local folders (fingerprint, refusals, allowed roots) and hub repos via the test hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from merge_ops.errors import AlloyError, CheckpointError, InputError
from merge_ops.sources import head_commit, resolve
from tests.hub_fixtures import HUB_TEST_TOKEN, hub_server  # noqa: F401


def make_model(folder: Path, seed: int = 0, n: int = 64) -> Path:
    """A small safetensors checkpoint: config.json, model.safetensors, tokenizer.json."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"embed.weight": rng.standard_normal((n, 300)).astype(np.float32),
               "head.weight": rng.standard_normal((8, n)).astype(np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": n}))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


# -- local folders ------------------------------------------------------------------------------
def test_local_folder_resolves_with_a_content_fingerprint(tmp_path):
    a = make_model(tmp_path / "a", seed=1)
    r = resolve(str(a))
    assert r.path == a.resolve() and r.repo_id is None and r.revision is None
    assert r.commit.startswith("local:") and len(r.commit) == len("local:") + 64
    # same content elsewhere -> same fingerprint; retrained weights (same names/shapes) -> different
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    assert resolve(str(copy)).commit == r.commit
    retrained = make_model(tmp_path / "b", seed=2)
    assert resolve(str(retrained)).commit != r.commit
    assert resolve(f"file://{a}").commit == r.commit


def test_local_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        resolve(str(tmp_path / "empty"))
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle"):
        resolve(str(pk))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="not a (valid )?safetensors file"):
        resolve(str(bad))


def test_allowed_roots(tmp_path):
    root = tmp_path / "models"
    inside = make_model(root / "m")
    outside = make_model(tmp_path / "elsewhere")
    assert resolve(str(inside), allowed_roots=[root]).path == inside.resolve()
    for ref in [str(outside), f"{root}/../../etc", f"{root}/m/../../elsewhere"]:
        with pytest.raises(InputError, match="outside the folders"):
            resolve(ref, allowed_roots=[root])
    (root / "link").symlink_to(outside)  # a symlink inside the root pointing out is still outside
    with pytest.raises(InputError, match="outside the folders"):
        resolve(str(root / "link"), allowed_roots=[root])


# -- hub repos (the real huggingface_hub client against the test hub) --------------------------
def test_hub_resolve_downloads_pinned_commit(hub_server, tmp_path):  # noqa: F811
    src = make_model(tmp_path / "src", seed=3)
    (src / "pytorch_model.bin").write_bytes(b"pickle: must never be downloaded")
    (src / "README.md").write_text("hello")
    first = hub_server.push_folder("org/expert", src, message="v1")
    hub_server.push("org/tagged", {"x": b""})  # unrelated repo
    r = resolve("org/expert@main", token=HUB_TEST_TOKEN, endpoint=hub_server.url, cache_dir=tmp_path / "cache")
    assert (r.repo_id, r.revision, r.commit) == ("org/expert", "main", first)
    assert r.path.name == first  # the snapshot folder is named by the commit
    got = sorted(p.name for p in r.path.iterdir())
    assert got == ["config.json", "model.safetensors", "tokenizer.json"]
    for name in got:
        assert (r.path / name).read_bytes() == (src / name).read_bytes()

    # a new commit moves main; an explicit commit sha still gives the old content
    make_model(src, seed=4)
    second = hub_server.push_folder("org/expert", src, message="v2")
    assert head_commit("org/expert", token=HUB_TEST_TOKEN, endpoint=hub_server.url) == second
    now = resolve("org/expert", token=HUB_TEST_TOKEN, endpoint=hub_server.url, cache_dir=tmp_path / "cache")
    assert now.commit == second and now.revision == "main"
    assert (now.path / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    old = resolve(f"org/expert@{first}", token=HUB_TEST_TOKEN, endpoint=hub_server.url,
                  cache_dir=tmp_path / "cache")
    assert old.commit == first and (old.path / "model.safetensors").read_bytes() != (
        src / "model.safetensors").read_bytes()


def test_hub_settings_from_environment(hub_server, tmp_path, monkeypatch):  # noqa: F811
    sha = hub_server.push_folder("org/env", make_model(tmp_path / "m"))
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", HUB_TEST_TOKEN)
    assert resolve("org/env", cache_dir=tmp_path / "c").commit == sha
    # explicit arguments win over the environment
    with pytest.raises(InputError, match="refused the credentials"):
        resolve("org/env", token="hf_explicitWrongToken99", cache_dir=tmp_path / "c2")


def test_hub_errors_say_what_to_fix_and_hide_the_token(hub_server, tmp_path):  # noqa: F811
    hub_server.push_folder("org/m", make_model(tmp_path / "m"))
    hub_server.push("org/pickled", {"config.json": b"{}", "pytorch_model.bin": b"x"})
    kw = {"token": HUB_TEST_TOKEN, "endpoint": hub_server.url, "cache_dir": tmp_path / "c"}
    with pytest.raises(InputError, match="'org/missing' not found"):
        resolve("org/missing@main", **kw)
    with pytest.raises(InputError, match="revision 'nope' not found"):
        resolve("org/m@nope", **kw)
    with pytest.raises(CheckpointError, match="only pickled weights"):
        resolve("org/pickled", **kw)
    wrong = "hf_wrongSecretToken123456"
    with pytest.raises(InputError) as e:
        resolve("org/m", **{**kw, "token": wrong})
    assert wrong not in str(e.value) and HUB_TEST_TOKEN not in str(e.value) and e.value.__cause__ is None
    with pytest.raises(AlloyError) as e:  # nothing listening there
        resolve("org/m", token=wrong, endpoint="http://127.0.0.1:9", cache_dir=tmp_path / "c3")
    assert wrong not in str(e.value)
