"""Thumbnails: one per instance and per series, sealed, idempotent, placeholders for bad images."""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import pytest
from PIL import Image
from pydicom import dcmread
from sqlalchemy import select

from saf.hub import Hub
from saf.ingest import Sender, ingest_part10
from saf.models import Instance, Series, Study, Thumbnail
from saf.render import render
from saf.thumbnails import (
    INSTANCE_SIZE,
    SERIES_SIZE,
    VERIFICATION_FAILED,
    ThumbnailReport,
    make_study_thumbnails,
    thumbnail_bytes,
)
from tests.factories import make_clinic, make_study, row_counts, sop_instance_uid, stored_blob_ids

SOI = b"\xff\xd8\xff"


def _ingest(hub: Hub, paths: list[Path], sender: Sender | None = None) -> str:
    """Ingest the files (for a new clinic by default); returns the (single) study's key."""
    sender = sender or make_clinic(hub)
    for path in paths:
        ingest_part10(hub, path, sender)
    with hub.sessions() as session:
        return session.scalars(select(Study.id)).one()


def _thumbnails(hub: Hub) -> list[Thumbnail]:
    with hub.sessions() as session:
        return list(session.scalars(select(Thumbnail)))


def _instance_id(hub: Hub, path: Path) -> str:
    """Id of the newest stored version of the file's SOP instance."""
    uid = sop_instance_uid(path)
    with hub.sessions() as session:
        query = select(Instance.id).where(Instance.sop_instance_uid == uid)
        return session.scalars(query.order_by(Instance.version.desc())).first() or ""


def _open_jpeg(data: bytes | None, size: int) -> Image.Image:
    assert data is not None
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    assert max(image.size) == size
    return image


def test_ct_study_gets_instance_and_series_thumbnails(hub: Hub, tmp_path: Path) -> None:
    paths = make_study(tmp_path, "ct", count=3, size=64)
    study_id = _ingest(hub, paths)

    report = make_study_thumbnails(hub, study_id)

    assert report == ThumbnailReport(made=4, skipped=0, placeholders=0, metadata=3)
    thumbs = _thumbnails(hub)
    assert sorted(t.size for t in thumbs) == [INSTANCE_SIZE] * 3 + [SERIES_SIZE]
    assert all(t.media_type == "image/jpeg" and not t.placeholder for t in thumbs)
    for path in paths:
        data = thumbnail_bytes(hub, instance_id=_instance_id(hub, path), size=INSTANCE_SIZE)
        _open_jpeg(data, INSTANCE_SIZE)
    with hub.sessions() as session:
        series_pk = session.scalars(select(Series.id)).one()
    series_jpeg = thumbnail_bytes(hub, series_pk=series_pk, size=SERIES_SIZE)
    _open_jpeg(series_jpeg, SERIES_SIZE)
    by_number = sorted(paths, key=lambda p: int(dcmread(p).InstanceNumber))
    assert series_jpeg == render(dcmread(by_number[1]), size=SERIES_SIZE)
    assert series_jpeg != render(dcmread(by_number[0]), size=SERIES_SIZE)


def test_thumbnail_bytes_none_when_missing_and_needs_one_owner(hub: Hub) -> None:
    assert thumbnail_bytes(hub, instance_id="0" * 32, size=INSTANCE_SIZE) is None
    with pytest.raises(ValueError):
        thumbnail_bytes(hub, size=INSTANCE_SIZE)
    with pytest.raises(ValueError):
        thumbnail_bytes(hub, instance_id="a", series_pk="b", size=INSTANCE_SIZE)


def test_second_run_writes_nothing(hub: Hub, tmp_path: Path) -> None:
    study_id = _ingest(hub, make_study(tmp_path, "ct", count=3, size=64))
    make_study_thumbnails(hub, study_id)
    counts, blobs, thumbs = row_counts(hub), stored_blob_ids(hub), len(_thumbnails(hub))

    report = make_study_thumbnails(hub, study_id)

    assert report == ThumbnailReport(made=0, skipped=4, placeholders=0)
    assert row_counts(hub) == counts
    assert stored_blob_ids(hub) == blobs
    assert len(_thumbnails(hub)) == thumbs


def test_concurrent_runs_make_each_thumbnail_once(hub: Hub, tmp_path: Path) -> None:
    study_id = _ingest(hub, make_study(tmp_path, "ct", count=6, size=64))
    instance_blobs = stored_blob_ids(hub)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            make_study_thumbnails(hub, study_id)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    workers = [threading.Thread(target=run) for _ in range(3)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=60)

    assert errors == []
    assert len(_thumbnails(hub)) == 7  # 6 instances + 1 series, whoever won each race
    assert len(stored_blob_ids(hub) - instance_blobs) == 7  # losers removed their blobs


@pytest.mark.parametrize("kind", ["us", "photo", "ct-j2k", "ct-rle"])
def test_other_kinds_render(hub: Hub, tmp_path: Path, kind: str) -> None:
    count = 5 if kind == "us" else 1  # frames of the one multi-frame US instance
    paths = make_study(tmp_path, kind, count=count, size=64)
    study_id = _ingest(hub, paths)

    report = make_study_thumbnails(hub, study_id)

    assert report == ThumbnailReport(
        made=len(paths) + 1, skipped=0, placeholders=0, metadata=len(paths)
    )
    for path in paths:
        data = thumbnail_bytes(hub, instance_id=_instance_id(hub, path), size=INSTANCE_SIZE)
        image = _open_jpeg(data, INSTANCE_SIZE)
        if kind in ("us", "photo"):
            assert image.mode == "RGB"
            assert data == render(dcmread(path), size=INSTANCE_SIZE)  # middle frame for US


def _corrupt_j2k(path: Path, out: Path) -> Path:
    """A copy of a JPEG 2000 file with its codestream zeroed after the SOC/SIZ start,
    lengths kept: still well-formed DICOM, but the image cannot be decoded."""
    data = bytearray(path.read_bytes())
    start = data.index(b"\xff\x4f\xff\x51")  # SOC + SIZ: the fragment's first bytes
    length = int.from_bytes(data[start - 4 : start], "little")
    data[start + 4 : start + length - 2] = bytes(length - 6)
    out.write_bytes(bytes(data))
    return out


def test_undecodable_instance_gets_placeholder(
    hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = make_study(tmp_path / "study", "ct-j2k", count=3, size=64)
    by_number = sorted(paths, key=lambda p: int(dcmread(p).InstanceNumber))
    sender = make_clinic(hub)
    study_id = _ingest(hub, paths, sender)
    # Received again with a broken codestream: only the newest version is thumbnailed.
    bad = _corrupt_j2k(by_number[0], tmp_path / "bad.dcm")
    assert ingest_part10(hub, bad, sender).version == 2
    bad_id = _instance_id(hub, bad)

    with caplog.at_level(logging.WARNING, logger="saf.thumbnails"):
        report = make_study_thumbnails(hub, study_id)

    assert report == ThumbnailReport(made=4, skipped=0, placeholders=1, metadata=3)
    by_instance = {t.instance_id: t for t in _thumbnails(hub) if t.instance_id}
    assert len(by_instance) == 3
    assert by_instance[bad_id].placeholder
    assert by_instance[bad_id].reason
    assert bad_id in caplog.text
    assert [t.placeholder for i, t in by_instance.items() if i != bad_id] == [False, False]
    placeholder = thumbnail_bytes(hub, instance_id=bad_id, size=INSTANCE_SIZE)
    _open_jpeg(placeholder, INSTANCE_SIZE)


def test_tampered_blob_gets_verification_placeholder(
    hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = make_study(tmp_path, "ct", count=3, size=64)
    study_id = _ingest(hub, paths)
    by_number = sorted(paths, key=lambda p: int(dcmread(p).InstanceNumber))
    tampered_id = _instance_id(hub, by_number[2])
    with hub.sessions() as session:
        blob_id = session.scalars(select(Instance.blob_id).where(Instance.id == tampered_id)).one()
    object_path = hub.blobs.path_for(blob_id)  # type: ignore[attr-defined]
    sealed = bytearray(object_path.read_bytes())
    sealed[len(sealed) // 2] ^= 0x01
    object_path.write_bytes(bytes(sealed))

    with caplog.at_level(logging.WARNING, logger="saf.thumbnails"):
        report = make_study_thumbnails(hub, study_id)

    assert report == ThumbnailReport(made=4, skipped=0, placeholders=1, metadata=2)
    by_instance = {t.instance_id: t for t in _thumbnails(hub) if t.instance_id}
    assert by_instance[tampered_id].placeholder
    assert by_instance[tampered_id].reason == VERIFICATION_FAILED
    assert sum(t.placeholder for t in by_instance.values()) == 1
    assert any(r.levelname == "ERROR" and tampered_id in r.getMessage() for r in caplog.records)
    series = [t for t in _thumbnails(hub) if t.series_pk]
    assert len(series) == 1 and not series[0].placeholder  # the middle instance is intact


def test_thumbnails_are_sealed(hub: Hub, tmp_path: Path) -> None:
    study_id = _ingest(hub, make_study(tmp_path, "ct", count=3, size=64))
    make_study_thumbnails(hub, study_id)

    thumbs = _thumbnails(hub)
    assert len(thumbs) == 4
    for thumb in thumbs:
        stored = hub.blobs.path_for(thumb.blob_id).read_bytes()  # type: ignore[attr-defined]
        assert not stored.startswith(SOI)
        assert b"JFIF" not in stored
        plain = thumbnail_bytes(
            hub, instance_id=thumb.instance_id, series_pk=thumb.series_pk, size=thumb.size
        )
        assert plain is not None and plain.startswith(SOI)


def test_large_instances_spool_to_disk(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("saf.thumbnails.IN_MEMORY_MAX", 0)
    study_id = _ingest(hub, make_study(tmp_path, "ct", count=3, size=64))

    report = make_study_thumbnails(hub, study_id)

    assert report == ThumbnailReport(made=4, skipped=0, placeholders=0, metadata=3)
    assert list(hub.settings.spool_dir.iterdir()) == []
