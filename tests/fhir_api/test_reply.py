"""The specialist's reply through the FHIR API: DiagnosticReport and Communication move the
case (its Task) on both databases, with real user and client tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from saf.app import create_app
from saf.hub import Hub
from saf.models import Case, CaseEvent, FhirResource
from tests.factories import login_as
from tests.fhir_api.test_routes import FHIR, Api, api, patient, service_request
from tests.saf.tenants import login, make_people, make_world

__all__ = ["api"]  # the fixture, shared with test_routes


def _post(api: Api, body: dict[str, Any], who: dict[str, str]) -> Any:
    return api.client.post(
        f"/fhir/{body['resourceType']}",
        content=json.dumps(body),
        headers={**who, "Content-Type": FHIR},
    )


def _referral(api: Api) -> tuple[str, str, str, dict[str, str]]:
    """A referral from clinic B's EHR: (patient id, ServiceRequest id, case id, a
    specialist of its worklist's headers)."""
    pid = api.post(patient()).json()["id"]
    sr = api.post(service_request(pid))
    assert sr.status_code == 201, sr.text
    with api.hub.sessions() as session:
        head = session.get_one(FhirResource, sr.json()["id"])
        assert head.case_id is not None
        case = session.get_one(Case, head.case_id)
        specialty = case.specialty
    specialist = login_as(api.client, "specialist", username="dr.rad", specialties=[specialty])
    return pid, sr.json()["id"], head.case_id, specialist


def report(pid: str, sr_id: str, status: str = "final", **extra: Any) -> dict[str, Any]:
    """A reply like diagnosticreport-example-ultrasound.json, based on the referral."""
    body: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": status,
        "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": "2026-11-27T10:00:00Z",
        "conclusion": "No acute findings.",
    }
    body.update(extra)
    return body


def question(sr_id: str, text: str = "Is there a prior CT?", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Communication",
        "status": "completed",
        "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
        "payload": [{"contentString": text}],
    }
    body.update(extra)
    return body


def _task_status(api: Api, case_id: str, who: dict[str, str]) -> str:
    task = api.client.get(f"/fhir/Task/{case_id}", headers=who)
    assert task.status_code == 200, task.text
    return str(task.json()["status"])


def _statuses(api: Api, case_id: str) -> list[str]:
    with api.hub.sessions() as session:
        events = session.scalars(
            select(CaseEvent).where(CaseEvent.case_id == case_id).order_by(CaseEvent.id)
        ).all()
        return [e.to_status for e in events if e.from_status != e.to_status]


def test_final_report_completes_the_case_through_legal_states(api: Api) -> None:
    pid, sr_id, case_id, specialist = _referral(api)
    written = _post(api, report(pid, sr_id), specialist)
    assert written.status_code == 201, written.text
    assert _task_status(api, case_id, api.clinician) == "completed"
    assert _statuses(api, case_id) == ["requested", "accepted", "in-progress", "completed"]
    # the clinic reads the reply; it belongs to the case's clinic
    rid = written.json()["id"]
    read = api.client.get(f"/fhir/DiagnosticReport/{rid}", headers=api.clinician)
    assert read.status_code == 200 and read.json()["conclusion"] == "No acute findings."
    found = api.client.get(
        f"/fhir/DiagnosticReport?based-on=ServiceRequest/{sr_id}&status=final",
        headers=api.clinician,
    ).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [rid]
    # another clinic sees nothing
    assert (
        api.client.get(f"/fhir/DiagnosticReport/{rid}", headers=api.other_clinic).status_code == 404
    )
    # a retried write changes nothing on the case
    again = _post(api, report(pid, sr_id), specialist)
    assert again.status_code == 201, again.text
    assert _statuses(api, case_id) == ["requested", "accepted", "in-progress", "completed"]
    with api.hub.sessions() as session:
        assert session.get_one(Case, case_id).assigned_to == "dr.rad"


def test_preliminary_report_means_in_progress(api: Api) -> None:
    pid, sr_id, case_id, specialist = _referral(api)
    assert _post(api, report(pid, sr_id, "preliminary"), specialist).status_code == 201
    assert _task_status(api, case_id, specialist) == "in-progress"
    assert _post(api, report(pid, sr_id, "amended"), specialist).status_code == 201
    assert _task_status(api, case_id, specialist) == "completed"
    # a late preliminary does not reopen it
    assert _post(api, report(pid, sr_id, "preliminary"), specialist).status_code == 201
    assert _task_status(api, case_id, specialist) == "completed"


def test_report_about_the_task_and_registered_report_changes_nothing(api: Api) -> None:
    pid, sr_id, case_id, specialist = _referral(api)
    body = report(pid, sr_id, "registered")
    assert _post(api, body, specialist).status_code == 201
    assert _task_status(api, case_id, specialist) == "requested"
    comm = question(sr_id)
    del comm["basedOn"]
    comm["about"] = [{"reference": f"Task/{case_id}"}]
    assert _post(api, comm, specialist).status_code == 201
    assert _task_status(api, case_id, specialist) == "on-hold"


def test_question_and_answer_hold_and_resume_the_case(api: Api) -> None:
    pid, sr_id, case_id, specialist = _referral(api)
    asked = _post(api, question(sr_id), specialist)
    assert asked.status_code == 201, asked.text
    assert _task_status(api, case_id, api.clinician) == "on-hold"
    qid = asked.json()["id"]
    # the clinic reads the question and answers it
    assert api.client.get(f"/fhir/Communication/{qid}", headers=api.clinician).status_code == 200
    answer = {
        "resourceType": "Communication",
        "status": "completed",
        "inResponseTo": [{"reference": f"Communication/{qid}"}],
        "payload": [{"contentString": "Yes, from 2025; sending it."}],
    }
    answered = _post(api, answer, api.clinician)
    assert answered.status_code == 201, answered.text
    assert _task_status(api, case_id, api.clinician) == "in-progress"
    # the specialist sees the answer (it is linked to the case)
    aid = answered.json()["id"]
    assert api.client.get(f"/fhir/Communication/{aid}", headers=specialist).status_code == 200
    assert _post(api, report(pid, sr_id), specialist).status_code == 201
    assert _task_status(api, case_id, api.clinician) == "completed"
    assert _statuses(api, case_id) == [
        "requested",
        "accepted",
        "on-hold",
        "in-progress",
        "completed",
    ]
    # a question on a finished case is refused and stores nothing
    late = _post(api, question(sr_id), specialist)
    assert late.status_code == 409, late.text
    assert late.json()["issue"][0]["expression"] == ["Communication.status"]
    with api.hub.sessions() as session:
        count = session.scalars(
            select(FhirResource).where(FhirResource.resource_type == "Communication")
        ).all()
    assert len(count) == 2


def test_a_reply_must_name_a_case_the_specialist_sees(api: Api) -> None:
    pid, sr_id, _case_id, specialist = _referral(api)
    stranger = login_as(api.client, "specialist", username="dr.derm", specialties=["derm"])
    refused = _post(api, report(pid, sr_id), stranger)
    assert refused.status_code == 400, refused.text
    assert refused.json()["issue"][0]["expression"] == ["DiagnosticReport.basedOn[0]"]
    loose = report(pid, sr_id)
    del loose["basedOn"], loose["subject"]
    refused = _post(api, loose, specialist)
    assert refused.status_code == 400, refused.text
    assert "name the case" in refused.json()["issue"][0]["diagnostics"]
    # clinicians may not write reports at all (role scopes)
    assert _post(api, report(pid, sr_id), api.clinician).status_code == 403


def test_invalid_report_status_is_refused(api: Api) -> None:
    pid, sr_id, _case_id, specialist = _referral(api)
    bad = _post(api, report(pid, sr_id, "done"), specialist)
    assert bad.status_code == 400
    assert bad.json()["issue"][0]["expression"] == ["DiagnosticReport.status"]


@pytest.mark.slow
def test_report_on_the_imaging_study_completes_a_study_only_case(hub: Hub, tmp_path: Path) -> None:
    """A study that arrived without a referral still makes a case; a report naming its
    ImagingStudy (id = saf's Study.id) completes it; a dermatologist cannot."""
    world = make_world(hub, tmp_path)
    people = make_people(hub, world)
    study_id = next(k for k, v in world.b.case_of_study.items() if v == world.ct_case_b)
    with TestClient(create_app(hub)) as client:
        thoracic = login(client, people.thoracic)
        derm = login(client, people.derm)
        body = {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {"text": "CT chest"},
            "imagingStudy": [{"reference": f"ImagingStudy/{study_id}"}],
            "conclusion": "Clear lungs.",
        }
        headers = {"Content-Type": FHIR}
        refused = client.post(
            "/fhir/DiagnosticReport", content=json.dumps(body), headers={**derm, **headers}
        )
        assert refused.status_code == 400, refused.text
        assert refused.json()["issue"][0]["expression"] == ["DiagnosticReport.imagingStudy[0]"]
        written = client.post(
            "/fhir/DiagnosticReport", content=json.dumps(body), headers={**thoracic, **headers}
        )
        assert written.status_code == 201, written.text
        clinic = login(client, people.clinician_b)
        task = client.get(f"/fhir/Task/{world.ct_case_b}", headers=clinic).json()
        assert task["status"] == "completed"
        report = client.get(f"/fhir/DiagnosticReport/{written.json()['id']}", headers=clinic)
        assert report.status_code == 200


def test_a_withdrawn_referral_cancels_its_case_unless_finished(api: Api) -> None:
    _, sr_id, case_id, _ = _referral(api)
    current = api.client.get(f"/fhir/ServiceRequest/{sr_id}", headers=api.ehr).json()
    revoked = api.client.put(
        f"/fhir/ServiceRequest/{sr_id}",
        content=json.dumps({**current, "status": "revoked"}),
        headers={**api.ehr, "Content-Type": FHIR},
    )
    assert revoked.status_code == 200, revoked.text
    assert _task_status(api, case_id, api.ehr) == "cancelled"
    assert _statuses(api, case_id)[-1] == "cancelled"
    # the same withdrawal again changes nothing
    again = api.client.get(f"/fhir/ServiceRequest/{sr_id}", headers=api.ehr).json()
    api.client.put(
        f"/fhir/ServiceRequest/{sr_id}",
        content=json.dumps({**again, "status": "entered-in-error"}),
        headers={**api.ehr, "Content-Type": FHIR},
    )
    assert _statuses(api, case_id).count("cancelled") == 1


def test_a_referral_withdrawn_after_the_reply_leaves_the_case_completed(api: Api) -> None:
    pid, sr_id, case_id, specialist = _referral(api)
    assert _post(api, report(pid, sr_id), specialist).status_code == 201
    current = api.client.get(f"/fhir/ServiceRequest/{sr_id}", headers=api.ehr).json()
    revoked = api.client.put(
        f"/fhir/ServiceRequest/{sr_id}",
        content=json.dumps({**current, "status": "revoked"}),
        headers={**api.ehr, "Content-Type": FHIR},
    )
    assert revoked.status_code == 200, revoked.text
    assert _task_status(api, case_id, api.ehr) == "completed"


def test_a_worklist_page_with_its_referrals_and_patients_in_one_bundle(api: Api) -> None:
    pid, sr_id, case_id, specialist = _referral(api)
    page = api.client.get(
        "/fhir/Task",
        params=[
            ("status", "requested"),
            ("_include", "Task:based-on"),
            ("_include", "Task:patient"),
        ],
        headers=specialist,
    )
    assert page.status_code == 200, page.text
    modes = {
        (e["resource"]["resourceType"], e["resource"]["id"]): e["search"]["mode"]
        for e in page.json()["entry"]
    }
    assert modes == {
        ("Task", case_id): "match",
        ("ServiceRequest", sr_id): "include",
        ("Patient", pid): "include",
    }
    # the clinic of another tenant gets neither the Task nor what it would include
    other = api.client.get(
        "/fhir/Task", params={"_include": "Task:based-on"}, headers=api.other_clinic
    ).json()
    assert other.get("entry", []) == []
    bad = api.client.get("/fhir/Task", params={"_include": "Task:owner"}, headers=specialist)
    assert bad.status_code == 400 and bad.json()["issue"][0]["expression"] == ["_include"]
