"""pynetdicom on the node's send path: fewer Python steps per DIMSE message.

A C-GET of a 200-slice CT to a peer with dcmtk's 16 KiB maximum PDU is about 7,000
P-DATA PDUs. Upstream, each one is its own primitive in the DUL queue, its own pass
through the reactor loop and state machine, its own `socket.send`, and its own
EVT_PDU_SENT/EVT_DATA_SENT hooks; the command set of every message is encoded twice
by pydicom's general writer. This module changes three things, each guarded:

* `quiet_event_logging`: pynetdicom's standard per-PDU and per-message log handlers
  format every PDU even when nothing is logged; they are bound only when the
  ``pynetdicom`` logger would print them (``saf ... --verbose``).
* `encode_command_set`: the command set (group 0000, Implicit VR Little Endian, a few
  VRs) is written directly; anything unusual goes to pydicom as before.
* the DIMSE send: all P-DATA-TF PDUs of one message are encoded at once and handed to
  the DUL as one primitive, which the state machine's DT-1/AR-7 actions write with one
  `send`. The PDUs are byte-identical to upstream's (same fragmentation, one PDV per
  PDU). The fast path is skipped, per message, when anybody bound EVT_PDU_SENT or
  EVT_DATA_SENT on the association (they expect one event per PDU) or when the data set
  is streamed from a file.

`install()` applies the replacements only to the pynetdicom series they were written
against (`PYNETDICOM_SERIES`) and only when the functions they replace are still
upstream's own; otherwise it logs why and leaves pynetdicom as it is.
"""

from __future__ import annotations

import copy
import logging
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import pynetdicom
import pynetdicom.dimse
import pynetdicom.dimse_messages
import pynetdicom.dul
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import _config, evt, fsm
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode as _pydicom_encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext

log = logging.getLogger(__name__)

PYNETDICOM_SERIES = "3.0."
"""pynetdicom versions whose internals the replacements were checked against."""

_lock = threading.Lock()
_installed = False

_upstream_send_msg: Callable[..., None] = DIMSEServiceProvider.send_msg
_upstream_dt_1: Callable[[Any], str] = fsm.DT_1
_upstream_ar_7: Callable[[Any], str] = fsm.AR_7


def quiet_event_logging() -> None:
    """Bind pynetdicom's standard log handlers only if its logger would print them.

    Applies to associations created after the call (pynetdicom binds them per
    association).
    """
    verbose = logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
    _config.LOG_HANDLER_LEVEL = "standard" if verbose else "none"


def install() -> bool:
    """Replace pynetdicom's command encoder and DIMSE send with the fast ones.

    Idempotent. Returns whether the fast path is in use.
    """
    global _installed
    with _lock:
        if _installed:
            return True
        version = str(getattr(pynetdicom, "__version__", ""))
        if not version.startswith(PYNETDICOM_SERIES):
            log.warning(
                "pynetdicom %s is not %sx: keeping its own DIMSE send path", version,
                PYNETDICOM_SERIES,
            )  # fmt: skip
            return False
        upstream = (
            getattr(pynetdicom.dimse_messages, "encode", None) is _pydicom_encode,
            DIMSEServiceProvider.send_msg is _upstream_send_msg,
            fsm.ACTIONS["DT-1"][1] is _upstream_dt_1,
            fsm.ACTIONS["AR-7"][1] is _upstream_ar_7,
        )
        if not all(upstream):
            log.warning("pynetdicom's send path was already replaced (%s); leaving it", upstream)
            return False
        pynetdicom.dimse_messages.encode = _encode  # type: ignore[attr-defined]
        DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
        desc, _, state = fsm.ACTIONS["DT-1"]
        fsm.ACTIONS["DT-1"] = (desc, _dt_1, state)
        desc, _, state = fsm.ACTIONS["AR-7"]
        fsm.ACTIONS["AR-7"] = (desc, _ar_7, state)
        if "__deepcopy__" not in vars(PresentationContext):
            PresentationContext.__deepcopy__ = _copy_context  # type: ignore[attr-defined]
        else:
            log.warning("PresentationContext.__deepcopy__ exists; contexts copied its way")
        if getattr(pynetdicom.dul, "time", None) is time:
            setattr(pynetdicom.dul, "time", _ReactorClock())  # noqa: B010
        else:
            log.warning("pynetdicom.dul.time was already replaced; reactor keeps napping")
        _installed = True
        return True


# ------------------------------------------------------------------ reactor nap


LENT_NAP_S = 0.005
"""The reactor's nap while a DIMSE thread has its socket (see `reader_lock`)."""


class _ReactorClock:
    """Stands in for the `time` module inside pynetdicom.dul.

    The DUL reactor naps `time.sleep(delay)` whenever a loop found nothing to do, so a
    peer's response waits for the nap to end, and then for the GIL. Here a reactor
    thread's nap is a `select` on its socket for the same delay: it wakes as soon as
    the peer's bytes arrive. Everything else is the real `time`.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(delay: float) -> None:
        thread = threading.current_thread()
        transport = (
            getattr(thread, "socket", None) if isinstance(thread, DULServiceProvider) else None
        )
        sock = getattr(transport, "socket", None)
        if not isinstance(sock, socket.socket) or sock.fileno() < 0:
            time.sleep(delay)
            return
        if reader_lock(thread).locked():
            # A DIMSE thread reads the socket (cstore_loop) and writes its own messages:
            # nothing here needs a quick answer, and each wake-up competes for the GIL.
            time.sleep(max(delay, LENT_NAP_S))
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        try:
            select.select([sock], [], [], delay)
        except (OSError, ValueError):
            time.sleep(delay)


# ------------------------------------------------------------------ contexts

_CONTEXT_FIELDS = frozenset(
    {
        "_context_id", "_abstract_syntax", "_transfer_syntax", "result",
        "_scu_role", "_scp_role", "_as_scp", "_as_scu",
    }
)  # fmt: skip
_IMMUTABLE = (str, int, bool, type(None))


def _copy_context(self: PresentationContext, memo: dict[int, Any]) -> PresentationContext:
    """`copy.deepcopy` of a presentation context, sharing its (immutable) UIDs.

    pynetdicom deep-copies the AE's supported contexts for every association it accepts;
    the default deepcopy rebuilds every transfer syntax UID through pydicom's validation
    (≈8,000 UIDs for the node's storage contexts, ≈40 ms before the peer's
    A-ASSOCIATE-RQ is even read). A context holding anything else than the known
    fields of immutable values (and the list of transfer syntaxes) is copied the default
    way.
    """
    state = vars(self)
    syntaxes = state.get("_transfer_syntax")
    others = [value for key, value in state.items() if key != "_transfer_syntax"]
    plain = (
        state.keys() <= _CONTEXT_FIELDS
        and isinstance(syntaxes, list)
        and all(isinstance(uid, str) for uid in syntaxes)
        and all(isinstance(value, _IMMUTABLE) for value in others)
    )
    new = PresentationContext.__new__(type(self))
    memo[id(self)] = new
    if plain and isinstance(syntaxes, list):
        new.__dict__.update(state)
        new.__dict__["_transfer_syntax"] = list(syntaxes)
    else:
        new.__dict__.update(copy.deepcopy(state, memo))
    return new


# ------------------------------------------------------------------ command set

_PAD = {"UI": b"\x00", "AE": b" ", "LO": b" ", "SH": b" ", "CS": b" "}
_INT = {"US": struct.Struct("<H"), "UL": struct.Struct("<I")}
_ELEMENT = struct.Struct("<HHI")


def encode_command_set(ds: Dataset) -> bytes | None:
    """The command set in Implicit VR Little Endian, as pydicom writes it; None when it
    holds anything this short writer does not handle (then pydicom is used)."""
    return encode_command_elements((elem.tag, elem.VR, elem.value) for elem in ds)


def encode_command_elements(elements: Iterable[tuple[int, str, Any]]) -> bytes | None:
    """`encode_command_set` for (tag, VR, value) triples in tag order."""
    parts: list[bytes] = []
    for tag, vr, value in elements:
        if tag >> 16:
            return None
        if value is None or value == "":
            raw = b""
        elif isinstance(value, (MultiValue, list, tuple, bytes)):
            return None
        elif vr in _INT:
            if not isinstance(value, int):
                return None
            raw = _INT[vr].pack(value)
        elif vr in _PAD:
            if not isinstance(value, str):
                return None
            raw = value.encode("ascii")
            if len(raw) % 2:
                raw += _PAD[vr]
        else:
            return None
        parts.append(_ELEMENT.pack(0, tag & 0xFFFF, len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _encode(
    ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> bytes | None:
    """pynetdicom.dimse_messages' encoder: command sets directly, anything else upstream."""
    if is_implicit_vr and is_little_endian and not deflated:
        try:
            encoded = encode_command_set(ds)
        except (UnicodeEncodeError, struct.error):
            encoded = None
        if encoded is not None:
            return encoded
    return _pydicom_encode(ds, is_implicit_vr, is_little_endian, deflated)


# ------------------------------------------------------------------ P-DATA


class EncodedPData(P_DATA):
    """Every P-DATA-TF PDU of one DIMSE message, already encoded, sent with one write."""

    def __init__(self, encoded: bytes) -> None:
        super().__init__()
        self.encoded = encoded


_HEADERS = struct.Struct(">BBIIBB")
"""A P-DATA-TF PDU header (type, reserved, length) and its one PDV's header (length,
presentation context ID, message control header)."""


def encode_pdata_pdus(
    context_id: int, command: bytes, data: bytes | memoryview, max_pdu: int
) -> bytes:
    """The P-DATA-TF PDUs pynetdicom would send for this message, concatenated."""
    return b"".join(pdata_pdu_parts(context_id, command, data, max_pdu))


def pdata_pdu_parts(
    context_id: int, command: bytes, data: bytes | memoryview, max_pdu: int
) -> list[bytes | memoryview]:
    """The P-DATA-TF PDUs pynetdicom would send for this message, as a list of buffers
    to write in order: per PDU its 12 header bytes, then a view of its fragment (the
    data set is not copied).

    One PDV per PDU, fragments of at most ``max_pdu - 6`` bytes (0: unlimited), control
    header 0x01/0x03 for command fragments and 0x00/0x02 for data set fragments, as
    `DIMSEMessage.encode_msg` and `P_DATA_TF.encode` do.
    """
    if 0 < max_pdu < 7:
        raise ValueError("a maximum PDU length cannot be between 1 and 6")
    out: list[bytes | memoryview] = []
    for whole, more, last in ((command, 0x01, 0x03), (data, 0x00, 0x02)):
        stream = memoryview(whole).cast("B")
        if whole is data and not len(stream):
            break
        size = max(len(stream), 1) if max_pdu == 0 else max_pdu - 6
        start = 0
        while True:
            fragment = stream[start : start + size]
            start += size
            final = start >= len(stream)
            pdv_length = len(fragment) + 2
            out.append(_HEADERS.pack(0x04, 0x00, pdv_length + 4, pdv_length, context_id,
                                     last if final else more))  # fmt: skip
            out.append(fragment)
            if final:
                break
    return out


_IOV_MAX = 512
"""Buffers per `sendmsg` call (Linux allows 1,024)."""


def send_parts(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """Write `parts` in order, all of them (`sendall` of their concatenation, without
    making it): `sendmsg` on a plain socket, one joined `sendall` on a TLS one."""
    if isinstance(sock, ssl.SSLSocket) or not hasattr(sock, "sendmsg"):
        sock.sendall(b"".join(parts))
        return
    pending = list(parts)
    at = 0
    while at < len(pending):
        batch = pending[at : at + _IOV_MAX]
        sent = sock.sendmsg(batch)
        for part in batch:
            size = len(part)
            if sent < size:  # a partial write: the rest of this part goes next
                pending[at] = memoryview(part)[sent:]
                break
            sent -= size
            at += 1


_PENDING = 0xFF00
_RETRIEVE_RSP_FIELD = {C_GET: 0x8010, C_MOVE: 0x8021}
_UID_CHARS = frozenset("0123456789.")


def pending_retrieve_response(primitive: Any) -> bytes | None:
    """The command set of a Pending C-GET/C-MOVE response without an identifier or
    error elements, as pynetdicom encodes it; None for any other message.

    A retrieve sends one after every sub-operation; upstream builds each as a pydicom
    command set (validating its UID) only to encode ten elements.
    """
    field = _RETRIEVE_RSP_FIELD.get(type(primitive))
    if field is None or primitive.Status != _PENDING or primitive.Identifier is not None:
        return None
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    uid = primitive.AffectedSOPClassUID
    msg_id = primitive.MessageIDBeingRespondedTo
    counts = (
        primitive.NumberOfRemainingSuboperations,
        primitive.NumberOfCompletedSuboperations,
        primitive.NumberOfFailedSuboperations,
        primitive.NumberOfWarningSuboperations,
    )
    if not (isinstance(uid, str) and 0 < len(uid) <= 64 and _UID_CHARS.issuperset(uid)):
        return None
    if not all(isinstance(v, int) and 0 <= v < 0x10000 for v in (msg_id, *counts)):
        return None
    body = encode_command_elements(
        (
            (0x0002, "UI", str(uid)),
            (0x0100, "US", field),
            (0x0120, "US", msg_id),
            (0x0800, "US", 0x0101),
            (0x0900, "US", _PENDING),
            (0x1020, "US", counts[0]),
            (0x1021, "US", counts[1]),
            (0x1022, "US", counts[2]),
            (0x1023, "US", counts[3]),
        )
    )
    return None if body is None else _ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


def _fast_path(assoc: Any) -> bool:
    return not assoc.get_handlers(evt.EVT_PDU_SENT) and not assoc.get_handlers(evt.EVT_DATA_SENT)


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """DIMSEServiceProvider.send_msg, with all PDUs of the message queued as one, and
    Pending C-GET/C-MOVE responses paced (`pace_pending`)."""
    if (
        type(primitive) in _RETRIEVE_RSP_FIELD
        and primitive.Status == _PENDING
        and not _pending_due(self.assoc)
    ):
        return
    if not _fast_path(self.assoc):
        _upstream_send_msg(self, primitive, context_id)
        return
    pending = pending_retrieve_response(primitive)
    if pending is not None and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        pdus = encode_pdata_pdus(context_id, pending, b"", self.maximum_pdu_size)
        _send_now_or_queue(self.dul, EncodedPData(pdus))
        return
    table: Any = (
        pynetdicom.dimse._RQ_TO_MESSAGE
        if primitive.MessageIDBeingRespondedTo is None
        else pynetdicom.dimse._RSP_TO_MESSAGE
    )
    dimse_msg = table[primitive.__class__]()
    dimse_msg.primitive_to_message(primitive)
    dimse_msg.context_id = context_id
    evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": dimse_msg})
    if getattr(dimse_msg, "_data_set_path", None) is not None:
        for pdata in dimse_msg.encode_msg(context_id, self.maximum_pdu_size):
            self.dul.send_pdu(pdata)
        return
    command = _encode(dimse_msg.command_set, True, True)
    if command is None:
        raise ValueError("cannot encode the DIMSE command set")
    data = dimse_msg.data_set.getvalue() if dimse_msg.data_set is not None else b""
    _send_now_or_queue(
        self.dul, EncodedPData(encode_pdata_pdus(context_id, command, data, self.maximum_pdu_size))
    )


_pending_intervals: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
_last_pending: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def pace_pending(ae: Any, seconds: float) -> None:
    """Send the associations of `ae` a Pending C-GET/C-MOVE response at most every
    `seconds` (0: after every sub-operation, as pynetdicom does).

    Pending responses are optional (PS3.4 C.4.2.3, C.4.3.3); one per instance is a DIMSE
    message each way per instance that only reports progress (dcm4chee sends none for
    C-GET by default). Counts stay right: the final response carries them all, and a
    C-CANCEL is answered as before. The clock of an association starts at its first
    sub-operation, so a retrieve shorter than `seconds` gets no Pending response.
    """
    _pending_intervals[ae] = seconds


def _pending_due(assoc: Any) -> bool:
    ae = getattr(assoc, "ae", None)
    interval = _pending_intervals.get(ae, 0.0) if ae is not None else 0.0
    if interval <= 0:
        return True
    now = time.monotonic()
    last = _last_pending.get(assoc)
    if last is not None and now - last < interval:
        return False
    _last_pending[assoc] = now
    return last is not None


_dul_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()


def send_lock(dul: Any) -> threading.Lock:
    """The lock that orders this association's P-DATA writes (direct and queued)."""
    with _lock:
        lock = _dul_locks.get(dul)
        if lock is None:
            lock = _dul_locks[dul] = threading.Lock()
        return lock


_reader_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()


def reader_lock(dul: Any) -> threading.Lock:
    """The lock held by whoever reads this association's socket.

    The reactor takes it (without waiting) around each read; `dicom_node.cstore_loop`
    holds it while a DIMSE thread reads its own responses. While it is held by someone
    else, the reactor's nap is a plain sleep rather than a `select` on the socket.
    """
    lock = _reader_locks.get(dul)
    if lock is None:
        with _lock:
            lock = _reader_locks.get(dul)
            if lock is None:
                lock = _reader_locks[dul] = threading.Lock()
    return lock


def _send_now_or_queue(dul: Any, pdata: EncodedPData) -> None:
    """Write the message from the calling (DIMSE) thread when nothing is queued before it
    and the association is established; otherwise queue it for the reactor.

    The reactor would take it at its next poll, which costs a thread hand-off and a
    nap per message. Order is kept: the queued path sends under the same lock, so a
    primitive taken off the queue is on the wire before a direct write starts. The one
    PDU the reactor sends unprompted in Sta6 is an A-ABORT for a peer's invalid PDU,
    after which the association is gone either way.
    """
    with send_lock(dul):
        socket = dul.socket
        if (
            socket is not None
            and dul.state_machine.current_state == "Sta6"
            and not dul.to_provider_queue.queue
        ):
            socket.send(pdata.encoded)
            return
        dul.send_pdu(pdata)


def _send_encoded(dul: Any, upstream: Callable[[Any], str]) -> str | None:
    """Run a DT-1/AR-7 action under the send lock; an EncodedPData is written as is."""
    with send_lock(dul):
        head = dul.to_provider_queue.queue[0] if dul.to_provider_queue.queue else None
        if not isinstance(head, EncodedPData):
            return upstream(dul)
        dul.to_provider_queue.get(False)
        if dul.socket is not None:
            dul.socket.send(head.encoded)
        else:
            log.warning("attempted to send data over a closed connection")
        return None


def _dt_1(dul: Any) -> str:
    """DT-1 (Sta6 + Evt9): send the P-DATA-TF PDU(s)."""
    return _send_encoded(dul, _upstream_dt_1) or "Sta6"


def _ar_7(dul: Any) -> str:
    """AR-7 (Sta8 + Evt9): send the P-DATA-TF PDU(s) during a release."""
    return _send_encoded(dul, _upstream_ar_7) or "Sta8"


__all__ = [
    "EncodedPData",
    "encode_command_elements",
    "encode_command_set",
    "encode_pdata_pdus",
    "install",
    "pace_pending",
    "pdata_pdu_parts",
    "pending_retrieve_response",
    "quiet_event_logging",
    "reader_lock",
    "send_lock",
    "send_parts",
]
