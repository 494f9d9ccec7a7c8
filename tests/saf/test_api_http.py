"""The /api routes over real HTTP with real tokens: cases, studies, thumbnails, audit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from saf import audit
from saf.app import create_app
from saf.hub import Hub
from saf.models import AuditRecord, Case, Study, utcnow
from tests.saf.tenants import (
    DERMATOLOGY,
    THORACIC,
    People,
    World,
    ehr_login,
    login,
    make_people,
    make_world,
)


@dataclass
class Api:
    """A TestClient on the real app, the data, and one token per kind of caller."""

    client: TestClient
    hub: Hub
    world: World
    people: People
    tokens: dict[str, dict[str, str]]

    def get(self, who: str, url: str, **kw: Any) -> Any:
        return self.client.get(url, headers={**self.tokens[who], **kw.pop("headers", {})}, **kw)

    def post(self, who: str, url: str, **kw: Any) -> Any:
        return self.client.post(url, headers=self.tokens[who], **kw)


@pytest.fixture
def api(hub: Hub, tmp_path: Path) -> Iterator[Api]:
    world = make_world(hub, tmp_path)
    people = make_people(hub, world)
    with TestClient(create_app(hub)) as client:
        tokens = {
            field: login(client, getattr(people, field))
            for field in ("clinician_a", "clinician_b", "thoracic", "thoracic_2", "derm", "admin")
        }
        yield Api(client, hub, world, people, tokens)


def _audit_rows(hub: Hub, **where: Any) -> list[AuditRecord]:
    with hub.sessions() as session:
        query = select(AuditRecord)
        for name, value in where.items():
            query = query.where(getattr(AuditRecord, name) == value)
        return list(session.scalars(query.order_by(AuditRecord.id)))


# --------------------------------------------------------------------------- cases


def test_a_clinician_lists_only_their_clinics_cases(api: Api) -> None:
    response = api.get("clinician_a", "/api/cases")

    assert response.status_code == 200, response.text
    body = response.json()
    assert [i["id"] for i in body["items"]] == api.world.a.cases
    assert body["total"] == 1
    [item] = body["items"]
    assert item["clinic"] == "Clinic A" and item["modalities"] == ["CT"]
    assert item["status"] == "requested" and item["specialty"] == THORACIC
    assert "patient" not in item  # the list carries no patient data
    [row] = _audit_rows(api.hub, event="search", actor_name=api.people.clinician_a)
    assert (row.outcome, row.entity_type, row.detail) == (0, "Case", "1 of 1")


def test_case_list_filters_and_pages_in_worklist_order(api: Api) -> None:
    with api.hub.sessions() as session:
        stat = session.get_one(Case, api.world.derm_case_b)
        stat.priority = "stat"
        stat.due_at = utcnow() + timedelta(hours=1)
        session.commit()

    everything = api.get("clinician_b", "/api/cases").json()
    assert [i["id"] for i in everything["items"]] == [api.world.derm_case_b, api.world.ct_case_b]
    page = api.get("clinician_b", "/api/cases", params={"limit": 1, "offset": 1}).json()
    assert [i["id"] for i in page["items"]] == [api.world.ct_case_b] and page["total"] == 2
    derm = api.get("clinician_b", "/api/cases", params={"specialty": DERMATOLOGY}).json()
    assert [i["id"] for i in derm["items"]] == [api.world.derm_case_b]
    by_priority = api.get("clinician_b", "/api/cases", params={"priority": "routine"}).json()
    assert [i["id"] for i in by_priority["items"]] == [api.world.ct_case_b]
    by_status = api.get("clinician_b", "/api/cases", params={"status": "accepted,completed"})
    assert by_status.json()["items"] == []
    # a clinic filter cannot widen the view: clinic A's name from clinic B's clinician
    other = api.get("clinician_b", "/api/cases", params={"clinic": "Clinic A"}).json()
    assert other == {"total": 0, "limit": 50, "offset": 0, "items": []}
    too_big = api.get("clinician_b", "/api/cases", params={"limit": 100_000})
    assert too_big.status_code == 422


def test_a_specialist_lists_the_cases_routed_to_them(api: Api) -> None:
    thoracic = api.get("thoracic", "/api/cases").json()
    derm = api.get("derm", "/api/cases").json()

    assert {i["id"] for i in thoracic["items"]} == {api.world.a.cases[0], api.world.ct_case_b}
    assert [i["id"] for i in derm["items"]] == [api.world.derm_case_b]


def test_case_detail_unseals_the_patient_and_lists_studies_series_history(api: Api) -> None:
    case_id = api.world.a.cases[0]

    response = api.get("clinician_a", f"/api/cases/{case_id}")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["patient"]["name"] == "ALPHA^ANNA"
    assert body["patient"]["patient_id"] == "PA1"
    assert body["patient"]["birth_date"]
    [study] = body["studies"]
    assert study["id"] == api.world.a.studies[0]
    [series] = study["series"]
    assert series["modality"] == "CT"
    assert series["thumbnail"] == {
        "url": f"/api/series/{series['id']}/thumbnail",
        "placeholder": False,
    }
    assert len(series["instances"]) == 2
    assert all(i["thumbnail"]["placeholder"] is False for i in series["instances"])
    assert [h["to_status"] for h in body["history"]] == ["requested"]
    assert response.headers["cache-control"].startswith("no-store")
    [row] = _audit_rows(api.hub, event="read", entity_id=case_id)
    assert (row.outcome, row.entity_type, row.clinic_id) == (0, "Case", api.world.a.clinic_id)
    assert row.patient_pk == api.world.a.patients[0]
    assert row.actor_name == api.people.clinician_a and row.source_address == "testclient"


def test_another_clinics_case_answers_exactly_like_a_missing_one(api: Api) -> None:
    hidden = api.get("clinician_a", f"/api/cases/{api.world.ct_case_b}")
    missing = api.get("clinician_a", "/api/cases/" + "0" * 32)

    assert hidden.status_code == missing.status_code == 404
    assert hidden.json() == missing.json() == {"detail": "not found"}
    refused = _audit_rows(api.hub, event="read", outcome=audit.MINOR_FAILURE)
    assert {r.entity_id for r in refused} == {api.world.ct_case_b, "0" * 32}
    assert all(r.clinic_id is None and r.patient_pk is None for r in refused)  # no hint


def test_a_specialist_claims_once_and_a_second_claim_is_409(api: Api) -> None:
    case_id = api.world.ct_case_b

    first = api.post("thoracic", f"/api/cases/{case_id}/claim")
    second = api.post("thoracic_2", f"/api/cases/{case_id}/claim")

    assert first.status_code == 200, first.text
    assert first.json() == {"id": case_id, "status": "accepted", "assigned_to": "dr.thorax"}
    assert second.status_code == 409
    assert second.json()["detail"] == f"case {case_id} cannot be claimed: claimed by dr.thorax"
    detail = api.get("thoracic_2", f"/api/cases/{case_id}").json()
    assert (detail["status"], detail["assigned_to"]) == ("accepted", "dr.thorax")
    updates = _audit_rows(api.hub, event="update", entity_id=case_id)
    assert [(r.actor_name, r.outcome) for r in updates] == [("dr.thorax", 0), ("dr.lung", 4)]


def test_only_specialists_claim_and_only_what_they_see(api: Api) -> None:
    clinician = api.post("clinician_b", f"/api/cases/{api.world.ct_case_b}/claim")
    wrong_list = api.post("derm", f"/api/cases/{api.world.ct_case_b}/claim")

    assert clinician.status_code == 403
    assert clinician.json()["detail"] == "only a specialist can claim a case"
    assert wrong_list.status_code == 404 and wrong_list.json() == {"detail": "not found"}
    assert api.get("derm", f"/api/cases/{api.world.ct_case_b}").status_code == 404


# --------------------------------------------------------------------------- studies


def test_study_detail_and_thumbnails(api: Api) -> None:
    study_id = api.world.a.studies[0]

    study = api.get("clinician_a", f"/api/studies/{study_id}")

    assert study.status_code == 200, study.text
    body = study.json()
    assert body["case_id"] == api.world.a.cases[0]
    assert body["patient"]["name"] == "ALPHA^ANNA"
    [series] = body["series"]
    image = api.get("clinician_a", series["thumbnail"]["url"])
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg"
    assert image.content[:3] == b"\xff\xd8\xff"
    assert "no-store" in image.headers["cache-control"]
    etag = image.headers["etag"]
    again = api.get("clinician_a", series["thumbnail"]["url"], headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    instance = series["instances"][0]
    small = api.get("clinician_a", instance["thumbnail"]["url"])
    assert small.status_code == 200 and small.content[:3] == b"\xff\xd8\xff"
    assert small.headers["etag"] != etag
    reads = _audit_rows(api.hub, event="read", actor_name=api.people.clinician_a)
    assert [(r.entity_type, r.outcome) for r in reads] == [
        ("Study", 0),
        ("Series", 0),
        ("Series", 0),
        ("Instance", 0),
    ]
    assert all(r.patient_pk == api.world.a.patients[0] for r in reads)


def test_specialists_see_studies_and_thumbnails_of_their_cases_only(api: Api) -> None:
    ct_b, derm_b = api.world.b.studies
    seen = api.get("thoracic", f"/api/studies/{ct_b}")
    hidden = api.get("thoracic", f"/api/studies/{derm_b}")

    assert seen.status_code == 200 and seen.json()["patient"]["name"] == "BRAVO^BERT"
    assert hidden.status_code == 404
    with api.hub.sessions() as session:
        assert session.get(Study, derm_b) is not None
    derm_series = api.get("derm", f"/api/studies/{derm_b}").json()["series"][0]
    assert api.get("thoracic", f"/api/series/{derm_series['id']}/thumbnail").status_code == 404
    instance_url = derm_series["instances"][0]["thumbnail"]["url"]
    assert api.get("thoracic", instance_url).status_code == 404
    assert api.get("derm", instance_url).status_code == 200


# --------------------------------------------------------------------------- EHR clients


def test_an_ehr_client_is_limited_by_its_clinic_and_its_scopes(api: Api) -> None:
    headers = ehr_login(api.client, "ehr-b", "Clinic B", ["system/Task.rs"])

    cases = api.client.get("/api/cases", headers=headers)
    case_a = api.client.get(f"/api/cases/{api.world.a.cases[0]}", headers=headers)
    study_b = api.client.get(f"/api/studies/{api.world.b.studies[0]}", headers=headers)

    assert cases.status_code == 200
    assert {i["id"] for i in cases.json()["items"]} == set(api.world.b.cases)
    assert case_a.status_code == 404
    assert study_b.status_code == 403
    assert study_b.json()["error"] == "insufficient_scope"
    claim = api.client.post(f"/api/cases/{api.world.ct_case_b}/claim", headers=headers)
    assert claim.status_code == 403  # no Task.u scope, and no specialist either


# --------------------------------------------------------------------------- audit


def test_admins_search_the_audit_trail_as_fhir_auditevents(api: Api) -> None:
    api.get("clinician_a", f"/api/cases/{api.world.a.cases[0]}")
    api.get("clinician_a", f"/api/cases/{api.world.ct_case_b}")
    bad = api.client.post(
        "/auth/token", data={"grant_type": "password", "username": "root.admin", "password": "x"}
    )
    assert bad.status_code in (400, 401)

    everything = api.get("admin", "/api/audit")
    reads = api.get("admin", "/api/audit", params={"subtype": "read", "agent": "anna.clinic-a"})
    refused = api.get("admin", "/api/audit", params={"outcome": "4", "type": "rest"})
    logins = api.get("admin", "/api/audit", params={"type": f"{audit_dcm()}|110114"})
    failed_logins = api.get("admin", "/api/audit", params={"subtype": "110122", "outcome": "4"})
    by_entity = api.get("admin", "/api/audit", params={"entity": f"Task/{api.world.ct_case_b}"})
    today = utcnow().date().isoformat()
    dated = api.get("admin", "/api/audit", params=[("date", f"ge{today}"), ("date", f"le{today}")])
    future = api.get("admin", "/api/audit", params={"date": "gt2999-01-01", "_count": 5})

    assert everything.status_code == 200, everything.text
    bundle = everything.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert bundle["total"] == len(bundle["entry"]) > 8
    first = bundle["entry"][0]["resource"]
    assert first["resourceType"] == "AuditEvent"
    events = [e["resource"] for e in reads.json()["entry"]]
    assert len(events) == 2 and {e["outcome"] for e in events} == {"0", "4"}
    assert all(e["subtype"][0]["code"] == "read" for e in events)
    ok = next(e for e in events if e["outcome"] == "0")
    assert {"reference": f"Patient/{api.world.a.patients[0]}"} in [x["what"] for x in ok["entity"]]
    assert ok["agent"][0]["who"]["display"] == "anna.clinic-a"
    assert [e["resource"]["outcome"] for e in refused.json()["entry"]] == ["4"]
    login_events = [e["resource"] for e in logins.json()["entry"]]
    assert len(login_events) == 7  # six logins in the fixture and the failed one
    [failed] = [e["resource"] for e in failed_logins.json()["entry"]]
    assert failed["agent"][0]["who"]["display"] == "root.admin"
    assert [e["resource"]["id"] for e in by_entity.json()["entry"]] == [refused_id(refused)]
    assert dated.json()["total"] >= bundle["total"]
    assert future.json() == {"resourceType": "Bundle", "type": "searchset", "entry": [], "total": 0}
    searches = _audit_rows(api.hub, event="search", entity_type="AuditEvent")
    assert len(searches) == 8 and all(r.actor_name == "root.admin" for r in searches)


def audit_dcm() -> str:
    return "http://dicom.nema.org/resources/ontology/DCM"


def refused_id(response: Any) -> str:
    [entry] = response.json()["entry"]
    return str(entry["resource"]["id"])


def test_the_audit_trail_is_for_admins_only(api: Api) -> None:
    for who in ("clinician_a", "thoracic"):
        response = api.get(who, "/api/audit")
        assert response.status_code == 403, (who, response.text)


def test_audit_search_rejects_bad_parameters_with_what_to_fix(api: Api) -> None:
    bad_date = api.get("admin", "/api/audit", params={"date": "yesterday"})
    bad_outcome = api.get("admin", "/api/audit", params={"outcome": "5"})

    assert bad_date.status_code == 400 and "ge2026-01-31" in bad_date.json()["detail"]
    assert bad_outcome.status_code == 400 and "0, 4, 8 or 12" in bad_outcome.json()["detail"]
