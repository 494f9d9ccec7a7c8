"""Task: a case as FHIR sees it, read and searched, never stored twice.

A Task is made from the case row (saf.cases), so its status IS the case status: one
state. ``Task.id`` is the case id; ``versionId`` counts the case's events (each status
change, routing or claim is one); ``basedOn`` lists the referrals (ServiceRequests) that
joined the case, ``for`` the FHIR Patient of its patient when a client sent one,
``performerType`` the worklist (system `WORKLIST_SYSTEM`), ``owner`` the specialist who
claimed it (``Practitioner/<username>``: saf's user names the practitioner),
``restriction.period.end`` the due time, ``note`` the notes clients added (sealed, as
all free text is).

Versions: version n is the case after its n-th event (saf.cases.task_versions: each event
records the case's state), so ``vread`` (``GET /Task/<id>/_history/<n>``) and ``history``
(``GET /Task/<id>/_history``, newest first, ``_count`` and ``_offset``) show what the
status, priority, owner, worklist, due time and notes were; ``basedOn``, ``focus`` and
``for`` are the links as they are now (they are not part of the case's state).

Update (``PUT``) and patch (``PATCH``, JSON Patch, ``application/json-patch+json``) change
what a client may change of a case, and nothing else: ``status`` (claim = ``accepted``,
``in-progress``, ``on-hold``, release = ``requested``, ``rejected``, ``cancelled``),
``owner`` (hand over to another specialist of the worklist), ``priority`` and ``note``
(Annotations: notes are kept as written, so a client adds notes after the ones it read;
a new note without ``time`` gets the server's, one without an author gets the caller:
``authorReference`` ``Practitioner/<username>`` for a specialist, else ``authorString``);
saf.cases.update_task decides who may do which and applies it through the same steps as
the viewer's claim. ``completed`` is refused (a reply completes a consult); a change of any
other element is refused (422, with the element's FHIRPath); ``meta``, ``text`` and
``lastModified`` in a body are ignored (the server keeps them). ``If-Match: W/"n"`` must
name the current version (else 412); without it the write is unconditional, as on HAPI
FHIR (the state machine still refuses a second claim). The answer is the new Task with
``ETag``, ``Last-Modified`` and ``Location``.

Search: ``_id``, ``status``, ``priority``, ``owner`` (a username), ``performer-type``
(the worklist code, optionally ``system|code``), ``_lastUpdated``, ``_count``,
``_offset``, ``_sort=_lastUpdated|-_lastUpdated``; a specialist's worklist is
``Task?performer-type=<worklist>&status=requested``. ``_include=Task:based-on`` (or
``Task:focus``) adds the referrals and ``_include=Task:patient`` (or ``Task:for``) the
patients of the page's Tasks, in one Bundle, as a worklist screen needs them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Final
from urllib.parse import urlencode

import jsonpatch
import jsonpointer
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from fhir_api.outcome import (
    JSON_PATCH,
    FhirError,
    FhirRoute,
    check_content_type,
    check_format,
    fhir_json,
    if_match,
    issue,
    operation_outcome,
)
from fhir_api.resources import parse, read_body, rules_of, validate
from fhir_api.search import COUNT_DEFAULT, COUNT_MAX, SearchError, last_updated_bounds
from saf import audit, cases, fhir_store, tenancy
from saf.deps import CurrentPrincipal, HubDep, require_scope
from saf.hub import Hub
from saf.identity import Principal
from saf.models import Case, FhirResource

router = APIRouter(tags=["fhir"], route_class=FhirRoute)

WORKLIST_SYSTEM: Final = "urn:saf:worklist"
"""Code system of Task.performerType: saf's worklist (specialty) names."""

SEARCH_PARAMS: Final = ("_id", "status", "priority", "owner", "performer-type", "_lastUpdated")
"""Task search parameters (the CapabilityStatement lists these)."""

INCLUDES: Final = {
    "Task:based-on": "basedOn",
    "Task:focus": "focus",
    "Task:patient": "for",
    "Task:for": "for",
}
"""``_include`` values served, with the Task element each follows."""


INTERACTIONS: Final = ("read", "vread", "history-instance", "search-type", "update", "patch")
"""Task interactions served (the CapabilityStatement lists exactly these)."""

PRACTITIONER: Final = "Practitioner/"
"""Task.owner is ``Practitioner/<username>`` of the specialist who has the case."""

CHANGEABLE: Final = ("status", "owner", "priority", "note")
"""Task elements a client may change (update, patch); see saf.cases.update_task."""

SERVER_KEPT: Final = ("meta", "text", "lastModified")
"""Task elements the server keeps: ignored in an update's body."""

PATCH_OPS: Final = ("add", "remove", "replace", "move", "copy", "test")
"""JSON Patch (RFC 6902) operations."""


def _instant(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def task_of(hub: Hub, session: Session, principal: Principal, case: Case) -> dict[str, Any]:
    """The Task resource of a case the caller sees (links only to what it also sees)."""
    current = cases.TaskVersion.of_case(case, cases.version_of(session, case.id))
    return _task(hub, case, current, _links(session, principal, case))


def _links(session: Session, principal: Principal, case: Case) -> dict[str, Any]:
    """A case's Task links the caller sees now: ``basedOn`` and ``focus`` (its referrals)
    and ``for`` (the FHIR Patient of its patient)."""
    visible = tenancy.visible_fhir_resources(principal).where(FhirResource.deleted.is_(False))
    referrals = session.scalars(
        visible.where(
            FhirResource.resource_type == "ServiceRequest", FhirResource.case_id == case.id
        ).order_by(FhirResource.last_updated)
    ).all()
    patient = session.scalar(
        visible.where(
            FhirResource.resource_type == "Patient", FhirResource.patient_pk == case.patient_pk
        ).order_by(FhirResource.last_updated)
    )
    links: dict[str, Any] = {}
    if referrals:
        links["basedOn"] = [{"reference": f"ServiceRequest/{r.id}"} for r in referrals]
        links["focus"] = {"reference": f"ServiceRequest/{referrals[0].id}"}
    if patient is not None:
        links["for"] = {"reference": f"Patient/{patient.id}"}
    return links


def _task(
    hub: Hub, case: Case, version: cases.TaskVersion, links: dict[str, Any]
) -> dict[str, Any]:
    """Task version `version` of a case: the state that version records, with `links`."""
    task: dict[str, Any] = {
        "resourceType": "Task",
        "id": case.id,
        "meta": {
            "versionId": str(version.version),
            "lastUpdated": _instant(version.updated_at),
        },
        "status": version.status,
        "intent": "order",
        "priority": version.priority,
        "code": {"text": "consult"},
        "authoredOn": _instant(case.created_at),
        "lastModified": _instant(version.updated_at),
        "restriction": {"period": {"end": _instant(version.due_at)}},
    }
    task.update(links)
    if version.specialty:
        task["performerType"] = [
            {"coding": [{"system": WORKLIST_SYSTEM, "code": version.specialty}]}
        ]
    if version.owner:
        task["owner"] = {
            "reference": f"{PRACTITIONER}{version.owner}",
            "display": version.owner,
        }
    if notes := cases.open_notes(hub, case.id, version.note_sealed):
        task["note"] = notes
    return task


def _base(request: Request, hub: Hub) -> str:
    root = hub.settings.public_url or f"{request.url.scheme}://{request.url.netloc}"
    return root.rstrip("/") + "/fhir"


@router.get("/Task")
def search_tasks(request: Request, principal: CurrentPrincipal, hub: HubDep) -> Response:
    """Search the cases the caller sees, as Tasks (a specialist's worklist included)."""
    check_format(request)
    require_scope("Task", "s")(principal, request, hub)
    where: list[ColumnElement[bool]] = []
    used: list[tuple[str, str]] = []
    unknown: list[str] = []
    includes: list[str] = []
    count, offset, descending = COUNT_DEFAULT, 0, False
    try:
        for name, value in request.query_params.multi_items():
            values = [v for v in value.split(",") if v]
            if name == "_count":
                count = max(0, min(COUNT_MAX, int(value)))
            elif name == "_offset":
                offset = max(0, int(value))
            elif name == "_format":
                continue
            elif name == "_include":
                for v in values:
                    if v not in INCLUDES:
                        raise SearchError(
                            name, f"{v!r} is not served; one of {', '.join(INCLUDES)}"
                        )
                    includes.append(INCLUDES[v])
                used.append((name, value))
            elif name == "_sort":
                if value not in ("_lastUpdated", "-_lastUpdated"):
                    raise SearchError(name, "only _lastUpdated and -_lastUpdated are supported")
                descending = value.startswith("-")
                used.append((name, value))
            elif name not in SEARCH_PARAMS:
                unknown.append(name)
            elif values:
                used.append((name, value))
                where += _clause(name, values)
    except ValueError as exc:
        param = exc.param if isinstance(exc, SearchError) else "_count/_offset"
        raise FhirError(400, str(exc), expression=[param]) from None
    if unknown and "handling=strict" in (request.headers.get("prefer") or ""):
        raise FhirError(400, f"unknown search parameters: {', '.join(unknown)}", expression=unknown)
    query = tenancy.visible_cases(principal).where(*where)
    order = (Case.updated_at.desc(), Case.id.desc()) if descending else (Case.updated_at, Case.id)
    with hub.sessions() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        cases = session.scalars(query.order_by(*order).limit(count).offset(offset)).all()
        tasks = [task_of(hub, session, principal, case) for case in cases]
    included = _included(hub, principal, tasks, includes)
    audit.record(
        hub,
        "search",
        principal,
        entity_type="Task",
        clinic_id=principal.clinic_id,
        detail=f"{len(tasks)} of {total} matches"
        + (f", {len(included)} included" if included else ""),
    )
    base = _base(request, hub)

    def link(at: int) -> str:
        return f"{base}/Task?{urlencode([*used, ('_count', str(count)), ('_offset', str(at))])}"

    links = [{"relation": "self", "url": link(offset)}]
    if offset + count < total and count > 0:
        links.append({"relation": "next", "url": link(offset + count)})
    entries: list[dict[str, Any]] = [
        {"fullUrl": f"{base}/Task/{t['id']}", "resource": t, "search": {"mode": "match"}}
        for t in tasks
    ]
    entries += [
        {
            "fullUrl": f"{base}/{r['resourceType']}/{r['id']}",
            "resource": r,
            "search": {"mode": "include"},
        }
        for r in included
    ]
    if unknown:
        issues = [
            issue("not-supported", f"unknown search parameter {n!r} was ignored", [n], "warning")
            for n in unknown
        ]
        entries.append({"resource": operation_outcome(issues), "search": {"mode": "outcome"}})
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": int(total),
        "link": links,
        "entry": entries,
    }
    return fhir_json(bundle)


def _included(
    hub: Hub, principal: Principal, tasks: list[dict[str, Any]], elements: list[str]
) -> list[dict[str, Any]]:
    """The resources the page's Tasks reference through `elements`, each once; only what the
    caller sees (the Task's links were made from the visible resources already)."""
    wanted: dict[str, None] = {}
    for task in tasks:
        for element in elements:
            value = task.get(element)
            for ref in value if isinstance(value, list) else [value] if value else []:
                if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                    wanted[ref["reference"]] = None
    found: list[dict[str, Any]] = []
    for reference in wanted:
        resource_type, _, resource_id = reference.partition("/")
        try:
            stored = fhir_store.read(hub, principal, resource_type, resource_id)
        except fhir_store.StoreError:
            continue  # deleted or no longer visible since the Task was made
        if stored.content is not None:
            found.append(stored.content)
    return found


def _clause(name: str, values: list[str]) -> list[ColumnElement[bool]]:
    if name == "_id":
        return [Case.id.in_(values)]
    if name == "status":
        return [Case.status.in_(values)]
    if name == "priority":
        return [Case.priority.in_(values)]
    if name == "owner":
        return [Case.assigned_to.in_([v.removeprefix("Practitioner/") for v in values])]
    if name == "performer-type":
        codes = [v.split("|", 1)[1] if "|" in v else v for v in values]
        return [Case.specialty.in_(codes)]
    if len(values) > 1:
        raise SearchError(name, "one value per _lastUpdated (repeat it to AND ranges)")
    clauses: list[ColumnElement[bool]] = []
    for op, at in last_updated_bounds(values[0]):
        column = Case.updated_at
        clauses.append(column >= at if op == "ge" else column < at)
    return clauses


@router.get("/Task/{task_id}")
def read_task(task_id: str, request: Request, principal: CurrentPrincipal, hub: HubDep) -> Response:
    """Read a case as a Task."""
    check_format(request)
    require_scope("Task", "r")(principal, request, hub)
    case, task = _current(hub, principal, task_id, "read")
    audit.record(
        hub,
        "read",
        principal,
        entity_type="Task",
        entity_id=case.id,
        clinic_id=case.clinic_id,
        patient_pk=case.patient_pk,
    )
    return fhir_json(task, headers={"ETag": f'W/"{task["meta"]["versionId"]}"'})


# --------------------------------------------------------------------------- vread, history


HISTORY_COUNT: Final = 50
"""Versions per page of a Task's history unless ``_count`` says otherwise (at most 200),
as for the stored resources."""


def _versions(
    hub: Hub, principal: Principal, task_id: str
) -> tuple[Case, list[cases.TaskVersion], dict[str, Any]]:
    """The case, its Task's versions (oldest first) and the links the caller sees; 404
    (audited) when not theirs."""
    with hub.sessions() as session:
        case = tenancy.get_case(session, principal, task_id)
        if case is not None:
            return case, cases.task_versions(session, case), _links(session, principal, case)
    _current(hub, principal, task_id, "read")  # raises the audited 404
    raise AssertionError("unreachable")  # pragma: no cover


@router.get("/Task/{task_id}/_history/{version_id}")
def vread_task(
    task_id: str, version_id: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """Read one version of a Task: the case as it was after its n-th event."""
    check_format(request)
    require_scope("Task", "r")(principal, request, hub)
    case, versions, links = _versions(hub, principal, task_id)
    if not version_id.isdigit() or not 1 <= int(version_id) <= len(versions):
        audit.record(
            hub,
            "read",
            principal,
            outcome=audit.MINOR_FAILURE,
            entity_type="Task",
            entity_id=case.id,
            clinic_id=case.clinic_id,
            patient_pk=case.patient_pk,
            detail="no such version",
        )
        raise FhirError(
            404, f"Task/{task_id} has no version {version_id[:32]!r} (1 to {len(versions)})"
        )
    version = versions[int(version_id) - 1]
    task = _task(hub, case, version, links)
    audit.record(
        hub,
        "read",
        principal,
        entity_type="Task",
        entity_id=case.id,
        clinic_id=case.clinic_id,
        patient_pk=case.patient_pk,
        detail=f"version {version.version}",
    )
    headers = {
        "ETag": f'W/"{version.version}"',
        "Last-Modified": format_datetime(version.updated_at.astimezone(UTC), usegmt=True),
    }
    return fhir_json(task, headers=headers)


@router.get("/Task/{task_id}/_history")
def task_history(
    task_id: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """A Task's versions, newest first (a history Bundle, paged with ``_count`` and
    ``_offset`` as the stored resources' history is)."""
    check_format(request)
    require_scope("Task", "r")(principal, request, hub)
    try:
        count = min(200, max(0, int(request.query_params.get("_count", str(HISTORY_COUNT)))))
        offset = max(0, int(request.query_params.get("_offset", "0")))
    except ValueError:
        raise FhirError(400, "_count and _offset must be integers") from None
    case, versions, links = _versions(hub, principal, task_id)
    total = len(versions)
    page = versions[::-1][offset : offset + count]
    audit.record(
        hub,
        "read",
        principal,
        entity_type="Task",
        entity_id=case.id,
        clinic_id=case.clinic_id,
        patient_pk=case.patient_pk,
        detail=f"history: {len(page)} of {total} versions",
    )
    base = _base(request, hub)
    url = f"{base}/Task/{case.id}/_history"
    bundle_links = [{"relation": "self", "url": f"{url}?_count={count}&_offset={offset}"}]
    if offset + count < total and count > 0:
        bundle_links.append(
            {"relation": "next", "url": f"{url}?_count={count}&_offset={offset + count}"}
        )
    if offset > 0 and count > 0:
        previous = max(0, offset - count)
        bundle_links.append(
            {"relation": "previous", "url": f"{url}?_count={count}&_offset={previous}"}
        )
    entries = [
        {
            "fullUrl": f"{base}/Task/{case.id}",
            "resource": _task(hub, case, version, links),
            "request": {
                "method": "POST" if version.version == 1 else "PUT",
                "url": "Task" if version.version == 1 else f"Task/{case.id}",
            },
            "response": {
                "status": "201 Created" if version.version == 1 else "200 OK",
                "etag": f'W/"{version.version}"',
                "lastModified": _instant(version.updated_at),
            },
        }
        for version in page
    ]
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "total": total,
        "link": bundle_links,
        "entry": entries,
    }
    return fhir_json(bundle)


# --------------------------------------------------------------------------- update, patch


@router.put("/Task/{task_id}")
async def update_task(
    task_id: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """Update a Task: its status, owner and priority (the rest must be as read)."""
    check_format(request)
    require_scope("Task", "u")(principal, request, hub)
    check_content_type(request)
    version = if_match(request)
    body = await read_body(request, hub.settings.fhir_max_body_bytes)

    def update() -> Response:  # on a worker thread, never on the event loop
        case, current = _current(hub, principal, task_id)
        wanted = parse(body, "Task")
        return _apply(request, hub, principal, case, current, wanted, version, "update")

    return await run_in_threadpool(update)


@router.patch("/Task/{task_id}")
async def patch_task(
    task_id: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """Patch a Task with JSON Patch (RFC 6902): the same changes as an update."""
    check_format(request)
    require_scope("Task", "u")(principal, request, hub)
    check_content_type(request, (JSON_PATCH,))
    version = if_match(request)
    body = await read_body(request, hub.settings.fhir_max_body_bytes)

    def patch() -> Response:  # on a worker thread, never on the event loop
        case, current = _current(hub, principal, task_id)
        wanted = _patched(current, body)
        validate(wanted, "Task")
        return _apply(request, hub, principal, case, current, wanted, version, "patch")

    return await run_in_threadpool(patch)


def _current(
    hub: Hub, principal: Principal, task_id: str, event: str = "update"
) -> tuple[Case, dict[str, Any]]:
    """The case and its Task as the caller reads it; 404 (audited as `event`) when not
    theirs."""
    with hub.sessions() as session:
        case = tenancy.get_case(session, principal, task_id)
        task = task_of(hub, session, principal, case) if case is not None else None
    if case is None or task is None:
        audit.record(
            hub,
            event,
            principal,
            outcome=audit.MINOR_FAILURE,
            entity_type="Task",
            entity_id=task_id[:64],
            detail="not found or not visible to the caller",
        )
        raise FhirError(404, f"Task/{task_id} is not known")
    return case, task


def _patched(current: dict[str, Any], body: bytes) -> dict[str, Any]:
    """`current` with the JSON Patch in `body` applied; 400 naming the bad operation."""
    try:
        ops = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise FhirError(400, f"malformed JSON Patch: {exc}") from None
    if not isinstance(ops, list) or not ops:
        raise FhirError(400, "a JSON Patch is a non-empty array of operations")
    for n, op in enumerate(ops):
        if not isinstance(op, dict) or op.get("op") not in PATCH_OPS:
            name = op.get("op") if isinstance(op, dict) else op
            raise FhirError(
                400,
                f"operation {n}: {name!r} is not a JSON Patch operation "
                f"(one of {', '.join(PATCH_OPS)})",
            )
        if not isinstance(op.get("path"), str):
            raise FhirError(400, f"operation {n} ({op['op']}) has no path")
    try:
        patched = jsonpatch.JsonPatch(ops).apply(current, in_place=False)
    except jsonpatch.JsonPatchTestFailed as exc:
        raise FhirError(409, f"JSON Patch test failed: {exc}", code="conflict") from None
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise FhirError(400, f"the JSON Patch cannot be applied: {exc}") from None
    if not isinstance(patched, dict):
        raise FhirError(400, "the JSON Patch replaced the whole Task")
    return patched


def _state(
    principal: Principal, task_id: str, current: dict[str, Any], wanted: dict[str, Any]
) -> cases.TaskState:
    """The case state a new Task asks for; 400/422 for a body that changes anything else."""
    if wanted.get("id") != task_id:
        raise FhirError(
            400,
            f"the body's id {wanted.get('id')!r} is not the URL's {task_id!r}",
            expression=["Task.id"],
        )
    frozen = sorted(
        name
        for name in {*current, *wanted} - {*CHANGEABLE, *SERVER_KEPT}
        if current.get(name) != wanted.get(name)
    )
    if frozen:
        issues = [
            issue(
                "business-rule",
                f"Task.{name} cannot be changed here: only {', '.join(CHANGEABLE)} can",
                [f"Task.{name}"],
            )
            for name in frozen
        ]
        raise FhirError(422, "the update changes elements that are not the client's", issues=issues)
    owner = wanted.get("owner")
    username: str | None = None
    if owner is not None:
        reference = owner.get("reference") if isinstance(owner, dict) else None
        if not isinstance(reference, str) or not reference.startswith(PRACTITIONER):
            raise FhirError(
                422,
                "Task.owner must be a reference Practitioner/<username>",
                code="business-rule",
                expression=["Task.owner"],
            )
        username = reference.removeprefix(PRACTITIONER)
    return cases.TaskState(
        status=str(wanted.get("status")),
        owner=username,
        priority=str(wanted.get("priority") or current["priority"]),
        notes=_notes(principal, current.get("note") or [], wanted.get("note") or []),
    )


def _notes(
    principal: Principal, kept: list[dict[str, Any]], wanted: list[dict[str, Any]]
) -> tuple[dict[str, Any], ...]:
    """The Task.note list `wanted`, its new notes (those after the `kept` ones) stamped
    with the time and, when they name none, their author (the caller); saf.cases refuses a
    list that changes or drops a kept note."""
    now = _instant(datetime.now(UTC))
    notes: list[dict[str, Any]] = []
    for n, note in enumerate(wanted):
        if n >= len(kept) or note != kept[n]:
            note = dict(note)
            note.setdefault("time", now)
            if "authorString" not in note and "authorReference" not in note:
                author = principal.name or principal.id
                if tenancy.can_claim(principal):  # a specialist: a Practitioner, as owner is
                    note["authorReference"] = {"reference": f"{PRACTITIONER}{author}"}
                else:
                    note["authorString"] = author
        notes.append(note)
    return tuple(notes)


_STATUS_OF_REFUSAL: Final[tuple[tuple[type[cases.CaseError], int, str], ...]] = (
    (cases.PreconditionFailed, 412, "conflict"),
    (cases.NotPermitted, 403, "forbidden"),
    (cases.NotSettable, 422, "business-rule"),
    (cases.CaseError, 409, "conflict"),  # illegal transitions, claimed or changed meanwhile
)


def _apply(
    request: Request,
    hub: Hub,
    principal: Principal,
    case: Case,
    current: dict[str, Any],
    wanted: dict[str, Any],
    version: int | None,
    how: str,
) -> Response:
    def refuse(exc: Exception, status: int, code: str, expression: list[str] | None) -> FhirError:
        audit.record(
            hub,
            "update",
            principal,
            outcome=audit.MINOR_FAILURE,
            entity_type="Task",
            entity_id=case.id,
            clinic_id=case.clinic_id,
            patient_pk=case.patient_pk,
            detail=f"{how} refused: {status} {type(exc).__name__}",
        )
        return FhirError(status, str(exc), code=code, expression=expression)

    try:
        state = _state(principal, case.id, current, wanted)
    except FhirError as exc:
        audit.record(
            hub,
            "update",
            principal,
            outcome=audit.MINOR_FAILURE,
            entity_type="Task",
            entity_id=case.id,
            clinic_id=case.clinic_id,
            patient_pk=case.patient_pk,
            detail=f"{how} refused: {exc.status}",
        )
        raise
    try:
        changed = cases.update_task(
            hub, principal, case.id, state, if_match=version, rules=rules_of(request, hub)
        )
    except cases.CaseError as exc:
        for kind, status, code in _STATUS_OF_REFUSAL:
            if isinstance(exc, kind):
                element = exc.element if isinstance(exc, cases.NotSettable) else "Task.status"
                where = None if status in (403, 412) else [element]
                raise refuse(exc, status, code, where) from None
        raise
    with hub.sessions() as session:
        fresh = session.get_one(Case, case.id)
        task = task_of(hub, session, principal, fresh)
    before = (case.status, case.priority, case.assigned_to, len(current.get("note", [])))
    after = (fresh.status, fresh.priority, fresh.assigned_to, len(task.get("note", [])))
    steps = [
        f"{name} {old} -> {new}"
        for name, old, new in zip(
            ("status", "priority", "owner", "notes"), before, after, strict=True
        )
        if old != new
    ]
    audit.record(
        hub,
        "update",
        principal,
        entity_type="Task",
        entity_id=case.id,
        clinic_id=case.clinic_id,
        patient_pk=case.patient_pk,
        detail=f"{how}: version {task['meta']['versionId']}; "
        + ("; ".join(steps) if changed and steps else "no change"),
    )
    base = _base(request, hub)
    headers = {
        "ETag": f'W/"{task["meta"]["versionId"]}"',
        "Last-Modified": format_datetime(fresh.updated_at.astimezone(UTC), usegmt=True),
        "Location": f"{base}/Task/{case.id}",
    }
    return fhir_json(task, 200, headers)
