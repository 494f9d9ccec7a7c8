"""The DICOM node's service side: association control, C-ECHO and C-STORE over pynetdicom.

Ports: unencrypted DICOM on SAF_DICOM_PORT (unless SAF_DICOM_PLAIN=false) and DICOM
TLS on SAF_DICOM_TLS_PORT (2762) when SAF_DICOM_TLS_CERT/KEY are set; both serve the
same services with the same peer rules, so a site can move peers to TLS one by one
and then switch the plain port off.

Association control: the calling AE title (+ host, + client certificate on TLS) is
resolved to a peer by saf.clinics.resolve_peer; an unknown or mis-credentialed peer
is rejected (A-ASSOCIATE-RJ "calling AE title not recognised"), and only the
presentation contexts of services the peer is allowed (store, find, move, get; C-ECHO
for any registered peer) are accepted. Every request, accepted or rejected, is
audited (`dicom-association`); instances received are audited once per study at the
end of the association (`dicom-store`, IHE BALP "DICOM Instances Transferred"), not
once per instance, so the audit costs ingest nothing per instance.
"""

from __future__ import annotations

import logging
import shutil
import ssl
import tempfile
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
    uid_to_service_class,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select

from dicom_node import association_setup, cstore_loop, throughput
from dicom_node.commitment import StorageCommitment
from dicom_node.qr import QUERY_RETRIEVE_CONTEXTS, QueryRetrieve, StoredDataset
from dicom_node.tcp import set_no_delay
from dicom_node.tls import peer_cert_der, server_context
from saf import audit
from saf.clinics import PeerAccess, PeerRefused, cert_sha256_of_der, resolve_peer
from saf.hub import Hub
from saf.identity import Principal
from saf.ingest import IngestError, Sender, ingest_part10
from saf.models import Study

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

NOT_AUTHORISED = 0x0124
"""DIMSE status "Refused: Not Authorised" (PS3.7 C.5): the peer lacks the permission."""

STORAGE_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    *(uid for uid in ALL_TRANSFER_SYNTAXES if uid != ExplicitVRLittleEndian),
]
"""Transfer syntaxes of the storage contexts, in the order the node prefers them (the
acceptor's order decides): Explicit VR Little Endian first, so instances stored that way
go back to a C-GET peer that offers it byte for byte, and private VRs are kept."""

_REJECT_REASONS = {
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x01, 0x02): "application context name not supported",
    (0x02, 0x01): "protocol version not supported",
    (0x03, 0x02): "local limit exceeded (too many associations)",
    (0x03, 0x01): "temporary congestion",
}
"""(result source, diagnostic) of an A-ASSOCIATE-RJ, as the audit trail words it."""


def dimse_service(abstract_syntax: str) -> str | None:
    """The permission a presentation context needs: echo, store, find, move, get or None.

    None (an abstract syntax the node has no rule for) is never granted: deny by default.
    """
    uid = UID(abstract_syntax)
    if uid == Verification:
        return "echo"
    if uid == StorageCommitmentPushModel:
        return "store"  # committing to what one stored is part of storing
    if uid_to_service_class(uid) is StorageServiceClass:
        return "store"
    for service in ("find", "move", "get"):
        if uid.name.endswith(f" - {service.upper()}"):
            return service
    return None


@dataclass
class _Association:
    """What the node knows about one accepted association."""

    access: PeerAccess
    sender: Sender
    tls: bool
    studies: Counter[str] = field(default_factory=Counter)
    """Instances stored per Study Instance UID, not yet audited."""
    closed: bool = False


class DicomNode:
    """A running DICOM SCP bound to the hub's storage."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._peers: weakref.WeakKeyDictionary[Association, _Association] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        self._services: dict[str, str | None] = {}
        """Permission each abstract syntax needs (see dimse_service), filled as met."""
        self._ingesting: set[Path] = set()
        self._stop = threading.Event()
        self.query_retrieve = QueryRetrieve(self)
        self.commitment = StorageCommitment(self)
        self._sweeper = threading.Thread(target=self._sweep_loop, name="saf-spool", daemon=True)
        self.ae = self._make_ae()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the unencrypted port actually bound, once started."""
        assert self._server is not None, "node not started, or TLS only"
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def tls_address(self) -> tuple[str, int]:
        """(host, port) of the DICOM TLS port actually bound, once started."""
        assert self._tls_server is not None, "node not started, or no TLS configured"
        host, port = self._tls_server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Listen in background threads (one per association).

        Raises dicom_node.tls.TLSConfigError for an unusable certificate, key or CA
        file, and OSError when a port cannot be bound.
        """
        settings = self.hub.settings
        context = server_context(settings)  # first: a bad file fails before we listen
        _prepare_spool(self.hub)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_no_delay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            *self.query_retrieve.handlers(),
            *self.commitment.handlers(),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_ended),
        ]
        try:
            if settings.dicom_plain:
                self._server = self.ae.start_server(
                    (settings.dicom_host, settings.dicom_port), block=False, evt_handlers=handlers
                )
            if context is not None:
                self._tls_server = self.ae.start_server(
                    (settings.dicom_host, settings.dicom_tls_port),
                    block=False,
                    evt_handlers=handlers,
                    ssl_context=context,
                )
        except OSError:
            self.ae.shutdown()
            raise
        self._sweeper.start()

    def stop(self) -> None:
        """Stop listening and abort open associations."""
        self._stop.set()
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None
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
        throughput.quiet_event_logging()
        throughput.install()
        association_setup.install()
        cstore_loop.install((StoredDataset,))
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_pdu_size = settings.dicom_max_pdu
        ae.maximum_associations = settings.dicom_max_associations
        ae.network_timeout = settings.dicom_network_timeout
        ae.acse_timeout = 30
        ae.dimse_timeout = settings.dicom_network_timeout
        ae.require_called_aet = settings.dicom_require_called_aet
        throughput.pace_pending(ae, settings.dicom_pending_interval)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            # Accept the roles a peer proposes: a C-GET peer asks to be the Storage SCP
            # on these contexts, a modality that sends role selection to be the SCU.
            ae.add_supported_context(
                cx.abstract_syntax, STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
        for uid in QUERY_RETRIEVE_CONTEXTS:
            ae.add_supported_context(uid)
        ae.add_supported_context(StorageCommitmentPushModel)
        return ae

    def access_of(self, assoc: Association) -> PeerAccess | None:
        """The peer an accepted association belongs to (None if it is not one of ours)."""
        with self._lock:
            state = self._peers.get(assoc)
        return state.access if state is not None else None

    def _on_requested(self, event: evt.Event) -> None:
        """Resolve the peer before negotiation; reject it (A-ASSOCIATE-RJ) or narrow the
        presentation contexts to the services it may use."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        assert request is not None  # EVT_REQUESTED fires once the A-ASSOCIATE-RQ is in
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        host = str(assoc.requestor.address)
        sock = getattr(assoc.dul.socket, "socket", None)
        tls = isinstance(sock, ssl.SSLSocket)
        der = peer_cert_der(sock)
        fingerprint = cert_sha256_of_der(der) if der else None
        who = audit.Actor("ae", None, calling, host)
        if self.hub.settings.dicom_require_called_aet and called != self.hub.settings.ae_title:
            # pynetdicom would refuse this too; deciding here keeps one record per request.
            self._refuse(assoc, who, called, tls, "called AE title not recognised", 0x07)
            return
        try:
            access = resolve_peer(self.hub, calling, host, cert_sha256=fingerprint)
        except PeerRefused as exc:
            log.warning("rejected association from AE %r at %s: %s", calling, host, exc.reason)
            self._refuse(assoc, who, called, tls, exc.reason, 0x03, exc.clinic_id)
            return
        except Exception:
            log.exception("peer lookup failed for %s@%s", calling, host)
            _reject(assoc, 0x02, 0x01, 0x01)  # transient: try again later
            return
        allowed = {"echo", *access.permissions}
        if "get" in allowed:
            # C-GET returns instances on the same association as C-STOREs *to* the peer,
            # over storage contexts it proposes; a get-only peer's own C-STOREs are then
            # refused in _on_store (0x0124).
            allowed.add("store")
        assoc.acceptor.supported_contexts = [
            cx for cx in assoc.acceptor.supported_contexts if self._service(cx) in allowed
        ]
        with self._lock:
            self._peers[assoc] = _Association(
                access, Sender(access.clinic_id, f"dimse:{calling}@{host}"), tls
            )
        _shorten_polling(assoc)

    def _service(self, cx: PresentationContext) -> str | None:
        uid = str(cx.abstract_syntax)
        if uid not in self._services:
            self._services[uid] = dimse_service(uid)
        return self._services[uid]

    def _refuse(
        self,
        assoc: Association,
        who: audit.Actor,
        called: str,
        tls: bool,
        reason: str,
        diagnostic: int,
        clinic_id: str | None = None,
    ) -> None:
        """Reject permanently (source: service user) and audit why."""
        _reject(assoc, 0x01, 0x01, diagnostic)
        self._audit_association(who, called, tls, audit.MINOR_FAILURE, reason, clinic_id)

    def _on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            state = self._peers.get(event.assoc)
        if state is None:  # cannot happen: every accepted request went through _on_requested
            return
        request = event.assoc.requestor.primitive
        called = str(request.called_ae_title).strip() if request else ""
        services = sorted(
            {name for cx in event.assoc.accepted_contexts if (name := self._service(cx))}
        )
        detail = (
            f"contexts accepted={len(event.assoc.accepted_contexts)} "
            f"rejected={len(event.assoc.rejected_contexts)} services={','.join(services) or '-'}"
        )
        self._audit_association(
            state.access.principal, called, state.tls, audit.SUCCESS, detail, state.access.clinic_id
        )

    def _on_rejected(self, event: evt.Event) -> None:
        """Audit a rejection pynetdicom made itself (e.g. too many associations)."""
        assoc = event.assoc
        request, reply = assoc.requestor.primitive, assoc.acceptor.primitive
        calling = str(request.calling_ae_title).strip() if request else ""
        called = str(request.called_ae_title).strip() if request else ""
        key = (int(reply.result_source or 0), int(reply.diagnostic or 0)) if reply else (0, 0)
        reason = _REJECT_REASONS.get(key, f"rejected (source, diagnostic) {key}")
        with self._lock:
            state = self._peers.pop(assoc, None)
        who = state.access.principal if state else audit.Actor("ae", None, calling, "")
        tls = isinstance(getattr(assoc.dul.socket, "socket", None), ssl.SSLSocket)
        clinic_id = state.access.clinic_id if state else None
        self._audit_association(who, called, tls, audit.MINOR_FAILURE, reason, clinic_id)

    def _audit_association(
        self,
        who: audit.Actor | Principal,
        called: str,
        tls: bool,
        outcome: int,
        detail: str,
        clinic_id: str | None,
    ) -> None:
        where = f"called={called} " if called else ""
        try:
            audit.record(
                self.hub,
                "dicom-association",
                who,
                outcome=outcome,
                clinic_id=clinic_id,
                detail=f"{where}tls={'yes' if tls else 'no'} {detail}",
            )
        except Exception:
            log.exception("cannot write the audit record of an association from %s", who.address)

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> Dataset | int:
        with self._lock:
            state = self._peers.get(event.assoc)
        if state is None:  # cannot happen: unknown peers were rejected at association
            return _status(PROCESSING_FAILURE, "association has no registered sender")
        if not state.access.may("store"):
            return _status(NOT_AUTHORISED, "this AE title may not store here")
        sender = state.sender
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
        with self._lock:
            state.studies[result.study_instance_uid] += 1
            late = state.closed
        if late:  # the connection dropped while this instance was being stored
            self._audit_stored(state)
        return 0x0000

    def _on_ended(self, event: evt.Event) -> None:
        """Release, abort or a dropped connection: audit what the association stored.

        Several of these events fire for one association (and from two threads); the
        counts are taken under the lock, so each instance is audited exactly once.
        """
        with self._lock:
            state = self._peers.get(event.assoc)
            if state is not None:
                state.closed = True
        if state is not None:
            self._audit_stored(state)
        elif event.event is evt.EVT_CONN_CLOSE and event.assoc.requestor.primitive is None:
            self._audit_failed_tls(event.assoc)

    def _audit_failed_tls(self, assoc: Association) -> None:
        """A TLS connection that ended before any A-ASSOCIATE-RQ: the handshake failed
        (no or an untrusted client certificate, plain DICOM, an old TLS version) or the
        peer went quiet. Audited as a failed association (ATNA: node authentication
        failure); such connections on the plain port are only port probes."""
        server = self._tls_server
        if server is None or assoc.acceptor.port != server.server_address[1]:
            return
        host = str(assoc.requestor.address)
        log.warning("TLS connection from %s closed before an association request", host)
        self._audit_association(
            audit.Actor("ae", None, None, host),
            "",
            True,
            audit.MINOR_FAILURE,
            "no association request: TLS handshake failed or connection dropped",
            None,
        )

    def _audit_stored(self, state: _Association) -> None:
        """One `dicom-store` record per study (BALP "DICOM Instances Transferred")."""
        with self._lock:
            counts = dict(state.studies)
            state.studies.clear()
        if not counts:
            return
        try:
            with self.hub.sessions() as session:
                rows = session.execute(
                    select(Study.study_instance_uid, Study.id, Study.patient_pk).where(
                        Study.clinic_id == state.access.clinic_id,
                        Study.study_instance_uid.in_(list(counts)),
                    )
                ).all()
            studies = {uid: (study_id, patient_pk) for uid, study_id, patient_pk in rows}
            for uid, count in counts.items():
                study_id, patient_pk = studies.get(uid, (None, None))
                audit.record(
                    self.hub,
                    "dicom-store",
                    state.access.principal,
                    entity_type="Study",
                    entity_id=study_id,
                    clinic_id=state.access.clinic_id,
                    patient_pk=patient_pk,
                    detail=f"instances={count} study_instance_uid={uid}",
                )
        except Exception:
            log.exception(
                "cannot write the audit records of studies stored by %s",
                state.access.principal.name,
            )


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
    settings = node.hub.settings
    info: dict[str, Any] = {"ae_title": settings.ae_title}
    if settings.dicom_plain:
        info["host"], info["port"] = node.address
    if settings.dicom_tls:
        info["tls_host"], info["tls_port"] = node.tls_address
        info["mutual_tls"] = settings.dicom_tls_ca is not None
    return info
