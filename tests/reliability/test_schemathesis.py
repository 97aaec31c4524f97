"""Schemathesis against the OpenAPI schema of a running service (API, worker, reaper, Redis), with a
token, every phase including stateful: zero 5xx and zero schema violations. `--full`: >= 1,000
requests; CI: a short run."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.harness import ROOT, TOKENS

pytestmark = pytest.mark.integration
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance,ignored_auth,use_after_free")
# not ensure_resource_availability: a job's coefficients are 404 by design until a learned job succeeds


def run_schemathesis(url: str, out: Path, *, max_examples: int, max_time: int, phases: str,
                     seed: int = 1) -> tuple[int, str, list[dict]]:
    """(exit code, console output, HAR entries) of one `schemathesis run`."""
    exe = Path(sys.executable).with_name("schemathesis")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.reliability.st_hooks", "PYTHONPATH": str(ROOT),
           "NO_COLOR": "1"}
    har = out / "schemathesis.har.json"
    r = subprocess.run([str(exe), "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {TOKENS['acme']}",
                        "--checks", CHECKS, "--phases", phases, "--max-examples", str(max_examples),
                        "--max-time", str(max_time), "--seed", str(seed), "--request-timeout", "20",
                        "--workers", "1", "--report", "har", "--report-har-path", str(har)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=max_time + 300)
    entries = json.loads(har.read_text())["log"]["entries"] if har.is_file() else []
    return r.returncode, r.stdout + r.stderr, entries


def test_schemathesis_finds_no_5xx_and_no_schema_violation(cluster, full, tmp_path):
    # hub ids resolve against a closed port: jobs fail fast instead of waiting on the network
    c = cluster(workers=1, hub_endpoint="http://127.0.0.1:9", max_upload_bytes=65536)
    if full:
        code, out, entries = run_schemathesis(c.url, tmp_path, max_examples=100, max_time=420,
                                              phases="examples,coverage,fuzzing,stateful")
    else:
        code, out, entries = run_schemathesis(c.url, tmp_path, max_examples=3, max_time=20,
                                              phases="examples,fuzzing,stateful")
    statuses = collections.Counter(e["response"]["status"] for e in entries)
    five = {s: n for s, n in statuses.items() if s >= 500}
    summary = out[out.rfind("SUMMARY"):] if "SUMMARY" in out else out[-3000:]
    print(f"\nRELIABILITY schemathesis: requests={len(entries)} statuses={dict(sorted(statuses.items()))} "
          f"5xx={sum(five.values())} exit={code}\n{summary}")
    assert not five, f"5xx responses: {five}\n{out[-6000:]}"
    assert code == 0, out[-8000:]
    assert len(entries) >= (1000 if full else 100)
