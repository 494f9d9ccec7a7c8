"""Key rotation: new KEK, every data key and sealed field re-wrapped, content never touched."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from saf.blobstore.local import LocalBlobStore
from saf.crypto import IntegrityError, KeyRing, open_value, value_key_id
from saf.export import export_study
from saf.hub import Hub
from saf.identity import SYSTEM
from saf.ingest import ingest_part10
from saf.keys import blobs_per_key, rotate
from saf.models import Blob, Instance, Patient
from tests.factories import (
    TEST_PATIENT_NAME,
    dataset_sha256,
    make_clinic,
    make_study,
    sop_instance_uid,
)


def _blob_files(hub: Hub) -> dict[str, bytes]:
    """Every object file of the local blob store, by path relative to its root."""
    root = hub.settings.blob_dir
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _headers(hub: Hub) -> dict[str, tuple[str, bytes]]:
    with hub.sessions() as session:
        return {b.id: (b.key_id, b.header) for b in session.scalars(select(Blob))}


def _sealed_patient(hub: Hub) -> Patient:
    with hub.sessions() as session:
        return session.scalars(select(Patient)).one()


def _ingest_study(hub: Hub, tmp_path: Path, count: int = 3) -> tuple[list[Path], str]:
    sender = make_clinic(hub)
    paths = make_study(tmp_path / "in", count=count, patient_name=TEST_PATIENT_NAME)
    results = [ingest_part10(hub, p, sender) for p in paths]
    return paths, results[0].study_instance_uid


def _exported_digests(hub: Hub, study_uid: str, out: Path) -> dict[str, str]:
    files = export_study(hub, study_uid, out, who=SYSTEM)
    return {f.sop_instance_uid: dataset_sha256(f.path) for f in files}


def test_rotation_rewraps_keys_and_leaves_content_untouched(hub: Hub, tmp_path: Path) -> None:
    paths, study_uid = _ingest_study(hub, tmp_path)
    source = {sop_instance_uid(p): dataset_sha256(p) for p in paths}
    first_key = hub.keyring.active_key_id
    objects_before, headers_before = _blob_files(hub), _headers(hub)
    assert len(objects_before) == len(paths)
    assert {key_id for key_id, _ in headers_before.values()} == {first_key}

    report = rotate(hub)

    second_key = report.new_key_id
    assert second_key != first_key
    assert hub.keyring.active_key_id == second_key
    assert (report.blobs_rewrapped, report.fields_resealed) == (3, 2)  # name and birth date
    headers_after = _headers(hub)
    assert {key_id for key_id, _ in headers_after.values()} == {second_key}
    assert all(headers_after[i][1] != headers_before[i][1] for i in headers_before)
    assert _blob_files(hub) == objects_before, "rotation must not rewrite blob content"
    assert blobs_per_key(hub) == {second_key: 3}
    assert _exported_digests(hub, study_uid, tmp_path / "out1") == source
    patient = _sealed_patient(hub)
    assert patient.name_sealed is not None and patient.birth_date_sealed is not None
    assert value_key_id(patient.name_sealed) == second_key
    assert value_key_id(patient.birth_date_sealed) == second_key
    assert open_value(hub.keyring, patient.name_sealed, context="patient.name") == (
        TEST_PATIENT_NAME
    )

    third_key = rotate(hub).new_key_id

    assert len({first_key, second_key, third_key}) == 3
    assert hub.keyring.active_key_id == third_key
    on_disk = KeyRing.load(hub.keyring.path)
    assert on_disk.key_ids == [first_key, second_key, third_key]
    assert on_disk.active_key_id == third_key
    assert blobs_per_key(hub) == {third_key: 3}
    assert _blob_files(hub) == objects_before
    assert _exported_digests(hub, study_uid, tmp_path / "out2") == source
    patient = _sealed_patient(hub)
    assert patient.name_sealed is not None
    assert open_value(hub.keyring, patient.name_sealed, context="patient.name") == (
        TEST_PATIENT_NAME
    )


def test_rotation_with_nothing_stored(hub: Hub) -> None:
    report = rotate(hub)

    assert (report.blobs_rewrapped, report.fields_resealed) == (0, 0)
    assert hub.keyring.active_key_id == report.new_key_id
    assert len(hub.keyring.key_ids) == 2
    assert blobs_per_key(hub) == {}


def test_tampered_blob_fails_export_and_leaves_no_partial_file(hub: Hub, tmp_path: Path) -> None:
    paths, study_uid = _ingest_study(hub, tmp_path)
    source = {sop_instance_uid(p): dataset_sha256(p) for p in paths}
    victim_uid = sop_instance_uid(paths[1])
    with hub.sessions() as session:
        blob_id = session.scalars(
            select(Instance.blob_id).where(Instance.sop_instance_uid == victim_uid)
        ).one()
    assert isinstance(hub.blobs, LocalBlobStore)
    object_file = hub.blobs.path_for(blob_id)
    sealed = bytearray(object_file.read_bytes())
    sealed[len(sealed) // 2] ^= 0x01
    object_file.write_bytes(bytes(sealed))
    out = tmp_path / "out"

    with pytest.raises(IntegrityError):
        export_study(hub, study_uid, out, who=SYSTEM)

    written = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in written if p.name == f"{victim_uid}.dcm"]
    assert not [p for p in written if p.suffix != ".dcm"], f"temp files left: {written}"
    for path in written:  # instances exported before the bad one are whole and verified
        assert dataset_sha256(path) == source[path.stem]


def test_rotation_reseals_instance_metadata_rows(hub: Hub, tmp_path: Path) -> None:
    """Each instance's sealed DICOM JSON moves to the new key and reads the same."""
    from saf import instance_metadata
    from saf.models import InstanceMetadata, Study
    from saf.thumbnails import make_study_thumbnails

    _ingest_study(hub, tmp_path)
    with hub.sessions() as session:
        study_pk = session.scalars(select(Study.id)).one()
        instance_ids = list(session.scalars(select(Instance.id)))
    make_study_thumbnails(hub, study_pk)
    before = instance_metadata.load(hub, instance_ids)
    first_key = hub.keyring.active_key_id

    report = rotate(hub)

    with hub.sessions() as session:
        rows = list(session.scalars(select(InstanceMetadata)))
    assert len(before) == len(rows) == 3
    assert report.fields_resealed == 2 + 3  # patient name and birth date, three rows
    assert {r.key_id for r in rows} == {report.new_key_id} != {first_key}
    assert instance_metadata.load(hub, instance_ids) == before
    assert rotate(hub).fields_resealed == 2 + 3  # and again under the next key
    assert instance_metadata.load(hub, instance_ids) == before
