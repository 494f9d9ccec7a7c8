"""STOW-RS: store instances through the one ingest path (saf.ingest)."""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser
from sqlalchemy import select

from dicom_node.dicomweb.common import (
    CACHE_CONTROL,
    DICOM_JSON,
    Create,
    _audit,
    _base_url,
    _split_params,
)
from saf import audit, tenancy
from saf.deps import HubDep
from saf.hub import Hub
from saf.identity import Principal
from saf.ingest import IngestError, Sender, ingest_part10
from saf.models import Instance, Series, Study

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger(__name__)

router = APIRouter()

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
