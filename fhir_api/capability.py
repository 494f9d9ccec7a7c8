"""The CapabilityStatement: exactly the interactions and search parameters served."""

from __future__ import annotations

from typing import Any, Final

from fhir_api import audit_events, imaging_study, subscriptions
from fhir_api.search import PARAMS
from fhir_api.tasks import INCLUDES as TASK_INCLUDES
from fhir_api.tasks import INTERACTIONS as TASK_INTERACTIONS
from fhir_api.tasks import SEARCH_PARAMS as TASK_PARAMS
from saf.auth_http import TOKEN_PATH
from saf.fhir_store import STORED_TYPES
from saf.hub import Hub

INTERACTIONS: Final = ("read", "vread", "create", "update", "delete", "history-instance")
"""Type-level and instance-level interactions of every stored type (plus search-type)."""

_PARAM_TYPES: Final = {
    "_id": "token",
    "_lastUpdated": "date",
    "identifier": "token",
    "patient": "reference",
    "subject": "reference",
    "status": "token",
    # A1: replies, documents
    "based-on": "reference",
    "code": "token",
    "type": "token",
    "category": "token",
    "date": "date",
}


_TASK_PARAM_TYPES: Final = {
    "_id": "token",
    "status": "token",
    "priority": "token",
    "owner": "reference",
    "performer-type": "token",
    "_lastUpdated": "date",
}


def capability_statement(base: str, hub: Hub) -> dict[str, Any]:
    """The server's CapabilityStatement (R4 4.0.1, JSON, SMART Backend Services)."""
    root = base.removesuffix("/fhir")
    resources: list[dict[str, Any]] = [
        {
            "type": resource_type,
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": False,
            "conditionalCreate": True,
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "interaction": [{"code": code} for code in (*INTERACTIONS, "search-type")],
            "searchParam": [
                {"name": name, "type": _PARAM_TYPES[name]} for name in PARAMS[resource_type]
            ],
        }
        for resource_type in STORED_TYPES
    ]
    resources.append(
        {
            "type": "Task",
            "documentation": "A case: its status is the case status. Update and patch "
            "(JSON Patch) change status, owner (Practitioner/<username>) and priority, and "
            "add notes (note: kept as written, new ones at the end); completed comes with "
            'the reply (DiagnosticReport). If-Match: W/"n" is honoured (412 on mismatch); '
            "without it the write is unconditional. Version n is the case after its n-th "
            "event (vread, _history with _count and _offset); basedOn, focus and for are "
            "the links as they are now.",
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": False,
            "conditionalUpdate": False,
            "interaction": [{"code": code} for code in TASK_INTERACTIONS],
            "searchParam": [
                {"name": name, "type": _TASK_PARAM_TYPES[name]} for name in TASK_PARAMS
            ],
        }
    )
    resources[-1]["searchInclude"] = [*TASK_INCLUDES]
    # _include=<Type>:patient and Patient?_revinclude=<Type>:patient (fhir_api.search)
    about_patients = [t for t in STORED_TYPES if "patient" in PARAMS.get(t, ())]
    for item in resources:
        entry: dict[str, Any] = item
        if entry["type"] in about_patients:
            entry["searchInclude"] = [f"{entry['type']}:patient", f"{entry['type']}:subject"]
        elif entry["type"] == "Patient":
            entry["searchRevInclude"] = [f"{t}:patient" for t in about_patients]
    # Binary (create, read: the bytes; fhir_api.mhd)
    resources.append(
        {
            "type": "Binary",
            "documentation": "Document bytes (sealed blobs): POST raw bytes with any "
            "Content-Type or FHIR JSON with data; read answers the bytes with their "
            "Content-Type, or FHIR JSON when asked for.",
            "interaction": [{"code": "create"}, {"code": "read"}],
        }
    )
    # Generated or hub-managed types: ImagingStudy, AuditEvent, Subscription.
    resources += [imaging_study.CAPABILITY, audit_events.CAPABILITY, subscriptions.CAPABILITY]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-27",
        "kind": "instance",
        "software": {"name": "saf", "version": "0.1.0"},
        "implementation": {"description": "saf store-and-forward hub", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                # A1: POST /fhir (fhir_api.bundles)
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
                "security": {
                    "cors": False,
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/"
                                    "restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ],
                    "extension": [
                        {
                            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/"
                            "oauth-uris",
                            "extension": [
                                {"url": "token", "valueUri": root + TOKEN_PATH},
                            ],
                        }
                    ],
                    "description": "SMART Backend Services (client_credentials with a signed "
                    "JWT assertion) and user tokens; see /.well-known/smart-configuration",
                },
                "resource": resources,
            }
        ],
    }
