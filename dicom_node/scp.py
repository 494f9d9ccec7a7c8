"""The DICOM node's service side: association control, C-ECHO and C-STORE over pynetdicom."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.tcp import set_no_delay
from saf.clinics import resolve_peer, unassigned_clinic_id
from saf.hub import Hub
from saf.ingest import IngestError, Sender, ingest_part10

log = logging.getLogger(__name__)

# Received datasets are streamed to a spool file instead of being held in memory,
# so a multi-GB instance never sits whole in RAM.
_config.STORE_RECV_CHUNKED_DATASET = True

PROCESSING_FAILURE = 0x0110
"""Status for an unexpected error while storing (logged with a traceback)."""

SPOOL_SWEEP_SECONDS = 30.0
"""How often the spool is checked for files of aborted transfers."""

SPOOL_GRACE_SECONDS = 30.0
"""Quiet time beyond the network timeout before a spool file counts as abandoned."""


class DicomNode:
    """A running DICOM SCP bound to the hub's storage."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._senders: weakref.WeakKeyDictionary[Association, Sender] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._ingesting: set[Path] = set()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="saf-spool", daemon=True)
        self.ae = self._make_ae()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound, once started."""
        assert self._server is not None, "node not started"
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Listen in background threads (one per association)."""
        settings = self.hub.settings
        _prepare_spool(self.hub)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_no_delay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = self.ae.start_server(
            (settings.dicom_host, settings.dicom_port), block=False, evt_handlers=handlers
        )
        self._sweeper.start()

    def stop(self) -> None:
        """Stop listening and abort open associations."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()

    def sweep_spool(self, now: float | None = None) -> int:
        """Delete spool files of transfers that died mid-way; returns how many.

        pynetdicom leaves the partial file of an aborted C-STORE behind. A live
        transfer writes at least every network timeout (else it is aborted), and
        files being ingested are skipped, so anything quiet for longer is garbage
        (plaintext, never acknowledged).
        """
        cutoff = (
            (now or time.time()) - self.hub.settings.dicom_network_timeout - SPOOL_GRACE_SECONDS
        )
        removed = 0
        with self._lock:
            busy = set(self._ingesting)
        for path in self.hub.settings.spool_dir.iterdir():
            try:
                if path not in busy and path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # finished and removed by pynetdicom meanwhile
        if removed:
            log.info("removed %d spool file(s) left by aborted transfers", removed)
        return removed

    def _sweep_loop(self) -> None:
        while not self._stop.wait(SPOOL_SWEEP_SECONDS):
            try:
                self.sweep_spool()
            except OSError:
                log.exception("spool sweep failed; retrying")

    def _make_ae(self) -> AE:
        settings = self.hub.settings
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_pdu_size = settings.dicom_max_pdu
        ae.maximum_associations = settings.dicom_max_associations
        ae.network_timeout = settings.dicom_network_timeout
        ae.acse_timeout = 30
        ae.dimse_timeout = settings.dicom_network_timeout
        ae.require_called_aet = settings.dicom_require_called_aet
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    def _on_requested(self, event: evt.Event) -> None:
        """Reject unknown calling AE titles before negotiation (A-ASSOCIATE-RJ, reason 3)."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        assert request is not None  # EVT_REQUESTED fires once the A-ASSOCIATE-RQ is in
        calling = str(request.calling_ae_title).strip()
        host = str(assoc.requestor.address)
        try:
            clinic_id = resolve_peer(self.hub, calling, host)
            if clinic_id is None and self.hub.settings.dicom_accept_unknown:
                clinic_id = unassigned_clinic_id(self.hub)
        except Exception:
            log.exception("peer lookup failed for %s@%s", calling, host)
            _reject(assoc, 0x02, 0x01, 0x01)  # transient: try again later
            return
        if clinic_id is None:
            log.warning("rejected association from unknown AE %r at %s", calling, host)
            _reject(assoc, 0x01, 0x01, 0x03)  # permanent: calling AE title not recognised
            return
        with self._lock:
            self._senders[assoc] = Sender(clinic_id, f"dimse:{calling}@{host}")
        _shorten_polling(assoc)

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> Dataset | int:
        with self._lock:
            sender = self._senders.get(event.assoc)
        if sender is None:  # cannot happen: unknown peers were rejected at association
            return _status(PROCESSING_FAILURE, "association has no registered sender")
        request = cast(C_STORE, event.request)
        path = event.dataset_path
        with self._lock:
            self._ingesting.add(path)
        try:
            result = ingest_part10(
                self.hub,
                path,
                sender,
                expected_sop_class_uid=str(request.AffectedSOPClassUID),
                expected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
            )
        except IngestError as exc:
            log.warning(
                "C-STORE %s from %s refused (0x%04X): %s",
                request.AffectedSOPInstanceUID,
                sender.source,
                exc.status,
                exc.message,
            )
            return _status(exc.status, exc.message)
        except Exception:
            log.exception("C-STORE %s failed unexpectedly", request.AffectedSOPInstanceUID)
            return _status(PROCESSING_FAILURE, "internal error while storing; see hub log")
        finally:
            with self._lock:
                self._ingesting.discard(path)
        log.debug("C-STORE %s: %s", result.sop_instance_uid, result.outcome)
        return 0x0000


DUL_POLL_SECONDS = 0.0002
"""How long an association's network thread naps when idle (pynetdicom's default: 1 ms)."""


def _shorten_polling(assoc: Association) -> None:
    """Cut pynetdicom's idle nap so each C-STORE round trip waits less.

    pynetdicom polls its socket and queues; with the default 1 ms nap every request
    and response can sit up to a millisecond, which dominates small-instance ingest.
    `_run_loop_delay` is a private attribute, so stay silent if it ever disappears.
    """
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = DUL_POLL_SECONDS


def _reject(assoc: Association, result: int, source: int, diagnostic: int) -> None:
    """Send A-ASSOCIATE-RJ and wait for it to leave, as pynetdicom's own ACSE does."""
    assoc.acse.send_reject(result, source, diagnostic)
    assoc.kill()


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def _prepare_spool(hub: Hub) -> None:
    """Point temp files at the private spool dir and clear what a crash left there.

    pynetdicom spools received datasets with NamedTemporaryFile in the default temp
    dir; the spool holds plaintext for a moment, so it lives in the 0700 data dir and
    is emptied at start-up (anything there was never acknowledged).
    """
    spool = hub.settings.spool_dir
    for leftover in spool.iterdir():
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    tempfile.tempdir = str(spool)


def describe(node: DicomNode) -> dict[str, Any]:
    """Where the node listens, for start-up messages."""
    host, port = node.address
    return {"ae_title": node.hub.settings.ae_title, "host": host, "port": port}
