"""Forwarding transports: send stored instances as they are, by C-STORE (dicom_node.scu) to
a DICOM AE (over DICOM TLS for dicoms://, see dicom_node.tls.forward_context) or by STOW-RS
(multipart/related over httpx) to a DICOMweb service.

Each returns a saf.forwarding.SendOutcome: which instances the destination acknowledged,
why the others were not, and whether the destination could not be reached at all.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from functools import partial

import httpx

from dicom_node import scu
from dicom_node.tls import TLSConfigError, forward_context
from saf.forwarding import Destination, OutgoingFile, SendOutcome, Transport
from saf.settings import Settings

log = logging.getLogger(__name__)

STOW_BATCH_FILES = 50
"""Instances per STOW-RS request (several requests for a large study)."""

STOW_BATCH_BYTES = 256 << 20
"""Bytes per STOW-RS request, so a proxy's body limit is less likely to bite."""

STOW_TIMEOUT = httpx.Timeout(30.0, read=300.0)
"""Connect quickly or call the destination down; let a slow archive take its time to store."""

_UNREACHABLE = ("no association", "association rejected")


def make_transport(calling_aet: str, settings: Settings | None = None) -> Transport:
    """The transport saf worker uses: C-STORE from `calling_aet`, or STOW-RS; `settings`
    give dicoms:// destinations their CA and client certificate (None: system roots)."""
    return partial(send, calling_aet=calling_aet, settings=settings)


def send(
    destination: Destination,
    files: list[OutgoingFile],
    token: str | None,
    *,
    calling_aet: str,
    client: httpx.Client | None = None,
    settings: Settings | None = None,
) -> SendOutcome:
    """Send `files` to `destination`; never raises for the destination's failures."""
    if destination.kind == "dicom":
        return send_c_store(destination, files, calling_aet=calling_aet, settings=settings)
    return send_stow(destination, files, token, client=client)


def send_c_store(
    destination: Destination,
    files: list[OutgoingFile],
    *,
    calling_aet: str,
    settings: Settings | None = None,
) -> SendOutcome:
    """C-STORE the files as stored (one presentation context per class and syntax); over
    TLS for a dicoms:// destination."""
    by_path = {f.path: f for f in files}
    tls = None
    if destination.tls:
        try:
            tls = forward_context(settings, destination.tls_sha256)
        except TLSConfigError as exc:  # the operator's files: every instance waits for a fix
            return SendOutcome(errors={f.instance_id: f"TLS set-up: {exc}"[:256] for f in files})
    items = [scu.SendItem(f.path, f.sop_class_uid, f.transfer_syntax_uid) for f in files]
    report = scu.send(
        items,
        destination.host,
        destination.port,
        calling_aet=calling_aet,
        called_aet=destination.ae_title,
        tls=tls,
    )
    outcome = SendOutcome(acked={by_path[p].instance_id for p in report.sent})
    for path, reason in report.failed:
        outcome.errors[by_path[path].instance_id] = f"{by_path[path].sop_instance_uid}: {reason}"
    outcome.unreachable = not report.sent and any(
        reason.startswith(_UNREACHABLE) for _, reason in report.failed
    )
    return outcome


def _batches(files: list[OutgoingFile]) -> Iterator[list[OutgoingFile]]:
    batch: list[OutgoingFile] = []
    size = 0
    for f in files:
        n = f.path.stat().st_size
        if batch and (len(batch) >= STOW_BATCH_FILES or size + n > STOW_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += n
    if batch:
        yield batch


def _body(batch: list[OutgoingFile], boundary: str) -> Iterator[bytes]:
    """The multipart/related body, streamed from the files (memory stays flat)."""
    for f in batch:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        with f.path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def send_stow(
    destination: Destination,
    files: list[OutgoingFile],
    token: str | None,
    *,
    client: httpx.Client | None = None,
) -> SendOutcome:
    """STOW-RS the files to <base>/studies, in batches; per-instance failures come from the
    response's FailedSOPSequence (PS3.18 10.5.3): 200 all stored, 202 some, 409 none."""
    outcome = SendOutcome()
    own = client is None
    http = client or httpx.Client(timeout=STOW_TIMEOUT)
    headers = {"Accept": "application/dicom+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        for batch in _batches(files):
            boundary = secrets.token_hex(16)
            content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
            try:
                rsp = http.post(
                    f"{destination.url}/studies",
                    content=_body(batch, boundary),
                    headers={**headers, "Content-Type": content_type},
                )
            except httpx.TransportError as exc:
                reason = (
                    f"no connection to {destination.host}:{destination.port} ({type(exc).__name__})"
                )
                for f in batch:
                    outcome.errors[f.instance_id] = reason
                outcome.unreachable = not outcome.acked
                break  # the rest would fail the same way
            _read_stow_response(rsp, batch, outcome)
    finally:
        if own:
            http.close()
    return outcome


def _read_stow_response(
    rsp: httpx.Response, batch: list[OutgoingFile], outcome: SendOutcome
) -> None:
    by_uid = {f.sop_instance_uid: f for f in batch}
    failed: dict[str, str] = {}
    if rsp.status_code in (200, 202, 409):
        try:
            doc = rsp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = {}
        items = (doc.get("00081198") or {}).get("Value") or [] if isinstance(doc, dict) else []
        for item in items:
            uid = ((item.get("00081155") or {}).get("Value") or [""])[0]
            reason = ((item.get("00081197") or {}).get("Value") or [None])[0]
            if uid in by_uid:
                code = f"0x{int(reason):04X}" if isinstance(reason, int) else "unknown reason"
                failed[uid] = f"{uid}: STOW failure {code}"
    if rsp.status_code == 200 or (rsp.status_code == 202 and failed):
        for f in batch:
            if f.sop_instance_uid in failed:
                outcome.errors[f.instance_id] = failed[f.sop_instance_uid]
            else:
                outcome.acked.add(f.instance_id)
        return
    # 409 without details, 202 that names no failure we can place, 4xx/5xx: none stored
    # as far as we can tell, so all are sent again (a PACS stores the same UIDs once).
    for f in batch:
        outcome.errors[f.instance_id] = failed.get(
            f.sop_instance_uid, f"{f.sop_instance_uid}: HTTP {rsp.status_code} from STOW-RS"
        )
