"""The viewer's JSON API over real HTTP (TestClient on the real app, real logins): frames in
scroll order, rendered frames with ETags, pixel values, annotations, tenancy and audit."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from saf import audit, frames
from saf.app import create_app
from saf.cases import on_study_stable
from saf.clinics import add_clinic
from saf.hub import Hub
from saf.ingest import Sender, ingest_part10
from saf.models import AuditRecord, Instance, Series
from tests.factories import login_as, make_study
from tests.viewer.consult import COL_MM, ROW_MM, RULES, Consult, make_consult

THORACIC = ["thoracic-radiology"]


def specialist(client: TestClient, name: str = "dr.thorax") -> dict[str, str]:
    return login_as(client, "specialist", username=name, specialties=THORACIC)


def clinician(client: TestClient, clinic: str = "Clinic A") -> dict[str, str]:
    return login_as(client, "clinician", username=f"nurse-{clinic[-1].lower()}", clinic=clinic)


@pytest.fixture
def consult(hub: Hub, tmp_path: Path) -> Consult:
    frames.clear_cache()
    return make_consult(hub, tmp_path)


def test_frames_are_listed_in_scroll_order_with_spacing_and_window(
    hub: Hub, consult: Consult
) -> None:
    with TestClient(create_app(hub)) as client:
        response = client.get(f"/api/series/{consult.series_id}/frames", headers=clinician(client))

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["series_id"] == consult.series_id and body["modality"] == "CT"
    listed = body["frames"]
    # Ascending along the slice normal (z), not by Instance Number.
    assert [f["instance_id"] for f in listed] == consult.instance_ids[::-1]
    assert [f["instance_number"] for f in listed] == [3, 2, 1]
    first = listed[0]
    assert first["frame"] == 1 and (first["rows"], first["columns"]) == (40, 60)
    assert first["pixel_spacing"] == [ROW_MM, COL_MM]
    assert first["spacing_source"] == "PixelSpacing"
    assert first["window"] == {"center": 40.0, "width": 400.0}
    assert first["slice_location"] == 0.0


def test_a_series_opened_once_lists_from_the_index(hub: Hub, consult: Consult) -> None:
    url = f"/api/series/{consult.series_id}/frames"
    with TestClient(create_app(hub)) as client:
        headers = clinician(client)
        first = client.get(url, headers=headers).json()
        frames.clear_cache()
        with hub.sessions() as session:
            blob_ids = session.scalars(
                select(Instance.blob_id).where(Instance.series_pk == consult.series_id)
            ).all()
        for blob_id in blob_ids:  # the pixels are gone: only the index can answer now
            hub.blobs.delete(blob_id)
        again = client.get(url, headers=headers)

    assert again.status_code == 200
    assert again.json() == first


def test_a_multiframe_instance_gives_one_entry_per_frame(hub: Hub, tmp_path: Path) -> None:
    sender = Sender(add_clinic(hub, "Clinic A").id, "test:us")
    [path] = make_study(tmp_path / "us", "us", count=4, size=32, patient_id="US-1")
    result = ingest_part10(hub, path, sender)
    with hub.sessions() as session:
        instance = session.get_one(Instance, result.instance_id)
        series = session.get_one(Series, instance.series_pk)
    on_study_stable(hub, series.study_pk, RULES)
    with TestClient(create_app(hub)) as client:
        listed = client.get(f"/api/series/{series.id}/frames", headers=clinician(client)).json()
        image = client.get(
            f"/api/instances/{instance.id}/frames/4/rendered?format=png", headers=clinician(client)
        )

    assert [f["frame"] for f in listed["frames"]] == [1, 2, 3, 4]
    assert {f["instance_id"] for f in listed["frames"]} == {instance.id}
    assert image.status_code == 200


def test_rendered_frames_have_etags_and_windows(hub: Hub, consult: Consult) -> None:
    instance = consult.instance_ids[0]
    url = f"/api/instances/{instance}/frames/1/rendered"
    with TestClient(create_app(hub)) as client:
        headers = clinician(client)
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            first = client.get(url, headers=headers)
            timings.append((time.perf_counter() - started) * 1000)
        again = client.get(url, headers={**headers, "If-None-Match": first.headers["etag"]})
        lung = client.get(url + "?wc=-600&ww=1500&format=png", headers=headers)
        small = client.get(url + "?size=30&format=png&quality=50", headers=headers)
        errors = {
            "format": client.get(url + "?format=gif", headers=headers),
            "ww": client.get(url + "?wc=40&ww=0", headers=headers),
            "half window": client.get(url + "?wc=40", headers=headers),
            "size": client.get(url + "?size=0", headers=headers),
        }
        missing_frame = client.get(f"/api/instances/{instance}/frames/2/rendered", headers=headers)
    print(f"\nrendered 60x40 frame: first {timings[0]:.1f} ms, then {min(timings[1:]):.1f} ms")

    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert first.headers["etag"].startswith('"') and len(first.headers["etag"]) == 34
    assert first.headers["cache-control"] == "private, max-age=3600"
    assert again.status_code == 304 and again.content == b""
    assert lung.headers["etag"] != first.headers["etag"]
    image = Image.open(io.BytesIO(lung.content))
    # Square pixels on screen: 60 columns of 0.8 mm by 40 rows of 0.5 mm is 96 x 40.
    assert image.size == (96, 40)
    # Lung window: HU 0..590 across the row is all above -600 + 750, so bright.
    low, _high = image.convert("L").getextrema()
    assert isinstance(low, int) and low > 100
    assert max(Image.open(io.BytesIO(small.content)).size) == 30
    assert {k: r.status_code for k, r in errors.items()} == dict.fromkeys(errors, 400) | {
        "size": 422
    }
    assert missing_frame.status_code == 404


def test_pixel_values_in_modality_units(hub: Hub, consult: Consult) -> None:
    # instance_ids[1] is slice 1: HU = 10 * column - 100.
    url = f"/api/instances/{consult.instance_ids[1]}/frames/1/value"
    with TestClient(create_app(hub)) as client:
        headers = clinician(client)
        value = client.get(url + "?x=25.5&y=3.9", headers=headers)
        outside = [
            client.get(url + f"?x={x}&y={y}", headers=headers).status_code
            for x, y in ((60, 1), (-0.1, 1), (1, 40), (1, -1))
        ]

    assert value.status_code == 200, value.text
    assert value.json() == {
        "x": 25.5,
        "y": 3.9,
        "column": 25,
        "row": 3,
        "stored": 25 * 10 - 100 + 1024,
        "value": 150.0,
        "unit": "HU",
    }
    assert outside == [400, 400, 400, 400]


def test_annotations_over_http(hub: Hub, consult: Consult) -> None:
    base = f"/api/cases/{consult.case_id}/annotations"
    body = {
        "instance_id": consult.instance_ids[0],
        "frame": 1,
        "kind": "ellipse",
        "points": [[10, 10], [30, 20]],
        "text": "ROI",
    }
    with TestClient(create_app(hub)) as client:
        spec, nurse = specialist(client), clinician(client)
        made = client.post(base, json=body, headers=spec)
        assert made.status_code == 201, made.text
        annotation = made.json()
        listed = client.get(base, headers=nurse)
        by_clinic = client.post(base, json=body, headers=nurse)
        bad = client.post(base, json={**body, "points": [[10, 10]]}, headers=spec)
        moved = client.put(
            f"{base}/{annotation['id']}",
            json={**body, "kind": "line", "points": [[0, 0], [10, 0]], "text": None},
            headers=spec,
        )
        gone = client.delete(f"{base}/{annotation['id']}", headers=spec)
        after = client.get(base, headers=nurse)
        missing = client.delete(f"{base}/{annotation['id']}", headers=spec)

    assert annotation["kind"] == "ellipse" and annotation["text"] == "ROI"
    assert annotation["created_by"] == "dr.thorax" and annotation["updated_at"]
    assert annotation["measurement"]["mean"] == pytest.approx(195.0)
    assert annotation["measurement"]["unit"] == "HU"
    assert listed.json()["annotations"] == [annotation]
    assert by_clinic.status_code == 403
    assert bad.status_code == 422 and bad.json()["field"] == "points"
    assert moved.status_code == 200
    assert moved.json()["measurement"]["length_mm"] == pytest.approx(8.0)
    assert gone.status_code == 204 and after.json() == {"annotations": []}
    assert missing.status_code == 404


def test_another_clinic_sees_nothing(hub: Hub, consult: Consult) -> None:
    instance = consult.instance_ids[0]
    with TestClient(create_app(hub)) as client:
        other = clinician(client, "Clinic B")
        answers = [
            client.get(f"/api/series/{consult.series_id}/frames", headers=other),
            client.get(f"/api/instances/{instance}/frames/1/rendered", headers=other),
            client.get(f"/api/instances/{instance}/frames/1/value?x=1&y=1", headers=other),
            client.get(f"/api/cases/{consult.case_id}/annotations", headers=other),
            client.get(f"/api/cases/{consult.case_id}/reply", headers=other),
            client.get(f"/api/cases/{consult.case_id}/reply/pdf", headers=other),
        ]
        missing = client.get("/api/series/nope/frames", headers=other)

    assert [r.status_code for r in answers] == [404] * len(answers)
    assert {r.json()["detail"] for r in answers} == {missing.json()["detail"]}
    with hub.sessions() as session:
        refused = session.scalars(
            select(AuditRecord).where(AuditRecord.outcome == audit.MINOR_FAILURE)
        ).all()
    assert {r.entity_id for r in refused} >= {consult.series_id, instance, consult.case_id}


def test_every_frame_read_is_audited(hub: Hub, consult: Consult) -> None:
    instance = consult.instance_ids[0]
    with TestClient(create_app(hub)) as client:
        client.get(f"/api/instances/{instance}/frames/1/rendered", headers=clinician(client))
    with hub.sessions() as session:
        rows = session.scalars(select(AuditRecord).where(AuditRecord.entity_id == instance)).all()
    assert [(r.event, r.outcome, r.clinic_id) for r in rows] == [
        ("read", audit.SUCCESS, consult.clinic_id)
    ]


@pytest.mark.slow
def test_scrolling_a_ct_is_fast_once_cached(hub: Hub, tmp_path: Path) -> None:
    """A 40-slice 512x512 CT: the first image, then every slice at display size as the
    viewer prefetches them, then a scroll through all of them again with a new window."""
    frames.clear_cache()
    sender = Sender(add_clinic(hub, "Clinic A").id, "test:ct")
    paths = make_study(tmp_path / "ct", "ct", count=40, size=512, patient_id="CT-PERF")
    results = [ingest_part10(hub, p, sender) for p in paths]
    with hub.sessions() as session:
        series_pk = session.get_one(Instance, results[0].instance_id).series_pk
        study_pk = session.get_one(Series, series_pk).study_pk
    on_study_stable(hub, study_pk, RULES)
    with TestClient(create_app(hub)) as client:
        headers = clinician(client)
        started = time.perf_counter()
        listed = client.get(f"/api/series/{series_pk}/frames", headers=headers).json()["frames"]
        first = listed[len(listed) // 2]
        client.get(
            f"/api/instances/{first['instance_id']}/frames/1/rendered?size=512", headers=headers
        )
        first_image_ms = (time.perf_counter() - started) * 1000
        for f in listed:  # prefetch
            client.get(
                f"/api/instances/{f['instance_id']}/frames/1/rendered?size=512", headers=headers
            )
        started = time.perf_counter()
        for f in listed:
            response = client.get(
                f"/api/instances/{f['instance_id']}/frames/1/rendered?size=512&wc=-600&ww=1500",
                headers=headers,
            )
            assert response.status_code == 200
        per_second = len(listed) / (time.perf_counter() - started)
    print(
        f"\n40x512x512 CT: frame list + first image {first_image_ms:.0f} ms; "
        f"new window over every slice {per_second:.1f} frames/s (server side, one client)"
    )
    # The browser keeps prefetched frames (Cache-Control private), so scrolling itself
    # does not reach the server; this is the harder case of a window change on every
    # slice, on a machine shared with other test runs: a floor well below what it does.
    assert per_second >= 10


def test_the_reply_over_http(hub: Hub, consult: Consult) -> None:
    base = f"/api/cases/{consult.case_id}"
    line = {
        "instance_id": consult.instance_ids[0],
        "frame": 1,
        "kind": "line",
        "points": [[10, 5], [20, 5]],
    }
    with TestClient(create_app(hub)) as client:
        spec, nurse = specialist(client), clinician(client)
        assert client.get(f"{base}/reply", headers=nurse).json()["status"] == "none"
        assert client.post(f"{base}/annotations", json=line, headers=spec).status_code == 201
        bad = client.put(f"{base}/reply", json={"findings": 3}, headers=spec)
        draft = client.put(
            f"{base}/reply",
            json={
                "findings": "nodule",
                "impression": "benign",
                "recommendation": "",
                "urgent": True,
            },
            headers=spec,
        )
        by_nurse = client.put(f"{base}/reply", json={"impression": "x"}, headers=nurse)
        asked = client.post(f"{base}/reply/question", json={"text": "Smoker?"}, headers=spec)
        answered = client.post(
            f"{base}/comments", json={"text": "Yes, 20 pack-years."}, headers=nurse
        )
        empty = client.post(f"{base}/comments", json={"text": " "}, headers=nurse)
        no_pdf = client.get(f"{base}/reply/pdf", headers=nurse)
        signed = client.post(f"{base}/reply/sign", headers=spec)
        again = client.post(f"{base}/reply/sign", headers=spec)
        seen = client.get(f"{base}/reply", headers=nurse)
        pdf = client.get(f"{base}/reply/pdf", headers=nurse)
        late = client.post(f"{base}/annotations", json=line, headers=spec)
        case = client.get(f"/api/cases/{consult.case_id}", headers=nurse).json()

    assert bad.status_code == 422 and bad.json()["field"] == "findings"
    assert draft.status_code == 200 and draft.json()["status"] == "draft"
    assert draft.json()["urgent"] is True
    assert by_nurse.status_code == 403
    assert asked.json()["communications"][0]["from"] == "specialist"
    assert [c["from"] for c in answered.json()["communications"]] == ["specialist", "clinic"]
    assert empty.status_code == 422 and empty.json()["field"] == "text"
    assert no_pdf.status_code == 404
    assert signed.status_code == 200, signed.text
    assert again.json() == signed.json()
    body = seen.json()
    assert body["status"] == "signed" and body["impression"] == "benign"
    assert body["diagnostic_report"].startswith("DiagnosticReport/")
    assert [o["modality"] for o in body["objects"]] == ["SR", "PR"]
    assert all(o["series_id"] for o in body["objects"])
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")
    assert late.status_code == 409
    assert case["status"] == "completed"
