"""Token ids past the vocabulary of a hub base: unknown at submit (the base is not downloaded yet), so
the submit is accepted; the worker checks the rows against the downloaded base before any learning and
ends the job `invalid_calibration` naming the task and the line, never an IndexError mid-learning."""

from __future__ import annotations

from jobs.store import Store
from tests.hub_fixtures import HUB_TEST_TOKEN
from tests.security.conftest import auth
from workers import execute


def test_out_of_vocabulary_ids_with_a_hub_base_fail_before_learning(make_client, hub_server, tmp_path):
    from tests.toy_models import make_experts, write_llama

    c = make_client(hub_endpoint=hub_server.url, hub_tokens={"acme": HUB_TEST_TOKEN})
    s = c.app.state.settings
    base = write_llama(tmp_path / "upstream" / "base", hidden=16, layers=1, intermediate=32, vocab=32, heads=2)
    hub_server.push_folder("org/base", base)
    e1, e2 = make_experts(base, 2, s.data_dir / "models", scale=0.01)  # local experts, under the root
    sets = {}
    for name, rows in (("expert0", b'{"input_ids": [1, 2, 3]}\n'),
                       ("expert1", b'{"input_ids": [1, 2]}\n\n{"input_ids": [3, 31]}\n{"input_ids": [4, 32, 5]}\n')):
        r = c.post("/v1/calibration-sets", content=rows, headers=auth())
        assert r.status_code == 201, r.text
        sets[name] = r.json()["id"]
    spec = {"method": "adamerging", "base": "org/base@main", "experts": [{"model": str(e1)}, {"model": str(e2)}],
            "parameters": {"steps": 2, "batch_size": 2, "granularity": "task"}, "calibration": {"tasks": sets}}
    r = c.post("/v1/jobs", json=spec, headers=auth())
    assert r.status_code == 202, r.text  # the hub base's vocabulary is not known at submit
    job_id = r.json()["id"]

    store = Store(s.database_url)
    assert execute.run_job(job_id, store, s) == "failed"
    job = store.get_job(job_id)
    assert job.error_code == "invalid_calibration", (job.error_code, job.error_message)
    msg = job.error_message
    # the task, the first bad line (line 4: blank lines count) and id, the vocabulary and the base by its ref
    assert msg.startswith("calibration.tasks.expert1"), msg
    assert "line 4 holds token id 32" in msg and "0..31" in msg and "org/base@main" in msg, msg
    assert str(s.data_dir) not in msg  # not the download cache folder it was read from
    stages = [e.data.get("stage") for e in store.events_after(job_id, 0) if e.type == "stage"]
    assert "resolve" in stages and "learn" not in stages, stages  # refused before any learning step
