"""Alembic environment: the URL is the caller's (alloy migrate) or ALLOY_DATABASE_URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from jobs.models import Base
from jobs.settings import Settings

config = context.config
url = config.attributes.get("url") or Settings().database_url
connection = config.attributes.get("connection")


def _run(conn) -> None:
    context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run(connection)
else:
    with create_engine(url).connect() as conn:
        _run(conn)
