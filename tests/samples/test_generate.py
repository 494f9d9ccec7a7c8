"""Tests for the synthetic DICOM sample generator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from samples.generate import KINDS, SPECS, _plan, generate_study

REPO = Path(__file__).resolve().parents[2]
SMALL = {"count": 3, "rows": 48, "columns": 64}
TRANSFER_SYNTAX = {
    "ct-jpeg": JPEGBaseline8Bit,
    "ct-j2k": JPEG2000Lossless,
    "ct-jls": JPEGLSLossless,
    "ct-rle": RLELossless,
}
QUERY_ATTRIBUTES = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ReferringPhysicianName",
    "StudyID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "InstanceNumber",
    "SOPClassUID",
    "SOPInstanceUID",
)


def _uids(paths: list[Path]) -> list[tuple[str, str, str]]:
    out = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    return out


def _neighbour_correlation(frame: np.ndarray) -> float:
    """Correlation of an image with itself shifted by one column (noise gives ~0)."""
    gray = frame.astype(np.float64)
    if gray.ndim == 3:
        gray = gray.mean(axis=2)
    return float(np.corrcoef(gray[:, :-1].ravel(), gray[:, 1:].ravel())[0, 1])


def test_kind_names_and_defaults() -> None:
    assert KINDS == (
        "ct",
        "mr",
        "cr",
        "mono1",
        "us",
        "photo",
        "ct-jpeg",
        "ct-j2k",
        "ct-jls",
        "ct-rle",
    )
    ct = SPECS["ct"]
    assert (ct.count, ct.rows, ct.columns) == (100, 512, 512)
    assert SPECS["photo"].photometric == "RGB"
    assert SPECS["mono1"].photometric == "MONOCHROME1"


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_writes_decodable_part10_files(kind: str, tmp_path: Path) -> None:
    paths = generate_study(kind, tmp_path, **SMALL)
    multiframe = SPECS[kind].multiframe
    assert len(paths) == (1 if multiframe else SMALL["count"])
    assert len({p.parent for p in paths}) == 1
    folder = paths[0].parent.name
    for path in paths:
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM"
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAX.get(kind, ExplicitVRLittleEndian)
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == SPECS[kind].sop_class
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for keyword in QUERY_ATTRIBUTES:
            assert keyword in ds, keyword
        assert ds.InstitutionName == "Synthetic Clinic"
        assert str(ds.PatientName) == "SYNTHETIC^PATIENT^0"
        assert ds.PatientID not in folder and "SYNTHETIC" not in folder
        assert not [e.tag for e in ds.iterall() if e.tag.element == 0]
        assert (ds.Rows, ds.Columns) == (SMALL["rows"], SMALL["columns"])
        arr = ds.pixel_array
        if multiframe:
            assert ds.NumberOfFrames == SMALL["count"]
            assert arr.shape[:3] == (SMALL["count"], SMALL["rows"], SMALL["columns"])
            arr = arr[0]
        assert arr.shape[:2] == (SMALL["rows"], SMALL["columns"])
        assert arr.std() > 0
        assert _neighbour_correlation(arr) > 0.5


@pytest.mark.parametrize("kind", ["ct", "ct-j2k", "ct-jls", "ct-rle"])
def test_lossless_kinds_round_trip(kind: str, tmp_path: Path) -> None:
    paths = generate_study(kind, tmp_path, seed=4, **SMALL)
    study = _plan(
        kind,
        seed=4,
        patient_id=None,
        patient_name=None,
        accession_number=None,
        **SMALL,
    )
    for path, expected in zip(paths, SPECS[kind].pixels(study), strict=True):
        ds = pydicom.dcmread(path)
        assert ds.PixelRepresentation == 1
        np.testing.assert_array_equal(ds.pixel_array, expected)


def test_ct_looks_like_a_chest(tmp_path: Path) -> None:
    (path,) = generate_study("ct", tmp_path, count=1, rows=128, columns=128)
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * ds.RescaleSlope + ds.RescaleIntercept
    inside = ds.pixel_array != ds.PixelPaddingValue
    assert (ds.pixel_array == ds.PixelPaddingValue).any()
    assert ((hu < -700) & inside).mean() > 0.2  # air and lungs
    assert ((hu > -150) & (hu < 150)).mean() > 0.1  # soft tissue
    assert (hu > 300).mean() > 0.005  # bone


def test_overrides_and_slice_geometry(tmp_path: Path) -> None:
    paths = generate_study(
        "ct",
        tmp_path,
        count=5,
        rows=32,
        columns=40,
        patient_id="PID-X",
        patient_name="SYNTHETIC^OVERRIDE",
        accession_number="ACC-X",
    )
    headers = [pydicom.dcmread(p) for p in paths]
    assert [ds.InstanceNumber for ds in headers] == [1, 2, 3, 4, 5]
    assert all(ds.pixel_array.shape == (32, 40) for ds in headers)
    z = [float(ds.ImagePositionPatient[2]) for ds in headers]
    assert np.allclose(np.diff(z), float(headers[0].SliceThickness))
    assert [float(ds.SliceLocation) for ds in headers] == z
    assert {ds.PatientID for ds in headers} == {"PID-X"}
    assert {str(ds.PatientName) for ds in headers} == {"SYNTHETIC^OVERRIDE"}
    assert {ds.AccessionNumber for ds in headers} == {"ACC-X"}
    assert len({ds.SOPInstanceUID for ds in headers}) == 5
    assert "PID-X" not in str(paths[0])


def test_multiframe_count_is_frames(tmp_path: Path) -> None:
    (path,) = generate_study("us", tmp_path, count=7, rows=40, columns=56)
    ds = pydicom.dcmread(path)
    assert ds.NumberOfFrames == 7
    assert ds.pixel_array.shape == (7, 40, 56, 3)


def test_uids_and_pixels_are_deterministic_per_seed(tmp_path: Path) -> None:
    first = generate_study("mr", tmp_path / "a", seed=1, **SMALL)
    again = generate_study("mr", tmp_path / "b", seed=1, **SMALL)
    other = generate_study("mr", tmp_path / "c", seed=2, **SMALL)
    assert _uids(first) == _uids(again)
    assert first[0].parent.name == again[0].parent.name
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert not set(sum(_uids(first), ())) & set(sum(_uids(other), ()))
    a = pydicom.dcmread(first[0]).pixel_array
    c = pydicom.dcmread(other[0]).pixel_array
    assert not np.array_equal(a, c)


def test_unknown_kind_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        generate_study("pet", tmp_path)
    with pytest.raises(ValueError, match="positive"):
        generate_study("ct", tmp_path, count=0)


def test_no_binary_samples_committed() -> None:
    package = REPO / "samples"
    offenders = [
        p
        for p in package.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and (p.suffix.lower() == ".dcm" or p.stat().st_size > 1024 * 1024)
    ]
    assert offenders == []


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "samples.generate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_help() -> None:
    result = _run_cli("--help")
    assert result.returncode == 0
    assert "--kind" in result.stdout and "--seed" in result.stdout


def test_cli_writes_requested_kinds(tmp_path: Path) -> None:
    result = _run_cli(
        str(tmp_path),
        "--kind",
        "mr",
        "--kind",
        "ct-jpeg",
        "--seed",
        "3",
        "--count",
        "2",
        "--rows",
        "32",
        "--columns",
        "32",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["mr", "ct-jpeg"]
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 2
    for folder in folders:
        files = sorted(folder.glob("*.dcm"))
        assert len(files) == 2
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert any(ds.StudyInstanceUID in line for line in lines)
        assert str(ds.PatientName) == "SYNTHETIC^PATIENT^3"
