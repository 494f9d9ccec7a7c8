"""The one ingest path: every transport (C-STORE, STOW-RS, file import) ends in `ingest_part10`.

Order of work, so that nothing is acknowledged before it is durable and a failure
leaves nothing behind: parse and validate, deduplicate, seal and put the blob,
then commit the index rows and an outbox event in one transaction.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from saf import vault
from saf.crypto import seal_value
from saf.hub import Hub
from saf.models import Blob, Instance, OutboxEvent, Patient, Series, Study, utcnow

log = logging.getLogger(__name__)

HASH_BLOCK = 1 << 20
"""Read size when hashing received files."""

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
    parsed = _parse(path)
    _validate(parsed, expected_sop_class_uid, expected_sop_instance_uid)
    sop_instance_uid = str(parsed.ds.SOPInstanceUID)

    duplicate = _find_duplicate(hub, sender.clinic_id, sop_instance_uid, parsed.sha256)
    if duplicate is not None:
        return duplicate

    try:
        with path.open("rb") as plaintext:
            blob = vault.store(hub, plaintext, parsed.size)
    except OSError as exc:
        log.error("sealing %s failed: %s", sop_instance_uid, exc)
        raise OutOfResources(f"cannot write to the blob store: {exc.strerror or exc}") from exc

    try:
        result = _commit_with_retry(hub, parsed, sender, blob)
    except BaseException:
        _discard_quietly(hub, blob)
        raise
    if result.outcome is Outcome.DUPLICATE:
        # Lost a race with an identical concurrent send: its copy is the one we keep.
        _discard_quietly(hub, blob)
    return result


def _parse(path: Path) -> _Parsed:
    size = os.path.getsize(path)
    try:
        with path.open("rb") as fp:
            read_preamble(fp, force=False)
            meta = _read_file_meta_info(fp)
            dataset_offset = fp.tell()
            syntax = UID(str(meta.get("TransferSyntaxUID", "")))
            if syntax.is_transfer_syntax and syntax != DeflatedExplicitVRLittleEndian:
                # (a deflated stream's offsets are those of the inflated data; zlib itself
                # detects a truncated deflate stream when the dataset is read below)
                _check_complete(fp, syntax, size)
            fp.seek(dataset_offset)
            digest = hashlib.sha256()
            while block := fp.read(HASH_BLOCK):
                digest.update(block)
        ds = dcmread(path, stop_before_pixels=True)
        for keyword in (*_UID_TAGS, "PatientID", "PatientName"):
            ds.get(keyword)  # decode the elements we index: a malformed one raises here
    except InvalidDicomError as exc:
        raise CannotUnderstand(f"not a DICOM Part 10 dataset: {exc}") from exc
    except (ValueError, EOFError, KeyError, IndexError, TypeError, OSError, zlib.error) as exc:
        raise CannotUnderstand(f"malformed dataset: {exc}") from exc
    return _Parsed(meta, ds, dataset_offset, size, digest.hexdigest())


def _check_complete(fp: BinaryIO, syntax: UID, size: int) -> None:
    """Walk the top-level elements (values skipped) and refuse one that runs past the end."""
    end = fp.tell()
    last_undefined = False
    elements = data_element_generator(
        fp, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=1024
    )
    for elem in elements:
        last_undefined = elem.length == UNDEFINED_LENGTH
        if not last_undefined and elem.value_tell is not None:
            end = max(end, elem.value_tell + elem.length)
    if end > size:
        raise CannotUnderstand(
            f"dataset truncated: an element ends at byte {end} but only {size} bytes arrived"
        )
    if last_undefined:
        # pydicom only warns when the data ends before a sequence delimiter, so look
        # for the (FFFE,E0DD) delimiter that must close the last, undefined-length element.
        order = "<" if syntax.is_little_endian else ">"
        fp.seek(max(size - 8, 0))
        if fp.read(8) != struct.pack(f"{order}HHL", 0xFFFE, 0xE0DD, 0):
            raise CannotUnderstand("dataset truncated: no delimiter closes its last element")


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


def _instances_of(session: Session, clinic_id: str, sop_instance_uid: str) -> list[Instance]:
    stmt = (
        select(Instance)
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .where(Study.clinic_id == clinic_id, Instance.sop_instance_uid == sop_instance_uid)
        .order_by(Instance.version)
    )
    return list(session.scalars(stmt))


def _find_duplicate(
    hub: Hub, clinic_id: str, sop_instance_uid: str, sha256: str
) -> IngestResult | None:
    with hub.sessions() as session:
        for inst in _instances_of(session, clinic_id, sop_instance_uid):
            if inst.sha256 == sha256:
                return _result(Outcome.DUPLICATE, inst, session)
    return None


def _result(outcome: Outcome, inst: Instance, session: Session) -> IngestResult:
    study_uid = session.scalar(
        select(Study.study_instance_uid)
        .join(Series, Series.study_pk == Study.id)
        .where(Series.id == inst.series_pk)
    )
    return IngestResult(outcome, inst.id, inst.sop_instance_uid, str(study_uid), inst.version)


def _commit_with_retry(hub: Hub, parsed: _Parsed, sender: Sender, blob: Blob) -> IngestResult:
    # A concurrent association may create the same patient/study/series first; the
    # unique constraints catch it and the second attempt finds the rows it made.
    for attempt in range(3):
        try:
            with hub.sessions() as session, session.begin():
                return _index(hub, session, parsed, sender, blob)
        except DBIntegrityError:
            if attempt == 2:
                raise OutOfResources("index conflict persisted after retries") from None
        except SQLAlchemyError as exc:
            log.error("index commit failed for %s: %s", parsed.ds.SOPInstanceUID, exc)
            raise OutOfResources("the index database is unavailable") from exc
    raise AssertionError("unreachable")


def _index(hub: Hub, session: Session, parsed: _Parsed, sender: Sender, blob: Blob) -> IngestResult:
    ds = parsed.ds
    sop_instance_uid = str(ds.SOPInstanceUID)
    existing = _instances_of(session, sender.clinic_id, sop_instance_uid)
    for inst in existing:
        if inst.sha256 == parsed.sha256:
            return _result(Outcome.DUPLICATE, inst, session)
    now = utcnow()
    study = _get_or_create_study(hub, session, ds, sender.clinic_id)
    study.last_received_at = now
    study.stable_at = None
    series = _get_or_create_series(session, ds, study)
    version = max((i.version for i in existing), default=0) + 1
    session.add(blob)
    inst = Instance(
        series_pk=series.id,
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
    )
    session.add(inst)
    session.flush()
    event = {
        "instance_id": inst.id,
        "series_id": series.id,
        "study_id": study.id,
        "clinic_id": sender.clinic_id,
        "version": version,
    }
    session.add(OutboxEvent(topic="instance.stored", payload=event))
    if version > 1:
        log.warning(
            "instance %s (study %s) received again with different bytes: kept as version %d",
            sop_instance_uid,
            study.id,
            version,
        )
        session.add(OutboxEvent(topic="instance.new_version", payload=event))
    outcome = Outcome.NEW_VERSION if version > 1 else Outcome.STORED
    return IngestResult(outcome, inst.id, sop_instance_uid, study.study_instance_uid, version)


def _get_or_create_study(hub: Hub, session: Session, ds: Dataset, clinic_id: str) -> Study:
    study_uid = str(ds.StudyInstanceUID)
    study = session.scalar(
        select(Study).where(Study.clinic_id == clinic_id, Study.study_instance_uid == study_uid)
    )
    if study is not None:
        return study
    patient = _get_or_create_patient(hub, session, ds, clinic_id)
    study = Study(
        clinic_id=clinic_id,
        patient_pk=patient.id,
        study_instance_uid=study_uid,
        study_date=_text(ds.get("StudyDate"), 8),
        study_time=_text(ds.get("StudyTime"), 16),
        accession_number=_text(ds.get("AccessionNumber"), 64),
        study_id=_text(ds.get("StudyID"), 16),
        study_description=_text(ds.get("StudyDescription"), 64),
    )
    session.add(study)
    session.flush()
    return study


def _get_or_create_patient(hub: Hub, session: Session, ds: Dataset, clinic_id: str) -> Patient:
    patient_id = _text(ds.get("PatientID"), 64) or ""
    patient = session.scalar(
        select(Patient).where(Patient.clinic_id == clinic_id, Patient.patient_id == patient_id)
    )
    if patient is not None:
        return patient
    name = _text(ds.get("PatientName"), 320)
    birth_date = _text(ds.get("PatientBirthDate"), 8)
    keyring = hub.keyring
    patient = Patient(
        clinic_id=clinic_id,
        patient_id=patient_id,
        name_sealed=seal_value(keyring, name, context="patient.name") if name else None,
        birth_date_sealed=(
            seal_value(keyring, birth_date, context="patient.birth_date") if birth_date else None
        ),
        sex=_text(ds.get("PatientSex"), 16),
    )
    session.add(patient)
    session.flush()
    return patient


def _get_or_create_series(session: Session, ds: Dataset, study: Study) -> Series:
    series_uid = str(ds.SeriesInstanceUID)
    series = session.scalar(
        select(Series).where(Series.study_pk == study.id, Series.series_instance_uid == series_uid)
    )
    if series is not None:
        return series
    series = Series(
        study_pk=study.id,
        series_instance_uid=series_uid,
        modality=_text(ds.get("Modality"), 16),
        series_number=_int(ds.get("SeriesNumber")),
        series_description=_text(ds.get("SeriesDescription"), 64),
        body_part_examined=_text(ds.get("BodyPartExamined"), 16),
    )
    session.add(series)
    session.flush()
    return series


def _text(value: object, limit: int) -> str | None:
    """A header value as text cut to the column size; None when absent or empty."""
    if value is None:
        return None
    text = str(value).strip()
    return text[:limit] or None


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _discard_quietly(hub: Hub, blob: Blob) -> None:
    try:
        vault.discard(hub, blob)
    except Exception:  # never acknowledged and unreferenced: harmless, only space
        log.exception("could not remove unreferenced blob %s", blob.id)
