"""fsck: missing, corrupt and unindexed blobs are found; a healthy archive passes."""

from __future__ import annotations

from pathlib import Path

from saf.blobstore import new_blob_id
from saf.blobstore.local import LocalBlobStore
from saf.fsck import fsck
from saf.hub import Hub
from saf.ingest import ingest_part10
from tests.factories import make_clinic, make_study


def test_healthy_archive_passes_deep_check(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    for path in make_study(tmp_path, count=3):
        ingest_part10(hub, path, sender)

    report = fsck(hub, deep=True)

    assert report.ok
    assert (report.blobs_indexed, report.blobs_verified) == (3, 3)
    assert report.unindexed == []


def test_finds_missing_corrupt_and_unindexed(hub: Hub, tmp_path: Path) -> None:
    sender = make_clinic(hub)
    results = [ingest_part10(hub, p, sender) for p in make_study(tmp_path, count=3)]
    assert isinstance(hub.blobs, LocalBlobStore)
    blob_ids = sorted(hub.blobs.iter_ids())
    hub.blobs.path_for(blob_ids[0]).unlink()
    damaged = hub.blobs.path_for(blob_ids[1])
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    stray = new_blob_id()
    hub.blobs.put(stray, [b"written, never committed"])

    shallow = fsck(hub)
    deep = fsck(hub, deep=True)

    assert len(results) == 3
    assert shallow.missing == [blob_ids[0]] and shallow.corrupt == []
    assert not shallow.ok
    assert deep.missing == [blob_ids[0]]
    assert [blob for blob, _ in deep.corrupt] == [blob_ids[1]]
    assert "authentication" in deep.corrupt[0][1]
    assert deep.unindexed == [stray]
    assert deep.blobs_verified == 1
