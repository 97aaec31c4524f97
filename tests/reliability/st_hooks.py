"""Schemathesis hooks (loaded with SCHEMATHESIS_HOOKS=tests.reliability.st_hooks).

* The calibration upload's `application/x-ndjson` body: JSONL lines, valid or not, and raw bytes.
* Half of the generated job and schedule bodies are turned into valid specs (chosen by a CRC of the
  body, so runs are reproducible from the seed): random strings almost never form a valid MergeSpec,
  and without created resources the stateful phase could not follow a job to its events, cancel
  or coefficients.
"""

from __future__ import annotations

import json
import zlib

import schemathesis
from hypothesis import strategies as st

_LINE = st.one_of(
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=40)}),
    st.fixed_dictionaries({"input_ids": st.lists(st.integers(-2, 70000), min_size=0, max_size=8)}),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=6)), max_size=2),
)
schemathesis.openapi.media_type("application/x-ndjson", st.one_of(
    st.lists(_LINE, max_size=6).map(lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()),
    st.binary(max_size=300)))

VALID_SPEC = {"method": "task_arithmetic", "base": "acme/base",
              "experts": [{"model": "acme/e1"}, {"model": "acme/e2@v1"}], "parameters": {"lambda": 0.5}}


def _coin(body: object) -> bool:
    return zlib.crc32(json.dumps(body, sort_keys=True, default=str).encode()) % 2 == 0


@schemathesis.hook
def map_body(context, body):
    op = context.operation
    if op is None or op.method.upper() != "POST" or not isinstance(body, dict) or not _coin(body):
        return body
    if op.path == "/v1/jobs":
        seed = body.get("seed")
        return {**VALID_SPEC, "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else 0}
    if op.path == "/v1/schedules":
        return {"spec": {**VALID_SPEC, "publish": {"repo": "acme/merged"}},  # a schedule must publish
                "trigger": {"type": "cron", "cron": "0 3 * * *"},
                "paused": bool(body.get("paused", False))}
    return body
