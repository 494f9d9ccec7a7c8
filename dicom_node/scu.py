"""The DICOM node's client side: send Part 10 files with C-STORE, as they are (no re-encoding)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt

from dicom_node.tcp import set_no_delay

log = logging.getLogger(__name__)

# Send files from disk as they are, in pieces: no decode/re-encode, flat memory.
_config.STORE_SEND_CHUNKED_DATASET = True

MAX_CONTEXTS = 128
"""Presentation contexts one association may propose (PS3.8)."""


@dataclass(frozen=True)
class SendItem:
    """A file to send and how it is encoded."""

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass
class SendReport:
    """What happened to each file."""

    sent: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


CONNECT_TIMEOUT_S = 10.0
"""Seconds to wait for the TCP connection to a destination."""

ACSE_TIMEOUT_S = 30.0
"""Seconds to wait for the association to be accepted or released."""

DIMSE_TIMEOUT_S = 60.0
"""Seconds to wait for a C-STORE response (a large instance on a slow link takes a while)."""


def find_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under `paths` (files as given, folders recursively, sorted)."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def scan(paths: Iterable[Path], report: SendReport) -> list[SendItem]:
    """Read the File Meta of each file; files that are not DICOM Part 10 are skipped."""
    items = []
    for path in find_files(paths):
        try:
            meta = read_file_meta_info(path)
            items.append(
                SendItem(path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
            )
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            report.skipped.append((path, f"not a DICOM Part 10 file: {exc}"))
    return items


def send(
    items: list[SendItem],
    host: str,
    port: int,
    *,
    calling_aet: str,
    called_aet: str,
    on_done: Callable[[SendItem, int | None], None] | None = None,
    report: SendReport | None = None,
    tls: ssl.SSLContext | None = None,
) -> SendReport:
    """C-STORE every item, as many associations as the contexts need; never raises per file.

    With `tls` (see dicom_node.tls.client_context) the associations run over DICOM TLS,
    and the node's certificate must be valid for `host`.
    """
    report = report or SendReport()
    for batch in _batches(items):
        _send_batch(batch, host, port, calling_aet, called_aet, on_done, report, tls)
    return report


def _batches(items: list[SendItem]) -> Iterator[list[SendItem]]:
    """Group items so that each association needs at most MAX_CONTEXTS contexts."""
    batch: list[SendItem] = []
    keys: set[tuple[str, str]] = set()
    for item in items:
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        if key not in keys and len(keys) == MAX_CONTEXTS:
            yield batch
            batch, keys = [], set()
        keys.add(key)
        batch.append(item)
    if batch:
        yield batch


def _send_batch(
    batch: list[SendItem],
    host: str,
    port: int,
    calling_aet: str,
    called_aet: str,
    on_done: Callable[[SendItem, int | None], None] | None,
    report: SendReport,
    tls: ssl.SSLContext | None,
) -> None:
    ae = AE(ae_title=calling_aet)
    ae.maximum_pdu_size = 0
    # Bounded waits: a destination that drops packets must not hold a sender for minutes.
    ae.connection_timeout = CONNECT_TIMEOUT_S
    ae.acse_timeout = ACSE_TIMEOUT_S
    ae.dimse_timeout = DIMSE_TIMEOUT_S
    ae.network_timeout = DIMSE_TIMEOUT_S
    for sop_class, syntax in sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in batch}):
        # One context per (class, syntax) so each file goes exactly as stored.
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(
        host,
        port,
        ae_title=called_aet,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_no_delay)],
        tls_args=(tls, host) if tls else None,
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            reason = (
                f"association rejected by {called_aet}@{host}:{port} "
                f"(is calling AE title {calling_aet} registered there"
                f"{', with this client certificate' if tls else ''}?)"
            )
        else:
            reason = (
                f"no association with {host}:{port} (refused, unreachable or aborted"
                f"{'; or the TLS handshake failed: check CA, certificate, key' if tls else ''})"
            )
        for item in batch:
            report.failed.append((item.path, reason))
            if on_done:
                on_done(item, None)
        return
    try:
        for item in batch:
            status = _store_one(assoc, item)
            if status is None:
                report.failed.append((item.path, "no response (connection lost)"))
            elif status in (0x0000, 0xB000, 0xB007, 0xB006):
                report.sent.append(item.path)
            else:
                report.failed.append((item.path, f"status 0x{status:04X}"))
            if on_done:
                on_done(item, status)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    done = set(report.sent) | {p for p, _ in report.failed}
    for item in batch:
        if item.path not in done:
            report.failed.append((item.path, "not sent: association ended early"))


def _store_one(assoc: object, item: SendItem) -> int | None:
    try:
        rsp = assoc.send_c_store(item.path)  # type: ignore[attr-defined]
    except (ValueError, RuntimeError) as exc:
        log.warning("cannot send %s: %s", item.path, exc)
        return 0xC000
    if not rsp or "Status" not in rsp:
        return None
    return int(rsp.Status)
