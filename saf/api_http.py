"""The hub's first PHI routes (`/api`): cases, studies, thumbnails, and the audit trail.

Thin by design: each route resolves the caller (saf.deps), asks saf.tenancy for what
that caller may see, calls the saf function that does the work, and writes an audit
record for every access to PHI, refusals and not-found answers included (outcome 4).

Answers:
- another tenant's object answers 404 with exactly the body of a missing id;
- a caller whose role or SMART scopes do not reach the resource type gets 403
  ``insufficient_scope`` (saf.deps.require_scope): it says nothing about any row.
  Resource types: cases are FHIR ``Task``, studies, series and thumbnails
  ``ImagingStudy``, the audit trail ``AuditEvent``;
- the audit trail is for admins (and the hub): anyone else gets 403. It is hub
  configuration, not a tenant's data, so a 403 reveals nothing; hiding the route
  would only make an operator's mistake harder to see;
- claiming is for specialists: a clinician who can see the case gets 403, a second
  claim gets 409 with the reason.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from saf import audit, audit_search, tenancy
from saf.audit_fhir import searchset
from saf.cases import PRIORITY_ORDER, ClaimRefused, claim, history
from saf.crypto import CryptoError, open_value
from saf.deps import HubDep, require_scope
from saf.hub import Hub
from saf.identity import Principal
from saf.models import (
    Case,
    CaseStudy,
    Clinic,
    Instance,
    Patient,
    Series,
    Study,
    Thumbnail,
    utcnow,
)
from saf.thumbnails import INSTANCE_SIZE, MEDIA_TYPE, SERIES_SIZE, thumbnail_bytes

router = APIRouter(prefix="/api", tags=["api"])

NOT_FOUND = "not found"
"""The one 404 message, for a missing id and for another tenant's alike."""

PAGE_MAX = 200
"""Largest page of cases a caller may ask for."""

AUDIT_PAGE_MAX = 1000
"""Largest page of audit events a caller may ask for."""

THUMBNAIL_CACHE_CONTROL = "private, no-store"
"""Thumbnails show patients: no shared or persistent caching."""

CaseSearch = Annotated[Principal, Depends(require_scope("Task", "s"))]
CaseRead = Annotated[Principal, Depends(require_scope("Task", "r"))]
CaseUpdate = Annotated[Principal, Depends(require_scope("Task", "u"))]
StudyRead = Annotated[Principal, Depends(require_scope("ImagingStudy", "r"))]
AuditSearch = Annotated[Principal, Depends(require_scope("AuditEvent", "s"))]


@dataclass(frozen=True)
class _Touched:
    """The PHI an access touched, as the audit record names it (ids only)."""

    entity_type: str
    entity_id: str
    clinic_id: str | None = None
    patient_pk: str | None = None


def _audit(
    hub: Hub,
    event: str,
    caller: Principal,
    touched: _Touched,
    *,
    outcome: int = audit.SUCCESS,
    detail: str | None = None,
) -> None:
    audit.record(
        hub,
        event,
        caller,
        outcome=outcome,
        entity_type=touched.entity_type,
        entity_id=touched.entity_id,
        clinic_id=touched.clinic_id,
        patient_pk=touched.patient_pk,
        detail=detail,
    )


def _not_found(
    hub: Hub, event: str, caller: Principal, entity_type: str, entity_id: str
) -> HTTPException:
    """Record the refused access, and the 404 to raise (the same for absent and hidden)."""
    _audit(
        hub,
        event,
        caller,
        _Touched(entity_type, entity_id[:64]),
        outcome=audit.MINOR_FAILURE,
        detail="not found or not visible to the caller",
    )
    return HTTPException(404, NOT_FOUND)


# --------------------------------------------------------------------------- cases


@router.get("/cases")
def list_cases(
    caller: CaseSearch,
    hub: HubDep,
    specialty: str | None = None,
    status: Annotated[str | None, Query(description="Task status; several comma-separated")] = None,
    priority: str | None = None,
    clinic: Annotated[str | None, Query(description="Clinic name or id")] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """The caller's cases, most urgent first, then by due time (the worklist order)."""
    query = tenancy.visible_cases(caller).join(Clinic, Clinic.id == Case.clinic_id)
    filters: list[str] = []
    if specialty:
        query = query.where(Case.specialty == specialty)
        filters.append(f"specialty={specialty}")
    if status:
        query = query.where(Case.status.in_([s.strip() for s in status.split(",") if s.strip()]))
        filters.append(f"status={status}")
    if priority:
        query = query.where(Case.priority == priority)
        filters.append(f"priority={priority}")
    if clinic:
        query = query.where(or_(Clinic.name == clinic, Clinic.id == clinic))
        filters.append("clinic")
    rank = case(
        *((Case.priority == p, i) for i, p in enumerate(PRIORITY_ORDER)),
        else_=len(PRIORITY_ORDER),
    )
    with hub.sessions() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.execute(
            query.add_columns(Clinic.name)
            .order_by(rank, Case.due_at, Case.id)
            .limit(limit)
            .offset(offset)
        ).all()
        ids = [c.id for c, _ in rows]
        modalities, descriptions = _case_study_facts(session, ids)
    now = utcnow()
    items = [
        {
            **_case_summary(c, clinic_name),
            "overdue": c.due_at < now,
            "modalities": sorted(modalities.get(c.id, ())),
            "study_description": descriptions.get(c.id),
        }
        for c, clinic_name in rows
    ]
    audit.record(
        hub,
        "search",
        caller,
        entity_type="Case",
        clinic_id=caller.clinic_id,
        detail="; ".join([*filters, f"{len(items)} of {total}"]),
    )
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.get("/cases/{case_id}")
def read_case(case_id: str, caller: CaseRead, hub: HubDep) -> dict[str, Any]:
    """A case with its patient (name and birth date unsealed), studies, series and history."""
    with hub.sessions() as session:
        found = tenancy.get_case(session, caller, case_id)
        if found is None:
            raise _not_found(hub, "read", caller, "Case", case_id)
        clinic_name = session.get_one(Clinic, found.clinic_id).name
        patient = session.get_one(Patient, found.patient_pk)
        studies = list(
            session.scalars(
                tenancy.visible_studies(caller)
                .join(CaseStudy, CaseStudy.study_pk == Study.id)
                .where(CaseStudy.case_id == found.id)
                .order_by(Study.created_at, Study.id)
            )
        )
        body = {
            **_case_summary(found, clinic_name),
            "routed_by": found.routed_by,
            "accession_number": found.accession_number,
            "updated_at": found.updated_at.isoformat(),
            "patient": _patient(hub, patient),
            "studies": _studies(session, caller, studies),
        }
    body["history"] = [
        {
            "at": e.at.isoformat(),
            "actor": e.actor,
            "from_status": e.from_status,
            "to_status": e.to_status,
            "note": e.note,
        }
        for e in history(hub, found.id)
    ]
    _audit(hub, "read", caller, _Touched("Case", found.id, found.clinic_id, found.patient_pk))
    return body


@router.post("/cases/{case_id}/claim")
def claim_case(case_id: str, caller: CaseUpdate, hub: HubDep) -> dict[str, Any]:
    """Take a case off the worklist (specialists only); a second claim answers 409."""
    with hub.sessions() as session:
        found = tenancy.get_case(session, caller, case_id)
    if found is None:
        raise _not_found(hub, "update", caller, "Case", case_id)
    touched = _Touched("Case", found.id, found.clinic_id, found.patient_pk)
    if not tenancy.can_claim(caller):
        _audit(
            hub,
            "update",
            caller,
            touched,
            outcome=audit.MINOR_FAILURE,
            detail="claim refused: not a specialist",
        )
        raise HTTPException(403, "only a specialist can claim a case")
    try:
        claim(hub, found.id, caller.name)
    except ClaimRefused as exc:
        _audit(hub, "update", caller, touched, outcome=audit.MINOR_FAILURE, detail="claim refused")
        raise HTTPException(409, str(exc)) from None
    _audit(hub, "update", caller, touched, detail="claimed")
    return {"id": found.id, "status": "accepted", "assigned_to": caller.name}


def _case_summary(c: Case, clinic_name: str) -> dict[str, Any]:
    return {
        "id": c.id,
        "clinic_id": c.clinic_id,
        "clinic": clinic_name,
        "status": c.status,
        "priority": c.priority,
        "specialty": c.specialty,
        "due_at": c.due_at.isoformat(),
        "assigned_to": c.assigned_to,
        "created_at": c.created_at.isoformat(),
    }


def _case_study_facts(
    session: Session, case_ids: list[str]
) -> tuple[dict[str, set[str]], dict[str, str | None]]:
    """Modalities and first study description of each case, in two queries for the page."""
    modalities: dict[str, set[str]] = defaultdict(set)
    descriptions: dict[str, str | None] = {}
    if not case_ids:
        return modalities, descriptions
    for case_id, modality in session.execute(
        select(CaseStudy.case_id, Series.modality)
        .join(Series, Series.study_pk == CaseStudy.study_pk)
        .where(CaseStudy.case_id.in_(case_ids), Series.modality.is_not(None))
        .distinct()
    ):
        modalities[case_id].add(str(modality))
    for case_id, description in session.execute(
        select(CaseStudy.case_id, Study.study_description)
        .join(Study, Study.id == CaseStudy.study_pk)
        .where(CaseStudy.case_id.in_(case_ids))
        .order_by(Study.created_at.desc())
    ):
        descriptions[case_id] = description  # oldest study's description wins
    return modalities, descriptions


# --------------------------------------------------------------------------- studies


@router.get("/studies/{study_id}")
def read_study(study_id: str, caller: StudyRead, hub: HubDep) -> dict[str, Any]:
    """A study with its patient, series, instances and which thumbnails exist."""
    with hub.sessions() as session:
        study = tenancy.get_study(session, caller, study_id)
        if study is None:
            raise _not_found(hub, "read", caller, "Study", study_id)
        patient = session.get_one(Patient, study.patient_pk)
        case_id = session.scalar(
            select(CaseStudy.case_id)
            .join(Case, Case.id == CaseStudy.case_id)
            .where(CaseStudy.study_pk == study.id, tenancy.case_clause(caller))
        )
        [body] = _studies(session, caller, [study])
        body["case_id"] = case_id
        body["patient"] = _patient(hub, patient)
    _audit(hub, "read", caller, _Touched("Study", study.id, study.clinic_id, study.patient_pk))
    return body


def _studies(session: Session, caller: Principal, studies: list[Study]) -> list[dict[str, Any]]:
    """Studies with their series and newest instances, in three queries whatever the count."""
    study_ids = [s.id for s in studies]
    series_rows = list(
        session.scalars(
            tenancy.visible_series(caller)
            .where(Series.study_pk.in_(study_ids))
            .order_by(Series.series_number, Series.series_instance_uid)
        )
    )
    series_ids = [s.id for s in series_rows]
    newest: dict[tuple[str, str], Instance] = {}
    for inst in session.scalars(
        tenancy.visible_instances(caller)
        .where(Instance.series_pk.in_(series_ids))
        .order_by(Instance.version)
    ):
        newest[(inst.series_pk, inst.sop_instance_uid)] = inst  # the last version wins
    thumbs: dict[str, bool] = {}  # owner id -> placeholder?
    for t in session.scalars(
        select(Thumbnail).where(
            or_(
                and_(Thumbnail.series_pk.in_(series_ids), Thumbnail.size == SERIES_SIZE),
                and_(
                    Thumbnail.instance_id.in_([i.id for i in newest.values()]),
                    Thumbnail.size == INSTANCE_SIZE,
                ),
            )
        )
    ):
        thumbs[t.series_pk or t.instance_id or ""] = t.placeholder
    instances_of: dict[str, list[Instance]] = defaultdict(list)
    for inst in newest.values():
        instances_of[inst.series_pk].append(inst)
    series_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in series_rows:
        members = sorted(
            instances_of[s.id], key=lambda i: (i.instance_number is None, i.instance_number or 0)
        )
        series_of[s.study_pk].append(
            {
                "id": s.id,
                "series_instance_uid": s.series_instance_uid,
                "modality": s.modality,
                "series_number": s.series_number,
                "series_description": s.series_description,
                "body_part_examined": s.body_part_examined,
                "thumbnail": _thumb(thumbs, s.id, f"/api/series/{s.id}/thumbnail"),
                "instances": [
                    {
                        "id": i.id,
                        "sop_instance_uid": i.sop_instance_uid,
                        "sop_class_uid": i.sop_class_uid,
                        "instance_number": i.instance_number,
                        "version": i.version,
                        "rows": i.rows,
                        "columns": i.columns,
                        "number_of_frames": i.number_of_frames,
                        "thumbnail": _thumb(thumbs, i.id, f"/api/instances/{i.id}/thumbnail"),
                    }
                    for i in members
                ],
            }
        )
    return [
        {
            "id": st.id,
            "study_instance_uid": st.study_instance_uid,
            "study_date": st.study_date,
            "study_time": st.study_time,
            "accession_number": st.accession_number,
            "study_description": st.study_description,
            "clinic_id": st.clinic_id,
            "patient_pk": st.patient_pk,
            "stable_at": st.stable_at.isoformat() if st.stable_at else None,
            "series": series_of[st.id],
        }
        for st in studies
    ]


def _thumb(thumbs: dict[str, bool], owner: str, url: str) -> dict[str, Any] | None:
    if owner not in thumbs:
        return None
    return {"url": url, "placeholder": thumbs[owner]}


def _patient(hub: Hub, patient: Patient) -> dict[str, Any]:
    """The patient for display: the sealed name and birth date opened here, never logged."""
    return {
        "id": patient.id,
        "patient_id": patient.patient_id,
        "name": _unseal(hub, patient.name_sealed, "patient.name"),
        "birth_date": _unseal(hub, patient.birth_date_sealed, "patient.birth_date"),
        "sex": patient.sex,
    }


def _unseal(hub: Hub, token: str | None, context: str) -> str | None:
    if not token:
        return None
    try:
        return open_value(hub.keyring, token, context=context)
    except (CryptoError, ValueError):
        # A value that fails authentication is shown as unavailable, not as a 500 that
        # hides the rest of the record; fsck reports the damage to the operator.
        return None


# --------------------------------------------------------------------------- thumbnails


@router.get("/series/{series_id}/thumbnail")
def series_thumbnail(series_id: str, request: Request, caller: StudyRead, hub: HubDep) -> Response:
    """The series' representative thumbnail (JPEG)."""
    with hub.sessions() as session:
        series = tenancy.get_series(session, caller, series_id)
        study = session.get(Study, series.study_pk) if series is not None else None
    if series is None or study is None:
        raise _not_found(hub, "read", caller, "Series", series_id)
    data = thumbnail_bytes(hub, series_pk=series.id, size=SERIES_SIZE)
    return _image(hub, request, caller, data, "Series", series.id, study)


@router.get("/instances/{instance_id}/thumbnail")
def instance_thumbnail(
    instance_id: str, request: Request, caller: StudyRead, hub: HubDep
) -> Response:
    """An instance's thumbnail (JPEG)."""
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
        raise _not_found(hub, "read", caller, "Instance", instance_id)
    data = thumbnail_bytes(hub, instance_id=instance.id, size=INSTANCE_SIZE)
    return _image(hub, request, caller, data, "Instance", instance.id, study)


def _image(
    hub: Hub,
    request: Request,
    caller: Principal,
    data: bytes | None,
    entity_type: str,
    entity_id: str,
    study: Study,
) -> Response:
    touched = _Touched(entity_type, entity_id, study.clinic_id, study.patient_pk)
    if data is None:
        # The caller may see the object; its thumbnail is simply not rendered yet.
        _audit(
            hub,
            "read",
            caller,
            touched,
            outcome=audit.MINOR_FAILURE,
            detail="thumbnail not rendered yet",
        )
        raise HTTPException(404, "no thumbnail yet")
    etag = f'"{hashlib.sha256(data).hexdigest()[:32]}"'
    _audit(hub, "read", caller, touched, detail="thumbnail")
    headers = {"ETag": etag, "Cache-Control": THUMBNAIL_CACHE_CONTROL}
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(content=data, media_type=MEDIA_TYPE, headers=headers)


# --------------------------------------------------------------------------- audit


@router.get("/audit")
def search_audit(
    caller: AuditSearch,
    hub: HubDep,
    date: Annotated[
        list[str] | None, Query(description="ge/gt/le/lt/eq + ISO date or date-time")
    ] = None,
    agent: Annotated[str | None, Query(description="Actor name (or id)")] = None,
    entity: Annotated[str | None, Query(description="Entity id, or Type/id, or patient id")] = None,
    type: Annotated[str | None, Query(description="AuditEvent.type (code or system|code)")] = None,
    subtype: Annotated[str | None, Query(description="AuditEvent.subtype code")] = None,
    outcome: Annotated[str | None, Query(description="0, 4, 8 or 12; comma-separated")] = None,
    count: Annotated[int, Query(alias="_count", ge=1, le=AUDIT_PAGE_MAX)] = 100,
) -> dict[str, Any]:
    """The audit trail as a FHIR searchset Bundle of AuditEvent, newest first (admins)."""
    if not tenancy.can_read_audit(caller):
        audit.record(
            hub,
            "search",
            caller,
            outcome=audit.MINOR_FAILURE,
            entity_type="AuditEvent",
            detail="audit is for admins",
        )
        raise HTTPException(403, "the audit trail is for admins")
    wanted = audit_search.AuditQuery(
        date=list(date or ()),
        agent=agent,
        entity=entity,
        type=type,
        subtype=subtype,
        outcome=outcome,
    )
    try:
        records, total = audit_search.search(hub, caller, wanted, count=count)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    audit.record(
        hub, "search", caller, entity_type="AuditEvent", detail=f"{len(records)} of {total}"
    )
    return searchset(records, total=total)
