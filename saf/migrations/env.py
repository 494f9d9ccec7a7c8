"""Alembic environment: runs migrations on the connection saf.db.migrate hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from saf.models import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        url = config.get_main_option("sqlalchemy.url")
        assert url, "sqlalchemy.url is not set"
        with create_engine(url).connect() as conn:
            _run_on(conn)
            conn.commit()
    else:
        _run_on(connection)


def _run_on(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
