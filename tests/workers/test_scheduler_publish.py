"""A publish is all or nothing, and the job's record says what the hub holds, in every failure order.

Each test runs a real job (tiny local models, merged in-process by the worker's `run_job`) that
publishes with `hub: hf` to the Hub test server, with a fault injected at one step: the tag exists
already, the commit fails, the commit lands but its answer is lost, the tag fails once / always, a
concurrent writer takes the tag between check and create, the job record's write fails. After each,
the branch, the tag and the job record are compared.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jobs.migrate import upgrade
from jobs.settings import Settings
from jobs.states import FAILED, QUEUED, SUCCEEDED
from jobs.store import Store
from merge_ops.publish import carries_job
from tests.hub_fixtures import HUB_TEST_TOKEN
from workers.execute import run_job

REPO = "acme/merged"


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.t


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("schema") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def env(tmp_path, migrated, hub_server, tiny_llama):
    shutil.copyfile(migrated, tmp_path / "store.db")
    store = Store(f"sqlite:///{tmp_path / 'store.db'}", clock=Clock())
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'store.db'}",
                        allowed_roots=[tmp_path], hub_endpoint=hub_server.url,
                        hub_tokens={"acme": HUB_TEST_TOKEN}, lease_seconds=30)
    base, experts = tiny_llama(2)
    hub_server.push(REPO, {"README.md": b"previous model"}, message="earlier publish")
    before = hub_server.head(REPO)

    def submit(tag: str | None = "run-1") -> str:
        spec = {"method": "task_arithmetic", "base": str(base), "parameters": {"lambda": 0.5},
                "experts": [{"model": str(e)} for e in experts],
                "publish": {"repo": REPO, "hub": "hf", **({"tag": tag} if tag else {})}}
        job, _ = store.create_job(tenant="acme", spec=spec, method="task_arithmetic", queue="cpu")
        return job.id

    return store, settings, submit, before


def job_commits(hub, job_id: str) -> list[str]:
    """Every commit ever made that carries the job id, on any branch or none."""
    return [c.id for c in hub.all_commits(REPO) if carries_job(c.message, job_id)]


def test_an_existing_tag_fails_the_job_before_the_branch_moves(env, hub_server):
    store, settings, submit, before = env
    taken = hub_server.tag(REPO, "run-1")  # an older schedule's run-1
    job_id = submit()
    assert run_job(job_id, store, settings) == "failed"
    job = store.get_job(job_id)
    assert job.state == FAILED and "tag 'run-1' already exists" in job.error_message
    assert "unchanged" in job.error_message
    assert hub_server.head(REPO) == before and hub_server.tags(REPO) == {"run-1": taken}
    assert job_commits(hub_server, job_id) == []


def test_a_failed_commit_leaves_branch_and_tags_and_fails_the_job(env, hub_server):
    store, settings, submit, before = env
    fault = hub_server.inject("commit", status=500)
    job_id = submit()
    assert run_job(job_id, store, settings) == "failed"
    assert fault.hits == 1
    assert store.get_job(job_id).state == FAILED
    assert hub_server.head(REPO) == before and hub_server.tags(REPO) == {}
    assert job_commits(hub_server, job_id) == []


def test_a_commit_whose_answer_is_lost_is_found_and_recorded(env, hub_server):
    store, settings, submit, before = env
    fault = hub_server.inject("commit", status=502, after=True)  # applied, then the answer is an error
    job_id = submit()
    assert run_job(job_id, store, settings) == "succeeded"
    assert fault.hits == 1
    published = store.get_job(job_id).result["published"]
    [commit] = job_commits(hub_server, job_id)
    assert published["commit"] == commit == hub_server.head(REPO) != before
    assert published["revision"] == "run-1" and hub_server.tags(REPO) == {"run-1": commit}


@pytest.mark.parametrize("failures", [1, 10])
def test_a_failing_tag_never_turns_a_moved_branch_into_a_failed_job(env, hub_server, failures):
    store, settings, submit, before = env
    hub_server.inject("tag", status=500, times=failures)
    job_id = submit()
    assert run_job(job_id, store, settings) == "succeeded"
    job = store.get_job(job_id)
    [commit] = job_commits(hub_server, job_id)
    assert job.state == SUCCEEDED and job.result["published"]["commit"] == commit == hub_server.head(REPO)
    if failures == 1:  # a flaky hub: the tag is created on the next try
        assert hub_server.tags(REPO) == {"run-1": commit} and job.result["published"]["revision"] == "run-1"
        assert job.result["published"]["warning"] is None
    else:  # the hub keeps refusing: published untagged, and the record says so
        assert hub_server.tags(REPO) == {} and job.result["published"]["revision"] == "main"
        assert "tag 'run-1' could not be created" in job.result["published"]["warning"]


def test_a_tag_taken_between_check_and_create_is_reported_not_failed(env, hub_server):
    store, settings, submit, before = env
    hub_server.inject("tag", status=None, hook=lambda: hub_server.tag(REPO, "run-1", revision=before))
    job_id = submit()
    assert run_job(job_id, store, settings) == "succeeded"
    job = store.get_job(job_id)
    [commit] = job_commits(hub_server, job_id)
    assert hub_server.head(REPO) == commit and hub_server.tags(REPO) == {"run-1": before}
    published = job.result["published"]
    assert published["commit"] == commit and published["revision"] == "main"
    assert "created on acme/merged by another writer" in published["warning"]


def test_a_failed_record_write_is_finished_by_the_retry_without_a_second_commit(env, hub_server, monkeypatch):
    store, settings, submit, before = env
    job_id = submit()
    real = store.finish

    def db_down(*args, **kwargs):
        raise ConnectionError("database unreachable")

    monkeypatch.setattr(store, "finish", db_down)
    with pytest.raises(ConnectionError):
        run_job(job_id, store, settings)  # published, then the record could not be written
    monkeypatch.setattr(store, "finish", real)
    [commit] = job_commits(hub_server, job_id)
    assert hub_server.head(REPO) == commit and hub_server.tags(REPO) == {"run-1": commit}
    assert store.get_job(job_id).state == "running"  # the record does not claim anything yet
    store.clock.t += timedelta(seconds=31)  # the lease expires; the reaper requeues the job
    assert store.reap(requeue_after=300) == [job_id] and store.get_job(job_id).state == QUEUED
    assert run_job(job_id, store, settings) == "succeeded"  # attempt 2 finds its commit by job id
    job = store.get_job(job_id)
    assert job.attempts == 2 and job.result["published"]["commit"] == commit
    assert job.result["published"]["revision"] == "run-1"
    assert job_commits(hub_server, job_id) == [commit] and hub_server.head(REPO) == commit
