"""Storage Commitment Push Model SCP (PS3.4 Annex J): N-ACTION in, N-EVENT-REPORT out.

The hub commits to an instance only when it is durably stored (its index row is
committed, which ingest does after the blob is written) AND its blob decrypts and
authenticates now (every chunk through saf.vault.read). Unknown instances, or ones
of another clinic (tenancy: they do not exist for this peer), fail with 0x0112 (no
such object instance); a blob that fails verification with 0x0110 (processing
failure); a SOP class that does not match the stored one with 0x0119. Commitment is
logged, not audited: it verifies stored bytes and discloses nothing.

The N-ACTION is answered at once; the verification runs in a thread and the result
(event type 1: all committed, 2: some failed) goes back on the same association if
the requester kept it open, otherwise on a new association to the peer's registered
host and port (`saf clinic add ... --port`), proposing the SCP role for the Storage
Commitment SOP class as PS3.4 J.3.3 asks. A peer without a port then gets nothing
and must ask again (logged).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import N_ACTION_RSP
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)
from sqlalchemy.orm import joinedload

from saf import vault
from saf.clinics import PeerAccess
from saf.crypto import IntegrityError
from saf.models import DicomPeer, Instance
from saf.tenancy import visible_instances

if TYPE_CHECKING:
    from dicom_node.scp import DicomNode

log = logging.getLogger(__name__)

PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
INVALID_ARGUMENT = 0x0115
NO_SUCH_ACTION = 0x0123
NOT_AUTHORISED = 0x0124

REQUEST_COMMITMENT = 1
"""The one Action Type ID of the Push Model."""

ALL_COMMITTED, SOME_FAILED = 1, 2
"""N-EVENT-REPORT Event Type IDs."""

RESPONSE_WAIT_SECONDS = 10.0
"""How long the report waits for the N-ACTION response to leave first."""

RESPONSE_SETTLE_SECONDS = 0.05
"""Pause between pynetdicom announcing the N-ACTION response and the report."""


@dataclass(frozen=True)
class Reference:
    """One instance the requester asks the hub to commit to."""

    sop_class_uid: str
    sop_instance_uid: str


class StorageCommitment:
    """The Storage Commitment Push Model SCP of one DicomNode."""

    def __init__(self, node: DicomNode) -> None:
        self.node = node
        self.hub = node.hub

    def handlers(self) -> list[tuple[Any, Any]]:
        """pynetdicom (event, handler) pairs to bind on the node's servers."""
        return [(evt.EVT_N_ACTION, self.on_action)]

    def on_action(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        """Accept a commitment request and verify it in the background."""
        access = self.node.access_of(event.assoc)
        request = event.request
        assert isinstance(request, N_ACTION)
        if access is None or not access.may("store"):
            return NOT_AUTHORISED, None
        if request.ActionTypeID != REQUEST_COMMITMENT:
            return NO_SUCH_ACTION, None
        try:
            info = event.action_information
            transaction_uid = str(info.TransactionUID)
            refs = [
                Reference(str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
                for item in info.ReferencedSOPSequence
            ]
        except (AttributeError, ValueError, TypeError):
            return INVALID_ARGUMENT, None
        sent = threading.Event()

        def response_sent(e: evt.Event) -> None:
            if isinstance(e.message, N_ACTION_RSP):
                sent.set()

        event.assoc.bind(evt.EVT_DIMSE_SENT, response_sent)
        worker = threading.Thread(
            target=self._commit,
            args=(event.assoc, access, transaction_uid, refs, sent, response_sent),
            name="saf-commitment",
            daemon=True,
        )
        worker.start()
        return 0x0000, None

    def verify(
        self, access: PeerAccess, refs: list[Reference]
    ) -> tuple[list[Reference], list[tuple[Reference, int]]]:
        """Split `refs` into committed ones and (failed one, Failure Reason)."""
        committed: list[Reference] = []
        failed: list[tuple[Reference, int]] = []
        for ref in refs:
            with self.hub.sessions() as session:
                versions = session.scalars(
                    visible_instances(access.principal)
                    .options(joinedload(Instance.blob))
                    .where(Instance.sop_instance_uid == ref.sop_instance_uid)
                    .order_by(Instance.version.desc())
                ).all()
                newest = versions[0] if versions else None
                if newest is None:
                    failed.append((ref, NO_SUCH_OBJECT_INSTANCE))
                    continue
                if newest.sop_class_uid != ref.sop_class_uid:
                    failed.append((ref, CLASS_INSTANCE_CONFLICT))
                    continue
                try:
                    for _ in vault.read(self.hub, newest.blob):
                        pass
                except (IntegrityError, OSError, ValueError, KeyError):
                    log.error(
                        "storage commitment: instance %s (blob %s) failed verification",
                        ref.sop_instance_uid,
                        newest.blob_id,
                    )
                    failed.append((ref, PROCESSING_FAILURE))
                    continue
            committed.append(ref)
        return committed, failed

    def _commit(
        self,
        assoc: Association,
        access: PeerAccess,
        transaction_uid: str,
        refs: list[Reference],
        sent: threading.Event,
        hook: Any,
    ) -> None:
        try:
            committed, failed = self.verify(access, refs)
            report = _report(transaction_uid, committed, failed)
            event_type = SOME_FAILED if failed else ALL_COMMITTED
            log.info(
                "storage commitment %s from %s: committed=%d failed=%d",
                transaction_uid, access.principal.name, len(committed), len(failed),
            )  # fmt: skip
            sent.wait(RESPONSE_WAIT_SECONDS)
            # EVT_DIMSE_SENT fires just before the response is queued: let it leave.
            time.sleep(RESPONSE_SETTLE_SECONDS)
            with contextlib.suppress(Exception):  # the association may be gone already
                assoc.unbind(evt.EVT_DIMSE_SENT, hook)
            if assoc.is_established and _send(assoc, report, event_type):
                return
            self._send_new(access, report, event_type)
        except Exception:
            log.exception("storage commitment %s failed", transaction_uid)

    def _send_new(self, access: PeerAccess, report: Dataset, event_type: int) -> None:
        """Report on a new association to the requester's registered host and port."""
        with self.hub.sessions() as session:
            peer = session.get(DicomPeer, access.principal.id)
            host = (peer.host if peer else "") or access.principal.address
            port = peer.port if peer else None
        if not port or not host:
            log.warning(
                "storage commitment result for %s not delivered: the association is closed "
                "and the peer has no registered port",
                access.principal.name,
            )
            return
        ae = AE(ae_title=self.hub.settings.ae_title)
        ae.add_requested_context(StorageCommitmentPushModel)
        role = build_role(StorageCommitmentPushModel, scp_role=True, scu_role=False)
        assoc = ae.associate(host, port, ae_title=access.principal.name, ext_neg=[role])
        if not assoc.is_established:
            log.warning(
                "storage commitment result for %s not delivered: no association with %s:%d",
                access.principal.name,
                host,
                port,
            )
            return
        try:
            _send(assoc, report, event_type)
        finally:
            assoc.release()


def _report(
    transaction_uid: str, committed: list[Reference], failed: list[tuple[Reference, int]]
) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    if committed:
        ds.ReferencedSOPSequence = Sequence([_item(ref) for ref in committed])
    if failed:
        items = []
        for ref, reason in failed:
            item = _item(ref)
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = Sequence(items)
    return ds


def _item(ref: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    return item


def _send(assoc: Association, report: Dataset, event_type: int) -> bool:
    """N-EVENT-REPORT the result; whether the peer acknowledged it."""
    try:
        status, _ = assoc.send_n_event_report(
            report, event_type, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
        )
    except (RuntimeError, ValueError) as exc:
        log.warning("storage commitment N-EVENT-REPORT not sent: %s", exc)
        return False
    ok = "Status" in status and int(status.Status) == 0x0000
    if not ok:
        log.warning("storage commitment N-EVENT-REPORT answered %s", status.get("Status"))
    return ok
