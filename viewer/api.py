"""The viewer's JSON API under /api: frames, rendered frames, pixel values, annotations, reply.

Thin: every route resolves its caller (saf.deps), finds the object through saf.tenancy
(another tenant's id answers 404 exactly like a missing one), calls the saf function
that does the work (saf.frames, saf.render, saf.annotations, saf.replies) and records
the access with saf.audit, refusals included.

Scopes (saf.deps.require_scope): images, pixel values and annotations read as
``ImagingStudy``; drawing is ``Observation`` (create; moving and removing one are
updates of the case's drawing); the reply is ``DiagnosticReport``; questions and
comments are ``Communication``. Which rows is tenancy's business; who may write (the
specialist who claimed the case) is saf.annotations.check_writer's.

Rendered frames: ``ETag`` is strong, from the instance row (whose content never
changes: a new payload is a new row) and the rendering parameters, and ``Cache-Control``
is ``private, max-age=3600``: the browser may keep a frame for an hour, no shared cache
may keep it at all.
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select

from saf import annotations as anno
from saf import audit, frames, replies, tenancy
from saf.deps import HubDep, require_scope
from saf.hub import Hub
from saf.identity import Principal
from saf.models import Case, Instance, Series, Study
from saf.render import FORMATS, Format, RenderError, Window, render_decoded
from saf.routing import RuleSet, RulesHolder

router = APIRouter(prefix="/api", tags=["viewer"])

NOT_FOUND: Final = "not found"
"""The one 404 message, for a missing id and for another tenant's alike."""

RENDER_CACHE_CONTROL: Final = "private, max-age=3600"
RENDER_VERSION: Final = "1"
"""Part of every ETag: bump when the rendering pipeline changes its output."""

MEDIA_TYPES: Final[dict[str, str]] = {
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "png": "image/png",
}

SIZE_MAX: Final = 4096
"""Largest `size` (longest edge, px) a caller may ask for."""

ImageRead = Annotated[Principal, Depends(require_scope("ImagingStudy", "r"))]
Draw = Annotated[Principal, Depends(require_scope("Observation", "c"))]
Redraw = Annotated[Principal, Depends(require_scope("Observation", "u"))]
ReportRead = Annotated[Principal, Depends(require_scope("DiagnosticReport", "r"))]
ReportWrite = Annotated[Principal, Depends(require_scope("DiagnosticReport", "u"))]
ReportSign = Annotated[Principal, Depends(require_scope("DiagnosticReport", "c"))]
Message = Annotated[Principal, Depends(require_scope("Communication", "c"))]
JsonBody = Annotated[Any, Body()]


def _not_found(
    hub: Hub, event: str, caller: Principal, entity_type: str, entity_id: str
) -> HTTPException:
    audit.record_access(
        hub,
        event,
        caller,
        entity_type,
        entity_id,
        outcome=audit.MINOR_FAILURE,
        detail="not found or not visible to the caller",
    )
    return HTTPException(404, NOT_FOUND)


def _instance_and_study(
    hub: Hub, caller: Principal, instance_id: str, event: str = "read"
) -> tuple[Instance, Study]:
    with hub.sessions() as session:
        instance = tenancy.get_instance(session, caller, instance_id)
        study = (
            session.scalar(
                select(Study)
                .join(Series, Series.study_pk == Study.id)
                .where(Series.id == instance.series_pk)
            )
            if instance is not None
            else None
        )
    if instance is None or study is None:
        raise _not_found(hub, event, caller, "Instance", instance_id)
    return instance, study


def _rules(request: Request, hub: Hub) -> RuleSet:
    """The routing rules in force (the holder the FHIR API keeps on the app, shared)."""
    holder: RulesHolder | None = getattr(request.app.state, "fhir_rules", None)
    if holder is None:
        holder = RulesHolder(hub.settings.rules_path)
        request.app.state.fhir_rules = holder
    return holder.current


def _case(hub: Hub, caller: Principal, case_id: str, event: str) -> Case:
    with hub.sessions() as session:
        found = tenancy.get_case(session, caller, case_id)
    if found is None:
        raise _not_found(hub, event, caller, "Case", case_id)
    return found


# --------------------------------------------------------------------------- frames


@router.get("/series/{series_id}/frames")
def series_frames(series_id: str, caller: ImageRead, hub: HubDep) -> dict[str, Any]:
    """Every frame of a series in scroll order, with size, spacing and default window."""
    with hub.sessions() as session:
        series = tenancy.get_series(session, caller, series_id)
        study = session.get(Study, series.study_pk) if series is not None else None
    if series is None or study is None:
        raise _not_found(hub, "read", caller, "Series", series_id)
    try:
        listed = frames.series_frames(hub, series)
    except Exception as exc:  # a blob that fails verification, an unreadable file
        audit.record_access(
            hub, "read", caller, "Series", series.id, owner=study, outcome=audit.SERIOUS_FAILURE
        )
        raise HTTPException(
            500, f"series {series.series_instance_uid}: cannot read its instances ({exc})"
        ) from None
    audit.record_access(
        hub, "read", caller, "Series", series.id, owner=study, detail=f"{len(listed)} frame(s)"
    )
    return {
        "series_id": series.id,
        "series_instance_uid": series.series_instance_uid,
        "modality": series.modality,
        "frames": [f.to_json() for f in listed],
    }


def _window(wc: float | None, ww: float | None) -> Window | None:
    if wc is None and ww is None:
        return None
    if wc is None or ww is None:
        raise HTTPException(400, "wc and ww go together: give both or neither")
    try:
        return Window(wc, ww)
    except ValueError as exc:
        raise HTTPException(400, f"ww: {exc}") from None


@router.get("/instances/{instance_id}/frames/{frame}/rendered")
def rendered_frame(
    instance_id: str,
    frame: int,
    request: Request,
    caller: ImageRead,
    hub: HubDep,
    wc: Annotated[float | None, Query(description="window centre, modality units")] = None,
    ww: Annotated[float | None, Query(description="window width (> 0)")] = None,
    size: Annotated[int | None, Query(ge=1, le=SIZE_MAX, description="longest edge")] = None,
    quality: Annotated[int, Query(ge=1, le=100)] = 85,
    format: Annotated[str, Query(description="jpeg, webp or png")] = "jpeg",
) -> Response:
    """One frame rendered by saf.render (default window from the file), cached with ETag."""
    started = time.perf_counter()
    if format not in FORMATS:
        raise HTTPException(400, f"format: must be one of {', '.join(FORMATS)}")
    fmt: Format = format
    window = _window(wc, ww)
    instance, study = _instance_and_study(hub, caller, instance_id)
    params = f"{frame}|{wc}|{ww}|{size}|{quality}|{fmt}"
    tag = hashlib.sha256(
        f"{RENDER_VERSION}|{instance.id}|{instance.sha256}|{params}".encode()
    ).hexdigest()[:32]
    etag = f'"{tag}"'
    headers = {"ETag": etag, "Cache-Control": RENDER_CACHE_CONTROL}
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        audit.record_access(
            hub, "read", caller, "Instance", instance.id, owner=study, detail=f"frame {frame} 304"
        )
        return Response(status_code=304, headers=headers)
    try:
        loaded = frames.load(hub, instance)
        pixels = loaded.pixels(frame)
        data = render_decoded(loaded.ds, pixels, size=size, window=window, fmt=fmt, quality=quality)
    except frames.FrameError as exc:
        audit.record_access(
            hub, "read", caller, "Instance", instance.id, owner=study, outcome=audit.MINOR_FAILURE
        )
        raise HTTPException(404, str(exc)) from None
    except RenderError as exc:
        audit.record_access(
            hub, "read", caller, "Instance", instance.id, owner=study, outcome=audit.MINOR_FAILURE
        )
        raise HTTPException(422, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    audit.record_access(
        hub, "read", caller, "Instance", instance.id, owner=study, detail=f"frame {frame} rendered"
    )
    headers["Server-Timing"] = f"render;dur={(time.perf_counter() - started) * 1000:.1f}"
    return Response(content=data, media_type=MEDIA_TYPES[fmt], headers=headers)


@router.get("/instances/{instance_id}/frames/{frame}/value")
def pixel_value(
    instance_id: str,
    frame: int,
    caller: ImageRead,
    hub: HubDep,
    x: Annotated[float, Query(description="column, image pixel coordinates")],
    y: Annotated[float, Query(description="row, image pixel coordinates")],
) -> dict[str, Any]:
    """The stored and modality value (e.g. HU) of the pixel under (x, y)."""
    instance, study = _instance_and_study(hub, caller, instance_id)
    try:
        loaded = frames.load(hub, instance)
        pixels = loaded.pixels(frame)
    except frames.FrameError as exc:
        raise HTTPException(404, str(exc)) from None
    except RenderError as exc:
        raise HTTPException(422, str(exc)) from None
    if not (0 <= x < loaded.columns):
        raise HTTPException(400, f"x: {x:g} is outside 0..{loaded.columns} (exclusive)")
    if not (0 <= y < loaded.rows):
        raise HTTPException(400, f"y: {y:g} is outside 0..{loaded.rows} (exclusive)")
    column, row = int(x), int(y)
    stored = pixels[row, column]
    audit.record_access(
        hub, "read", caller, "Instance", instance.id, owner=study, detail=f"frame {frame} value"
    )
    if loaded.is_grey:
        return {
            "x": x,
            "y": y,
            "column": column,
            "row": row,
            "stored": int(stored),
            "value": float(loaded.values(frame)[row, column]),
            "unit": loaded.unit(),
        }
    channels = [int(v) for v in stored]
    return {
        "x": x,
        "y": y,
        "column": column,
        "row": row,
        "stored": channels,
        "value": channels,
        "unit": None,
    }


# --------------------------------------------------------------------------- annotations


def _refused(
    hub: Hub, event: str, caller: Principal, case: Case, exc: anno.AnnotationError
) -> JSONResponse:
    audit.record_access(
        hub,
        event,
        caller,
        "Annotation",
        case.id,
        owner=case,
        outcome=audit.MINOR_FAILURE,
        detail=f"refused: {type(exc).__name__}",
    )
    body: dict[str, Any] = {"detail": exc.message}
    if exc.field:
        body["field"] = exc.field
    return JSONResponse(body, status_code=exc.status)


@router.get("/cases/{case_id}/annotations")
def list_annotations(case_id: str, caller: ImageRead, hub: HubDep) -> dict[str, Any]:
    """A case's annotations, oldest first."""
    case = _case(hub, caller, case_id, "read")
    rows = anno.of_case(hub, case.id)
    audit.record_access(
        hub, "read", caller, "Case", case.id, owner=case, detail=f"{len(rows)} annotation(s)"
    )
    return {"annotations": [anno.to_json(hub, r) for r in rows]}


@router.post("/cases/{case_id}/annotations", status_code=201, response_model=None)
def create_annotation(
    case_id: str, body: JsonBody, caller: Draw, hub: HubDep
) -> dict[str, Any] | JSONResponse:
    """Draw an annotation (the specialist who claimed the case)."""
    case = _case(hub, caller, case_id, "create")
    try:
        row = anno.create(hub, caller, case, anno.draft_from_json(body))
    except anno.AnnotationError as exc:
        return _refused(hub, "create", caller, case, exc)
    audit.record_access(hub, "create", caller, "Annotation", row.id, owner=case)
    return anno.to_json(hub, row)


@router.put("/cases/{case_id}/annotations/{annotation_id}", response_model=None)
def update_annotation(
    case_id: str, annotation_id: str, body: JsonBody, caller: Redraw, hub: HubDep
) -> dict[str, Any] | JSONResponse:
    """Move, resize or relabel an annotation."""
    case = _case(hub, caller, case_id, "update")
    try:
        row = anno.update(hub, caller, case, annotation_id, anno.draft_from_json(body))
    except anno.AnnotationError as exc:
        return _refused(hub, "update", caller, case, exc)
    audit.record_access(hub, "update", caller, "Annotation", row.id, owner=case)
    return anno.to_json(hub, row)


@router.delete("/cases/{case_id}/annotations/{annotation_id}", status_code=204, response_model=None)
def delete_annotation(
    case_id: str, annotation_id: str, caller: Redraw, hub: HubDep
) -> Response | JSONResponse:
    """Remove an annotation."""
    case = _case(hub, caller, case_id, "delete")
    try:
        anno.delete(hub, caller, case, annotation_id)
    except anno.AnnotationError as exc:
        return _refused(hub, "delete", caller, case, exc)
    audit.record_access(hub, "delete", caller, "Annotation", annotation_id[:64], owner=case)
    return Response(status_code=204)


# --------------------------------------------------------------------------- the reply


def _reply_refused(
    hub: Hub, event: str, caller: Principal, case: Case, exc: replies.ReplyError
) -> JSONResponse:
    audit.record_access(
        hub,
        event,
        caller,
        "Reply",
        case.id,
        owner=case,
        outcome=audit.MINOR_FAILURE,
        detail=f"refused: {type(exc).__name__}",
    )
    body: dict[str, Any] = {"detail": exc.message}
    if exc.field:
        body["field"] = exc.field
    return JSONResponse(body, status_code=exc.status)


@router.get("/cases/{case_id}/reply")
def read_reply(case_id: str, caller: ReportRead, hub: HubDep) -> dict[str, Any]:
    """The case's reply: none, a draft, or signed with what signing made."""
    case = _case(hub, caller, case_id, "read")
    body = replies.view(hub, caller, case)
    audit.record_access(hub, "read", caller, "Reply", case.id, owner=case)
    return body


@router.put("/cases/{case_id}/reply", response_model=None)
def save_reply(
    case_id: str, body: JsonBody, caller: ReportWrite, hub: HubDep
) -> dict[str, Any] | JSONResponse:
    """Save the draft (the viewer autosaves here)."""
    case = _case(hub, caller, case_id, "update")
    try:
        replies.save_draft(hub, caller, case, replies.draft_from_json(body))
    except replies.ReplyError as exc:
        return _reply_refused(hub, "update", caller, case, exc)
    audit.record_access(hub, "update", caller, "Reply", case.id, owner=case, detail="draft saved")
    return replies.view(hub, caller, case)


@router.post("/cases/{case_id}/reply/question", response_model=None)
def ask_question(
    case_id: str, body: JsonBody, request: Request, caller: Message, hub: HubDep
) -> dict[str, Any] | JSONResponse:
    """The specialist asks the clinic a question instead of replying (case on hold)."""
    case = _case(hub, caller, case_id, "create")
    try:
        replies.ask(hub, caller, case, replies.text_from_json(body), _rules(request, hub))
    except replies.ReplyError as exc:
        return _reply_refused(hub, "create", caller, case, exc)
    audit.record_access(hub, "create", caller, "Reply", case.id, owner=case, detail="question")
    return replies.view(hub, caller, case)


@router.post("/cases/{case_id}/comments", response_model=None)
def add_comment(
    case_id: str, body: JsonBody, request: Request, caller: Message, hub: HubDep
) -> dict[str, Any] | JSONResponse:
    """A clinic user answers the specialist's question, or comments (case back in progress)."""
    case = _case(hub, caller, case_id, "create")
    try:
        replies.comment(hub, caller, case, replies.text_from_json(body), _rules(request, hub))
    except replies.ReplyError as exc:
        return _reply_refused(hub, "create", caller, case, exc)
    audit.record_access(hub, "create", caller, "Reply", case.id, owner=case, detail="comment")
    return replies.view(hub, caller, case)


@router.post("/cases/{case_id}/reply/sign", response_model=None)
def sign_reply(
    case_id: str, request: Request, caller: ReportSign, hub: HubDep
) -> dict[str, Any] | JSONResponse:
    """Sign and send: SR, GSPS, PDF, DiagnosticReport, case completed (idempotent)."""
    case = _case(hub, caller, case_id, "create")
    try:
        replies.sign(hub, caller, case, _rules(request, hub))
    except replies.ReplyError as exc:
        return _reply_refused(hub, "create", caller, case, exc)
    audit.record_access(hub, "create", caller, "Reply", case.id, owner=case, detail="signed")
    return replies.view(hub, caller, case)


@router.get("/cases/{case_id}/reply/pdf")
def reply_pdf(case_id: str, caller: ReportRead, hub: HubDep) -> Response:
    """The signed report as PDF."""
    case = _case(hub, caller, case_id, "read")
    data = replies.pdf_bytes(hub, case)
    if data is None:
        audit.record_access(
            hub,
            "read",
            caller,
            "Reply",
            case.id,
            owner=case,
            outcome=audit.MINOR_FAILURE,
            detail="no signed report yet",
        )
        raise HTTPException(404, "no signed report yet")
    audit.record_access(hub, "read", caller, "Reply", case.id, owner=case, detail="pdf")
    return Response(
        content=data,
        media_type="application/pdf",
        headers={
            "Cache-Control": "private, no-store",
            "Content-Disposition": f'inline; filename="report-{case.id}.pdf"',
        },
    )
