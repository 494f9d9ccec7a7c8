"""Export: the newest version of each instance, decrypted, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from saf.export import ExportError, export_study
from saf.hub import Hub
from saf.identity import SYSTEM
from saf.ingest import ingest_part10
from saf.models import AuditRecord
from tests.factories import dataset_sha256, make_clinic, make_study


def test_export_gives_newest_version_whatever_its_instance_number(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    [original] = make_study(tmp_path / "in", count=1)
    ds = dcmread(original)
    ds.InstanceNumber = 0  # the correction sorts before the original by instance number
    fixed = tmp_path / "fixed.dcm"
    ds.save_as(fixed, enforce_file_format=True)
    first = ingest_part10(hub, original, sender)
    ingest_part10(hub, fixed, sender)

    [exported] = export_study(hub, first.study_instance_uid, tmp_path / "out", who=SYSTEM)

    assert exported.version == 2
    assert dataset_sha256(exported.path) == dataset_sha256(fixed)
    assert exported.path.read_bytes() == fixed.read_bytes()


def test_export_of_study_at_two_clinics_needs_the_clinic(hub: Hub, tmp_path: Path) -> None:
    a = make_clinic(hub, "Clinic A", "AE_A")
    b = make_clinic(hub, "Clinic B", "AE_B")
    paths = make_study(tmp_path / "in", count=2)
    for sender in (a, b):
        for path in paths:
            ingest_part10(hub, path, sender)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)

    with pytest.raises(ExportError, match="pass --clinic"):
        export_study(hub, study_uid, tmp_path / "x", who=SYSTEM)
    files = export_study(hub, study_uid, tmp_path / "b", who=SYSTEM, clinic_id=b.clinic_id)
    assert sorted(f.path.read_bytes() for f in files) == sorted(p.read_bytes() for p in paths)
    with hub.sessions() as session:
        records = session.execute(
            select(AuditRecord.outcome, AuditRecord.clinic_id, AuditRecord.detail)
            .where(AuditRecord.event == "export")
            .order_by(AuditRecord.id)
        ).all()
    assert [tuple(r) for r in records] == [
        (4, None, f"refused: study {study_uid} exists at 2 clinics: pass --clinic"),
        (0, b.clinic_id, "instances=2"),
    ]
