"""The Alembic migrations create exactly the tables the models declare; the API imports no torch."""

from __future__ import annotations

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from service.migrate import upgrade
from service.models import Base


def test_migrations_match_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    upgrade(url)  # idempotent: a second run is a no-op
    with create_engine(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_api_and_worker_parent_import_no_torch():
    code = ("import sys, service.app, service.cli_service, workers.tasks, workers.reaper;"
            "from service.app import create_app; from service.settings import Settings;"
            "create_app(Settings(database_url='sqlite://'));"
            "print(sorted(m for m in ('torch', 'transformers', 'merge_ops.runner') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
