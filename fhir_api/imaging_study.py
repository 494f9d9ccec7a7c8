"""ImagingStudy at /fhir/ImagingStudy: the archive's index (saf.models Study, Series,
Instance) as FHIR R4, read and searched, never stored twice and never written here.

``ImagingStudy.id`` is the study's primary key (the same id /api and the audit trail
use). Each resource carries the Study Instance UID (``urn:dicom:uid``, value
``urn:oid:<uid>``) and the accession number (type ACSN) as identifiers, ``subject`` the
clinic's FHIR Patient when one stands for the study's patient (else a logical reference by
the clinic's Patient ID), ``started`` from StudyDate (the date: StudyTime has no zone),
the study's modalities, ``numberOfSeries``/``numberOfInstances``, every series (uid,
number, modality, description, body part as ``bodySite.display``) with its instances
(uid, SOP class, number; the newest version of each instance), and a contained ``Endpoint``
(``dicom-wado-rs``) at ``<public base>/dicomweb`` which serves the same objects.

Search: ``_id``, ``patient`` (``Patient/<id>`` of a FHIR Patient linked to the index
patient), ``identifier`` (``urn:dicom:uid|<uid>`` with or without ``urn:oid:``, an
accession number ``<system>|<value>``, ``|<value>`` or ``<value>``), ``started`` (date
prefixes eq, ge, gt, le, lt on the study date; precision year, month or day),
``modality`` (``[system|]code``), ``_lastUpdated`` (the last instance received),
``_count``, ``_offset``. Write interactions answer 405: the index changes only by DICOM
(C-STORE, STOW-RS). Tenancy is saf.tenancy.visible_studies; every read and search is
audited.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from fhir_api.outcome import FhirError, FhirRoute, check_format, fhir_json, issue
from fhir_api.outcome import operation_outcome as outcome
from fhir_api.search import COUNT_DEFAULT, COUNT_MAX, SearchError, last_updated_bounds
from saf import audit, tenancy
from saf.deps import CurrentPrincipal, HubDep, require_scope
from saf.hub import Hub
from saf.identity import Principal
from saf.models import FhirResource, Instance, Patient, Series, Study

router = APIRouter(tags=["fhir"], route_class=FhirRoute)

DICOM_UID: Final = "urn:dicom:uid"
DCM: Final = "http://dicom.nema.org/resources/ontology/DCM"
V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
CONNECTION_TYPE: Final = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"

SEARCH_PARAMS: Final = ("_id", "patient", "identifier", "started", "modality", "_lastUpdated")
"""ImagingStudy search parameters (the CapabilityStatement lists these)."""

_CONTROL: Final = ("_count", "_offset", "_format")

CAPABILITY: Final[dict[str, Any]] = {
    "type": "ImagingStudy",
    "documentation": "Generated from the DICOM archive's index; read-only (send images by "
    "C-STORE or STOW-RS). A contained Endpoint (dicom-wado-rs) points at /dicomweb.",
    "versioning": "no-version",
    "readHistory": False,
    "updateCreate": False,
    "interaction": [{"code": "read"}, {"code": "search-type"}],
    "searchParam": [
        {"name": "_id", "type": "token"},
        {"name": "patient", "type": "reference"},
        {"name": "identifier", "type": "token"},
        {"name": "started", "type": "date"},
        {"name": "modality", "type": "token"},
        {"name": "_lastUpdated", "type": "date"},
    ],
}
"""The CapabilityStatement.rest.resource entry for ImagingStudy."""


def _root(request: Request, hub: Hub) -> str:
    return (hub.settings.public_url or f"{request.url.scheme}://{request.url.netloc}").rstrip("/")


def _instant(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _started(study: Study) -> str | None:
    # The date only: a FHIR dateTime with a time needs a zone, and DICOM StudyTime has
    # none (the offset is not in the index), so a time would be a guess.
    d = study.study_date or ""
    if len(d) != 8 or not d.isdigit():
        return None
    return f"{d[:4]}-{d[4:6]}-{d[6:]}"


def imaging_studies(
    session: Session, principal: Principal, studies: list[Study], root: str
) -> list[dict[str, Any]]:
    """The ImagingStudy resources of index studies the caller sees (batched queries)."""
    if not studies:
        return []
    ids = [s.id for s in studies]
    series_rows = session.scalars(
        select(Series).where(Series.study_pk.in_(ids)).order_by(Series.series_number, Series.id)
    ).all()
    newest = (
        select(Instance.series_pk, Instance.sop_instance_uid, func.max(Instance.version).label("v"))
        .where(Instance.series_pk.in_([s.id for s in series_rows]))
        .group_by(Instance.series_pk, Instance.sop_instance_uid)
        .subquery()
    )
    instances = session.scalars(
        select(Instance)
        .join(
            newest,
            and_(
                newest.c.series_pk == Instance.series_pk,
                newest.c.sop_instance_uid == Instance.sop_instance_uid,
                newest.c.v == Instance.version,
            ),
        )
        .order_by(Instance.instance_number, Instance.sop_instance_uid)
    ).all()
    by_series: dict[str, list[Instance]] = defaultdict(list)
    for inst in instances:
        by_series[inst.series_pk].append(inst)
    series_of: dict[str, list[Series]] = defaultdict(list)
    for s in series_rows:
        series_of[s.study_pk].append(s)
    visible = tenancy.visible_fhir_resources(principal).where(
        FhirResource.resource_type == "Patient", FhirResource.deleted.is_(False)
    )
    fhir_patients: dict[str, str] = {}
    for patient_pk, fhir_id in session.execute(
        select(FhirResource.patient_pk, FhirResource.id)
        .where(FhirResource.id.in_(visible.with_only_columns(FhirResource.id).scalar_subquery()))
        .where(FhirResource.patient_pk.in_({s.patient_pk for s in studies}))
        .order_by(FhirResource.last_updated.desc())
    ):
        if patient_pk is not None:
            fhir_patients[patient_pk] = fhir_id
    patients = {
        p.id: p.patient_id
        for p in session.scalars(
            select(Patient).where(Patient.id.in_({s.patient_pk for s in studies}))
        )
    }
    return [
        _resource(s, series_of[s.id], by_series, fhir_patients, patients, root) for s in studies
    ]


def _resource(
    study: Study,
    series: list[Series],
    by_series: dict[str, list[Instance]],
    fhir_patients: dict[str, str],
    patients: dict[str, str],
    root: str,
) -> dict[str, Any]:
    identifiers: list[dict[str, Any]] = [
        {"system": DICOM_UID, "value": f"urn:oid:{study.study_instance_uid}"}
    ]
    if study.accession_number:
        identifiers.append(
            {
                "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                "value": study.accession_number,
            }
        )
    if study.patient_pk in fhir_patients:
        subject: dict[str, Any] = {"reference": f"Patient/{fhir_patients[study.patient_pk]}"}
    else:
        subject = {"type": "Patient", "identifier": {"value": patients.get(study.patient_pk, "")}}
    modalities = sorted({s.modality for s in series if s.modality})
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": study.id,
        "meta": {"lastUpdated": _instant(study.last_received_at)},
        "contained": [
            {
                "resourceType": "Endpoint",
                "id": "wado",
                "status": "active",
                "connectionType": {"system": CONNECTION_TYPE, "code": "dicom-wado-rs"},
                "payloadType": [{"text": "DICOM WADO-RS"}],
                "payloadMimeType": ["application/dicom"],
                "address": f"{root}/dicomweb",
            }
        ],
        "identifier": identifiers,
        "status": "available",
        "subject": subject,
        "endpoint": [{"reference": "#wado"}],
        "numberOfSeries": len(series),
        "numberOfInstances": sum(len(by_series[s.id]) for s in series),
    }
    if modalities:
        resource["modality"] = [{"system": DCM, "code": m} for m in modalities]
    started = _started(study)
    if started:
        resource["started"] = started
    if study.study_description:
        resource["description"] = study.study_description
    resource["series"] = [_series(s, by_series[s.id]) for s in series]
    if not resource["series"]:
        del resource["series"]
    return resource


def _series(series: Series, instances: list[Instance]) -> dict[str, Any]:
    found: dict[str, Any] = {
        "uid": series.series_instance_uid,
        "modality": {"system": DCM, "code": series.modality or "OT"},
        "numberOfInstances": len(instances),
    }
    if series.series_number is not None:
        found["number"] = series.series_number
    if series.series_description:
        found["description"] = series.series_description
    if series.body_part_examined:
        found["bodySite"] = {"display": series.body_part_examined}
    if instances:
        found["instance"] = [
            {
                "uid": i.sop_instance_uid,
                "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{i.sop_class_uid}"},
                **({"number": i.instance_number} if i.instance_number is not None else {}),
            }
            for i in instances
        ]
    return found


# --------------------------------------------------------------------------- search


def _identifier_clause(value: str) -> ColumnElement[bool]:
    system, sep, code = value.rpartition("|")
    uid = code.removeprefix("urn:oid:")
    if not sep:  # any system
        return or_(Study.study_instance_uid == uid, Study.accession_number == code)
    if system == DICOM_UID:
        return Study.study_instance_uid == uid
    return Study.accession_number == code  # accession under any (or no) system


def _date_bounds(text: str) -> tuple[str, str]:
    """[lo, hi) as DICOM dates (YYYYMMDD) for a FHIR date of year, month or day precision."""
    text = text[:10]
    try:
        if len(text) == 4:
            lo_d, hi_d = date(int(text), 1, 1), date(int(text) + 1, 1, 1)
        elif len(text) == 7:
            y, m = int(text[:4]), int(text[5:7])
            lo_d = date(y, m, 1)
            hi_d = date(y + (m == 12), m % 12 + 1, 1)
        else:
            lo_d = date.fromisoformat(text)
            hi_d = lo_d + timedelta(days=1)
    except ValueError:
        raise SearchError(
            "started", f"{text!r} is not a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)"
        ) from None
    return lo_d.strftime("%Y%m%d"), hi_d.strftime("%Y%m%d")


def _started_clause(value: str) -> ColumnElement[bool]:
    prefix, text = ("eq", value)
    if value[:2] in ("eq", "ge", "gt", "le", "lt"):
        prefix, text = value[:2], value[2:]
    lo, hi = _date_bounds(text)
    d = Study.study_date
    return {
        "eq": and_(d >= lo, d < hi),
        "ge": d >= lo,
        "gt": d >= hi,
        "le": d < hi,
        "lt": d < lo,
    }[prefix]


def _clauses(session: Session, principal: Principal, name: str, values: list[str]) -> list[Any]:
    if name == "_id":
        return [Study.id.in_(values)]
    if name == "identifier":
        return [or_(*(_identifier_clause(v) for v in values))]
    if name == "modality":
        codes = [v.rpartition("|")[2] for v in values]
        s = aliased(Series)
        return [exists(select(s.id).where(s.study_pk == Study.id, s.modality.in_(codes)))]
    if name == "patient":
        ids = [v.removeprefix("Patient/") for v in values]
        linked = (
            tenancy.visible_fhir_resources(principal)
            .where(
                FhirResource.resource_type == "Patient",
                FhirResource.id.in_(ids),
                FhirResource.deleted.is_(False),
            )
            .with_only_columns(FhirResource.patient_pk)
        )
        return [Study.patient_pk.in_(linked.scalar_subquery())]
    if len(values) > 1:
        raise SearchError(name, f"one value per {name} (repeat the parameter to AND ranges)")
    if name == "started":
        return [_started_clause(values[0])]
    clauses: list[Any] = []
    for op, at in last_updated_bounds(values[0]):
        column = Study.last_received_at
        clauses.append(column >= at if op == "ge" else column < at)
    return clauses


@router.get("/ImagingStudy")
def search_imaging_studies(request: Request, principal: CurrentPrincipal, hub: HubDep) -> Response:
    """Search the studies the caller sees, as ImagingStudy."""
    check_format(request)
    require_scope("ImagingStudy", "s")(principal, request, hub)
    params = request.query_params
    unknown = sorted({k for k in params if k not in SEARCH_PARAMS + _CONTROL})
    if unknown and "handling=strict" in (request.headers.get("prefer") or ""):
        raise FhirError(400, f"unknown search parameters: {', '.join(unknown)}", expression=unknown)
    used: list[tuple[str, str]] = []
    root = _root(request, hub)
    with hub.sessions() as session:
        query = tenancy.visible_studies(principal)
        try:
            count = max(0, min(COUNT_MAX, int(params.get("_count", COUNT_DEFAULT))))
            offset = max(0, int(params.get("_offset", "0")))
            for name, value in params.multi_items():
                values = [v for v in value.split(",") if v]
                if name in SEARCH_PARAMS and values:
                    used.append((name, value))
                    query = query.where(*_clauses(session, principal, name, values))
        except SearchError as exc:
            raise FhirError(400, str(exc), expression=[exc.param]) from None
        except ValueError as exc:
            raise FhirError(
                400, f"_count and _offset must be integers: {exc}", expression=["_count"]
            ) from None
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        studies = list(
            session.scalars(query.order_by(Study.created_at, Study.id).limit(count).offset(offset))
        )
        found = imaging_studies(session, principal, studies, root)
    audit.record(
        hub,
        "search",
        principal,
        entity_type="ImagingStudy",
        clinic_id=principal.clinic_id,
        detail=f"{len(found)} of {total} matches",
    )
    base = f"{root}/fhir"

    def link(at: int) -> str:
        pairs = [*used, ("_count", str(count)), ("_offset", str(at))]
        return f"{base}/ImagingStudy?{urlencode(pairs)}"

    links = [{"relation": "self", "url": link(offset)}]
    if offset + count < total and count > 0:
        links.append({"relation": "next", "url": link(offset + count)})
    if offset > 0:
        links.append({"relation": "previous", "url": link(max(0, offset - count))})
    entries: list[dict[str, Any]] = [
        {"fullUrl": f"{base}/ImagingStudy/{r['id']}", "resource": r, "search": {"mode": "match"}}
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
        "total": int(total),
        "link": links,
        "entry": entries,
    }
    return fhir_json(bundle)


@router.get("/ImagingStudy/{study_id}")
def read_imaging_study(
    study_id: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """Read one study as ImagingStudy."""
    check_format(request)
    require_scope("ImagingStudy", "r")(principal, request, hub)
    with hub.sessions() as session:
        study = tenancy.get_study(session, principal, study_id)
        found = imaging_studies(session, principal, [study], _root(request, hub)) if study else []
    if study is None:
        audit.record_access(
            hub,
            "read",
            principal,
            "ImagingStudy",
            study_id,
            outcome=audit.MINOR_FAILURE,
            detail="not found or not visible to the caller",
        )
        raise FhirError(404, f"ImagingStudy/{study_id} is not known")
    audit.record_access(hub, "read", principal, "ImagingStudy", study.id, owner=study)
    return fhir_json(found[0])


_READ_ONLY = (
    "ImagingStudy is generated from the DICOM archive and is read-only here; "
    "send images by C-STORE or STOW-RS (/dicomweb/studies)"
)


@router.post("/ImagingStudy")
def create_imaging_study(request: Request, principal: CurrentPrincipal, hub: HubDep) -> Response:
    """Refused (405): ImagingStudy is read-only."""
    raise FhirError(405, _READ_ONLY, code="not-supported", headers={"Allow": "GET"})


@router.put("/ImagingStudy/{study_id}")
@router.delete("/ImagingStudy/{study_id}")
def write_imaging_study(
    study_id: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """Refused (405): ImagingStudy is read-only; another tenant's study is absent (404)."""
    with hub.sessions() as session:
        study = tenancy.get_study(session, principal, study_id)
    if study is None:
        raise FhirError(404, f"ImagingStudy/{study_id} is not known")
    raise FhirError(405, _READ_ONLY, code="not-supported", headers={"Allow": "GET"})
