"""The server's own data is never a model source, even with the data dir under an allowed root (here
the data dir *is* the allowed root, as in many deployments' defaults): not the data dir itself, not
its hub, calibration sets, job outputs, caches, evaluation sets, nor the hub root when it lives
elsewhere, nor links into them or to the data dir's own files. Model folders kept elsewhere under the
data dir (root/base, root/models/...) stay readable. Checked at submit and again in the worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from jobs.admission import AdmissionError, check_model_sources
from merge_ops.spec import MergeSpec
from tests.security.conftest import auth, make_settings, spec_body


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return folder


def _submit(c, root: Path, base: Path):
    return c.post("/v1/jobs", json=spec_body(root, base=str(base)), headers=auth())


@pytest.mark.parametrize("inside", ["", "hub", "hub/other/merged/revisions/abc", "calibration/other", "jobs/job_x",
                                    "jobs/job_x/attempt-1/model", "cache", "cache/models--org--m", "evaluation/x"])
def test_data_dir_folders_are_refused_at_submit(make_client, inside):
    c = make_client()
    root = c.app.state.settings.data_dir
    target = _model(root / inside) if inside else root
    r = _submit(c, root, target)
    assert r.status_code == 422, (inside, r.text)
    assert "never a model source" in r.json()["error"]["message"]


def test_model_folders_elsewhere_under_the_data_dir_stay_readable(make_client):
    c = make_client()
    root = c.app.state.settings.data_dir
    for rel in ("base", "models/base", "hubs-of-mine/base", "jobsite/base"):  # names that merely look alike
        assert _submit(c, root, _model(root / rel)).status_code == 202, rel


def test_hub_root_outside_the_data_dir_is_refused(make_client, tmp_path):
    hub = tmp_path / "app0" / "shared-hub"  # under the allowed root, outside DATA_DIR/hub
    c = make_client(hub_dir=hub)
    root = c.app.state.settings.data_dir
    r = _submit(c, root, _model(hub / "other" / "m"))
    assert r.status_code == 422 and "never a model source" in r.json()["error"]["message"]


@pytest.mark.parametrize("target", ["hub/other/m/model.safetensors", "alloy.db", "dev-token"])
def test_links_into_the_data_dir_are_refused(make_client, target):
    c = make_client()
    root = c.app.state.settings.data_dir
    _model(root / "hub" / "other" / "m")
    (root / "dev-token").write_text("secret-token")
    base = _model(root / "base")
    name = "model.safetensors" if target.endswith(".safetensors") else "tokenizer.json"
    (base / name).unlink(missing_ok=True)
    (base / name).symlink_to(root / target)
    r = _submit(c, root, base)
    assert r.status_code == 422, (target, r.text)
    assert f"{name} is a link into the server's data directory" in r.json()["error"]["message"]
    assert "secret-token" not in r.text


def test_worker_side_check(tmp_path):
    """The worker calls the same check before it reads anything (settings may have changed since submit)."""
    s = make_settings(tmp_path)
    ok = MergeSpec.model_validate(spec_body(tmp_path))
    check_model_sources(ok, s)
    bad = MergeSpec.model_validate(spec_body(tmp_path, base=str(_model(tmp_path / "jobs" / "job_y"))))
    with pytest.raises(AdmissionError, match="never a model source"):
        check_model_sources(bad, s)
