"""Transaction and batch Bundles: ``POST /fhir`` with a Bundle, processed per the R4 rules.

Order: every DELETE, then POST, then PUT, then GET (PATCH and HEAD are refused), whatever
the order of the entries; the response Bundle (``transaction-response`` or
``batch-response``) lists the entries in the request's order, each with
``response.status``, ``location`` and ``etag`` (and ``lastModified``).

A transaction is all-or-nothing: its writes are one database transaction
(saf.fhir_store.create_in/update_in/delete_in on one Session), and the Binary bytes it
sealed before that transaction are deleted from the blob store if it fails, so nothing
is left (``saf fsck`` sees no orphan). Before the writes, every ``fullUrl`` of a POST gets
its server id, and every ``reference`` and attachment ``url`` naming a ``fullUrl``
(``urn:uuid:…`` or absolute) is rewritten to ``<Type>/<id>``; a conditional reference
(``Patient?identifier=…``) must match exactly one resource the caller sees (none: 400,
several: 412). ``request.ifNoneExist`` makes a POST answer the match (200) instead;
``request.ifMatch`` is the ETag a PUT requires. GETs run after the commit and see it.

Case effects (a referral making its case, a reply moving it) run after the commit
through saf.fhir_store.settle, idempotently: a crash between commit and settle leaves
stored resources whose case effect a retry (or the same Bundle again) completes.

A batch processes each entry on its own (its own transaction); a failed entry answers
its status with an OperationOutcome in ``response.outcome``, the others stand. A batch
entry may not reference another entry (``urn:uuid`` stays unresolved and is refused).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Final
from urllib.parse import parse_qsl

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from fhir_api import mhd
from fhir_api.outcome import (
    FhirError,
    check_content_type,
    check_format,
    error_response,
    fhir_json,
    issue,
    operation_outcome,
)
from fhir_api.resources import read_body, rules_of, validate
from fhir_api.search import SearchError, parse_search
from saf import audit, documents, fhir_store
from saf.db import transaction
from saf.deps import AuthError, require_scope
from saf.fhir_store import BINARY, STORED_TYPES, Stored
from saf.hub import Hub
from saf.identity import Principal
from saf.models import new_id

ORDER: Final = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}
"""R4 processing order of a transaction's entries."""

INTERACTION: Final = {"DELETE": "d", "POST": "c", "PUT": "u", "GET": "r"}

WRITABLE: Final = (*STORED_TYPES, BINARY)

STATUS_TEXT: Final = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}


@dataclass
class Entry:
    """One entry of the request Bundle, understood."""

    index: int
    method: str
    resource_type: str
    resource_id: str | None
    query: str | None
    """The search of a GET ``Type?…`` (None for a read)."""
    full_url: str | None
    resource: dict[str, Any] | None
    if_none_exist: str | None
    if_match: int | None
    document: documents.Sealed | None = None
    new_id: str | None = None

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"


@dataclass
class Result:
    """What an entry did: its status and the resource (or search Bundle) it answers with."""

    status: int
    stored: Stored | None = None
    body: dict[str, Any] | None = None
    event: str = "read"


def _entry(index: int, raw: Any) -> Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict):
        raise FhirError(400, "an entry must be an object", expression=[where])
    request = raw.get("request")
    if not isinstance(request, dict):
        raise FhirError(400, "the entry has no request", expression=[f"{where}.request"])
    method = request.get("method")
    if method not in ORDER:
        raise FhirError(
            405 if method in ("PATCH", "HEAD") else 400,
            f"request.method {method!r} is not supported here (DELETE, POST, PUT, GET)",
            code="not-supported",
            expression=[f"{where}.request.method"],
        )
    url = str(request.get("url") or "").strip()
    base, _, query = url.partition("?")
    parts = [p for p in base.split("/") if p]
    if not parts:
        raise FhirError(400, "request.url is empty", expression=[f"{where}.request.url"])
    resource_type = parts[0]
    resource_id = parts[1] if len(parts) > 1 else None
    if resource_type not in WRITABLE or len(parts) > 2:
        raise FhirError(
            400 if len(parts) > 2 else 404,
            f"request.url {url!r}: not a {method} this server serves (see /fhir/metadata)",
            code="not-supported",
            expression=[f"{where}.request.url"],
        )
    if method in ("PUT", "DELETE") and (resource_id is None or query):
        raise FhirError(
            400,
            f"{method} needs {resource_type}/<id> (conditional {method} is not supported)",
            code="not-supported",
            expression=[f"{where}.request.url"],
        )
    if method == "POST" and resource_id is not None:
        raise FhirError(400, "POST takes the type only", expression=[f"{where}.request.url"])
    resource = raw.get("resource")
    if method in ("POST", "PUT"):
        validate(resource, resource_type, f"{where}.resource")
        assert isinstance(resource, dict)
        if method == "PUT" and resource.get("id") != resource_id:
            raise FhirError(
                400,
                f"the resource's id {resource.get('id')!r} is not the url's {resource_id!r}",
                expression=[f"{where}.resource.id"],
            )
        if problems := mhd.check_mhd(resource, f"{where}.resource"):
            raise FhirError(
                400, "the resource lacks what its MHD profile requires", issues=problems
            )
        if resource_type == BINARY:
            mhd.binary_from_json(resource, f"{where}.resource")
    if_match = None
    if isinstance(request.get("ifMatch"), str):
        text = request["ifMatch"].strip().removeprefix("W/").strip('"')
        if not text.isdigit():
            raise FhirError(400, "ifMatch must be an ETag", expression=[f"{where}.request.ifMatch"])
        if_match = int(text)
    full_url = raw.get("fullUrl") if isinstance(raw.get("fullUrl"), str) else None
    return Entry(
        index=index,
        method=method,
        resource_type=resource_type,
        resource_id=resource_id,
        query=query if method == "GET" and query else None,
        full_url=full_url,
        resource=dict(resource) if isinstance(resource, dict) else None,
        if_none_exist=request.get("ifNoneExist")
        if isinstance(request.get("ifNoneExist"), str)
        else None,
        if_match=if_match,
    )


def _rewrite(value: Any, names: dict[str, str]) -> Any:
    """`value` with every ``reference`` and ``url`` string that is a key of `names` replaced."""
    if isinstance(value, dict):
        return {
            k: (
                names.get(v, v)
                if k in ("reference", "url") and isinstance(v, str)
                else _rewrite(v, names)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rewrite(v, names) for v in value]
    return value


def _match(
    session: Session, hub: Hub, principal: Principal, resource_type: str, query: str, where: str
) -> list[Stored]:
    try:
        parsed = parse_search(resource_type, parse_qsl(query.lstrip("?")))
    except SearchError as exc:
        raise FhirError(400, f"{query!r}: {exc}", expression=[where]) from None
    if parsed.unknown or not parsed.used:
        raise FhirError(
            400, f"{resource_type}?{query}: needs supported search parameters", expression=[where]
        )
    parsed.search.count = 2
    found, _total = fhir_store.search_in(session, hub, principal, resource_type, parsed.search)
    return found


def _conditional_references(session: Session, hub: Hub, principal: Principal, entry: Entry) -> None:
    """Resolve ``Type?search`` references of `entry`'s resource to ``Type/<id>``."""

    def resolve(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if (
                    k == "reference"
                    and isinstance(v, str)
                    and "?" in v
                    and "/" not in v.split("?")[0]
                ):
                    kind, _, query = v.partition("?")
                    if kind not in STORED_TYPES:
                        raise FhirError(400, f"{v!r}: {kind} is not kept here", expression=[path])
                    found = _match(session, hub, principal, kind, query, path)
                    if len(found) != 1:
                        raise FhirError(
                            412 if found else 400,
                            f"conditional reference {v!r} matches "
                            f"{'more than one resource' if found else 'nothing'}",
                            code="multiple-matches" if found else "not-found",
                            expression=[f"{path}.reference"],
                        )
                    out[k] = f"{kind}/{found[0].id}"
                else:
                    out[k] = resolve(v, f"{path}.{k}")
            return out
        if isinstance(value, list):
            return [resolve(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    if entry.resource is not None:
        entry.resource = resolve(entry.resource, f"{entry.where}.resource")


def _write(
    session: Session,
    hub: Hub,
    principal: Principal,
    entry: Entry,
    batch: fhir_store.Batch | None = None,
) -> Result:
    """One DELETE, POST or PUT in `session` (a POST with the lookups and pending rows of
    `batch`, when there is one)."""
    if entry.method == "DELETE":
        assert entry.resource_id is not None
        stored = fhir_store.delete_in(
            session, hub, principal, entry.resource_type, entry.resource_id
        )
        return Result(204, stored, event="delete")
    assert entry.resource is not None
    if entry.method == "POST":
        if entry.if_none_exist is not None:
            # Held to the end of the entry's transaction: search and create are one step.
            fhir_store.lock_condition(session, principal, entry.resource_type, entry.if_none_exist)
            found = _match(
                session,
                hub,
                principal,
                entry.resource_type,
                entry.if_none_exist,
                f"{entry.where}.request.ifNoneExist",
            )
            if len(found) > 1:
                raise FhirError(
                    412,
                    "ifNoneExist matches more than one resource",
                    code="duplicate",
                    expression=[f"{entry.where}.request.ifNoneExist"],
                )
            if found:
                return Result(200, found[0])
        stored = fhir_store.create_in(
            session,
            hub,
            principal,
            entry.resource,
            resource_id=entry.new_id,
            document=entry.document,
            batch=batch,
        )
        return Result(201, stored, event="create")
    stored = fhir_store.update_in(session, hub, principal, entry.resource, if_match=entry.if_match)
    return Result(200, stored, event="update")


def _read(hub: Hub, principal: Principal, entry: Entry, base: str) -> Result:
    if entry.query is None and entry.resource_id is not None:
        return Result(200, fhir_store.read(hub, principal, entry.resource_type, entry.resource_id))
    try:
        parsed = parse_search(entry.resource_type, parse_qsl(entry.query or ""))
    except SearchError as exc:
        raise FhirError(400, str(exc), expression=[f"{entry.where}.request.url"]) from None
    found, total = fhir_store.search(hub, principal, entry.resource_type, parsed.search)
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "entry": [
            {
                "fullUrl": f"{base}/{s.resource_type}/{s.id}",
                "resource": s.content,
                "search": {"mode": "match"},
            }
            for s in found
        ],
    }
    return Result(200, body=bundle, event="search")


def _response_entry(base: str, result: Result, minimal: bool) -> dict[str, Any]:
    response: dict[str, Any] = {"status": STATUS_TEXT.get(result.status, str(result.status))}
    entry: dict[str, Any] = {}
    stored = result.stored
    if stored is not None:
        entry["fullUrl"] = f"{base}/{stored.resource_type}/{stored.id}"
        response["etag"] = f'W/"{stored.version_id}"'
        response["lastModified"] = (
            stored.last_updated.astimezone(UTC).isoformat().replace("+00:00", "Z")
        )
        if result.status in (200, 201) and result.event != "read":
            response["location"] = (
                f"{stored.resource_type}/{stored.id}/_history/{stored.version_id}"
            )
        if result.event == "read" and result.status == 200 and result.stored is not None:
            response["location"] = (
                f"{stored.resource_type}/{stored.id}/_history/{stored.version_id}"
            )
        if stored.content is not None and not minimal:
            entry["resource"] = stored.content
    elif result.body is not None:
        entry["resource"] = result.body
    entry["response"] = response
    return entry


def _failed_entry(exc: Exception) -> dict[str, Any]:
    answer = error_response(exc)
    body = json.loads(bytes(answer.body))
    return {"response": {"status": str(answer.status_code), "outcome": body}}


def _audit_results(
    hub: Hub, principal: Principal, entries: list[Entry], results: dict[int, Result]
) -> None:
    accesses = []
    for entry in entries:
        result = results.get(entry.index)
        if result is None:
            continue
        stored = result.stored
        accesses.append(
            audit.Access(
                result.event,
                entry.resource_type,
                stored.id if stored else None,
                owner=stored,
                detail=f"bundle entry {entry.index}"
                + (f"; case {stored.case_id}" if stored and stored.case_id else ""),
            )
        )
    audit.record_accesses(hub, principal, accesses)


def _seal_documents(hub: Hub, entries: list[Entry]) -> None:
    """Seal the bytes of every POSTed Binary before the database transaction, durable
    together (one round of fsyncs, not one per Binary)."""
    binaries = [
        e for e in entries if e.method == "POST" and e.resource_type == BINARY and e.resource
    ]
    datas = []
    for entry in binaries:
        assert entry.resource is not None
        datas.append(mhd.binary_from_json(entry.resource, f"{entry.where}.resource")[1])
    for entry, sealed in zip(binaries, mhd.store_many(hub, datas), strict=True):
        assert entry.resource is not None
        entry.document = sealed
        entry.resource.pop("data", None)


def _discard(hub: Hub, entries: list[Entry]) -> None:
    for entry in entries:
        if entry.document is not None:
            documents.discard(hub, entry.document)
            entry.document = None


def _allowed(principal: Principal, request: Request, hub: Hub, entry: Entry) -> None:
    interaction = (
        "s" if entry.method == "GET" and entry.resource_id is None else INTERACTION[entry.method]
    )
    require_scope(entry.resource_type, interaction)(principal, request, hub)


def _lock_conditions(session: Session, principal: Principal, entries: list[Entry]) -> None:
    """Take the lock of every ifNoneExist (saf.fhir_store.lock_condition) up front, held
    to the commit, so each search and its create are one step; in key order, so two
    Bundles with the same conditions wait for each other instead of deadlocking."""
    conditions = {
        fhir_store.condition_key(principal, e.resource_type, e.if_none_exist): e
        for e in entries
        if e.method == "POST" and e.if_none_exist is not None
    }
    for key in sorted(conditions):
        entry = conditions[key]
        assert entry.if_none_exist is not None
        fhir_store.lock_condition(session, principal, entry.resource_type, entry.if_none_exist)


def _transaction(
    request: Request, hub: Hub, principal: Principal, entries: list[Entry], base: str
) -> dict[str, Any]:
    for entry in entries:
        _allowed(principal, request, hub, entry)
    names: dict[str, str] = {}
    for entry in entries:
        if entry.full_url is None:
            continue
        if entry.full_url in names:
            raise FhirError(
                400,
                f"fullUrl {entry.full_url!r} appears twice",
                expression=[f"{entry.where}.fullUrl"],
            )
        if entry.method == "POST":
            entry.new_id = new_id()
            names[entry.full_url] = f"{entry.resource_type}/{entry.new_id}"
        elif entry.method == "PUT" and entry.resource_id:
            names[entry.full_url] = f"{entry.resource_type}/{entry.resource_id}"
    results: dict[int, Result] = {}
    ordered = sorted(entries, key=lambda e: (ORDER[e.method], e.index))
    current: Entry | None = None
    try:
        _seal_documents(hub, entries)
        with transaction(hub.sessions) as session:
            # ifNoneExist first: a matched POST names the existing resource instead.
            _lock_conditions(session, principal, ordered)
            for entry in ordered:
                if entry.method == "POST" and entry.if_none_exist is not None:
                    current = entry
                    found = _match(
                        session,
                        hub,
                        principal,
                        entry.resource_type,
                        entry.if_none_exist,
                        f"{entry.where}.request.ifNoneExist",
                    )
                    if len(found) > 1:
                        raise FhirError(
                            412,
                            "ifNoneExist matches more than one resource",
                            code="duplicate",
                            expression=[f"{entry.where}.request.ifNoneExist"],
                        )
                    if found:
                        results[entry.index] = Result(200, found[0])
                        if entry.full_url:
                            names[entry.full_url] = f"{entry.resource_type}/{found[0].id}"
            for entry in ordered:
                current = entry
                if entry.resource is not None:
                    entry.resource = _rewrite(entry.resource, names)
                    _conditional_references(session, hub, principal, entry)
            ordered = _dependencies_first(ordered)
            # The POSTs share their lookups (read once, after the DELETEs) and write their
            # rows together when the first write that is not a POST comes, or at the end.
            batch: fhir_store.Batch | None = None
            for entry in ordered:
                current = entry
                if entry.method == "GET" or entry.index in results:
                    continue
                if entry.method == "POST" and batch is None:
                    posts = [e.resource for e in ordered if e.method == "POST" and e.resource]
                    batch = fhir_store.prefetch(session, hub, principal, posts)
                elif entry.method != "POST" and batch is not None:
                    batch.flush(session)
                entry.if_none_exist = None  # answered above
                results[entry.index] = _write(session, hub, principal, entry, batch)
            current = None
            if batch is not None:
                batch.flush(session)
    except (FhirError, fhir_store.StoreError, AuthError) as exc:
        _discard(hub, entries)
        audit.record(
            hub,
            "create",
            principal,
            outcome=audit.MINOR_FAILURE,
            entity_type="Bundle",
            detail=f"transaction refused at entry {current.index if current else '?'}",
        )
        raise _located(exc, current) from None
    except BaseException:
        _discard(hub, entries)
        raise
    written = [r.stored for r in results.values() if r.stored is not None and r.event != "read"]
    settled = {s.id: s for s in fhir_store.settle(hub, principal, written, rules_of(request, hub))}
    for result in results.values():
        if result.stored is not None and result.stored.id in settled:
            result.stored = settled[result.stored.id]
    for entry in ordered:
        if entry.method == "GET":
            current = entry
            try:
                results[entry.index] = _read(hub, principal, entry, base)
            except (FhirError, fhir_store.StoreError) as exc:
                raise _located(exc, entry) from None
    _audit_results(hub, principal, entries, results)
    minimal = "return=minimal" in (request.headers.get("prefer") or "")
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "transaction-response",
        "entry": [_response_entry(base, results[e.index], minimal) for e in entries],
    }


def _strings(value: Any) -> set[str]:
    if isinstance(value, dict):
        return {x for v in value.values() for x in _strings(v)}
    if isinstance(value, list):
        return {x for v in value for x in _strings(v)}
    return {value} if isinstance(value, str) else set()


def _dependencies_first(ordered: list[Entry]) -> list[Entry]:
    """`ordered` with each POST after the POSTs its resource references (a DocumentReference
    after its Binary and Patient, whatever the entries' order); the R4 order of methods
    stays. A cycle keeps the request's order (and fails on the unresolved reference)."""
    posts = [e for e in ordered if e.method == "POST" and e.new_id]
    by_ref = {f"{e.resource_type}/{e.new_id}": e for e in posts}
    placed: list[Entry] = []
    seen: set[int] = set()

    def place(entry: Entry, path: set[int]) -> None:
        if entry.index in seen or entry.index in path:
            return
        path.add(entry.index)
        for ref in sorted(_strings(entry.resource) & by_ref.keys()):
            place(by_ref[ref], path)
        seen.add(entry.index)
        placed.append(entry)

    for entry in posts:
        place(entry, set())
    first = [e for e in ordered if ORDER[e.method] < ORDER["POST"]]
    rest = [e for e in ordered if ORDER[e.method] > ORDER["POST"]]
    others = [e for e in ordered if e.method == "POST" and not e.new_id]
    return first + placed + others + rest


def _located(exc: Exception, entry: Entry | None) -> FhirError:
    """`exc` as a FhirError whose diagnostics and locations name the entry."""
    prefix = f"{entry.where} ({entry.method} {entry.resource_type}): " if entry else ""
    if isinstance(exc, FhirError):
        for found in exc.issues:
            found["diagnostics"] = prefix + str(found.get("diagnostics", ""))
        return exc
    if isinstance(exc, fhir_store.StoreError):
        expression = [exc.expression] if exc.expression else []
        if entry is not None:
            expression.append(entry.where)
        return FhirError(exc.status, prefix + exc.diagnostics, code=exc.code, expression=expression)
    assert isinstance(exc, AuthError)
    return FhirError(
        exc.status_code,
        prefix + f"{exc.error}: {exc.description}",
        code="forbidden",
        expression=[entry.where] if entry else None,
    )


def _batch(
    request: Request, hub: Hub, principal: Principal, raw: list[Any], base: str
) -> dict[str, Any]:
    answers: dict[int, dict[str, Any]] = {}
    parsed: list[Entry] = []
    for index, item in enumerate(raw):
        try:
            parsed.append(_entry(index, item))
        except FhirError as exc:
            answers[index] = _failed_entry(exc)
    minimal = "return=minimal" in (request.headers.get("prefer") or "")
    rules = rules_of(request, hub)
    for entry in sorted(parsed, key=lambda e: (ORDER[e.method], e.index)):
        try:
            _allowed(principal, request, hub, entry)
            if entry.method == "GET":
                result = _read(hub, principal, entry, base)
            else:
                try:
                    _seal_documents(hub, [entry])
                    with transaction(hub.sessions) as session:
                        _conditional_references(session, hub, principal, entry)
                        result = _write(session, hub, principal, entry)
                except BaseException:
                    _discard(hub, [entry])
                    raise
                if result.stored is not None and result.event != "read":
                    result.stored = fhir_store.settle(hub, principal, [result.stored], rules)[0]
            _audit_results(hub, principal, [entry], {entry.index: result})
            answers[entry.index] = _response_entry(base, result, minimal)
        except (FhirError, fhir_store.StoreError, AuthError) as exc:
            audit.record(
                hub,
                "create",
                principal,
                outcome=audit.MINOR_FAILURE,
                entity_type=entry.resource_type,
                detail=f"batch entry {entry.index} refused",
            )
            answers[entry.index] = _failed_entry(_located(exc, entry))
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "batch-response",
        "entry": [answers[i] for i in range(len(raw))],
    }


async def process_bundle(request: Request, principal: Principal, hub: Hub) -> Response:
    """A transaction or batch Bundle; answers the response Bundle."""
    check_format(request)
    check_content_type(request)
    body = await read_body(request, hub.settings.fhir_max_body_bytes)
    try:
        bundle = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise FhirError(400, f"malformed JSON: {exc}") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise FhirError(400, "POST /fhir takes a Bundle", expression=["Bundle.resourceType"])
    bundle_type = bundle.get("type")
    if bundle_type not in ("transaction", "batch"):
        raise FhirError(
            400,
            f"Bundle.type must be transaction or batch, not {bundle_type!r}",
            expression=["Bundle.type"],
        )
    raw = bundle.get("entry") or []
    if not isinstance(raw, list):
        raise FhirError(400, "Bundle.entry must be a list", expression=["Bundle.entry"])
    root = hub.settings.public_url or f"{request.url.scheme}://{request.url.netloc}"
    base = root.rstrip("/") + "/fhir"
    # The entries are written on a worker thread, as a sync route's work is: the event
    # loop goes on serving other requests (another Bundle's) while this one waits for
    # the database.
    if bundle_type == "batch":
        return fhir_json(await run_in_threadpool(_batch, request, hub, principal, raw, base))
    if problems := _bundle_level_problems(bundle):
        raise FhirError(400, "invalid Bundle", issues=problems)
    entries = [_entry(i, item) for i, item in enumerate(raw)]
    answer = await run_in_threadpool(_transaction, request, hub, principal, entries, base)
    return fhir_json(answer)


def _bundle_level_problems(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """Bundle-level elements other than entries (validated without the entries, which are
    validated one by one with their own locations)."""
    shell = {k: v for k, v in bundle.items() if k != "entry"}
    try:
        validate(shell, "Bundle", "Bundle")
    except FhirError as exc:
        return exc.issues
    return []


__all__ = ["issue", "operation_outcome", "process_bundle"]
