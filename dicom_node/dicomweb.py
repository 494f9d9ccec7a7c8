"""DICOMweb (PS3.18): QIDO-RS search, WADO-RS retrieve and STOW-RS store, under /dicomweb.

Every route resolves the caller (saf.deps), asks saf.tenancy what it may see and writes
an audit record; another tenant's study answers 404 exactly like a missing one. Study,
series and instance path segments are DICOM UIDs, as the standard has them.

Choices written down:

- QIDO-RS answers from the index (never from blobs): the attributes the index holds are
  the ones returned (`includefield` adds what the index has; unknown fields are ignored).
  PatientName is sealed in the index, so it cannot be matched in SQL: a PatientName
  query unseals the names of the caller's own patients (a clinic's, or a specialist's
  case patients) and matches them in Python, case-insensitively with ``*``/``?``
  wildcards, then restricts the SQL query to those patients. No match answers
  200 with ``[]`` (dicomweb-client and OHIF accept both that and 204).
- WADO-RS retrieve streams the original stored Part 10 bytes, decrypted chunk by
  chunk (saf.vault.read), one part per instance; only the newest version of an
  instance is served. A request for a specific transfer syntax other than the stored
  one answers 406: the hub does not transcode.
- Metadata (DICOM JSON) is read from the stored objects (headers only, pixel data
  skipped), since the index holds a fraction of the attributes, and kept encoded per
  instance in this process's memory (`metadata_cache`; no table, nothing on disk);
  gzip when asked.
- STOW-RS spools each part to a private file and hands it to saf.ingest.ingest_part10,
  the one ingest path; the answer lists only what ingest committed.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser
from sqlalchemy import ColumnElement, Select, and_, exists, func, select
from sqlalchemy.orm import Session, aliased
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from saf import audit, tenancy, vault
from saf.crypto import CryptoError, open_value
from saf.deps import HubDep, require_scope
from saf.hub import Hub
from saf.identity import Principal
from saf.ingest import IngestError, Sender, ingest_part10
from saf.models import Blob, Instance, Patient, Series, Study
from saf.render import Format, RenderError, Window, render

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger(__name__)

PREFIX: Final = "/dicomweb"
router = APIRouter(prefix=PREFIX, tags=["dicomweb"])

DICOM_JSON: Final = "application/dicom+json"
NOT_FOUND: Final = "not found"
"""The one 404 message, for a missing UID and for another tenant's alike."""

QIDO_LIMIT_MAX: Final = 5000
"""Most results one QIDO-RS answer holds; ask for more with `offset`."""

GZIP_MIN_BYTES: Final = 1024
"""JSON answers smaller than this are not worth compressing."""

THUMBNAIL_SIZE: Final = 128
"""Longest side of a /thumbnail when no viewport is given."""

CACHE_CONTROL: Final = "private, no-store"
"""Everything here is PHI: no shared or persistent caching."""

Search = Annotated[Principal, Depends(require_scope("ImagingStudy", "s"))]
Read = Annotated[Principal, Depends(require_scope("ImagingStudy", "r"))]
Create = Annotated[Principal, Depends(require_scope("ImagingStudy", "c"))]

# --------------------------------------------------------------------------- DICOM JSON

VR: Final[dict[str, tuple[str, str]]] = {
    # keyword: (tag, VR) of every attribute the index can answer with
    "SpecificCharacterSet": ("00080005", "CS"),
    "StudyDate": ("00080020", "DA"),
    "StudyTime": ("00080030", "TM"),
    "AccessionNumber": ("00080050", "SH"),
    "ModalitiesInStudy": ("00080061", "CS"),
    "StudyDescription": ("00081030", "LO"),
    "PatientName": ("00100010", "PN"),
    "PatientID": ("00100020", "LO"),
    "PatientBirthDate": ("00100030", "DA"),
    "PatientSex": ("00100040", "CS"),
    "StudyInstanceUID": ("0020000D", "UI"),
    "StudyID": ("00200010", "SH"),
    "NumberOfStudyRelatedSeries": ("00201206", "IS"),
    "NumberOfStudyRelatedInstances": ("00201208", "IS"),
    "Modality": ("00080060", "CS"),
    "SeriesDescription": ("0008103E", "LO"),
    "BodyPartExamined": ("00180015", "CS"),
    "SeriesInstanceUID": ("0020000E", "UI"),
    "SeriesNumber": ("00200011", "IS"),
    "NumberOfSeriesRelatedInstances": ("00201209", "IS"),
    "SOPClassUID": ("00080016", "UI"),
    "SOPInstanceUID": ("00080018", "UI"),
    "AvailableTransferSyntaxUID": ("00083002", "UI"),
    "InstanceNumber": ("00200013", "IS"),
    "Rows": ("00280010", "US"),
    "Columns": ("00280011", "US"),
    "NumberOfFrames": ("00280008", "IS"),
    "RetrieveURL": ("00081190", "UR"),
}
_KEYWORD_OF_TAG: Final = {tag: keyword for keyword, (tag, _) in VR.items()}

STUDY_FIELDS: Final = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "RetrieveURL",
)
"""Study-level return attributes (PS3.18 Table 10.6.3-3), those the index holds."""
STUDY_OPTIONAL: Final = ("StudyDescription",)
SERIES_FIELDS: Final = (
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "RetrieveURL",
)
SERIES_OPTIONAL: Final = ("BodyPartExamined",)
INSTANCE_FIELDS: Final = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "AvailableTransferSyntaxUID",
    "RetrieveURL",
)


def _element(keyword: str, value: Any) -> dict[str, Any]:
    """One DICOM JSON attribute (PS3.18 F.2); an empty value has no "Value"."""
    vr = VR[keyword][1]
    element: dict[str, Any] = {"vr": vr}
    if value is None or value == "" or value == []:
        return element
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        element["Value"] = [{"Alphabetic": str(v)} for v in values]
    elif vr in ("US", "IS"):
        element["Value"] = [int(v) for v in values]
    else:
        element["Value"] = [str(v) for v in values]
    return element


def _json_model(attributes: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """The DICOM JSON object of `fields` (keywords) taken from `attributes`, tag-sorted."""
    wanted = {VR[k][0]: k for k in fields if k in attributes}
    return {tag: _element(wanted[tag], attributes[wanted[tag]]) for tag in sorted(wanted)}


# --------------------------------------------------------------------------- helpers


def _audit(
    hub: Hub,
    event: str,
    caller: Principal,
    entity_type: str,
    entity_id: str | None,
    *,
    study: Study | None = None,
    outcome: int = audit.SUCCESS,
    detail: str | None = None,
) -> None:
    audit.record(
        hub,
        event,
        caller,
        outcome=outcome,
        entity_type=entity_type,
        entity_id=entity_id[:64] if entity_id else None,
        clinic_id=study.clinic_id if study else caller.clinic_id,
        patient_pk=study.patient_pk if study else None,
        detail=detail,
    )


def _not_found(hub: Hub, event: str, caller: Principal, entity_type: str, uid: str) -> None:
    """Record the refused access and raise the one 404 (absent and hidden alike)."""
    _audit(
        hub,
        event,
        caller,
        entity_type,
        uid,
        outcome=audit.MINOR_FAILURE,
        detail="not found or not visible to the caller",
    )
    raise HTTPException(404, NOT_FOUND)


def _base_url(request: Request) -> str:
    public = request.app.state.hub.settings.public_url
    base = public if public else str(request.base_url).rstrip("/")
    return f"{base}{PREFIX}"


def _json_response(request: Request, body: Any, status_code: int = 200) -> Response:
    """A DICOM JSON answer (`body` as a value, or already encoded bytes), gzip-compressed
    when the client accepts it and it is worth it."""
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    headers = {"Cache-Control": CACHE_CONTROL, "Vary": "Accept-Encoding"}
    if len(data) >= GZIP_MIN_BYTES and "gzip" in request.headers.get("accept-encoding", ""):
        data = gzip.compress(data, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return Response(data, status_code=status_code, media_type=DICOM_JSON, headers=headers)


def _studies_by_uid(session: Session, caller: Principal, study_uid: str) -> list[Study]:
    # A study UID is unique per clinic; a specialist serving two clinics may see two.
    return list(
        session.scalars(
            tenancy.visible_studies(caller)
            .where(Study.study_instance_uid == study_uid)
            .order_by(Study.created_at)
        )
    )


@dataclass(frozen=True)
class _Stored:
    """One instance to serve: the newest version of a SOP instance, with its blob."""

    instance: Instance
    blob: Blob
    series: Series
    study: Study


def _newest(session: Session, caller: Principal, *where: ColumnElement[bool]) -> list[_Stored]:
    """The caller's instances matching `where` (newest version of each), in study, series
    and instance-number order."""
    rows = session.execute(
        select(Instance, Blob, Series, Study)
        .join(Blob, Blob.id == Instance.blob_id)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .where(tenancy.instance_clause(caller), _newest_version(), *where)
        .order_by(Instance.version)
    ).all()
    newest: dict[tuple[str, str], _Stored] = {}
    for inst, blob, series, study in rows:
        newest[(inst.series_pk, inst.sop_instance_uid)] = _Stored(inst, blob, series, study)
    return sorted(
        newest.values(),
        key=lambda s: (
            s.study.study_instance_uid,
            s.series.series_number is None,
            s.series.series_number or 0,
            s.series.series_instance_uid,
            s.instance.instance_number is None,
            s.instance.instance_number or 0,
            s.instance.sop_instance_uid,
        ),
    )


def _newest_version() -> ColumnElement[bool]:
    """WHERE clause on `Instance`: no newer version of the same SOP instance exists."""
    newer = aliased(Instance)
    return ~exists(
        select(newer.id).where(
            newer.series_pk == Instance.series_pk,
            newer.sop_instance_uid == Instance.sop_instance_uid,
            newer.version > Instance.version,
        )
    )


def _target(
    hub: Hub,
    caller: Principal,
    event: str,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> list[_Stored]:
    """The caller's instances of a study, series or instance; 404 when there are none."""
    where = [Study.study_instance_uid == study_uid]
    if series_uid is not None:
        where.append(Series.series_instance_uid == series_uid)
    if sop_uid is not None:
        where.append(Instance.sop_instance_uid == sop_uid)
    with hub.sessions() as session:
        found = _newest(session, caller, *where)
    if not found:
        level = "Instance" if sop_uid else "Series" if series_uid else "Study"
        _not_found(hub, event, caller, level, sop_uid or series_uid or study_uid)
    return found


def _audit_read(
    hub: Hub, caller: Principal, found: Sequence[_Stored], level: str, uid: str, what: str
) -> None:
    """One read record per study touched (a study UID may name studies of two clinics)."""
    studies = {s.study.id: s.study for s in found}
    for study in studies.values():
        count = sum(1 for s in found if s.study.id == study.id)
        entity_id = study.id if level == "Study" else uid
        _audit(hub, "read", caller, level, entity_id, study=study, detail=f"{what}: {count}")


# --------------------------------------------------------------------------- QIDO-RS

_DATE = re.compile(r"^\d{8}$")


def _params(request: Request) -> tuple[dict[str, str], list[str], int, int, list[str]]:
    """Matching keys (by keyword), includefield values, limit, offset, warnings."""
    matching: dict[str, str] = {}
    include: list[str] = []
    limit, offset = QIDO_LIMIT_MAX, 0
    warnings: list[str] = []
    for key, value in request.query_params.multi_items():
        if key == "includefield":
            include += [v.strip() for v in value.split(",") if v.strip()]
        elif key in ("limit", "offset"):
            if not value.isdigit():
                raise HTTPException(400, f"{key} must be a non-negative integer")
            if key == "limit":
                limit = min(int(value), QIDO_LIMIT_MAX) or QIDO_LIMIT_MAX
            else:
                offset = int(value)
        elif key == "fuzzymatching":
            if value.lower() == "true":
                warnings.append('299 saf "fuzzymatching is not supported; matching is exact"')
        else:
            keyword = _KEYWORD_OF_TAG.get(key.upper(), key)
            if keyword in VR and keyword not in ("RetrieveURL", "AvailableTransferSyntaxUID"):
                matching[keyword] = value
            else:
                warnings.append(f'299 saf "the attribute {key[:64]} is not supported"')
    return matching, include, limit, offset, warnings


def _fields(base: Sequence[str], optional: Sequence[str], include: list[str]) -> list[str]:
    if "all" in include:
        return [*base, *optional]
    extra = [_KEYWORD_OF_TAG.get(i.upper(), i) for i in include]
    return [*base, *(k for k in extra if k in VR and k not in base)]


def _uid_list(value: str) -> list[str]:
    """A single UID or a list (PS3.18 8.3.4.1: comma; PS3.4: backslash)."""
    return [v.strip() for v in re.split(r"[,\\]", value) if v.strip()]


def _string_clause(column: Any, value: str) -> ColumnElement[bool]:
    """Single value or wildcard matching (``*`` and ``?``), case-sensitive as in PS3.4."""
    if "*" in value or "?" in value:
        escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = escaped.replace("*", "%").replace("?", "_")
        return column.like(pattern, escape="\\")  # type: ignore[no-any-return]
    return column == value  # type: ignore[no-any-return]


def _date_clause(column: Any, value: str) -> ColumnElement[bool]:
    """A date or a range (``a-b``, ``-b``, ``a-``), DA values as YYYYMMDD."""
    start, sep, end = value.partition("-")
    for part in (start, end):
        if part and not _DATE.match(part):
            raise HTTPException(400, f"date {value!r}: use YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    if not sep:
        return column == start  # type: ignore[no-any-return]
    clauses = []
    if start:
        clauses.append(column >= start)
    if end:
        clauses.append(column <= end)
    return and_(*clauses)


def _name_matches(pattern: str) -> Callable[[str | None], bool]:
    """Case-insensitive PN matching with wildcards, on the whole name or any component."""
    regex = re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
        re.IGNORECASE,
    )

    def match(name: str | None) -> bool:
        if not name:
            return False
        alphabetic = name.split("=")[0]
        return bool(regex.fullmatch(alphabetic)) or (
            "^" not in pattern and any(regex.fullmatch(p) for p in alphabetic.split("^"))
        )

    return match


def _unseal(hub: Hub, token: str | None, context: str) -> str | None:
    if not token:
        return None
    try:
        return open_value(hub.keyring, token, context=context)
    except (CryptoError, ValueError):
        # A damaged value is left out rather than failing the whole search; fsck reports it.
        return None


def _patients_named(session: Session, hub: Hub, caller: Principal, pattern: str) -> list[str]:
    """The caller's patients whose (sealed) name matches `pattern`."""
    match = _name_matches(pattern)
    return [
        p.id
        for p in session.scalars(tenancy.visible_patients(caller))
        if match(_unseal(hub, p.name_sealed, "patient.name"))
    ]


def _study_filters(
    session: Session, hub: Hub, caller: Principal, matching: dict[str, str]
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    for keyword, value in matching.items():
        if not value or value == "*":
            continue  # universal matching
        if keyword == "StudyInstanceUID":
            where.append(Study.study_instance_uid.in_(_uid_list(value)))
        elif keyword == "AccessionNumber":
            where.append(_string_clause(Study.accession_number, value))
        elif keyword == "StudyID":
            where.append(_string_clause(Study.study_id, value))
        elif keyword == "StudyDescription":
            where.append(_string_clause(Study.study_description, value))
        elif keyword == "StudyDate":
            where.append(_date_clause(Study.study_date, value))
        elif keyword == "PatientID":
            where.append(_string_clause(Patient.patient_id, value))
        elif keyword == "PatientSex":
            where.append(Patient.sex == value)
        elif keyword == "PatientName":
            where.append(Study.patient_pk.in_(_patients_named(session, hub, caller, value)))
        elif keyword == "ModalitiesInStudy":
            s = aliased(Series)
            where.append(
                exists(select(s.id).where(s.study_pk == Study.id, s.modality.in_(_uid_list(value))))
            )
    return where


def _series_filters(matching: dict[str, str]) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    for keyword, value in matching.items():
        if not value or value == "*":
            continue
        if keyword == "SeriesInstanceUID":
            where.append(Series.series_instance_uid.in_(_uid_list(value)))
        elif keyword == "Modality":
            where.append(Series.modality.in_(_uid_list(value)))
        elif keyword == "SeriesNumber":
            if not value.isdigit():
                raise HTTPException(400, "SeriesNumber must be an integer")
            where.append(Series.series_number == int(value))
        elif keyword == "SeriesDescription":
            where.append(_string_clause(Series.series_description, value))
        elif keyword == "BodyPartExamined":
            where.append(_string_clause(Series.body_part_examined, value))
    return where


def _instance_filters(matching: dict[str, str]) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    for keyword, value in matching.items():
        if not value or value == "*":
            continue
        if keyword == "SOPInstanceUID":
            where.append(Instance.sop_instance_uid.in_(_uid_list(value)))
        elif keyword == "SOPClassUID":
            where.append(Instance.sop_class_uid.in_(_uid_list(value)))
        elif keyword == "InstanceNumber":
            if not value.isdigit():
                raise HTTPException(400, "InstanceNumber must be an integer")
            where.append(Instance.instance_number == int(value))
    return where


def _study_attributes(
    hub: Hub, base: str, study: Study, patient: Patient, counts: tuple[int, int, list[str]]
) -> dict[str, Any]:
    series_count, instance_count, modalities = counts
    return {
        "StudyDate": study.study_date,
        "StudyTime": study.study_time,
        "AccessionNumber": study.accession_number,
        "ModalitiesInStudy": modalities,
        "StudyDescription": study.study_description,
        "PatientName": _unseal(hub, patient.name_sealed, "patient.name"),
        "PatientID": patient.patient_id,
        "PatientBirthDate": _unseal(hub, patient.birth_date_sealed, "patient.birth_date"),
        "PatientSex": patient.sex,
        "StudyInstanceUID": study.study_instance_uid,
        "StudyID": study.study_id,
        "NumberOfStudyRelatedSeries": series_count,
        "NumberOfStudyRelatedInstances": instance_count,
        "RetrieveURL": f"{base}/studies/{study.study_instance_uid}",
    }


def _series_attributes(base: str, study: Study, series: Series, count: int) -> dict[str, Any]:
    return {
        "Modality": series.modality,
        "SeriesDescription": series.series_description,
        "BodyPartExamined": series.body_part_examined,
        "SeriesInstanceUID": series.series_instance_uid,
        "SeriesNumber": series.series_number,
        "NumberOfSeriesRelatedInstances": count,
        "RetrieveURL": (
            f"{base}/studies/{study.study_instance_uid}/series/{series.series_instance_uid}"
        ),
    }


def _instance_attributes(base: str, stored: _Stored) -> dict[str, Any]:
    inst = stored.instance
    return {
        "SOPClassUID": inst.sop_class_uid,
        "SOPInstanceUID": inst.sop_instance_uid,
        "InstanceNumber": inst.instance_number,
        "Rows": inst.rows,
        "Columns": inst.columns,
        "NumberOfFrames": inst.number_of_frames,
        "AvailableTransferSyntaxUID": inst.transfer_syntax_uid,
        "RetrieveURL": (
            f"{base}/studies/{stored.study.study_instance_uid}/series/"
            f"{stored.series.series_instance_uid}/instances/{inst.sop_instance_uid}"
        ),
    }


def _distinct_instances() -> Any:
    """COUNT of distinct SOP Instance UIDs (versions of one instance count once)."""
    return func.count(func.distinct(Instance.sop_instance_uid))


def _study_counts(
    session: Session, caller: Principal, study_ids: list[str]
) -> dict[str, tuple[int, int, list[str]]]:
    """Series count, instance count and modalities of each study, in two queries."""
    counts: dict[str, tuple[int, int, list[str]]] = {sid: (0, 0, []) for sid in study_ids}
    if not study_ids:
        return counts
    modalities: dict[str, set[str]] = {sid: set() for sid in study_ids}
    series_count: dict[str, int] = dict.fromkeys(study_ids, 0)
    for study_pk, modality in session.execute(
        select(Series.study_pk, Series.modality).where(
            tenancy.series_clause(caller), Series.study_pk.in_(study_ids)
        )
    ):
        series_count[study_pk] += 1
        if modality:
            modalities[study_pk].add(modality)
    instance_count: dict[str, int] = {
        study_pk: int(n)
        for study_pk, n in session.execute(
            select(Series.study_pk, _distinct_instances())
            .join(Instance, Instance.series_pk == Series.id)
            .where(tenancy.series_clause(caller), Series.study_pk.in_(study_ids))
            .group_by(Series.study_pk)
        )
    }
    for sid in study_ids:
        counts[sid] = (series_count[sid], instance_count.get(sid, 0), sorted(modalities[sid]))
    return counts


def _qido_response(
    request: Request,
    hub: Hub,
    caller: Principal,
    level: str,
    items: list[dict[str, Any]],
    warnings: list[str],
    scope: str,
) -> Response:
    _audit(hub, "search", caller, level, None, detail=f"QIDO-RS {scope}: {len(items)} results")
    response = _json_response(request, items)
    for warning in warnings:
        response.headers.append("Warning", warning)
    return response


def _search_studies(request: Request, hub: Hub, caller: Principal) -> Response:
    matching, include, limit, offset, warnings = _params(request)
    base = _base_url(request)
    fields = _fields(STUDY_FIELDS, STUDY_OPTIONAL, include)
    with hub.sessions() as session:
        query: Select[Any] = (
            tenancy.visible_studies(caller)
            .join(Patient, Patient.id == Study.patient_pk)
            .add_columns(Patient)
            .where(*_study_filters(session, hub, caller, matching))
            .order_by(Study.study_date.desc(), Study.study_instance_uid, Study.id)
            .limit(limit + 1)
            .offset(offset)
        )
        rows = session.execute(query).all()
        more = len(rows) > limit
        rows = rows[:limit]
        counts = _study_counts(session, caller, [study.id for study, _ in rows])
        items = [
            _json_model(_study_attributes(hub, base, study, patient, counts[study.id]), fields)
            for study, patient in rows
        ]
    if more:
        warnings.append('299 saf "There are additional results that can be requested"')
    return _qido_response(request, hub, caller, "Study", items, warnings, "studies")


def _search_series(
    request: Request, hub: Hub, caller: Principal, study_uid: str | None
) -> Response:
    matching, include, limit, offset, warnings = _params(request)
    base = _base_url(request)
    study_level = study_uid is None
    fields = _fields(SERIES_FIELDS, SERIES_OPTIONAL, include)
    if study_level:
        fields += [f for f in _fields(STUDY_FIELDS, (), include) if f != "RetrieveURL"]
    with hub.sessions() as session:
        if study_uid is not None and not _studies_by_uid(session, caller, study_uid):
            _not_found(hub, "search", caller, "Study", study_uid)
        where = _series_filters(matching)
        if study_uid is not None:
            where.append(Study.study_instance_uid == study_uid)
        else:
            where += _study_filters(session, hub, caller, matching)
        instances = (
            select(Instance.series_pk, _distinct_instances().label("n"))
            .group_by(Instance.series_pk)
            .subquery()
        )
        rows = session.execute(
            tenancy.visible_series(caller)
            .join(Study, Study.id == Series.study_pk)
            .join(Patient, Patient.id == Study.patient_pk)
            .outerjoin(instances, instances.c.series_pk == Series.id)
            .add_columns(Study, Patient, instances.c.n)
            .where(*where)
            .order_by(Study.study_instance_uid, Series.series_number, Series.series_instance_uid)
            .limit(limit + 1)
            .offset(offset)
        ).all()
        more = len(rows) > limit
        rows = rows[:limit]
        counts = (
            _study_counts(session, caller, sorted({study.id for _, study, _, _ in rows}))
            if study_level
            else {}
        )
        items = []
        for series, study, patient, n in rows:
            attributes = _series_attributes(base, study, series, n or 0)
            if study_level:
                attributes = {
                    **_study_attributes(hub, base, study, patient, counts[study.id]),
                    **attributes,
                }
            items.append(_json_model(attributes, fields))
    if more:
        warnings.append('299 saf "There are additional results that can be requested"')
    return _qido_response(request, hub, caller, "Series", items, warnings, "series")


def _search_instances(
    request: Request,
    hub: Hub,
    caller: Principal,
    study_uid: str | None,
    series_uid: str | None,
) -> Response:
    matching, include, limit, offset, warnings = _params(request)
    base = _base_url(request)
    fields = _fields(INSTANCE_FIELDS, (), include)
    if series_uid is None:
        fields += [f for f in _fields(SERIES_FIELDS, SERIES_OPTIONAL, include) if f not in fields]
    if study_uid is None:
        fields += [f for f in _fields(STUDY_FIELDS, (), include) if f not in fields]
    with hub.sessions() as session:
        if study_uid is not None and not _studies_by_uid(session, caller, study_uid):
            _not_found(hub, "search", caller, "Study", study_uid)
        where = _instance_filters(matching)
        if study_uid is not None:
            where.append(Study.study_instance_uid == study_uid)
        else:
            where += _study_filters(session, hub, caller, matching)
        if series_uid is not None:
            where.append(Series.series_instance_uid == series_uid)
        else:
            where += _series_filters(matching)
        series_size = (
            select(Instance.series_pk, _distinct_instances().label("n"))
            .group_by(Instance.series_pk)
            .subquery()
        )
        rows = session.execute(
            select(Instance, Blob, Series, Study, series_size.c.n)
            .join(Blob, Blob.id == Instance.blob_id)
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .join(series_size, series_size.c.series_pk == Series.id)
            .where(tenancy.instance_clause(caller), _newest_version(), *where)
            .order_by(
                Study.study_instance_uid,
                Series.series_number,
                Series.series_instance_uid,
                Instance.instance_number,
                Instance.sop_instance_uid,
            )
            .limit(limit + 1)
            .offset(offset)
        ).all()
        if series_uid is not None and not rows and not offset:
            exists_series = session.scalar(
                tenancy.visible_series(caller)
                .join(Study, Study.id == Series.study_pk)
                .where(
                    Study.study_instance_uid == study_uid,
                    Series.series_instance_uid == series_uid,
                )
            )
            if exists_series is None:
                _not_found(hub, "search", caller, "Series", series_uid)
        more = len(rows) > limit
        page = [_Stored(inst, blob, series, study) for inst, blob, series, study, _ in rows[:limit]]
        series_n = {series.id: int(n) for _, _, series, _, n in rows}
        patients = {
            p.id: p
            for p in session.scalars(
                select(Patient).where(Patient.id.in_({s.study.patient_pk for s in page}))
            )
        }
        counts = _study_counts(session, caller, sorted({s.study.id for s in page}))
        items = []
        for stored in page:
            attributes = {
                **_study_attributes(
                    hub,
                    base,
                    stored.study,
                    patients[stored.study.patient_pk],
                    counts[stored.study.id],
                ),
                **_series_attributes(base, stored.study, stored.series, series_n[stored.series.id]),
                **_instance_attributes(base, stored),
            }
            items.append(_json_model(attributes, fields))
    if more:
        warnings.append('299 saf "There are additional results that can be requested"')
    return _qido_response(request, hub, caller, "Instance", items, warnings, "instances")


@router.get("/studies")
def search_studies(request: Request, caller: Search, hub: HubDep) -> Response:
    """QIDO-RS: search for studies."""
    return _search_studies(request, hub, caller)


@router.get("/series")
def search_all_series(request: Request, caller: Search, hub: HubDep) -> Response:
    """QIDO-RS: search for series of any study."""
    return _search_series(request, hub, caller, None)


@router.get("/instances")
def search_all_instances(request: Request, caller: Search, hub: HubDep) -> Response:
    """QIDO-RS: search for instances of any study."""
    return _search_instances(request, hub, caller, None, None)


@router.get("/studies/{study}/series")
def search_series(study: str, request: Request, caller: Search, hub: HubDep) -> Response:
    """QIDO-RS: search for the series of a study."""
    return _search_series(request, hub, caller, study)


@router.get("/studies/{study}/instances")
def search_study_instances(study: str, request: Request, caller: Search, hub: HubDep) -> Response:
    """QIDO-RS: search for the instances of a study."""
    return _search_instances(request, hub, caller, study, None)


@router.get("/studies/{study}/series/{series}/instances")
def search_instances(
    study: str, series: str, request: Request, caller: Search, hub: HubDep
) -> Response:
    """QIDO-RS: search for the instances of a series."""
    return _search_instances(request, hub, caller, study, series)


# --------------------------------------------------------------------------- WADO-RS


@dataclass(frozen=True)
class _MediaRange:
    """One entry of an Accept header: ``multipart/related; type="application/dicom"; ...``."""

    media_type: str
    params: dict[str, str]

    @property
    def part_type(self) -> str:
        """The media type of the parts (the `type` parameter of multipart/related)."""
        if self.media_type == "multipart/related":
            return self.params.get("type", "")
        return self.media_type


def _split_params(value: str) -> tuple[str, dict[str, str]]:
    head, *rest = [p.strip() for p in re.split(r";(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", value)]
    params = {}
    for item in rest:
        key, _, val = item.partition("=")
        params[key.strip().lower()] = val.strip().strip('"')
    return head.lower(), params


def _accept(request: Request) -> list[_MediaRange]:
    header = request.headers.get("accept", "")
    ranges = []
    for entry in re.split(r",(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", header):
        if entry.strip():
            media_type, params = _split_params(entry)
            ranges.append(_MediaRange(media_type, params))
    return ranges


def _syntaxes_for(request: Request, part_type: str) -> set[str] | None:
    """Transfer syntaxes the client accepts for `part_type` parts: None for any (no
    transfer-syntax parameter, ``*``, or no Accept header at all); 406 when the client
    accepts nothing of that type."""
    ranges = _accept(request)
    if not ranges:
        return None
    wanted: set[str] = set()
    for media in ranges:
        if media.media_type in ("*/*", "multipart/related") and media.part_type in (
            "",
            part_type,
            "*/*",
        ):
            syntax = media.params.get("transfer-syntax")
            if syntax is None or syntax == "*":
                return None
            wanted.add(syntax)
    if not wanted:
        raise HTTPException(
            406, f'this resource is served as multipart/related; type="{part_type}"'
        )
    return wanted


def _boundary() -> str:
    return f"saf-{secrets.token_hex(16)}"


def _multipart_response(
    parts: Iterator[bytes], boundary: str, part_type: str, *, status_code: int = 200
) -> StreamingResponse:
    return StreamingResponse(
        parts,
        status_code=status_code,
        media_type=f'multipart/related; type="{part_type}"; boundary={boundary}',
        headers={"Cache-Control": CACHE_CONTROL},
    )


def _stream_instances(hub: Hub, found: list[_Stored], boundary: str) -> Iterator[bytes]:
    """The multipart body, one stored object at a time, decrypted chunk by chunk."""
    for stored in found:
        yield (
            f"--{boundary}\r\nContent-Type: application/dicom; "
            f"transfer-syntax={stored.instance.transfer_syntax_uid}\r\n"
            f"Content-Length: {stored.blob.size}\r\n\r\n"
        ).encode()
        yield from vault.read(hub, stored.blob)
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _retrieve(request: Request, hub: Hub, caller: Principal, found: list[_Stored]) -> Response:
    syntaxes = _syntaxes_for(request, "application/dicom")
    if syntaxes is not None:
        stored_as = {s.instance.transfer_syntax_uid for s in found}
        if not stored_as <= syntaxes:
            raise HTTPException(
                406,
                "the hub serves instances in their stored transfer syntax ("
                + ", ".join(sorted(stored_as))
                + "); accept transfer-syntax=* or that syntax",
            )
    boundary = _boundary()
    return _multipart_response(
        _stream_instances(hub, found, boundary), boundary, "application/dicom"
    )


@router.get("/studies/{study}")
def retrieve_study(study: str, request: Request, caller: Read, hub: HubDep) -> Response:
    """WADO-RS: the study's instances as stored (multipart/related; application/dicom)."""
    found = _target(hub, caller, "read", study)
    response = _retrieve(request, hub, caller, found)
    _audit_read(hub, caller, found, "Study", study, "WADO-RS instances")
    return response


@router.get("/studies/{study}/series/{series}")
def retrieve_series(
    study: str, series: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: the series' instances as stored."""
    found = _target(hub, caller, "read", study, series)
    response = _retrieve(request, hub, caller, found)
    _audit_read(hub, caller, found, "Series", series, "WADO-RS instances")
    return response


@router.get("/studies/{study}/series/{series}/instances/{instance}")
def retrieve_instance(
    study: str, series: str, instance: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: one instance as stored."""
    found = _target(hub, caller, "read", study, series, instance)
    response = _retrieve(request, hub, caller, found)
    _audit_read(hub, caller, found, "Instance", instance, "WADO-RS instances")
    return response


# ----- metadata


class _ChunkReader(io.RawIOBase):
    """A seekable read-only file over an iterator of byte chunks (the decrypted blob).

    pydicom seeks and tells while it parses; the bytes read so far are kept so it can
    seek back, and a header-only parse never pulls the pixel data through decryption.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._data = bytearray()
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _fill(self, size: int) -> None:
        while not self._done and len(self._data) < size:
            try:
                self._data += next(self._chunks)
            except StopIteration:
                self._done = True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            self._fill(1 << 62)
            offset += len(self._data)
        elif whence == io.SEEK_CUR:
            offset += self._pos
        self._pos = max(0, offset)
        return self._pos

    def readinto(self, target: Any) -> int:
        self._fill(self._pos + len(target))
        n = max(0, min(len(target), len(self._data) - self._pos))
        target[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()  # closes the blob store handle under the generator
        super().close()


def _open_dataset(hub: Hub, blob: Blob, *, pixels: bool) -> Dataset:
    """The stored object as a dataset (read through the decrypting stream)."""
    with _ChunkReader(vault.read(hub, blob)) as fp:
        return dcmread(fp, stop_before_pixels=not pixels)


class _MetadataCache:
    """Encoded DICOM JSON of recently served instances, in this process's memory only.

    Keyed by instance row id: a row's stored object never changes (a different payload
    under the same SOP Instance UID is a new row), so an entry never goes stale. Reading
    headers through pydicom costs milliseconds per instance, which a viewer pays again on
    every reopening of a study; this keeps the second time fast without a table or a disk
    copy of PHI. Access is decided before the cache is asked (tenancy query first).
    """

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._size = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._entries.get(key)
            if data is not None:
                self._entries.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            if key in self._entries or len(data) > self._max:
                return
            self._entries[key] = data
            self._size += len(data)
            while self._size > self._max:
                _, dropped = self._entries.popitem(last=False)
                self._size -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._size = 0


METADATA_CACHE_BYTES: Final = 128 << 20
"""Memory the per-process metadata cache may hold (about 50,000 CT instances' headers)."""

metadata_cache = _MetadataCache(METADATA_CACHE_BYTES)


BULK_DATA_THRESHOLD: Final = 1 << 20
"""Binary values up to this size are inlined (base64) in metadata; pixel data is left out."""

MEMO_VALUE_MAX: Final = 1024
"""Longest raw value whose JSON is shared between the instances of one metadata answer."""

_MEMO_VRS: Final = frozenset(
    {
        *("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT"),
        *("PN", "SH", "SL", "SS", "ST", "TM", "UC", "UI", "UL", "UR", "US", "UT"),
    }
)
"""Explicit VRs whose JSON depends only on the value bytes, byte order and character set."""

_Memo = dict[tuple[Any, ...], str]


@functools.lru_cache(maxsize=4096)
def _ambiguous(tag: int) -> bool:
    """Whether pydicom decides the tag's VR from other elements (US or SS, OB or OW...)."""
    try:
        return " or " in dictionary_VR(tag)
    except KeyError:
        return False  # a private or unknown tag: its explicit VR is what it is


def _dataset_json(ds: Dataset, memo: _Memo) -> list[tuple[str, str]]:
    """(tag, encoded JSON element) of every element, as pydicom's to_json_dict makes them.

    Most elements of a study's instances (patient, study, series, equipment, image
    modules) carry the same bytes in every instance; their JSON is made once per answer
    and reused (the memo), which is most of the cost of a cold metadata request.
    """
    charset = str(ds.get("SpecificCharacterSet", ""))
    out = []
    # keys(), not iteration: iterating a Dataset converts every element, the cost avoided here
    for tag in ds.keys():  # noqa: SIM118
        raw = ds.get_item(tag)
        key: tuple[Any, ...] | None = None
        if (
            isinstance(raw, RawDataElement)
            and raw.VR in _MEMO_VRS
            and raw.value is not None
            and len(raw.value) <= MEMO_VALUE_MAX
            and not _ambiguous(int(tag))
        ):
            key = (int(tag), raw.VR, raw.value, raw.is_little_endian, charset)
            cached = memo.get(key)
            if cached is not None:
                out.append((f"{tag:08X}", cached))
                continue
        element = ds[tag].to_json_dict(None, BULK_DATA_THRESHOLD)
        encoded = json.dumps(element, separators=(",", ":"))
        if key is not None:
            memo[key] = encoded
        out.append((f"{tag:08X}", encoded))
    return out


def _metadata(hub: Hub, stored: _Stored, memo: _Memo) -> bytes:
    """One instance's DICOM JSON (no pixel data), encoded."""
    cached = metadata_cache.get(stored.instance.id)
    if cached is not None:
        return cached
    ds = _open_dataset(hub, stored.blob, pixels=False)
    tag, vr = VR["AvailableTransferSyntaxUID"]
    elements = [(t, e) for t, e in _dataset_json(ds, memo) if t != tag]
    syntax = json.dumps({"vr": vr, "Value": [stored.instance.transfer_syntax_uid]})
    elements.append((tag, syntax.replace(", ", ",").replace(": ", ":")))
    data = ("{" + ",".join(f'"{t}":{e}' for t, e in elements) + "}").encode()
    metadata_cache.put(stored.instance.id, data)
    return data


def _metadata_response(
    request: Request, hub: Hub, caller: Principal, found: list[_Stored], level: str, uid: str
) -> Response:
    memo: _Memo = {}
    body = b"[" + b",".join(_metadata(hub, s, memo) for s in found) + b"]"
    _audit_read(hub, caller, found, level, uid, "WADO-RS metadata")
    return _json_response(request, body)


@router.get("/studies/{study}/metadata")
def study_metadata(study: str, request: Request, caller: Read, hub: HubDep) -> Response:
    """WADO-RS: DICOM JSON metadata of every instance of the study (no bulk data)."""
    found = _target(hub, caller, "read", study)
    return _metadata_response(request, hub, caller, found, "Study", study)


@router.get("/studies/{study}/series/{series}/metadata")
def series_metadata(
    study: str, series: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: DICOM JSON metadata of every instance of the series."""
    found = _target(hub, caller, "read", study, series)
    return _metadata_response(request, hub, caller, found, "Series", series)


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
def instance_metadata(
    study: str, series: str, instance: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: DICOM JSON metadata of one instance."""
    found = _target(hub, caller, "read", study, series, instance)
    return _metadata_response(request, hub, caller, found, "Instance", instance)


# ----- frames

ENCAPSULATED_MEDIA: Final[dict[str, str]] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/x-dicom-rle",
}
"""Media types of frames sent in their stored (compressed) transfer syntax."""

EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"


def _frame_numbers(frames: str) -> list[int]:
    try:
        numbers = [int(f) for f in frames.split(",") if f.strip()]
    except ValueError:
        raise HTTPException(400, "frames must be a comma-separated list of numbers") from None
    if not numbers or any(n < 1 for n in numbers):
        raise HTTPException(400, "frame numbers start at 1")
    return numbers


def _native_frames(ds: Dataset, numbers: list[int]) -> list[bytes]:
    """Frames of an uncompressed object, sliced from Pixel Data as stored."""
    bits = int(ds.BitsAllocated)
    frame_bytes = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
    data = bytes(ds.PixelData)
    return [data[(n - 1) * frame_bytes : n * frame_bytes] for n in numbers]


def _decoded_frames(ds: Dataset, numbers: list[int], count: int) -> list[bytes]:
    """Frames of a compressed object, decoded to little-endian native pixels."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise HTTPException(
            406,
            f"cannot decode frames stored as {ds.file_meta.TransferSyntaxUID}: ask for "
            "transfer-syntax=* to receive them as stored",
        ) from exc
    frames = pixels if count > 1 else pixels[None, ...]
    return [frames[n - 1].astype(frames.dtype.newbyteorder("<")).tobytes() for n in numbers]


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}")
def retrieve_frames(
    study: str,
    series: str,
    instance: str,
    frames: str,
    request: Request,
    caller: Read,
    hub: HubDep,
) -> Response:
    """WADO-RS: frames, uncompressed (application/octet-stream) or, when the client accepts
    it (``transfer-syntax=*`` or the stored one), as stored."""
    numbers = _frame_numbers(frames)
    [stored] = _target(hub, caller, "read", study, series, instance)
    syntax = stored.instance.transfer_syntax_uid
    count = max(1, stored.instance.number_of_frames or 1)
    if max(numbers) > count:
        raise HTTPException(404, f"the instance has {count} frame(s)")
    ds = _open_dataset(hub, stored.blob, pixels=True)
    if "PixelData" not in ds:
        raise HTTPException(404, "the instance has no pixel data")
    compressed = ds.file_meta.TransferSyntaxUID.is_compressed
    part_type = "application/octet-stream"
    if compressed:
        media = ENCAPSULATED_MEDIA.get(syntax, "application/octet-stream")
        as_stored = _accepts_stored(request, media, syntax)
        if as_stored:
            part_type = media
            data = [
                f
                for i, f in enumerate(generate_frames(ds.PixelData, number_of_frames=count))
                if i + 1 in set(numbers)
            ]
            by_number = dict(zip(sorted(set(numbers)), data, strict=True))
            parts = [by_number[n] for n in numbers]
        else:
            _syntaxes_for(request, "application/octet-stream")
            parts = _decoded_frames(ds, numbers, count)
            syntax = EXPLICIT_LE
    else:
        _syntaxes_for(request, "application/octet-stream")
        parts = _native_frames(ds, numbers)
        syntax = EXPLICIT_LE
    boundary = _boundary()
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: {part_type}; transfer-syntax={syntax}\r\n\r\n".encode()
            + part
            + b"\r\n"
            for part in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    _audit_read(hub, caller, [stored], "Instance", instance, f"WADO-RS frames {frames[:64]}")
    return Response(
        body,
        media_type=f'multipart/related; type="{part_type}"; boundary={boundary}',
        headers={"Cache-Control": CACHE_CONTROL},
    )


def _accepts_stored(request: Request, media: str, syntax: str) -> bool:
    """Whether the client takes compressed frames as stored (``*`` or the stored syntax)."""
    for entry in _accept(request):
        if entry.part_type in (media, "*/*", "application/octet-stream") or entry.media_type in (
            media,
        ):
            if entry.params.get("transfer-syntax") in ("*", syntax):
                return True
            if entry.part_type == media and "transfer-syntax" not in entry.params:
                return True
    return False


# ----- rendered and thumbnails


@dataclass(frozen=True)
class _RenderOptions:
    fmt: Format
    size: int | None
    window: Window | None
    quality: int


_IMAGE_TYPES: Final[dict[str, Format]] = {
    "image/jpeg": "jpeg",
    "image/png": "png",
    "image/webp": "webp",
}


def _render_options(request: Request, default_size: int | None) -> _RenderOptions:
    fmt: Format = "jpeg"
    for entry in _accept(request):
        if entry.part_type in _IMAGE_TYPES:
            fmt = _IMAGE_TYPES[entry.part_type]
            break
        if entry.part_type in ("image/*", "*/*", ""):
            break
    else:
        if _accept(request):
            raise HTTPException(406, "rendered images are image/jpeg, image/png or image/webp")
    params = request.query_params
    size = default_size
    if viewport := params.get("viewport"):
        parts = viewport.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise HTTPException(
                400, "viewport must be width,height in pixels (cropping is not supported)"
            )
        size = min(int(p) for p in parts)
    window = None
    if text := params.get("window"):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].lower() != "linear"):
            raise HTTPException(400, "window must be center,width[,linear]")
        try:
            window = Window(float(parts[0]), float(parts[1]))
        except ValueError as exc:
            raise HTTPException(400, f"window: {exc}") from None
    quality = 85
    if text := params.get("quality"):
        if not text.isdigit() or not 1 <= int(text) <= 100:
            raise HTTPException(400, "quality must be 1 to 100")
        quality = int(text)
    return _RenderOptions(fmt, size, window, quality)


def _render(hub: Hub, stored: _Stored, options: _RenderOptions, frame: int | None) -> bytes:
    ds = _open_dataset(hub, stored.blob, pixels=True)
    try:
        return render(
            ds,
            frame=frame,
            size=options.size,
            window=options.window,
            fmt=options.fmt,
            quality=options.quality,
        )
    except RenderError as exc:
        raise HTTPException(422, f"cannot render this instance: {exc.reason}") from None
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


def _image_response(
    hub: Hub,
    caller: Principal,
    stored: _Stored,
    options: _RenderOptions,
    frame: int | None,
    level: str,
    uid: str,
    what: str,
) -> Response:
    data = _render(hub, stored, options, frame)
    _audit_read(hub, caller, [stored], level, uid, what)
    return Response(
        data, media_type=f"image/{options.fmt}", headers={"Cache-Control": CACHE_CONTROL}
    )


def _representative(found: list[_Stored]) -> _Stored:
    """The middle instance of the first series (what a thumbnail shows)."""
    first = found[0].series.id
    members = [s for s in found if s.series.id == first]
    return members[len(members) // 2]


@router.get("/studies/{study}/series/{series}/instances/{instance}/rendered")
def instance_rendered(
    study: str, series: str, instance: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: the instance rendered (JPEG, PNG or WebP; `window`, `viewport`, `quality`)."""
    options = _render_options(request, None)
    [stored] = _target(hub, caller, "read", study, series, instance)
    return _image_response(hub, caller, stored, options, None, "Instance", instance, "rendered")


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered")
def frame_rendered(
    study: str,
    series: str,
    instance: str,
    frames: str,
    request: Request,
    caller: Read,
    hub: HubDep,
) -> Response:
    """WADO-RS: one frame rendered."""
    numbers = _frame_numbers(frames)
    if len(numbers) != 1:
        raise HTTPException(400, "render one frame at a time")
    options = _render_options(request, None)
    [stored] = _target(hub, caller, "read", study, series, instance)
    return _image_response(
        hub, caller, stored, options, numbers[0] - 1, "Instance", instance, "rendered frame"
    )


def _rendered_parts(
    hub: Hub, found: list[_Stored], options: _RenderOptions, boundary: str
) -> Iterator[bytes]:
    """One rendered image per instance, rendered as the body is sent (memory stays flat)."""
    for stored in found:
        try:
            data = _render(hub, stored, options, None)
        except HTTPException:
            continue  # an instance without displayable pixels (SR, PDF) has no rendering
        yield f"--{boundary}\r\nContent-Type: image/{options.fmt}\r\n\r\n".encode()
        yield data
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _rendered_many(
    request: Request, hub: Hub, caller: Principal, found: list[_Stored], level: str, uid: str
) -> Response:
    options = _render_options(request, None)
    boundary = _boundary()
    _audit_read(hub, caller, found, level, uid, "rendered")
    return _multipart_response(
        _rendered_parts(hub, found, options, boundary), boundary, f"image/{options.fmt}"
    )


@router.get("/studies/{study}/rendered")
def study_rendered(study: str, request: Request, caller: Read, hub: HubDep) -> Response:
    """WADO-RS: every image of the study rendered (multipart/related, one part each)."""
    found = _target(hub, caller, "read", study)
    return _rendered_many(request, hub, caller, found, "Study", study)


@router.get("/studies/{study}/series/{series}/rendered")
def series_rendered(
    study: str, series: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: every image of the series rendered (multipart/related, one part each)."""
    found = _target(hub, caller, "read", study, series)
    return _rendered_many(request, hub, caller, found, "Series", series)


@router.get("/studies/{study}/thumbnail")
def study_thumbnail(study: str, request: Request, caller: Read, hub: HubDep) -> Response:
    """WADO-RS: a thumbnail of the study (its first series' middle image)."""
    options = _render_options(request, THUMBNAIL_SIZE)
    found = _target(hub, caller, "read", study)
    stored = _representative(found)
    return _image_response(
        hub, caller, stored, options, None, "Study", stored.study.id, "thumbnail"
    )


@router.get("/studies/{study}/series/{series}/thumbnail")
def series_thumbnail(
    study: str, series: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: a thumbnail of the series (its middle image)."""
    options = _render_options(request, THUMBNAIL_SIZE)
    found = _target(hub, caller, "read", study, series)
    return _image_response(
        hub, caller, _representative(found), options, None, "Series", series, "thumbnail"
    )


@router.get("/studies/{study}/series/{series}/instances/{instance}/thumbnail")
def instance_thumbnail(
    study: str, series: str, instance: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: a thumbnail of the instance."""
    options = _render_options(request, THUMBNAIL_SIZE)
    [stored] = _target(hub, caller, "read", study, series, instance)
    return _image_response(hub, caller, stored, options, None, "Instance", instance, "thumbnail")


# --------------------------------------------------------------------------- STOW-RS

FAILURE_PROCESSING: Final = 0x0110
"""PS3.18 STOW-RS FailureReason: processing failure (a part that is not DICOM at all)."""
FAILURE_STUDY_MISMATCH: Final = 0xA900
"""The instance's Study Instance UID is not the one in the request URL (PS3.18 10.5.3.2
lets the origin server refuse it; 0xA900 as dcm4chee and Orthanc answer)."""


@dataclass
class _Part:
    """One spooled part of a STOW-RS request."""

    path: Path
    content_type: str = ""


class _Spool:
    """Parses a multipart/related body as it arrives, each part into a private temp file."""

    def __init__(self, boundary: str, spool_dir: Path) -> None:
        self.parts: list[_Part] = []
        self._dir = spool_dir
        self._file: io.BufferedWriter | None = None
        self._field = b""
        self._value = b""
        self._headers: dict[str, str] = {}
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._begin,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
        }
        self._parser = MultipartParser(boundary, callbacks)

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def finish(self) -> None:
        self._parser.finalize()

    def _begin(self) -> None:
        self._headers = {}
        fd, name = tempfile.mkstemp(dir=self._dir, prefix="stow-", suffix=".dcm")
        self._file = os.fdopen(fd, "wb")
        self.parts.append(_Part(Path(name)))

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        self.parts[-1].content_type = self._headers.get("content-type", "")

    def _data(self, data: bytes, start: int, end: int) -> None:
        assert self._file is not None
        self._file.write(data[start:end])

    def _end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def cleanup(self) -> None:
        self._end()
        for part in self.parts:
            part.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class _StowResult:
    referenced: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    stored_in: dict[str, int]
    """Study primary key -> instances stored or already held."""


def _sop_item(sop_class: str | None, sop_instance: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    return item


def _store_parts(
    hub: Hub, caller: Principal, parts: list[_Part], study_uid: str | None, base: str
) -> _StowResult:
    """Ingest every part; what ingest committed is referenced, the rest is failed."""
    assert caller.clinic_id is not None
    sender = Sender(caller.clinic_id, f"stow:{caller.name}@{caller.address}"[:80])
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    stored_in: dict[str, int] = {}
    for part in parts:
        media_type, _ = _split_params(part.content_type or "application/dicom")
        if media_type != "application/dicom":
            failed.append({"00081197": {"vr": "US", "Value": [FAILURE_PROCESSING]}})
            continue
        try:
            head = dcmread(
                part.path,
                stop_before_pixels=True,
                specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"],
            )
            sop_class = str(head.get("SOPClassUID", "")) or None
            sop_instance = str(head.get("SOPInstanceUID", "")) or None
            part_study = str(head.get("StudyInstanceUID", ""))
        except (InvalidDicomError, OSError, ValueError, EOFError):
            sop_class = sop_instance = None
            part_study = ""
        if study_uid is not None and sop_instance and part_study != study_uid:
            failed.append(
                {
                    **_sop_item(sop_class, sop_instance),
                    "00081197": {"vr": "US", "Value": [FAILURE_STUDY_MISMATCH]},
                }
            )
            continue
        try:
            result = ingest_part10(hub, part.path, sender)
        except IngestError as exc:
            log.info("STOW-RS part refused (%s): %s", sop_instance, exc.message)
            failed.append(
                {
                    **_sop_item(sop_class, sop_instance),
                    "00081197": {"vr": "US", "Value": [exc.status]},
                }
            )
            continue
        with hub.sessions() as session:
            row = session.execute(
                select(Series.series_instance_uid, Series.study_pk, Instance.sop_class_uid)
                .join(Instance, Instance.series_pk == Series.id)
                .where(Instance.id == result.instance_id)
            ).one()
        series_uid, study_pk, committed_class = row
        stored_in[study_pk] = stored_in.get(study_pk, 0) + 1
        referenced.append(
            {
                **_sop_item(committed_class, result.sop_instance_uid),
                "00081190": {
                    "vr": "UR",
                    "Value": [
                        f"{base}/studies/{result.study_instance_uid}/series/{series_uid}"
                        f"/instances/{result.sop_instance_uid}"
                    ],
                },
            }
        )
    return _StowResult(referenced, failed, stored_in)


def _stow_boundary(request: Request) -> str:
    media_type, params = _split_params(request.headers.get("content-type", ""))
    if media_type != "multipart/related":
        raise HTTPException(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        raise HTTPException(
            415, f"parts of type {part_type[:64]} are not supported; send application/dicom"
        )
    boundary = params.get("boundary")
    if not boundary:
        raise HTTPException(400, "multipart/related needs a boundary parameter")
    return boundary


async def _stow(request: Request, hub: Hub, caller: Principal, study_uid: str | None) -> Response:
    if caller.clinic_id is None or caller.kind not in tenancy.CLINIC_KINDS:
        _audit(
            hub,
            "create",
            caller,
            "Study",
            study_uid,
            outcome=audit.MINOR_FAILURE,
            detail="STOW-RS refused: the caller stores for no clinic",
        )
        raise HTTPException(403, "only a clinic's users and systems can store studies")
    boundary = _stow_boundary(request)
    limit = hub.settings.stow_max_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the request is larger than {limit} bytes")
    spool_dir = hub.settings.spool_dir
    spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    spool = _Spool(boundary, spool_dir)
    try:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise HTTPException(413, f"the request is larger than {limit} bytes")
            try:
                spool.write(chunk)
            except MultipartParseError as exc:
                raise HTTPException(400, f"malformed multipart body: {exc}") from None
        spool.finish()
        if not spool.parts:
            raise HTTPException(400, "the request holds no parts")
        base = _base_url(request)
        result = await run_in_threadpool(_store_parts, hub, caller, spool.parts, study_uid, base)
    finally:
        spool.cleanup()
    body: dict[str, Any] = {}
    if study_uid is not None:
        body["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study_uid}"]}
    if result.failed:
        body["00081198"] = {"vr": "SQ", "Value": result.failed}
    if result.referenced:
        body["00081199"] = {"vr": "SQ", "Value": result.referenced}
    with hub.sessions() as session:
        studies = {
            s.id: s
            for s in session.scalars(select(Study).where(Study.id.in_(list(result.stored_in))))
        }
    for study_pk, count in result.stored_in.items():
        _audit(
            hub,
            "create",
            caller,
            "Study",
            study_pk,
            study=studies[study_pk],
            detail=f"STOW-RS: {count} instance(s) stored",
        )
    if result.failed:
        _audit(
            hub,
            "create",
            caller,
            "Study",
            study_uid,
            outcome=audit.MINOR_FAILURE,
            detail=f"STOW-RS: {len(result.failed)} instance(s) refused",
        )
    status = 200 if not result.failed else 202 if result.referenced else 409
    return Response(
        json.dumps(body).encode(),
        status_code=status,
        media_type=DICOM_JSON,
        headers={"Cache-Control": CACHE_CONTROL},
    )


@router.post("/studies")
async def store_instances(request: Request, caller: Create, hub: HubDep) -> Response:
    """STOW-RS: store instances (multipart/related; type="application/dicom")."""
    return await _stow(request, hub, caller, None)


@router.post("/studies/{study}")
async def store_study_instances(
    study: str, request: Request, caller: Create, hub: HubDep
) -> Response:
    """STOW-RS: store instances of one study (others in the request are refused)."""
    return await _stow(request, hub, caller, study)


# --------------------------------------------------------------------------- CORS


class DicomwebCORS:
    """CORS for /dicomweb only (OHIF and other browser viewers), other paths untouched."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self._app = app
        self._cors = CORSMiddleware(
            app,
            allow_origins=list(origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            expose_headers=["Content-Type", "Content-Encoding", "Warning"],
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] == "http" and (path == PREFIX or path.startswith(PREFIX + "/")):
            await self._cors(scope, receive, send)
        else:
            await self._app(scope, receive, send)


def cors_origins(setting: str) -> list[str]:
    """The origins of SAF_CORS_ORIGINS (comma-separated; empty for none)."""
    return [o.strip().rstrip("/") for o in setting.split(",") if o.strip()]
