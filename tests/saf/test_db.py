"""The database layer: migrations match the models, SQLite runs in WAL with full sync."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from saf.db import alembic_config, migrate
from saf.hub import Hub
from saf.models import Base
from saf.settings import Settings


def test_migrations_match_models(hub: Hub) -> None:
    with hub.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations disagree; add a revision: {diff}"


def test_migrate_is_idempotent_and_reaches_head(hub: Hub) -> None:
    migrate(hub.engine)
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    with hub.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head


def test_sqlite_is_wal_with_full_sync(tmp_path: Path) -> None:
    hub = Hub.open(Settings(data_dir=tmp_path / "data"), create=True)
    with hub.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    hub.close()
