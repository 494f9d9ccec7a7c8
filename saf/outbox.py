"""The outbox dispatcher: hands committed events to the broker, so a broker outage delays
work but never loses it (events stay pending until a publish succeeds), and a task lost
after publishing (a killed worker, a broker that dropped the message) is published again
until it completes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import and_, or_, select, update

from saf.db import transaction
from saf.hub import Hub
from saf.models import OutboxEvent, utcnow
from saf.pipeline import ACTIONABLE_TOPICS

log = logging.getLogger(__name__)

BATCH = 200
"""Events handled per dispatch pass."""

MAX_ATTEMPTS = 10
"""Publications of one event before the dispatcher gives up on it (logged as an error;
`saf stats` counts such events)."""


def dispatch_pending(hub: Hub, publish: Callable[[int], None]) -> int:
    """Publish due actionable events (oldest first) and mark them; returns how many.

    Due: never dispatched, or dispatched more than SAF_OUTBOX_REDELIVER_SECONDS ago and
    still not completed. Events no task acts on are marked completed without
    publishing. A publish that fails (broker down) stops the pass and leaves that event
    and the rest due. A crash between publish and mark publishes again later: tasks
    are idempotent.

    On PostgreSQL the due rows are locked with SKIP LOCKED until they are marked, so
    several workers' dispatchers share the work instead of each publishing every
    event. (SQLite has no row locks; it serves one machine, where one worker runs.)
    """
    now = utcnow()
    stale = now - timedelta(seconds=hub.settings.outbox_redeliver_seconds)
    published = 0
    failure: Exception | None = None
    with transaction(hub.sessions) as session:
        due = session.execute(
            select(OutboxEvent.id, OutboxEvent.topic, OutboxEvent.attempts)
            .where(
                or_(
                    OutboxEvent.dispatched_at.is_(None),
                    and_(
                        OutboxEvent.completed_at.is_(None),
                        OutboxEvent.dispatched_at < stale,
                        OutboxEvent.attempts < MAX_ATTEMPTS,
                    ),
                )
            )
            .order_by(OutboxEvent.id)
            .limit(BATCH)
            .with_for_update(skip_locked=True)
        ).all()
        sent: list[int] = []
        records: list[int] = []
        for event_id, topic, attempts in due:
            if topic not in ACTIONABLE_TOPICS:
                records.append(event_id)
                continue
            try:
                publish(event_id)
            except Exception as exc:
                failure = exc
                break
            if attempts:
                log.warning("outbox event %d not completed: published again", event_id)
            if attempts + 1 >= MAX_ATTEMPTS:
                log.error(
                    "outbox event %d published %d times without completing: giving up",
                    event_id,
                    attempts + 1,
                )
            published += 1
            sent.append(event_id)
        if sent:
            session.execute(
                update(OutboxEvent)
                .where(OutboxEvent.id.in_(sent))
                .values(dispatched_at=now, attempts=OutboxEvent.attempts + 1)
            )
        if records:
            session.execute(
                update(OutboxEvent)
                .where(OutboxEvent.id.in_(records))
                .values(dispatched_at=now, completed_at=now)
            )
    if failure is not None:
        raise failure
    return published


def mark_completed(hub: Hub, event_id: int) -> None:
    """Record that the task of event `event_id` finished: it will not be published again."""
    with transaction(hub.sessions) as session:
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == event_id, OutboxEvent.completed_at.is_(None))
            .values(completed_at=utcnow())
        )


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
