"""`alloy schedules list | add FILE.yaml | update ID FILE.yaml | show | run | pause | resume | runs |
delete` (talks to the API; the scheduler process itself is `alloy scheduler`, in cli_service.py).

Errors (API unreachable, a refused request, a bad file) are one line on stderr and exit code 2.

A schedule file:

    name: nightly-ties
    trigger: {type: cron, cron: "0 3 * * *", timezone: Europe/Paris}
    # trigger: {type: on_new_revision, poll_seconds: 300}
    catch_up: once              # or skip
    tag_template: run-{n}       # optional: {n}, {date}, {time}
    spec: merge.yaml            # a spec file (relative to this file) or the spec inline; relative
                                # model paths in either are taken relative to the file's folder
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service import api_client
from service.api_client import add_client_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedules", help="manage scheduled re-merges (cron / on new revision) via the API")
    add_client_args(p)
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    ss = p.add_subparsers(dest="schedules_command", metavar="ACTION", required=True)
    ss.add_parser("list", help="list schedules").set_defaults(func=cmd_list)
    a = ss.add_parser("add", help="create a schedule from a YAML file")
    a.add_argument("file", type=Path)
    a.set_defaults(func=cmd_add)
    u = ss.add_parser("update", help="change a schedule's spec, trigger, catch-up, tag template or name from a "
                      "YAML file (its runs and run numbering stay)")
    u.add_argument("id")
    u.add_argument("file", type=Path)
    u.set_defaults(func=cmd_update)
    for name, helptext, func in (("show", "show one schedule and its health", cmd_show),
                                 ("run", "run now: the next scheduler tick submits a run", cmd_run),
                                 ("pause", "pause a schedule", cmd_pause),
                                 ("resume", "resume a paused schedule (next run: the next due time)", cmd_resume),
                                 ("runs", "a schedule's runs: when, why, the job", cmd_runs),
                                 ("delete", "delete a schedule (its jobs stay)", cmd_delete)):
        x = ss.add_parser(name, help=helptext)
        x.add_argument("id")
        x.set_defaults(func=func)


def call(args: argparse.Namespace, method: str, path: str, ok: int = 200, **kw) -> Any:
    """api_client.call, with a transport failure (API down, wrong URL) as one line instead of a traceback."""
    import httpx

    from merge_ops.errors import InputError

    try:
        return api_client.call(args, method, path, ok, **kw)
    except httpx.HTTPError as e:
        api = api_client.client_config(args)[0]
        raise InputError(f"cannot reach the API at {api} ({type(e).__name__}: {str(e)[:200]}): is it running? "
                         "(--api or ALLOY_API_URL)") from None


def pages(args: argparse.Namespace, path: str) -> dict[str, Any]:
    """Every page of a list endpoint (following `has_more`), as one list document."""
    data: list[dict[str, Any]] = []
    after = None
    while True:
        doc = call(args, "GET", path, params={"limit": 100, **({"after": after} if after else {})})
        data += doc["data"]
        if not doc.get("has_more") or not doc["data"]:
            return {"object": "list", "data": data, "has_more": False, "last_id": doc.get("last_id")}
        after = doc["last_id"]


def load_schedule_file(path: Path, *, require: tuple[str, ...] = ("trigger", "spec")) -> dict[str, Any]:
    """The POST /v1/schedules body from a schedule YAML file (the spec read like `alloy submit`'s; an
    inline spec's relative model paths are taken relative to the file's folder too). The trigger is
    checked here so a bad one (say `poll_seconds: .inf`) is one line, not a request that cannot be sent."""
    from pydantic import TypeAdapter, ValidationError

    from jobs.triggers import Trigger
    from merge_ops.errors import InputError
    from merge_ops.spec import _anchor_paths, format_validation_error, load_spec, read_yaml, spec_from_dict

    doc = read_yaml(path, "schedule file")
    if not isinstance(doc, dict) or any(k not in doc for k in require):
        raise InputError(f"{path}: a schedule file is a mapping with `trigger` and `spec` (see `alloy schedules "
                         "add --help`)")
    out = dict(doc)
    if "trigger" in doc:
        try:
            out["trigger"] = TypeAdapter(Trigger).validate_python(doc["trigger"]).model_dump(mode="json")
        except ValidationError as e:
            raise InputError(f"{path}: trigger: {format_validation_error(e)}") from None
    if "spec" in doc:
        spec = doc["spec"]
        spec = load_spec(path.parent / spec) if isinstance(spec, str) else _anchor_paths(
            spec_from_dict(spec), path.resolve().parent)
        out["spec"] = spec.model_dump(mode="json", exclude_none=True)
    return out


def _trigger(t: dict[str, Any]) -> str:
    if t.get("type") == "cron":
        return f"cron '{t['cron']}' {t.get('timezone', 'UTC')}"
    return f"new revision (poll {t.get('poll_seconds')}s)"


def _print_schedule(s: dict[str, Any]) -> None:
    state = "paused" if s["paused"] else f"next {s['next_due_at']}"
    h = s.get("health") or {}
    health = f"  health={h.get('status')} last_success={h.get('last_success_at') or '-'}" \
             f" failures_in_a_row={h.get('consecutive_failures', 0)}" if h else ""
    print(f"{s['id']}  {s['name'] or '-'}  {_trigger(s['trigger'])}  {state}  runs={s['run_count']}{health}"
          + (f"  run_requested={s['run_requested_at']}" if s.get("run_requested_at") else "")
          + (f"  last_error={s['last_error']}" if s.get("last_error") else ""))


def _out(args: argparse.Namespace, doc: Any, printer) -> int:
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        printer(doc)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    doc = pages(args, "/v1/schedules")
    return _out(args, doc, lambda d: [_print_schedule(s) for s in d["data"]] or print("no schedules"))


def cmd_add(args: argparse.Namespace) -> int:
    doc = call(args, "POST", "/v1/schedules", ok=201, json=load_schedule_file(args.file))
    return _out(args, doc, _print_schedule)


def cmd_update(args: argparse.Namespace) -> int:
    body = load_schedule_file(args.file, require=())
    body = {k: v for k, v in body.items() if k in ("name", "spec", "trigger", "catch_up", "tag_template")}
    return _out(args, call(args, "PATCH", f"/v1/schedules/{args.id}", json=body), _print_schedule)


def cmd_run(args: argparse.Namespace) -> int:
    return _out(args, call(args, "POST", f"/v1/schedules/{args.id}/run", ok=202), _print_schedule)


def cmd_show(args: argparse.Namespace) -> int:
    return _out(args, call(args, "GET", f"/v1/schedules/{args.id}"), _print_schedule)


def cmd_pause(args: argparse.Namespace) -> int:
    return _out(args, call(args, "PATCH", f"/v1/schedules/{args.id}", json={"paused": True}), _print_schedule)


def cmd_resume(args: argparse.Namespace) -> int:
    return _out(args, call(args, "PATCH", f"/v1/schedules/{args.id}", json={"paused": False}), _print_schedule)


def cmd_delete(args: argparse.Namespace) -> int:
    call(args, "DELETE", f"/v1/schedules/{args.id}", ok=204)
    print(f"deleted {args.id}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    def show(d: dict[str, Any]) -> None:
        for r in d["data"]:
            job = f"job {r['job_id']} ({r['job_state']})" if r["job_id"] else "no job"
            retry = f"  retry at {r['retry_at']}" if r.get("retry_at") else ""
            print(f"{r['due_at']}  #{r['n'] or '-'}  {r['status']:<9}  {job}  {r['reason']}{retry}")
        if not d["data"]:
            print("no runs yet", file=sys.stderr)

    return _out(args, pages(args, f"/v1/schedules/{args.id}/runs"), show)
