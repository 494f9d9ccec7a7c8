"""WADO-RS metadata from the index (table instance_metadata) and the bulk data it points
to: rows made when a study completes, made on demand when missing, sealed, dropped with a
superseded version; bulkdata by tag path with byte ranges; tenancy and audit."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import select

from saf.app import create_app
from saf.hub import Hub
from saf.ingest import Sender, ingest_part10
from saf.models import AuditRecord, InstanceMetadata
from saf.thumbnails import make_study_thumbnails
from tests.factories import login_as, make_clinic, make_study

BASE_URL = "http://testserver/dicomweb"


@dataclass
class Site:
    client: TestClient
    a: dict[str, str]
    b: dict[str, str]
    ct: list[Path]
    """Clinic A's CT (4 slices)."""
    b_ct: list[Path]
    """Clinic B's CT (2 slices)."""
    sender_a: Sender


@pytest.fixture
def site(hub: Hub, tmp_path: Path) -> Iterator[Site]:
    sender_a = make_clinic(hub, "Clinic A", "MODALITY_A")
    sender_b = make_clinic(hub, "Clinic B", "MODALITY_B")
    ct = make_study(tmp_path / "a", "ct", count=4, seed=11, patient_name="ALPHA^ANNA")
    b_ct = make_study(tmp_path / "b", "ct", count=2, seed=12, patient_name="BRAVO^BERT")
    for path in ct:
        ingest_part10(hub, path, sender_a)
    for path in b_ct:
        ingest_part10(hub, path, sender_b)
    with TestClient(create_app(hub)) as client:
        a = login_as(client, "clinician", username="anna", clinic="Clinic A")
        b = login_as(client, "clinician", username="bert", clinic="Clinic B")
        yield Site(client, a, b, ct, b_ct, sender_a)


def uids(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def expected_json(path: Path) -> dict[str, Any]:
    """pydicom's JSON of the file, bulk values as the hub's URIs, plus the served syntax."""
    study, series, sop = uids(path)
    prefix = f"{BASE_URL}/studies/{study}/series/{series}/instances/{sop}/bulkdata/"
    ds = dcmread(path)
    item = ds.to_json_dict(
        bulk_data_threshold=1024, bulk_data_element_handler=lambda e: f"{prefix}{e.tag:08X}"
    )
    item["00083002"] = {"vr": "UI", "Value": [str(ds.file_meta.TransferSyntaxUID)]}
    return item


def study_id(hub: Hub, path: Path) -> str:
    from saf.models import Study

    with hub.sessions() as session:
        return session.scalars(
            select(Study.id).where(Study.study_instance_uid == uids(path)[0])
        ).one()


@dataclass(frozen=True)
class Row:
    format: int
    key_id: str
    sealed: bytes


def metadata_rows(hub: Hub) -> dict[str, Row]:
    with hub.sessions() as session:
        return {
            r.instance_id: Row(r.format, r.key_id, r.sealed)
            for r in session.scalars(select(InstanceMetadata))
        }


def by_sop(body: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["00080018"]["Value"][0]: item for item in body}


def test_study_completion_makes_sealed_rows_and_metadata_reads_no_blob(
    site: Site, hub: Hub
) -> None:
    report = make_study_thumbnails(hub, study_id(hub, site.ct[0]))
    rows = metadata_rows(hub)
    again = make_study_thumbnails(hub, study_id(hub, site.ct[0]))
    # Every object file goes: only the index can answer now.
    for blob_file in hub.settings.blob_dir.rglob("*"):
        if blob_file.is_file():
            blob_file.unlink()
    study = uids(site.ct[0])[0]

    response = site.client.get(f"/dicomweb/studies/{study}/metadata", headers=site.a)

    assert report.metadata == 4 and again.metadata == 0
    assert len(rows) == 4
    for row in rows.values():
        assert row.key_id == hub.keyring.active_key_id
        assert b"ALPHA" not in row.sealed
        with pytest.raises(zlib.error):
            zlib.decompress(row.sealed)  # sealed, not merely compressed
    assert response.status_code == 200
    body = by_sop(response.json())
    assert body == {uids(p)[2]: expected_json(p) for p in site.ct}


def test_missing_rows_are_made_by_the_first_request(site: Site, hub: Hub) -> None:
    study, series, sop = uids(site.ct[0])
    assert metadata_rows(hub) == {}

    instance = site.client.get(
        f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata", headers=site.a
    )
    after_one = set(metadata_rows(hub))
    whole = site.client.get(f"/dicomweb/studies/{study}/metadata", headers=site.a)
    after_study = metadata_rows(hub)
    again = site.client.get(f"/dicomweb/studies/{study}/metadata", headers=site.a)
    series_level = site.client.get(
        f"/dicomweb/studies/{study}/series/{series}/metadata", headers=site.a
    )

    assert instance.json() == [expected_json(site.ct[0])]
    assert len(after_one) == 1 and len(after_study) == 4 and after_one < set(after_study)
    assert by_sop(whole.json()) == {uids(p)[2]: expected_json(p) for p in site.ct}
    assert again.content == whole.content
    assert series_level.content == whole.content  # one series
    assert metadata_rows(hub) == after_study  # served from the rows, none made again


def test_a_row_of_an_older_format_is_made_again(site: Site, hub: Hub) -> None:
    from saf import instance_metadata

    study = uids(site.ct[0])[0]
    make_study_thumbnails(hub, study_id(hub, site.ct[0]))
    with hub.engine.begin() as conn:
        conn.execute(
            InstanceMetadata.__table__.update().values(format=instance_metadata.FORMAT - 1)
        )

    response = site.client.get(f"/dicomweb/studies/{study}/metadata", headers=site.a)

    assert by_sop(response.json()) == {uids(p)[2]: expected_json(p) for p in site.ct}
    assert {r.format for r in metadata_rows(hub).values()} == {instance_metadata.FORMAT}


def test_a_new_version_replaces_the_row(site: Site, hub: Hub, tmp_path: Path) -> None:
    study, series, sop = uids(site.ct[0])
    url = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata"
    first = site.client.get(url, headers=site.a).json()
    ds = dcmread(site.ct[0])
    ds.ImageComments = "corrected"
    corrected = tmp_path / "corrected.dcm"
    ds.save_as(corrected, enforce_file_format=True)
    old_ids = set(metadata_rows(hub))

    ingest_part10(hub, corrected, site.sender_a)
    gone = old_ids - set(metadata_rows(hub))
    second = site.client.get(url, headers=site.a).json()

    assert len(gone) == 1  # the superseded version's row went with it
    assert "00204000" not in first[0]
    assert second == [expected_json(corrected)]


def test_another_clinic_gets_404_for_metadata_and_bulk_data(site: Site, hub: Hub) -> None:
    study, series, sop = uids(site.b_ct[0])
    make_study_thumbnails(hub, study_id(hub, site.b_ct[0]))  # B's rows exist
    instance = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"
    paths = [
        f"/dicomweb/studies/{study}/metadata",
        f"/dicomweb/studies/{study}/series/{series}/metadata",
        f"{instance}/metadata",
        f"{instance}/bulkdata/7FE00010",
    ]
    for path in paths:
        hidden = site.client.get(path, headers=site.a)
        missing = site.client.get(path.replace(study, "1.2.3.4"), headers=site.a)
        owner = site.client.get(path, headers=site.b)

        assert hidden.status_code == missing.status_code == 404, path
        assert hidden.content == missing.content, path
        assert owner.status_code == 200, path
    assert "BRAVO" not in site.client.get(paths[0], headers=site.a).text


def test_bulk_data_whole_and_by_range(site: Site, hub: Hub) -> None:
    study, series, sop = uids(site.ct[1])
    pixels = dcmread(site.ct[1]).PixelData
    [item] = site.client.get(
        f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata", headers=site.a
    ).json()
    url = item["7FE00010"]["BulkDataURI"].removeprefix("http://testserver")
    octets = {**site.a, "Accept": "application/octet-stream"}

    multipart = site.client.get(url, headers=site.a)
    bare = site.client.get(url, headers=octets)
    ranged = site.client.get(url, headers={**octets, "Range": "bytes=10-19"})
    suffix = site.client.get(url, headers={**octets, "Range": "bytes=-6"})
    open_ended = site.client.get(url, headers={**octets, "Range": f"bytes={len(pixels) - 3}-"})
    ranged_part = site.client.get(url, headers={**site.a, "Range": "bytes=0-99"})
    beyond = site.client.get(url, headers={**octets, "Range": f"bytes={len(pixels)}-"})
    nothing = site.client.get(url.replace("7FE00010", "00291010"), headers=site.a)
    malformed = site.client.get(url.replace("7FE00010", "zz/1"), headers=site.a)

    assert multipart.status_code == 200
    assert multipart.headers["content-type"].startswith(
        'multipart/related; type="application/octet-stream"'
    )
    assert b"\r\n\r\n" + pixels + b"\r\n--" in multipart.content
    assert bare.status_code == 200 and bare.content == pixels
    assert bare.headers["accept-ranges"] == "bytes"
    assert ranged.status_code == 206 and ranged.content == pixels[10:20]
    assert ranged.headers["content-range"] == f"bytes 10-19/{len(pixels)}"
    assert suffix.content == pixels[-6:] and open_ended.content == pixels[-3:]
    assert ranged_part.status_code == 206
    assert b"\r\n\r\n" + pixels[:100] + b"\r\n--" in ranged_part.content
    assert f"Content-Range: bytes 0-99/{len(pixels)}".encode() in ranged_part.content
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(pixels)}"
    assert nothing.status_code == 404 and malformed.status_code == 404
    with hub.sessions() as session:
        details = list(
            session.scalars(select(AuditRecord.detail).where(AuditRecord.entity_id == sop))
        )
    assert "WADO-RS bulkdata 7FE00010: 1" in details


def test_rows_are_read_in_one_query(site: Site, hub: Hub) -> None:
    """A study's rows come back in one statement, whatever the instance count."""
    from sqlalchemy import event

    make_study_thumbnails(hub, study_id(hub, site.ct[0]))
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(hub.engine, "before_cursor_execute", record)
    try:
        site.client.get(f"/dicomweb/studies/{uids(site.ct[0])[0]}/metadata", headers=site.a)
    finally:
        event.remove(hub.engine, "before_cursor_execute", record)

    reads = [s for s in statements if "FROM instance_metadata" in s]
    assert len(reads) == 1
    assert not [s for s in statements if s.lstrip().upper().startswith("INSERT INTO INSTANCE_META")]


def test_deleting_an_instance_deletes_its_row(site: Site, hub: Hub) -> None:
    """The row goes with its instance (ON DELETE CASCADE), whoever deletes it."""
    from sqlalchemy import delete

    from saf.models import Instance

    study, _, sop = uids(site.ct[0])
    site.client.get(f"/dicomweb/studies/{study}/metadata", headers=site.a)
    with hub.sessions() as session:
        instance_id = session.scalars(
            select(Instance.id).where(Instance.sop_instance_uid == sop)
        ).one()
    assert instance_id in metadata_rows(hub)

    with hub.engine.begin() as conn:
        conn.execute(delete(Instance).where(Instance.id == instance_id))

    assert instance_id not in metadata_rows(hub) and len(metadata_rows(hub)) == 3
    remaining = site.client.get(f"/dicomweb/studies/{study}/metadata", headers=site.a).json()
    assert sop not in by_sop(remaining) and len(remaining) == 3
