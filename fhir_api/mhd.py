"""Documents: FHIR Binary (create, read) and the IHE MHD Document Recipient checks.

Binary bytes go through saf.documents (sealed like DICOM, into the blob store, never the
database). ``POST /fhir/Binary`` takes either raw bytes with any Content-Type (kept as
``Binary.contentType``) or a FHIR JSON Binary with base64 ``data``. ``GET
/fhir/Binary/<id>`` answers the identical bytes with the original Content-Type, unless
the caller asks for FHIR (``Accept: application/fhir+json`` or ``_format=json``): then a
JSON Binary with base64 ``data``.

MHD (ITI-65 Provide Document Bundle, ITI-67 Find, ITI-68 Retrieve): a Provide Document
Bundle is a transaction Bundle (fhir_api.bundles) whose SubmissionSet List and
DocumentReferences declare the MHD profiles in ``meta.profile``. `check_mhd` refuses
what the declared profile requires and the resource lacks, with an OperationOutcome
naming each element. The requirements (MHD 4.2, R4), as chosen here:

- Minimal DocumentReference: ``masterIdentifier``, ``status``,
  ``content.attachment.contentType`` and ``.url``.
- Comprehensive (including UnContained) DocumentReference, in addition: ``subject``,
  ``type``, ``category``, ``date``, ``securityLabel``, ``content.attachment.creation``,
  ``content.format``, ``context.facilityType`` and ``context.practiceSetting``.
- Minimal SubmissionSet List: ``extension`` ihe-sourceId, ``identifier``, ``status``
  ``current``, ``mode`` ``working``, ``code`` ``submissionset``.
- Comprehensive SubmissionSet, in addition: ``subject``, ``date``, and the
  ihe-designationType extension.

``hash`` and ``size`` of each attachment are checked against the bytes by
saf.fhir_store (422 naming ``DocumentReference.content[i].attachment.hash``). ITI-67 is
``DocumentReference?patient=…&status=current`` with ``date``, ``type``, ``category``,
``identifier``; ITI-68 is the Binary read above.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any, Final

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from fhir_api.outcome import FHIR_JSON, FhirError, FhirRoute, fhir_json, issue
from fhir_api.resources import parse, read_body, rules_of
from saf import audit, documents, fhir_store
from saf.deps import CurrentPrincipal, HubDep, bearer_token, require_scope
from saf.hub import Hub

router = APIRouter(tags=["fhir"], route_class=FhirRoute)

MHD: Final = "https://profiles.ihe.net/ITI/MHD/StructureDefinition/"
"""Canonical base of the MHD profiles."""

SOURCE_ID: Final = MHD.replace("StructureDefinition/", "StructureDefinition/ihe-sourceId")
DESIGNATION_TYPE: Final = MHD + "ihe-designationType"

_FHIR_KINDS: Final = ("application/fhir+json", "application/json")


def _profiles(resource: dict[str, Any]) -> set[str]:
    meta = resource.get("meta") or {}
    return {p for p in meta.get("profile") or [] if isinstance(p, str)}


def _level(resource: dict[str, Any], kind: str) -> str | None:
    """ "comprehensive", "minimal" or None: which MHD profile `resource` declares."""
    declared = _profiles(resource)
    if any(p.startswith(MHD) and "Comprehensive" in p and kind in p for p in declared):
        return "comprehensive"
    if any(p.startswith(MHD) and "Minimal" in p and kind in p for p in declared):
        return "minimal"
    return None


def _missing(resource: dict[str, Any], path: str) -> bool:
    """Whether the dotted `path` (lists: every item) is absent or empty in `resource`."""
    values: list[Any] = [resource]
    for part in path.split("."):
        found = []
        for value in values:
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, dict) and item.get(part) not in (None, "", [], {}):
                    found.append(item[part])
        if not found:
            return True
        values = found
    return False


DOCUMENT_MINIMAL: Final = (
    "masterIdentifier",
    "status",
    "content.attachment.contentType",
    "content.attachment.url",
)
DOCUMENT_COMPREHENSIVE: Final = (
    "subject",
    "type",
    "category",
    "date",
    "securityLabel",
    "content.attachment.creation",
    "content.format",
    "context.facilityType",
    "context.practiceSetting",
)
LIST_MINIMAL: Final = ("identifier", "status", "mode", "code")
LIST_COMPREHENSIVE: Final = ("subject", "date")


def _has_extension(resource: dict[str, Any], url: str) -> bool:
    return any(isinstance(e, dict) and e.get("url") == url for e in resource.get("extension") or [])


def check_mhd(resource: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The issues (empty when none) of a DocumentReference or List that declares an MHD
    profile; `where` prefixes each location (``Bundle.entry[2].resource``)."""
    resource_type = resource.get("resourceType")
    problems: list[dict[str, Any]] = []

    def need(paths: tuple[str, ...], level: str) -> None:
        for path in paths:
            if _missing(resource, path):
                problems.append(
                    issue(
                        "required",
                        f"MHD {level} {resource_type} requires {path}",
                        [f"{where}.{path}" if where else f"{resource_type}.{path}"],
                    )
                )

    if resource_type == "DocumentReference":
        level = _level(resource, "DocumentReference")
        if level is None:
            return []
        need(DOCUMENT_MINIMAL, level)
        if level == "comprehensive":
            need(DOCUMENT_COMPREHENSIVE, level)
    elif resource_type == "List":
        level = _level(resource, "SubmissionSet")
        if level is None:
            return []
        need(LIST_MINIMAL, level)
        prefix = where or "List"
        if not _has_extension(resource, SOURCE_ID):
            problems.append(
                issue(
                    "required",
                    "a SubmissionSet needs the ihe-sourceId extension",
                    [f"{prefix}.extension"],
                )
            )
        codes = {c.get("code") for c in (resource.get("code") or {}).get("coding") or []}
        if "submissionset" not in codes:
            problems.append(
                issue("value", "a SubmissionSet's code is submissionset", [f"{prefix}.code"])
            )
        if resource.get("mode") not in (None, "working"):
            problems.append(issue("value", "a SubmissionSet's mode is working", [f"{prefix}.mode"]))
        if level == "comprehensive":
            need(LIST_COMPREHENSIVE, level)
            if not _has_extension(resource, DESIGNATION_TYPE):
                problems.append(
                    issue(
                        "required",
                        "a Comprehensive SubmissionSet needs the ihe-designationType extension",
                        [f"{prefix}.extension"],
                    )
                )
    return problems


def binary_from_json(content: dict[str, Any], where: str = "Binary") -> tuple[str, bytes]:
    """(contentType, bytes) of a FHIR JSON Binary; FhirError naming ``data`` otherwise."""
    data = content.get("data")
    if not isinstance(data, str):
        raise FhirError(
            400, "a Binary needs its bytes in data (base64)", expression=[f"{where}.data"]
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise FhirError(400, "data is not base64", expression=[f"{where}.data"]) from None
    return str(content["contentType"]), raw


def store_bytes(hub: Hub, data: bytes) -> documents.Sealed:
    """Seal `data` into the blob store; a store that cannot take it is a 503 (retry later),
    never a 500 and never an acknowledgement."""
    return store_many(hub, [data])[0]


def store_many(hub: Hub, datas: Sequence[bytes]) -> list[documents.Sealed]:
    """`store_bytes` for many documents, durable together (saf.documents.put_many)."""
    try:
        if len(datas) == 1:
            return [documents.put(hub, datas[0])]
        return documents.put_many(hub, datas)
    except OSError as exc:
        raise FhirError(
            503, f"cannot write to the blob store: {exc.strerror or exc}", code="transient"
        ) from None


def _wants_fhir(request: Request) -> bool:
    wanted = request.query_params.get("_format") or request.headers.get("accept") or ""
    kinds = [part.split(";")[0].strip().lower() for part in wanted.split(",")]
    return any(k in (*_FHIR_KINDS, "json") for k in kinds)


def _binary_json(stored: fhir_store.Stored, data: bytes | None) -> dict[str, Any]:
    body = dict(stored.content or {})
    if data is not None:
        body["data"] = base64.b64encode(data).decode("ascii")
    return body


def _location(hub: Hub, request: Request, stored: fhir_store.Stored) -> str:
    root = hub.settings.public_url or f"{request.url.scheme}://{request.url.netloc}"
    return f"{root.rstrip('/')}/fhir/Binary/{stored.id}/_history/{stored.version_id}"


@router.post("/Binary")
async def create_binary(request: Request, principal: CurrentPrincipal, hub: HubDep) -> Response:
    """Create a Binary from raw bytes (any Content-Type) or FHIR JSON with base64 data."""
    require_scope("Binary", "c")(principal, request, hub)
    body = await read_body(request, hub.settings.fhir_max_body_bytes)
    kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if kind in _FHIR_KINDS:
        resource = parse(body, "Binary")
        content_type, data = binary_from_json(resource)
        resource.pop("data", None)
    else:
        if not kind:
            raise FhirError(415, "a Binary needs a Content-Type (the document's media type)")
        content_type = request.headers["content-type"].strip()
        data = body
        resource = {"resourceType": "Binary", "contentType": content_type}

    def store() -> Response:  # on a worker thread: sealing, fsync and the index write
        sealed = store_bytes(hub, data)
        try:
            stored = fhir_store.create(
                hub, principal, resource, rules_of(request, hub), document=sealed
            )
        except fhir_store.StoreError as exc:
            audit.record_access(
                hub,
                "create",
                principal,
                "Binary",
                None,
                outcome=audit.MINOR_FAILURE,
                detail=f"refused: {exc.code}",
            )
            raise
        audit.record_access(
            hub,
            "create",
            principal,
            "Binary",
            stored.id,
            owner=stored,
            detail=f"{len(data)} bytes",
        )
        headers = {"ETag": f'W/"{stored.version_id}"', "Location": _location(hub, request, stored)}
        return fhir_json(_binary_json(stored, None), 201, headers)

    return await run_in_threadpool(store)


@router.get("/Binary/{binary_id}")
def read_binary(
    binary_id: str, request: Request, principal: CurrentPrincipal, hub: HubDep
) -> Response:
    """ITI-68: the identical bytes with their Content-Type (or FHIR JSON when asked for)."""
    require_scope("Binary", "r")(principal, request, hub)
    try:
        stored, content_type, data = fhir_store.read_binary(hub, principal, binary_id)
    except fhir_store.StoreError as exc:
        audit.record_access(
            hub,
            "read",
            principal,
            "Binary",
            binary_id,
            outcome=audit.MINOR_FAILURE,
            detail=f"refused: {exc.code}",
        )
        raise
    audit.record_access(
        hub, "read", principal, "Binary", binary_id, owner=stored, detail=f"{len(data)} bytes"
    )
    headers = {"ETag": f'W/"{stored.version_id}"'}
    if _wants_fhir(request):
        return fhir_json(_binary_json(stored, data), 200, headers)
    media_type, shown = _served_as(content_type, from_browser=bearer_token(request) is None)
    headers.update(shown)
    return Response(data, 200, headers=headers, media_type=media_type)


DISPLAYED_INLINE: Final = frozenset(
    {"application/pdf", "image/png", "image/jpeg", "image/gif", "image/webp"}
)
"""Document types a browser may show in place: they run no script in our origin (Chromium's
PDF viewer is its own sandboxed extension). SVG is not among them: it can carry script."""


def _served_as(content_type: str, *, from_browser: bool) -> tuple[str, dict[str, str]]:
    """The media type and headers a document's bytes go out with. A clinic may upload any
    Content-Type, and its bytes come from our origin: served as it is, an HTML document
    (or a script another upload loads with ``<script src>``, which ``script-src 'self'``
    would allow) would run with the reader's session. So only `DISPLAYED_INLINE` types are
    shown in place (PDFs may be framed by our own case page); anything else is a download
    in a sandbox, and to a browser session (the cookie) it is plain octet-stream, which
    ``nosniff`` forbids as script or style. API clients with a bearer token get the stored
    Content-Type (ITI-68: the document as it was provided)."""
    kind = content_type.split(";")[0].strip().lower()
    if kind in DISPLAYED_INLINE:
        headers = {"Content-Disposition": "inline"}
        if kind == "application/pdf":
            headers["Content-Security-Policy"] = "frame-ancestors 'self'"
            headers["X-Frame-Options"] = "SAMEORIGIN"
        return content_type, headers
    headers = {
        "Content-Disposition": "attachment",
        "Content-Security-Policy": "sandbox; default-src 'none'; frame-ancestors 'none'",
    }
    return ("application/octet-stream" if from_browser else content_type), headers


__all__ = ["FHIR_JSON", "router"]
