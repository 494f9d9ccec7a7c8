"""Task update and patch (fhir_api.tasks, saf.cases.update_task) over HTTP, on both
databases, with real user and client tokens: the Task's status is the case's state."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from saf.app import create_app
from saf.hub import Hub
from saf.models import AuditRecord, Case
from tests.factories import client_token, login_as, make_client
from tests.fhir_api.test_routes import patient, service_request

FHIR = "application/fhir+json"
PATCH = "application/json-patch+json"


@dataclass
class World:
    client: TestClient
    hub: Hub
    case_id: str
    specialty: str
    clinician: dict[str, str]
    ehr: dict[str, str]
    other_clinic: dict[str, str]
    specialist: dict[str, str]
    colleague: dict[str, str]
    other_specialty: dict[str, str]

    def read(self, who: dict[str, str] | None = None) -> httpx.Response:
        return self.client.get(f"/fhir/Task/{self.case_id}", headers=who or self.clinician)

    def patch(
        self, ops: Any, who: dict[str, str], version: str | None = None, **headers: str
    ) -> httpx.Response:
        sent = {**who, "Content-Type": PATCH, **headers}
        if version is not None:
            sent["If-Match"] = f'W/"{version}"'
        data = ops if isinstance(ops, (bytes, str)) else json.dumps(ops)
        return self.client.patch(f"/fhir/Task/{self.case_id}", content=data, headers=sent)

    def put(self, task: dict[str, Any], who: dict[str, str], **headers: str) -> httpx.Response:
        return self.client.put(
            f"/fhir/Task/{self.case_id}",
            content=json.dumps(task),
            headers={**who, "Content-Type": FHIR, **headers},
        )


@pytest.fixture
def world(hub: Hub) -> Iterator[World]:
    with TestClient(create_app(hub)) as client:
        clinician = login_as(client, username="bert.b", clinic="Clinic B")
        info, key = make_client(hub, "ehr-b", clinic="Clinic B", scopes=["system/*.cruds"])
        ehr = client_token(client, info.id, key, scope="system/*.cruds")
        other = login_as(client, username="anna.a", clinic="Clinic A")
        headers = {**ehr, "Content-Type": FHIR}
        pid = client.post("/fhir/Patient", content=json.dumps(patient()), headers=headers)
        referral = service_request(pid.json()["id"], performerType={"coding": [{"code": "chest"}]})
        sent = client.post("/fhir/ServiceRequest", content=json.dumps(referral), headers=headers)
        assert sent.status_code == 201, sent.text
        with hub.sessions() as session:
            case = session.scalars(select(Case)).one()
        specialist = login_as(client, "specialist", username="dr.w", specialties=[case.specialty])
        colleague = login_as(client, "specialist", username="dr.v", specialties=[case.specialty])
        derm = login_as(client, "specialist", username="dr.skin", specialties=["dermatology"])
        yield World(
            client,
            hub,
            case.id,
            case.specialty,
            clinician,
            ehr,
            other,
            specialist,
            colleague,
            derm,
        )


def _outcome(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return body


def _case(world: World) -> Case:
    with world.hub.sessions() as session:
        return session.get_one(Case, world.case_id)


def test_claim_by_patch_is_the_viewer_claim(world: World) -> None:
    before = world.read(world.specialist)
    version = before.json()["meta"]["versionId"]
    assert before.headers["ETag"] == f'W/"{version}"'
    claim = [
        {"op": "test", "path": "/status", "value": "requested"},
        {"op": "replace", "path": "/status", "value": "accepted"},
        {"op": "add", "path": "/owner", "value": {"reference": "Practitioner/dr.w"}},
    ]
    done = world.patch(claim, world.specialist, version)
    assert done.status_code == 200, done.text
    task = done.json()
    assert task["status"] == "accepted"
    assert task["owner"] == {"reference": "Practitioner/dr.w", "display": "dr.w"}
    new_version = task["meta"]["versionId"]
    assert int(new_version) == int(version) + 1
    assert done.headers["ETag"] == f'W/"{new_version}"'
    assert done.headers["Location"].endswith(f"/fhir/Task/{world.case_id}")
    assert done.headers["Last-Modified"].endswith("GMT")
    # one state: the case, the Task read, the viewer's worklist and case page agree
    case = _case(world)
    assert (case.status, case.assigned_to) == ("accepted", "dr.w")
    assert world.read(world.clinician).json()["status"] == "accepted"
    listed = world.client.get(
        "/api/cases", params={"specialty": world.specialty}, headers=world.specialist
    ).json()["items"]
    assert [(c["id"], c["status"], c["assigned_to"]) for c in listed] == [
        (world.case_id, "accepted", "dr.w")
    ]
    history = world.client.get(f"/api/cases/{world.case_id}", headers=world.specialist).json()
    assert history["history"][-1]["note"] == "claimed"
    # a second claim (a colleague, no If-Match) is refused by the state machine
    again = world.patch(
        [{"op": "replace", "path": "/status", "value": "accepted"}], world.colleague
    )
    assert again.status_code == 200  # already accepted: nothing asked of the case
    taken = world.patch(
        [{"op": "replace", "path": "/owner", "value": {"reference": "Practitioner/dr.v"}}],
        world.colleague,
    )
    assert _outcome(taken, 403)["issue"][0]["code"] == "forbidden"
    assert _case(world).assigned_to == "dr.w"
    # audited as an update of the case, with the change and the version
    with world.hub.sessions() as session:
        rows = session.scalars(
            select(AuditRecord).where(
                AuditRecord.event == "update", AuditRecord.entity_id == world.case_id
            )
        ).all()
    details = [(r.actor_name, r.outcome, r.detail) for r in rows]
    assert (
        "dr.w",
        0,
        f"patch: version {new_version}; status requested -> accepted; owner None -> dr.w",
    ) in details
    assert any(name == "dr.v" and outcome == 4 for name, outcome, _ in details)


def test_release_start_hold_and_hand_over(world: World) -> None:
    replace = [{"op": "replace", "path": "/status", "value": "accepted"}]
    assert world.patch(replace, world.specialist).status_code == 200
    assert _case(world).assigned_to == "dr.w"  # the claim made the caller the owner
    for status in ("in-progress", "on-hold", "in-progress"):
        moved = world.patch(
            [{"op": "replace", "path": "/status", "value": status}], world.specialist
        )
        assert moved.status_code == 200, moved.text
        assert _case(world).status == status
    handed = world.patch(
        [{"op": "replace", "path": "/owner", "value": {"reference": "Practitioner/dr.v"}}],
        world.specialist,
    )
    assert handed.status_code == 200, handed.text
    assert _case(world).assigned_to == "dr.v"
    # not to someone outside the worklist
    wrong = world.patch(
        [{"op": "replace", "path": "/owner", "value": {"reference": "Practitioner/dr.skin"}}],
        world.colleague,
    )
    assert _outcome(wrong, 422)["issue"][0]["expression"] == ["Task.owner"]
    # the former owner no longer has it
    late = world.patch([{"op": "replace", "path": "/status", "value": "on-hold"}], world.specialist)
    assert late.status_code in (403, 404)


def test_release_by_put(world: World) -> None:
    claim = [{"op": "replace", "path": "/status", "value": "accepted"}]
    assert world.patch(claim, world.specialist).status_code == 200
    task = world.read(world.specialist).json()
    task["status"] = "requested"
    del task["owner"]
    released = world.put(task, world.specialist)
    assert released.status_code == 200, released.text
    assert "owner" not in released.json()
    case = _case(world)
    assert (case.status, case.assigned_to) == ("requested", None)


def test_version_conflict_is_412(world: World) -> None:
    version = world.read().json()["meta"]["versionId"]
    ok = world.patch(
        [{"op": "replace", "path": "/priority", "value": "stat"}], world.clinician, version
    )
    assert ok.status_code == 200, ok.text
    assert _case(world).priority == "stat"
    stale = world.patch(
        [{"op": "replace", "path": "/priority", "value": "routine"}], world.clinician, version
    )
    assert _outcome(stale, 412)["issue"][0]["code"] == "conflict"
    assert _case(world).priority == "stat"
    task = world.read().json()
    task["priority"] = "routine"
    stale_put = world.put(task, world.clinician, **{"If-Match": f'W/"{version}"'})
    _outcome(stale_put, 412)
    bad = world.put(task, world.clinician, **{"If-Match": "yesterday"})
    _outcome(bad, 400)
    current = world.put(task, world.clinician, **{"If-Match": f'W/"{task["meta"]["versionId"]}"'})
    assert current.status_code == 200, current.text
    case = _case(world)
    assert case.priority == "routine"
    assert case.due_at > case.created_at


def test_completed_is_refused(world: World) -> None:
    world.patch([{"op": "replace", "path": "/status", "value": "accepted"}], world.specialist)
    world.patch([{"op": "replace", "path": "/status", "value": "in-progress"}], world.specialist)
    done = world.patch(
        [{"op": "replace", "path": "/status", "value": "completed"}], world.specialist
    )
    found = _outcome(done, 422)["issue"][0]
    assert found["expression"] == ["Task.status"]
    assert "DiagnosticReport" in found["diagnostics"]
    task = world.read(world.specialist).json()
    task["status"] = "completed"
    _outcome(world.put(task, world.specialist), 422)
    assert _case(world).status == "in-progress"


def test_immutable_elements_are_refused_with_their_location(world: World) -> None:
    moved = world.patch(
        [{"op": "replace", "path": "/for", "value": {"reference": "Patient/someone-else"}}],
        world.clinician,
    )
    assert _outcome(moved, 422)["issue"][0]["expression"] == ["Task.for"]
    task = world.read().json()
    task["intent"] = "plan"
    task["basedOn"] = []
    task["status"] = "cancelled"
    body = _outcome(world.put(task, world.clinician), 422)
    assert sorted(i["expression"][0] for i in body["issue"]) == ["Task.basedOn", "Task.intent"]
    noted = world.patch([{"op": "add", "path": "/note", "value": [{"text": "x"}]}], world.clinician)
    assert "Communication" in _outcome(noted, 422)["issue"][0]["diagnostics"]
    other = world.read().json()
    other["id"] = "another"
    assert _outcome(world.put(other, world.clinician), 400)["issue"][0]["expression"] == ["Task.id"]
    assert _case(world).status == "requested"  # nothing was applied


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "frobnicate", "path": "/status", "value": "accepted"}],
        [{"op": "replace", "value": "accepted"}],
        [{"op": "remove", "path": "/nothing/here"}],
        [],
        {"op": "replace", "path": "/status", "value": "accepted"},
        "[{not json",
        [{"op": "replace", "path": "/status", "value": 7}],
    ],
)
def test_malformed_patch_is_400(world: World, ops: Any) -> None:
    _outcome(world.patch(ops, world.specialist), 400)
    assert _case(world).status == "requested"


def test_failed_patch_test_is_409(world: World) -> None:
    ops = [
        {"op": "test", "path": "/status", "value": "accepted"},
        {"op": "replace", "path": "/status", "value": "in-progress"},
    ]
    _outcome(world.patch(ops, world.specialist), 409)


def test_wrong_content_type_is_415(world: World) -> None:
    ops = [{"op": "replace", "path": "/status", "value": "accepted"}]
    _outcome(world.patch(ops, world.specialist, **{"Content-Type": FHIR}), 415)
    task = world.read(world.specialist).json()
    sent = world.client.put(
        f"/fhir/Task/{world.case_id}",
        content=json.dumps(task),
        headers={**world.specialist, "Content-Type": PATCH},
    )
    _outcome(sent, 415)
    assert _case(world).status == "requested"


def test_tenancy(world: World) -> None:
    cancel = [{"op": "replace", "path": "/status", "value": "cancelled"}]
    claim = [{"op": "replace", "path": "/status", "value": "accepted"}]
    # another clinic and a specialist of another worklist: as for reads
    _outcome(world.patch(claim, world.other_clinic), 404)
    _outcome(world.patch(cancel, world.other_clinic), 404)
    assert world.read(world.other_specialty).status_code == 404
    _outcome(world.patch(claim, world.other_specialty), 404)
    # the clinic may not claim its consult, nor may a specialist cancel it
    assert (
        "specialist"
        in _outcome(world.patch(claim, world.clinician), 403)["issue"][0]["diagnostics"]
    )
    _outcome(world.patch(cancel, world.specialist), 403)
    # an admin sees no cases
    admin = login_as(world.client, "admin", username="root")
    assert world.patch(cancel, admin).status_code in (403, 404)
    assert _case(world).status == "requested"
    # the clinic cancels (its EHR here); the specialists' worklist no longer shows it
    done = world.patch(cancel, world.ehr)
    assert done.status_code == 200, done.text
    assert _case(world).status == "cancelled"
    listed = world.client.get("/api/cases", headers=world.specialist).json()
    assert listed["total"] == 0
    assert world.read(world.clinician).json()["status"] == "cancelled"
    final = world.patch([{"op": "replace", "path": "/priority", "value": "stat"}], world.ehr)
    assert "final" in _outcome(final, 409)["issue"][0]["diagnostics"]


def test_reject_by_a_specialist(world: World) -> None:
    rejected = world.patch(
        [{"op": "replace", "path": "/status", "value": "rejected"}], world.specialist
    )
    assert rejected.status_code == 200, rejected.text
    assert _case(world).status == "rejected"
    again = world.patch(
        [{"op": "replace", "path": "/status", "value": "accepted"}], world.clinician
    )
    _outcome(again, 409)
