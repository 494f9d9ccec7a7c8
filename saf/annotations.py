"""Annotations on a case's images: validation, server-side measurements, and who may write.

An annotation is drawn on one frame of one instance of the case's studies, in image
pixel coordinates (saf.frames: (0, 0) is the top left corner of the top left pixel,
x = column, y = row), so it stays put whatever the viewer's zoom, pan or size.

Kinds and their points: arrow 2 (tail, head), text 1 (anchor), line 2, angle 3 (the
vertex in the middle), ellipse 2 (opposite corners of its bounding box). Every point
must lie on the image (0 <= x <= Columns, 0 <= y <= Rows).

Measurements are computed here, from the stored pixels, when an annotation is drawn
or moved, and kept with it (what the specialist saw is what the reply reports):

- line: ``length_px`` and, when the pixel spacing is known, ``length_mm`` (else
  ``"note": "pixel spacing unknown"``); anisotropic pixels are honoured;
- angle: ``angle_deg`` between the two arms, measured in mm space when the spacing is
  known (so non-square pixels do not skew it), in 0..180;
- ellipse: ``area_px2`` and ``area_mm2`` (or the note), and over the pixels whose
  centres lie inside the ellipse ``pixels``, ``mean``, ``sd`` (population standard
  deviation, as OHIF and most viewers show), ``min`` and ``max`` in modality units
  (after the Modality LUT or Rescale Slope/Intercept) with their ``unit`` (HU for CT,
  else Rescale Type or null). Colour images have no modality values: area only.

Who writes: the specialist who claimed the case (it is assigned to them), while it is
accepted, in progress or on hold. Anyone else who can see the case reads. The first
write by the specialist moves an accepted case to in-progress (FHIR Task: work has
started). Once signing of the reply starts, annotations are frozen (409).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from saf import frames, tenancy
from saf.cases import IllegalTransition, TaskStatus, transition
from saf.crypto import CryptoError, open_value, reseal_value, seal_value, value_key_id
from saf.db import transaction
from saf.hub import Hub
from saf.identity import Principal
from saf.models import Annotation, Case, CaseStudy, Instance, Reply, Series, utcnow

POINTS: Final[dict[str, int]] = {"arrow": 2, "text": 1, "line": 2, "angle": 3, "ellipse": 2}
"""Annotation kinds and how many points each takes."""

TEXT_MAX: Final = 1024
"""Longest label, in characters."""

WRITABLE_STATUSES: Final = frozenset(
    {TaskStatus.ACCEPTED, TaskStatus.IN_PROGRESS, TaskStatus.ON_HOLD}
)
"""Case statuses in which the specialist who claimed it may annotate and draft the reply."""

FROZEN_REPLY_STATUSES: Final = frozenset({"signing", "signed"})

NO_SPACING: Final = "pixel spacing unknown"


class AnnotationError(Exception):
    """A refused annotation request; `status` is the HTTP answer, `field` what was wrong."""

    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class Invalid(AnnotationError):
    """The body is wrong (422, naming the field)."""

    status = 422


class NotAllowed(AnnotationError):
    """The caller can see the case but may not write to it (403)."""

    status = 403


class Frozen(AnnotationError):
    """The reply is signed: the annotations are part of the record now (409)."""

    status = 409


class NotFound(AnnotationError):
    """No such annotation on this case (404)."""

    status = 404


@dataclass(frozen=True)
class Draft:
    """An annotation as a client sends it."""

    instance_id: str
    frame: int
    kind: str
    points: list[list[float]]
    text: str | None


# --------------------------------------------------------------------------- who writes


def check_writer(session: Session, principal: Principal, case: Case) -> None:
    """Raise NotAllowed unless `principal` may write the case's annotations and reply
    (the specialist it is assigned to, while it is being worked on), Frozen once the
    reply is signed."""
    if not (principal.kind == "user" and principal.role == "specialist"):
        raise NotAllowed("only the specialist who claimed the case can change it")
    if case.assigned_to != principal.name:
        raise NotAllowed(
            f"case {case.id} is not assigned to you: claim it first"
            if case.assigned_to is None
            else f"case {case.id} is assigned to another specialist"
        )
    reply_status = session.scalar(select(Reply.status).where(Reply.case_id == case.id))
    if reply_status in FROZEN_REPLY_STATUSES:
        raise Frozen(f"case {case.id}: the reply is signed; annotations and reply are frozen")
    if case.status not in WRITABLE_STATUSES:
        raise Frozen(f"case {case.id} is {case.status}: it cannot be changed")


def start_work(hub: Hub, case: Case, actor: str) -> None:
    """An accepted case goes to in-progress on the specialist's first change."""
    if case.status == TaskStatus.ACCEPTED:
        # IllegalTransition: it moved meanwhile (another request started it first).
        with contextlib.suppress(IllegalTransition):
            transition(hub, case.id, TaskStatus.IN_PROGRESS, actor=actor, note="work started")


# --------------------------------------------------------------------------- validation


def draft_from_json(body: object) -> Draft:
    """A Draft from a request body; Invalid names the first wrong field."""
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object", "body")
    instance_id = body.get("instance_id")
    if not isinstance(instance_id, str) or not instance_id:
        raise Invalid("instance_id: a string is required", "instance_id")
    frame = body.get("frame", 1)
    if isinstance(frame, bool) or not isinstance(frame, int) or frame < 1:
        raise Invalid("frame: a frame number >= 1 is required", "frame")
    kind = body.get("kind")
    if kind not in POINTS:
        raise Invalid(f"kind: must be one of {', '.join(POINTS)}", "kind")
    points = body.get("points")
    if not isinstance(points, list) or len(points) != POINTS[kind]:
        raise Invalid(f"points: a {kind} takes exactly {POINTS[kind]} [x, y] points", "points")
    clean: list[list[float]] = []
    for i, point in enumerate(points):
        if (
            not isinstance(point, list)
            or len(point) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in point)
            or not all(math.isfinite(float(v)) for v in point)
        ):
            raise Invalid(f"points[{i}]: must be [x, y] with finite numbers", f"points[{i}]")
        clean.append([float(point[0]), float(point[1])])
    text = body.get("text")
    if text is not None and not isinstance(text, str):
        raise Invalid("text: must be a string or null", "text")
    if text is not None:
        text = text.strip() or None
    if text is not None and len(text) > TEXT_MAX:
        raise Invalid(f"text: at most {TEXT_MAX} characters", "text")
    if kind == "text" and not text:
        raise Invalid("text: a text annotation needs its text", "text")
    return Draft(instance_id, frame, kind, clean, text)


def _case_instance(
    session: Session, principal: Principal, case: Case, instance_id: str
) -> Instance:
    """The instance, when the caller sees it and it belongs to one of the case's studies."""
    instance = tenancy.get_instance(session, principal, instance_id)
    if instance is not None:
        in_case = session.scalar(
            select(CaseStudy.case_id)
            .join(Series, Series.study_pk == CaseStudy.study_pk)
            .where(Series.id == instance.series_pk, CaseStudy.case_id == case.id)
        )
        if in_case is not None:
            return instance
    raise Invalid(f"instance_id: {instance_id} is not an image of case {case.id}", "instance_id")


# --------------------------------------------------------------------------- measurement


def measure(loaded: frames.Loaded, draft: Draft) -> dict[str, Any]:
    """Check the points lie on the frame and measure the annotation (see the module doc)."""
    try:
        loaded.pixels(draft.frame)  # validates the frame number, decodes it once
    except frames.FrameError as exc:
        raise Invalid(f"frame: {exc}", "frame") from None
    rows, columns = loaded.rows, loaded.columns
    for i, (x, y) in enumerate(draft.points):
        if not (0.0 <= x <= columns and 0.0 <= y <= rows):
            raise Invalid(
                f"points[{i}]: ({x:g}, {y:g}) is outside the {columns}x{rows} image", f"points[{i}]"
            )
    spacing = loaded.spacing
    if draft.kind == "line":
        return _line(draft.points, spacing)
    if draft.kind == "angle":
        return _angle(draft.points, spacing)
    if draft.kind == "ellipse":
        return _ellipse(loaded, draft, spacing)
    return {}


def _line(points: list[list[float]], spacing: frames.Spacing | None) -> dict[str, Any]:
    (x0, y0), (x1, y1) = points
    dx, dy = x1 - x0, y1 - y0
    out: dict[str, Any] = {"length_px": round(math.hypot(dx, dy), 3)}
    if spacing is None:
        out["note"] = NO_SPACING
    else:
        out["length_mm"] = round(math.hypot(dx * spacing.col_mm, dy * spacing.row_mm), 3)
        out["spacing_source"] = spacing.source
    return out


def _angle(points: list[list[float]], spacing: frames.Spacing | None) -> dict[str, Any]:
    (ax, ay), (vx, vy), (bx, by) = points
    sx, sy = (spacing.col_mm, spacing.row_mm) if spacing else (1.0, 1.0)
    u = ((ax - vx) * sx, (ay - vy) * sy)
    w = ((bx - vx) * sx, (by - vy) * sy)
    nu, nw = math.hypot(*u), math.hypot(*w)
    if nu == 0 or nw == 0:
        raise Invalid("points: both arms of an angle need a length", "points")
    cosine = max(-1.0, min(1.0, (u[0] * w[0] + u[1] * w[1]) / (nu * nw)))
    return {"angle_deg": round(math.degrees(math.acos(cosine)), 3)}


def _ellipse(loaded: frames.Loaded, draft: Draft, spacing: frames.Spacing | None) -> dict[str, Any]:
    (x0, y0), (x1, y1) = draft.points
    a, b = abs(x1 - x0) / 2, abs(y1 - y0) / 2
    if a == 0 or b == 0:
        raise Invalid("points: an ellipse needs a width and a height", "points")
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    area_px = math.pi * a * b
    out: dict[str, Any] = {"area_px2": round(area_px, 3)}
    if spacing is None:
        out["note"] = NO_SPACING
    else:
        out["area_mm2"] = round(area_px * spacing.row_mm * spacing.col_mm, 3)
        out["spacing_source"] = spacing.source
    if not loaded.is_grey:
        out.update(pixels=None, mean=None, sd=None, min=None, max=None, unit=None)
        out["note_values"] = "colour image: no modality values"
        return out
    # Pixel centres (c + 0.5, r + 0.5) inside the ellipse, over its bounding rows/columns.
    c_lo, c_hi = max(0, math.floor(cx - a)), min(loaded.columns, math.ceil(cx + a))
    r_lo, r_hi = max(0, math.floor(cy - b)), min(loaded.rows, math.ceil(cy + b))
    cols = np.arange(c_lo, c_hi, dtype=np.float64) + 0.5
    rows = np.arange(r_lo, r_hi, dtype=np.float64) + 0.5
    inside = ((cols[None, :] - cx) / a) ** 2 + ((rows[:, None] - cy) / b) ** 2 <= 1.0
    values = loaded.values(draft.frame)[r_lo:r_hi, c_lo:c_hi][inside].astype(np.float64)
    out["pixels"] = int(values.size)
    out["unit"] = loaded.unit()
    if values.size:
        out.update(
            mean=round(float(values.mean()), 3),
            sd=round(float(values.std()), 3),
            min=round(float(values.min()), 3),
            max=round(float(values.max()), 3),
        )
    else:
        out.update(mean=None, sd=None, min=None, max=None)
    return out


# --------------------------------------------------------------------------- reading and writing


def _text_context(annotation_id: str) -> str:
    return f"annotation/{annotation_id}.text"


def text_of(hub: Hub, row: Annotation) -> str | None:
    """The label of an annotation (None when it has none or it fails authentication)."""
    if not row.text_sealed:
        return None
    try:
        return open_value(hub.keyring, row.text_sealed, context=_text_context(row.id))
    except (CryptoError, ValueError):
        return None


def to_json(hub: Hub, row: Annotation) -> dict[str, Any]:
    """The API's annotation."""
    return {
        "id": row.id,
        "case_id": row.case_id,
        "instance_id": row.instance_id,
        "frame": row.frame,
        "kind": row.kind,
        "points": row.points,
        "text": text_of(hub, row),
        "created_by": row.created_by,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
        "measurement": row.measurement,
    }


def of_case(hub: Hub, case_id: str) -> list[Annotation]:
    """A case's annotations, oldest first (the case's visibility is the caller's check)."""
    with hub.sessions() as session:
        return list(
            session.scalars(
                select(Annotation)
                .where(Annotation.case_id == case_id)
                .order_by(Annotation.created_at, Annotation.id)
            )
        )


def _prepare(
    hub: Hub, principal: Principal, case: Case, draft: Draft
) -> tuple[Instance, dict[str, Any]]:
    with hub.sessions() as session:
        check_writer(session, principal, case)
        instance = _case_instance(session, principal, case, draft.instance_id)
    loaded = frames.load(hub, instance)
    if not loaded.rows or not loaded.columns:
        raise Invalid(f"instance_id: {instance.id} is not an image", "instance_id")
    return instance, measure(loaded, draft)


def create(hub: Hub, principal: Principal, case: Case, draft: Draft) -> Annotation:
    """Store a new annotation of `case` by its specialist; returns the row."""
    instance, measurement = _prepare(hub, principal, case, draft)
    now = utcnow()
    row = Annotation(
        case_id=case.id,
        instance_id=instance.id,
        frame=draft.frame,
        kind=draft.kind,
        points=draft.points,
        measurement=measurement,
        created_by=principal.name,
        created_at=now,
        updated_at=now,
    )
    with transaction(hub.sessions) as session:
        check_writer(session, principal, case)  # again, inside the write: signing may start
        session.add(row)
        session.flush()
        if draft.text:
            row.text_sealed = seal_value(hub.keyring, draft.text, context=_text_context(row.id))
    start_work(hub, case, principal.name)
    return row


def update(
    hub: Hub, principal: Principal, case: Case, annotation_id: str, draft: Draft
) -> Annotation:
    """Replace an annotation's geometry, frame and text (its id and author stay)."""
    _get(hub, case, annotation_id)
    instance, measurement = _prepare(hub, principal, case, draft)
    with transaction(hub.sessions) as session:
        check_writer(session, principal, case)
        row = session.get(Annotation, annotation_id)
        if row is None or row.case_id != case.id:
            raise NotFound(f"no annotation {annotation_id} on case {case.id}")
        row.instance_id = instance.id
        row.frame = draft.frame
        row.kind = draft.kind
        row.points = draft.points
        row.measurement = measurement
        row.text_sealed = (
            seal_value(hub.keyring, draft.text, context=_text_context(row.id))
            if draft.text
            else None
        )
        row.updated_at = utcnow()
    start_work(hub, case, principal.name)
    return row


def delete(hub: Hub, principal: Principal, case: Case, annotation_id: str) -> None:
    """Remove an annotation (before the reply is signed)."""
    with transaction(hub.sessions) as session:
        check_writer(session, principal, case)
        row = session.get(Annotation, annotation_id)
        if row is None or row.case_id != case.id:
            raise NotFound(f"no annotation {annotation_id} on case {case.id}")
        session.delete(row)


def _get(hub: Hub, case: Case, annotation_id: str) -> Annotation:
    with hub.sessions() as session:
        row = session.get(Annotation, annotation_id)
    if row is None or row.case_id != case.id:
        raise NotFound(f"no annotation {annotation_id} on case {case.id}")
    return row


def reseal(hub: Hub, new_key_id: str) -> int:
    """Reseal every annotation's text under the active key (saf.keys.rotate); how many."""
    keyring = hub.keyring
    resealed = 0
    with transaction(hub.sessions) as session:
        for row in session.scalars(select(Annotation).where(Annotation.text_sealed.is_not(None))):
            token = row.text_sealed
            if token and value_key_id(token) != new_key_id:
                row.text_sealed = reseal_value(keyring, token, context=_text_context(row.id))
                resealed += 1
    return resealed
