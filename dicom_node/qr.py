"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET (Patient Root and Study Root).

Matching is saf.query's (the index only, scoped by saf.tenancy to the calling peer's
clinic); this module speaks DIMSE. Permissions were already applied at negotiation
(a peer only gets the contexts of the services it may use) and are checked again
per request.

Retrieve sends the stored bytes: each instance is decrypted and verified (saf.vault)
into memory, and when the receiver accepted the stored transfer syntax its data set
bytes go on the wire exactly as stored, without being parsed or re-encoded (a
`StoredDataset` carries them; `_encode` hands them to pynetdicom in place of its
encoder). C-MOVE proposes, per SOP class, a context with exactly each stored syntax
plus an uncompressed fallback; only when the receiver refuses the stored syntax is the
instance parsed and re-encoded by pynetdicom (uncompressed to uncompressed) or
decompressed, and that is logged. A reader thread decrypts up to READ_AHEAD instances
ahead of the one on the wire (a bounded queue, so memory stays flat); the blob headers
of a whole retrieve come from the index in one query. The DIMSE messages themselves go
out through dicom_node.throughput (all PDUs of a message in one write).

C-MOVE destinations are the registered peers of the caller's own clinic that have a
port (`saf clinic add ... --port`); any other AE title is "Move Destination unknown"
(0xA801). Audit: one `dicom-find` per query (with the number of matches), one
`dicom-retrieve` per study moved or got.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import TYPE_CHECKING, Any

import pynetdicom.association
from pydicom import config, dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, dsutils, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select

from dicom_node.tcp import set_no_delay
from saf import audit, vault
from saf.clinics import PeerAccess
from saf.models import Blob, DicomPeer
from saf.query import Model, QueryError, StoredInstance, find, retrieve_instances

if TYPE_CHECKING:
    from dicom_node.scp import DicomNode

log = logging.getLogger(__name__)

QUERY_RETRIEVE_CONTEXTS: tuple[str, ...] = (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)
"""Abstract syntaxes the node offers for query/retrieve."""

PENDING = 0xFF00
CANCEL = 0xFE00
NOT_AUTHORISED = 0x0124
UNABLE_TO_PROCESS = 0xC000
READ_AHEAD = 4
"""Instances a retrieve decrypts ahead of the one being sent."""
MAX_MOVE_CONTEXTS = 128
"""Presentation contexts one association may propose (PS3.8)."""

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def information_model(sop_class_uid: str) -> Model:
    """`patient` or `study` root, from the request's Affected SOP Class UID."""
    return "patient" if UID(sop_class_uid).name.startswith("Patient Root") else "study"


class QueryRetrieve:
    """The C-FIND, C-MOVE and C-GET handlers of one DicomNode."""

    def __init__(self, node: DicomNode) -> None:
        self.node = node
        self.hub = node.hub

    def handlers(self) -> list[tuple[Any, Any]]:
        """pynetdicom (event, handler) pairs to bind on the node's servers."""
        return [
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
        ]

    # ------------------------------------------------------------------ C-FIND

    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """Yield (0xFF00, identifier) per match, then pynetdicom sends the final success."""
        access = self.node.access_of(event.assoc)
        if access is None or not access.may("find"):
            yield _status(NOT_AUTHORISED, "this AE title may not query"), None
            return
        model = information_model(str(event.request.AffectedSOPClassUID))
        try:
            identifier = event.identifier
            result = find(self.hub, access.principal, identifier, model)
        except QueryError as exc:
            self._audit(access, "dicom-find", audit.MINOR_FAILURE, f"refused: {exc.message}")
            yield _status(exc.status, exc.message), None
            return
        except Exception:
            log.exception("C-FIND from %s failed", access.principal.name)
            self._audit(access, "dicom-find", audit.SERIOUS_FAILURE, "query failed")
            yield _status(UNABLE_TO_PROCESS, "internal error; see hub log"), None
            return
        if result.truncated:
            log.warning(
                "C-FIND from %s: more than %d matches, answered the first ones",
                access.principal.name,
                len(result.identifiers),
            )
        self._audit(
            access,
            "dicom-find",
            audit.SUCCESS,
            f"model={model} level={result.level} matches={len(result.identifiers)}"
            f"{' truncated' if result.truncated else ''} studies={len(result.study_pks)}",
        )
        for ds in result.identifiers:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, ds

    # ------------------------------------------------------------------ C-MOVE

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        """Yield the destination, the number of sub-operations, then (0xFF00, dataset)s."""
        access = self.node.access_of(event.assoc)
        destination = str(event.move_destination or "").strip()
        target = self._destination(access, destination) if access and access.may("move") else None
        if access is None or target is None:
            log.warning(
                "C-MOVE from %s to unknown destination %r",
                access.principal.name if access else "?",
                destination,
            )
            if access is not None:
                self._audit(
                    access, "dicom-retrieve", audit.MINOR_FAILURE,
                    f"refused: move destination {destination} unknown",
                )  # fmt: skip
            yield None, None
            return
        model = information_model(str(event.request.AffectedSOPClassUID))
        items, error = self._select(access, event, model)
        accepted: list[Association] = []
        contexts = _move_contexts(items)
        yield (
            target[0],
            target[1],
            {
                "contexts": contexts,
                "evt_handlers": [
                    (evt.EVT_CONN_OPEN, set_no_delay),  # else Nagle stalls every C-STORE
                    (evt.EVT_ACCEPTED, lambda e: accepted.append(e.assoc)),
                ],
            },
        )
        if error is not None:
            raise error  # pynetdicom answers 0xC513 "unable to process"
        yield len(items)
        yield from self._send_all(
            event,
            access,
            items,
            lambda: accepted[0].accepted_contexts if accepted else [],
            f"move to {destination}",
        )

    def _destination(self, access: PeerAccess, ae_title: str) -> tuple[str, int] | None:
        """(host, port) of a registered peer of the caller's clinic with that AE title."""
        with self.hub.sessions() as session:
            peers = session.scalars(
                select(DicomPeer)
                .where(
                    DicomPeer.clinic_id == access.clinic_id,
                    DicomPeer.ae_title == ae_title,
                    DicomPeer.port.is_not(None),
                    DicomPeer.host != "",
                )
                .order_by(DicomPeer.created_at)
            ).all()
            return (peers[0].host, int(peers[0].port or 0)) if peers else None

    # ------------------------------------------------------------------ C-GET

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        """Yield the number of sub-operations, then (0xFF00, dataset)s sent back on the
        same association over the storage contexts the peer proposed."""
        access = self.node.access_of(event.assoc)
        if access is None or not access.may("get"):
            yield 1
            yield _status(NOT_AUTHORISED, "this AE title may not retrieve"), None
            return
        model = information_model(str(event.request.AffectedSOPClassUID))
        items, error = self._select(access, event, model)
        if error is not None:
            yield 1
            yield _status(error.status, error.message), None
            return
        yield len(items)
        yield from self._send_all(
            event, access, items, lambda: event.assoc.accepted_contexts, "get"
        )

    # ------------------------------------------------------------------ shared

    def _select(
        self, access: PeerAccess, event: evt.Event, model: Model
    ) -> tuple[list[StoredInstance], QueryError | None]:
        try:
            return retrieve_instances(self.hub, access.principal, event.identifier, model), None
        except QueryError as exc:
            self._audit(access, "dicom-retrieve", audit.MINOR_FAILURE, f"refused: {exc.message}")
            return [], exc

    def _send_all(
        self,
        event: evt.Event,
        access: PeerAccess,
        items: list[StoredInstance],
        contexts: Callable[[], list[PresentationContext]],
        how: str,
    ) -> Iterator[tuple[int, Dataset | None]]:
        """(0xFF00, dataset) per instance, read ahead by a reader thread.

        The blob reads and decryption (which release the GIL for most of their time)
        run in one reader thread up to READ_AHEAD instances ahead of the one on the
        wire, so they overlap the network and the peer's C-STORE responses; at most
        READ_AHEAD + 2 instances are held in memory. The audit records (`how`: "get"
        or "move to AE") are written once the reader has started and before the first
        instance is yielded: nothing leaves the hub unaudited, and the first reads
        overlap their commit.
        """
        headers = self._blob_headers(items)
        ready: queue.Queue[bytes | None] = queue.Queue(maxsize=READ_AHEAD)
        stop = threading.Event()

        def reader() -> None:
            for item in items:
                data = self._read(item, headers)
                while not stop.is_set():
                    try:
                        ready.put(data, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return

        thread = threading.Thread(target=reader, name="saf-retrieve-read", daemon=True)
        thread.start()
        accepted: list[PresentationContext] = []  # fixed once the association is up
        by_class: dict[str, frozenset[str]] = {}  # SOP class -> syntaxes we may send it in
        try:
            self._audit_retrieve(access, items, how)
            for item in items:
                data = ready.get()
                if event.is_cancelled:
                    yield CANCEL, None
                    return
                if not accepted:
                    accepted = contexts()
                    by_class.clear()
                syntaxes = by_class.get(item.sop_class_uid)
                if syntaxes is None:
                    syntaxes = _syntaxes(accepted, item.sop_class_uid)
                    by_class[item.sop_class_uid] = syntaxes
                yield PENDING, self._load(item, data, syntaxes)
        finally:
            stop.set()
            thread.join()

    def _blob_headers(self, items: list[StoredInstance]) -> dict[str, bytes]:
        """Blob id -> sealed blob header, for every instance of a retrieve (one query per
        thousand instances instead of one per instance)."""
        ids = sorted({item.blob_id for item in items})
        headers: dict[str, bytes] = {}
        with self.hub.sessions() as session:
            for start in range(0, len(ids), 1000):
                rows = session.execute(
                    select(Blob.id, Blob.header).where(Blob.id.in_(ids[start : start + 1000]))
                )
                headers.update({row.id: row.header for row in rows})
        return headers

    def _read(self, item: StoredInstance, headers: dict[str, bytes]) -> bytes | None:
        """The stored object, decrypted and verified, or None (logged) if it cannot be read."""
        try:
            header = headers.get(item.blob_id)
            if header is None:
                raise LookupError(f"blob {item.blob_id} missing from the index")
            return b"".join(vault.read(self.hub, Blob(id=item.blob_id, header=header)))
        except Exception:
            log.exception("cannot read instance %s for retrieve", item.sop_instance_uid)
            return None

    def _load(self, item: StoredInstance, data: bytes | None, syntaxes: frozenset[str]) -> Dataset:
        """The stored instance, verified, as pynetdicom should send it over a context
        with one of `syntaxes` (those the receiver accepted for its SOP class).

        Sent as stored (a `StoredDataset`, never parsed) when the receiver accepted a
        context with the stored syntax; re-encoded by pynetdicom between uncompressed
        syntaxes; decompressed only when the receiver accepted no context with the stored
        syntax but an uncompressed one. An instance that cannot be read or sent comes
        back as a bare dataset pynetdicom cannot send, so it counts as a failed
        sub-operation (with its UID in the Failed SOP Instance UID List).
        """
        if data is None:
            return _unsendable(item)
        stored = item.transfer_syntax_uid
        if stored in syntaxes:
            as_stored = StoredDataset.from_part10(data, item)
            if as_stored is not None:
                return as_stored
        try:
            ds = dcmread(BytesIO(data))
        except Exception:
            log.exception("cannot read instance %s for retrieve", item.sop_instance_uid)
            return _unsendable(item)
        if stored in syntaxes:
            return ds
        if stored in _UNCOMPRESSED and syntaxes & set(_UNCOMPRESSED):
            log.info(
                "instance %s re-encoded from %s by pynetdicom: the receiver took %s",
                item.sop_instance_uid,
                stored,
                ", ".join(sorted(syntaxes)),
            )
            return ds
        if syntaxes & set(_UNCOMPRESSED):
            try:
                ds.decompress()
            except Exception:
                log.exception("cannot decompress %s for a receiver", item.sop_instance_uid)
                return _unsendable(item)
            log.warning(
                "instance %s transcoded from %s to %s: the receiver refused the stored syntax",
                item.sop_instance_uid,
                stored,
                ds.file_meta.TransferSyntaxUID,
            )
            return ds
        log.warning(
            "instance %s not sent: the receiver accepted no context for SOP class %s",
            item.sop_instance_uid,
            item.sop_class_uid,
        )
        return _unsendable(item)

    def _audit(self, access: PeerAccess, event: str, outcome: int, detail: str) -> None:
        try:
            audit.record(
                self.hub, event, access.principal, outcome=outcome,
                clinic_id=access.clinic_id, detail=detail,
            )  # fmt: skip
        except Exception:
            log.exception("cannot write the %s audit record for %s", event, access.principal.name)

    def _audit_retrieve(self, access: PeerAccess, items: list[StoredInstance], how: str) -> None:
        """One `dicom-retrieve` per study (BALP "DICOM Instances Transferred")."""
        counts = Counter((i.study_pk, i.patient_pk, i.study_instance_uid) for i in items)
        for (study_pk, patient_pk, uid), count in counts.items():
            try:
                audit.record(
                    self.hub, "dicom-retrieve", access.principal, entity_type="Study",
                    entity_id=study_pk, clinic_id=access.clinic_id, patient_pk=patient_pk,
                    detail=f"{how} instances={count} study_instance_uid={uid}",
                )  # fmt: skip
            except Exception:
                log.exception("cannot write the dicom-retrieve audit record")


def _syntaxes(contexts: list[PresentationContext], sop_class_uid: str) -> frozenset[str]:
    """Transfer syntaxes of the accepted contexts on which we may send `sop_class_uid`."""
    return frozenset(
        str(cx.transfer_syntax[0])
        for cx in contexts
        if cx.abstract_syntax == sop_class_uid and cx.as_scu
    )


def _move_contexts(items: list[StoredInstance]) -> list[PresentationContext]:
    """Per SOP class: one context per stored transfer syntax, and an uncompressed fallback."""
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in items})
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]
    for sop_class in sorted({i.sop_class_uid for i in items}):
        contexts.append(build_context(sop_class, list(_UNCOMPRESSED)))
    if len(contexts) > MAX_MOVE_CONTEXTS:
        log.warning("C-MOVE needs %d presentation contexts; proposing 128", len(contexts))
    return contexts[:MAX_MOVE_CONTEXTS]


class StoredDataset(Dataset):
    """A stored instance that pynetdicom sends as its stored data set bytes.

    It holds only what pynetdicom reads before encoding (SOP Class and Instance UIDs,
    the Transfer Syntax UID) plus the Part 10 bytes. `_encode` returns the bytes after
    the File Meta Information when pynetdicom asks for the stored encoding, which is the
    case whenever the context it chose has the stored syntax (it prefers an exact
    match); for any other encoding the object is parsed and re-encoded as before.
    """

    part10: bytes
    offset: int
    """Where the data set starts in `part10` (after the preamble and File Meta)."""

    @classmethod
    def from_part10(cls, data: bytes, item: StoredInstance) -> StoredDataset | None:
        """The instance to send as stored; None (logged) if its File Meta does not agree
        with the index, and then the caller parses it in full."""
        try:
            offset, syntax, sop_instance_uid = _file_meta(data)
        except Exception:
            log.exception("cannot read the File Meta of %s", item.sop_instance_uid)
            return None
        if syntax != item.transfer_syntax_uid or sop_instance_uid != item.sop_instance_uid:
            log.warning(
                "instance %s: File Meta says %s / %s, the index %s; re-encoding it",
                item.sop_instance_uid,
                sop_instance_uid,
                syntax,
                item.transfer_syntax_uid,
            )
            return None
        # The UIDs come from the index (checked at ingest) and agree with the File Meta:
        # pydicom's per-value validation would cost more than the rest of the send.
        ds = cls()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.add(_uid_element(0x00020010, syntax))
        ds.add(_uid_element(0x00080016, item.sop_class_uid))
        ds.add(_uid_element(0x00080018, item.sop_instance_uid))
        ds.part10 = data
        ds.offset = offset
        return ds

    def encoded(
        self, is_implicit_vr: bool, is_little_endian: bool, deflated: bool
    ) -> bytes | memoryview | None:
        """The data set as pynetdicom's `encode` would return it for that encoding (the
        stored bytes as a view, not a copy, when it is the stored encoding)."""
        syntax: UID = self.file_meta.TransferSyntaxUID
        if (syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated) == (
            is_implicit_vr,
            is_little_endian,
            deflated,
        ):
            return memoryview(self.part10)[self.offset :]
        log.info("instance %s re-encoded by pynetdicom", self.SOPInstanceUID)
        full = dcmread(BytesIO(self.part10))
        return _pynetdicom_encode(full, is_implicit_vr, is_little_endian, deflated)


def _uid_element(tag: int, value: str) -> DataElement:
    return DataElement(tag, "UI", value, validation_mode=config.IGNORE)


def _not_group_0002(tag: Any, vr: str | None, length: int) -> bool:
    return bool(tag.group != 2)


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
_TAG_VR = struct.Struct("<HH2s")


def _file_meta(data: bytes) -> tuple[int, str, str]:
    """(offset of the data set, Transfer Syntax UID, Media Storage SOP Instance UID) of a
    Part 10 object, read straight from its File Meta elements (explicit VR little endian,
    PS3.10 7.1); pydicom's reader for anything unexpected (it raises on what is broken)."""
    if data[128:132] != b"DICM":
        return _file_meta_pydicom(data)
    values: dict[int, str] = {}
    at = 132
    while at + 8 <= len(data):
        group, element, vr = _TAG_VR.unpack_from(data, at)
        if group != 2:
            break
        if vr in _LONG_VRS:
            length = int.from_bytes(data[at + 8 : at + 12], "little")
            at += 12
        elif vr.isalpha() and vr.isupper():
            length = int.from_bytes(data[at + 6 : at + 8], "little")
            at += 8
        else:
            return _file_meta_pydicom(data)
        if element in (0x0003, 0x0010):
            values[element] = data[at : at + length].rstrip(b"\x00 ").decode("ascii")
        at += length
    if at > len(data) or 0x0010 not in values:
        return _file_meta_pydicom(data)
    return at, values[0x0010], values.get(0x0003, "")


def _file_meta_pydicom(data: bytes) -> tuple[int, str, str]:
    fp = BytesIO(data)
    read_preamble(fp, False)
    meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_not_group_0002)
    return (
        fp.tell(),
        str(meta.get("TransferSyntaxUID", "")),
        str(meta.get("MediaStorageSOPInstanceUID", "")),
    )


_pynetdicom_encode: Callable[[Dataset, bool, bool, bool], bytes | None] = dsutils.encode


def _encode(
    ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> bytes | memoryview | None:
    """pynetdicom's data set encoder, except that a StoredDataset gives its stored bytes.

    pynetdicom's C-GET/C-MOVE machinery only takes Dataset objects and encodes them
    with pydicom, which costs more than the network for a CT slice and is not
    byte-identical in every case; this is the one place that changes that.
    """
    if isinstance(ds, StoredDataset):
        return ds.encoded(is_implicit_vr, is_little_endian, deflated)
    return _pynetdicom_encode(ds, is_implicit_vr, is_little_endian, deflated)


# send_c_store calls the `encode` its module imported; only StoredDataset behaves differently.
pynetdicom.association.encode = _encode  # type: ignore[attr-defined,assignment]


def _unsendable(item: StoredInstance) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = item.sop_instance_uid  # no SOP Class: pynetdicom refuses to send it
    return ds


def _status(code: int, comment: str) -> Dataset:
    """A status with an Error Comment, as pynetdicom takes it from a handler."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds
