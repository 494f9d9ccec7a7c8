"""Acceptance: a clinic's EHR subscribes over HTTP to a running `saf up` (real SMART
backend-services token), gets the handshake at its own HTTP endpoint, then a notification
when a case of the clinic completes, driven by the outbox, the Celery worker and the
notifier in `saf worker`; with the endpoint down, the notification arrives once it is back
up; another clinic's case sends nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from saf.cases import Referral, TaskStatus, claim, on_referral, transition
from saf.clinics import find_clinic_id
from saf.hub import Hub
from saf.routing import parse_rules
from saf.settings import Settings
from saf.subscriptions import CONTENT_EXT, FILTER_EXT, TOPIC
from tests.factories import client_assertion, make_client
from tests.interop.conftest import free_port
from tests.saf.hook_receiver import Receiver

pytestmark = [pytest.mark.interop, pytest.mark.slow]

RULES = parse_rules('[[rule]]\nname = "default"\nworklist = "general"\n')


def _wait(predicate: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


def test_rest_hook_end_to_end(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    saf = [sys.executable, "-m", "saf", "--data-dir", str(data_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAF_")}
    env.update(
        SAF_OUTBOX_POLL_INTERVAL="0.2",
        SAF_SUBSCRIPTION_ALLOW_HTTP="true",
        SAF_SUBSCRIPTION_POLL_INTERVAL="0.2",
        SAF_SUBSCRIPTION_RETRY_BASE_SECONDS="0.5",
        SAF_SUBSCRIPTION_RETRY_MAX_SECONDS="1",
        SAF_SUBSCRIPTION_TIMEOUT_SECONDS="2",
    )
    subprocess.run([*saf, "init"], env=env, check=True, capture_output=True)
    subprocess.run([*saf, "clinic", "add", "Clinic B"], env=env, check=True, capture_output=True)
    subprocess.run([*saf, "clinic", "add", "Clinic A"], env=env, check=True, capture_output=True)
    hub = Hub.open(Settings(data_dir=data_dir))
    info, key = make_client(hub, "ehr-b", clinic="Clinic B", scopes=["system/*.cruds"])
    clinic_b, clinic_a = find_clinic_id(hub, "Clinic B"), find_clinic_id(hub, "Clinic A")
    assert clinic_b and clinic_a
    receiver = Receiver().start()
    http_port = free_port()
    log = tmp_path / "up.log"
    up = subprocess.Popen(
        [*saf, "--dicom-port", str(free_port()), "--http-port", str(http_port), "up"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as http:

            def listening() -> bool:
                assert up.poll() is None, log.read_text(errors="replace")[-3000:]
                try:
                    return http.get("/fhir/metadata").status_code == 200
                except httpx.TransportError:
                    return False

            _wait(listening, 60, "saf up did not answer", log)
            token = http.post(
                "/auth/token",
                data={
                    "grant_type": "client_credentials",
                    "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:"
                    "jwt-bearer",
                    "client_assertion": client_assertion(info.id, key, f"{base}/auth/token"),
                    "scope": "system/*.cruds",
                },
            )
            assert token.status_code == 200, token.text
            auth = {"Authorization": f"Bearer {token.json()['access_token']}"}
            created = http.post(
                "/fhir/Subscription",
                headers={**auth, "Content-Type": "application/fhir+json"},
                json={
                    "resourceType": "Subscription",
                    "status": "requested",
                    "reason": "consult results for the clinic",
                    "criteria": TOPIC,
                    "_criteria": {
                        "extension": [
                            {"url": FILTER_EXT, "valueString": "Task?status=accepted,completed"}
                        ]
                    },
                    "channel": {
                        "type": "rest-hook",
                        "endpoint": receiver.url,
                        "payload": "application/fhir+json",
                        "_payload": {
                            "extension": [{"url": CONTENT_EXT, "valueCode": "full-resource"}]
                        },
                    },
                },
            )
            assert created.status_code == 201, created.text
            assert created.json()["status"] == "active"
            assert [r.kind for r in receiver.received] == ["handshake"]

            # a case of clinic B is claimed: notified through outbox -> worker -> notifier
            case_b = on_referral(
                hub, Referral(clinic_id=clinic_b, patient_id="P1", service_request_id="u|1"), RULES
            )
            other = on_referral(
                hub, Referral(clinic_id=clinic_a, patient_id="P9", service_request_id="u|9"), RULES
            )
            claim(hub, other, "dr.a")  # clinic A's: nothing for clinic B's endpoint
            claim(hub, case_b, "dr.b")
            _wait(
                lambda: len(receiver.of_kind("event-notification")) == 1,
                30,
                "no notification of the claim",
                log,
            )
            [first] = receiver.of_kind("event-notification")
            assert first.body["entry"][1]["resource"]["id"] == case_b
            assert first.body["entry"][1]["resource"]["status"] == "accepted"

            # the endpoint goes down; the completion is delivered once it is back up
            receiver.stop()
            transition(hub, case_b, TaskStatus.IN_PROGRESS, actor="dr.b")
            transition(hub, case_b, TaskStatus.COMPLETED, actor="dr.b")
            sid = created.json()["id"]

            def failed_once() -> bool:
                status = http.get(f"/fhir/Subscription/{sid}/$status", headers=auth).json()
                params = {p["name"]: p for p in status["entry"][0]["resource"]["parameter"]}
                return bool(params["status"]["valueCode"] == "error")

            _wait(failed_once, 30, "the failed delivery does not show in $status", log)
            receiver.start()
            _wait(
                lambda: len(receiver.of_kind("event-notification")) == 2,
                30,
                "no notification after the endpoint came back",
                log,
            )
            second = receiver.of_kind("event-notification")[1]
            assert second.body["entry"][1]["resource"]["status"] == "completed"
            params = {p["name"]: p for p in second.body["entry"][0]["resource"]["parameter"]}
            event = {p["name"]: p for p in params["notification-event"]["part"]}
            assert event["event-number"]["valueString"] == "2"
            _wait(lambda: not failed_once(), 10, "the subscription stays in error", log)
    finally:
        up.terminate()
        up.wait(timeout=60)
        receiver.stop()
        hub.close()
