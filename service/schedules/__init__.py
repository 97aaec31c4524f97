"""Schedules: a MergeSpec that is submitted again on a cron rule or when an input gets a new commit.

    models.py    the `schedules` and `schedule_runs` tables (same metadata as the job store)
    triggers.py  trigger definitions, cron arithmetic, pinning a spec to input commits (no DB)
    store.py     ScheduleStore: CRUD for the API, leases and run records for the scheduler
    routes.py    /v1/schedules (tenant-scoped like /v1/jobs)
    cli.py       `alloy schedules ...` (HTTP client) and `alloy scheduler` (the loop process)

The loop itself is workers/scheduler.py.
"""
