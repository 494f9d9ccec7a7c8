"""The outbox dispatcher: hands committed events to the broker, so a broker outage delays
work but never loses it (events stay pending until a publish succeeds)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import select, update

from saf.db import transaction
from saf.hub import Hub
from saf.models import OutboxEvent, utcnow
from saf.pipeline import ACTIONABLE_TOPICS

log = logging.getLogger(__name__)

BATCH = 200
"""Events handled per dispatch pass."""


def dispatch_pending(hub: Hub, publish: Callable[[int], None]) -> int:
    """Publish pending actionable events (oldest first) and mark them; returns how many.

    Events no task acts on are marked without publishing. A publish that fails
    (broker down) stops the pass and leaves that event and the rest pending. A crash
    between publish and mark publishes again later: tasks are idempotent.

    On PostgreSQL the pending rows are locked with SKIP LOCKED until they are marked,
    so several workers' dispatchers share the work instead of each publishing every
    event. (SQLite has no row locks; it serves one machine, where one worker runs.)
    """
    published = 0
    failure: Exception | None = None
    with transaction(hub.sessions) as session:
        pending = session.execute(
            select(OutboxEvent.id, OutboxEvent.topic)
            .where(OutboxEvent.dispatched_at.is_(None))
            .order_by(OutboxEvent.id)
            .limit(BATCH)
            .with_for_update(skip_locked=True)
        ).all()
        done: list[int] = []
        for event_id, topic in pending:
            if topic in ACTIONABLE_TOPICS:
                try:
                    publish(event_id)
                except Exception as exc:
                    failure = exc
                    break
                published += 1
            done.append(event_id)
        if done:
            session.execute(
                update(OutboxEvent)
                .where(OutboxEvent.id.in_(done))
                .values(dispatched_at=utcnow(), attempts=OutboxEvent.attempts + 1)
            )
    if failure is not None:
        raise failure
    return published


class Dispatcher:
    """Runs `dispatch_pending` every SAF_OUTBOX_POLL_INTERVAL seconds in a daemon thread."""

    def __init__(self, hub: Hub, publish: Callable[[int], None]) -> None:
        self._hub = hub
        self._publish = publish
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="saf-outbox", daemon=True)

    def start(self) -> None:
        """Start dispatching in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current pass."""
        self._stop.set()
        if self._thread.ident is not None:  # never started if the worker never got ready
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._hub.settings.outbox_poll_interval):
            try:
                dispatch_pending(self._hub, self._publish)
            except Exception as exc:  # broker or database away: try again next tick
                log.warning("outbox dispatch failed, will retry: %s", type(exc).__name__)
