"""From ingest to worklist without a broker: outbox events handled by the pipeline functions."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from saf.cases import worklist
from saf.hub import Hub
from saf.ingest import ingest_part10
from saf.models import FrameHeader, OutboxEvent, Thumbnail, utcnow
from saf.pipeline import CompletedStudy, handle_event
from saf.routing import default_rules
from saf.stability import mark_stable_studies
from tests.factories import make_clinic, make_study


def _events(hub: Hub, topic: str) -> list[OutboxEvent]:
    with hub.sessions() as session:
        return list(session.scalars(select(OutboxEvent).where(OutboxEvent.topic == topic)))


def test_complete_study_event_gives_case_and_thumbnails_idempotently(
    hub: Hub, tmp_path: Path
) -> None:
    sender = make_clinic(hub)
    for path in make_study(tmp_path, "ct", count=4, size=64):
        ingest_part10(hub, path, sender)
    mark_stable_studies(hub, now=utcnow() + timedelta(seconds=60))
    [event] = _events(hub, "study.stable")
    rules = default_rules()

    first = handle_event(hub, event.topic, event.payload, rules)
    again = handle_event(hub, event.topic, event.payload, rules)  # redelivered

    assert isinstance(first, CompletedStudy) and isinstance(again, CompletedStudy)
    assert first.case_id == again.case_id
    assert (first.thumbnails.made, again.thumbnails.made) == (5, 0)
    [item] = worklist(hub, "general")
    assert item.case_id == first.case_id
    with hub.sessions() as session:
        assert len(session.scalars(select(Thumbnail)).all()) == 5
        # the viewer's frame list is indexed already: its first opening reads no blob
        assert len(session.scalars(select(FrameHeader)).all()) == 4
    for other in _events(hub, "instance.stored"):
        assert handle_event(hub, other.topic, other.payload, rules) is None
