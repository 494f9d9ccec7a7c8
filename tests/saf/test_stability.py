"""The stable-study timer: quiet for the stable age means complete, announced once per arrival."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from saf.hub import Hub
from saf.ingest import ingest_part10
from saf.models import OutboxEvent, Study
from saf.stability import mark_stable_studies
from tests.factories import make_clinic, make_study


def _study(hub: Hub) -> Study:
    with hub.sessions() as session:
        return session.scalars(select(Study)).one()


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes for DateTime(timezone=True); saf stores UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _stable_events(hub: Hub) -> list[dict[str, object]]:
    with hub.sessions() as session:
        return [
            dict(e.payload)
            for e in session.scalars(
                select(OutboxEvent)
                .where(OutboxEvent.topic == "study.stable")
                .order_by(OutboxEvent.id)
            )
        ]


def test_study_is_marked_once_quiet_for_stable_age(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    paths = make_study(tmp_path / "in", count=3)
    for path in paths:
        ingest_part10(hub, path, sender)
    study = _study(hub)
    age = timedelta(seconds=hub.settings.stable_age_seconds)
    last = _aware(study.last_received_at)
    assert study.stable_at is None

    assert mark_stable_studies(hub, now=last + age - timedelta(seconds=1)) == []
    assert _study(hub).stable_at is None
    assert _stable_events(hub) == []

    done_at = last + age + timedelta(seconds=1)
    assert mark_stable_studies(hub, now=done_at) == [study.id]

    stable_at = _study(hub).stable_at
    assert stable_at is not None and _aware(stable_at) == done_at
    assert _stable_events(hub) == [
        {
            "study_id": study.id,
            "clinic_id": sender.clinic_id,
            "study_instance_uid": study.study_instance_uid,
            "instances": 3,
        }
    ]

    # Idempotent: a later check finds nothing new to announce.
    assert mark_stable_studies(hub, now=done_at + age) == []
    assert len(_stable_events(hub)) == 1


def test_new_instance_after_completion_reopens_the_study(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    paths = make_study(tmp_path / "in", count=2)
    for path in paths:
        ingest_part10(hub, path, sender)
    study = _study(hub)
    age = timedelta(seconds=hub.settings.stable_age_seconds)
    first_done = _aware(study.last_received_at) + age + timedelta(seconds=1)
    assert mark_stable_studies(hub, now=first_done) == [study.id]

    late = dcmread(paths[0])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.InstanceNumber = 99
    late_path = tmp_path / "late.dcm"
    late.save_as(late_path, enforce_file_format=True)
    ingest_part10(hub, late_path, sender)

    reopened = _study(hub)
    assert reopened.stable_at is None
    last = _aware(reopened.last_received_at)
    assert last >= _aware(study.last_received_at)
    assert mark_stable_studies(hub, now=last + age / 2) == []
    assert mark_stable_studies(hub, now=last + age + timedelta(seconds=1)) == [study.id]
    assert [e["instances"] for e in _stable_events(hub)] == [2, 3]
    assert _study(hub).stable_at is not None
