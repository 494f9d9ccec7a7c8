"""Fixtures shared by every test: databases (SQLite and a real PostgreSQL), a hub, a DICOM node."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from saf.db import make_engine, migrate
from saf.hub import Hub
from saf.settings import Settings

POSTGRES_ADMIN_URL = os.environ.get(
    "SAF_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
"""A PostgreSQL server where the tests may create and drop scratch databases."""

IN_CI = os.environ.get("CI", "").lower() == "true"

# pytest-xdist's workers start with COLUMNS=80 and LINES=24 in their environment. rich
# reads them once, when saf.cli makes its consoles, so the CLI tests' own COLUMNS (given
# to CliRunner) would not apply and wide tables would be cut.
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)


def _postgres_unavailable() -> str | None:
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}".strip()


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """The admin URL, or a skip (a failure under CI=true) when PostgreSQL is absent."""
    reason = _postgres_unavailable()
    if reason:
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run)")
        pytest.skip(reason)
    return POSTGRES_ADMIN_URL


@pytest.fixture(scope="session")
def postgres_template(postgres_admin_url: str) -> Iterator[str]:
    """A database migrated to head once per test session, from empty (so the migrations
    run on PostgreSQL); each test's database is a copy of it, which is much faster than
    migrating again."""
    name = f"saf_template_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(make_url(postgres_admin_url).set(database=name).render_as_string(False))
    try:
        migrate(engine)
    finally:
        engine.dispose()  # CREATE DATABASE ... TEMPLATE needs it unused
    try:
        yield name
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_admin_url: str, postgres_template: str) -> Iterator[str]:
    """A fresh PostgreSQL database at the newest schema for one test, dropped afterwards."""
    name = f"saf_test_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"')
    url = make_url(postgres_admin_url).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """Run the test on the embedded SQLite index and on PostgreSQL (None = SQLite default)."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> Settings:
    """Settings for a hub in a temp data dir, on each database."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        dicom_host="127.0.0.1",
        dicom_port=0,
        stable_age_seconds=10,
    )


@pytest.fixture
def hub(settings: Settings) -> Iterator[Hub]:
    """An initialised hub (key ring, schema, local blob store)."""
    hub = Hub.open(settings, create=True)
    try:
        yield hub
    finally:
        hub.close()
