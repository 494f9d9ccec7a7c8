"""Sealed JPEG thumbnails of a study: one per instance and one representative per series.

`make_study_thumbnails` is idempotent and safe to run concurrently: the unique
constraints on (instance_id, size) and (series_pk, size) decide who wins, and the
loser discards its blob. An image that cannot be decrypted, read or rendered gets a
placeholder thumbnail (with a PHI-free reason) instead; it never stops the study.
"""

from __future__ import annotations

import io
import logging
import tempfile
from dataclasses import dataclass
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import Table, and_, insert, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from saf import vault
from saf.crypto import CryptoError
from saf.hub import Hub
from saf.models import Blob, Instance, Series, Thumbnail, new_id, utcnow
from saf.render import RenderError, render, render_placeholder

log = logging.getLogger(__name__)

INSTANCE_SIZE = 128
"""Longest side in pixels of an instance thumbnail."""

SERIES_SIZE = 256
"""Longest side in pixels of a series' representative thumbnail."""

MEDIA_TYPE = "image/jpeg"
"""Media type of every stored thumbnail."""

IN_MEMORY_MAX = 64 << 20
"""Instances up to this size are decrypted into memory; larger ones spool to a temp file."""

VERIFICATION_FAILED = "stored object failed verification"
"""Placeholder reason for an instance blob that did not verify (tampered or truncated)."""

UNREADABLE = "DICOM data could not be read"
"""Placeholder reason for an instance pydicom cannot parse."""

_REASON_MAX = 200  # Thumbnail.reason column size
_READ_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError)

_instances, _series, _blobs, _thumbnails = (
    cast(Table, model.__table__) for model in (Instance, Series, Blob, Thumbnail)
)


@dataclass
class ThumbnailReport:
    """What one run did: thumbnails written (placeholders included), already there, placeholders."""

    made: int = 0
    skipped: int = 0
    placeholders: int = 0


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


class _Unrenderable(Exception):
    """The source could not be turned into an image; `reason` is short and PHI-free."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def make_study_thumbnails(hub: Hub, study_id: str) -> ThumbnailReport:
    """Make the missing instance and series thumbnails of the study with primary key `study_id`."""
    report = ThumbnailReport()
    by_series = _newest_instances(hub, study_id)
    done_instances, done_series = _existing(hub, by_series)
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
            if targets:
                _make(hub, source, targets, report)
    return report


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
            _blobs.c.id.label("blob_id"), _blobs.c.header, _blobs.c.key_id,
            _blobs.c.size,
        )
        .select_from(
            _instances.join(_series, _instances.c.series_pk == _series.c.id).join(
                _blobs, _instances.c.blob_id == _blobs.c.id
            )
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
        source = _Source(row.id, row.series_pk, row.instance_number, row.sop_instance_uid, blob)
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


def _make(hub: Hub, source: _Source, targets: list[_Target], report: ThumbnailReport) -> None:
    """Read `source` once and store a thumbnail (or placeholder) for each target."""
    try:
        ds: Dataset | None = _load(hub, source)
        failure: str | None = None
    except _Unrenderable as exc:
        ds, failure = None, exc.reason
    for target in targets:
        reason = failure
        jpeg = b""
        if ds is not None:
            try:
                jpeg = render(ds, size=target.size, fmt="jpeg")
            except RenderError as exc:
                reason = exc.reason
            except _READ_ERRORS as exc:  # a malformed header value, decoded lazily by pydicom
                # The message may quote header values (PHI): log its type only.
                log.warning(
                    "instance %s: %s while rendering", source.instance_id, type(exc).__name__
                )
                reason = UNREADABLE
        if reason is not None:
            reason = reason[:_REASON_MAX]
            log.warning("thumbnail of instance %s is a placeholder: %s", source.instance_id, reason)
            jpeg = render_placeholder(target.size, reason, "jpeg")
        if _store(hub, target, jpeg, reason):
            report.made += 1
            report.placeholders += reason is not None
        else:
            report.skipped += 1


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


def _store(hub: Hub, target: _Target, jpeg: bytes, reason: str | None) -> bool:
    """Seal and commit one thumbnail; False when a concurrent run committed it first."""
    blob = vault.store(hub, io.BytesIO(jpeg), len(jpeg))
    now = utcnow()
    try:
        with hub.engine.begin() as conn:
            conn.execute(
                insert(_blobs),
                {"id": blob.id, "header": blob.header, "key_id": blob.key_id, "size": blob.size,
                 "created_at": now},
            )  # fmt: skip
            conn.execute(
                insert(_thumbnails),
                {"id": new_id(), "instance_id": target.instance_id, "series_pk": target.series_pk,
                 "size": target.size, "media_type": MEDIA_TYPE, "blob_id": blob.id,
                 "placeholder": reason is not None, "reason": reason, "created_at": now},
            )  # fmt: skip
    except DBIntegrityError:
        vault.discard(hub, blob)
        if not _exists(hub, target):
            raise  # not a lost race: a real constraint violation
        return False
    except BaseException:
        vault.discard(hub, blob)
        raise
    return True


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
