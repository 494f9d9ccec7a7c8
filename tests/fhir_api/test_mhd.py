"""Documents: Binary bytes in and out, attachment checks, and IHE MHD ITI-65/67/68 as an MHD
Document Source and Consumer use them (both databases, real EHR token)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from typing import Any

from sqlalchemy import select

from saf.models import FhirBinary, FhirVersion, OutboxEvent
from tests.factories import TEST_PASSWORD, login_as, stored_blob_ids
from tests.fhir_api.test_bundles import PDF, send
from tests.fhir_api.test_routes import FHIR, Api, api, patient

__all__ = ["api"]

MHD = "https://profiles.ihe.net/ITI/MHD/StructureDefinition/"
LOINC = "http://loinc.org"
CDA = (
    b'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3">'
    b"<title>Referral letter</title></ClinicalDocument>"
)


def provide_bundle(pid: str, level: str = "Minimal", data: bytes = CDA) -> dict[str, Any]:
    """An ITI-65 Provide Document Bundle as an MHD Document Source builds it (after the
    MHD IG's example bundles): SubmissionSet List, DocumentReference, Binary."""
    digest = base64.b64encode(hashlib.sha1(data).digest()).decode()
    ss, doc, raw = (
        "urn:uuid:0c287d32-01e3-4d87-9953-9fcc9404eb21",
        ("urn:uuid:1e404af3-077f-4bee-b7a6-a9be97e1ce32"),
        "urn:uuid:2e404af3-077f-4bee-b7a6-a9be97e1ce33",
    )
    submission = {
        "resourceType": "List",
        "meta": {"profile": [f"{MHD}IHE.MHD.{level}.SubmissionSet"]},
        "extension": [
            {
                "url": f"{MHD}ihe-sourceId",
                "valueIdentifier": {"value": "urn:oid:1.3.6.1.4.1.21367.2017.2.1"},
            },
            {
                "url": f"{MHD}ihe-designationType",
                "valueCodeableConcept": {
                    "coding": [{"system": LOINC, "code": "57133-1", "display": "Referral note"}]
                },
            },
        ],
        "identifier": [
            {"use": "usual", "system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.3.4.5.6.1"},
            {"use": "official", "system": "urn:ietf:rfc:3986", "value": ss},
        ],
        "status": "current",
        "mode": "working",
        "code": {
            "coding": [
                {
                    "system": "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes",
                    "code": "submissionset",
                }
            ]
        },
        "subject": {"reference": f"Patient/{pid}"},
        "date": "2026-11-27T09:00:00Z",
        "entry": [{"item": {"reference": doc}}],
    }
    reference = {
        "resourceType": "DocumentReference",
        "meta": {"profile": [f"{MHD}IHE.MHD.{level}.DocumentReference"]},
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.3.4.5.6.2"},
        "identifier": [{"use": "official", "system": "urn:ietf:rfc:3986", "value": doc}],
        "status": "current",
        "type": {"coding": [{"system": LOINC, "code": "57133-1"}]},
        "category": [{"coding": [{"system": LOINC, "code": "11488-4"}]}],
        "subject": {"reference": f"Patient/{pid}"},
        "date": "2026-11-27T08:30:00+01:00",
        "securityLabel": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                        "code": "N",
                    }
                ]
            }
        ],
        "content": [
            {
                "attachment": {
                    "contentType": "text/xml",
                    "language": "en-US",
                    "url": raw,
                    "size": len(data),
                    "hash": digest,
                    "creation": "2026-11-27T08:00:00Z",
                },
                "format": {
                    "system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode",
                    "code": "urn:ihe:iti:xds-sd:text:2008",
                },
            }
        ],
        "context": {
            "facilityType": {"coding": [{"system": "http://snomed.info/sct", "code": "35971002"}]},
            "practiceSetting": {
                "coding": [{"system": "http://snomed.info/sct", "code": "408478003"}]
            },
        },
    }
    binary = {
        "resourceType": "Binary",
        "contentType": "text/xml",
        "data": base64.b64encode(data).decode(),
    }
    return {
        "resourceType": "Bundle",
        "meta": {"profile": [f"{MHD}IHE.MHD.{level}.ProvideBundle"]},
        "type": "transaction",
        "entry": [
            {"fullUrl": ss, "resource": submission, "request": {"method": "POST", "url": "List"}},
            {
                "fullUrl": doc,
                "resource": reference,
                "request": {"method": "POST", "url": "DocumentReference"},
            },
            {"fullUrl": raw, "resource": binary, "request": {"method": "POST", "url": "Binary"}},
        ],
    }


def test_binary_raw_bytes_round_trip_sealed(api: Api) -> None:
    data = bytes(range(256)) * 40
    before = stored_blob_ids(api.hub)
    created = api.client.post(
        "/fhir/Binary", content=data, headers={**api.ehr, "Content-Type": "image/jpeg"}
    )
    assert created.status_code == 201, created.text
    bid = created.json()["id"]
    assert created.json()["contentType"] == "image/jpeg" and "data" not in created.json()
    assert created.headers["location"].endswith(f"/fhir/Binary/{bid}/_history/1")
    raw = api.client.get(f"/fhir/Binary/{bid}", headers={**api.ehr, "Accept": "*/*"})
    assert raw.status_code == 200
    assert raw.content == data and raw.headers["content-type"] == "image/jpeg"
    as_fhir = api.client.get(f"/fhir/Binary/{bid}", headers={**api.ehr, "Accept": FHIR})
    assert base64.b64decode(as_fhir.json()["data"]) == data
    # the bytes are one new sealed blob, not in the database
    (blob_id,) = stored_blob_ids(api.hub) - before
    with api.hub.blobs.open(blob_id) as sealed:
        assert data[:512] not in sealed.read()
    with api.hub.sessions() as session:
        row = session.get_one(FhirBinary, bid)
        assert row.blob_id == blob_id and row.size == len(data)
        sealed_json = session.scalars(
            select(FhirVersion.content_sealed).where(FhirVersion.resource_id == bid)
        ).one()
        assert sealed_json is not None and len(sealed_json) < 1000
        topics = session.scalars(select(OutboxEvent.topic)).all()
    assert "fhir.document" in topics
    # another clinic: as if absent
    assert api.client.get(f"/fhir/Binary/{bid}", headers=api.other_clinic).status_code == 404


def test_binary_from_fhir_json_and_bad_binaries(api: Api) -> None:
    body = {
        "resourceType": "Binary",
        "contentType": "application/pdf",
        "data": base64.b64encode(PDF).decode(),
    }
    created = api.client.post(
        "/fhir/Binary", content=json.dumps(body), headers={**api.ehr, "Content-Type": FHIR}
    )
    assert created.status_code == 201, created.text
    raw = api.client.get(f"/fhir/Binary/{created.json()['id']}", headers=api.ehr)
    assert raw.content == PDF and raw.headers["content-type"] == "application/pdf"
    before = stored_blob_ids(api.hub)
    for bad, status, where in (
        (dict(body, data="***"), 400, "Binary.data"),
        ({"resourceType": "Binary", "contentType": "text/plain"}, 400, "Binary.data"),
        ({"resourceType": "Binary", "data": "AA=="}, 400, "Binary.contentType"),
    ):
        answer = api.client.post(
            "/fhir/Binary", content=json.dumps(bad), headers={**api.ehr, "Content-Type": FHIR}
        )
        assert answer.status_code == status, answer.text
        assert answer.json()["issue"][0]["expression"] == [where]
    assert stored_blob_ids(api.hub) == before
    assert api.client.get("/fhir/Binary/nope", headers=api.ehr).status_code == 404


def test_document_reference_hash_and_size_are_checked(api: Api) -> None:
    pid = api.post(patient()).json()["id"]
    bid = api.client.post(
        "/fhir/Binary", content=PDF, headers={**api.ehr, "Content-Type": "application/pdf"}
    ).json()["id"]
    good = {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": f"Patient/{pid}"},
        "content": [
            {
                "attachment": {
                    "contentType": "application/pdf",
                    "url": f"Binary/{bid}",
                    "size": len(PDF),
                    "hash": base64.b64encode(hashlib.sha1(PDF).digest()).decode(),
                }
            }
        ],
    }
    assert api.post(good).status_code == 201
    wrong_hash = copy.deepcopy(good)
    wrong_hash["content"][0]["attachment"]["hash"] = base64.b64encode(b"x" * 20).decode()
    refused = api.post(wrong_hash)
    assert refused.status_code == 422, refused.text
    assert refused.json()["issue"][0]["expression"] == [
        "DocumentReference.content[0].attachment.hash"
    ]
    wrong_size = copy.deepcopy(good)
    wrong_size["content"][0]["attachment"]["size"] = 3
    refused = api.post(wrong_size)
    assert refused.status_code == 422
    assert refused.json()["issue"][0]["expression"] == [
        "DocumentReference.content[0].attachment.size"
    ]
    missing = copy.deepcopy(good)
    missing["content"][0]["attachment"]["url"] = "Binary/nope"
    refused = api.post(missing)
    assert refused.status_code == 400
    assert refused.json()["issue"][0]["expression"] == [
        "DocumentReference.content[0].attachment.url"
    ]


def test_iti65_provide_then_iti67_find_then_iti68_retrieve(api: Api) -> None:
    pid = api.post(patient()).json()["id"]
    for level in ("Minimal", "Comprehensive"):
        answer = send(api, provide_bundle(pid, level))
        assert answer.status_code == 200, answer.text
        assert [e["response"]["status"] for e in answer.json()["entry"]] == ["201 Created"] * 3
    # ITI-67
    found = api.client.get(
        f"/fhir/DocumentReference?patient={pid}&status=current", headers=api.ehr
    ).json()
    assert found["total"] == 2
    for query, total in (
        ("date=ge2026-11-27", 2),
        ("date=lt2026-11-27", 0),
        ("date=2026-11-27T07:30:00Z", 2),  # 08:30+01:00 is 07:30Z
        (f"type={LOINC}|57133-1", 2),
        ("type=11488-4", 0),
        (f"category={LOINC}|11488-4", 2),
        ("identifier=urn:ietf:rfc:3986|urn:oid:1.2.3.4.5.6.2", 2),
        ("identifier=urn:oid:9.9", 0),
    ):
        got = api.client.get(
            f"/fhir/DocumentReference?patient=Patient/{pid}&{query}", headers=api.ehr
        )
        assert got.status_code == 200, got.text
        assert got.json()["total"] == total, query
    # ITI-68: the bytes, identical
    url = found["entry"][0]["resource"]["content"][0]["attachment"]["url"]
    assert url.startswith("Binary/")
    raw = api.client.get(f"/fhir/{url}", headers=api.ehr)
    assert raw.content == CDA
    assert raw.headers["content-type"].startswith("text/xml")
    lists = api.client.get(f"/fhir/List?patient={pid}", headers=api.ehr).json()
    assert lists["total"] == 2
    item = lists["entry"][0]["resource"]["entry"][0]["item"]["reference"]
    assert item.startswith("DocumentReference/")


def test_iti65_refuses_what_the_profile_requires(api: Api) -> None:
    pid = api.post(patient()).json()["id"]
    before = stored_blob_ids(api.hub)
    bundle = provide_bundle(pid, "Comprehensive")
    del bundle["entry"][1]["resource"]["type"]
    del bundle["entry"][1]["resource"]["content"][0]["format"]
    del bundle["entry"][0]["resource"]["subject"]
    refused = send(api, bundle)
    assert refused.status_code == 400, refused.text
    where = {e for i in refused.json()["issue"] for e in i["expression"]}
    assert where == {"Bundle.entry[0].resource.subject"}  # the first entry refused first
    bundle["entry"][0]["resource"]["subject"] = {"reference": f"Patient/{pid}"}
    refused = send(api, bundle)
    where = {e for i in refused.json()["issue"] for e in i["expression"]}
    assert where == {"Bundle.entry[1].resource.type", "Bundle.entry[1].resource.content.format"}
    # Minimal needs less: the same document passes as Minimal
    minimal = provide_bundle(pid, "Minimal")
    del minimal["entry"][1]["resource"]["type"]
    assert send(api, minimal).status_code == 200
    no_master = provide_bundle(pid, "Minimal")
    del no_master["entry"][1]["resource"]["masterIdentifier"]
    refused = send(api, no_master)
    assert refused.status_code == 400
    assert refused.json()["issue"][0]["expression"] == ["Bundle.entry[1].resource.masterIdentifier"]
    assert len(stored_blob_ids(api.hub) - before) == 1  # only the Minimal bundle's Binary


def test_include_and_revinclude_document_patient(api: Api) -> None:
    pid = api.post(patient()).json()["id"]
    assert send(api, provide_bundle(pid)).status_code == 200
    found = api.client.get(
        f"/fhir/DocumentReference?patient={pid}&_include=DocumentReference:patient",
        headers=api.ehr,
    ).json()
    modes = [(e["resource"]["resourceType"], e["search"]["mode"]) for e in found["entry"]]
    assert modes == [("DocumentReference", "match"), ("Patient", "include")]
    assert found["total"] == 1
    back = api.client.get(
        f"/fhir/Patient?_id={pid}&_revinclude=DocumentReference:patient", headers=api.ehr
    ).json()
    modes = [(e["resource"]["resourceType"], e["search"]["mode"]) for e in back["entry"]]
    assert modes == [("Patient", "match"), ("DocumentReference", "include")]
    # another clinic includes nothing of clinic B
    other = api.client.get(
        f"/fhir/Patient?_id={pid}&_revinclude=DocumentReference:patient",
        headers=api.other_clinic,
    ).json()
    assert other["total"] == 0 and other.get("entry", []) == []
    bad = api.client.get("/fhir/Patient?_include=Task:owner", headers=api.ehr)
    assert bad.status_code == 400


def test_documents_sort_by_date(api: Api) -> None:
    pid = api.post(patient()).json()["id"]
    made = []
    for date in ("2026-03-01T10:00:00Z", "2025-01-01T08:00:00Z", "2026-11-01T00:00:00+02:00"):
        body = {
            "resourceType": "DocumentReference",
            "status": "current",
            "subject": {"reference": f"Patient/{pid}"},
            "date": date,
            "content": [{"attachment": {"contentType": "text/plain", "url": "http://x/1"}}],
        }
        created = api.post(body)
        assert created.status_code == 201, created.text
        made.append(created.json()["id"])
    up = api.client.get(f"/fhir/DocumentReference?patient={pid}&_sort=date", headers=api.ehr)
    assert [e["resource"]["id"] for e in up.json()["entry"]] == [made[1], made[0], made[2]]
    down = api.client.get(f"/fhir/DocumentReference?patient={pid}&_sort=-date", headers=api.ehr)
    assert [e["resource"]["id"] for e in down.json()["entry"]] == [made[2], made[0], made[1]]
    assert api.client.get("/fhir/Patient?_sort=date", headers=api.ehr).status_code == 400


def test_a_clinician_at_the_clinic_portal_provides_documents_too(api: Api) -> None:
    pid = api.post(patient(), api.clinician).json()["id"]
    answer = send(api, provide_bundle(pid), api.clinician)
    assert answer.status_code == 200, answer.text
    assert [e["response"]["status"] for e in answer.json()["entry"]] == ["201 Created"] * 3


def test_a_document_is_shown_in_place_only_when_it_cannot_run_script(api: Api) -> None:
    """A clinic may upload any Content-Type. PDFs and images are shown in place (a PDF may
    be framed by our own case page); HTML, SVG or a script are a sandboxed download, and to
    a browser session they are plain octet-stream, so one upload cannot run in the reader's
    session or be loaded as a script by another (``script-src 'self'``)."""

    def upload(data: bytes, kind: str) -> str:
        created = api.client.post(
            "/fhir/Binary", content=data, headers={**api.ehr, "Content-Type": kind}
        )
        assert created.status_code == 201, created.text
        return str(created.json()["id"])

    pdf = upload(PDF, "application/pdf")
    html = upload(b"<script src='/fhir/Binary/x'></script>", "text/html; charset=utf-8")
    script = upload(b"fetch('/api/cases')", "application/javascript")
    svg = upload(b"<svg xmlns='http://www.w3.org/2000/svg'><script/></svg>", "image/svg+xml")

    shown = api.client.get(f"/fhir/Binary/{pdf}", headers=api.ehr)
    assert shown.headers["content-type"] == "application/pdf"
    assert shown.headers["content-disposition"] == "inline"
    assert shown.headers["content-security-policy"] == "frame-ancestors 'self'"
    assert shown.headers["x-frame-options"] == "SAMEORIGIN"
    assert shown.content == PDF

    for bid, kind in (
        (html, "text/html; charset=utf-8"),
        (script, "application/javascript"),
        (svg, "image/svg+xml"),
    ):
        by_api = api.client.get(f"/fhir/Binary/{bid}", headers=api.ehr)
        assert by_api.headers["content-type"] == kind  # ITI-68: as provided
        assert by_api.headers["content-disposition"] == "attachment"
        assert by_api.headers["content-security-policy"].startswith("sandbox;")
        assert by_api.headers["x-content-type-options"] == "nosniff"

    # The same clinic's user in the viewer (session cookie, no bearer token).
    login_as(api.client, username="bert.b", clinic="Clinic B")
    session = api.client.post(
        "/auth/session", data={"username": "bert.b", "password": TEST_PASSWORD}
    )
    assert session.status_code == 204, session.text
    try:
        for bid in (html, script, svg):
            in_browser = api.client.get(f"/fhir/Binary/{bid}")
            assert in_browser.status_code == 200, in_browser.text
            assert in_browser.headers["content-type"] == "application/octet-stream"
            assert in_browser.headers["content-disposition"] == "attachment"
        pdf_in_browser = api.client.get(f"/fhir/Binary/{pdf}")
        assert pdf_in_browser.headers["content-type"] == "application/pdf"
    finally:
        api.client.cookies.clear()


def test_the_case_specialist_reads_the_documents_bytes(api: Api) -> None:
    """A Binary is posted before the DocumentReference that names it, so it knows no case;
    once the document joins a case, that case's specialist may read the bytes (ITI-68) and
    a specialist of another worklist may not."""
    from tests.fhir_api.test_reply import _referral

    pid, sr_id, _case_id, specialist = _referral(api)
    created = api.client.post(
        "/fhir/Binary", content=PDF, headers={**api.ehr, "Content-Type": "application/pdf"}
    )
    bid = created.json()["id"]
    assert api.client.get(f"/fhir/Binary/{bid}", headers=specialist).status_code == 404
    document = {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": f"Patient/{pid}"},
        "context": {"related": [{"reference": f"ServiceRequest/{sr_id}"}]},
        "content": [{"attachment": {"contentType": "application/pdf", "url": f"Binary/{bid}"}}],
    }
    assert api.post(document).status_code == 201
    shown = api.client.get(f"/fhir/Binary/{bid}", headers=specialist)
    assert shown.status_code == 200, shown.text
    assert shown.content == PDF
    other = login_as(api.client, "specialist", username="dr.derm", specialties=["dermatology"])
    assert api.client.get(f"/fhir/Binary/{bid}", headers=other).status_code == 404
