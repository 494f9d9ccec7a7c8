"""Audit records as FHIR R4 AuditEvent resources, in the shapes of IHE BALP.

Pure functions: a stored `AuditRecord` in, a JSON-ready dict out; no database access.
The FHIR API serves these at /fhir/AuditEvent, and /api/audit until then.

The mapping of saf's audit events (saf.audit.EVENTS) to BALP:

| saf event | AuditEvent.type | subtype |
|---|---|---|
| read, search, create, update, delete | audit-event-type `rest` | restful-interaction (1) |
| login, token | DCM 110114 User Authentication | DCM 110122 Login |
| logout | DCM 110114 User Authentication | DCM 110123 Logout |
| export | DCM 110106 Export | — |
| dicom-store, dicom-retrieve | DCM 110104 DICOM Instances Transferred | — |
| dicom-find | DCM 110112 Query | — |
| dicom-association, config | DCM 110100 Application Activity | — |

(1) read, search-type, create, update, delete respectively.

Agents follow BALP: the requesting party (user, client or AE; Source Role ID,
`requestor` true, with its network address) and the hub (Destination Role ID). The
entity list holds the touched object (`Task/…` for a case, `ImagingStudy/…` for a
study; an identifier for objects that are not FHIR resources) and, when the record
names a patient, the BALP patient entity `Patient/…`.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from saf.models import AuditRecord

DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
SAF_IDS = "urn:saf:id:"
"""Prefix of the identifier system for saf objects that are not FHIR resources."""

OBSERVER = "saf"
"""The audit source (BALP `source.observer`): this hub."""

_REST = {"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "Restful Operation"}
_AUTH = {"system": DCM, "code": "110114", "display": "User Authentication"}

EVENT_CODES: dict[str, tuple[dict[str, str], dict[str, str] | None]] = {
    "read": (_REST, {"system": RESTFUL_INTERACTION, "code": "read", "display": "read"}),
    "search": (
        _REST,
        {"system": RESTFUL_INTERACTION, "code": "search-type", "display": "search type"},
    ),
    "create": (_REST, {"system": RESTFUL_INTERACTION, "code": "create", "display": "create"}),
    "update": (_REST, {"system": RESTFUL_INTERACTION, "code": "update", "display": "update"}),
    "delete": (_REST, {"system": RESTFUL_INTERACTION, "code": "delete", "display": "delete"}),
    "login": (_AUTH, {"system": DCM, "code": "110122", "display": "Login"}),
    "token": (_AUTH, {"system": DCM, "code": "110122", "display": "Login"}),
    "logout": (_AUTH, {"system": DCM, "code": "110123", "display": "Logout"}),
    "export": ({"system": DCM, "code": "110106", "display": "Export"}, None),
    "dicom-store": (
        {"system": DCM, "code": "110104", "display": "DICOM Instances Transferred"},
        None,
    ),
    "dicom-retrieve": (
        {"system": DCM, "code": "110104", "display": "DICOM Instances Transferred"},
        None,
    ),
    "dicom-find": ({"system": DCM, "code": "110112", "display": "Query"}, None),
    "dicom-commitment": (
        {"system": DCM, "code": "110100", "display": "Application Activity"},
        None,
    ),
    "dicom-association": (
        {"system": DCM, "code": "110100", "display": "Application Activity"},
        None,
    ),
    "config": ({"system": DCM, "code": "110100", "display": "Application Activity"}, None),
}
"""saf audit event -> (AuditEvent.type, AuditEvent.subtype)."""

FHIR_TYPE_OF: dict[str, str] = {
    "Case": "Task",
    "Study": "ImagingStudy",
    "Patient": "Patient",
    "Task": "Task",
    "ImagingStudy": "ImagingStudy",
    "DocumentReference": "DocumentReference",
    "Binary": "Binary",
    "ServiceRequest": "ServiceRequest",
    "DiagnosticReport": "DiagnosticReport",
    "AuditEvent": "AuditEvent",
    "Bundle": "Bundle",
}
"""saf entity types that are (or are served as) FHIR resources, and their FHIR type."""

_AGENT_TYPE = {"user": "humanuser", "client": "application", "ae": "application"}


def event_codes(event: str) -> tuple[dict[str, str], dict[str, str] | None]:
    """The BALP (type, subtype) codings of a saf audit event; Application Activity if unknown."""
    return EVENT_CODES.get(
        event, ({"system": DCM, "code": "110100", "display": "Application Activity"}, None)
    )


def to_audit_event(rec: AuditRecord) -> dict[str, Any]:
    """The FHIR R4 AuditEvent for one stored record (ids only, as stored: no PHI)."""
    type_coding, subtype = event_codes(rec.event)
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(rec.id),
        "type": type_coding,
        "action": rec.action,
        "recorded": _instant(rec),
        "outcome": str(rec.outcome),
        "agent": [_requestor(rec), _hub_agent()],
        "source": {
            "observer": {"display": OBSERVER},
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
    }
    if subtype is not None:
        resource["subtype"] = [subtype]
    if rec.outcome and rec.detail:
        resource["outcomeDesc"] = rec.detail
    entities = _entities(rec)
    if entities:
        resource["entity"] = entities
    return resource


def searchset(records: list[AuditRecord], *, total: int | None = None) -> dict[str, Any]:
    """A FHIR searchset Bundle of AuditEvents (newest first, as given)."""
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {
                "fullUrl": f"AuditEvent/{r.id}",
                "resource": to_audit_event(r),
                "search": {"mode": "match"},
            }
            for r in records
        ],
    }
    if total is not None:
        bundle["total"] = total
    return bundle


def _instant(rec: AuditRecord) -> str:
    # FHIR instant: seconds precision at least, with a zone; stored values are UTC.
    return rec.at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _requestor(rec: AuditRecord) -> dict[str, Any]:
    who: dict[str, Any] = {}
    if rec.actor_id:
        who["identifier"] = {"system": f"{SAF_IDS}{rec.actor_kind}", "value": rec.actor_id}
    if rec.actor_name:
        who["display"] = rec.actor_name
    if not who:
        who["display"] = rec.actor_kind
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
        "who": who,
        "requestor": True,
    }
    kind = _AGENT_TYPE.get(rec.actor_kind)
    if kind is not None:
        agent["role"] = [{"text": kind}]
    if rec.source_address:
        agent["network"] = {
            "address": rec.source_address,
            "type": "2" if _is_ip(rec.source_address) else "1",  # 2 IP address, 1 machine name
        }
    return agent


def _hub_agent() -> dict[str, Any]:
    return {
        "type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
        "who": {"display": OBSERVER},
        "requestor": False,
    }


def _entities(rec: AuditRecord) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    if rec.entity_type or rec.entity_id:
        entity: dict[str, Any] = {"what": _what(rec.entity_type, rec.entity_id)}
        if rec.event == "search":
            entity["type"] = {"system": ENTITY_TYPE, "code": "2", "display": "System Object"}
            entity["role"] = {"system": OBJECT_ROLE, "code": "24", "display": "Query"}
        elif rec.entity_type == "Patient":
            entity["type"] = {"system": ENTITY_TYPE, "code": "1", "display": "Person"}
            entity["role"] = {"system": OBJECT_ROLE, "code": "1", "display": "Patient"}
        else:
            entity["type"] = {"system": ENTITY_TYPE, "code": "2", "display": "System Object"}
            entity["role"] = {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"}
        if rec.detail and not rec.outcome:
            entity["description"] = rec.detail
        entities.append(entity)
    if rec.patient_pk and not (rec.entity_type == "Patient" and rec.entity_id == rec.patient_pk):
        entities.append(
            {
                "what": {"reference": f"Patient/{rec.patient_pk}"},
                "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    if rec.clinic_id:
        entities.append(
            {
                "what": {"reference": f"Organization/{rec.clinic_id}"},
                "type": {"system": ENTITY_TYPE, "code": "3", "display": "Organization"},
            }
        )
    return entities


def _what(entity_type: str | None, entity_id: str | None) -> dict[str, Any]:
    fhir_type = FHIR_TYPE_OF.get(entity_type or "")
    if fhir_type and entity_id:
        return {"reference": f"{fhir_type}/{entity_id}"}
    what: dict[str, Any] = {}
    if entity_id:
        what["identifier"] = {"system": f"{SAF_IDS}{entity_type or 'object'}", "value": entity_id}
    what["display"] = f"{entity_type or 'object'}" + (f"/{entity_id}" if entity_id else "")
    return what


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
