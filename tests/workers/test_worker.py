"""A real `saf worker` (Celery) on Redis and on the embedded broker: from stable study to case."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from saf.cases import worklist
from saf.hub import Hub
from saf.ingest import ingest_part10
from saf.models import OutboxEvent, Thumbnail, utcnow
from saf.settings import Settings
from saf.stability import mark_stable_studies
from tests.conftest import IN_CI
from tests.factories import make_clinic, make_study

REDIS_URL = os.environ.get(
    "SAF_TEST_REDIS_URL",
    # One database per pytest-xdist worker (gw0 = 14, gw1 = 13, ...): each flushes its own.
    f"redis://127.0.0.1:6379/{14 - int(os.environ.get('PYTEST_XDIST_WORKER', 'gw0')[2:])}",
)
"""A Redis database the tests may flush."""


def _redis_or_skip() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).flushdb()
    except redis.RedisError as exc:
        reason = f"Redis not reachable at {REDIS_URL}: {exc}"
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: Redis tests must run)")
        pytest.skip(reason)
    return REDIS_URL


@pytest.fixture(params=["embedded", "redis"])
def broker_url(request: pytest.FixtureRequest) -> str | None:
    """The embedded SQLite broker (None) and a real Redis."""
    return None if request.param == "embedded" else _redis_or_skip()


@pytest.fixture
def worker_hub(tmp_path: Path, broker_url: str | None) -> Iterator[tuple[Hub, dict[str, str]]]:
    """A hub on SQLite and the environment a `saf worker` for it needs."""
    settings = Settings(data_dir=tmp_path / "data", broker_url=broker_url, outbox_poll_interval=0.2)
    hub = Hub.open(settings, create=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAF_")}
    env.update(SAF_DATA_DIR=str(settings.data_dir), SAF_OUTBOX_POLL_INTERVAL="0.2")
    if broker_url:
        env["SAF_BROKER_URL"] = broker_url
    yield hub, env
    hub.close()


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the worker")


def test_worker_makes_case_and_thumbnails(
    worker_hub: tuple[Hub, dict[str, str]], tmp_path: Path
) -> None:
    hub, env = worker_hub
    sender = make_clinic(hub)
    for path in make_study(tmp_path / "in", "ct", count=3, size=64):
        ingest_part10(hub, path, sender)
    mark_stable_studies(hub, now=utcnow() + timedelta(seconds=60))
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "saf", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:

        def done() -> bool:
            with hub.sessions() as session:
                thumbs = session.scalar(select(func.count(Thumbnail.id)))
            return bool(worklist(hub, "general")) and thumbs == 4

        _wait_for(done)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    with hub.sessions() as session:
        pending = session.scalar(
            select(func.count(OutboxEvent.id)).where(OutboxEvent.dispatched_at.is_(None))
        )
    assert pending == 0
    assert len(worklist(hub, "general")) == 1
