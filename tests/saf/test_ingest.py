"""The one ingest path: store, deduplicate, version, refuse bad input leaving nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import MRImageStorage
from sqlalchemy import select

from saf import vault
from saf.blobstore.local import LocalBlobStore
from saf.crypto import open_value
from saf.hub import Hub
from saf.ingest import (
    CannotUnderstand,
    Outcome,
    OutOfResources,
    SOPClassMismatch,
    ingest_part10,
)
from saf.models import Instance, OutboxEvent, Patient
from tests.factories import (
    TEST_PATIENT_NAME,
    dataset_sha256,
    make_clinic,
    make_study,
    row_counts,
    stored_blob_ids,
)


def test_stores_study_and_reads_back_exact_bytes(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    paths = make_study(tmp_path / "in", count=3, patient_name=TEST_PATIENT_NAME)

    results = [ingest_part10(hub, p, sender) for p in paths]

    assert [r.outcome for r in results] == [Outcome.STORED] * 3
    counts = row_counts(hub)
    assert (counts["patient"], counts["study"], counts["series"], counts["instance"]) == (
        1,
        1,
        1,
        3,
    )
    assert counts["outbox"] == 3
    with hub.sessions() as session:
        for path in paths:
            inst = session.scalars(
                select(Instance).where(Instance.sop_instance_uid == dcmread(path).SOPInstanceUID)
            ).one()
            assert inst.sha256 == dataset_sha256(path)
            assert b"".join(vault.read(hub, inst.blob)) == path.read_bytes()
        patient = session.scalars(select(Patient)).one()
        assert patient.name_sealed and TEST_PATIENT_NAME not in patient.name_sealed
        assert open_value(hub.keyring, patient.name_sealed, context="patient.name") == (
            TEST_PATIENT_NAME
        )


def test_duplicate_resend_writes_nothing(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    [path] = make_study(tmp_path, count=1)
    first = ingest_part10(hub, path, sender)
    before_rows, before_blobs = row_counts(hub), stored_blob_ids(hub)

    again = ingest_part10(hub, path, sender)

    assert again.outcome is Outcome.DUPLICATE
    assert again.instance_id == first.instance_id
    assert row_counts(hub) == before_rows
    assert stored_blob_ids(hub) == before_blobs


def test_same_uid_other_bytes_keeps_both_versions(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    [path] = make_study(tmp_path / "a", count=1)
    ds = dcmread(path)
    ds.SeriesDescription = "CORRECTED"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)

    first = ingest_part10(hub, path, sender)
    second = ingest_part10(hub, changed, sender)

    assert (first.outcome, second.outcome) == (Outcome.STORED, Outcome.NEW_VERSION)
    assert second.version == 2 and second.instance_id != first.instance_id
    with hub.sessions() as session:
        versions = session.scalars(select(Instance.version).order_by(Instance.version)).all()
        topics = session.scalars(select(OutboxEvent.topic)).all()
    assert list(versions) == [1, 2]
    assert "instance.new_version" in topics
    assert len(stored_blob_ids(hub)) == 2


def test_same_patient_id_at_two_clinics_is_two_patients(hub: Hub, tmp_path: Path) -> None:
    a = make_clinic(hub, "Clinic A", "AE_A")
    b = make_clinic(hub, "Clinic B", "AE_B")
    [path] = make_study(tmp_path, count=1, patient_id="MRN-1")

    ingest_part10(hub, path, a)
    result_b = ingest_part10(hub, path, b)

    assert result_b.outcome is Outcome.STORED  # another tenant: not a duplicate of A's copy
    with hub.sessions() as session:
        patients = session.scalars(select(Patient)).all()
    assert sorted(p.clinic_id for p in patients) == sorted([a.clinic_id, b.clinic_id])
    assert {p.patient_id for p in patients} == {"MRN-1"}


def _assert_nothing_left(hub: Hub) -> None:
    assert all(n == 0 for n in row_counts(hub).values()), row_counts(hub)
    assert stored_blob_ids(hub) == set()


@pytest.mark.parametrize("kind", ["ct", "ct-jpeg"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file_is_refused_and_leaves_nothing(
    hub: Hub, tmp_path: Path, keep: float, kind: str
) -> None:
    sender = make_clinic(hub)
    [path] = make_study(tmp_path, kind, count=1)
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * keep)])

    with pytest.raises(CannotUnderstand) as info:
        ingest_part10(hub, cut, sender)

    assert info.value.status == 0xC000
    _assert_nothing_left(hub)


def test_garbage_is_refused(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 300)

    with pytest.raises(CannotUnderstand):
        ingest_part10(hub, junk, sender)
    _assert_nothing_left(hub)


def test_missing_study_uid_is_refused(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    [path] = make_study(tmp_path, count=1)
    ds = dcmread(path)
    del ds.StudyInstanceUID
    ds.save_as(path, enforce_file_format=True)

    with pytest.raises(CannotUnderstand, match="StudyInstanceUID"):
        ingest_part10(hub, path, sender)
    _assert_nothing_left(hub)


def test_sop_class_disagreeing_with_transport_is_refused(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    [path] = make_study(tmp_path, count=1)

    with pytest.raises(SOPClassMismatch) as info:
        ingest_part10(hub, path, sender, expected_sop_class_uid=MRImageStorage)

    assert info.value.status == 0xA900
    _assert_nothing_left(hub)


def test_blob_store_failure_is_out_of_resources(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    [path] = make_study(tmp_path / "in", count=1)
    not_a_dir = tmp_path / "occupied"
    not_a_dir.write_text("a file where the blob directory should be")
    hub.blobs = LocalBlobStore(not_a_dir)

    with pytest.raises(OutOfResources) as info:
        ingest_part10(hub, path, sender)

    assert info.value.status == 0xA700
    assert all(n == 0 for n in row_counts(hub).values())


def test_awkward_header_values_are_stored_on_every_database(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    [path] = make_study(tmp_path / "in", count=1)
    ds = dcmread(path)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Ωμέγα^" + "Ä" * 60  # multi-byte UTF-8, long
    ds.PatientID = "ID\x00WITH\x00NUL"
    ds.StudyDescription = "x" * 200  # longer than the column: cut, not refused
    odd = tmp_path / "odd.dcm"
    ds.save_as(odd, enforce_file_format=True)

    result = ingest_part10(hub, odd, sender)

    assert result.outcome is Outcome.STORED
    with hub.sessions() as session:
        patient = session.scalars(select(Patient)).one()
    assert patient.patient_id == "IDWITHNUL"
    assert patient.name_sealed
    assert open_value(hub.keyring, patient.name_sealed, context="patient.name").startswith("Ωμέγα^")
