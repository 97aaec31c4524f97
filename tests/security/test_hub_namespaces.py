"""Local-hub orgs belong to tenants: a tenant publishes only into its own org(s) (ALLOY_HUB_NAMESPACES;
by default the org named like the tenant), so it cannot write into another tenant's repo nor move its
`main`. Admins publish anywhere. Checked at submit, at every scheduled run and again in the worker."""

from __future__ import annotations

import pytest

from jobs.admission import publish_problem
from merge_ops.spec import MergeSpec
from tests.security.conftest import auth, make_settings, spec_body


@pytest.mark.parametrize("who,repo,ok", [
    ("acme", "acme/merged", True),
    ("acme", "other/merged", False),  # another tenant's org
    ("other", "acme/merged", False),
    ("acme", "ACME/merged", False),  # orgs match exactly
    ("acme", "acme-evil/merged", False),
    ("admin", "other/merged", True),  # admin publishes anywhere
])
def test_default_namespaces(make_client, who, repo, ok):
    c = make_client()
    r = c.post("/v1/jobs", json=spec_body(c.app.state.settings.data_dir, publish={"repo": repo}), headers=auth(who))
    assert (r.status_code == 202) is ok, (who, repo, r.status_code, r.text)
    if not ok:
        msg = r.json()["error"]["message"]
        assert r.status_code == 422 and msg.startswith("publish.repo:") and "ALLOY_HUB_NAMESPACES" in msg


def test_configured_namespaces(make_client):
    c = make_client(hub_namespaces={"acme": ["team-a", "team-b"]})
    root = c.app.state.settings.data_dir
    for repo, code in (("team-a/m", 202), ("team-b/m", 202), ("acme/m", 422), ("other/m", 422)):
        r = c.post("/v1/jobs", json=spec_body(root, publish={"repo": repo}), headers=auth())
        assert r.status_code == code, (repo, r.text)
    # `other` has no entry: its own org only
    assert c.post("/v1/jobs", json=spec_body(root, publish={"repo": "other/m"}), headers=auth("other")).status_code == 202
    assert c.post("/v1/jobs", json=spec_body(root, publish={"repo": "team-a/m"}),
                  headers=auth("other")).status_code == 422


def test_schedules_are_held_to_the_same_orgs(make_client):
    c = make_client()
    root = c.app.state.settings.data_dir
    body = {"spec": spec_body(root, publish={"repo": "other/merged"}), "trigger": {"type": "cron", "cron": "0 3 * * *"}}
    r = c.post("/v1/schedules", json=body, headers=auth())
    assert r.status_code == 422 and "publish.repo" in r.json()["error"]["message"]


def test_rules_without_a_request(tmp_path):
    """Scheduled runs and the worker check with the tenant only: an admin token makes the tenant admin."""
    s = make_settings(tmp_path)
    spec = MergeSpec.model_validate(spec_body(tmp_path, publish={"repo": "other/merged"}))
    assert "may not publish" in publish_problem(spec, "acme", s)
    assert publish_problem(spec, "ops", s) is None  # tenant `ops` holds the admin token
    assert publish_problem(spec, "other", s) is None
    hf = MergeSpec.model_validate(spec_body(tmp_path, publish={"repo": "other/merged", "hub": "hf"}))
    assert "no hub token" in publish_problem(hf, "acme", s)
    # on a Hugging Face Hub the tenant's own token decides what it may write
    assert publish_problem(hf, "acme", s.model_copy(update={"hub_tokens": {"acme": "hf_x"}})) is None
