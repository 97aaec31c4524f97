"""Triggers and the pure arithmetic of schedules: cron due times, input sets, pinning a spec.

Nothing here touches the database or the network, so the scheduler's decisions can be tested with
a fake clock and fake hub heads.

    cron             {"type": "cron", "cron": "0 3 * * 1-5", "timezone": "Europe/Paris"}
                     five fields (minute hour day month weekday), or six with seconds last;
                     parsed by croniter, evaluated in the given IANA time zone (DST-aware)
    on_new_revision  {"type": "on_new_revision", "poll_seconds": 300}
                     poll the hub heads of the base and every expert; run when one moved
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from merge_ops.refs import parse_model_ref, ref_parts
from merge_ops.spec import MergeSpec

MAX_MISSED_COUNTED = 1000  # after a long outage, missed cron times are counted up to this
TAG_FIELDS = ("n", "date", "time")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,199}$")


class CronTrigger(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["cron"] = "cron"
    cron: str = Field(description="cron expression: 5 fields, or 6 with seconds last "
                      "(e.g. `0 3 * * 1-5`: 03:00 on weekdays)", examples=["0 3 * * *"])
    timezone: str = Field("UTC", description="IANA time zone the expression is read in (e.g. Europe/Paris)")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        v = " ".join(v.split())
        if len(v.split()) not in (5, 6) or not croniter.is_valid(v):
            raise ValueError(f"{v!r} is not a cron expression: write 5 fields (minute hour day month "
                             "weekday, e.g. `0 3 * * *`) or 6 with seconds last")
        try:  # valid syntax that names no real date (30 February, 31 April) would never come due
            croniter(v, datetime(2026, 1, 1)).get_next(datetime)
        except CroniterBadDateError:
            raise ValueError(f"{v!r} never fires: no calendar date matches its day and month "
                             "fields (e.g. 30 February); pick a day that exists in that month") from None
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}: use an IANA name such as UTC or Europe/Paris") from None
        return v


class RevisionTrigger(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["on_new_revision"] = "on_new_revision"
    # allow_inf_nan: YAML's .inf / .nan are floats too, and neither is a polling interval
    poll_seconds: float = Field(300.0, ge=1.0, le=86400.0, allow_inf_nan=False,
                                description="how often to read the hub heads of the base and experts")


Trigger = Annotated[CronTrigger | RevisionTrigger, Field(discriminator="type")]


def parse_trigger(doc: dict[str, Any]) -> CronTrigger | RevisionTrigger:
    """A stored trigger (the `schedules.trigger` JSON) as its model."""
    return CronTrigger.model_validate(doc) if doc.get("type") == "cron" else RevisionTrigger.model_validate(doc)


# -- cron arithmetic ----------------------------------------------------------------------------
def _utc(t: datetime) -> datetime:
    return t.astimezone(ZoneInfo("UTC"))


def next_cron(trigger: CronTrigger, after: datetime) -> datetime:
    """The first due time strictly after `after` (UTC)."""
    it = croniter(trigger.cron, after.astimezone(ZoneInfo(trigger.timezone)))
    return _utc(it.get_next(datetime))


def due_between(trigger: CronTrigger, first: datetime, until: datetime
                ) -> tuple[int, datetime | None, datetime | None]:
    """(how many due times lie in [first, until], the earliest, the latest); counting stops at
    MAX_MISSED_COUNTED, the latest is exact either way."""
    if first > until:
        return 0, None, None
    it = croniter(trigger.cron, (first - timedelta(microseconds=1)).astimezone(ZoneInfo(trigger.timezone)))
    count, earliest, latest = 0, None, None
    while count < MAX_MISSED_COUNTED:
        t = _utc(it.get_next(datetime))
        if t > until:
            return count, earliest, latest
        count, latest = count + 1, t
        earliest = earliest or t
    # a very long outage: the latest due time is the one before the next after `until`
    back = croniter(trigger.cron, next_cron(trigger, until).astimezone(ZoneInfo(trigger.timezone)))
    return count, earliest, _utc(back.get_prev(datetime))


def first_due(trigger: CronTrigger | RevisionTrigger, t: datetime) -> datetime:
    """When a new (or resumed, or re-triggered) schedule is next due: cron waits for its next
    time; on_new_revision polls at once."""
    return next_cron(trigger, t) if isinstance(trigger, CronTrigger) else t


# -- inputs and pinning -------------------------------------------------------------------------
def input_refs(spec: MergeSpec) -> list[dict[str, str]]:
    """The models a spec reads, in order: [{role, name, ref}] (base first)."""
    rows = [{"role": "base", "name": "base", "ref": spec.base}] if spec.base else []
    for name, e in zip(spec.expert_names(), spec.experts, strict=True):
        rows.append({"role": "expert", "name": name, "ref": e.model})
    return rows


def inputs_key(inputs: list[dict[str, Any]]) -> str:
    """A short digest of a commit set (order-independent)."""
    pairs = sorted((i["ref"], i["commit"]) for i in inputs)
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]


def same_commits(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return {i["ref"]: i["commit"] for i in a} == {i["ref"]: i["commit"] for i in b}


def changes(prev: list[dict[str, Any]] | None, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Which input moved from which commit to which ([] when nothing did; every input on a first run)."""
    before = {i["ref"]: i["commit"] for i in prev or []}
    return [{"role": i["role"], "name": i["name"], "ref": i["ref"], "from": before.get(i["ref"]),
             "to": i["commit"]} for i in inputs if before.get(i["ref"]) != i["commit"]]


def pin(spec: dict[str, Any], inputs: list[dict[str, Any]], tag: str | None,
        model: MergeSpec | None = None) -> dict[str, Any]:
    """The job's spec: hub refs rewritten to org/name@<commit> (the job merges exactly what was
    polled, even if a branch moves meanwhile) and the run's tag on the publish target.
    Local folders stay as they are (their "commit" is a content fingerprint). `model`: `spec` already
    parsed (the scheduler parses a schedule's spec once per evaluation)."""
    commits = {i["ref"]: i["commit"] for i in inputs}
    out = json.loads(json.dumps(spec))

    def pinned(ref: str, commit: str | None = None) -> str:
        commit = commits.get(ref) if commit is None else commit
        parts = ref_parts(ref)
        if len(parts) > 1:  # model+adapter: its commit is "<model>+<adapter>" (sources.head_commit)
            shas = (commit or "").split("+")
            return "+".join(pinned(x, c) for x, c in zip(parts, shas if len(shas) == 2 else ["", ""], strict=True))
        r = parse_model_ref(ref)
        return ref if r.is_local or not commit else f"{r.repo_id}@{commit}"

    if out.get("base"):
        out["base"] = pinned(out["base"])
    names = (model or MergeSpec.model_validate(spec)).expert_names()
    for e, name in zip(out["experts"], names, strict=True):
        e["name"] = name  # the task name the template implied stays, whatever the pinned ref looks like
        e["model"] = pinned(e["model"])
    if tag is not None and out.get("publish"):
        out["publish"]["tag"] = tag
    return out


# -- tags ---------------------------------------------------------------------------------------
def check_tag_template(template: str) -> str:
    """A tag template uses {n} (run number), {date} (YYYY-MM-DD) and {time} (HHMMSS) of the due time."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"tag_template {template!r}: {e}") from None
    bad = [f for f in fields if f not in TAG_FIELDS]
    if bad:
        raise ValueError(f"tag_template {template!r} uses {bad}; placeholders are {{n}}, {{date}}, {{time}}")
    if not fields:
        raise ValueError(f"tag_template {template!r} has no placeholder, so every run would reuse one tag: "
                         "add {n} (run number) or {date}/{time}")
    sample = render_tag(template, 1, datetime(2026, 1, 1), "UTC")
    if not _TAG.match(sample) or ".." in sample:
        raise ValueError(f"tag_template {template!r} gives {sample!r}: tags use letters, digits, "
                         "'_', '-', '.', '/'")
    return template


def render_tag(template: str, n: int, due: datetime, timezone: str) -> str:
    local = due.astimezone(ZoneInfo(timezone)) if due.tzinfo else due
    return template.format(n=n, date=local.strftime("%Y-%m-%d"), time=local.strftime("%H%M%S"))


def free_tag(tag: str, taken: set[str], limit: int = 1000) -> str | None:
    """`tag` if no such tag exists on the target repo, else the first free `tag-2`, `tag-3`, ...
    (a schedule deleted and re-added restarts {n} at 1, so run-1 may be an older schedule's tag).
    None when `limit` suffixes are taken."""
    if tag not in taken:
        return tag
    for k in range(2, limit + 2):
        if f"{tag}-{k}" not in taken:
            return f"{tag}-{k}"
    return None
