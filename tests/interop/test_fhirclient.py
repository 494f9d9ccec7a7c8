"""The real SMART on FHIR Python client (`fhirclient`) against the hub's /fhir on a real
uvicorn server, authorised as an EHR with a real SMART Backend Services assertion."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fhirclient.client import FHIRClient
from fhirclient.models.patient import Patient
from fhirclient.models.servicerequest import ServiceRequest
from sqlalchemy import select

from saf.app import create_app
from saf.hub import Hub
from saf.models import CaseReferral
from tests.factories import client_assertion, make_client
from tests.interop.conftest import free_port


@pytest.fixture
def base_url(hub: Hub) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(hub), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_fhirclient_backend_services_create_read_search(hub: Hub, base_url: str) -> None:
    info, key = make_client(hub, "ehr-b", clinic="Clinic B", scopes=["system/*.cruds"])
    smart = FHIRClient(
        settings={
            "app_id": info.id,
            "api_base": f"{base_url}/fhir/",
            "scope": "system/*.cruds",
            "jwt_token": client_assertion(info.id, key, aud=f"{base_url}/auth/token"),
        }
    )
    smart.wants_patient = False  # backend services: no patient launch context
    smart.prepare()  # reads /fhir/metadata and finds the token endpoint there
    smart.authorize()  # client_credentials with the signed assertion
    assert smart.ready

    patient = Patient(
        {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN-9"}],
            "name": [{"family": "Chalmers", "given": ["Peter"]}],
            "birthDate": "1974-12-25",
        }
    )
    created = patient.create(smart.server)
    assert created is not None
    patient_id = created["id"]
    read = Patient.read(patient_id, smart.server)
    assert read.name[0].family == "Chalmers"
    assert read.meta.versionId == "1"

    order = ServiceRequest(
        {
            "resourceType": "ServiceRequest",
            "identifier": [{"system": "urn:oid:1.2.3.4", "value": "ORDER-1"}],
            "status": "active",
            "intent": "order",
            "priority": "stat",
            "subject": {"reference": f"Patient/{patient_id}"},
        }
    )
    assert order.create(smart.server) is not None
    search = ServiceRequest.where(struct={"subject": f"Patient/{patient_id}"})
    found = list(search.perform_resources_iter(smart.server))
    assert [r.identifier[0].value for r in found] == ["ORDER-1"]
    with hub.sessions() as session:
        referral = session.scalars(select(CaseReferral)).one()
    assert referral.service_request_id == "urn:oid:1.2.3.4|ORDER-1"
    assert referral.priority == "stat"
