"""The FHIR REST API over HTTP, on both databases, with real tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from saf.app import create_app
from saf.hub import Hub
from saf.models import AuditRecord, Case, CaseReferral, FhirVersion
from tests.factories import at_once, client_token, login_as, make_client, served_api

FHIR = "application/fhir+json"
V2 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def patient(mrn: str = "MRN-1", family: str = "Chalmers") -> dict[str, Any]:
    """Like the spec's Patient example (patient-example.json), trimmed."""
    return {
        "resourceType": "Patient",
        "identifier": [
            {
                "use": "usual",
                "type": {"coding": [{"system": V2, "code": "MR"}]},
                "system": "urn:oid:1.2.36.146.595.217.0.1",
                "value": mrn,
            }
        ],
        "active": True,
        "name": [{"use": "official", "family": family, "given": ["Peter", "James"]}],
        "gender": "male",
        "birthDate": "1974-12-25",
        "address": [{"use": "home", "line": ["534 Erewhon St"], "city": "PleasantVille"}],
    }


def practitioner() -> dict[str, Any]:
    """Like practitioner-example.json."""
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": "http://www.acme.org/practitioners", "value": "23"}],
        "active": True,
        "name": [{"family": "Careful", "given": ["Adam"], "prefix": ["Dr"]}],
    }


def organization() -> dict[str, Any]:
    """Like organization-example.json."""
    return {
        "resourceType": "Organization",
        "identifier": [{"system": "urn:oid:2.16.528.1", "value": "91654"}],
        "active": True,
        "name": "Clinic B Health Centre",
        "telecom": [{"system": "phone", "value": "022-655 2300", "use": "work"}],
    }


def service_request(patient_id: str, **extra: Any) -> dict[str, Any]:
    """A referral like servicerequest-example-di.json (a chest CT order)."""
    sr: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "identifier": [
            {
                "type": {"coding": [{"system": V2, "code": "PLAC"}]},
                "system": "urn:oid:1.3.4.5.6.7",
                "value": "2345234234234",
            },
            {
                "type": {"coding": [{"system": V2, "code": "ACSN"}]},
                "system": "urn:oid:1.3.4.5.6.8",
                "value": "ACC-77",
            },
        ],
        "status": "active",
        "intent": "original-order",
        "priority": "urgent",
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": "2026-11-27T09:33:27+07:00",
        "reasonCode": [{"text": "persistent cough"}],
    }
    sr.update(extra)
    return sr


@dataclass
class Api:
    client: TestClient
    hub: Hub
    clinician: dict[str, str]
    ehr: dict[str, str]
    other_clinic: dict[str, str]

    def post(self, body: Any, who: dict[str, str] | None = None, **headers: str) -> Any:
        kind = body["resourceType"] if isinstance(body, dict) else "Patient"
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return self.client.post(
            f"/fhir/{kind}",
            content=data,
            headers={**(who or self.ehr), "Content-Type": FHIR, **headers},
        )


@pytest.fixture
def api(hub: Hub) -> Iterator[Api]:
    with TestClient(create_app(hub)) as client:
        clinician = login_as(client, username="bert.b", clinic="Clinic B")
        info, key = make_client(hub, "ehr-b", clinic="Clinic B", scopes=["system/*.cruds"])
        ehr = client_token(client, info.id, key, scope="system/*.cruds")
        other = login_as(client, username="anna.a", clinic="Clinic A")
        yield Api(client, hub, clinician, ehr, other)


def _meta_aside(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


@pytest.mark.parametrize("make", [patient, practitioner, organization])
def test_create_then_read_round_trips(api: Api, make: Any) -> None:
    sent = make()
    created = api.post(sent)
    assert created.status_code == 201, created.text
    assert created.headers["content-type"].startswith(FHIR)
    assert created.headers["etag"] == 'W/"1"'
    assert "last-modified" in created.headers
    rid = created.json()["id"]
    assert created.headers["location"].endswith(f"/fhir/{sent['resourceType']}/{rid}/_history/1")
    read = api.client.get(f"/fhir/{sent['resourceType']}/{rid}", headers=api.clinician)
    assert read.status_code == 200, read.text
    assert _meta_aside(read.json()) == sent
    assert read.json()["meta"]["versionId"] == "1"


def test_content_is_sealed_at_rest(api: Api) -> None:
    rid = api.post(patient(family="Zyxwvut")).json()["id"]
    with api.hub.sessions() as session:
        sealed = session.scalars(
            select(FhirVersion.content_sealed).where(FhirVersion.resource_id == rid)
        ).one()
    assert sealed and "Zyxwvut" not in sealed


def test_referral_makes_a_case_and_specialist_sees_it(api: Api) -> None:
    pid = api.post(patient()).json()["id"]
    created = api.post(service_request(pid))
    assert created.status_code == 201, created.text
    with api.hub.sessions() as session:
        referral = session.scalars(select(CaseReferral)).one()
        case = session.get_one(Case, referral.case_id)
    assert referral.service_request_id == "urn:oid:1.3.4.5.6.7|2345234234234"
    assert referral.accession_number == "ACC-77"
    assert case.priority == "urgent"
    assert case.accession_number == "ACC-77"
    specialist = login_as(api.client, "specialist", username="dr.gen", specialties=[case.specialty])
    other = login_as(api.client, "specialist", username="dr.none", specialties=["nothing"])
    sr_id = created.json()["id"]
    assert api.client.get(f"/fhir/ServiceRequest/{sr_id}", headers=specialist).status_code == 200
    assert api.client.get(f"/fhir/Patient/{pid}", headers=specialist).status_code == 200
    assert api.client.get(f"/fhir/ServiceRequest/{sr_id}", headers=other).status_code == 404
    # the same referral again joins the same case
    again = api.post(service_request(pid))
    assert again.status_code == 201
    with api.hub.sessions() as session:
        assert len(session.scalars(select(Case)).all()) == 1


def test_draft_referral_makes_no_case_until_active(api: Api) -> None:
    pid = api.post(patient()).json()["id"]
    draft = api.post(service_request(pid, status="draft")).json()
    with api.hub.sessions() as session:
        assert not session.scalars(select(Case)).all()
    draft["status"] = "active"
    put = api.client.put(
        f"/fhir/ServiceRequest/{draft['id']}",
        content=json.dumps(draft),
        headers={**api.ehr, "Content-Type": FHIR, "If-Match": 'W/"1"'},
    )
    assert put.status_code == 200, put.text
    assert put.headers["etag"] == 'W/"2"'
    with api.hub.sessions() as session:
        assert len(session.scalars(select(Case)).all()) == 1


def test_another_clinic_sees_nothing(api: Api) -> None:
    pid = api.post(patient()).json()["id"]
    other = api.other_clinic
    assert api.client.get(f"/fhir/Patient/{pid}", headers=other).status_code == 404
    missing = api.client.get("/fhir/Patient/doesnotexist", headers=other)
    hidden = api.client.get(f"/fhir/Patient/{pid}", headers=other)
    assert missing.json()["issue"][0]["code"] == hidden.json()["issue"][0]["code"] == "not-found"
    found = api.client.get("/fhir/Patient", headers=other).json()
    assert found["total"] == 0
    # a reference to another clinic's patient does not resolve
    sr = service_request(pid)
    refused = api.post(sr, who=api.other_clinic)
    assert refused.status_code == 400
    assert refused.json()["issue"][0]["expression"] == ["ServiceRequest.subject"]


def test_update_versions_and_conflicts(api: Api) -> None:
    body = api.post(patient()).json()
    rid = body["id"]
    url = f"/fhir/Patient/{rid}"
    headers = {**api.ehr, "Content-Type": FHIR}
    body["gender"] = "other"
    ok = api.client.put(url, content=json.dumps(body), headers={**headers, "If-Match": 'W/"1"'})
    assert ok.status_code == 200, ok.text
    stale = api.client.put(url, content=json.dumps(body), headers={**headers, "If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"
    body["meta"]["versionId"] = "1"
    conflict = api.client.put(url, content=json.dumps(body), headers=headers)
    assert conflict.status_code == 409
    assert conflict.json()["issue"][0]["expression"] == ["Patient.meta.versionId"]
    v1 = api.client.get(f"{url}/_history/1", headers=api.ehr).json()
    assert v1["gender"] == "male"
    history = api.client.get(f"{url}/_history", headers=api.ehr).json()
    assert history["type"] == "history" and history["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]


def test_delete_is_soft(api: Api) -> None:
    rid = api.post(practitioner()).json()["id"]
    deleted = api.client.delete(f"/fhir/Practitioner/{rid}", headers=api.ehr)
    assert deleted.status_code == 204
    gone = api.client.get(f"/fhir/Practitioner/{rid}", headers=api.ehr)
    assert gone.status_code == 410 and gone.json()["issue"][0]["code"] == "deleted"
    assert (
        api.client.get(f"/fhir/Practitioner/{rid}/_history/1", headers=api.ehr).status_code == 200
    )
    history = api.client.get(f"/fhir/Practitioner/{rid}/_history", headers=api.ehr).json()
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    assert api.client.get("/fhir/Practitioner", headers=api.ehr).json()["total"] == 0
    # clinicians correct records, they do not delete them (no delete scope)
    rid2 = api.post(practitioner()).json()["id"]
    assert api.client.delete(f"/fhir/Practitioner/{rid2}", headers=api.clinician).status_code == 403


def test_conditional_create(api: Api) -> None:
    first = api.post(
        patient(), **{"If-None-Exist": "identifier=urn:oid:1.2.36.146.595.217.0.1|MRN-1"}
    )
    assert first.status_code == 201
    second = api.post(
        patient(), **{"If-None-Exist": "identifier=urn:oid:1.2.36.146.595.217.0.1|MRN-1"}
    )
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    api.post(patient())  # a duplicate made without the condition
    third = api.post(patient(), **{"If-None-Exist": "identifier=MRN-1"})
    assert third.status_code == 412


def test_concurrent_conditional_creates_make_one_resource(api: Api) -> None:
    """Identical If-None-Exist creates racing through several API servers (each runs a
    request's search and create without yielding, so the race is between servers, as
    between API processes): one 201, the others 200 naming the same resource."""
    writers = 8
    with ExitStack() as stack:
        bases = [stack.enter_context(served_api(api.hub)) for _ in range(4)]
        clients = [stack.enter_context(httpx.Client(timeout=60)) for _ in range(writers)]
        for n in range(4):
            mrn = f"RACE-{n}"
            identifier = f"identifier=urn:oid:1.2.36.146.595.217.0.1|{mrn}"
            # the same criteria; half the writers put the parameters in another order
            conditions = [f"{identifier}&_lastUpdated=ge2000", f"_lastUpdated=ge2000&{identifier}"]
            body = json.dumps(patient(mrn=mrn))

            def create(i: int, body: str = body, conditions: list[str] = conditions) -> Any:
                return clients[i].post(
                    f"{bases[i % len(bases)]}/fhir/Patient",
                    content=body,
                    headers={**api.ehr, "Content-Type": FHIR, "If-None-Exist": conditions[i % 2]},
                )

            responses = at_once(create, writers)
            statuses = sorted(r.status_code for r in responses)
            assert statuses == [200] * (writers - 1) + [201], [r.text for r in responses]
            assert len({r.json()["id"] for r in responses}) == 1
            found = api.client.get(f"/fhir/Patient?{identifier}", headers=api.ehr)
            assert found.json()["total"] == 1


def test_search(api: Api) -> None:
    ids = [api.post(patient(mrn=f"M{i}")).json()["id"] for i in range(5)]
    pid = ids[0]
    api.post(service_request(pid))
    api.post(service_request(pid, status="draft", identifier=[{"system": "s", "value": "v2"}]))
    get = api.client.get
    page = get("/fhir/Patient", params={"_count": "2"}, headers=api.clinician).json()
    assert page["type"] == "searchset" and page["total"] == 5 and len(page["entry"]) == 2
    links = {link["relation"]: link["url"] for link in page["link"]}
    assert "next" in links and "self" in links
    nxt = get(links["next"].split("testserver")[1], headers=api.clinician).json()
    assert [e["resource"]["id"] for e in nxt["entry"]] == ids[2:4]
    assert (
        get("/fhir/Patient", params={"identifier": "M3"}, headers=api.clinician).json()["total"]
        == 1
    )
    assert (
        get("/fhir/Patient", params={"_id": f"{ids[1]},{ids[2]}"}, headers=api.clinician).json()[
            "total"
        ]
        == 2
    )
    newest = get(
        "/fhir/Patient", params={"_sort": "-_lastUpdated", "_count": "1"}, headers=api.clinician
    ).json()
    assert newest["entry"][0]["resource"]["id"] == ids[-1]
    by_patient = get("/fhir/ServiceRequest", params={"patient": pid}, headers=api.clinician).json()
    assert by_patient["total"] == 2
    active = get(
        "/fhir/ServiceRequest",
        params={"subject": f"Patient/{pid}", "status": "active"},
        headers=api.clinician,
    ).json()
    assert active["total"] == 1
    assert (
        get("/fhir/Patient", params={"_lastUpdated": "gt2000-01-01"}, headers=api.clinician).json()[
            "total"
        ]
        == 5
    )
    assert (
        get("/fhir/Patient", params={"_lastUpdated": "lt2000-01-01"}, headers=api.clinician).json()[
            "total"
        ]
        == 0
    )
    lenient = get("/fhir/Patient", params={"bogus": "1"}, headers=api.clinician)
    assert lenient.status_code == 200
    outcome = lenient.json()["entry"][-1]
    assert outcome["search"]["mode"] == "outcome"
    assert outcome["resource"]["issue"][0]["expression"] == ["bogus"]
    strict = get(
        "/fhir/Patient",
        params={"bogus": "1"},
        headers={**api.clinician, "Prefer": "handling=strict"},
    )
    assert strict.status_code == 400 and strict.json()["resourceType"] == "OperationOutcome"
    with api.hub.sessions() as session:
        assert session.scalars(select(AuditRecord).where(AuditRecord.event == "search")).first()


# --------------------------------------------------------------------------- errors


def _outcome(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR)
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["diagnostics"]
    return body


def test_malformed_json(api: Api) -> None:
    body = _outcome(api.post(b'{"resourceType": "Patient",'), 400)
    assert "line 1" in body["issue"][0]["diagnostics"]


def test_wrong_resource_type(api: Api) -> None:
    response = api.client.post(
        "/fhir/Patient",
        content=json.dumps(practitioner()),
        headers={**api.ehr, "Content-Type": FHIR},
    )
    assert _outcome(response, 400)["issue"][0]["expression"] == ["Patient.resourceType"]


def test_unknown_element_is_located(api: Api) -> None:
    sent = patient()
    sent["name"][0]["nickname"] = "Pete"
    body = _outcome(api.post(sent), 400)
    assert body["issue"][0]["expression"] == ["Patient.name[0].nickname"]


def test_invalid_code_is_located(api: Api) -> None:
    pid = api.post(patient()).json()["id"]
    body = _outcome(api.post(service_request(pid, intent="wish")), 400)
    assert body["issue"][0]["code"] == "code-invalid"
    assert body["issue"][0]["expression"] == ["ServiceRequest.intent"]


def test_invalid_reference(api: Api) -> None:
    body = _outcome(api.post(service_request("nope")), 400)
    assert body["issue"][0]["expression"] == ["ServiceRequest.subject"]


def test_body_too_large_by_content_length(api: Api) -> None:
    big = b'{"resourceType":"Patient","text":"' + b"x" * (50 << 20) + b'"}'
    _outcome(api.post(big), 413)


def test_body_too_large_while_reading(api: Api) -> None:
    api.hub.settings.fhir_max_body_bytes = 1000

    def chunks() -> Iterator[bytes]:
        yield b'{"resourceType":"Patient","gender":"'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    response = api.client.post(
        "/fhir/Patient", content=chunks(), headers={**api.ehr, "Content-Type": FHIR}
    )
    _outcome(response, 413)


def test_xml_is_refused(api: Api) -> None:
    xml = api.client.post(
        "/fhir/Patient",
        content=b"<Patient/>",
        headers={**api.ehr, "Content-Type": "application/fhir+xml"},
    )
    _outcome(xml, 415)
    _outcome(
        api.client.get("/fhir/Patient", headers={**api.ehr, "Accept": "application/fhir+xml"}), 406
    )
    _outcome(api.client.get("/fhir/Patient?_format=xml", headers=api.ehr), 406)


def test_auth_errors_are_operation_outcomes(api: Api) -> None:
    body = _outcome(api.client.get("/fhir/Patient"), 401)
    assert body["issue"][0]["code"] == "login"
    _outcome(api.client.get("/fhir/Basic", headers=api.ehr), 404)


def test_metadata_is_public_and_lists_what_is_served(api: Api) -> None:
    response = api.client.get("/fhir/metadata")
    assert response.status_code == 200
    cap = response.json()
    assert cap["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in cap["rest"][0]["resource"]}
    assert {
        "Patient",
        "ServiceRequest",
        "Practitioner",
        "Organization",
        "Task",
        "DiagnosticReport",
        "Communication",
        "DocumentReference",
        "List",
        "Binary",
    } <= types
    assert {i["code"] for i in cap["rest"][0]["interaction"]} == {"transaction", "batch"}
    assert cap["rest"][0]["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"


def test_task_is_the_case(api: Api) -> None:
    pid = api.post(patient()).json()["id"]
    sr_id = api.post(service_request(pid, performerType={"coding": [{"code": "chest"}]})).json()[
        "id"
    ]
    with api.hub.sessions() as session:
        case = session.scalars(select(Case)).one()
    task = api.client.get(f"/fhir/Task/{case.id}", headers=api.clinician)
    assert task.status_code == 200, task.text
    body = task.json()
    assert body["status"] == "requested" == case.status
    assert body["basedOn"] == [{"reference": f"ServiceRequest/{sr_id}"}]
    assert body["for"] == {"reference": f"Patient/{pid}"}
    assert body["priority"] == "urgent"
    specialty = body["performerType"][0]["coding"][0]["code"]
    assert specialty == case.specialty
    worklist = login_as(api.client, "specialist", username="dr.w", specialties=[specialty])
    found = api.client.get(
        "/fhir/Task",
        params={"performer-type": specialty, "status": "requested,received"},
        headers=worklist,
    ).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [case.id]
    assert api.client.get("/fhir/Task", headers=api.other_clinic).json()["total"] == 0
    assert api.client.get(f"/fhir/Task/{case.id}", headers=api.other_clinic).status_code == 404
    # the state is the case's: a claim shows in the Task
    from saf.cases import claim

    claim(api.hub, case.id, "dr.w")
    claimed = api.client.get(f"/fhir/Task/{case.id}", headers=worklist).json()
    assert claimed["status"] == "accepted" and claimed["owner"]["reference"] == "Practitioner/dr.w"
    assert int(claimed["meta"]["versionId"]) > int(body["meta"]["versionId"])


@pytest.mark.parametrize(
    ("method", "path", "body", "headers"),
    [
        ("POST", "/fhir/Patient", b"[]", {}),
        ("POST", "/fhir/Patient", b'"text"', {}),
        ("POST", "/fhir/Patient", b"\xff\xfe", {}),
        ("POST", "/fhir/Patient", b"[" * 100000, {}),
        ("POST", "/fhir/Patient", b'{"resourceType": "Patient", "identifier": "x"}', {}),
        ("POST", "/fhir/Patient", b"", {}),
        ("POST", "/fhir/Patient", b'{"resourceType": "Patient"}', {"If-None-Exist": "bogus=1"}),
        (
            "POST",
            "/fhir/ServiceRequest",
            b'{"resourceType": "ServiceRequest", "status": "active", "intent": "order",'
            b' "subject": {"reference": "Group/1"}}',
            {},
        ),
        ("PUT", "/fhir/Patient/nope", b'{"resourceType": "Patient", "id": "nope"}', {}),
        ("PUT", "/fhir/Patient/x", b'{"resourceType": "Patient", "id": "y"}', {}),
        ("PUT", "/fhir/Patient/x", b'{"resourceType": "Patient", "id": "x"}', {"If-Match": "?"}),
        ("GET", "/fhir/Patient?_count=many", None, {}),
        ("GET", "/fhir/Patient?_lastUpdated=yesterday", None, {}),
        ("GET", "/fhir/Patient?_lastUpdated=2026-13-40", None, {}),
        ("GET", "/fhir/Patient?_sort=name", None, {}),
        ("GET", "/fhir/Patient/x/_history/one", None, {}),
        ("GET", "/fhir/Patient/x/_history?_count=z", None, {}),
        ("GET", "/fhir/Task?_count=z", None, {}),
        ("GET", "/fhir/Task?_lastUpdated=gt2026-99", None, {}),
        ("DELETE", "/fhir/Patient/nope", None, {}),
    ],
)
def test_bad_input_is_a_4xx_operation_outcome(
    api: Api, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> None:
    response = api.client.request(
        method, path, content=body, headers={**api.ehr, "Content-Type": FHIR, **headers}
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["resourceType"] == "OperationOutcome"


def test_unknown_fhir_paths_answer_operation_outcomes(api: Api) -> None:
    body = _outcome(api.client.get("/fhir/Patient/x/y/z", headers=api.ehr), 404)
    assert body["issue"][0]["code"] == "not-found"
    _outcome(api.client.patch("/fhir/metadata", headers=api.ehr), 405)
    elsewhere = api.client.get("/api/nothing-here", headers=api.ehr)
    assert (elsewhere.status_code, elsewhere.json()) == (404, {"detail": "Not Found"})
