"""The FHIR R4 REST router at /fhir: metadata, read, vread, create, update, delete,
history and search of the types in saf.fhir_store.STORED_TYPES; Binary (fhir_api.mhd)
and transaction/batch Bundles (fhir_api.bundles) have routers of their own.

Thin: each route checks the caller's SMART scope for the type and interaction
(saf.deps.require_scope), parses the body (fhir_api.resources), calls saf.fhir_store
(which applies tenancy), writes one audit record (ids and counts only), and answers FHIR
JSON with ``ETag: W/"<version>"``, ``Last-Modified`` and, for writes, ``Location``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from email.utils import format_datetime
from typing import Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from fhir_api import audit_events, bundles, imaging_study, mhd, subscriptions, tasks
from fhir_api.capability import capability_statement
from fhir_api.outcome import (
    FHIR_JSON,
    FhirError,
    FhirRoute,
    check_content_type,
    check_format,
    fhir_json,
    if_match,
    issue,
    operation_outcome,
)
from fhir_api.resources import parse, read_body, rules_of
from fhir_api.search import COUNT_MAX, SearchError, parse_search
from saf import audit, fhir_store
from saf.deps import CurrentPrincipal, HubDep, require_scope
from saf.fhir_store import STORED_TYPES, Stored
from saf.hub import Hub
from saf.identity import Principal
from saf.routing import RuleSet

router = APIRouter(prefix="/fhir", tags=["fhir"], route_class=FhirRoute)

METADATA_PATH: Final = "/fhir/metadata"
"""The CapabilityStatement: public, as FHIR servers serve it (it holds no data)."""


def _rules(request: Request, hub: Hub) -> RuleSet:
    return rules_of(request, hub)


def _base(request: Request, hub: Hub) -> str:
    root = hub.settings.public_url or f"{request.url.scheme}://{request.url.netloc}"
    return root.rstrip("/") + "/fhir"


def _type(resource_type: str) -> str:
    if resource_type not in STORED_TYPES:
        raise FhirError(
            404,
            f"resource type {resource_type!r} is not served here (see /fhir/metadata)",
            code="not-supported",
        )
    return resource_type


def _allowed(
    principal: Principal, request: Request, hub: Hub, resource_type: str, interaction: str
) -> None:
    require_scope(resource_type, interaction)(principal, request, hub)


def _headers(stored: Stored, location_base: str | None = None) -> dict[str, str]:
    """ETag and Last-Modified; and Location (under `location_base`) when one is given."""
    headers = {
        "ETag": f'W/"{stored.version_id}"',
        "Last-Modified": format_datetime(stored.last_updated.astimezone(UTC), usegmt=True),
    }
    if location_base is not None:
        headers["Location"] = (
            f"{location_base}/{stored.resource_type}/{stored.id}/_history/{stored.version_id}"
        )
    return headers


def _audit(
    hub: Hub,
    event: str,
    principal: Principal,
    resource_type: str,
    resource_id: str | None,
    *,
    stored: Stored | None = None,
    outcome: int = audit.SUCCESS,
    detail: str | None = None,
) -> None:
    audit.record_access(
        hub,
        event,
        principal,
        resource_type,
        resource_id,
        owner=stored,
        outcome=outcome,
        detail=detail,
    )


@contextmanager
def _audited(
    hub: Hub, event: str, principal: Principal, resource_type: str, resource_id: str | None
) -> Iterator[None]:
    """Record a refused store call (not found, gone, conflict) before re-raising it."""
    try:
        yield
    except fhir_store.StoreError as exc:
        _audit(
            hub,
            event,
            principal,
            resource_type,
            resource_id,
            outcome=audit.MINOR_FAILURE,
            detail=f"refused: {exc.code}",
        )
        raise


def _prefer_minimal(request: Request) -> bool:
    return "return=minimal" in (request.headers.get("prefer") or "")


def _resource_response(
    stored: Stored, status: int, request: Request, *, location_base: str | None = None
) -> Response:
    """The resource (or nothing, for ``Prefer: return=minimal``) with its headers; a
    Location under `location_base` when one is given (the base URL costs a URL parse, so
    a read does not build it)."""
    headers = _headers(stored, location_base)
    if _prefer_minimal(request):
        return Response(status_code=status, headers=headers, media_type=FHIR_JSON)
    assert stored.content is not None
    return fhir_json(stored.content, status, headers)


# --------------------------------------------------------------------------- routes


@router.get("/metadata")
def metadata(request: Request, hub: HubDep) -> Response:
    """The CapabilityStatement (public)."""
    check_format(request)
    return fhir_json(capability_statement(_base(request, hub), hub))


# Task (a case: read, search, update, patch) before the generic routes, which would take
# /fhir/Task.
router.include_router(tasks.router)
router.include_router(subscriptions.router)
router.include_router(imaging_study.router)
router.include_router(audit_events.router)
router.include_router(mhd.router)


@router.post("")
async def bundle(request: Request, principal: CurrentPrincipal, hub: HubDep) -> Response:
    """A transaction or batch Bundle (fhir_api.bundles); answers the response Bundle."""
    return await bundles.process_bundle(request, principal, hub)


@router.get("/{resource_type}")
def search(
    resource_type: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """Search a type: a searchset Bundle with total, self and next links."""
    check_format(request)
    resource_type = _type(resource_type)
    _allowed(principal, request, hub, resource_type, "s")
    try:
        parsed = parse_search(resource_type, list(request.query_params.multi_items()))
    except SearchError as exc:
        raise FhirError(400, str(exc), expression=[exc.param]) from None
    strict = "handling=strict" in (request.headers.get("prefer") or "")
    if parsed.unknown and strict:
        raise FhirError(
            400,
            f"unknown search parameters: {', '.join(parsed.unknown)}",
            code="not-supported",
            expression=parsed.unknown,
        )
    found, total = fhir_store.search(hub, principal, resource_type, parsed.search)
    base = _base(request, hub)
    _audit(hub, "search", principal, resource_type, None, detail=f"{len(found)} of {total} matches")
    bundle = _searchset(base, resource_type, parsed, found, total)
    included = _included(hub, principal, parsed, found)
    if included:
        _audit(hub, "search", principal, "Patient", None, detail=f"{len(included)} included")
        bundle["entry"][len(found) : len(found)] = [
            {
                "fullUrl": f"{base}/{s.resource_type}/{s.id}",
                "resource": s.content,
                "search": {"mode": "include"},
            }
            for s in included
        ]
    return fhir_json(bundle)


def _included(hub: Hub, principal: Principal, parsed: Any, found: list[Stored]) -> list[Stored]:
    """The resources ``_include``/``_revinclude`` add to a page (each once, tenancy applied)."""
    extra: list[Stored] = []
    seen = {(s.resource_type, s.id) for s in found}
    if parsed.includes:
        ids = sorted(
            {
                ref.removeprefix("Patient/")
                for s in found
                if s.content and (ref := fhir_store.subject_of(s.content))
            }
        )
        if ids:
            query = fhir_store.Search(ids=[ids], count=len(ids))
            extra += fhir_store.search(hub, principal, "Patient", query)[0]
    for source in parsed.revincludes:
        refs = [f"Patient/{s.id}" for s in found]
        if refs:
            query = fhir_store.Search(subjects=[refs], count=COUNT_MAX)
            extra += fhir_store.search(hub, principal, source, query)[0]
    unique = []
    for s in extra:
        if (s.resource_type, s.id) not in seen:
            seen.add((s.resource_type, s.id))
            unique.append(s)
    return unique


def _searchset(
    base: str, resource_type: str, parsed: Any, found: list[Stored], total: int
) -> dict[str, Any]:
    search = parsed.search

    def link(offset: int) -> str:
        pairs = [*parsed.used, ("_count", str(search.count)), ("_offset", str(offset))]
        return f"{base}/{resource_type}?{urlencode(pairs)}"

    links = [{"relation": "self", "url": link(search.offset)}]
    if search.offset + search.count < total and search.count > 0:
        links.append({"relation": "next", "url": link(search.offset + search.count)})
    if search.offset > 0:
        links.append({"relation": "previous", "url": link(max(0, search.offset - search.count))})
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{base}/{s.resource_type}/{s.id}",
            "resource": s.content,
            "search": {"mode": "match"},
        }
        for s in found
    ]
    if parsed.unknown:
        outcome = operation_outcome(
            [
                issue(
                    "not-supported",
                    f"unknown search parameter {name!r} was ignored",
                    [name],
                    severity="warning",
                )
                for name in parsed.unknown
            ]
        )
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": entries,
    }


@router.post("/{resource_type}")
async def create(
    resource_type: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """Create (server-assigned id); with ``If-None-Exist``, only when nothing matches."""
    check_format(request)
    resource_type = _type(resource_type)
    _allowed(principal, request, hub, resource_type, "c")
    check_content_type(request)
    content = parse(await read_body(request, hub.settings.fhir_max_body_bytes), resource_type)
    if problems := mhd.check_mhd(content, ""):
        raise FhirError(400, "the resource lacks what its MHD profile requires", issues=problems)
    return await run_in_threadpool(_create, request, principal, hub, resource_type, content)


def _create(
    request: Request, principal: Principal, hub: Hub, resource_type: str, content: dict[str, Any]
) -> Response:
    """`create` after the body is read: the database work, on a worker thread (never on the
    event loop, so one slow create does not hold the process's other requests)."""
    base = _base(request, hub)
    condition = request.headers.get("if-none-exist")
    if condition is not None:
        query = _condition(resource_type, condition)
        with _audited(hub, "create", principal, resource_type, None):
            stored, created = fhir_store.create_if_none_exist(
                hub, principal, content, query, condition, _rules(request, hub)
            )
        if not created:
            _audit(hub, "read", principal, resource_type, stored.id, stored=stored)
            return _resource_response(stored, 200, request, location_base=base)
    else:
        with _audited(hub, "create", principal, resource_type, None):
            stored = fhir_store.create(hub, principal, content, _rules(request, hub))
    _audit(
        hub,
        "create",
        principal,
        resource_type,
        stored.id,
        stored=stored,
        detail=f"version 1; case {stored.case_id}" if stored.case_id else "version 1",
    )
    return _resource_response(stored, 201, request, location_base=base)


def _condition(resource_type: str, condition: str) -> fhir_store.Search:
    """The search an ``If-None-Exist`` header names (saf.fhir_store.create_if_none_exist
    runs it and the create under one lock)."""
    from urllib.parse import parse_qsl

    try:
        parsed = parse_search(resource_type, parse_qsl(condition.lstrip("?")))
    except SearchError as exc:
        raise FhirError(400, f"If-None-Exist: {exc}", expression=[exc.param]) from None
    if parsed.unknown or not parsed.used:
        raise FhirError(
            400,
            f"If-None-Exist needs supported search parameters, got {condition!r}",
            code="not-supported",
        )
    return parsed.search


@router.get("/{resource_type}/{resource_id}")
def read(
    resource_type: str,
    resource_id: str,
    request: Request,
    principal: CurrentPrincipal,
    hub: HubDep,
) -> Response:
    """Read the current version. (GET of a stored type is answered by fhir_api.lean first;
    this route answers the other types with 404 not-supported.)"""
    return read_response(request, principal, hub, resource_type, resource_id)


def read_response(
    request: Request,
    principal: Principal,
    hub: Hub,
    resource_type: str,
    resource_id: str,
    version_id: str | None = None,
) -> Response:
    """Read (the current version) or, with `version_id`, vread: the one implementation of
    both, for these routes and for fhir_api.lean. The caller is already authenticated."""
    check_format(request)
    resource_type = _type(resource_type)
    _allowed(principal, request, hub, resource_type, "r")
    if version_id is None:
        with _audited(hub, "read", principal, resource_type, resource_id):
            stored = fhir_store.read(hub, principal, resource_type, resource_id)
        _audit(hub, "read", principal, resource_type, resource_id, stored=stored)
        return _resource_response(stored, 200, request)
    if not version_id.isdigit():
        raise FhirError(404, f"{resource_type}/{resource_id} has no version {version_id!r}")
    with _audited(hub, "read", principal, resource_type, resource_id):
        stored = fhir_store.vread(hub, principal, resource_type, resource_id, int(version_id))
    _audit(
        hub,
        "read",
        principal,
        resource_type,
        resource_id,
        stored=stored,
        detail=f"version {version_id}",
    )
    return _resource_response(stored, 200, request)


@router.put("/{resource_type}/{resource_id}")
async def update(
    resource_type: str,
    resource_id: str,
    request: Request,
    principal: CurrentPrincipal,
    hub: HubDep,
) -> Response:
    """Update (``If-Match`` for optimistic locking); no update-as-create."""
    check_format(request)
    resource_type = _type(resource_type)
    _allowed(principal, request, hub, resource_type, "u")
    check_content_type(request)
    content = parse(await read_body(request, hub.settings.fhir_max_body_bytes), resource_type)
    if content.get("id") != resource_id:
        raise FhirError(
            400,
            f"the body's id {content.get('id')!r} is not the URL's {resource_id!r}",
            expression=[f"{resource_type}.id"],
        )
    wanted_version = if_match(request)
    return await run_in_threadpool(
        _update, request, principal, hub, resource_type, resource_id, content, wanted_version
    )


def _update(
    request: Request,
    principal: Principal,
    hub: Hub,
    resource_type: str,
    resource_id: str,
    content: dict[str, Any],
    wanted_version: int | None,
) -> Response:
    """`update` after the body is read, on a worker thread (see `_create`)."""
    with _audited(hub, "update", principal, resource_type, resource_id):
        stored = fhir_store.update(
            hub, principal, content, _rules(request, hub), if_match=wanted_version
        )
    _audit(
        hub,
        "update",
        principal,
        resource_type,
        resource_id,
        stored=stored,
        detail=f"version {stored.version_id}",
    )
    return _resource_response(stored, 200, request)


@router.get("/{resource_type}/{resource_id}/_history")
def history(
    resource_type: str,
    resource_id: str,
    request: Request,
    principal: CurrentPrincipal,
    hub: HubDep,
) -> Response:
    """The versions of one resource, newest first (a history Bundle)."""
    check_format(request)
    resource_type = _type(resource_type)
    _allowed(principal, request, hub, resource_type, "r")
    try:
        count = min(200, max(0, int(request.query_params.get("_count", "50"))))
        offset = max(0, int(request.query_params.get("_offset", "0")))
    except ValueError:
        raise FhirError(400, "_count and _offset must be integers") from None
    with _audited(hub, "read", principal, resource_type, resource_id):
        versions, total = fhir_store.history(
            hub, principal, resource_type, resource_id, count=count, offset=offset
        )
    base = _base(request, hub)
    first = versions[0] if versions else None
    _audit(
        hub,
        "read",
        principal,
        resource_type,
        resource_id,
        stored=first,
        detail=f"history: {len(versions)} of {total} versions",
    )
    url = f"{base}/{resource_type}/{resource_id}/_history"
    links = [{"relation": "self", "url": f"{url}?_count={count}&_offset={offset}"}]
    if offset + count < total and count > 0:
        links.append({"relation": "next", "url": f"{url}?_count={count}&_offset={offset + count}"})
    entries = []
    for s in versions:
        entry: dict[str, Any] = {
            "fullUrl": f"{base}/{resource_type}/{resource_id}",
            "request": {
                "method": s.method,
                "url": resource_type if s.method == "POST" else f"{resource_type}/{resource_id}",
            },
            "response": {
                "status": {"POST": "201 Created", "PUT": "200 OK"}.get(s.method, "204 No Content"),
                "etag": f'W/"{s.version_id}"',
                "lastModified": s.last_updated.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            },
        }
        if s.content is not None:
            entry["resource"] = s.content
        entries.append(entry)
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "total": total,
        "link": links,
        "entry": entries,
    }
    return fhir_json(bundle)


@router.get("/{resource_type}/{resource_id}/_history/{version_id}")
def vread(
    resource_type: str,
    resource_id: str,
    version_id: str,
    request: Request,
    principal: CurrentPrincipal,
    hub: HubDep,
) -> Response:
    """Read one version (like `read`, fhir_api.lean answers the stored types first)."""
    return read_response(request, principal, hub, resource_type, resource_id, version_id)


@router.delete("/{resource_type}/{resource_id}")
def delete(
    resource_type: str,
    resource_id: str,
    request: Request,
    principal: CurrentPrincipal,
    hub: HubDep,
) -> Response:
    """Delete softly (a new version with no content; history and audit stay)."""
    check_format(request)
    resource_type = _type(resource_type)
    _allowed(principal, request, hub, resource_type, "d")
    with _audited(hub, "delete", principal, resource_type, resource_id):
        stored = fhir_store.delete(hub, principal, resource_type, resource_id)
    _audit(
        hub,
        "delete",
        principal,
        resource_type,
        resource_id,
        stored=stored,
        detail=f"version {stored.version_id}",
    )
    return Response(status_code=204, headers={"ETag": f'W/"{stored.version_id}"'})
