"""Transaction and batch Bundles at POST /fhir, on both databases, with a real EHR token."""

from __future__ import annotations

import base64
import hashlib
import json
from contextlib import ExitStack
from typing import Any

import httpx
from sqlalchemy import func, select

from saf.fsck import fsck
from saf.models import (
    AuditRecord,
    Blob,
    Case,
    CaseEvent,
    FhirResource,
    FhirVersion,
    OutboxEvent,
)
from tests.factories import at_once, served_api, stored_blob_ids
from tests.fhir_api.test_routes import FHIR, V2, Api, api, patient, service_request

__all__ = ["api"]

PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


def send(api: Api, bundle: dict[str, Any], who: dict[str, str] | None = None) -> Any:
    return api.client.post(
        "/fhir",
        content=json.dumps(bundle),
        headers={**(who or api.ehr), "Content-Type": FHIR},
    )


def transaction(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post(full_url: str | None, resource: dict[str, Any], **request: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def binary(data: bytes = PDF) -> dict[str, Any]:
    return {
        "resourceType": "Binary",
        "contentType": "application/pdf",
        "data": base64.b64encode(data).decode(),
    }


def document(patient_ref: str, url: str, data: bytes = PDF, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": patient_ref},
        "content": [
            {
                "attachment": {
                    "contentType": "application/pdf",
                    "url": url,
                    "size": len(data),
                    "hash": base64.b64encode(hashlib.sha1(data).digest()).decode(),
                }
            }
        ],
    }
    body.update(extra)
    return body


def _counts(api: Api) -> tuple[int, int, int, int]:
    with api.hub.sessions() as session:
        return (
            session.scalar(select(func.count()).select_from(FhirResource)) or 0,
            session.scalar(select(func.count()).select_from(FhirVersion)) or 0,
            session.scalar(select(func.count()).select_from(Blob)) or 0,
            session.scalar(select(func.count()).select_from(OutboxEvent)) or 0,
        )


def referral_bundle() -> dict[str, Any]:
    p, sr, b, d = (f"urn:uuid:{n}" for n in ("p1", "sr1", "b1", "d1"))
    return transaction(
        post(d, document(p, b, context={"related": [{"reference": sr}]})),
        post(sr, service_request("x", subject={"reference": p})),
        post(b, binary()),
        post(p, patient()),
    )


def test_transaction_resolves_urn_uuids_everywhere(api: Api) -> None:
    answer = send(api, referral_bundle())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created"] * 4
    locations = [e["response"]["location"] for e in body["entry"]]
    assert [loc.split("/")[0] for loc in locations] == [
        "DocumentReference",
        "ServiceRequest",
        "Binary",
        "Patient",
    ]
    assert all(e["response"]["etag"] == 'W/"1"' for e in body["entry"])
    doc_id, sr_id, bin_id, pid = (loc.split("/")[1] for loc in locations)
    sr = api.client.get(f"/fhir/ServiceRequest/{sr_id}", headers=api.ehr).json()
    assert sr["subject"] == {"reference": f"Patient/{pid}"}
    doc = api.client.get(f"/fhir/DocumentReference/{doc_id}", headers=api.ehr).json()
    assert doc["content"][0]["attachment"]["url"] == f"Binary/{bin_id}"
    assert doc["context"]["related"] == [{"reference": f"ServiceRequest/{sr_id}"}]
    raw = api.client.get(f"/fhir/Binary/{bin_id}", headers=api.ehr)
    assert raw.content == PDF and raw.headers["content-type"] == "application/pdf"
    # the referral made its case after the commit, and the document joined it
    with api.hub.sessions() as session:
        case_id = session.scalars(select(Case.id)).one()
        linked = session.scalars(
            select(FhirResource.id).where(FhirResource.case_id == case_id)
        ).all()
    assert {sr_id, doc_id} <= set(linked)
    # every entry is an audit record of its own, naming the object and its clinic
    with api.hub.sessions() as session:
        rows = session.scalars(
            select(AuditRecord).where(AuditRecord.detail.like("bundle entry %"))
        ).all()
        clinic_id = session.get_one(FhirResource, pid).clinic_id
    assert sorted((r.event, r.entity_type, r.entity_id) for r in rows) == sorted(
        ("create", loc.split("/")[0], loc.split("/")[1]) for loc in locations
    )
    assert {r.clinic_id for r in rows} == {clinic_id}
    assert {r.actor_kind for r in rows} == {"client"}


def test_a_failed_transaction_leaves_nothing_blobs_included(api: Api) -> None:
    before, blobs_before = _counts(api), stored_blob_ids(api.hub)
    bad = referral_bundle()
    # the document claims the wrong hash: the last check, after the Binary was sealed
    bad["entry"][0]["resource"]["content"][0]["attachment"]["hash"] = base64.b64encode(
        hashlib.sha1(b"other").digest()
    ).decode()
    answer = send(api, bad)
    assert answer.status_code == 422, answer.text
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"][0] == "DocumentReference.content[0].attachment.hash"
    assert "Bundle.entry[0]" in outcome["issue"][0]["diagnostics"]
    assert _counts(api) == before
    assert stored_blob_ids(api.hub) == blobs_before
    report = fsck(api.hub)
    assert report.ok and report.unindexed == []
    with api.hub.sessions() as session:
        assert session.scalars(select(Case)).all() == []


def test_concurrent_if_none_exist_bundles_make_each_resource_once(api: Api) -> None:
    """Transaction and batch Bundles racing through several API servers, each creating
    the same two patients with ifNoneExist (transactions in both orders, so two of them
    hold one condition's lock each and want the other's): each patient is created once,
    every other entry answers 200 with it, and no Bundle fails (no deadlock)."""
    system = "urn:oid:1.2.36.146.595.217.0.1"
    mrns = ["MRN-A", "MRN-B"]
    entries = [post(None, patient(mrn=m), ifNoneExist=f"identifier={system}|{m}") for m in mrns]
    writers = 8
    with ExitStack() as stack:
        bases = [stack.enter_context(served_api(api.hub)) for _ in range(4)]
        clients = [stack.enter_context(httpx.Client(timeout=60)) for _ in range(writers)]

        def send_bundle(i: int) -> Any:
            ordered = entries if i % 2 else entries[::-1]
            kind = "transaction" if i % 4 < 2 else "batch"
            return clients[i].post(
                f"{bases[i % len(bases)]}/fhir",
                content=json.dumps(transaction(*ordered, kind=kind)),
                headers={**api.ehr, "Content-Type": FHIR},
            )

        answers = at_once(send_bundle, writers)
    assert [a.status_code for a in answers] == [200] * writers, [a.text for a in answers]
    for mrn in mrns:
        outcomes: list[tuple[str, str]] = []
        for i, answer in enumerate(answers):
            entry = answer.json()["entry"][mrns.index(mrn) if i % 2 else 1 - mrns.index(mrn)]
            status = entry["response"]["status"]
            outcomes.append((status, entry["response"]["location"].split("/")[1]))
        assert sorted(s for s, _ in outcomes) == ["200 OK"] * (writers - 1) + ["201 Created"]
        assert len({rid for _, rid in outcomes}) == 1
        found = api.client.get(f"/fhir/Patient?identifier={system}|{mrn}", headers=api.ehr)
        assert found.json()["total"] == 1


def test_if_none_exist_and_conditional_references(api: Api) -> None:
    first = api.post(patient(mrn="MRN-9"))
    assert first.status_code == 201
    pid = first.json()["id"]
    system = "urn:oid:1.2.36.146.595.217.0.1"
    bundle = transaction(
        post("urn:uuid:p", patient(mrn="MRN-9"), ifNoneExist=f"identifier={system}|MRN-9"),
        post("urn:uuid:sr", service_request("x", subject={"reference": "urn:uuid:p"})),
        post(
            None,
            {
                "resourceType": "Communication",
                "status": "completed",
                "subject": {"reference": f"Patient?identifier={system}|MRN-9"},
                "payload": [{"contentString": "notes follow"}],
            },
        ),
    )
    answer = send(api, bundle)
    assert answer.status_code == 200, answer.text
    entries = answer.json()["entry"]
    assert entries[0]["response"]["status"] == "200 OK"
    assert entries[0]["response"]["location"].startswith(f"Patient/{pid}/")
    assert entries[1]["resource"]["subject"] == {"reference": f"Patient/{pid}"}
    assert entries[2]["resource"]["subject"] == {"reference": f"Patient/{pid}"}
    # no match, or two matches: the transaction fails
    nothing = transaction(
        post(None, service_request("x", subject={"reference": "Patient?identifier=none"}))
    )
    assert send(api, nothing).status_code == 400
    assert api.post(patient(mrn="MRN-9")).status_code == 201
    twice = transaction(
        post(None, service_request("x", subject={"reference": "Patient?identifier=MRN-9"}))
    )
    refused = send(api, twice)
    assert refused.status_code == 412, refused.text
    assert refused.json()["issue"][0]["expression"] == [
        "Bundle.entry[0].resource.subject.reference"
    ]


def test_processing_order_and_if_match(api: Api) -> None:
    pid = api.post(patient(mrn="MRN-5")).json()["id"]
    gone = api.post(patient(mrn="MRN-6")).json()["id"]
    changed = dict(patient(mrn="MRN-5"), id=pid, active=False)
    bundle = transaction(
        {"request": {"method": "GET", "url": "Patient?identifier=MRN-7"}},
        {
            "request": {"method": "PUT", "url": f"Patient/{pid}", "ifMatch": 'W/"1"'},
            "resource": changed,
        },
        post(None, patient(mrn="MRN-7")),
        {"request": {"method": "DELETE", "url": f"Patient/{gone}"}},
    )
    answer = send(api, bundle)
    assert answer.status_code == 200, answer.text
    entries = answer.json()["entry"]
    # GET runs last: it sees the POST of the same Bundle
    assert entries[0]["resource"]["total"] == 1
    assert entries[1]["response"]["etag"] == 'W/"2"'
    assert entries[3]["response"]["status"] == "204 No Content"
    assert api.client.get(f"/fhir/Patient/{gone}", headers=api.ehr).status_code == 410
    stale = transaction(
        {
            "request": {"method": "PUT", "url": f"Patient/{pid}", "ifMatch": 'W/"1"'},
            "resource": changed,
        }
    )
    refused = send(api, stale)
    assert refused.status_code == 412, refused.text


def test_batch_answers_each_entry(api: Api) -> None:
    bundle = transaction(
        post(None, patient(mrn="B-1")),
        post(None, service_request("nope")),
        {"request": {"method": "PATCH", "url": "Patient/x"}},
        post(None, {"resourceType": "Patient", "bogus": 1}),
        kind="batch",
    )
    answer = send(api, bundle)
    assert answer.status_code == 200, answer.text
    entries = answer.json()["entry"]
    assert answer.json()["type"] == "batch-response"
    assert entries[0]["response"]["status"] == "201 Created"
    assert entries[1]["response"]["status"] == "400"
    outcome = entries[1]["response"]["outcome"]
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"][0] == "ServiceRequest.subject"
    assert entries[2]["response"]["status"] == "405"
    assert entries[3]["response"]["status"] == "400"
    assert entries[3]["response"]["outcome"]["issue"][0]["expression"] == [
        "Bundle.entry[3].resource.bogus"
    ]
    found = api.client.get("/fhir/Patient?identifier=B-1", headers=api.ehr).json()
    assert found["total"] == 1


def test_bad_bundles_are_operation_outcomes(api: Api) -> None:
    for bad, status in (
        ({"resourceType": "Bundle", "type": "collection"}, 400),
        ({"resourceType": "Patient"}, 400),
        (transaction({"request": {"method": "PATCH", "url": "Patient/x"}}), 405),
        (transaction({"request": {"method": "POST", "url": "Widget"}, "resource": {}}), 404),
        (transaction(post(None, service_request("x", subject={"reference": "urn:uuid:z"}))), 400),
        (transaction(post("urn:uuid:a", patient()), post("urn:uuid:a", patient())), 400),
    ):
        answer = send(api, bad)
        assert answer.status_code == status, (bad, answer.text)
        assert answer.json()["resourceType"] == "OperationOutcome"
    malformed = api.client.post(
        "/fhir", content=b"{nope", headers={**api.ehr, "Content-Type": FHIR}
    )
    assert malformed.status_code == 400


def test_transaction_needs_every_entrys_scope(api: Api) -> None:
    # a clinician may not write DiagnosticReports: the whole transaction is refused
    pid = api.post(patient()).json()["id"]
    bundle = transaction(
        post(None, patient(mrn="S-1")),
        post(
            None,
            {
                "resourceType": "DiagnosticReport",
                "status": "final",
                "code": {"text": "x"},
                "subject": {"reference": f"Patient/{pid}"},
            },
        ),
    )
    before = _counts(api)
    refused = send(api, bundle, api.clinician)
    assert refused.status_code == 403, refused.text
    assert _counts(api) == before


def test_odd_bundles_never_answer_500(api: Api) -> None:
    odd: list[Any] = [
        {"resourceType": "Bundle", "type": "transaction", "entry": "x"},
        {"resourceType": "Bundle", "type": "transaction", "entry": [1, None]},
        transaction({"request": "POST"}),
        transaction({"request": {"method": "POST", "url": "Patient"}}),
        transaction({"request": {"method": "POST", "url": "Patient"}, "resource": []}),
        transaction({"request": {"method": "POST", "url": ""}, "resource": patient()}),
        transaction({"request": {"method": "GET", "url": "Patient/x/_history/1"}}),
        transaction({"request": {"method": "GET", "url": "Patient?_count=zz"}}),
        transaction({"request": {"method": "GET", "url": "Binary/nope"}}),
        transaction({"request": {"method": "DELETE", "url": "Patient?identifier=x"}}),
        transaction({"request": {"method": "PUT", "url": "Patient/nope"}, "resource": patient()}),
        transaction(
            {
                "request": {"method": "PUT", "url": "Patient/a", "ifMatch": "soon"},
                "resource": dict(patient(), id="a"),
            }
        ),
        transaction(post(None, {"resourceType": "Binary", "contentType": "x/y", "data": "!"})),
        transaction(post(None, patient(), ifNoneExist="bogus=1")),
        transaction(post(None, service_request("x", subject={"reference": "Patient?"}))),
        transaction(post(None, service_request("x", subject={"reference": "Widget?a=b"}))),
        {"resourceType": "Bundle", "type": "batch", "entry": [1, {"request": {}}]},
        {"resourceType": "Bundle", "type": "transaction", "bogus": True, "entry": []},
    ]
    for body in odd:
        answer = send(api, body)
        assert answer.status_code < 500, (body, answer.text)
        assert answer.json()["resourceType"] in ("OperationOutcome", "Bundle")
        if answer.status_code >= 400:
            assert answer.json()["issue"][0]["diagnostics"]
    empty = send(api, transaction())
    assert empty.status_code == 200 and empty.json()["entry"] == []


# --------------------------------------------------------------------------- many entries
# A transaction's POSTs share their lookups and write their rows together
# (saf.fhir_store.Batch); these check that the outcome is the one-by-one outcome.


def _referral(pid: str, placer: str, accession: str | None = None) -> dict[str, Any]:
    idents: list[dict[str, Any]] = [
        {"type": {"coding": [{"system": V2, "code": "PLAC"}]}, "system": "urn:p", "value": placer}
    ]
    if accession:
        idents.append(
            {
                "type": {"coding": [{"system": V2, "code": "ACSN"}]},
                "system": "urn:a",
                "value": accession,
            }
        )
    return service_request(pid, identifier=idents, priority="routine")


def _inline_document(pid: str, data: bytes = b"note", **attachment: Any) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": f"Patient/{pid}"},
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain",
                    "data": base64.b64encode(data).decode(),
                    **attachment,
                }
            }
        ],
    }


def _heads(api: Api, ids: list[str]) -> dict[str, FhirResource]:
    with api.hub.sessions() as session:
        rows = session.scalars(select(FhirResource).where(FhirResource.id.in_(ids))).all()
        for row in rows:
            session.expunge(row)
    return {row.id: row for row in rows}


def _created_ids(answer: Any) -> list[str]:
    return [e["response"]["location"].split("/")[1] for e in answer.json()["entry"]]


def test_a_hundred_documents_failing_at_the_last_leave_no_blob_and_no_row(api: Api) -> None:
    pid = api.post(patient()).json()["id"]
    before, blobs_before = _counts(api), stored_blob_ids(api.hub)
    entries = []
    for i in range(100):
        data = f"document {i}".encode()
        entries.append(post(f"urn:uuid:b{i}", binary(data)))
        entries.append(post(None, document(f"Patient/{pid}", f"urn:uuid:b{i}", data)))
    # the last DocumentReference claims another document's hash
    entries[-1]["resource"]["content"][0]["attachment"]["hash"] = base64.b64encode(
        hashlib.sha1(b"other").digest()
    ).decode()
    answer = send(api, transaction(*entries))
    assert answer.status_code == 422, answer.text
    assert "Bundle.entry[199]" in answer.json()["issue"][0]["diagnostics"]
    assert _counts(api) == before
    assert stored_blob_ids(api.hub) == blobs_before
    report = fsck(api.hub)
    assert report.ok and report.unindexed == []
    # the same documents, every one right: all stored, each Binary readable
    entries[-1]["resource"]["content"][0]["attachment"]["hash"] = base64.b64encode(
        hashlib.sha1(b"document 99").digest()
    ).decode()
    answer = send(api, transaction(*entries))
    assert answer.status_code == 200, answer.text
    ids = _created_ids(answer)
    assert _counts(api)[0] == before[0] + 200
    assert len(stored_blob_ids(api.hub) - blobs_before) == 100
    raw = api.client.get(f"/fhir/Binary/{ids[-2]}", headers=api.ehr)
    assert raw.content == b"document 99"
    found = api.client.get(f"/fhir/DocumentReference?patient={pid}&_count=200", headers=api.ehr)
    assert found.json()["total"] == 100


def test_a_hundred_inline_documents_failing_at_the_last_leave_no_row(api: Api) -> None:
    pid = api.post(patient()).json()["id"]
    before = _counts(api)
    entries = [post(None, _inline_document(pid, f"note {i}".encode())) for i in range(100)]
    entries[-1]["resource"]["content"][0]["attachment"]["size"] = 3
    answer = send(api, transaction(*entries))
    assert answer.status_code == 422, answer.text
    assert "Bundle.entry[99]" in answer.json()["issue"][0]["diagnostics"]
    assert _counts(api) == before


def test_referrals_of_one_transaction_make_their_cases_as_one_by_one(api: Api) -> None:
    p1, p2, p3 = (api.post(patient(mrn=f"MRN-R{i}")).json()["id"] for i in (1, 2, 3))
    alone = api.post(_referral(p3, "Z"))  # the reference: a referral on its own
    assert alone.status_code == 201, alone.text
    bundle = transaction(
        post(None, _referral(p1, "A")),
        post(None, _referral(p2, "B")),
        post(None, _referral(p1, "A")),  # the same order again: the same case
        post(None, _referral(p2, "D", accession="ACC-9")),
        post(None, _referral(p2, "E", accession="ACC-9")),  # joins D's case by accession
        post(None, _referral(p1, "F")),
    )
    answer = send(api, bundle)
    assert answer.status_code == 200, answer.text
    a, b, a2, d, e, f = _created_ids(answer)
    heads = _heads(api, [a, b, a2, d, e, f, p1, p2, alone.json()["id"], p3])
    assert heads[a].case_id == heads[a2].case_id
    assert heads[d].case_id == heads[e].case_id
    cases = {heads[x].case_id for x in (a, b, d, f)}
    assert len(cases) == 4 and None not in cases
    # the subject Patient resources stand for the index patients of their cases
    assert heads[p1].patient_pk is not None and heads[p2].patient_pk is not None
    with api.hub.sessions() as session:
        made = {c.id: c for c in session.scalars(select(Case).where(Case.id.in_(cases)))}
        reference = session.get_one(Case, heads[alone.json()["id"]].case_id)
        events = session.scalars(
            select(CaseEvent.case_id).where(CaseEvent.note.startswith("routed by rule"))
        ).all()
        status_events = session.scalars(
            select(OutboxEvent.payload).where(OutboxEvent.topic == "case.status")
        ).all()
    assert made[heads[a].case_id].patient_pk == heads[p1].patient_pk
    assert made[heads[f].case_id].patient_pk == heads[p1].patient_pk
    assert made[heads[b].case_id].patient_pk == heads[p2].patient_pk
    assert made[heads[d].case_id].accession_number == "ACC-9"
    for case in made.values():
        assert case.status == "requested"
        assert (case.specialty, case.routed_by) == (reference.specialty, reference.routed_by)
    # each new case was routed once and announced once
    assert sorted(events) == sorted([*cases, reference.id])
    assert sorted(p["case_id"] for p in status_events) == sorted([*cases, reference.id])
    # the same Bundle again: the same cases, nothing new
    again = send(api, bundle)
    assert again.status_code == 200, again.text
    heads_again = _heads(api, _created_ids(again))
    assert {h.case_id for h in heads_again.values()} == cases


def test_documents_of_one_transaction_join_their_subjects_newest_open_case(api: Api) -> None:
    p1, p2 = (api.post(patient(mrn=f"MRN-D{i}")).json()["id"] for i in (1, 2))
    older = api.post(_referral(p1, "OLD")).json()["id"]
    newer = api.post(_referral(p1, "NEW")).json()["id"]
    heads = _heads(api, [older, newer])
    assert heads[older].case_id != heads[newer].case_id
    answer = send(
        api,
        transaction(
            post(None, _inline_document(p1)),
            post(None, _inline_document(p2)),
            post(None, _inline_document(p1, b"second")),
        ),
    )
    assert answer.status_code == 200, answer.text
    d1, d2, d3 = _created_ids(answer)
    docs = _heads(api, [d1, d2, d3])
    assert docs[d1].case_id == docs[d3].case_id == heads[newer].case_id
    assert docs[d2].case_id is None
    with api.hub.sessions() as session:
        announced = session.scalars(
            select(OutboxEvent.payload).where(OutboxEvent.topic == "fhir.document")
        ).all()
    by_id = {p["id"]: p["case_id"] for p in announced}
    assert by_id == {d1: heads[newer].case_id, d2: None, d3: heads[newer].case_id}
    read = api.client.get(f"/fhir/DocumentReference/{d3}", headers=api.ehr).json()
    assert base64.b64decode(read["content"][0]["attachment"]["data"]) == b"second"


def test_patients_of_one_transaction_link_their_index_patients(api: Api) -> None:
    # a referral naming the patient by identifier makes the index patient first
    by_identifier = service_request("x", subject={"identifier": {"value": "MRN-I1"}})
    assert api.post(by_identifier).status_code == 201
    answer = send(
        api,
        transaction(post(None, patient(mrn="MRN-I1")), post(None, patient(mrn="MRN-I2"))),
    )
    assert answer.status_code == 200, answer.text
    known, unknown = _created_ids(answer)
    heads = _heads(api, [known, unknown])
    assert heads[known].patient_pk is not None
    assert heads[unknown].patient_pk is None


def test_a_post_may_not_reference_what_the_same_transaction_deletes(api: Api) -> None:
    pid = api.post(patient()).json()["id"]
    bundle = transaction(
        post(None, _referral(pid, "X")),
        {"request": {"method": "DELETE", "url": f"Patient/{pid}"}},
    )
    before = _counts(api)
    answer = send(api, bundle)
    assert answer.status_code == 400, answer.text
    assert "does not resolve" in answer.json()["issue"][0]["diagnostics"]
    assert _counts(api) == before
    assert api.client.get(f"/fhir/Patient/{pid}", headers=api.ehr).status_code == 200
