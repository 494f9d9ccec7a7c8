"""The one ingest path: every transport (C-STORE, STOW-RS, file import) ends in `ingest_part10`.

Order of work, so that nothing is acknowledged before it is durable and a failure
leaves nothing behind: parse and validate, deduplicate, seal and put the blob,
then commit the index rows and an outbox event in one transaction.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.exc import DataError, SQLAlchemyError
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from saf import instance_metadata, vault
from saf.crypto import seal_value
from saf.hub import Hub
from saf.models import Blob, Instance, OutboxEvent, Patient, Series, Study, new_id, utcnow

log = logging.getLogger(__name__)

HASH_BLOCK = 1 << 20
"""Read size when hashing received files."""

IN_MEMORY_MAX = 8 << 20
"""Received files up to this size are read into memory once; larger ones are streamed."""

ROW_ID_CACHE_MAX = 100_000
"""Study/series ids remembered per process before the cache starts over."""

UNDEFINED_LENGTH = 0xFFFFFFFF
"""Element length meaning 'until the delimiter' (sequences, encapsulated pixel data)."""


class IngestError(Exception):
    """An instance that cannot be stored; `status` is the DICOM status to answer with."""

    status: int = 0xC000

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CannotUnderstand(IngestError):
    """The bytes are not a well-formed DICOM dataset we can index (0xC000)."""

    status = 0xC000


class SOPClassMismatch(IngestError):
    """The dataset's SOP Class disagrees with what the transport announced (0xA900)."""

    status = 0xA900


class OutOfResources(IngestError):
    """Storage or the index failed; the sender may retry later (0xA700)."""

    status = 0xA700


class Outcome(StrEnum):
    """What ingest did with an instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    NEW_VERSION = "new-version"


@dataclass(frozen=True)
class Sender:
    """Who sent the instance: the clinic it belongs to and a transport label for the record."""

    clinic_id: str
    source: str


@dataclass(frozen=True)
class IngestResult:
    """The outcome of one ingest, with the ids a caller may report (no PHI)."""

    outcome: Outcome
    instance_id: str
    sop_instance_uid: str
    study_instance_uid: str
    version: int


@dataclass(frozen=True)
class _Parsed:
    """What ingest reads from a Part 10 file before writing anything."""

    meta: Dataset
    ds: Dataset
    dataset_offset: int
    size: int
    sha256: str


_UID_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# Statements built once: constructing SQLAlchemy statements per instance costs more
# than executing them, and ingest is the hot path.
_patients, _studies, _series, _instances, _blobs, _outbox = (
    cast(Table, model.__table__) for model in (Patient, Study, Series, Instance, Blob, OutboxEvent)
)
_SELECT_VERSIONS = (
    select(
        _instances.c.id, _instances.c.version, _instances.c.sha256,
        _studies.c.study_instance_uid,
    )
    .select_from(
        _instances.join(_series, _instances.c.series_pk == _series.c.id).join(
            _studies, _series.c.study_pk == _studies.c.id
        )
    )
    .where(
        _studies.c.clinic_id == bindparam("clinic_id"),
        _instances.c.sop_instance_uid == bindparam("sop_instance_uid"),
    )
)  # fmt: skip
_SELECT_STUDY = select(_studies.c.id).where(
    _studies.c.clinic_id == bindparam("clinic_id"),
    _studies.c.study_instance_uid == bindparam("study_instance_uid"),
)
_SELECT_PATIENT = select(_patients.c.id).where(
    _patients.c.clinic_id == bindparam("clinic_id"),
    _patients.c.patient_id == bindparam("patient_id"),
)
_SELECT_SERIES = select(_series.c.id).where(
    _series.c.study_pk == bindparam("study_pk"),
    _series.c.series_instance_uid == bindparam("series_instance_uid"),
)
_TOUCH_STUDY = (
    update(_studies)
    .where(_studies.c.id == bindparam("study_pk"))
    .values(last_received_at=bindparam("now"), stable_at=None)
)


def ingest_part10(
    hub: Hub,
    path: Path,
    sender: Sender,
    *,
    expected_sop_class_uid: str | None = None,
    expected_sop_instance_uid: str | None = None,
) -> IngestResult:
    """Store the DICOM Part 10 file at `path` for `sender`; returns once it is durable.

    Raises an IngestError subclass (whose `status` is the DICOM answer) when the
    file cannot be stored; in that case no row and no blob is left behind.
    """
    try:
        received = _Received(path)
    except OSError as exc:
        raise OutOfResources(f"cannot read the received data: {exc.strerror or exc}") from exc
    parsed = _parse(received)
    _validate(parsed, expected_sop_class_uid, expected_sop_instance_uid)
    sop_instance_uid = str(parsed.ds.SOPInstanceUID)

    try:
        duplicate = _find_duplicate(hub, sender.clinic_id, sop_instance_uid, parsed.sha256)
    except SQLAlchemyError as exc:
        log.error("duplicate check failed for %s: %s", sop_instance_uid, exc)
        raise OutOfResources("the index database is unavailable") from exc
    if duplicate is not None:
        return duplicate

    try:
        with received.open() as plaintext:
            blob = vault.store(hub, plaintext, parsed.size)
    except OSError as exc:
        log.error("sealing %s failed: %s", sop_instance_uid, exc)
        raise OutOfResources(f"cannot write to the blob store: {exc.strerror or exc}") from exc

    try:
        result = _commit_with_retry(hub, parsed, sender, blob)
    except BaseException:
        vault.discard(hub, blob)
        raise
    if result.outcome is Outcome.DUPLICATE:
        # Lost a race with an identical concurrent send: its copy is the one we keep.
        vault.discard(hub, blob)
    return result


class _Received:
    """The received file; read into memory once when small, streamed from disk when large.

    Small instances dominate counts, and each read of the file is a system call that
    hands the GIL to pynetdicom's polling threads; one read instead of three matters.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = os.path.getsize(path)
        self._data = path.read_bytes() if self.size <= IN_MEMORY_MAX else None

    def open(self) -> BinaryIO:
        """A fresh reader positioned at the start."""
        return io.BytesIO(self._data) if self._data is not None else self.path.open("rb")


def _parse(received: _Received) -> _Parsed:
    """Read the File Meta and the dataset's elements once (large values are skipped, not
    read), check that every element is complete, and hash the dataset bytes."""
    size = received.size
    try:
        with received.open() as fp:
            read_preamble(fp, force=False)
            meta = _read_file_meta_info(fp)
            dataset_offset = fp.tell()
            syntax = UID(str(meta.get("TransferSyntaxUID", "")))
            if not syntax.is_transfer_syntax:
                raise CannotUnderstand(f"unknown Transfer Syntax UID {str(syntax)[:64]!r}")
            ds: Dataset
            if syntax == DeflatedExplicitVRLittleEndian:
                # Offsets would be those of the inflated stream; pydicom inflates it and
                # zlib detects a truncated deflate stream.
                fp.seek(0)
                ds = dcmread(fp, stop_before_pixels=True)
            else:
                ds = _read_elements(fp, syntax, size)
            fp.seek(dataset_offset)
            digest = hashlib.sha256()
            while block := fp.read(HASH_BLOCK):
                digest.update(block)
        for keyword in (*_UID_TAGS, "PatientID", "PatientName"):
            ds.get(keyword)  # decode the elements we index: a malformed one raises here
    except InvalidDicomError as exc:
        raise CannotUnderstand(f"not a DICOM Part 10 dataset: {exc}") from exc
    except (ValueError, EOFError, KeyError, IndexError, TypeError, OSError, zlib.error) as exc:
        raise CannotUnderstand(f"malformed dataset: {exc}") from exc
    return _Parsed(meta, ds, dataset_offset, size, digest.hexdigest())


def _read_elements(fp: BinaryIO, syntax: UID, size: int) -> Dataset:
    """The top-level elements (values over 1 KiB skipped); refuses a dataset cut short."""
    elements = [
        e
        for e in data_element_generator(
            fp, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=1024
        )
        if isinstance(e, RawDataElement)  # what the generator yields for every element
    ]
    end = max(
        (
            e.value_tell + e.length
            for e in elements
            if e.length != UNDEFINED_LENGTH and e.value_tell is not None
        ),
        default=0,
    )
    if end > size:
        raise CannotUnderstand(
            f"dataset truncated: an element ends at byte {end} but only {size} bytes arrived"
        )
    if elements and elements[-1].length == UNDEFINED_LENGTH:
        # pydicom only warns when the data ends before a sequence delimiter, so look
        # for the (FFFE,E0DD) delimiter that must close the last, undefined-length element.
        order = "<" if syntax.is_little_endian else ">"
        fp.seek(max(size - 8, 0))
        if fp.read(8) != struct.pack(f"{order}HHL", 0xFFFE, 0xE0DD, 0):
            raise CannotUnderstand("dataset truncated: no delimiter closes its last element")
    return Dataset({e.tag: e for e in elements})


def _validate(parsed: _Parsed, sop_class: str | None, sop_instance: str | None) -> None:
    ds, meta = parsed.ds, parsed.meta
    missing = [kw for kw in _UID_TAGS if not ds.get(kw)]
    if missing:
        raise CannotUnderstand(f"required attribute(s) missing: {', '.join(missing)}")
    for keyword in _UID_TAGS:
        uid = UID(str(ds[keyword].value))
        if not uid.is_valid:
            raise CannotUnderstand(f"{keyword} is not a valid UID: {str(uid)[:70]!r}")
    syntax = meta.get("TransferSyntaxUID")
    if not syntax or not UID(str(syntax)).is_valid:
        raise CannotUnderstand("File Meta has no valid Transfer Syntax UID")
    announced_class = sop_class or meta.get("MediaStorageSOPClassUID")
    if announced_class and announced_class != ds.SOPClassUID:
        raise SOPClassMismatch(
            f"dataset SOP Class {ds.SOPClassUID} does not match {announced_class}"
        )
    announced_instance = sop_instance or meta.get("MediaStorageSOPInstanceUID")
    if announced_instance and announced_instance != ds.SOPInstanceUID:
        raise CannotUnderstand(
            f"dataset SOP Instance UID {ds.SOPInstanceUID} does not match {announced_instance}"
        )


@dataclass(frozen=True)
class _Version:
    """A stored version of a SOP instance at one clinic."""

    instance_id: str
    version: int
    sha256: str
    study_instance_uid: str


def _versions(conn: Connection, clinic_id: str, sop_instance_uid: str) -> list[_Version]:
    rows = conn.execute(
        _SELECT_VERSIONS, {"clinic_id": clinic_id, "sop_instance_uid": sop_instance_uid}
    )
    return [_Version(*row) for row in rows]


def _duplicate_of(
    versions: list[_Version], sha256: str, sop_instance_uid: str
) -> IngestResult | None:
    """The stored version with exactly these bytes, if any."""
    for v in versions:
        if v.sha256 == sha256:
            return IngestResult(
                Outcome.DUPLICATE, v.instance_id, sop_instance_uid, v.study_instance_uid, v.version
            )
    return None


def _find_duplicate(
    hub: Hub, clinic_id: str, sop_instance_uid: str, sha256: str
) -> IngestResult | None:
    with hub.engine.connect() as conn:
        versions = _versions(conn, clinic_id, sop_instance_uid)
    return _duplicate_of(versions, sha256, sop_instance_uid)


def _commit_with_retry(hub: Hub, parsed: _Parsed, sender: Sender, blob: Blob) -> IngestResult:
    # A concurrent association may create the same patient/study/series (or the same
    # instance version) first; the unique constraints catch it and the next attempt
    # finds the rows it made.
    for attempt in range(3):
        try:
            with hub.engine.begin() as conn:
                result, created = _index(hub, conn, parsed, sender, blob)
            if len(hub.row_ids) > ROW_ID_CACHE_MAX:
                hub.row_ids.clear()  # bounded: a cold entry costs one indexed look-up
            hub.row_ids.update(created)  # only ids that are committed
            return result
        except DBIntegrityError:
            if attempt == 2:
                raise OutOfResources("index conflict persisted after retries") from None
        except DataError as exc:
            # The database refused a value: the dataset, not the hub, is at fault.
            log.warning("index refused a value of %s: %s", parsed.ds.SOPInstanceUID, exc.orig)
            raise CannotUnderstand("a header value cannot be indexed") from exc
        except SQLAlchemyError as exc:
            log.error("index commit failed for %s: %s", parsed.ds.SOPInstanceUID, exc)
            raise OutOfResources("the index database is unavailable") from exc
    raise AssertionError("unreachable")


def _index(
    hub: Hub, conn: Connection, parsed: _Parsed, sender: Sender, blob: Blob
) -> tuple[IngestResult, dict[tuple[str, ...], str]]:
    """Write the rows for one instance; returns the result and the row ids it looked up."""
    ds = parsed.ds
    sop_instance_uid = str(ds.SOPInstanceUID)
    versions = _versions(conn, sender.clinic_id, sop_instance_uid)
    duplicate = _duplicate_of(versions, parsed.sha256, sop_instance_uid)
    if duplicate is not None:
        return duplicate, {}
    now = utcnow()
    ids: dict[tuple[str, ...], str] = {}
    study_key = ("study", sender.clinic_id, str(ds.StudyInstanceUID))
    study_pk = hub.row_ids.get(study_key) or _get_or_create_study(hub, conn, ds, sender.clinic_id)
    ids[study_key] = study_pk
    conn.execute(_TOUCH_STUDY, {"study_pk": study_pk, "now": now})
    series_key = ("series", study_pk, str(ds.SeriesInstanceUID))
    series_pk = hub.row_ids.get(series_key) or _get_or_create_series(conn, ds, study_pk)
    ids[series_key] = series_pk
    version = max((v.version for v in versions), default=0) + 1
    instance_id = new_id()
    conn.execute(
        insert(_blobs),
        {"id": blob.id, "header": blob.header, "key_id": blob.key_id, "size": blob.size,
         "created_at": now},
    )  # fmt: skip
    conn.execute(
        insert(_instances),
        dict(
            id=instance_id,
            series_pk=series_pk,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=str(ds.SOPClassUID),
            version=version,
            instance_number=_int(ds.get("InstanceNumber")),
            transfer_syntax_uid=str(parsed.meta.TransferSyntaxUID),
            rows=_int(ds.get("Rows")),
            columns=_int(ds.get("Columns")),
            number_of_frames=_int(ds.get("NumberOfFrames")),
            size=parsed.size,
            sha256=parsed.sha256,
            blob_id=blob.id,
            source=sender.source[:80],
            received_at=now,
        ),
    )
    event = {
        "instance_id": instance_id,
        "series_id": series_pk,
        "study_id": study_pk,
        "clinic_id": sender.clinic_id,
        "version": version,
    }
    topics = ["instance.stored"]
    if version > 1:
        # The older versions are no longer served: their metadata rows go with them.
        instance_metadata.forget(conn, [v.instance_id for v in versions])
        log.warning(
            "instance %s (study %s) received again with different bytes: kept as version %d",
            sop_instance_uid,
            study_pk,
            version,
        )
        topics.append("instance.new_version")
    conn.execute(
        insert(_outbox),
        [{"topic": topic, "payload": event, "created_at": now, "attempts": 0} for topic in topics],
    )
    outcome = Outcome.NEW_VERSION if version > 1 else Outcome.STORED
    result = IngestResult(outcome, instance_id, sop_instance_uid, str(ds.StudyInstanceUID), version)
    return result, ids


def _get_or_create_study(hub: Hub, conn: Connection, ds: Dataset, clinic_id: str) -> str:
    study_uid = str(ds.StudyInstanceUID)
    study_pk = conn.scalar(_SELECT_STUDY, {"clinic_id": clinic_id, "study_instance_uid": study_uid})
    if study_pk is not None:
        return str(study_pk)
    patient_pk = _get_or_create_patient(hub, conn, ds, clinic_id)
    study_pk = new_id()
    now = utcnow()
    conn.execute(
        insert(_studies),
        dict(
            id=study_pk,
            clinic_id=clinic_id,
            patient_pk=patient_pk,
            study_instance_uid=study_uid,
            study_date=_text(ds.get("StudyDate"), 8),
            study_time=_text(ds.get("StudyTime"), 16),
            accession_number=_text(ds.get("AccessionNumber"), 64),
            study_id=_text(ds.get("StudyID"), 16),
            study_description=_text(ds.get("StudyDescription"), 64),
            created_at=now,
            last_received_at=now,
        ),
    )
    return study_pk


def _get_or_create_patient(hub: Hub, conn: Connection, ds: Dataset, clinic_id: str) -> str:
    patient_id = _text(ds.get("PatientID"), 64) or ""
    patient_pk = conn.scalar(_SELECT_PATIENT, {"clinic_id": clinic_id, "patient_id": patient_id})
    if patient_pk is not None:
        return str(patient_pk)
    name = _text(ds.get("PatientName"), 320)
    birth_date = _text(ds.get("PatientBirthDate"), 8)
    keyring = hub.keyring
    patient_pk = new_id()
    conn.execute(
        insert(_patients),
        dict(
            id=patient_pk,
            clinic_id=clinic_id,
            patient_id=patient_id,
            name_sealed=seal_value(keyring, name, context="patient.name") if name else None,
            birth_date_sealed=(
                seal_value(keyring, birth_date, context="patient.birth_date")
                if birth_date
                else None
            ),
            sex=_text(ds.get("PatientSex"), 16),
            created_at=utcnow(),
        ),
    )
    return patient_pk


def _get_or_create_series(conn: Connection, ds: Dataset, study_pk: str) -> str:
    series_uid = str(ds.SeriesInstanceUID)
    series_pk = conn.scalar(
        _SELECT_SERIES, {"study_pk": study_pk, "series_instance_uid": series_uid}
    )
    if series_pk is not None:
        return str(series_pk)
    series_pk = new_id()
    conn.execute(
        insert(_series),
        dict(
            id=series_pk,
            study_pk=study_pk,
            series_instance_uid=series_uid,
            modality=_text(ds.get("Modality"), 16),
            series_number=_int(ds.get("SeriesNumber")),
            series_description=_text(ds.get("SeriesDescription"), 64),
            body_part_examined=_text(ds.get("BodyPartExamined"), 16),
            created_at=utcnow(),
        ),
    )
    return series_pk


def _text(value: object, limit: int) -> str | None:
    """A header value as text cut to the column size; None when absent or empty."""
    if value is None:
        return None
    # NUL cannot be stored in PostgreSQL text; DICOM pads with it at most.
    text = str(value).replace("\x00", "").strip()
    return text[:limit] or None


def _int(value: object) -> int | None:
    try:
        return int(cast(Any, value))
    except (TypeError, ValueError):
        return None
