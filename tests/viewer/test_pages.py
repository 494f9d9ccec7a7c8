"""The viewer's pages: public login, redirects for browsers, JSON 401 for scripts, tenancy
on the case pages, the referral rendered from the FHIR store, static files, session renewal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from saf import audit, fhir_store
from saf.app import create_app
from saf.deps import SESSION_COOKIE
from saf.hub import Hub
from saf.identity import Principal
from saf.models import AuditRecord, Case, CaseStudy, Study
from tests.factories import TEST_PASSWORD
from tests.saf.tenants import RULES, People, World, make_people, make_world

HTML = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture
def world(hub: Hub, tmp_path: Path) -> tuple[World, People]:
    world = make_world(hub, tmp_path)
    return world, make_people(hub, world)


def session_for(client: TestClient, username: str) -> None:
    """Log in like the login page does: the session cookie lands in the client's jar."""
    response = client.post("/auth/session", data={"username": username, "password": TEST_PASSWORD})
    assert response.status_code == 204, response.text


def test_login_page_and_static_files_are_public(hub: Hub) -> None:
    with TestClient(create_app(hub)) as client:
        page = client.get("/login?next=/cases/abc", headers=HTML)
        assert page.status_code == 200
        assert 'id="login"' in page.text and 'data-next="/cases/abc"' in page.text
        assert "<script>" not in page.text  # no inline script: the CSP forbids it
        # only local paths are redirect targets
        evil = client.get("/login?next=//evil.example/x", headers=HTML)
        assert 'data-next="/worklist"' in evil.text
        js = client.get("/static/viewer.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert "no-store" not in js.headers.get("cache-control", "")
        assert client.get("/", follow_redirects=False).headers["location"] == "/worklist"


def test_pages_send_browsers_to_login_and_scripts_get_401(hub: Hub) -> None:
    with TestClient(create_app(hub)) as client:
        page = client.get("/cases/x1/viewer?series=s", headers=HTML, follow_redirects=False)
        assert page.status_code == 303
        assert page.headers["location"] == "/login?next=%2Fcases%2Fx1%2Fviewer%3Fseries%3Ds"
        script = client.get("/worklist", follow_redirects=False)
        assert script.status_code == 401 and script.json()["error"] == "missing_token"


def test_case_pages_follow_tenancy(hub: Hub, world: tuple[World, People]) -> None:
    w, people = world
    with TestClient(create_app(hub)) as client:
        session_for(client, people.clinician_a)
        for path in (f"/cases/{w.ct_case_b}", f"/cases/{w.ct_case_b}/viewer"):
            hidden = client.get(path, headers=HTML)
            assert hidden.status_code == 404
            assert w.ct_case_b not in hidden.text
        own = client.get(f"/cases/{w.a.cases[0]}", headers=HTML)
        assert own.status_code == 200 and f'data-case="{w.a.cases[0]}"' in own.text
        listing = client.get("/worklist", headers=HTML)
        assert listing.status_code == 200 and 'data-role="clinician"' in listing.text
    with hub.sessions() as session:
        refused = session.scalars(
            select(AuditRecord).where(
                AuditRecord.entity_id == w.ct_case_b, AuditRecord.outcome == audit.MINOR_FAILURE
            )
        ).all()
    assert len(refused) == 2


def test_viewer_page_names_the_first_image_series(hub: Hub, world: tuple[World, People]) -> None:
    w, people = world
    with TestClient(create_app(hub)) as client:
        session_for(client, people.thoracic)
        page = client.get(f"/cases/{w.ct_case_b}/viewer", headers=HTML)
    assert page.status_code == 200
    with hub.sessions() as session:
        study = session.scalars(
            select(Study.id)
            .join(CaseStudy, CaseStudy.study_pk == Study.id)
            .where(CaseStudy.case_id == w.ct_case_b)
        ).one()
    assert any(f'data-series="{s}"' in page.text for s in w.b.series), study


def test_case_page_shows_the_referral_reason_and_notes(
    hub: Hub, world: tuple[World, People]
) -> None:
    w, people = world
    ehr = Principal(kind="client", id="ehr-b", name="ehr-b", role="system", clinic_id=w.b.clinic_id)
    with hub.sessions() as session:
        uid = session.scalars(
            select(Study.study_instance_uid)
            .join(CaseStudy, CaseStudy.study_pk == Study.id)
            .join(Case, Case.id == CaseStudy.case_id)
            .where(Case.id == w.ct_case_b)
        ).one()
    patient = fhir_store.create(
        hub,
        ehr,
        {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:oid:1.2.3.99.2", "value": "PB1"}],
        },
        RULES,
    )
    referral = {
        "resourceType": "ServiceRequest",
        "identifier": [
            {"system": "urn:oid:1.2.3.99.1", "value": "REF-B-9"},
            {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"},
        ],
        "status": "active",
        "intent": "order",
        "subject": {"reference": f"Patient/{patient.id}"},
        "reasonCode": [{"text": "Persistent cough <b>for 3 months</b>"}],
        "note": [{"text": "Ex-smoker, 30 pack-years."}],
    }
    stored = fhir_store.create(hub, ehr, json.loads(json.dumps(referral)), RULES)
    assert stored.case_id == w.ct_case_b
    with TestClient(create_app(hub)) as client:
        session_for(client, people.thoracic)
        page = client.get(f"/cases/{w.ct_case_b}", headers=HTML)
    assert page.status_code == 200
    assert "Persistent cough &lt;b&gt;for 3 months&lt;/b&gt;" in page.text  # escaped
    assert "Ex-smoker, 30 pack-years." in page.text


def test_session_renewal_reissues_the_cookie_while_valid(
    hub: Hub, world: tuple[World, People]
) -> None:
    _, people = world
    with TestClient(create_app(hub)) as client:
        session_for(client, people.thoracic)
        old = client.cookies[SESSION_COOKIE]
        renewed = client.post("/auth/session/renew", headers={"Origin": "http://testserver"})
        assert renewed.status_code == 204
        new = client.cookies[SESSION_COOKIE]
        assert new != old
        assert client.get("/api/cases").status_code == 200
        # the old token is revoked: it cannot renew or read any more
        client.cookies.clear()
        client.cookies.set(SESSION_COOKIE, old)
        assert client.post("/auth/session/renew").status_code == 401
        cross = TestClient(create_app(hub))
        cross.cookies.set(SESSION_COOKIE, new)
        refused = cross.post("/auth/session/renew", headers={"Origin": "https://evil.example"})
        assert refused.status_code == 403
