"""`saf backfill`: studies stored before an upgrade get their metadata rows and thumbnails."""

from __future__ import annotations

import json
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import delete, func, select
from typer.testing import CliRunner

from saf import instance_metadata
from saf.cli import app
from saf.hub import Hub
from saf.ingest import ingest_part10
from saf.models import Instance, InstanceMetadata, Series, Study, Thumbnail
from saf.thumbnails import make_study_thumbnails
from tests.factories import make_clinic, make_study


def _backfill(hub: Hub) -> dict[str, int]:
    args = ["--data-dir", str(hub.settings.data_dir), "backfill"]
    env = {"SAF_DATABASE_URL": hub.settings.database_url or ""}
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def _count(hub: Hub, model: type) -> int:
    with hub.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_backfill_makes_what_old_studies_lack_and_nothing_twice(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    old = make_study(tmp_path / "old", count=3, seed=11)
    new = make_study(tmp_path / "new", count=2, seed=12)
    for path in [*old, *new]:
        ingest_part10(hub, path, sender)
    with hub.sessions() as session:
        study_pks = list(session.scalars(select(Study.id)))
    for study_pk in study_pks:
        make_study_thumbnails(hub, study_pk)
    assert instance_metadata.studies_missing(hub) == []
    old_series = (
        select(Series.id)
        .join(Study, Series.study_pk == Study.id)
        .where(Study.study_instance_uid == dcmread(old[0]).StudyInstanceUID)
    )
    with hub.engine.begin() as conn:  # the old study as it was before the table existed
        old_ids = select(Instance.id).where(Instance.series_pk.in_(old_series))
        conn.execute(delete(InstanceMetadata).where(InstanceMetadata.instance_id.in_(old_ids)))
    changed = dcmread(new[0])  # a corrected second version of one instance of the other study
    changed.InstitutionName = "Corrected"
    changed.save_as(tmp_path / "v2.dcm")
    ingest_part10(hub, tmp_path / "v2.dcm", sender)
    assert _count(hub, Instance) == 6 and _count(hub, InstanceMetadata) == 1
    assert len(instance_metadata.studies_missing(hub)) == 2

    first = _backfill(hub)

    assert first["studies"] == 2 and first["metadata_rows"] == 4, first
    assert _count(hub, InstanceMetadata) == 5  # the superseded version needs none
    assert instance_metadata.studies_missing(hub) == []
    with hub.sessions() as session:
        newest = list(session.scalars(select(Instance.id).where(Instance.version == 1)))
        newest += list(session.scalars(select(Instance.id).where(Instance.version == 2)))
    assert len(instance_metadata.load(hub, newest)) == 5
    thumbnails = _count(hub, Thumbnail)
    assert _backfill(hub) == {"studies": 0, "metadata_rows": 0, "thumbnails": 0}
    assert _count(hub, Thumbnail) == thumbnails
