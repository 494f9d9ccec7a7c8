"""AuditEvent at /fhir/AuditEvent: the audit trail as FHIR R4 (IHE BALP shapes, built by
saf.audit_fhir), searched with saf.audit_search (the filters /api/audit uses too).

Only admins (and the hub) read the trail: their role carries ``user/AuditEvent.rs``; other
people get 403 from the scope check, and an EHR client whose ``system/*.rs`` reaches the
type still sees no record (saf.tenancy.visible_audit). Reading the trail is itself audited.
Search: ``date``, ``agent``, ``entity``, ``patient``, ``type``, ``subtype``, ``outcome``,
``_id``, ``_count`` (default 20, at most 200), ``_offset``; newest first.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response

from fhir_api.outcome import FhirError, FhirRoute, check_format, fhir_json, issue
from fhir_api.outcome import operation_outcome as outcome
from fhir_api.search import COUNT_DEFAULT, COUNT_MAX
from saf import audit, audit_search
from saf.audit_fhir import to_audit_event
from saf.deps import CurrentPrincipal, HubDep, require_scope
from saf.hub import Hub

router = APIRouter(tags=["fhir"], route_class=FhirRoute)

SEARCH_PARAMS: Final = (
    "_id",
    "date",
    "agent",
    "entity",
    "patient",
    "type",
    "subtype",
    "outcome",
)
"""AuditEvent search parameters (the CapabilityStatement lists these)."""

_CONTROL: Final = ("_count", "_offset", "_format")

CAPABILITY: Final[dict[str, Any]] = {
    "type": "AuditEvent",
    "profile": "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.Read",
    "documentation": "The audit trail (IHE BALP shapes); admins only. Read-only.",
    "versioning": "no-version",
    "readHistory": False,
    "updateCreate": False,
    "interaction": [{"code": "read"}, {"code": "search-type"}],
    "searchParam": [
        {"name": "_id", "type": "token"},
        {"name": "date", "type": "date"},
        {"name": "agent", "type": "reference"},
        {"name": "entity", "type": "reference"},
        {"name": "patient", "type": "reference"},
        {"name": "type", "type": "token"},
        {"name": "subtype", "type": "token"},
        {"name": "outcome", "type": "token"},
    ],
}
"""The CapabilityStatement.rest.resource entry for AuditEvent."""


def _base(request: Request, hub: Hub) -> str:
    root = hub.settings.public_url or f"{request.url.scheme}://{request.url.netloc}"
    return root.rstrip("/") + "/fhir"


@router.get("/AuditEvent")
def search_audit_events(request: Request, principal: CurrentPrincipal, hub: HubDep) -> Response:
    """Search the audit trail (a searchset Bundle, newest first)."""
    check_format(request)
    require_scope("AuditEvent", "s")(principal, request, hub)
    params = request.query_params
    unknown = sorted({k for k in params if k not in SEARCH_PARAMS + _CONTROL})
    if unknown and "handling=strict" in (request.headers.get("prefer") or ""):
        raise FhirError(400, f"unknown search parameters: {', '.join(unknown)}", expression=unknown)

    def one(name: str) -> str | None:
        values = params.getlist(name)
        if len(values) > 1:
            raise FhirError(400, f"{name} may be given once", expression=[name])
        return values[0] if values else None

    try:
        count = max(0, min(COUNT_MAX, int(params.get("_count", COUNT_DEFAULT))))
        offset = max(0, int(params.get("_offset", "0")))
    except ValueError:
        raise FhirError(400, "_count and _offset must be integers", expression=["_count"]) from None
    query = audit_search.AuditQuery(
        date=params.getlist("date"),
        agent=one("agent"),
        entity=one("entity"),
        patient=one("patient"),
        type=one("type"),
        subtype=one("subtype"),
        outcome=one("outcome"),
        ids=[v for value in params.getlist("_id") for v in value.split(",") if v],
    )
    try:
        records, total = audit_search.search(hub, principal, query, count=count, offset=offset)
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0].rstrip(":")
        raise FhirError(400, str(exc), expression=[name]) from None
    audit.record(
        hub,
        "search",
        principal,
        entity_type="AuditEvent",
        detail=f"{len(records)} of {total} matches",
    )
    base = _base(request, hub)
    used = [(k, v) for k, v in params.multi_items() if k in SEARCH_PARAMS]

    def link(at: int) -> str:
        pairs = [*used, ("_count", str(count)), ("_offset", str(at))]
        return f"{base}/AuditEvent?{urlencode(pairs)}"

    links = [{"relation": "self", "url": link(offset)}]
    if offset + count < total and count > 0:
        links.append({"relation": "next", "url": link(offset + count)})
    if offset > 0:
        links.append({"relation": "previous", "url": link(max(0, offset - count))})
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{base}/AuditEvent/{r.id}",
            "resource": to_audit_event(r),
            "search": {"mode": "match"},
        }
        for r in records
    ]
    if unknown:
        issues = [
            issue("not-supported", f"unknown search parameter {n!r} was ignored", [n], "warning")
            for n in unknown
        ]
        entries.append({"resource": outcome(issues), "search": {"mode": "outcome"}})
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": entries,
    }
    return fhir_json(bundle)


@router.get("/AuditEvent/{audit_event_id}")
def read_audit_event(
    audit_event_id: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """Read one audit record as an AuditEvent."""
    check_format(request)
    require_scope("AuditEvent", "r")(principal, request, hub)
    record = audit_search.get(hub, principal, audit_event_id)
    audit.record(
        hub,
        "read",
        principal,
        outcome=audit.SUCCESS if record is not None else audit.MINOR_FAILURE,
        entity_type="AuditEvent",
        entity_id=audit_event_id[:64],
        detail=None if record is not None else "not found or not visible to the caller",
    )
    if record is None:
        raise FhirError(404, f"AuditEvent/{audit_event_id} is not known")
    return fhir_json(to_audit_event(record))
