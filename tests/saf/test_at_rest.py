"""Nothing saf keeps at rest holds plaintext: not the index, its WAL, the spool, or the blobs."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from saf.hub import Hub
from saf.models import Study
from saf.settings import Settings
from saf.stats import collect
from saf.thumbnails import make_study_thumbnails
from tests.factories import TEST_PATIENT_NAME, make_clinic, make_study, running_node

NEEDLE_SIZE = 64
"""Bytes of pixel data searched for: long enough that a chance match is impossible."""


@pytest.fixture(autouse=True)
def _node_side_effects(monkeypatch: pytest.MonkeyPatch) -> None:
    # Send files byte for byte; and undo the node pointing tempfile at its spool dir.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)


def _needles(path: Path) -> dict[str, bytes]:
    """The patient name and a window from the middle of the pixel data, as the file has them."""
    pixels = bytes(dcmread(path).PixelData)
    middle = len(pixels) // 2
    window = pixels[middle : middle + NEEDLE_SIZE]
    assert len(set(window)) > 8, "pixel window too uniform to be a meaningful needle"
    needles = {"patient name": TEST_PATIENT_NAME.split("^")[0].encode(), "pixel data": window}
    data = path.read_bytes()
    for what, needle in needles.items():  # the search must be able to find them at all
        assert needle in data, f"{what} not found in the source file: the search is broken"
    return needles


def _files_under(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())


def _assert_no_needle(where: str, data: bytes, needles: dict[str, bytes]) -> None:
    for what, needle in needles.items():
        assert needle not in data, f"plaintext {what} found at rest in {where}"


def _assert_data_dir_clean(data_dir: Path, needles: dict[str, bytes]) -> list[str]:
    names = []
    for path in _files_under(data_dir):
        _assert_no_needle(str(path), path.read_bytes(), needles)
        names.append(path.name)
    return names


def _c_store(port: int, paths: list[Path]) -> None:
    ae = AE(ae_title="MODALITY_A")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="SAF")
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(p) for p in paths]
    finally:
        assoc.release()
    assert [s.Status for s in statuses] == [0x0000] * len(paths)


def _ingest_over_dicom(hub: Hub, paths: list[Path]) -> None:
    make_clinic(hub, aet="MODALITY_A")
    with running_node(hub) as (_, port):
        _c_store(port, paths)
    assert collect(hub)["instances"] == len(paths)


def test_local_store_keeps_no_plaintext(tmp_path: Path) -> None:
    paths = make_study(tmp_path / "in", count=3, size=128, patient_name=TEST_PATIENT_NAME)
    needles = _needles(paths[0])
    settings = Settings(data_dir=tmp_path / "data", dicom_host="127.0.0.1", dicom_port=0)
    hub = Hub.open(settings, create=True)
    try:
        _ingest_over_dicom(hub, paths)

        # While open, recent commits sit in the SQLite write-ahead log.
        names = _assert_data_dir_clean(settings.data_dir, needles)
        assert {"index.db", "index.db-wal", "keyring.json"} <= set(names), names
        assert len(list(hub.blobs.iter_ids())) == len(paths)
        # The study completes: each instance's DICOM JSON (patient name and all) goes
        # into the index, sealed.
        with hub.sessions() as session:
            study_pk = session.scalars(select(Study.id)).one()
        assert make_study_thumbnails(hub, study_pk).metadata == len(paths)
        _assert_data_dir_clean(settings.data_dir, needles)
    finally:
        hub.close()
    _assert_data_dir_clean(settings.data_dir, needles)  # after the WAL is checkpointed


def test_s3_store_keeps_no_plaintext(tmp_path: Path, moto_s3_endpoint: str) -> None:
    paths = make_study(tmp_path / "in", count=3, size=128, patient_name=TEST_PATIENT_NAME)
    needles = _needles(paths[0])
    bucket = f"saf-at-rest-{secrets.token_hex(4)}"
    settings = Settings(
        data_dir=tmp_path / "data",
        blob_backend="s3",
        s3_bucket=bucket,
        s3_endpoint_url=moto_s3_endpoint,
        dicom_host="127.0.0.1",
        dicom_port=0,
    )
    hub = Hub.open(settings, create=True)
    try:
        _ingest_over_dicom(hub, paths)
        _assert_data_dir_clean(settings.data_dir, needles)
    finally:
        hub.close()

    s3 = boto3.client("s3", endpoint_url=moto_s3_endpoint)
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for obj in page.get("Contents", [])
    ]
    assert len(keys) == len(paths), keys
    for key in keys:
        _assert_no_needle(f"s3://{bucket}/{key}", key.encode(), needles)
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        _assert_no_needle(f"s3://{bucket}/{key}", body, needles)
    assert not settings.blob_dir.exists(), "S3 backend wrote blobs to the local data dir"
