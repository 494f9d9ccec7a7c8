"""Audit records as FHIR R4 AuditEvents in IHE BALP shapes (pure mapping, no database)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from saf import audit
from saf.audit_fhir import DCM, EVENT_CODES, event_codes, searchset, to_audit_event
from saf.models import AuditRecord

AT = datetime(2026, 3, 14, 9, 26, 53, 589000, tzinfo=UTC)


def _record(**kw: Any) -> AuditRecord:
    values: dict[str, Any] = {
        "id": 42,
        "at": AT,
        "event": "read",
        "action": "R",
        "outcome": 0,
        "actor_kind": "user",
        "actor_id": "u1",
        "actor_name": "dr.who",
        "clinic_id": None,
        "source_address": "10.1.2.3",
        "entity_type": None,
        "entity_id": None,
        "patient_pk": None,
        "detail": None,
    }
    values.update(kw)
    if "event" in kw and "action" not in kw:
        values["action"] = audit.EVENTS[kw["event"]]
    return AuditRecord(**values)


def test_a_patient_read_is_a_balp_restful_read_with_the_patient_entity() -> None:
    rec = _record(entity_type="Case", entity_id="c1", patient_pk="p1", clinic_id="k1")

    event = to_audit_event(rec)

    assert event["resourceType"] == "AuditEvent" and event["id"] == "42"
    assert event["type"] == {
        "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
        "code": "rest",
        "display": "Restful Operation",
    }
    assert event["subtype"] == [
        {"system": "http://hl7.org/fhir/restful-interaction", "code": "read", "display": "read"}
    ]
    assert event["action"] == "R"
    assert event["recorded"] == "2026-03-14T09:26:53.589Z"
    assert event["outcome"] == "0"
    requestor, hub = event["agent"]
    assert requestor["requestor"] is True and hub["requestor"] is False
    assert requestor["who"] == {
        "identifier": {"system": "urn:saf:id:user", "value": "u1"},
        "display": "dr.who",
    }
    assert requestor["network"] == {"address": "10.1.2.3", "type": "2"}
    assert requestor["type"]["coding"][0]["code"] == "110153"
    assert hub["type"]["coding"][0]["code"] == "110152"
    assert event["source"]["observer"] == {"display": "saf"}
    assert event["source"]["type"][0]["code"] == "4"
    what = [e["what"] for e in event["entity"]]
    assert what == [
        {"reference": "Task/c1"},
        {"reference": "Patient/p1"},
        {"reference": "Organization/k1"},
    ]
    patient = event["entity"][1]
    assert patient["type"]["code"] == "1" and patient["role"]["code"] == "1"
    assert event["entity"][0]["role"]["code"] == "4"  # Domain Resource
    json.dumps(event)  # JSON-ready


def test_a_study_is_an_imagingstudy_and_other_objects_an_identifier() -> None:
    study = to_audit_event(_record(entity_type="Study", entity_id="s1"))
    series = to_audit_event(_record(entity_type="Series", entity_id="x1"))

    assert study["entity"][0]["what"] == {"reference": "ImagingStudy/s1"}
    assert series["entity"][0]["what"] == {
        "identifier": {"system": "urn:saf:id:Series", "value": "x1"},
        "display": "Series/x1",
    }


def test_a_failed_login_is_user_authentication_with_login_subtype() -> None:
    rec = _record(
        event="login",
        outcome=audit.MINOR_FAILURE,
        actor_kind="anonymous",
        actor_id=None,
        actor_name=None,
        source_address="clinic-gw.example",
        detail="wrong password",
    )

    event = to_audit_event(rec)

    assert event["type"] == {"system": DCM, "code": "110114", "display": "User Authentication"}
    assert event["subtype"] == [{"system": DCM, "code": "110122", "display": "Login"}]
    assert (event["action"], event["outcome"]) == ("E", "4")
    assert event["outcomeDesc"] == "wrong password"
    assert event["agent"][0]["who"] == {"display": "anonymous"}
    assert event["agent"][0]["network"] == {"address": "clinic-gw.example", "type": "1"}
    assert "entity" not in event


def test_a_search_entity_is_a_query() -> None:
    event = to_audit_event(_record(event="search", entity_type="Case", detail="3 of 3"))

    [entity] = event["entity"]
    assert entity["role"]["code"] == "24" and entity["description"] == "3 of 3"
    assert event["subtype"][0]["code"] == "search-type"
    assert "outcomeDesc" not in event


@pytest.mark.parametrize(
    ("event", "type_code", "subtype_code"),
    [
        ("create", "rest", "create"),
        ("update", "rest", "update"),
        ("delete", "rest", "delete"),
        ("token", "110114", "110122"),
        ("logout", "110114", "110123"),
        ("export", "110106", None),
        ("dicom-store", "110104", None),
        ("dicom-retrieve", "110104", None),
        ("dicom-find", "110112", None),
        ("dicom-association", "110100", None),
        ("config", "110100", None),
    ],
)
def test_every_saf_event_has_balp_codes(
    event: str, type_code: str, subtype_code: str | None
) -> None:
    type_coding, subtype = event_codes(event)

    assert type_coding["code"] == type_code
    assert (subtype or {}).get("code") == subtype_code


def test_every_audit_event_is_mapped_explicitly() -> None:
    assert set(audit.EVENTS) == set(EVENT_CODES)


def test_searchset_bundle() -> None:
    records = [_record(id=2), _record(id=1)]

    bundle = searchset(records, total=2)

    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert bundle["total"] == 2
    assert [e["fullUrl"] for e in bundle["entry"]] == ["AuditEvent/2", "AuditEvent/1"]
    assert all(e["search"] == {"mode": "match"} for e in bundle["entry"])
