"""De-identification per destination: PS3.15 Basic Profile through dicognito, keyed by the
hub's secret, deterministic per destination, and honest about what it cannot do."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from pydicom import dcmread

from saf.deidentify import (
    KEY_FILENAME,
    METHOD,
    Deidentifier,
    DeidentifyError,
    destination_seed,
    hub_secret,
)
from tests.factories import TEST_PATIENT_NAME, make_study
from tests.saf.store_scp import make_reply_sr


def _ct(tmp_path: Path, count: int = 2) -> list[Path]:
    return make_study(tmp_path / "ct", "ct", count=count, size=16,
                      patient_name=TEST_PATIENT_NAME, patient_id="PID-1",
                      accession_number="A-9")  # fmt: skip


def _days(da: str) -> int:
    return date.fromisoformat(f"{da[:4]}-{da[4:6]}-{da[6:8]}").toordinal()


def test_secret_is_created_once_private_and_kept(tmp_path: Path) -> None:
    secret = hub_secret(tmp_path / "data")
    path = tmp_path / "data" / KEY_FILENAME
    assert len(secret) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert hub_secret(tmp_path / "data") == secret
    assert list((tmp_path / "data").iterdir()) == [path]  # no temp file left behind
    path.write_bytes(b"short")
    with pytest.raises(DeidentifyError, match="damaged"):
        hub_secret(tmp_path / "data")


def test_seed_is_per_destination_and_per_hub() -> None:
    a, b = b"a" * 32, b"b" * 32
    assert destination_seed(a, "dicom://X@h:104") == destination_seed(a, "dicom://X@h:104")
    assert destination_seed(a, "dicom://X@h:104") != destination_seed(a, "dicom://Y@h:104")
    assert destination_seed(a, "dicom://X@h:104") != destination_seed(b, "dicom://X@h:104")


def test_basic_profile_replaces_identity_and_keeps_the_study_together(tmp_path: Path) -> None:
    paths = _ct(tmp_path)
    ds = dcmread(paths[0])
    ds.PatientComments = "lives at the old mill"
    ds.StudyDescription = "CT CHEST for " + TEST_PATIENT_NAME
    ds.add_new(0x00091010, "LO", "private vendor note")
    ds.PatientSex, ds.PatientAge = "F", "044Y"
    ds.save_as(paths[0])
    original = [dcmread(p) for p in paths]
    deid = Deidentifier(destination_seed(b"k" * 32, "dicom://R@h:104"))
    out = [tmp_path / f"o{i}.dcm" for i in range(len(paths))]
    uids = [deid.file(p, o) for p, o in zip(paths, out, strict=True)]
    got = [dcmread(o) for o in out]
    for before, after, uid in zip(original, got, uids, strict=True):
        assert uid == after.SOPInstanceUID != before.SOPInstanceUID
        assert after.file_meta.MediaStorageSOPInstanceUID == uid
        assert after.SOPClassUID == before.SOPClassUID  # class and syntax are not identity
        assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
        assert str(after.PatientName) != TEST_PATIENT_NAME and after.PatientID != "PID-1"
        assert after.AccessionNumber != "A-9"
        assert after.StudyDate != before.StudyDate  # shifted, not removed
        assert after.PixelData == before.PixelData
        assert after.PatientIdentityRemoved == "YES" and after.DeidentificationMethod == METHOD
        assert [c.CodeValue for c in after.DeidentificationMethodCodeSequence] == [
            "113100", "113107", "113108"]  # fmt: skip
    assert "PatientComments" not in got[0] and "StudyDescription" not in got[0]
    assert not any(e.tag.is_private for e in got[0])
    assert (got[0].PatientSex, got[0].PatientAge) == ("F", "044Y")  # characteristics kept
    assert got[0].StudyInstanceUID == got[1].StudyInstanceUID  # one study stays one study
    assert got[0].FrameOfReferenceUID == got[1].FrameOfReferenceUID
    assert got[0].PatientID == got[1].PatientID
    # One offset for every date of the destination: intervals (and age) are kept.
    assert _days(got[0].StudyDate) - _days(got[0].PatientBirthDate) == _days(
        original[0].StudyDate
    ) - _days(original[0].PatientBirthDate)


def test_same_destination_same_answer_other_destination_other_answer(tmp_path: Path) -> None:
    [path] = _ct(tmp_path, count=1)
    key = b"k" * 32
    first = Deidentifier(destination_seed(key, "dicom://R@h:104")).file(path, tmp_path / "1")
    again = Deidentifier(destination_seed(key, "dicom://R@h:104")).file(path, tmp_path / "2")
    other = Deidentifier(destination_seed(key, "dicom://S@h:104")).file(path, tmp_path / "3")
    assert first == again != other
    assert dcmread(tmp_path / "1").PatientName == dcmread(tmp_path / "2").PatientName


def test_a_reply_sr_keeps_its_report_and_loses_its_references(tmp_path: Path) -> None:
    paths = _ct(tmp_path)
    sr_path = make_reply_sr(paths, tmp_path / "sr.dcm", "Small nodule, follow up in 6 months.")
    sr = dcmread(sr_path)
    deid = Deidentifier(destination_seed(b"k" * 32, "dicom://R@h:104"))
    deid.file(sr_path, tmp_path / "sr-out.dcm")
    got = dcmread(tmp_path / "sr-out.dcm")
    ct = dcmread(paths[0])
    deid(ct)
    text = got.to_json()
    assert "Small nodule, follow up in 6 months." in text  # the report itself
    assert TEST_PATIENT_NAME not in text and "PID-1" not in text
    assert str(sr.StudyInstanceUID) not in text
    # The SR still points at the images, by the same remapped UIDs the images carry.
    [evidence] = got.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == ct.StudyInstanceUID == got.StudyInstanceUID


def test_burned_in_annotation_is_refused_not_sent_identified(tmp_path: Path) -> None:
    [path] = _ct(tmp_path, count=1)
    ds = dcmread(path)
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(DeidentifyError, match="burned-in annotation"):
        Deidentifier("seed")(ds)
