"""Storage Commitment Push Model SCP (PS3.4 Annex J): N-ACTION in, N-EVENT-REPORT out.

What the hub commits to, and the durable report job, are saf.commitment's. Here: the
N-ACTION handler stores the request as a report job (saf.commitment.enqueue) BEFORE it
answers success (a request that cannot be stored is answered 0x0110, so nothing is
acknowledged that a restart would lose); then a thread verifies it and tries to deliver
the report at once: on the same association if the requester kept it open, otherwise on
a new association to the peer's registered host and port (`saf clinic add ... --port`),
proposing the SCP role for the Storage Commitment SOP class as PS3.4 J.3.3 asks. What is
not delivered stays on the forwarding queue and is retried with its backoff by the
forwarding loop (`saf worker`, with :func:`make_report_transport`), across restarts,
until SAF_COMMITMENT_REPORT_MAX_AGE_SECONDS. Commitment is logged, not audited (it
verifies stored bytes and discloses nothing); a dropped report is audited.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import N_ACTION_RSP
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from saf.commitment import (
    PROCESSING_FAILURE,
    Reference,
    Report,
    ReportTransport,
    enqueue,
    run_report_job,
)
from saf.forwarding import Destination

if TYPE_CHECKING:
    from dicom_node.scp import DicomNode

log = logging.getLogger(__name__)

INVALID_ARGUMENT = 0x0115
NO_SUCH_ACTION = 0x0123
NOT_AUTHORISED = 0x0124

REQUEST_COMMITMENT = 1
"""The one Action Type ID of the Push Model."""

RESPONSE_WAIT_SECONDS = 10.0
"""How long the report waits for the N-ACTION response to leave first."""


class StorageCommitment:
    """The Storage Commitment Push Model SCP of one DicomNode."""

    def __init__(self, node: DicomNode) -> None:
        self.node = node
        self.hub = node.hub

    def handlers(self) -> list[tuple[Any, Any]]:
        """pynetdicom (event, handler) pairs to bind on the node's servers."""
        return [(evt.EVT_N_ACTION, self.on_action)]

    def on_action(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        """Store a commitment request durably, then answer it; report in the background."""
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
        try:
            job_id = enqueue(self.hub, access.principal, transaction_uid, refs)
        except Exception:
            log.exception("storage commitment %s from %s: request not stored",
                          transaction_uid, access.principal.name)  # fmt: skip
            return PROCESSING_FAILURE, None
        hooks = _ResponseSent()
        event.assoc.bind(evt.EVT_DIMSE_SENT, hooks.on_message)
        event.assoc.bind(evt.EVT_PDU_SENT, hooks.on_pdu)
        worker = threading.Thread(
            target=self._deliver,
            args=(event.assoc, job_id, hooks),
            name="saf-commitment",
            daemon=True,
        )
        worker.start()
        return 0x0000, None

    def _deliver(self, assoc: Association, job_id: int, hooks: _ResponseSent) -> None:
        """First attempt of a report job, on the requester's association if still open."""
        hooks.sent.wait(RESPONSE_WAIT_SECONDS)
        with contextlib.suppress(Exception):  # the association may be gone already
            assoc.unbind(evt.EVT_DIMSE_SENT, hooks.on_message)
            assoc.unbind(evt.EVT_PDU_SENT, hooks.on_pdu)
        new_association = make_report_transport(self.hub.settings.ae_title)

        def transport(destination: str, report: Report) -> str | None:
            if assoc.is_established and _send(assoc, report) is None:
                return None
            return new_association(destination, report)

        try:
            run_report_job(self.hub, job_id, 1, transport)
        except Exception:
            log.exception("storage commitment job %d: first attempt failed; the "
                          "forwarding loop retries it once its lease ends", job_id)  # fmt: skip


class _ResponseSent:
    """Sets `sent` once the N-ACTION response is on the wire, so that the report on the
    same association follows it.

    pynetdicom announces a message (EVT_DIMSE_SENT) before it queues its PDUs, and lets
    another thread's send_n_event_report() in while the reactor is still in the N-ACTION
    handler (it counts as paused there), so the report could otherwise reach the peer
    first. The N-ACTION response is one P-DATA-TF PDU (a command set, no data set), and
    nothing else is sent between it and the handler's return.
    """

    def __init__(self) -> None:
        self.sent = threading.Event()
        self._announced = False

    def on_message(self, event: evt.Event) -> None:
        if isinstance(event.message, N_ACTION_RSP):
            self._announced = True

    def on_pdu(self, event: evt.Event) -> None:
        if self._announced and isinstance(event.pdu, P_DATA_TF):
            self.sent.set()


def make_report_transport(ae_title: str) -> ReportTransport:
    """The forwarding loop's way to deliver a report: a new association to the requesting
    AE's registered address, proposing the SCP role for Storage Commitment."""

    def deliver(destination: str, report: Report) -> str | None:
        if not destination:
            return "the association is closed and the peer has no registered port"
        target = Destination.parse(destination)
        ae = AE(ae_title=ae_title)
        ae.add_requested_context(StorageCommitmentPushModel)
        role = build_role(StorageCommitmentPushModel, scp_role=True, scu_role=False)
        assoc = ae.associate(target.host, target.port, ae_title=target.ae_title, ext_neg=[role])
        if not assoc.is_established:
            return f"no association with {target.ae_title}@{target.host}:{target.port}"
        try:
            return _send(assoc, report)
        finally:
            assoc.release()

    return deliver


def _report(report: Report) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = report.transaction_uid
    if report.committed:
        ds.ReferencedSOPSequence = Sequence([_item(ref) for ref in report.committed])
    if report.failed:
        items = []
        for ref, reason in report.failed:
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


def _send(assoc: Association, report: Report) -> str | None:
    """N-EVENT-REPORT the result; None when the peer acknowledged it, else why not."""
    try:
        status, _ = assoc.send_n_event_report(
            _report(report), report.event_type, StorageCommitmentPushModel,
            StorageCommitmentPushModelInstance,
        )  # fmt: skip
    except (RuntimeError, ValueError) as exc:
        return f"N-EVENT-REPORT not sent: {exc}"[:200]
    if "Status" not in status:
        return "N-EVENT-REPORT not answered"
    if int(status.Status) != 0x0000:
        return f"N-EVENT-REPORT answered 0x{int(status.Status):04X}"
    return None
