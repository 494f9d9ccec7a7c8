"""Counts of what the hub holds, for `saf stats` and monitoring."""

from __future__ import annotations

from sqlalchemy import func, select

from saf.hub import Hub
from saf.models import Blob, Clinic, Instance, OutboxEvent, Patient, Series, Study


def collect(hub: Hub) -> dict[str, int]:
    """Clinics, patients, studies, series, instances, stored bytes and pending outbox events."""
    with hub.sessions() as session:

        def count(column: object) -> int:
            return int(session.scalar(select(func.count(column))) or 0)  # type: ignore[arg-type]

        return {
            "clinics": count(Clinic.id),
            "patients": count(Patient.id),
            "studies": count(Study.id),
            "series": count(Series.id),
            "instances": count(Instance.id),
            "bytes": int(session.scalar(select(func.coalesce(func.sum(Blob.size), 0))) or 0),
            "outbox_pending": int(
                session.scalar(
                    select(func.count(OutboxEvent.id)).where(OutboxEvent.dispatched_at.is_(None))
                )
                or 0
            ),
        }
