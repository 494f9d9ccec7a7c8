"""AuditEvent at /fhir: the audit trail as FHIR, for admins only; search parameters and
paging; over HTTP with real tokens, on both databases."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B import get_fhir_model_class

from saf import audit
from saf.app import create_app
from saf.hub import Hub
from saf.models import AuditRecord
from tests.factories import client_token, login_as, make_client

DCM = "http://dicom.nema.org/resources/ontology/DCM"


@dataclass
class Setup:
    client: TestClient
    hub: Hub
    admin: dict[str, str]
    clinician: dict[str, str]


@pytest.fixture
def setup(hub: Hub) -> Iterator[Setup]:
    with TestClient(create_app(hub)) as client:
        admin = login_as(client, "admin", username="root")
        clinician = login_as(client, username="bert.b", clinic="Clinic B")
        yield Setup(client, hub, admin, clinician)


def _record(hub: Hub, event: str, **kw: Any) -> int:
    actor = audit.Actor("user", kw.pop("actor_id", "u-1"), kw.pop("actor_name", "dr.x"), "10.0.0.9")
    return audit.record(hub, event, actor, **kw)


def _ids(s: Setup, **params: Any) -> list[str]:
    response = s.client.get("/fhir/AuditEvent", headers=s.admin, params=params)
    assert response.status_code == 200, response.text
    return [e["resource"]["id"] for e in response.json()["entry"] if e["search"]["mode"] == "match"]


def test_admin_reads_and_searches(setup: Setup) -> None:
    s = setup
    old = _record(
        s.hub,
        "read",
        entity_type="Study",
        entity_id="study-1",
        patient_pk="pat-1",
        at=datetime(2026, 1, 5, 12, tzinfo=UTC),
    )
    refused = _record(
        s.hub, "read", entity_type="Case", entity_id="case-9", outcome=audit.MINOR_FAILURE
    )
    stored = _record(
        s.hub,
        "dicom-store",
        actor_id="ae-1",
        actor_name="MODALITY_B",
        entity_type="Study",
        entity_id="study-2",
    )
    one = s.client.get(f"/fhir/AuditEvent/{old}", headers=s.admin)
    assert one.status_code == 200, one.text
    body = one.json()
    get_fhir_model_class("AuditEvent").model_validate(body)
    assert body["id"] == str(old)
    assert {"reference": "ImagingStudy/study-1"} in [e["what"] for e in body["entity"]]
    assert str(old) in _ids(s, date="2026-01-05")
    assert str(old) not in _ids(s, date="gt2026-01-05")
    assert str(old) in _ids(s, date=["ge2026-01-01", "lt2026-02-01"])
    assert _ids(s, outcome="4") == [str(refused)]
    assert _ids(s, agent="MODALITY_B") == [str(stored)]
    assert _ids(s, entity="ImagingStudy/study-2") == [str(stored)]
    assert _ids(s, patient="Patient/pat-1") == [str(old)]
    assert _ids(s, type=f"{DCM}|110104") == [str(stored)]
    assert str(old) in _ids(s, subtype="read") and str(stored) not in _ids(s, subtype="read")
    assert _ids(s, _id=str(stored)) == [str(stored)]
    # reading the trail is audited too
    assert _ids(s, entity_type="x", agent="root")  # the admin's own searches (entity_type ignored)


def test_paging_is_newest_first(setup: Setup) -> None:
    s = setup
    made = [
        _record(s.hub, "read", entity_type="Case", entity_id=f"c{i}", actor_name="pager")
        for i in range(5)
    ]
    page = s.client.get(
        "/fhir/AuditEvent", headers=s.admin, params={"agent": "pager", "_count": 2}
    ).json()
    assert page["total"] == 5
    seen = [e["resource"]["id"] for e in page["entry"]]
    while nxt := next((link["url"] for link in page["link"] if link["relation"] == "next"), None):
        page = s.client.get(nxt, headers=s.admin).json()
        seen += [e["resource"]["id"] for e in page["entry"]]
    assert seen == [str(i) for i in reversed(made)]


def test_others_are_refused_or_see_nothing(setup: Setup) -> None:
    s = setup
    rid = _record(s.hub, "read", entity_type="Case", entity_id="c1")
    for who in (s.clinician, login_as(s.client, "specialist", username="dr.s")):
        assert s.client.get("/fhir/AuditEvent", headers=who).status_code == 403
        assert s.client.get(f"/fhir/AuditEvent/{rid}", headers=who).status_code == 403
    info, key = make_client(s.hub, "ehr-b", clinic="Clinic B", scopes=["system/*.rs"])
    ehr = client_token(s.client, info.id, key, scope="system/*.rs")
    assert s.client.get("/fhir/AuditEvent", headers=ehr).json()["total"] == 0
    assert s.client.get(f"/fhir/AuditEvent/{rid}", headers=ehr).status_code == 404


@pytest.mark.parametrize(
    ("params", "expression"),
    [({"date": "yesterday"}, "date"), ({"outcome": "5"}, "outcome"), ({"_id": "abc"}, "_id")],
)
def test_bad_parameters_are_located(setup: Setup, params: dict[str, str], expression: str) -> None:
    response = setup.client.get("/fhir/AuditEvent", headers=setup.admin, params=params)
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == [expression]


def test_missing_and_malformed_ids_are_404(setup: Setup) -> None:
    for rid in ("999999", "not-a-number"):
        response = setup.client.get(f"/fhir/AuditEvent/{rid}", headers=setup.admin)
        assert response.status_code == 404
        assert response.json()["resourceType"] == "OperationOutcome"


def test_api_audit_and_fhir_agree(setup: Setup) -> None:
    """/api/audit and /fhir/AuditEvent run the same search (saf.audit_search)."""
    s = setup
    _record(
        s.hub, "read", entity_type="Case", entity_id="c1", at=datetime.now(UTC) - timedelta(days=2)
    )
    _record(s.hub, "export", entity_type="Case", entity_id="c2")
    since = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    api = s.client.get(
        "/api/audit", headers=s.admin, params={"date": f"ge{since}", "type": f"{DCM}|110106"}
    ).json()
    fhir = _ids(s, date=f"ge{since}", type=f"{DCM}|110106")
    assert [e["resource"]["id"] for e in api["entry"]] == fhir != []
    with s.hub.sessions() as session:
        assert session.get(AuditRecord, int(fhir[0])) is not None
