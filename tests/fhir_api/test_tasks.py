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
from sqlalchemy import select, update

from saf.app import create_app
from saf.crypto import value_key_id
from saf.hub import Hub
from saf.keys import rotate
from saf.models import AuditRecord, Case, CaseEvent
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


# --------------------------------------------------------------------------- notes


def test_notes_are_added_stamped_kept_and_sealed(world: World) -> None:
    version = int(world.read().json()["meta"]["versionId"])
    secret = "QUIXOTE-NOTE: prior CT at the district hospital, ask for it"
    added = world.patch(
        [{"op": "add", "path": "/note", "value": [{"text": secret}]}], world.clinician
    )
    assert added.status_code == 200, added.text
    [note] = added.json()["note"]
    assert note["text"] == secret
    assert note["authorString"] == "bert.b"  # stamped: the caller, and the time
    assert note["time"].endswith("Z")
    assert int(added.json()["meta"]["versionId"]) == version + 1
    assert world.read(world.specialist).json()["note"] == [note]

    # a specialist of the worklist answers with a note of their own, by PUT
    task = world.read(world.specialist).json()
    task["note"].append({"text": "seen, will report today", "time": "2026-12-01T10:00:00Z"})
    answered = world.put(task, world.specialist)
    assert answered.status_code == 200, answered.text
    assert answered.json()["note"][0] == note
    assert answered.json()["note"][1] == {
        "text": "seen, will report today",
        "time": "2026-12-01T10:00:00Z",
        "authorReference": {"reference": "Practitioner/dr.w"},
    }
    # an EHR names the author itself
    by_ehr = world.patch(
        [{"op": "add", "path": "/note/-", "value": {"text": "ok", "authorString": "Dr B"}}],
        world.ehr,
    )
    assert by_ehr.status_code == 200, by_ehr.text
    assert by_ehr.json()["note"][2]["authorString"] == "Dr B"
    current = by_ehr.json()

    # notes are kept as written: no change, no removal
    edited = world.patch(
        [{"op": "replace", "path": "/note/0/text", "value": "something else"}], world.clinician
    )
    assert _outcome(edited, 422)["issue"][0]["expression"] == ["Task.note"]
    dropped = dict(current)
    del dropped["note"]
    assert _outcome(world.put(dropped, world.clinician), 422)["issue"][0]["expression"] == [
        "Task.note"
    ]
    # an Annotation needs its text (R4 validation, located)
    bad = world.patch([{"op": "add", "path": "/note/-", "value": {"time": "x"}}], world.clinician)
    assert _outcome(bad, 400)["issue"][0]["expression"][0].startswith("Task.note")
    # another clinic does not see the case at all
    other = world.patch(
        [{"op": "add", "path": "/note/-", "value": {"text": "x"}}], world.other_clinic
    )
    assert other.status_code == 404
    assert world.read().json()["note"] == current["note"]

    # sealed at rest, and never in the audit trail
    with world.hub.sessions() as session:
        sealed = session.get_one(Case, world.case_id).note_sealed
        events = session.scalars(select(CaseEvent.note_sealed)).all()
        details = session.scalars(select(AuditRecord.detail)).all()
    assert sealed is not None and "QUIXOTE" not in sealed
    assert not any("QUIXOTE" in (e or "") for e in events)
    assert not any("QUIXOTE" in (d or "") for d in details)


def test_key_rotation_reseals_notes(world: World) -> None:
    noted = world.patch([{"op": "add", "path": "/note", "value": [{"text": "n1"}]}], world.ehr)
    assert noted.status_code == 200, noted.text
    report = rotate(world.hub)
    with world.hub.sessions() as session:
        tokens = [session.get_one(Case, world.case_id).note_sealed]
        tokens += session.scalars(
            select(CaseEvent.note_sealed).where(CaseEvent.note_sealed.is_not(None))
        ).all()
    assert len(tokens) == 2  # the case's, and the event's that added it
    assert all(t is not None and value_key_id(t) == report.new_key_id for t in tokens)
    assert world.read().json()["note"] == noted.json()["note"]
    version = noted.json()["meta"]["versionId"]
    again = world.client.get(
        f"/fhir/Task/{world.case_id}/_history/{version}", headers=world.clinician
    )
    assert again.json() == noted.json()


# --------------------------------------------------------------------------- vread, history


def test_vread_and_history_replay_the_case(world: World) -> None:
    first = world.read().json()
    v1 = int(first["meta"]["versionId"])
    claimed = world.patch(
        [
            {"op": "replace", "path": "/status", "value": "accepted"},
            {"op": "add", "path": "/owner", "value": {"reference": "Practitioner/dr.w"}},
        ],
        world.specialist,
    )
    assert claimed.status_code == 200, claimed.text
    noted = world.patch(
        [{"op": "add", "path": "/note", "value": [{"text": "n1"}]}], world.clinician
    )
    assert noted.status_code == 200, noted.text
    started = world.patch(
        [{"op": "replace", "path": "/status", "value": "in-progress"}], world.specialist
    )
    assert started.status_code == 200, started.text
    now = world.read().json()
    latest = int(now["meta"]["versionId"])
    assert latest == v1 + 3

    # every version reads back as it was; the newest is the read
    for expected in (first, claimed.json(), noted.json(), now):
        n = expected["meta"]["versionId"]
        got = world.client.get(f"/fhir/Task/{world.case_id}/_history/{n}", headers=world.clinician)
        assert got.status_code == 200, got.text
        assert got.headers["ETag"] == f'W/"{n}"'
        assert got.json() == expected
    assert "owner" not in first and "note" not in claimed.json()

    # the history: newest first, paged
    url = f"/fhir/Task/{world.case_id}/_history"
    page = world.client.get(f"{url}?_count=2", headers=world.specialist).json()
    assert page["type"] == "history" and page["total"] == latest
    assert [e["resource"]["meta"]["versionId"] for e in page["entry"]] == [
        str(latest),
        str(latest - 1),
    ]
    assert page["entry"][0]["resource"] == now
    assert page["entry"][0]["response"]["etag"] == f'W/"{latest}"'
    assert page["entry"][0]["request"] == {"method": "PUT", "url": f"Task/{world.case_id}"}
    nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
    assert nxt.endswith(f"{url}?_count=2&_offset=2")
    rest = world.client.get(f"{url}?_count=50&_offset=2", headers=world.specialist).json()
    versions = [e["resource"]["meta"]["versionId"] for e in rest["entry"]]
    assert versions == [str(n) for n in range(latest - 2, 0, -1)]
    assert rest["entry"][-1]["request"] == {"method": "POST", "url": "Task"}
    assert rest["entry"][-1]["response"]["status"] == "201 Created"
    assert not any(link["relation"] == "next" for link in rest["link"])

    # unknown versions, other tenants, bad paging
    for bad in ("0", str(latest + 1), "x"):
        missing = world.client.get(f"{url}/{bad}", headers=world.clinician)
        _outcome(missing, 404)
    assert world.client.get(url, headers=world.other_clinic).status_code == 404
    assert world.client.get(f"{url}/1", headers=world.other_clinic).status_code == 404
    assert world.client.get(f"{url}?_count=x", headers=world.clinician).status_code == 400
    with world.hub.sessions() as session:
        reads = session.scalars(
            select(AuditRecord.detail).where(
                AuditRecord.entity_type == "Task", AuditRecord.entity_id == world.case_id
            )
        ).all()
    assert f"version {latest}" in reads
    assert f"history: 2 of {latest} versions" in reads


def test_newest_version_is_the_read_after_a_referral_joins(world: World) -> None:
    """A second referral (same accession) joins the case and raises its priority: the
    event it makes records the case after that, so the newest version is the read."""
    task = world.read().json()
    pid = task["for"]["reference"].split("/")[1]
    second = service_request(
        pid,
        identifier=[
            {"system": "urn:oid:1.3.4.5.6.7", "value": "SECOND-ORDER"},
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                    ]
                },
                "system": "urn:oid:1.3.4.5.6.8",
                "value": "ACC-77",
            },
        ],
        priority="stat",
    )
    sent = world.client.post(
        "/fhir/ServiceRequest",
        content=json.dumps(second),
        headers={**world.ehr, "Content-Type": FHIR},
    )
    assert sent.status_code == 201, sent.text
    now = world.read().json()
    assert now["priority"] == "stat" and len(now["basedOn"]) == 2
    newest = world.client.get(
        f"/fhir/Task/{world.case_id}/_history/{now['meta']['versionId']}",
        headers=world.clinician,
    )
    assert newest.json() == now


def test_history_of_events_recorded_before_task_versions(world: World) -> None:
    """Events from before migration 0017 kept no state: their versions show the status
    and time the event has, and the rest as the next version has it."""
    claimed = world.patch(
        [
            {"op": "replace", "path": "/status", "value": "accepted"},
            {"op": "add", "path": "/owner", "value": {"reference": "Practitioner/dr.w"}},
        ],
        world.specialist,
    )
    assert claimed.status_code == 200, claimed.text
    with world.hub.sessions() as session, session.begin():
        session.execute(
            update(CaseEvent)
            .where(CaseEvent.case_id == world.case_id)
            .values(state=None, note_sealed=None)
        )
    history = world.client.get(f"/fhir/Task/{world.case_id}/_history", headers=world.clinician)
    assert history.status_code == 200, history.text
    entries = history.json()["entry"]
    assert entries[0]["resource"] == world.read().json()  # the newest is the case itself
    oldest = entries[-1]["resource"]
    assert oldest["status"] == "requested" and "owner" not in oldest
    assert oldest["priority"] == claimed.json()["priority"]


def test_capability_statement_lists_task_vread_and_history(world: World) -> None:
    statement = world.client.get("/fhir/metadata").json()
    [task] = [r for r in statement["rest"][0]["resource"] if r["type"] == "Task"]
    assert [i["code"] for i in task["interaction"]] == [
        "read",
        "vread",
        "history-instance",
        "search-type",
        "update",
        "patch",
    ]
    assert task["readHistory"] is True
