"""Sealed JPEG thumbnails of a study: one per instance and one representative per series;
and, from the same read of each instance, its DICOM JSON for the index (saf.instance_metadata).

`make_study_thumbnails` is idempotent and safe to run concurrently: the unique
constraints on (instance_id, size) and (series_pk, size) decide who wins, and the
loser discards its blob. An image that cannot be decrypted, read or rendered gets a
placeholder thumbnail (with a PHI-free reason) instead; it never stops the study.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import Table, and_, insert, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from saf import instance_metadata, vault
from saf.crypto import CryptoError
from saf.hub import Hub
from saf.models import Blob, Instance, Series, Study, Thumbnail, new_id, utcnow
from saf.render import RenderError, render, render_placeholder

log = logging.getLogger(__name__)

INSTANCE_SIZE = 128
"""Longest side in pixels of an instance thumbnail."""

SERIES_SIZE = 256
"""Longest side in pixels of a series' representative thumbnail."""

MEDIA_TYPE = "image/jpeg"
"""Media type of every stored thumbnail."""

THREADS = max(2, min(4, os.cpu_count() or 1))
"""Instances read, rendered and sealed at once for one study."""

BATCH = 64
"""Thumbnails indexed per transaction."""

IN_MEMORY_MAX = 64 << 20
"""Instances up to this size are decrypted into memory; larger ones spool to a temp file."""

VERIFICATION_FAILED = "stored object failed verification"
"""Placeholder reason for an instance blob that did not verify (tampered or truncated)."""

UNREADABLE = "DICOM data could not be read"
"""Placeholder reason for an instance pydicom cannot parse."""

_REASON_MAX = 200  # Thumbnail.reason column size
_READ_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError)

_instances, _series, _studies, _blobs, _thumbnails = (
    cast(Table, model.__table__) for model in (Instance, Series, Study, Blob, Thumbnail)
)


@dataclass
class ThumbnailReport:
    """What one run did: thumbnails written (placeholders included), already there,
    placeholders; instance metadata rows written."""

    made: int = 0
    skipped: int = 0
    placeholders: int = 0
    metadata: int = 0


@dataclass(frozen=True)
class _Target:
    """One thumbnail to make: of an instance or of a series, at one size."""

    size: int
    instance_id: str | None = None
    series_pk: str | None = None


@dataclass(frozen=True)
class _Source:
    """The newest version of one SOP instance, with its stored blob."""

    instance_id: str
    series_pk: str
    instance_number: int | None
    sop_instance_uid: str
    blob: Blob
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str


@dataclass
class _Prepared:
    """What one read of an instance gave: its thumbnails and its metadata row."""

    made: list[_Made]
    metadata: dict[str, Any] | None = None


@dataclass
class _Made:
    """A sealed thumbnail whose index row is not committed yet."""

    target: _Target
    blob: Blob
    reason: str | None
    at: datetime = field(default_factory=utcnow)
    committed: bool = False


class _Unrenderable(Exception):
    """The source could not be turned into an image; `reason` is short and PHI-free."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def make_study_thumbnails(hub: Hub, study_id: str) -> ThumbnailReport:
    """Make the missing instance and series thumbnails of the study with primary key `study_id`.

    Instances are read, rendered and sealed on a few threads (decoding, resampling,
    encryption and fsync release the GIL); their index rows are committed in batches.
    """
    report = ThumbnailReport()
    jobs: list[tuple[_Source, list[_Target], bool]] = []
    by_series = _newest_instances(hub, study_id)
    done_instances, done_series = _existing(hub, by_series)
    no_metadata = instance_metadata.missing(
        hub, [s.instance_id for sources in by_series.values() for s in sources]
    )
    for series_pk, sources in by_series.items():
        middle = _middle(sources)
        for source in sources:
            targets = []
            if source.instance_id in done_instances:
                report.skipped += 1
            else:
                targets.append(_Target(INSTANCE_SIZE, instance_id=source.instance_id))
            if source is middle:
                if series_pk in done_series:
                    report.skipped += 1
                else:
                    targets.append(_Target(SERIES_SIZE, series_pk=series_pk))
            if targets or source.instance_id in no_metadata:
                jobs.append((source, targets, source.instance_id in no_metadata))
    if jobs:
        _run(hub, jobs, report)
    return report


def _run(
    hub: Hub, jobs: list[tuple[_Source, list[_Target], bool]], report: ThumbnailReport
) -> None:
    """Prepare every job on a thread pool and commit the results in batches, in order."""
    batch: list[_Made] = []
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(THREADS, thread_name_prefix="thumbnails") as pool:
        futures = [pool.submit(_prepare, hub, *job) for job in jobs]
        try:
            for future in futures:
                prepared = future.result()
                batch.extend(prepared.made)
                if prepared.metadata is not None:
                    rows.append(prepared.metadata)
                if len(batch) >= BATCH or len(rows) >= BATCH:
                    _commit(hub, batch, report)
                    _store_metadata(hub, rows, report)
                    batch, rows = [], []
            _commit(hub, batch, report)
            _store_metadata(hub, rows, report)
        except BaseException:
            # Nothing prepared may outlive a failed run: stop what has not started, wait
            # for the rest, and remove every blob whose row was not committed.
            for future in futures:
                future.cancel()
            wait(futures)
            for future in futures:
                if not future.cancelled() and future.exception() is None:
                    for made in future.result().made:
                        if not made.committed:
                            vault.discard(hub, made.blob)
            raise


def thumbnail_bytes(
    hub: Hub, *, instance_id: str | None = None, series_pk: str | None = None, size: int
) -> bytes | None:
    """The decrypted JPEG of an instance's or a series' thumbnail; None when there is none."""
    if (instance_id is None) == (series_pk is None):
        raise ValueError("give exactly one of instance_id and series_pk")
    owner = (
        _thumbnails.c.instance_id == instance_id
        if instance_id is not None
        else _thumbnails.c.series_pk == series_pk
    )
    query = (
        select(_blobs.c.id, _blobs.c.header, _blobs.c.key_id, _blobs.c.size)
        .select_from(_thumbnails.join(_blobs, _thumbnails.c.blob_id == _blobs.c.id))
        .where(owner, _thumbnails.c.size == size)
    )
    with hub.engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        return None
    blob = Blob(id=row.id, header=row.header, key_id=row.key_id, size=row.size)
    return b"".join(vault.read(hub, blob))


# --------------------------------------------------------------------------- selecting


def _newest_instances(hub: Hub, study_id: str) -> dict[str, list[_Source]]:
    """The newest version of every SOP instance in the study, grouped by series."""
    query = (
        select(
            _instances.c.id, _instances.c.series_pk, _instances.c.sop_instance_uid,
            _instances.c.version, _instances.c.instance_number,
            _instances.c.transfer_syntax_uid, _series.c.series_instance_uid,
            _studies.c.study_instance_uid,
            _blobs.c.id.label("blob_id"), _blobs.c.header, _blobs.c.key_id,
            _blobs.c.size,
        )
        .select_from(
            _instances.join(_series, _instances.c.series_pk == _series.c.id)
            .join(_studies, _series.c.study_pk == _studies.c.id)
            .join(_blobs, _instances.c.blob_id == _blobs.c.id)
        )
        .where(_series.c.study_pk == study_id)
        .order_by(_instances.c.version)
    )  # fmt: skip
    newest: dict[str, Any] = {}
    with hub.engine.connect() as conn:
        for row in conn.execute(query):
            newest[row.sop_instance_uid] = row  # ordered by version: the last one wins
    by_series: dict[str, list[_Source]] = {}
    for row in newest.values():
        blob = Blob(id=row.blob_id, header=row.header, key_id=row.key_id, size=row.size)
        source = _Source(
            row.id, row.series_pk, row.instance_number, row.sop_instance_uid, blob,
            row.study_instance_uid, row.series_instance_uid, row.transfer_syntax_uid,
        )  # fmt: skip
        by_series.setdefault(row.series_pk, []).append(source)
    return by_series


def _middle(sources: list[_Source]) -> _Source:
    """The series' representative: the middle instance by Instance Number (missing ones last)."""
    ordered = sorted(
        sources,
        key=lambda s: (s.instance_number is None, s.instance_number or 0, s.sop_instance_uid),
    )
    return ordered[len(ordered) // 2]


def _existing(hub: Hub, by_series: dict[str, list[_Source]]) -> tuple[set[str], set[str]]:
    """Ids of the instances and series that already have their thumbnail."""
    instance_ids = [s.instance_id for sources in by_series.values() for s in sources]
    if not instance_ids:
        return set(), set()
    with hub.engine.connect() as conn:
        done_instances = set(
            conn.scalars(
                select(_thumbnails.c.instance_id).where(
                    _thumbnails.c.size == INSTANCE_SIZE,
                    _thumbnails.c.instance_id.in_(instance_ids),
                )
            )
        )
        done_series = set(
            conn.scalars(
                select(_thumbnails.c.series_pk).where(
                    _thumbnails.c.size == SERIES_SIZE,
                    _thumbnails.c.series_pk.in_(list(by_series)),
                )
            )
        )
    return done_instances, done_series


# --------------------------------------------------------------------------- rendering


def _store_metadata(hub: Hub, rows: list[dict[str, Any]], report: ThumbnailReport) -> None:
    instance_metadata.store(hub, rows)
    report.metadata += len(rows)


def _metadata_row(hub: Hub, source: _Source, ds: Dataset) -> dict[str, Any] | None:
    """The instance's metadata row; None (logged) when its header cannot be converted, in
    which case the first metadata request tries again and reports the error."""
    try:
        data = instance_metadata.make(
            ds,
            study_uid=source.study_instance_uid,
            series_uid=source.series_instance_uid,
            sop_uid=source.sop_instance_uid,
            transfer_syntax_uid=source.transfer_syntax_uid,
        )
    except _READ_ERRORS as exc:  # the message may quote header values (PHI): type only
        log.warning("instance %s: no metadata row (%s)", source.instance_id, type(exc).__name__)
        return None
    return instance_metadata.sealed_row(hub, source.instance_id, data)


def _prepare(hub: Hub, source: _Source, targets: list[_Target], metadata: bool) -> _Prepared:
    """Read `source` once: its metadata row (when `metadata`) and a rendered and sealed
    thumbnail (or placeholder) for each target."""
    try:
        ds: Dataset | None = _load(hub, source)
        failure: str | None = None
    except _Unrenderable as exc:
        ds, failure = None, exc.reason
    # Before rendering, which may decode the pixel data in place.
    row = _metadata_row(hub, source, ds) if metadata and ds is not None else None
    prepared: list[_Made] = []
    try:
        for target in targets:
            reason = failure
            jpeg = b""
            if ds is not None:
                try:
                    jpeg = render(ds, size=target.size, fmt="jpeg")
                except RenderError as exc:
                    reason = exc.reason
                except _READ_ERRORS as exc:  # a malformed header value, decoded lazily
                    # The message may quote header values (PHI): log its type only.
                    log.warning(
                        "instance %s: %s while rendering", source.instance_id, type(exc).__name__
                    )
                    reason = UNREADABLE
            if reason is not None:
                reason = reason[:_REASON_MAX]
                log.warning(
                    "thumbnail of instance %s is a placeholder: %s", source.instance_id, reason
                )
                jpeg = render_placeholder(target.size, reason, "jpeg")
            prepared.append(_Made(target, vault.store(hub, io.BytesIO(jpeg), len(jpeg)), reason))
    except BaseException:
        for made in prepared:
            vault.discard(hub, made.blob)
        raise
    return _Prepared(prepared, row)


def _load(hub: Hub, source: _Source) -> Dataset:
    """Decrypt and parse the instance; raises _Unrenderable when that is impossible."""
    try:
        if source.blob.size <= IN_MEMORY_MAX:
            return dcmread(io.BytesIO(b"".join(vault.read(hub, source.blob))))
        with tempfile.TemporaryFile(dir=hub.settings.spool_dir) as spool:
            for chunk in vault.read(hub, source.blob):
                spool.write(chunk)
            spool.seek(0)
            return dcmread(spool)  # reads every value now, before the spool file goes
    except CryptoError as exc:
        log.error(
            "instance %s: blob %s failed verification: %s", source.instance_id, source.blob.id, exc
        )
        raise _Unrenderable(VERIFICATION_FAILED) from exc
    except (InvalidDicomError, EOFError, *_READ_ERRORS) as exc:
        raise _Unrenderable(UNREADABLE) from exc


# --------------------------------------------------------------------------- storing


def _commit(hub: Hub, batch: list[_Made], report: ThumbnailReport) -> None:
    """Index a batch of sealed thumbnails in one transaction.

    When a concurrent run got some of them first (a unique constraint fails), each
    is committed on its own instead, and the losers' blobs are removed.
    """
    if not batch:
        return
    try:
        with hub.engine.begin() as conn:
            conn.execute(insert(_blobs), [_blob_row(made) for made in batch])
            conn.execute(insert(_thumbnails), [_thumbnail_row(made) for made in batch])
    except DBIntegrityError:
        for made in batch:
            _commit_one(hub, made, report)
        return
    for made in batch:
        made.committed = True
        report.made += 1
        report.placeholders += made.reason is not None


def _commit_one(hub: Hub, made: _Made, report: ThumbnailReport) -> None:
    try:
        with hub.engine.begin() as conn:
            conn.execute(insert(_blobs), _blob_row(made))
            conn.execute(insert(_thumbnails), _thumbnail_row(made))
    except DBIntegrityError:
        if not _exists(hub, made.target):
            raise  # not a lost race: a real constraint violation
        vault.discard(hub, made.blob)
        made.committed = True  # settled: someone else's row stands for it
        report.skipped += 1
        return
    made.committed = True
    report.made += 1
    report.placeholders += made.reason is not None


def _blob_row(made: _Made) -> dict[str, Any]:
    blob = made.blob
    return {"id": blob.id, "header": blob.header, "key_id": blob.key_id, "size": blob.size,
            "created_at": made.at}  # fmt: skip


def _thumbnail_row(made: _Made) -> dict[str, Any]:
    target = made.target
    return {"id": new_id(), "instance_id": target.instance_id, "series_pk": target.series_pk,
            "size": target.size, "media_type": MEDIA_TYPE, "blob_id": made.blob.id,
            "placeholder": made.reason is not None, "reason": made.reason,
            "created_at": made.at}  # fmt: skip


def _exists(hub: Hub, target: _Target) -> bool:
    owner = (
        _thumbnails.c.instance_id == target.instance_id
        if target.instance_id is not None
        else _thumbnails.c.series_pk == target.series_pk
    )
    with hub.engine.connect() as conn:
        found = conn.scalar(
            select(_thumbnails.c.id).where(and_(owner, _thumbnails.c.size == target.size))
        )
    return found is not None
