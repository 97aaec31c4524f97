"""Publishers: the local folder hub (revisions, atomicity, tags, exactly once) and the Hugging Face
publisher driven through the real huggingface_hub client against the test hub."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from merge_ops import publish as pub
from merge_ops.errors import InputError, PublishError
from merge_ops.publish import HfHubPublisher, LocalHub, carries_job, make_publisher
from merge_ops.sources import resolve
from tests.hub_fixtures import HUB_TEST_TOKEN, hub_server  # noqa: F401
from tests.merge_ops.test_sources import make_model


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _model(tmp_path: Path, name: str, seed: int) -> Path:
    m = make_model(tmp_path / name, seed=seed)
    (m / "README.md").write_text(f"---\ntags: [merge]\n---\n# {name}\n")
    return m


# -- local hub ----------------------------------------------------------------------------------
def test_local_hub_revisions_and_tags(tmp_path):
    hub = LocalHub(tmp_path / "hub")
    a, b = _model(tmp_path, "a", 1), _model(tmp_path, "b", 2)
    r1 = hub.publish(a, "team/merged", message="first", job_id="job-1")
    assert (r1.repo, r1.revision) == ("team/merged", "main") and len(r1.commit) == 40
    assert _files(hub.path("team/merged")) == _files(a)
    r2 = hub.publish(b, "team/merged", tag="run-2", message="second", job_id="job-2")
    assert r2.revision == "run-2" and r2.commit != r1.commit
    assert _files(hub.path("team/merged")) == _files(b) == _files(hub.path("team/merged", "run-2"))
    assert _files(hub.path("team/merged", r1.commit)) == _files(a)  # old revisions stay readable
    log = hub.commits("team/merged")
    assert [c["commit"] for c in log] == [r2.commit, r1.commit] and log[0]["parent"] == r1.commit
    assert [c["message"] for c in log] == ["second", "first"]
    assert hub.refs("team/merged")["tags"] == {"run-2": r2.commit}
    with pytest.raises(PublishError, match="tag 'run-2' already exists"):
        hub.publish(a, "team/merged", tag="run-2", message="third")
    with pytest.raises(InputError, match="revision 'nope' not found"):
        hub.path("team/merged", "nope")
    with pytest.raises(InputError, match="does not exist"):
        hub.path("team/other")
    with pytest.raises(InputError, match="not a repo id"):
        hub.publish(a, "../escape", message="x")


def test_local_hub_exactly_once_per_job(tmp_path):
    hub = LocalHub(tmp_path / "hub")
    a = _model(tmp_path, "a", 1)
    assert hub.find_commit("team/m", "job-1") is None
    r1 = hub.publish(a, "team/m", message="m", job_id="job-1")
    assert hub.find_commit("team/m", "job-1") == r1
    assert hub.find_commit("team/m", "job-12") is None
    # a retry of the same job (even with a tag now) returns the same commit and commits nothing
    again = hub.publish(_model(tmp_path, "b", 2), "team/m", tag="t1", message="m", job_id="job-1")
    assert again.commit == r1.commit and len(hub.commits("team/m")) == 1
    assert hub.refs("team/m")["tags"] == {"t1": r1.commit}
    assert hub.find_commit("team/m", "job-1", branch="other") is None


def test_local_hub_crash_mid_write_leaves_nothing_visible(tmp_path, monkeypatch):
    hub = LocalHub(tmp_path / "hub")
    a, b = _model(tmp_path, "a", 1), _model(tmp_path, "b", 2)
    r1 = hub.publish(a, "team/m", message="first")
    calls = {"n": 0}
    real_fsync = os.fsync

    def dying_fsync(fd):  # the process "dies" after the first file of the new revision is written
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("simulated crash while writing")
        real_fsync(fd)

    monkeypatch.setattr(pub.os, "fsync", dying_fsync)
    with pytest.raises(OSError, match="simulated crash"):
        hub.publish(b, "team/m", message="second", job_id="job-2")
    monkeypatch.setattr(pub.os, "fsync", real_fsync)
    assert hub.refs("team/m")["branches"]["main"] == r1.commit
    assert [p.name for p in (tmp_path / "hub/team/m/revisions").iterdir()] == [r1.commit]
    assert _files(hub.path("team/m")) == _files(a) and hub.find_commit("team/m", "job-2") is None


def test_local_hub_crash_between_rename_and_branch_move_then_retry(tmp_path, monkeypatch):
    hub = LocalHub(tmp_path / "hub")
    a, b = _model(tmp_path, "a", 1), _model(tmp_path, "b", 2)
    r1 = hub.publish(a, "team/m", message="first")

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the branch moved")

    monkeypatch.setattr(LocalHub, "_write_refs", crash)
    with pytest.raises(OSError):
        hub.publish(b, "team/m", message="second", job_id="job-2")
    monkeypatch.undo()
    # the revision folder and log line exist but no branch reaches them: readers still see r1
    assert hub.path("team/m").name == r1.commit and hub.find_commit("team/m", "job-2") is None
    r2 = hub.publish(b, "team/m", message="second", job_id="job-2")  # the retry
    assert hub.find_commit("team/m", "job-2") == r2 and _files(hub.path("team/m")) == _files(b)
    assert [c["commit"] for c in hub.commits("team/m")] == [r2.commit, r1.commit]


def test_local_hub_concurrent_publishes_chain(tmp_path):
    hub = LocalHub(tmp_path / "hub")
    models = [_model(tmp_path, f"m{i}", i) for i in range(4)]
    threads = [threading.Thread(target=hub.publish, args=(m, "team/c"), kwargs={"job_id": f"j{i}"})
               for i, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log = hub.commits("team/c")
    assert len(log) == 4 and {c["job_id"] for c in log} == {"j0", "j1", "j2", "j3"}
    assert [c["parent"] for c in log[:-1]] == [c["commit"] for c in log[1:]] and log[-1]["parent"] is None
    assert not any((tmp_path / "hub/team/c/.staging").iterdir())


# -- Hugging Face publisher against the test hub ------------------------------------------------
def test_hf_publisher_round_trip(hub_server, tmp_path):  # noqa: F811
    p = HfHubPublisher(endpoint=hub_server.url, token=HUB_TEST_TOKEN)
    a = _model(tmp_path, "a", 1)
    (a / "extra.json").write_text("{}")
    assert p.find_commit("team/merged", "job-1") is None  # repo does not exist yet
    r1 = p.publish(a, "team/merged", message="Merge ties job job-1", job_id="job-1")
    assert r1.commit == hub_server.head("team/merged") and r1.url.endswith(r1.commit)
    assert carries_job(hub_server.commits("team/merged")[0].message, "job-1")
    assert p.find_commit("team/merged", "job-1") == r1
    assert p.find_commit("team/merged", "job-") is None

    # the retry of the same job commits nothing
    n = len(hub_server.all_commits("team/merged"))
    assert p.publish(a, "team/merged", message="again", job_id="job-1").commit == r1.commit
    assert len(hub_server.all_commits("team/merged")) == n

    # a new job: new revision, tagged; files the new folder lacks are deleted
    b = _model(tmp_path, "b", 2)
    r2 = p.publish(b, "team/merged", tag="run-2", message="Merge ties job job-2", job_id="job-2")
    assert r2.revision == "run-2" and r2.commit != r1.commit
    assert "extra.json" not in hub_server.files("team/merged") and "extra.json" in hub_server.files(
        "team/merged", r1.commit)
    marked = [c for c in hub_server.all_commits("team/merged") if carries_job(c.message, "job-2")]
    assert len(marked) == 1

    got = resolve("team/merged@run-2", token=HUB_TEST_TOKEN, endpoint=hub_server.url, cache_dir=tmp_path / "c")
    assert got.commit == r2.commit
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (got.path / name).read_bytes() == (b / name).read_bytes()

    with pytest.raises(PublishError, match="tag 'run-2' already exists"):
        p.publish(a, "team/merged", tag="run-2", message="x", job_id="job-3")


def test_hf_publisher_branch_and_token_scrubbing(hub_server, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", HUB_TEST_TOKEN)
    p = make_publisher("hf")
    r = p.publish(_model(tmp_path, "a", 1), "team/b", branch="merge/job-9", message="m", job_id="job-9")
    assert r.revision == "merge/job-9" and hub_server.head("team/b", "merge/job-9") == r.commit
    assert p.find_commit("team/b", "job-9") is None  # not on main
    assert p.find_commit("team/b", "job-9", branch="merge/job-9") == r

    wrong = "hf_doNotLeakThisToken42"
    bad = HfHubPublisher(endpoint=hub_server.url, token=wrong)
    with pytest.raises(PublishError) as e:
        bad.publish(_model(tmp_path, "b", 2), "team/b", message="m", job_id="job-10")
    assert wrong not in str(e.value) and "token" in str(e.value) and e.value.__cause__ is None
    with pytest.raises(PublishError) as e:
        bad.find_commit("team/b", "job-10")
    assert wrong not in str(e.value)


def test_make_publisher(tmp_path):
    assert isinstance(make_publisher("local", root=tmp_path), LocalHub)
    with pytest.raises(InputError, match="unknown hub kind"):
        make_publisher("s3")  # type: ignore[arg-type]


def test_commit_log_is_json_lines(tmp_path):
    hub = LocalHub(tmp_path)
    hub.publish(_model(tmp_path, "a", 1), "t/m", message="m", job_id="j")
    lines = (tmp_path / "t/m/commits.jsonl").read_text().splitlines()
    entry = json.loads(lines[0])
    assert entry["job_id"] == "j" and entry["message"] == "m" and entry["parent"] is None and entry["time"] > 0
    # a line torn by a crash mid-append is skipped, and the next entry still lands on its own line
    with open(tmp_path / "t/m/commits.jsonl", "a") as fh:
        fh.write('{"commit": "torn')
    r = hub.publish(_model(tmp_path, "b", 2), "t/m", message="m2", job_id="j2")
    assert [c["job_id"] for c in hub.commits("t/m")] == ["j2", "j"] and hub.find_commit("t/m", "j2") == r


def test_hf_publisher_refuses_to_interleave_with_a_concurrent_commit(hub_server, tmp_path, monkeypatch):  # noqa: F811
    from huggingface_hub import HfApi

    p = HfHubPublisher(endpoint=hub_server.url, token=HUB_TEST_TOKEN)
    p.publish(_model(tmp_path, "a", 1), "team/r", message="first", job_id="job-1")
    real = HfApi.list_repo_tree

    def racing_tree(self, *args, **kwargs):  # someone pushes after we read the head, before we commit
        hub_server.push("team/r", {"other.txt": b"theirs"}, message="concurrent")
        monkeypatch.setattr(HfApi, "list_repo_tree", real)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "list_repo_tree", racing_tree)
    with pytest.raises(PublishError, match="branch moved"):
        p.publish(_model(tmp_path, "b", 2), "team/r", message="second", job_id="job-2")
    assert hub_server.commits("team/r")[0].title == "concurrent"
    r = p.publish(_model(tmp_path, "b", 2), "team/r", message="second", job_id="job-2")  # the retry
    assert hub_server.head("team/r") == r.commit and "other.txt" not in hub_server.files("team/r")
