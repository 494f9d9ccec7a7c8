"""C-STORE sub-operations of a C-GET sent and answered on one thread.

A C-GET sends each instance back as a C-STORE request and waits for the peer's
response before the next one (dcmtk's getscu, like most requesters, does not negotiate
asynchronous operations). Upstream, the request is built as a pynetdicom primitive, then
a pydicom command set (every UID validated), and the response travels from the socket
through the DUL reactor thread: PDU decode, state machine, DIMSE message decode with
pydicom, primitive, queue, and back to the DIMSE thread. For a 200-slice CT that is
two thread hand-offs and several milliseconds of Python per instance, more than the
network and the peer take.

Here `Association.send_c_store` takes a shorter path for the data sets registered with
`install` (the node's `StoredDataset`, whose bytes go out as stored), and for nothing
else: on the calling (DIMSE) thread it encodes the command set and every P-DATA-TF PDU
of the message into one buffer (`dicom_node.throughput`, byte-identical to upstream),
writes it, and reads the C-STORE-RSP from the same socket, parsing its P-DATA-TF PDU(s)
and command set directly.

The hand-over of the socket: the reactor's read (`DULServiceProvider._is_transport_event`)
runs under `throughput.reader_lock`, taken without waiting, so while a DIMSE thread holds
that lock the reactor leaves the socket alone (it still runs its timers and whatever is on
its event queue) and naps with a plain sleep. The DIMSE thread takes the lock only when
the association is established (Sta6) and nothing received is pending anywhere in
pynetdicom (event queue, PDU queue, partial DIMSE message, message queue) and nothing is
queued to send; otherwise the sub-operation goes upstream's way.

Anything but a plain C-STORE-RSP to this request (an A-ABORT or A-RELEASE-RQ, a
C-CANCEL-RQ, a response with an Error Comment or other optional element, a PDU that does
not parse, a closed connection) is handed back: each complete PDU read so far is decoded
and queued exactly as the reactor's own read would have (`_read_pdu_data`), the lock is
released, and the response is awaited upstream's way (`dimse.get_msg`), so pynetdicom's
state machine, C-CANCEL bookkeeping and abort handling see every byte in order. A DIMSE
timeout ends the same way as upstream's (`_handle_no_response`: the association is
aborted).

The fast path is skipped when any handler is bound to the PDU/DIMSE/data sent or
received events (they expect their per-PDU or per-message calls), when the C-STORE
carries Move Originator fields (C-MOVE sub-operations use their own association and go
upstream's way), and when `throughput` is not installed. `install` applies only to the
pynetdicom series it was written against and only when the functions it replaces are
still upstream's own.
"""

from __future__ import annotations

import logging
import select
import ssl
import struct
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import pynetdicom
import pynetdicom.association
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from dicom_node import throughput

log = logging.getLogger(__name__)

_lock = threading.Lock()
_installed = False
_fast_types: tuple[type[Dataset], ...] = ()

_upstream_send_c_store: Callable[..., Dataset] = Association.send_c_store
_upstream_is_transport_event: Callable[[Any], bool] = DULServiceProvider._is_transport_event

_OBSERVED_EVENTS = (
    evt.EVT_PDU_SENT,
    evt.EVT_PDU_RECV,
    evt.EVT_DATA_SENT,
    evt.EVT_DATA_RECV,
    evt.EVT_DIMSE_SENT,
    evt.EVT_DIMSE_RECV,
)
outcomes: Counter[str] = Counter()
"""Sub-operations per path taken ("short", "upstream", "not sent", "handed back",
"timed out"), for tests and debugging."""
_WAIT_SLICE_S = 0.5
"""How often a wait for the response checks that the association is still alive."""


def install(fast_types: tuple[type[Dataset], ...]) -> bool:
    """Send C-STOREs of these data set types (exact types) the short way.

    Needs `throughput.install()` first. Idempotent (the types are replaced); returns
    whether the short path is in use.
    """
    global _installed, _fast_types
    with _lock:
        if _installed:
            _fast_types = fast_types
            return True
        version = str(getattr(pynetdicom, "__version__", ""))
        if not version.startswith(throughput.PYNETDICOM_SERIES):
            log.warning("pynetdicom %s: keeping its own C-STORE path", version)
            return False
        upstream = (
            throughput.install(),
            Association.send_c_store is _upstream_send_c_store,
            DULServiceProvider._is_transport_event is _upstream_is_transport_event,
        )
        if not all(upstream):
            log.warning("pynetdicom's C-STORE path was replaced or is unusual (%s)", upstream)
            return False
        Association.send_c_store = _send_c_store  # type: ignore[method-assign]
        DULServiceProvider._is_transport_event = _is_transport_event  # type: ignore[method-assign]
        _fast_types = fast_types
        _installed = True
        return True


def _is_transport_event(self: DULServiceProvider) -> bool:
    """The reactor's read, unless a DIMSE thread is reading this socket itself."""
    lock = throughput.reader_lock(self)
    if not lock.acquire(blocking=False):
        return False
    try:
        return _upstream_is_transport_event(self)
    finally:
        lock.release()


# ------------------------------------------------------------------ command sets

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_RSP_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x1000})
"""Command elements of a plain C-STORE-RSP (no Error Comment, Offending Element...)."""
_UID_CHARS = frozenset(b"0123456789.")


def _valid_uid(uid: str) -> bool:
    raw = uid.encode("ascii", "replace")
    return 0 < len(raw) <= 64 and _UID_CHARS.issuperset(raw)


def store_request_command(
    sop_class_uid: str, sop_instance_uid: str, msg_id: int, priority: int
) -> bytes | None:
    """A C-STORE-RQ command set as pynetdicom encodes it (with a data set, no Move
    Originator); None for values it would not accept as they are."""
    if not (_valid_uid(sop_class_uid) and _valid_uid(sop_instance_uid)):
        return None
    if not (0 <= msg_id < 0x10000 and priority in (0, 1, 2)):
        return None
    body = throughput.encode_command_elements(
        (
            (0x0002, "UI", sop_class_uid),
            (0x0100, "US", C_STORE_RQ),
            (0x0110, "US", msg_id),
            (0x0700, "US", priority),
            (0x0800, "US", 0x0001),
            (0x1000, "UI", sop_instance_uid),
        )
    )
    if body is None:
        return None
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def store_response_status(command: bytes, msg_id: int) -> int | None:
    """The Status of a plain C-STORE-RSP to `msg_id` (Implicit VR Little Endian); None
    for anything else (another command, another message, optional status elements,
    a data set, a malformed command set)."""
    values: dict[int, bytes] = {}
    at = 0
    while at < len(command):
        if at + 8 > len(command):
            return None
        group, element, length = struct.unpack_from("<HHI", command, at)
        at += 8
        if group != 0 or element not in _RSP_ELEMENTS or at + length > len(command):
            return None
        values[element] = command[at : at + length]
        at += length

    def us(element: int) -> int | None:
        raw = values.get(element)
        return int.from_bytes(raw, "little") if raw is not None and len(raw) == 2 else None

    if us(0x0100) != C_STORE_RSP or us(0x0120) != msg_id or us(0x0800) != _NO_DATA_SET:
        return None
    return us(0x0900)


# ------------------------------------------------------------------ the short path


class _HandBack(Exception):
    """The response is not one this module reads; pynetdicom gets the bytes read so far."""

    def __init__(self, event: str | None = None) -> None:
        super().__init__(event or "unexpected PDU")
        self.event = event
        """An FSM event to queue after the PDUs ("Evt17" closed, "Evt19" invalid)."""


def _eligible(assoc: Association, dataset: Any, originator: tuple[Any, Any]) -> bool:
    if not _installed or type(dataset) not in _fast_types or originator != (None, None):
        return False
    if not assoc.is_established:
        return False
    return not any(assoc.get_handlers(event) for event in _OBSERVED_EVENTS)


def _send_c_store(
    self: Association,
    dataset: Any,
    msg_id: int = 1,
    priority: int = 2,
    originator_aet: str | None = None,
    originator_id: int | None = None,
) -> Dataset:
    """Association.send_c_store, the short way for registered data set types."""
    if not _eligible(self, dataset, (originator_aet, originator_id)):
        outcomes["upstream"] += 1
        return _upstream_send_c_store(
            self, dataset, msg_id, priority, originator_aet, originator_id
        )  # fmt: skip
    try:
        sop_class = str(dataset.SOPClassUID)
        sop_instance = str(dataset.SOPInstanceUID)
        tsyntax = dataset.file_meta.TransferSyntaxUID
        context = _context(self, sop_class, str(tsyntax))
        syntax = context.transfer_syntax[0]
        encode = pynetdicom.association.encode  # type: ignore[attr-defined]
        data = encode(dataset, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        command = store_request_command(sop_class, sop_instance, msg_id, priority)
    except Exception:
        data = command = None
    if data is None or command is None:
        outcomes["upstream"] += 1
        return _upstream_send_c_store(
            self, dataset, msg_id, priority, originator_aet, originator_id
        )  # fmt: skip
    pdus = throughput.pdata_pdu_parts(
        cast(int, context.context_id), command, data, self.dimse.maximum_pdu_size
    )
    self._reactor_checkpoint.clear()
    try:
        while not self._is_paused:
            time.sleep(0.0001)
        outcome = _exchange(self, cast(int, context.context_id), msg_id, pdus)
        outcomes["short" if isinstance(outcome, Dataset) else outcome] += 1
        if isinstance(outcome, Dataset):
            return outcome
        if outcome is _NOT_SENT:
            return _upstream_send_c_store(
                self, dataset, msg_id, priority, originator_aet, originator_id
            )  # fmt: skip
        # handed back: the response comes through pynetdicom, as upstream
        rsp = None if outcome is _TIMED_OUT else self.dimse.get_msg(block=True)[1]
    finally:
        self._reactor_checkpoint.set()
    if rsp is None:
        self._handle_no_response()
        return Dataset()
    return self._check_received_status(rsp)


_contexts: weakref.WeakKeyDictionary[Association, dict[tuple[str, str], Any]] = (
    weakref.WeakKeyDictionary()
)


def _context(assoc: Association, sop_class: str, syntax: str) -> Any:
    """`assoc._get_valid_context` for sending, remembered per association (its accepted
    contexts do not change once it is established; upstream searches them per call)."""
    known = _contexts.get(assoc)
    if known is None:
        known = _contexts.setdefault(assoc, {})
    context = known.get((sop_class, syntax))
    if context is None:
        context = assoc._get_valid_context(sop_class, syntax, "scu", allow_conversion=True)
        known[(sop_class, syntax)] = context
    return context


_NOT_SENT = "not sent"
_HANDED_BACK = "handed back"
_TIMED_OUT = "timed out"


def _exchange(
    assoc: Association, context_id: int, msg_id: int, pdus: list[bytes | memoryview]
) -> Dataset | str:
    """Write the request and read its response on this thread.

    Returns the status Dataset, or why not: _NOT_SENT (nothing was written: pynetdicom
    had something pending, so the caller goes upstream's way), _HANDED_BACK (what was
    read is pynetdicom's now; the response comes through its queue) or _TIMED_OUT (no
    response within the DIMSE timeout).
    """
    dul = assoc.dul
    reader = throughput.reader_lock(dul)
    reader.acquire()
    try:
        transport = dul.socket
        sock = transport.socket if transport is not None else None
        if sock is None or not _quiet(assoc):
            return _NOT_SENT
        with throughput.send_lock(dul):
            if dul.to_provider_queue.queue or dul.state_machine.current_state != "Sta6":
                return _NOT_SENT
            try:
                throughput.send_parts(sock, pdus)
            except Exception:
                dul.event_queue.put("Evt17")  # as AssociationSocket.send does
                return _HANDED_BACK
        raws: list[bytes] = []
        try:
            status = _read_response(assoc, transport, context_id, msg_id, raws)
        except _HandBack as exc:
            _hand_back(dul, raws, exc.event)
            return _HANDED_BACK
        except TimeoutError:
            _hand_back(dul, raws, None)
            return _TIMED_OUT
    finally:
        reader.release()
    result = Dataset()
    result.Status = status
    return result


def _quiet(assoc: Association) -> bool:
    """Nothing received is pending anywhere in pynetdicom for this association."""
    dul = assoc.dul
    dimse = assoc.dimse
    return (
        dul.state_machine.current_state == "Sta6"
        and not dul.event_queue.queue
        and not dul._recv_pdu.queue
        and dimse.message is None
        and not dimse.msg_queue.queue
    )


def _read_response(
    assoc: Association, transport: Any, context_id: int, msg_id: int, raws: list[bytes]
) -> int:
    """The Status of the C-STORE-RSP; raises _HandBack (with `raws` holding the complete
    PDUs read) for anything else, TimeoutError when the DIMSE timeout passes."""
    command = bytearray()
    while True:
        raw = _read_pdu(assoc, transport)
        raws.append(raw)
        if raw[0] != 0x04:
            raise _HandBack()
        at, end = 6, len(raw)
        while at < end:
            if at + 6 > end:
                raise _HandBack()
            length, pdv_context, header = struct.unpack_from(">IBB", raw, at)
            if length < 2 or at + 4 + length > end or pdv_context != context_id:
                raise _HandBack()
            if header & 0x01 == 0:  # a data set fragment: not a C-STORE-RSP
                raise _HandBack()
            command += raw[at + 6 : at + 4 + length]
            at += 4 + length
            if header & 0x02:
                if at != end:
                    raise _HandBack()
                status = store_response_status(bytes(command), msg_id)
                if status is None:
                    raise _HandBack()
                return status


def _read_pdu(assoc: Association, transport: Any) -> bytes:
    """One complete PDU from the socket, as `DULServiceProvider._read_pdu_data` reads it."""
    dul = assoc.dul
    sock = transport.socket
    timeout = assoc.dimse_timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    while not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
        if not assoc.is_established or sock is None or sock.fileno() < 0 or dul._kill_thread:
            raise _HandBack("Evt17")
        wait = _WAIT_SLICE_S
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
        if wait <= 0:
            raise TimeoutError
        try:
            readable, _, _ = select.select([sock], [], [], wait)
        except (OSError, ValueError):
            raise _HandBack("Evt17") from None
        if readable:
            break
    try:
        head = bytes(transport.recv(6))
        if len(head) < 6:
            raise _HandBack("Evt17")
        pdu_type, _, length = struct.unpack(">BBL", head)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            log.error("Unknown PDU type received '0x%02X'", pdu_type)
            raise _HandBack("Evt19")
        body = bytes(transport.recv(length))
    except (OSError, TimeoutError):
        log.error("Connection closed before the entire PDU was received")
        raise _HandBack("Evt17") from None
    if len(body) != length:
        raise _HandBack("Evt17")
    dul._idle_timer.restart()
    return head + body


def _hand_back(dul: DULServiceProvider, raws: list[bytes], event: str | None) -> None:
    """Queue the PDUs read (and a final FSM event) as the reactor's own read would."""
    for raw in raws:
        try:
            pdu, fsm_event = dul._decode_pdu(bytearray(raw))
        except Exception:
            log.exception("Unable to decode the received PDU data")
            dul.event_queue.put("Evt19")
            continue
        dul.event_queue.put(fsm_event)
        dul._recv_pdu.put(pdu)
    if event is not None:
        dul.event_queue.put(event)


__all__ = ["install", "store_request_command", "store_response_status"]
