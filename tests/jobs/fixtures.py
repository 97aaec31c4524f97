"""The job store on PostgreSQL for tests (when ALLOY_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

PG = os.environ.get("ALLOY_TEST_POSTGRES_URL")


@contextmanager
def postgres_store(clock, prefix: str) -> Iterator:
    """A Store on a throwaway PostgreSQL schema migrated to head (ALLOY_TEST_POSTGRES_URL); dropped after."""
    import uuid

    from alembic import command
    from sqlalchemy import create_engine, text

    from jobs.migrate import alembic_config
    from jobs.store import Store

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    eng = create_engine(PG, connect_args={"options": f"-csearch_path={schema}"})
    try:
        cfg = alembic_config(PG)
        with eng.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        yield Store(PG, clock=clock, engine=eng)
    finally:
        eng.dispose()
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
