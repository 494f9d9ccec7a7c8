"""Shared by the DICOMweb services: settings, DICOM JSON, audit, tenancy lookups, multipart."""

from __future__ import annotations

import gzip
import json
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final

from fastapi import Depends, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import ColumnElement, exists, select
from sqlalchemy.orm import Session, aliased

from saf import audit, tenancy
from saf.deps import require_scope
from saf.hub import Hub
from saf.identity import Principal
from saf.models import Blob, Instance, Series, Study

PREFIX: Final = "/dicomweb"
DICOM_JSON: Final = "application/dicom+json"
NOT_FOUND: Final = "not found"
"""The one 404 message, for a missing UID and for another tenant's alike."""

GZIP_MIN_BYTES: Final = 1024
"""JSON answers smaller than this are not worth compressing."""

CACHE_CONTROL: Final = "private, no-store"
"""Everything here is PHI: no shared or persistent caching."""

Search = Annotated[Principal, Depends(require_scope("ImagingStudy", "s"))]
Read = Annotated[Principal, Depends(require_scope("ImagingStudy", "r"))]
Create = Annotated[Principal, Depends(require_scope("ImagingStudy", "c"))]

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
    audit.record_access(
        hub, event, caller, entity_type, entity_id, owner=study, outcome=outcome, detail=detail
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


# --------------------------------------------------------------------------- multipart


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
    parts: Iterator[bytes],
    boundary: str,
    part_type: str,
    *,
    status_code: int = 200,
    length: int | None = None,
) -> StreamingResponse:
    """A streamed multipart/related body; with its `length` known up front it is sent
    with a Content-Length (clients can show progress, and the server writes each part as
    it is instead of copying it into a chunk)."""
    headers = {"Cache-Control": CACHE_CONTROL}
    if length is not None:
        headers["Content-Length"] = str(length)
    return StreamingResponse(
        parts,
        status_code=status_code,
        media_type=f'multipart/related; type="{part_type}"; boundary={boundary}',
        headers=headers,
    )
