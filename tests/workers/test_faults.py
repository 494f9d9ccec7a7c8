"""Faults with a real worker: the broker goes away, a worker is SIGKILLed, a study is resent.

Each ends with exactly one case, every thumbnail present, nothing pending, nothing lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from saf.cases import worklist
from saf.fsck import fsck
from saf.hub import Hub
from saf.ingest import Sender, ingest_part10
from saf.models import Case, OutboxEvent, Thumbnail, utcnow
from saf.settings import Settings
from saf.stability import mark_stable_studies
from tests.factories import make_clinic, make_study
from tests.workers.conftest import RedisServer, Worker, worker_env

pytestmark = pytest.mark.slow


def _wait_for(condition: Callable[[], bool], timeout: float = 90.0, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise AssertionError("timed out")


def _count(hub: Hub, column: object, *where: object) -> int:
    with hub.sessions() as session:
        return int(session.scalar(select(func.count(column)).where(*where)) or 0)  # type: ignore[arg-type]


def _ingest_and_complete(hub: Hub, sender: Sender, paths: list[Path]) -> None:
    for path in paths:
        ingest_part10(hub, path, sender)
    mark_stable_studies(hub, now=utcnow() + timedelta(seconds=60))


def _settled(hub: Hub, thumbnails: int) -> Callable[[], bool]:
    def done() -> bool:
        return (
            _count(hub, Thumbnail.id) == thumbnails
            and _count(hub, Case.id) == 1
            and _count(hub, OutboxEvent.id, OutboxEvent.completed_at.is_(None)) == 0
        )

    return done


def _assert_one_case_intact(hub: Hub, thumbnails: int) -> None:
    assert _count(hub, Case.id) == 1
    assert len(worklist(hub, "general")) == 1
    assert _count(hub, Thumbnail.id) == thumbnails
    report = fsck(hub, deep=True)
    assert report.ok, report


def test_broker_down_while_a_study_completes(redis_server: RedisServer, tmp_path: Path) -> None:
    hub = Hub.open(Settings(data_dir=tmp_path / "data"), create=True)
    worker = Worker(worker_env(hub.settings.data_dir, SAF_BROKER_URL=redis_server.url),
                    tmp_path / "worker.log")  # fmt: skip
    sender = make_clinic(hub)
    try:
        worker.start()
        _wait_for(lambda: "ready" in worker.log())
        redis_server.stop()
        _ingest_and_complete(hub, sender, make_study(tmp_path / "in", count=5, size=64))
        time.sleep(3)  # several dispatch attempts fail meanwhile
        assert _count(hub, OutboxEvent.id, OutboxEvent.topic == "study.stable",
                      OutboxEvent.dispatched_at.is_(None)) == 1  # fmt: skip
        assert _count(hub, Case.id) == 0

        redis_server.start()  # same port: dispatcher and worker reconnect
        _wait_for(_settled(hub, thumbnails=6))
    finally:
        worker.stop_all()
    _assert_one_case_intact(hub, thumbnails=6)
    hub.close()


@pytest.mark.parametrize("broker", ["redis-restarted", "redis-running", "embedded"])
def test_worker_killed_mid_task_then_study_resent(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The task of a SIGKILLed worker is done again, and done once.

    - redis-restarted: the worker comes back after the visibility timeout and takes it;
    - redis-running: a second worker, already running, restores it from Redis by itself;
    - embedded: the SQLite broker forgets a fetched message, so the outbox publishes
      the uncompleted event again after SAF_OUTBOX_REDELIVER_SECONDS.
    """
    hub = Hub.open(Settings(data_dir=tmp_path / "data"), create=True)
    if broker == "embedded":
        env = worker_env(hub.settings.data_dir, SAF_OUTBOX_REDELIVER_SECONDS="3")
    else:
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        env = worker_env(hub.settings.data_dir, SAF_BROKER_URL=redis_server.url,
                         SAF_BROKER_VISIBILITY_TIMEOUT="3")  # fmt: skip
    worker = Worker(env, tmp_path / "worker.log")
    standby = Worker(env, tmp_path / "standby.log")  # redis-running only
    sender = make_clinic(hub)
    paths = make_study(tmp_path / "in", count=240, size=512)
    try:
        worker.start()
        _wait_for(lambda: "ready" in worker.log())
        if broker == "redis-running":
            standby.start()
            _wait_for(lambda: "ready" in standby.log())
        _ingest_and_complete(hub, sender, paths)
        _wait_for(lambda: _count(hub, Thumbnail.id) > 0, poll=0.01)  # a batch is committed
        busy = worker if "received" in worker.log() else standby
        busy.kill()
        partial = _count(hub, Thumbnail.id)
        assert partial < 241, "the kill came too late to test anything; make the study bigger"
        # redis-running: nothing is restarted; the idle worker takes the task over once the
        # visibility timeout has passed (on a loaded machine it may even take it while the
        # first worker still runs it: harmless, the task is idempotent).
        if broker != "redis-running":
            time.sleep(1)
            worker.start()  # restarted by systemd, say
        _wait_for(_settled(hub, thumbnails=241))

        _ingest_and_complete(hub, sender, paths)  # resent: duplicates, nothing new
        time.sleep(2)
        _wait_for(_settled(hub, thumbnails=241))
    finally:
        worker.stop_all()
        standby.stop_all()
    _assert_one_case_intact(hub, thumbnails=241)
    hub.close()
