"""Subscription at /fhir (R4 backport, rest-hook): CRUD scoped to the clinic, handshake,
$status, errors; and polling Task?_lastUpdated=gt... for clinics behind NAT. Over HTTP
with real tokens and a real receiver, on both databases."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy import select

from fhir_api.tasks import task_of
from saf.app import create_app
from saf.cases import Referral, TaskStatus, claim, on_referral, transition
from saf.clinics import find_clinic_id
from saf.hub import Hub
from saf.models import AuditRecord, OutboxEvent
from saf.pipeline import handle_event
from saf.routing import parse_rules
from saf.settings import Settings
from saf.subscriptions import CONTENT_EXT, FILTER_EXT, TOPIC, deliver_due
from tests.factories import client_token, login_as, make_client
from tests.saf.hook_receiver import Receiver

FHIR = "application/fhir+json"
RULES = parse_rules('[[rule]]\nname = "default"\nworklist = "general-radiology"\n')


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        dicom_port=0,
        subscription_allow_http=True,
        subscription_timeout_seconds=2,
    )


@dataclass
class Api:
    client: TestClient
    hub: Hub
    ehr_b: dict[str, str]
    ehr_a: dict[str, str]
    clinician_b: dict[str, str]
    receiver: Receiver

    def post(self, body: dict[str, Any], who: dict[str, str] | None = None) -> Any:
        return self.client.post(
            "/fhir/Subscription",
            content=json.dumps(body),
            headers={**(who or self.ehr_b), "Content-Type": FHIR},
        )


@pytest.fixture
def api(hub: Hub) -> Iterator[Api]:
    receiver = Receiver().start()
    with TestClient(create_app(hub)) as client:
        info, key = make_client(hub, "ehr-b", clinic="Clinic B", scopes=["system/*.cruds"])
        ehr_b = client_token(client, info.id, key, scope="system/*.cruds")
        info, key = make_client(hub, "ehr-a", clinic="Clinic A", scopes=["system/*.cruds"])
        ehr_a = client_token(client, info.id, key, scope="system/*.cruds")
        clinician = login_as(client, username="bert.b", clinic="Clinic B")
        yield Api(client, hub, ehr_b, ehr_a, clinician, receiver)
    receiver.stop()


def subscription(endpoint: str, **extra: Any) -> dict[str, Any]:
    sub: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "consult status for the clinic EHR",
        "criteria": TOPIC,
        "_criteria": {"extension": [{"url": FILTER_EXT, "valueString": "Task?status=completed"}]},
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": FHIR,
            "_payload": {"extension": [{"url": CONTENT_EXT, "valueCode": "full-resource"}]},
            "header": ["Authorization: Bearer for-the-clinic"],
        },
    }
    sub.update(extra)
    return sub


def test_create_handshakes_and_crud_is_the_clinics(api: Api) -> None:
    created = api.post(subscription(api.receiver.url))
    assert created.status_code == 201, created.text
    body = created.json()
    get_fhir_model_class("Subscription").model_validate(body)
    assert body["status"] == "active"
    assert created.headers["Location"].endswith(f"/fhir/Subscription/{body['id']}/_history/1")
    assert [r.kind for r in api.receiver.received] == ["handshake"]
    assert api.receiver.received[0].headers["Authorization"] == "Bearer for-the-clinic"
    sid = body["id"]
    # the clinic reads and searches it, its clinician too (read-only)
    read = api.client.get(f"/fhir/Subscription/{sid}", headers=api.clinician_b)
    assert read.status_code == 200 and read.json()["channel"]["endpoint"] == api.receiver.url
    # the endpoint's credentials are write-only
    assert read.json()["channel"]["header"] == ["Authorization: ***"]
    assert "for-the-clinic" not in read.text
    found = api.client.get(
        "/fhir/Subscription", headers=api.ehr_b, params={"status": "active"}
    ).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [sid]
    by_id = api.client.get("/fhir/Subscription", headers=api.ehr_b, params={"_id": sid}).json()
    assert by_id["total"] == 1
    none = api.client.get("/fhir/Subscription", headers=api.ehr_b, params={"_id": "x"}).json()
    assert none["total"] == 0 and none["entry"] == []
    # another clinic: as if absent
    assert api.client.get(f"/fhir/Subscription/{sid}", headers=api.ehr_a).status_code == 404
    assert api.client.get("/fhir/Subscription", headers=api.ehr_a).json()["total"] == 0
    other = api.client.put(
        f"/fhir/Subscription/{sid}",
        content=json.dumps({**subscription("https://evil.example.org/"), "id": sid}),
        headers={**api.ehr_a, "Content-Type": FHIR},
    )
    assert other.status_code == 404
    assert api.client.delete(f"/fhir/Subscription/{sid}", headers=api.ehr_a).status_code == 404
    # update: a new version and a new handshake
    updated = api.client.put(
        f"/fhir/Subscription/{sid}",
        content=json.dumps({**subscription(api.receiver.url), "id": sid, "reason": "changed"}),
        headers={**api.ehr_b, "Content-Type": FHIR},
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["meta"]["versionId"] == "2" and updated.json()["reason"] == "changed"
    assert len(api.receiver.of_kind("handshake")) == 2
    # what a read gave back, sent again: the stored credential is kept
    echoed = api.client.get(f"/fhir/Subscription/{sid}", headers=api.ehr_b).json()
    again = api.client.put(
        f"/fhir/Subscription/{sid}",
        content=json.dumps(echoed),
        headers={**api.ehr_b, "Content-Type": FHIR},
    )
    assert again.status_code == 200, again.text
    assert api.receiver.of_kind("handshake")[-1].headers["Authorization"] == "Bearer for-the-clinic"
    # $status
    status = api.client.get(f"/fhir/Subscription/{sid}/$status", headers=api.ehr_b).json()
    params = {p["name"]: p for p in status["entry"][0]["resource"]["parameter"]}
    assert params["status"]["valueCode"] == "active"
    assert params["type"]["valueCode"] == "query-status"
    assert params["topic"]["valueCanonical"] == TOPIC
    # delete: gone, and it says so
    assert api.client.delete(f"/fhir/Subscription/{sid}", headers=api.ehr_b).status_code == 204
    assert api.client.get(f"/fhir/Subscription/{sid}", headers=api.ehr_b).status_code == 410
    with api.hub.sessions() as session:
        events = session.scalars(
            select(AuditRecord.event).where(
                AuditRecord.entity_type == "Subscription", AuditRecord.entity_id == sid
            )
        ).all()
    assert {"create", "read", "update", "delete"} <= set(events)


def test_clinicians_cannot_subscribe_and_errors_are_operation_outcomes(api: Api) -> None:
    refused = api.post(subscription(api.receiver.url), who=api.clinician_b)
    assert refused.status_code == 403
    bad = api.post(subscription(api.receiver.url, criteria="Task?status=completed"))
    assert bad.status_code == 400
    assert bad.json()["issue"][0]["expression"] == ["Subscription.criteria"]
    unknown = api.post({**subscription(api.receiver.url), "colour": "blue"})
    assert unknown.status_code == 400 and unknown.json()["resourceType"] == "OperationOutcome"
    wrong = api.client.post(
        "/fhir/Subscription", content=b"{", headers={**api.ehr_b, "Content-Type": FHIR}
    )
    assert wrong.status_code == 400
    xml = api.client.post(
        "/fhir/Subscription",
        content=b"<x/>",
        headers={**api.ehr_b, "Content-Type": "application/fhir+xml"},
    )
    assert xml.status_code == 415


def test_an_endpoint_that_refuses_the_handshake_is_error(api: Api) -> None:
    api.receiver.status = 403
    created = api.post(subscription(api.receiver.url)).json()
    assert created["status"] == "error"
    assert "HTTP 403" in created["error"]
    status = api.client.get(f"/fhir/Subscription/{created['id']}/$status", headers=api.ehr_b).json()
    params = {p["name"]: p for p in status["entry"][0]["resource"]["parameter"]}
    assert params["status"]["valueCode"] == "error"


def test_a_completed_case_reaches_the_clinic_and_polling_works_too(api: Api) -> None:
    created = api.post(subscription(api.receiver.url)).json()
    clinic_b = find_clinic_id(api.hub, "Clinic B")
    assert clinic_b is not None
    case_id = on_referral(
        api.hub, Referral(clinic_id=clinic_b, patient_id="P1", service_request_id="urn:x|1"), RULES
    )
    before = api.client.get("/fhir/Task", headers=api.ehr_b).json()["entry"][0]["resource"]["meta"][
        "lastUpdated"
    ]
    # No pause: the cursor carries microseconds, and a change within the same second
    # must still be newer than it for the poller (fhir_api.search).
    claim(api.hub, case_id, "dr.who")
    transition(api.hub, case_id, TaskStatus.IN_PROGRESS, actor="dr.who")
    transition(api.hub, case_id, TaskStatus.COMPLETED, actor="dr.who")
    with api.hub.sessions() as session:
        rows = session.execute(
            select(OutboxEvent.topic, OutboxEvent.payload).where(OutboxEvent.topic == "case.status")
        ).all()
    for topic, payload in rows:
        handle_event(api.hub, topic, payload, RULES)
    [done] = deliver_due(api.hub, task_of)
    assert done.error is None
    [note] = api.receiver.of_kind("event-notification")
    assert note.body["entry"][1]["resource"]["id"] == case_id
    assert note.body["entry"][1]["resource"]["status"] == "completed"
    status = api.client.get(f"/fhir/Subscription/{created['id']}/$status", headers=api.ehr_b).json()
    params = {p["name"]: p for p in status["entry"][0]["resource"]["parameter"]}
    assert params["events-since-subscription-start"]["valueString"] == "1"
    # a clinic behind NAT polls instead
    polled = api.client.get(
        "/fhir/Task", headers=api.ehr_b, params={"_lastUpdated": f"gt{before}"}
    ).json()
    assert [e["resource"]["id"] for e in polled["entry"]] == [case_id]
    assert polled["entry"][0]["resource"]["status"] == "completed"
    assert (
        api.client.get(
            "/fhir/Task", headers=api.ehr_a, params={"_lastUpdated": f"gt{before}"}
        ).json()["total"]
        == 0
    )
    # the delivery is audited as an export of the Task
    with api.hub.sessions() as session:
        export = session.scalars(select(AuditRecord).where(AuditRecord.event == "export")).one()
    assert export.entity_id == case_id and export.clinic_id == clinic_b


def test_capability_lists_the_topic(api: Api) -> None:
    cap = api.client.get("/fhir/metadata").json()
    [entry] = [r for r in cap["rest"][0]["resource"] if r["type"] == "Subscription"]
    assert entry["extension"][0]["valueCanonical"] == TOPIC
    assert {i["code"] for i in entry["interaction"]} == {
        "read",
        "create",
        "update",
        "delete",
        "search-type",
    }


def test_a_slow_handshake_does_not_hold_the_servers_other_requests(api: Api) -> None:
    """The handshake waits on the clinic's endpoint on a worker thread: meanwhile the same
    server process answers other requests (it used to wait on the event loop)."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx

    from tests.factories import served_api

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(1.5)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    endpoint = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    answers: list[int] = []
    try:
        with served_api(api.hub) as base:
            url = f"http://127.0.0.1:{endpoint.server_address[1]}/hook"
            body = json.dumps(subscription(url))
            headers = {**api.ehr_b, "Content-Type": FHIR}

            def create() -> None:
                answers.append(
                    httpx.post(
                        f"{base}/fhir/Subscription", content=body, headers=headers
                    ).status_code
                )

            creating = threading.Thread(target=create)
            creating.start()
            time.sleep(0.4)  # the handshake is under way
            started = time.monotonic()
            metadata = httpx.get(f"{base}/fhir/metadata", headers={"Accept": FHIR})
            waited = time.monotonic() - started
            creating.join(timeout=30)
    finally:
        endpoint.shutdown()
    assert metadata.status_code == 200
    assert waited < 0.8, f"/fhir/metadata waited {waited:.2f} s behind a handshake"
    assert answers == [201]
