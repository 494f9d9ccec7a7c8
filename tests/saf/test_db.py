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


def _kill_backends(engine_url: str, admin_url: str) -> int:
    """Terminate every server connection to `engine_url`'s database, as a restart would."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = make_url(engine_url).database
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return len(rows)


def test_idle_connection_killed_by_the_server_is_replaced(
    postgres_url: str, postgres_admin_url: str
) -> None:
    """A pooled connection the server closed while it sat idle is pinged, found dead and
    replaced at checkout: the caller never sees the error."""
    import time

    from saf.db import make_engine

    engine = make_engine(postgres_url, ping_after_idle=0.2)
    try:
        with engine.connect() as conn:
            first = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert _kill_backends(postgres_url, postgres_admin_url) == 1
        time.sleep(0.4)
        with engine.connect() as conn:
            second = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert second != first
    finally:
        engine.dispose()


def test_busy_connection_is_not_pinged_and_a_dead_one_is_replaced_after_one_error(
    postgres_url: str, postgres_admin_url: str
) -> None:
    """Within the idle window there is no ping (no extra round trip): a connection killed
    then fails once with a disconnect error, and the pool recovers for the next caller."""
    import pytest
    from sqlalchemy.exc import OperationalError

    from saf.db import make_engine

    engine = make_engine(postgres_url, ping_after_idle=3600)
    try:
        with engine.connect() as conn:
            first = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        _kill_backends(postgres_url, postgres_admin_url)
        with pytest.raises(OperationalError), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != first
    finally:
        engine.dispose()


def test_sqlite_statistics_are_gathered_at_the_first_checkin_without_waiting(
    tmp_path: Path,
) -> None:
    """The first connection a process returns to the pool runs a sampled ANALYZE (SQLite
    before 3.46 never analyzes a table on its own); a database locked by another writer
    makes it skip at once (no 30 s busy wait) and try again on a later checkin."""
    import sqlite3
    import time

    from saf import db

    path = tmp_path / "o.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA journal_mode=WAL")  # as saf's connections set it
    other.execute("CREATE TABLE t (a INTEGER, b INTEGER)")
    other.execute("CREATE INDEX ix_t_a ON t (a)")
    other.execute("INSERT INTO t VALUES (1, 2), (3, 4)")
    other.execute("BEGIN IMMEDIATE")  # another process is writing
    engine = db.make_engine(f"sqlite:///{path}")
    try:
        start = time.monotonic()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 2
        assert time.monotonic() - start < 5  # skipped, did not wait for the lock
        other.execute("COMMIT")
        names = [r[0] for r in other.execute("SELECT name FROM sqlite_master")]
        assert "sqlite_stat1" not in names
        optimizer = next(
            f for f in engine.pool.dispatch.checkin if isinstance(f, db._SqliteOptimizer)
        )
        optimizer.next_at = 0.0  # the retry is due
        with engine.connect() as conn:
            conn.execute(text("SELECT * FROM t WHERE a = 1")).all()
            assert conn.execute(text("PRAGMA analysis_limit")).scalar_one() == db.ANALYSIS_LIMIT
        names = [r[0] for r in other.execute("SELECT name FROM sqlite_master")]
        assert "sqlite_stat1" in names
        rows = other.execute("SELECT idx FROM sqlite_stat1 WHERE tbl = 't'").fetchall()
        assert ("ix_t_a",) in rows
    finally:
        engine.dispose()
        other.close()
