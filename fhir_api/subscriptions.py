"""FHIR Subscription (R4 backport, rest-hook) at /fhir/Subscription: create, read, update,
delete, search and ``$status``, scoped to the caller's clinic (saf.subscriptions).

Thin: scope check (saf.deps.require_scope on ``Subscription``), body parsing
(fhir_api.resources), the core call, one audit record. Search parameters: ``status``,
``_id``, ``_count``, ``_offset``; others are ignored and reported (400 with
``Prefer: handling=strict``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from fhir_api.outcome import (
    FhirError,
    FhirRoute,
    check_content_type,
    check_format,
    fhir_json,
    issue,
)
from fhir_api.outcome import operation_outcome as outcome
from fhir_api.resources import parse, read_body
from fhir_api.search import COUNT_DEFAULT, COUNT_MAX
from saf import audit, subscriptions
from saf.deps import CurrentPrincipal, HubDep, require_scope
from saf.hub import Hub
from saf.identity import Principal
from saf.subscriptions import SubscriptionError

router = APIRouter(tags=["fhir"], route_class=FhirRoute)

SEARCH_PARAMS: Final = ("_id", "status")
"""Subscription search parameters (the CapabilityStatement lists these)."""

_CONTROL: Final = ("_count", "_offset", "_format")

CAPABILITY: Final[dict[str, Any]] = {
    "type": "Subscription",
    "extension": [
        {
            "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
            "capabilitystatement-subscriptiontopic-canonical",
            "valueCanonical": subscriptions.TOPIC,
        }
    ],
    "supportedProfile": [subscriptions.SUBSCRIPTION_PROFILE],
    "documentation": "R4 backport topic-based subscriptions (topic: a case status changed; "
    "filter Task?status=...), rest-hook channel with handshake, retries with backoff; "
    "a clinic's own subscriptions and cases only. $status gives the SubscriptionStatus.",
    "versioning": "versioned",
    "readHistory": False,
    "updateCreate": False,
    "interaction": [
        {"code": "read"},
        {"code": "create"},
        {"code": "update"},
        {"code": "delete"},
        {"code": "search-type"},
    ],
    "searchParam": [{"name": "_id", "type": "token"}, {"name": "status", "type": "token"}],
    "operation": [
        {
            "name": "status",
            "definition": "http://hl7.org/fhir/uv/subscriptions-backport/"
            "OperationDefinition/backport-subscription-status",
        }
    ],
}
"""The CapabilityStatement.rest.resource entry for Subscription."""


def _base(request: Request, hub: Hub) -> str:
    root = hub.settings.public_url or f"{request.url.scheme}://{request.url.netloc}"
    return root.rstrip("/") + "/fhir"


def _audit(
    hub: Hub,
    event: str,
    principal: Principal,
    subscription_id: str | None,
    *,
    outcome: int = audit.SUCCESS,
    detail: str | None = None,
) -> None:
    audit.record(
        hub,
        event,
        principal,
        outcome=outcome,
        entity_type="Subscription",
        entity_id=subscription_id[:64] if subscription_id else None,
        clinic_id=principal.clinic_id,
        detail=detail,
    )


@contextmanager
def _refusals(
    hub: Hub, event: str, principal: Principal, subscription_id: str | None
) -> Iterator[None]:
    """A refused core call becomes an OperationOutcome and an audit record."""
    try:
        yield
    except SubscriptionError as exc:
        _audit(
            hub,
            event,
            principal,
            subscription_id,
            outcome=audit.MINOR_FAILURE,
            detail=f"refused: HTTP {exc.status}",
        )
        raise FhirError(
            exc.status, exc.diagnostics, expression=[exc.expression] if exc.expression else None
        ) from None


def _headers(resource: dict[str, Any], base: str, *, location: bool = False) -> dict[str, str]:
    version = resource["meta"]["versionId"]
    headers = {"ETag": f'W/"{version}"'}
    if location:
        headers["Location"] = f"{base}/Subscription/{resource['id']}/_history/{version}"
    return headers


@router.post("/Subscription")
async def create_subscription(
    request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """Create a subscription of the caller's clinic; the handshake runs before the answer,
    so its status is already ``active`` (or ``error``, with the reason in ``error``)."""
    check_format(request)
    require_scope("Subscription", "c")(principal, request, hub)
    check_content_type(request)
    body = await read_body(request, hub.settings.fhir_max_body_bytes)

    def create() -> Response:  # on a worker thread: the handshake waits on the clinic
        content = parse(body, "Subscription")
        with _refusals(hub, "create", principal, None):
            resource = subscriptions.create(hub, principal, content)
        _audit(hub, "create", principal, resource["id"], detail=f"status {resource['status']}")
        base = _base(request, hub)
        return fhir_json(resource, 201, _headers(resource, base, location=True))

    return await run_in_threadpool(create)


@router.get("/Subscription")
def search_subscriptions(request: Request, principal: CurrentPrincipal, hub: HubDep) -> Response:
    """The caller's clinic's subscriptions (a searchset Bundle)."""
    check_format(request)
    require_scope("Subscription", "s")(principal, request, hub)
    params = request.query_params
    try:
        count = max(0, min(COUNT_MAX, int(params.get("_count", COUNT_DEFAULT))))
        offset = max(0, int(params.get("_offset", "0")))
    except ValueError:
        raise FhirError(400, "_count and _offset must be integers", expression=["_count"]) from None
    unknown = sorted({k for k in params if k not in SEARCH_PARAMS + _CONTROL})
    if unknown and "handling=strict" in (request.headers.get("prefer") or ""):
        raise FhirError(400, f"unknown search parameters: {', '.join(unknown)}", expression=unknown)
    statuses = [v for value in params.getlist("status") for v in value.split(",") if v]
    ids = [v for value in params.getlist("_id") for v in value.split(",") if v]
    found, total = subscriptions.search(
        hub, principal, status=statuses or None, ids=ids or None, count=count, offset=offset
    )
    _audit(hub, "search", principal, None, detail=f"{len(found)} of {total} matches")
    base = _base(request, hub)
    used = [(k, v) for k, v in params.multi_items() if k in SEARCH_PARAMS]

    def link(at: int) -> str:
        query = urlencode([*used, ("_count", str(count)), ("_offset", str(at))])
        return f"{base}/Subscription?{query}"

    links = [{"relation": "self", "url": link(offset)}]
    if offset + count < total and count > 0:
        links.append({"relation": "next", "url": link(offset + count)})
    entries: list[dict[str, Any]] = [
        {"fullUrl": f"{base}/Subscription/{r['id']}", "resource": r, "search": {"mode": "match"}}
        for r in found
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


@router.get("/Subscription/{subscription_id}")
def read_subscription(
    subscription_id: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """Read a subscription of the caller's clinic."""
    check_format(request)
    require_scope("Subscription", "r")(principal, request, hub)
    with _refusals(hub, "read", principal, subscription_id):
        resource = subscriptions.read(hub, principal, subscription_id)
    _audit(hub, "read", principal, subscription_id)
    return fhir_json(resource, headers=_headers(resource, _base(request, hub)))


@router.put("/Subscription/{subscription_id}")
async def update_subscription(
    subscription_id: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """Replace a subscription (a new version; the handshake runs again unless it is off)."""
    check_format(request)
    require_scope("Subscription", "u")(principal, request, hub)
    check_content_type(request)
    content = parse(await read_body(request, hub.settings.fhir_max_body_bytes), "Subscription")
    if content.get("id") != subscription_id:
        raise FhirError(
            400,
            f"the body's id {content.get('id')!r} is not the URL's {subscription_id!r}",
            expression=["Subscription.id"],
        )

    def update() -> Response:  # on a worker thread: the handshake waits on the clinic
        with _refusals(hub, "update", principal, subscription_id):
            resource = subscriptions.update_subscription(hub, principal, subscription_id, content)
        _audit(hub, "update", principal, subscription_id, detail=f"status {resource['status']}")
        return fhir_json(resource, headers=_headers(resource, _base(request, hub)))

    return await run_in_threadpool(update)


@router.get("/Subscription/{subscription_id}/$status")
def subscription_status(
    subscription_id: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """The SubscriptionStatus (type ``query-status``): status, events since the start,
    the last error."""
    check_format(request)
    require_scope("Subscription", "r")(principal, request, hub)
    with _refusals(hub, "read", principal, subscription_id):
        bundle = subscriptions.status_of(hub, principal, subscription_id, _base(request, hub))
    _audit(hub, "read", principal, subscription_id, detail="$status")
    return fhir_json(bundle)


@router.delete("/Subscription/{subscription_id}")
def delete_subscription(
    subscription_id: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """Delete (turn off for good) a subscription of the caller's clinic."""
    check_format(request)
    require_scope("Subscription", "d")(principal, request, hub)
    with _refusals(hub, "delete", principal, subscription_id):
        subscriptions.delete(hub, principal, subscription_id)
    _audit(hub, "delete", principal, subscription_id)
    return Response(status_code=204)
