"""DICOMweb under /dicomweb: QIDO-RS matching, WADO-RS retrieve/metadata/frames/rendered,
STOW-RS statuses, tenancy (another clinic's study is a 404), audit, gzip and CORS.

Everything goes through the real app (TestClient) on each database; the route walker in
tests/saf/test_routes_protected.py attacks these routes with every kind of wrong caller.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import RLELossless
from sqlalchemy import select

from saf.app import create_app
from saf.hub import Hub
from saf.ingest import Sender, ingest_part10
from saf.models import AuditRecord
from saf.settings import Settings
from tests.factories import login_as, make_clinic, make_study

VIEWER_ORIGIN = "https://viewer.example.org"
DICOM_MULTIPART = 'multipart/related; type="application/dicom"'


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> Settings:
    """The usual test settings, with a browser viewer allowed to call /dicomweb."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        dicom_host="127.0.0.1",
        dicom_port=0,
        cors_origins=VIEWER_ORIGIN,
    )


@dataclass
class Site:
    client: TestClient
    a: dict[str, str]
    """Clinic A's clinician (Authorization header)."""
    b: dict[str, str]
    ct: list[Path]
    """Clinic A's CT files (3 slices): patient ALPHA^ANNA, PA1."""
    mr: list[Path]
    """Clinic A's MR files (2 slices): patient ALPHA^ALBERT, PA2."""
    b_ct: list[Path]
    """Clinic B's CT (patient BRAVO^BERT)."""
    sender_a: Sender


@pytest.fixture
def site(hub: Hub, tmp_path: Path) -> Iterator[Site]:
    sender_a = make_clinic(hub, "Clinic A", "MODALITY_A")
    sender_b = make_clinic(hub, "Clinic B", "MODALITY_B")
    ct = make_study(
        tmp_path / "ct", "ct", count=3, seed=1, patient_id="PA1", patient_name="ALPHA^ANNA"
    )
    mr = make_study(
        tmp_path / "mr", "mr", count=2, seed=2, patient_id="PA2", patient_name="ALPHA^ALBERT"
    )
    b_ct = make_study(
        tmp_path / "b", "ct", count=2, seed=3, patient_id="PB1", patient_name="BRAVO^BERT"
    )
    for path in [*ct, *mr]:
        ingest_part10(hub, path, sender_a)
    for path in b_ct:
        ingest_part10(hub, path, sender_b)
    with TestClient(create_app(hub)) as client:
        a = login_as(client, "clinician", username="anna", clinic="Clinic A")
        b = login_as(client, "clinician", username="bert", clinic="Clinic B")
        yield Site(client, a, b, ct, mr, b_ct, sender_a)


def uids(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


BASE_URL = "http://testserver/dicomweb"


def pydicom_json(path: Path) -> dict[str, Any]:
    """pydicom's DICOM JSON of a stored file with its bulk values (768+ bytes, Pixel Data
    among them) as the hub's BulkDataURIs, which is what metadata must answer."""
    study, series, sop = uids(path)
    prefix = f"{BASE_URL}/studies/{study}/series/{series}/instances/{sop}/bulkdata/"
    return dcmread(path).to_json_dict(
        bulk_data_threshold=1024, bulk_data_element_handler=lambda e: f"{prefix}{e.tag:08X}"
    )


def forget_metadata(hub: Hub) -> None:
    """Empty the instance_metadata table, so the next request makes the rows from the blobs."""
    from sqlalchemy import delete

    from saf.models import InstanceMetadata

    with hub.engine.begin() as conn:
        conn.execute(delete(InstanceMetadata))


def parts(response: Any) -> list[tuple[str, bytes]]:
    """The (Content-Type, body) of each part of a multipart/related response."""
    match = re.search(r"boundary=\"?([^\";]+)", response.headers["content-type"])
    assert match, response.headers["content-type"]
    delimiter = b"--" + match[1].encode()
    out = []
    for chunk in response.content.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        content_type = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-type")
        )
        out.append((content_type, body[:-2]))
    return out


def stow_body(*files: bytes, boundary: str = "b0undary") -> tuple[bytes, dict[str, str]]:
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n"
        for f in files
    )
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"{DICOM_MULTIPART}; boundary={boundary}"}


# --------------------------------------------------------------------------- QIDO-RS


def test_study_search_sees_only_the_callers_clinic(site: Site) -> None:
    response = site.client.get("/dicomweb/studies", headers=site.a)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom+json"
    found = {value(s, "0020000D") for s in response.json()}
    assert found == {uids(site.ct[0])[0], uids(site.mr[0])[0]}
    ct = next(s for s in response.json() if value(s, "0020000D") == uids(site.ct[0])[0])
    assert value(ct, "00100010") == {"Alphabetic": "ALPHA^ANNA"}
    assert value(ct, "00100020") == "PA1"
    assert ct["00080061"]["Value"] == ["CT"]
    assert value(ct, "00201206") == 1
    assert value(ct, "00201208") == 3
    assert value(ct, "00081190").endswith(f"/dicomweb/studies/{uids(site.ct[0])[0]}")
    assert "BRAVO" not in response.text


MATCHING: list[tuple[dict[str, str], set[str]]] = [
    ({"PatientName": "alpha^anna"}, {"ct"}),
    ({"PatientName": "ALPHA*"}, {"ct", "mr"}),
    ({"PatientName": "albert"}, set()),  # no wildcard: the whole name (PS3.4 C.2.2.2.1)
    ({"PatientName": "*^albert"}, {"mr"}),  # a component, case-insensitive
    ({"PatientName": "alpha^anna^^"}, {"ct"}),  # trailing empty components do not count
    ({"00100010": "*ANN?"}, {"ct"}),
    ({"PatientName": "BRAVO*"}, set()),  # clinic B's patient: as if absent
    ({"PatientID": "PA2"}, {"mr"}),
    ({"PatientID": "PA*"}, {"ct", "mr"}),
    ({"ModalitiesInStudy": "MR"}, {"mr"}),
    ({"ModalitiesInStudy": "CT,US"}, {"ct"}),
    ({"StudyDate": "19000101-"}, {"ct", "mr"}),
    ({"StudyDate": "-19000101"}, set()),
    ({"PatientID": "PA1", "ModalitiesInStudy": "MR"}, set()),
]


def test_study_search_matching(site: Site) -> None:
    studies = {"ct": uids(site.ct[0])[0], "mr": uids(site.mr[0])[0]}

    for query, expected in MATCHING:
        response = site.client.get("/dicomweb/studies", params=query, headers=site.a)

        assert response.status_code == 200, response.text
        found = {value(s, "0020000D") for s in response.json()}
        assert found == {studies[k] for k in expected}, query


def test_study_search_by_uid_list_paging_and_includefield(site: Site) -> None:
    ct_uid, mr_uid = uids(site.ct[0])[0], uids(site.mr[0])[0]
    client = site.client

    both = client.get(f"/dicomweb/studies?StudyInstanceUID={ct_uid},{mr_uid}", headers=site.a)
    first = client.get("/dicomweb/studies?limit=1", headers=site.a)
    second = client.get("/dicomweb/studies?limit=1&offset=1", headers=site.a)
    plain = client.get(f"/dicomweb/studies?StudyInstanceUID={ct_uid}", headers=site.a).json()
    full = client.get(
        f"/dicomweb/studies?StudyInstanceUID={ct_uid}&includefield=all", headers=site.a
    ).json()
    bad = client.get("/dicomweb/studies?StudyDate=last-week", headers=site.a)
    unknown = client.get("/dicomweb/studies?ReferringPhysicianName=X", headers=site.a)

    assert len(both.json()) == 2
    assert len(first.json()) == 1 and len(second.json()) == 1
    assert first.json() != second.json()
    assert "additional results" in first.headers["warning"]
    assert "00081030" not in plain[0] and "00081030" in full[0]
    assert bad.status_code == 400
    assert unknown.status_code == 200 and "not supported" in unknown.headers["warning"]


def test_series_and_instance_search(site: Site) -> None:
    study, series, _ = uids(site.ct[0])

    in_study = site.client.get(f"/dicomweb/studies/{study}/series", headers=site.a).json()
    everywhere = site.client.get("/dicomweb/series?Modality=MR", headers=site.a).json()
    instances = site.client.get(
        f"/dicomweb/studies/{study}/series/{series}/instances", headers=site.a
    ).json()
    one = site.client.get(
        f"/dicomweb/instances?SOPInstanceUID={uids(site.ct[1])[2]}", headers=site.a
    ).json()

    assert [value(s, "0020000E") for s in in_study] == [series]
    assert value(in_study[0], "00201209") == 3
    assert [value(s, "00080060") for s in everywhere] == ["MR"]
    assert value(everywhere[0], "00100020") == "PA2"  # root-level series carry study fields
    assert sorted(value(i, "00080018") for i in instances) == sorted(uids(p)[2] for p in site.ct)
    assert value(instances[0], "00280010") == 64
    assert [value(i, "00080018") for i in one] == [uids(site.ct[1])[2]]
    assert value(one[0], "0020000D") == study


def test_qido_matching_is_c_finds(site: Site) -> None:
    # saf.query matches QIDO-RS as it matches C-FIND: wildcards (case-sensitive but for
    # PatientName), date ranges, UID lists with either separator, relational keys.
    ct_path, mr_path = site.ct[0], site.mr[0]
    ct, mr = uids(ct_path)[0], uids(mr_path)[0]
    ds = dcmread(ct_path, stop_before_pixels=True)
    date, description = str(ds.StudyDate), str(ds.StudyDescription)

    def studies(query: str) -> set[str]:
        response = site.client.get(f"/dicomweb/studies?{query}", headers=site.a)
        assert response.status_code == 200, (query, response.text)
        return {value(s, "0020000D") for s in response.json()}

    assert studies("PatientID=PA?") == {ct, mr}
    assert studies("PatientID=pa*") == set()  # case-sensitive, on both databases
    assert studies(f"StudyDescription={description[:2]}*") >= {ct}
    assert studies(f"StudyDate={date}-{date}") >= {ct}
    assert studies(f"StudyDate={int(date) + 1}-") <= {mr}
    assert studies(f"StudyInstanceUID={ct}\\{mr}") == {ct, mr}
    assert studies(f"0020000D={mr}") == {mr}

    series = site.client.get("/dicomweb/series?PatientName=alpha^albert", headers=site.a)
    images = site.client.get(
        "/dicomweb/instances?Modality=CT&includefield=NumberOfStudyRelatedInstances",
        headers=site.a,
    )
    assert [value(s, "00080060") for s in series.json()] == ["MR"]
    assert len(images.json()) == 3
    assert {value(i, "00201208") for i in images.json()} == {3}
    assert {value(i, "00201209") for i in images.json()} == {3}


def test_qido_refuses_values_it_cannot_match(site: Site) -> None:
    for query in ("StudyDate=2024", "StudyDate=2024-01-01", "SeriesNumber=first"):
        path = "/dicomweb/series" if "Series" in query else "/dicomweb/studies"
        response = site.client.get(f"{path}?{query}", headers=site.a)

        assert response.status_code == 400, query
    below = site.client.get("/dicomweb/studies?Modality=CT", headers=site.a)
    assert below.status_code == 200 and "not a key of Study searches" in below.headers["warning"]
    assert len(below.json()) == 2  # ignored, not matched


@pytest.mark.parametrize("query", ["", "PatientName=ALPHA*"])
def test_qido_pages_through_every_match_once(site: Site, query: str) -> None:
    # Without PatientName the page is cut in SQL; with it, after matching in Python.
    every = site.client.get(f"/dicomweb/instances?{query}", headers=site.a).json()
    pages = [
        site.client.get(f"/dicomweb/instances?{query}&limit=2&offset={n}", headers=site.a)
        for n in range(0, 6, 2)
    ]

    assert len(every) == 5
    assert [i for p in pages for i in p.json()] == every
    in_order = [(value(i, "0020000D"), value(i, "00200013")) for i in every]
    assert len({uid for uid, _ in in_order}) == len(list(groupby(uid for uid, _ in in_order)))
    assert in_order == sorted(in_order, key=lambda k: [uid for uid, _ in in_order].index(k[0]))
    assert ["additional results" in p.headers.get("warning", "") for p in pages] == [
        True,
        True,
        False,
    ]


def test_only_the_newest_version_is_searched_and_served(
    site: Site, hub: Hub, tmp_path: Path
) -> None:
    study, series, sop = uids(site.ct[0])
    ds = dcmread(site.ct[0])
    ds.ImageComments = "corrected"
    corrected = tmp_path / "corrected.dcm"
    ds.save_as(corrected, enforce_file_format=True)
    ingest_part10(hub, corrected, site.sender_a)

    instances = site.client.get(
        f"/dicomweb/studies/{study}/series/{series}/instances", headers=site.a
    ).json()
    retrieved = site.client.get(
        f"/dicomweb/studies/{study}/series/{series}/instances/{sop}", headers=site.a
    )

    assert len(instances) == 3
    [(_, body)] = parts(retrieved)
    assert body == corrected.read_bytes()


def test_nothing_found_is_an_empty_array(site: Site) -> None:
    response = site.client.get("/dicomweb/studies?PatientID=NOBODY", headers=site.a)

    assert response.status_code == 200
    assert response.json() == []


def test_another_clinics_study_answers_like_a_missing_one(site: Site) -> None:
    study_b, series_b, sop_b = uids(site.b_ct[0])
    paths = [
        f"/dicomweb/studies/{study_b}",
        f"/dicomweb/studies/{study_b}/series",
        f"/dicomweb/studies/{study_b}/metadata",
        f"/dicomweb/studies/{study_b}/series/{series_b}/instances/{sop_b}",
        f"/dicomweb/studies/{study_b}/series/{series_b}/instances/{sop_b}/rendered",
    ]
    for path in paths:
        hidden = site.client.get(path, headers=site.a)
        missing = site.client.get(path.replace(study_b, "1.2.3.4"), headers=site.a)
        owner = site.client.get(path, headers=site.b)

        assert hidden.status_code == missing.status_code == 404, path
        assert hidden.content == missing.content, path
        assert owner.status_code == 200, path


# --------------------------------------------------------------------------- WADO-RS


def test_retrieve_returns_the_stored_bytes(site: Site) -> None:
    study, series, sop = uids(site.ct[0])

    instance = site.client.get(
        f"/dicomweb/studies/{study}/series/{series}/instances/{sop}",
        headers={**site.a, "Accept": DICOM_MULTIPART},
    )
    whole = site.client.get(f"/dicomweb/studies/{study}", headers=site.a)

    assert instance.status_code == 200
    assert instance.headers["content-type"].startswith(DICOM_MULTIPART)
    [(content_type, body)] = parts(instance)
    assert body == site.ct[0].read_bytes()
    assert "transfer-syntax=" in content_type
    assert sorted(b for _, b in parts(whole)) == sorted(p.read_bytes() for p in site.ct)
    # The length of the whole body is known before it is sent.
    for response in (instance, whole):
        assert int(response.headers["content-length"]) == len(response.content)
        assert "transfer-encoding" not in response.headers


def test_retrieve_in_another_transfer_syntax_is_not_acceptable(site: Site) -> None:
    study = uids(site.ct[0])[0]
    jpeg = f"{DICOM_MULTIPART}; transfer-syntax=1.2.840.10008.1.2.4.50"

    refused = site.client.get(f"/dicomweb/studies/{study}", headers={**site.a, "Accept": jpeg})
    anything = site.client.get(
        f"/dicomweb/studies/{study}",
        headers={**site.a, "Accept": f"{DICOM_MULTIPART}; transfer-syntax=*"},
    )

    assert refused.status_code == 406
    assert anything.status_code == 200


def test_metadata_is_dicom_json_with_bulk_data_uris_and_gzipped(site: Site) -> None:
    study = uids(site.ct[0])[0]

    response = site.client.get(
        f"/dicomweb/studies/{study}/metadata",
        headers={**site.a, "Accept-Encoding": "gzip"},
    )

    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    body = response.json()  # httpx decodes the gzip
    assert len(body) == 3
    assert value(body[0], "00100010") == {"Alphabetic": "ALPHA^ANNA"}
    assert all(set(item["7FE00010"]) == {"vr", "BulkDataURI"} for item in body)
    assert all(value(item, "00280010") == 64 for item in body)
    assert value(body[0], "00083002") == str(dcmread(site.ct[0]).file_meta.TransferSyntaxUID)
    for path in site.ct:  # the same JSON as pydicom makes, element for element
        [item] = [i for i in body if value(i, "00080018") == uids(path)[2]]
        assert {t: e for t, e in item.items() if t != "00083002"} == pydicom_json(path)
    raw = site.client.get(
        f"/dicomweb/studies/{study}/metadata", headers={**site.a, "Accept-Encoding": "identity"}
    )
    assert "content-encoding" not in raw.headers
    assert json.loads(raw.content) == body


def test_frames_are_the_stored_pixels(site: Site) -> None:
    study, series, sop = uids(site.ct[0])
    url = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/1"

    response = site.client.get(url, headers=site.a)
    too_far = site.client.get(url.replace("frames/1", "frames/2"), headers=site.a)

    assert response.status_code == 200
    assert 'type="application/octet-stream"' in response.headers["content-type"]
    [(_, frame)] = parts(response)
    assert frame == dcmread(site.ct[0]).PixelData
    assert too_far.status_code == 404


def test_rendered_and_thumbnails(site: Site) -> None:
    study, series, sop = uids(site.ct[0])
    base = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"

    jpeg = site.client.get(f"{base}/rendered?window=40,400&quality=90", headers=site.a)
    png = site.client.get(
        f"{base}/rendered?viewport=32,32", headers={**site.a, "Accept": "image/png"}
    )
    thumbs = [
        site.client.get(f"{url}/thumbnail", headers=site.a)
        for url in (
            f"/dicomweb/studies/{study}",
            f"/dicomweb/studies/{study}/series/{series}",
            base,
        )
    ]
    series_rendered = site.client.get(
        f"/dicomweb/studies/{study}/series/{series}/rendered",
        headers={**site.a, "Accept": 'multipart/related; type="image/png"'},
    )
    bad_window = site.client.get(f"{base}/rendered?window=40,-1", headers=site.a)
    wrong_type = site.client.get(
        f"{base}/rendered", headers={**site.a, "Accept": "application/pdf"}
    )

    assert jpeg.status_code == 200 and jpeg.content[:2] == b"\xff\xd8"
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert max(Image.open(io.BytesIO(png.content)).size) == 32
    assert all(t.status_code == 200 and t.content[:2] == b"\xff\xd8" for t in thumbs)
    rendered_parts = parts(series_rendered)
    assert len(rendered_parts) == 3
    assert all(t == "image/png" and b[:4] == b"\x89PNG" for t, b in rendered_parts)
    assert bad_window.status_code == 400
    assert wrong_type.status_code == 406


# --------------------------------------------------------------------------- STOW-RS


def test_stow_stores_and_is_then_found_and_retrieved_identically(
    site: Site, tmp_path: Path, hub: Hub
) -> None:
    files = make_study(tmp_path / "new", "ct", count=2, seed=11, patient_id="PA9")
    body, headers = stow_body(*(p.read_bytes() for p in files))
    study, series, _ = uids(files[0])

    response = site.client.post("/dicomweb/studies", content=body, headers={**site.a, **headers})
    again = site.client.post(
        f"/dicomweb/studies/{study}", content=body, headers={**site.a, **headers}
    )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    referenced = response.json()["00081199"]["Value"]
    assert sorted(value(r, "00081155") for r in referenced) == sorted(uids(p)[2] for p in files)
    assert "00081198" not in response.json()
    assert again.status_code == 200  # the same bytes again: a duplicate, acknowledged
    found = site.client.get(f"/dicomweb/studies?StudyInstanceUID={study}", headers=site.a)
    assert value(found.json()[0], "00201208") == 2
    retrieved = site.client.get(f"/dicomweb/studies/{study}/series/{series}", headers=site.a)
    assert sorted(b for _, b in parts(retrieved)) == sorted(p.read_bytes() for p in files)
    hidden = site.client.get(f"/dicomweb/studies/{study}", headers=site.b)
    assert hidden.status_code == 404
    assert not list(hub.settings.spool_dir.iterdir())  # nothing spooled is left behind
    with hub.sessions() as session:
        created = list(session.scalars(select(AuditRecord).where(AuditRecord.event == "create")))
    assert any(r.outcome == 0 and "2 instance" in (r.detail or "") for r in created)


def test_stow_reports_each_failure(site: Site, tmp_path: Path) -> None:
    [good] = make_study(tmp_path / "good", "ct", count=1, seed=12)
    [other] = make_study(tmp_path / "other", "ct", count=1, seed=13)
    study = uids(good)[0]
    headers_of = {**site.a}

    mixed_body, headers = stow_body(good.read_bytes(), b"this is not DICOM")
    mixed = site.client.post(
        "/dicomweb/studies", content=mixed_body, headers={**headers_of, **headers}
    )
    wrong_study_body, headers = stow_body(other.read_bytes())
    wrong_study = site.client.post(
        f"/dicomweb/studies/{study}", content=wrong_study_body, headers={**headers_of, **headers}
    )

    assert mixed.status_code == 202, mixed.text
    assert len(mixed.json()["00081199"]["Value"]) == 1
    [failure] = mixed.json()["00081198"]["Value"]
    assert value(failure, "00081197") == 0xC000  # ingest's status: cannot understand
    assert wrong_study.status_code == 409
    [failure] = wrong_study.json()["00081198"]["Value"]
    assert value(failure, "00081155") == uids(other)[2]
    assert value(failure, "00081197") == 0xA900


def test_stow_refuses_other_content_and_oversized_bodies(site: Site, hub: Hub) -> None:
    body, headers = stow_body(site.ct[0].read_bytes())

    json_parts = site.client.post(
        "/dicomweb/studies",
        content=body,
        headers={
            **site.a,
            "Content-Type": 'multipart/related; type="application/dicom+json"; boundary=b0undary',
        },
    )
    plain = site.client.post(
        "/dicomweb/studies",
        content=site.ct[0].read_bytes(),
        headers={**site.a, "Content-Type": "application/dicom"},
    )
    hub.settings.stow_max_bytes = 1000
    too_big = site.client.post("/dicomweb/studies", content=body, headers={**site.a, **headers})

    assert json_parts.status_code == 415
    assert plain.status_code == 415
    assert too_big.status_code == 413


# --------------------------------------------------------------------------- CORS


def test_cors_is_for_the_configured_origin_and_dicomweb_only(site: Site) -> None:
    preflight = {
        "Origin": VIEWER_ORIGIN,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }

    allowed = site.client.options("/dicomweb/studies", headers=preflight)
    stranger = site.client.options(
        "/dicomweb/studies", headers={**preflight, "Origin": "https://evil.example"}
    )
    api = site.client.options("/api/cases", headers=preflight)
    simple = site.client.get("/dicomweb/studies", headers={**site.a, "Origin": VIEWER_ORIGIN})

    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == VIEWER_ORIGIN
    assert "access-control-allow-origin" not in stranger.headers
    assert "access-control-allow-origin" not in api.headers
    assert simple.headers["access-control-allow-origin"] == VIEWER_ORIGIN


def test_no_cors_by_default(hub: Hub) -> None:
    hub.settings.cors_origins = ""
    with TestClient(create_app(hub)) as client:
        response = client.options(
            "/dicomweb/studies",
            headers={"Origin": VIEWER_ORIGIN, "Access-Control-Request-Method": "GET"},
        )
    assert "access-control-allow-origin" not in response.headers


def test_searches_and_reads_are_audited(site: Site, hub: Hub) -> None:
    study = uids(site.ct[0])[0]
    site.client.get("/dicomweb/studies", headers=site.a)
    site.client.get(f"/dicomweb/studies/{study}/metadata", headers=site.a)
    site.client.get(f"/dicomweb/studies/{uids(site.b_ct[0])[0]}", headers=site.a)

    with hub.sessions() as session:
        rows = list(session.scalars(select(AuditRecord).where(AuditRecord.actor_name == "anna")))
    searches = [r for r in rows if r.event == "search" and r.entity_type == "Study"]
    reads = [r for r in rows if r.event == "read" and r.outcome == 0]
    refused = [r for r in rows if r.event == "read" and r.outcome == 4]
    assert searches and "2 results" in (searches[0].detail or "")
    assert reads and reads[0].patient_pk and "metadata: 3" in (reads[0].detail or "")
    assert refused and refused[0].entity_id == uids(site.b_ct[0])[0]
    assert all("ALPHA" not in (r.detail or "") for r in rows)


def test_frames_of_compressed_and_multiframe_objects(site: Site, tmp_path: Path) -> None:
    [us] = make_study(tmp_path / "us", "us", count=2, seed=21, size=32)
    ds = dcmread(us)
    native = ds.pixel_array
    ds.compress(RLELossless)
    rle = tmp_path / "rle.dcm"
    ds.save_as(rle, enforce_file_format=True)
    ingest_part10(site.client.app.state.hub, rle, site.sender_a)  # type: ignore[attr-defined]
    study, series, sop = uids(rle)
    url = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/2,1"

    decoded = site.client.get(url, headers=site.a)
    as_stored = site.client.get(
        url,
        headers={
            **site.a,
            "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*',
        },
    )

    assert decoded.status_code == 200, decoded.text
    frames = [body for _, body in parts(decoded)]
    assert frames == [native[1].tobytes(), native[0].tobytes()]
    assert as_stored.status_code == 200, as_stored.text
    stored_frames = list(generate_frames(dcmread(rle).PixelData, number_of_frames=2))
    assert [body for _, body in parts(as_stored)] == [stored_frames[1], stored_frames[0]]
    assert all("1.2.840.10008.1.2.5" in t for t, _ in parts(as_stored))


@pytest.mark.parametrize("in_memory_max", [0, 1 << 40])
def test_retrieve_streams_large_objects_and_reads_small_ones_ahead(
    site: Site, monkeypatch: pytest.MonkeyPatch, in_memory_max: int
) -> None:
    """Streamed chunk by chunk (every object over PART_IN_MEMORY_MAX) or read ahead whole
    (none over it): the same stored bytes either way."""
    from dicom_node.dicomweb import wado

    monkeypatch.setattr(wado, "PART_IN_MEMORY_MAX", in_memory_max)
    study = uids(site.ct[0])[0]

    whole = site.client.get(f"/dicomweb/studies/{study}", headers=site.a)

    assert whole.status_code == 200
    assert sorted(b for _, b in parts(whole)) == sorted(p.read_bytes() for p in site.ct)


def test_metadata_of_objects_parsed_through_the_chunk_reader(
    site: Site, hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects over WHOLE_READ_MAX are parsed from the decrypting stream, stopping before
    the pixel data (described from its element header): same JSON."""
    from dicom_node.dicomweb import wado

    study = uids(site.mr[0])[0]
    forget_metadata(hub)
    whole = site.client.get(f"/dicomweb/studies/{study}/metadata", headers=site.a).json()
    monkeypatch.setattr(wado, "WHOLE_READ_MAX", 0)
    forget_metadata(hub)
    streamed = site.client.get(f"/dicomweb/studies/{study}/metadata", headers=site.a).json()

    assert streamed == whole and len(whole) == 2
    for path in site.mr:
        [item] = [i for i in whole if value(i, "00080018") == uids(path)[2]]
        assert {t: e for t, e in item.items() if t != "00083002"} == pydicom_json(path)


def test_metadata_of_sequences_charsets_and_private_elements(
    site: Site, hub: Hub, tmp_path: Path
) -> None:
    """Metadata is pydicom's JSON for sequences (defined and undefined length), a UTF-8
    name and private elements."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    paths = make_study(tmp_path / "x", "ct", count=2, seed=9, patient_id="PX9")
    for index, path in enumerate(paths):
        ds = dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Gröβe^Zoë"
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        ds.ReferencedImageSequence = Sequence([item])
        ds.add_new(0x00091010, "LO", "SAF PRIVATE")
        ds.add_new(0x00091011, "LO", "private value")
        ds["ReferencedImageSequence"].is_undefined_length = index == 1  # one of each
        ds.save_as(path, enforce_file_format=True)
        ingest_part10(hub, path, site.sender_a)
    study = uids(paths[0])[0]

    body = site.client.get(f"/dicomweb/studies/{study}/metadata", headers=site.a).json()

    assert len(body) == 2
    for path in paths:
        [item] = [i for i in body if value(i, "00080018") == uids(path)[2]]
        assert {t: e for t, e in item.items() if t != "00083002"} == pydicom_json(path)
    assert value(body[0], "00100010") == {"Alphabetic": "Gröβe^Zoë"}
