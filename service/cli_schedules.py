"""`alloy schedules list | add FILE.yaml | show | pause | resume | runs | delete` (talks to the API;
the scheduler process itself is `alloy scheduler`, in cli_service.py).

A schedule file:

    name: nightly-ties
    trigger: {type: cron, cron: "0 3 * * *", timezone: Europe/Paris}
    # trigger: {type: on_new_revision, poll_seconds: 300}
    catch_up: once              # or skip
    tag_template: run-{n}       # optional: {n}, {date}, {time}
    spec: merge.yaml            # a spec file (relative to this file) or the spec inline
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.api_client import add_client_args, call


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedules", help="manage scheduled re-merges (cron / on new revision) via the API")
    add_client_args(p)
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    ss = p.add_subparsers(dest="schedules_command", metavar="ACTION", required=True)
    ss.add_parser("list", help="list schedules").set_defaults(func=cmd_list)
    a = ss.add_parser("add", help="create a schedule from a YAML file")
    a.add_argument("file", type=Path)
    a.set_defaults(func=cmd_add)
    for name, helptext, func in (("show", "show one schedule", cmd_show),
                                 ("pause", "pause a schedule", cmd_pause),
                                 ("resume", "resume a paused schedule (next run: the next due time)", cmd_resume),
                                 ("runs", "a schedule's runs: when, why, the job", cmd_runs),
                                 ("delete", "delete a schedule (its jobs stay)", cmd_delete)):
        x = ss.add_parser(name, help=helptext)
        x.add_argument("id")
        x.set_defaults(func=func)


def load_schedule_file(path: Path) -> dict[str, Any]:
    """The POST /v1/schedules body from a schedule YAML file (the spec read like `alloy submit`'s)."""
    from merge_ops.errors import InputError
    from merge_ops.spec import load_spec, read_yaml, spec_from_dict

    doc = read_yaml(path, "schedule file")
    if not isinstance(doc, dict) or "spec" not in doc or "trigger" not in doc:
        raise InputError(f"{path}: a schedule file is a mapping with `trigger` and `spec` (see `alloy schedules "
                         "add --help`)")
    spec = doc["spec"]
    spec = load_spec(path.parent / spec) if isinstance(spec, str) else spec_from_dict(spec)
    return {**doc, "spec": spec.model_dump(mode="json", exclude_none=True)}


def _trigger(t: dict[str, Any]) -> str:
    if t.get("type") == "cron":
        return f"cron '{t['cron']}' {t.get('timezone', 'UTC')}"
    return f"new revision (poll {t.get('poll_seconds')}s)"


def _print_schedule(s: dict[str, Any]) -> None:
    state = "paused" if s["paused"] else f"next {s['next_due_at']}"
    print(f"{s['id']}  {s['name'] or '-'}  {_trigger(s['trigger'])}  {state}  runs={s['run_count']}"
          + (f"  last_error={s['last_error']}" if s.get("last_error") else ""))


def _out(args: argparse.Namespace, doc: Any, printer) -> int:
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        printer(doc)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    doc = call(args, "GET", "/v1/schedules", params={"limit": 100})
    return _out(args, doc, lambda d: [_print_schedule(s) for s in d["data"]] or print("no schedules"))


def cmd_add(args: argparse.Namespace) -> int:
    doc = call(args, "POST", "/v1/schedules", ok=201, json=load_schedule_file(args.file))
    return _out(args, doc, _print_schedule)


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
            print(f"{r['due_at']}  #{r['n'] or '-'}  {r['status']:<9}  {job}  {r['reason']}")
        if not d["data"]:
            print("no runs yet", file=sys.stderr)

    return _out(args, call(args, "GET", f"/v1/schedules/{args.id}/runs", params={"limit": 100}), show)
