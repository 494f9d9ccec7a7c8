"""The outbox dispatcher: publishes what needs a task; keeps events while publishing fails."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from saf.db import transaction
from saf.hub import Hub
from saf.ingest import ingest_part10
from saf.models import OutboxEvent, utcnow
from saf.outbox import MAX_ATTEMPTS, Dispatcher, dispatch_pending, mark_completed
from saf.settings import Settings
from saf.stability import mark_stable_studies
from saf.stats import collect
from tests.factories import make_clinic, make_study


def _pending(hub: Hub) -> list[str]:
    with hub.sessions() as session:
        return list(
            session.scalars(select(OutboxEvent.topic).where(OutboxEvent.dispatched_at.is_(None)))
        )


def test_publishes_actionable_events_once_and_keeps_them_while_broker_is_down(
    hub: Hub, tmp_path: Path
) -> None:
    sender = make_clinic(hub)
    for path in make_study(tmp_path, count=2):
        ingest_part10(hub, path, sender)
    mark_stable_studies(hub, now=utcnow() + timedelta(seconds=60))

    def broker_down(event_id: int) -> None:
        raise ConnectionError("broker unreachable")

    with pytest.raises(ConnectionError):
        dispatch_pending(hub, broker_down)
    assert _pending(hub) == ["study.stable"]  # records marked, the actionable one kept

    published: list[int] = []
    assert dispatch_pending(hub, published.append) == 1
    assert dispatch_pending(hub, published.append) == 0
    assert len(published) == 1 and _pending(hub) == []


def test_unstarted_dispatcher_stops_cleanly(hub: Hub) -> None:
    Dispatcher(hub, lambda event_id: None).stop()


def test_concurrent_dispatchers_publish_each_event_once_on_postgresql(
    postgres_url: str, tmp_path: Path
) -> None:
    hub = Hub.open(Settings(data_dir=tmp_path / "data", database_url=postgres_url), create=True)
    try:
        with transaction(hub.sessions) as session:
            session.add_all(
                OutboxEvent(topic="study.stable", payload={"study_id": str(n)}) for n in range(60)
            )
        published: list[int] = []
        lock = threading.Lock()

        def slow_publish(event_id: int) -> None:
            time.sleep(0.002)  # a broker round trip: long enough for the passes to overlap
            with lock:
                published.append(event_id)

        def drain() -> None:
            while dispatch_pending(hub, slow_publish):
                pass

        threads = [threading.Thread(target=drain) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(published) == sorted(set(published)) and len(published) == 60
        assert _pending(hub) == []
    finally:
        hub.close()


def test_published_event_not_completed_is_published_again(hub: Hub, tmp_path: Path) -> None:
    """A task lost after publishing (worker killed, broker dropped it) is not lost for good."""
    sender = make_clinic(hub)
    for path in make_study(tmp_path, count=1):
        ingest_part10(hub, path, sender)
    mark_stable_studies(hub, now=utcnow() + timedelta(seconds=60))
    hub.settings.outbox_redeliver_seconds = 0.3
    published: list[int] = []
    assert dispatch_pending(hub, published.append) == 1
    assert dispatch_pending(hub, published.append) == 0  # not due yet
    time.sleep(0.4)
    assert dispatch_pending(hub, published.append) == 1  # lost? publish again
    mark_completed(hub, published[-1])
    time.sleep(0.4)
    assert dispatch_pending(hub, published.append) == 0  # completed: never again
    assert published == [published[0]] * 2


def test_an_event_that_never_completes_is_given_up_after_max_attempts(
    hub: Hub, tmp_path: Path
) -> None:
    sender = make_clinic(hub)
    for path in make_study(tmp_path, count=1):
        ingest_part10(hub, path, sender)
    mark_stable_studies(hub, now=utcnow() + timedelta(seconds=60))
    hub.settings.outbox_redeliver_seconds = 0.01
    published: list[int] = []
    for attempt in range(MAX_ATTEMPTS + 3):
        dispatch_pending(hub, published.append)
        if attempt == 0:
            assert collect(hub)["outbox_in_flight"] == 1
        time.sleep(0.02)
    assert len(published) == MAX_ATTEMPTS
    counts = collect(hub)  # `saf stats` shows it for an operator
    assert (counts["outbox_failed"], counts["outbox_in_flight"]) == (1, 0)
