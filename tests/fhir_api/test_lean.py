"""The lean read and vread routes (fhir_api.lean): the same answers, checks and audit
records as the FastAPI routes they stand in front of, on both databases."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from starlette.routing import Match

from fhir_api import lean
from saf.models import AuditRecord, User
from saf.tokens import issue_access_token, revoke_access_token
from saf.users import disable_user, principal_of_user, revoke_client
from tests.factories import client_token, make_client
from tests.fhir_api import test_routes
from tests.fhir_api.test_routes import FHIR, Api, patient

api = test_routes.api
"""The fixture of test_routes: an app, a clinician and an EHR client of clinic B, and a
clinician of clinic A."""


def _reads(api: Api, rid: str, outcome: int = 0) -> list[AuditRecord]:
    with api.hub.sessions() as session:
        return list(
            session.scalars(
                select(AuditRecord)
                .where(
                    AuditRecord.event == "read",
                    AuditRecord.entity_id == rid,
                    AuditRecord.outcome == outcome,
                )
                .order_by(AuditRecord.id)
            )
        )


def _scope(path: str, method: str = "GET") -> dict[str, Any]:
    return {"type": "http", "path": path, "method": method, "root_path": ""}


def test_lean_routes_come_first_and_take_only_stored_types(api: Api) -> None:
    routes = api.client.app.router.routes  # type: ignore[attr-defined]
    assert routes[: len(lean.routes)] == lean.routes
    current, version = lean.routes
    assert current.matches(_scope("/fhir/Patient/abc"))[0] is Match.FULL
    assert version.matches(_scope("/fhir/List/abc/_history/2"))[0] is Match.FULL
    assert current.matches(_scope("/fhir/Task/abc"))[0] is Match.NONE
    assert current.matches(_scope("/fhir/Binary/abc"))[0] is Match.NONE
    assert current.matches(_scope("/fhir/Patient/abc", "PUT"))[0] is Match.PARTIAL
    assert current.matches(_scope("/fhir/Patient/abc/_history"))[0] is Match.NONE


def test_read_answers_with_headers_and_one_audit_record_each(api: Api) -> None:
    rid = api.post(patient()).json()["id"]
    for n in (1, 2, 3):
        read = api.client.get(f"/fhir/Patient/{rid}", headers=api.clinician)
        assert read.status_code == 200, read.text
        assert read.headers["content-type"].startswith(FHIR)
        assert read.headers["etag"] == 'W/"1"'
        assert "last-modified" in read.headers
        assert read.headers["x-content-type-options"] == "nosniff"  # app middleware still runs
        assert read.json()["id"] == rid
        # committed before the answer: another connection sees it now
        records = _reads(api, rid)
        assert len(records) == n
    assert records[-1].entity_type == "Patient"
    assert records[-1].clinic_id is not None
    vread = api.client.get(f"/fhir/Patient/{rid}/_history/1", headers=api.clinician)
    assert vread.status_code == 200
    assert vread.headers["etag"] == 'W/"1"'
    assert _reads(api, rid)[-1].detail == "version 1"


def test_refusals_are_operation_outcomes_and_audited(api: Api) -> None:
    rid = api.post(patient()).json()["id"]
    missing = api.client.get("/fhir/Patient/nope", headers=api.clinician)
    assert missing.status_code == 404
    assert missing.json()["issue"][0]["code"] == "not-found"
    assert [r.detail for r in _reads(api, "nope", outcome=4)] == ["refused: not-found"]
    hidden = api.client.get(f"/fhir/Patient/{rid}", headers=api.other_clinic)
    assert hidden.status_code == 404
    assert len(_reads(api, rid, outcome=4)) == 1
    bad_version = api.client.get(f"/fhir/Patient/{rid}/_history/x", headers=api.clinician)
    assert bad_version.status_code == 404
    assert bad_version.json()["resourceType"] == "OperationOutcome"
    no_version = api.client.get(f"/fhir/Patient/{rid}/_history/9", headers=api.clinician)
    assert no_version.status_code == 404
    xml = api.client.get(f"/fhir/Patient/{rid}?_format=xml", headers=api.clinician)
    assert xml.status_code == 406
    assert xml.json()["issue"][0]["code"] == "not-supported"
    accept = api.client.get(
        f"/fhir/Patient/{rid}", headers={**api.clinician, "Accept": "application/fhir+xml"}
    )
    assert accept.status_code == 406
    anonymous = api.client.get(f"/fhir/Patient/{rid}")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == 'Bearer realm="saf"'
    assert anonymous.json()["issue"][0]["code"] == "login"


def test_a_type_outside_the_scopes_is_refused(api: Api) -> None:
    rid = api.post(patient()).json()["id"]
    info, key = make_client(api.hub, "ehr-narrow", clinic="Clinic B", scopes=["system/List.rs"])
    narrow = client_token(api.client, info.id, key, scope="system/List.rs")
    refused = api.client.get(f"/fhir/Patient/{rid}", headers=narrow)
    assert refused.status_code == 403
    assert "insufficient_scope" in refused.headers["www-authenticate"]
    assert refused.json()["issue"][0]["code"] == "forbidden"
    with api.hub.sessions() as session:
        assert session.scalar(
            select(func.count())
            .select_from(AuditRecord)
            .where(AuditRecord.actor_id == info.id, AuditRecord.outcome == 4)
        )


def test_deleted_answers_410_and_its_old_version_stays_readable(api: Api) -> None:
    rid = api.post(patient()).json()["id"]
    assert api.client.get(f"/fhir/Patient/{rid}", headers=api.ehr).status_code == 200
    assert api.client.delete(f"/fhir/Patient/{rid}", headers=api.ehr).status_code == 204
    gone = api.client.get(f"/fhir/Patient/{rid}", headers=api.ehr)
    assert gone.status_code == 410
    assert gone.json()["issue"][0]["code"] == "deleted"
    assert [r.detail for r in _reads(api, rid, outcome=4)] == ["refused: deleted"]
    assert api.client.get(f"/fhir/Patient/{rid}/_history/1", headers=api.ehr).status_code == 200
    assert api.client.get(f"/fhir/Patient/{rid}/_history/2", headers=api.ehr).status_code == 410


def test_revoked_client_and_disabled_user_are_refused_at_once(api: Api) -> None:
    rid = api.post(patient()).json()["id"]
    assert api.client.get(f"/fhir/Patient/{rid}", headers=api.ehr).status_code == 200
    assert api.client.get(f"/fhir/Patient/{rid}", headers=api.clinician).status_code == 200
    revoke_client(api.hub, "ehr-b")
    refused = api.client.get(f"/fhir/Patient/{rid}", headers=api.ehr)
    assert refused.status_code == 401
    assert 'error="invalid_token"' in refused.headers["www-authenticate"]
    assert refused.json()["issue"][0]["code"] == "login"
    disable_user(api.hub, "bert.b")
    assert api.client.get(f"/fhir/Patient/{rid}", headers=api.clinician).status_code == 401
    vread = api.client.get(f"/fhir/Patient/{rid}/_history/1", headers=api.clinician)
    assert vread.status_code == 401


def test_logged_out_token_is_refused_at_once(api: Api) -> None:
    rid = api.post(patient()).json()["id"]
    assert api.client.get(f"/fhir/Patient/{rid}", headers=api.clinician).status_code == 200
    revoke_access_token(api.hub, api.clinician["Authorization"].removeprefix("Bearer "))
    assert api.client.get(f"/fhir/Patient/{rid}", headers=api.clinician).status_code == 401


def test_a_user_moved_to_another_clinic_stops_seeing_the_old_one(api: Api) -> None:
    """The scoped select is kept per Principal: the same token of a user whose clinic
    changed is another Principal, and the old clinic's resource is hidden at once."""
    rid = api.post(patient()).json()["id"]
    with api.hub.sessions() as session:
        user = session.scalars(select(User).where(User.username == "bert.b")).one()
        clinic_a = session.scalars(select(User.clinic_id).where(User.username == "anna.a")).one()
        moved = principal_of_user(user)
    token = issue_access_token(api.hub, moved).token
    headers = {"Authorization": f"Bearer {token}"}
    assert api.client.get(f"/fhir/Patient/{rid}", headers=headers).status_code == 200
    with api.hub.sessions() as session, session.begin():
        session.execute(update(User).where(User.id == user.id).values(clinic_id=clinic_a))
    assert api.client.get(f"/fhir/Patient/{rid}", headers=headers).status_code == 404


def test_other_types_and_methods_go_on_to_the_other_routes(api: Api) -> None:
    unknown = api.client.get("/fhir/Foo/1", headers=api.clinician)
    assert unknown.status_code == 404
    assert unknown.json()["issue"][0]["code"] == "not-supported"
    assert api.client.get("/fhir/Task/nope", headers=api.clinician).status_code == 404
    assert api.client.head("/fhir/Patient/nope", headers=api.clinician).status_code == 405
