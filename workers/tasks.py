"""Thin Celery tasks: load the outbox event and hand it to saf.pipeline; retries with backoff."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from sqlalchemy import select

from saf.hub import Hub
from saf.models import OutboxEvent
from saf.outbox import mark_completed
from saf.pipeline import handle_event
from saf.routing import RulesHolder

_context: dict[str, Any] = {}


def configure(hub: Hub) -> None:
    """Give the tasks of this worker process their hub and routing rules."""
    _context["hub"] = hub
    _context["rules"] = RulesHolder(hub.settings.rules_path)


@shared_task(  # type: ignore[untyped-decorator]
    name="saf.handle_outbox_event",
    autoretry_for=(Exception,),
    retry_backoff=2,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=50,
)
def handle_outbox_event(event_id: int) -> None:
    """Do what outbox event `event_id` asks for (idempotent, so redelivery is harmless)."""
    hub: Hub = _context["hub"]
    rules: RulesHolder = _context["rules"]
    with hub.sessions() as session:
        row = session.execute(
            select(OutboxEvent.topic, OutboxEvent.payload).where(OutboxEvent.id == event_id)
        ).first()
    if row is None:
        return  # the event is gone: nothing to redo
    handle_event(hub, row.topic, row.payload, rules.current)
    mark_completed(hub, event_id)
