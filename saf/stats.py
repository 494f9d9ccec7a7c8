"""Counts of what the hub holds, for `saf stats` and monitoring."""

from __future__ import annotations

from sqlalchemy import func, select

from saf.hub import Hub
from saf.models import Blob, Case, Clinic, Instance, OutboxEvent, Patient, Series, Study, Thumbnail
from saf.outbox import MAX_ATTEMPTS


def collect(hub: Hub) -> dict[str, int]:
    """Clinics, patients, studies, series, instances, stored bytes, cases, thumbnails, and
    outbox events: pending (not yet published), in flight (published, task not done)
    and failed (published MAX_ATTEMPTS times without completing: needs an operator)."""
    with hub.sessions() as session:

        def count(column: object, *where: object) -> int:
            query = select(func.count(column)).where(*where)  # type: ignore[arg-type]
            return int(session.scalar(query) or 0)

        return {
            "clinics": count(Clinic.id),
            "patients": count(Patient.id),
            "studies": count(Study.id),
            "series": count(Series.id),
            "instances": count(Instance.id),
            "bytes": int(session.scalar(select(func.coalesce(func.sum(Blob.size), 0))) or 0),
            "cases": count(Case.id),
            "thumbnails": count(Thumbnail.id),
            "outbox_pending": count(OutboxEvent.id, OutboxEvent.dispatched_at.is_(None)),
            "outbox_in_flight": count(
                OutboxEvent.id,
                OutboxEvent.dispatched_at.is_not(None),
                OutboxEvent.completed_at.is_(None),
                OutboxEvent.attempts < MAX_ATTEMPTS,
            ),
            "outbox_failed": count(
                OutboxEvent.id,
                OutboxEvent.completed_at.is_(None),
                OutboxEvent.attempts >= MAX_ATTEMPTS,
            ),
        }
