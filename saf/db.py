"""Database engine, sessions and migrations (SQLite WAL by default, PostgreSQL in production)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, insert, inspect
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
"""Alembic script directory shipped inside the package."""


PING_AFTER_IDLE_SECONDS: Final = 2.0
"""A pooled PostgreSQL connection idle longer than this is pinged before it is handed out
(a server restart or an idle timeout may have closed it); a busier one is not."""

OPTIMIZE_EVERY_SECONDS: Final = 600.0
"""How often (per process) a SQLite connection returning to the pool refreshes the query
planner's statistics (the first time: at the first checkin of the process)."""
ANALYSIS_LIMIT: Final = 400
"""Rows sampled per index by SQLite's ANALYZE (``PRAGMA analysis_limit``): a few
milliseconds on a large index instead of a full scan."""
_RETRY_ANALYZE_SECONDS: Final = 10.0
_BUSY_TIMEOUT_MS: Final = 30_000


def make_engine(url: str, *, ping_after_idle: float = PING_AFTER_IDLE_SECONDS) -> Engine:
    """An engine for `url`; SQLite gets WAL, full fsync, foreign keys and a busy timeout;
    PostgreSQL gets a pool that pings connections idle over `ping_after_idle` seconds."""
    if url.startswith("sqlite"):
        # No pre-ping: a local file cannot drop the connection, and the ping would cost
        # a round trip on every checkout of the ingest hot path.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "checkin", _SqliteOptimizer())
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    engine = create_engine(url, pool_size=10, max_overflow=20)
    _ping_when_idle(engine, ping_after_idle)
    return engine


def _ping_when_idle(engine: Engine, idle_seconds: float) -> None:
    """Pessimistic disconnect handling without a round trip on every checkout: SQLAlchemy's
    ``pool_pre_ping`` pings on each one (a read is two round trips, so it would be a third
    more); here only a connection that sat in the pool over `idle_seconds` is pinged, the
    window in which a restart or idle timeout could have closed it unnoticed. A dead one is
    discarded and the pool hands out a fresh one (DisconnectionError: SQLAlchemy retries
    the checkout). A connection that dies while busy raises a disconnect error on use, and
    SQLAlchemy then invalidates the pool's older connections as always."""
    dialect = engine.dialect

    def checkin(_dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    def checkout(dbapi_conn: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since <= idle_seconds:
            return
        try:
            dialect.do_ping(dbapi_conn)
            dbapi_conn.rollback()  # end the transaction the ping may have begun
        except Exception as exc:
            raise DisconnectionError(f"pooled connection was closed: {exc}") from exc

    event.listen(engine, "checkin", checkin)
    event.listen(engine, "checkout", checkout)


class _SqliteOptimizer:
    """A ``checkin`` listener that refreshes SQLite's query-planner statistics with a
    sampled ``ANALYZE`` when the process starts and then every `OPTIMIZE_EVERY_SECONDS`.

    Without statistics SQLite guesses, and guesses wrong on our indexes: a QIDO by
    PatientID walked every study of the clinic in date order (4.7 ms over 10,000 studies)
    instead of the five of that patient (0.2 ms). ``PRAGMA optimize`` alone is not
    enough: before SQLite 3.46 it never analyzes a table that was never analyzed. The
    statement does not wait for a busy database (another process writing): it skips a
    turn and tries again shortly.
    """

    def __init__(self) -> None:
        self.next_at = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
        with self.lock:
            now = time.monotonic()
            if now < self.next_at:
                return
            self.next_at = now + OPTIMIZE_EVERY_SECONDS
        try:
            dbapi_conn.execute("PRAGMA busy_timeout=0")
            try:
                dbapi_conn.execute("ANALYZE")
                dbapi_conn.commit()
            finally:
                dbapi_conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        except Exception:  # statistics are an optimisation: a busy database skips a turn
            log.info("ANALYZE skipped (database busy); retrying soon", exc_info=True)
            with self.lock:
                self.next_at = time.monotonic() + _RETRY_ANALYZE_SECONDS


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before we acknowledge, even across a power cut.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    cur.execute(f"PRAGMA analysis_limit={ANALYSIS_LIMIT}")
    cur.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Session factory; objects stay usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits at the end of the block, or rolls back on error."""
    with factory() as session, session.begin():
        yield session


def insert_all(session: Session, rows: Iterable[object]) -> None:
    """INSERT new model objects in one executemany per model (in the order each model's
    first row comes), without reading anything back, and leave them out of `session`.

    Why not ``add_all`` and a flush: for rows whose keys or defaults the ORM reads back,
    a flush sends one multi-row ``INSERT ... RETURNING`` whose text psycopg parses anew
    each time (milliseconds for a hundred rows); a plain executemany is one short,
    prepared statement, pipelined. The session is flushed first (autoflush), so the rows
    it holds, which these may reference, are written before them."""
    by_model: dict[type[Any], list[dict[str, Any]]] = {}
    for row in rows:
        columns = inspect(type(row)).column_attrs.keys()
        values = inspect(row).dict
        by_model.setdefault(type(row), []).append({k: values[k] for k in columns if k in values})
    for model, params in by_model.items():
        session.execute(insert(model), params)


def alembic_config(url: str) -> Config:
    """Alembic configuration pointing at the packaged migrations and `url`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
