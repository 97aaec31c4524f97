"""The jobs core: what the API (service/) and the workers (workers/) share. Both import it; neither
imports the other, and nothing here imports either of them.

    settings.py        one Settings object from ALLOY_* variables
    states.py          job states and schedule-run statuses (the one place they are spelled)
    models.py          the tables (jobs, events, webhook deliveries, calibration sets, schedules, runs)
    migrations/        Alembic history of those tables; migrate.py runs it
    store.py           Store: jobs, leases with fencing, the reaper's sweep, the webhook outbox
    schedule_store.py  ScheduleStore: schedules and their runs
    triggers.py        cron and on-new-revision triggers, pinning a spec to input commits (no DB)
    admission.py       what a spec may ask of this server (AdmissionError)
    queue.py           queue names, the task name, sending a job's wake-up by name
    job_view.py        a job as the API returns it and webhooks POST it
    webhooks.py        signing and delivering webhooks from the outbox
    egress.py          checks for outbound HTTP to tenant-chosen addresses
"""
