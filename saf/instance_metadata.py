"""Each instance's DICOM JSON kept in the index (table instance_metadata), so WADO-RS
metadata of a study is one query and no blob is opened.

A row holds the instance's JSON (saf.dicomjson: no pixel data, binary values over
BULK_DATA_MIN as BulkDataURIs) compressed with zlib and sealed with saf.crypto.seal_bytes
under a context naming the instance, so a row copied to another instance does not open.
Rows are made when a study completes (saf.thumbnails, from the read that renders the
thumbnails) and, for an instance that has none yet, by the first metadata request
(dicom_node.dicomweb.wado). A row describes one instance row, which never changes; a new
version of a SOP instance is a new instance row, and ingest removes the old one's row.

BulkDataURIs are stored relative (``/studies/…/bulkdata/<tag path>``); the answer makes
them absolute with `absolute_uris`, so a changed public URL never stales a row.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Final, cast

from sqlalchemy import Table, and_, delete, exists, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import aliased

from saf.crypto import bytes_key_id, open_bytes, reseal_bytes, seal_bytes
from saf.dicomjson import encode, to_json
from saf.hub import Hub
from saf.models import Instance, InstanceMetadata, Series, utcnow

FORMAT: Final = 1
"""Version of the JSON rows hold; a row of another format is made again when asked for."""

AVAILABLE_TRANSFER_SYNTAX_UID: Final = "00083002"
"""The attribute every answer adds: the transfer syntax the instance is served in."""

BATCH: Final = 500
"""Rows resealed per transaction by key rotation."""

_QUERY_IDS: Final = 10_000
"""Instance ids per IN list (SQLite's default limit on bound parameters is 32,766)."""

_table = cast(Table, InstanceMetadata.__table__)
_BULK_KEY: Final = b'"BulkDataURI":"/'


def bulk_prefix(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Where an instance's bulk data lives, relative to the DICOMweb root."""
    return f"/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/bulkdata/"


def make(
    ds: Any,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    transfer_syntax_uid: str,
    extra: dict[str, dict[str, Any]] | None = None,
) -> bytes:
    """An instance's metadata answer (encoded DICOM JSON) from its dataset `ds`; `extra`
    adds entries the dataset does not hold (the pixel data of a header-only parse)."""
    prefix = bulk_prefix(study_uid, series_uid, sop_uid)
    item = to_json(ds, lambda path: prefix + path)
    item.update(extra or {})
    item[AVAILABLE_TRANSFER_SYNTAX_UID] = {"vr": "UI", "Value": [transfer_syntax_uid]}
    return encode({key: item[key] for key in sorted(item)})


def _context(instance_id: str) -> str:
    return f"instance_metadata:{instance_id}"


def sealed_row(hub: Hub, instance_id: str, data: bytes) -> dict[str, Any]:
    """The table row holding `data` (compressed and sealed), ready to `store`."""
    sealed = seal_bytes(hub.keyring, zlib.compress(data, 6), context=_context(instance_id))
    return {
        "instance_id": instance_id,
        "format": FORMAT,
        "key_id": bytes_key_id(sealed),
        "sealed": sealed,
        "created_at": utcnow(),
    }


def store(hub: Hub, rows: Sequence[dict[str, Any]]) -> None:
    """Insert rows; an instance that has one already (a concurrent maker) keeps it."""
    if not rows:
        return
    with hub.engine.begin() as conn:
        insert_rows(conn, rows)


def insert_rows(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """`store` inside the caller's transaction. A row of an older FORMAT is replaced."""
    ids = [row["instance_id"] for row in rows]
    conn.execute(delete(_table).where(_table.c.instance_id.in_(ids), _table.c.format != FORMAT))
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    conn.execute(dialect.insert(_table).on_conflict_do_nothing(), list(rows))


def load(hub: Hub, instance_ids: Sequence[str]) -> dict[str, bytes]:
    """The stored metadata of those instances that have a current row, opened, by id.

    The caller has already decided the instances are visible to whoever asks: ids come
    from a tenancy-scoped query, never from the request.
    """
    found: dict[str, bytes] = {}
    keyring = hub.keyring
    with hub.engine.connect() as conn:
        for start in range(0, len(instance_ids), _QUERY_IDS):
            ids = instance_ids[start : start + _QUERY_IDS]
            rows = conn.execute(
                select(_table.c.instance_id, _table.c.sealed).where(
                    _table.c.instance_id.in_(ids), _table.c.format == FORMAT
                )
            )
            for instance_id, sealed in rows:
                plain = open_bytes(keyring, sealed, context=_context(instance_id))
                found[instance_id] = zlib.decompress(plain)
    return found


def missing(hub: Hub, instance_ids: Iterable[str]) -> set[str]:
    """Those of the instances that have no current row."""
    wanted = list(instance_ids)
    with hub.engine.connect() as conn:
        have: set[str] = set()
        for start in range(0, len(wanted), _QUERY_IDS):
            have.update(
                conn.scalars(
                    select(_table.c.instance_id).where(
                        _table.c.instance_id.in_(wanted[start : start + _QUERY_IDS]),
                        _table.c.format == FORMAT,
                    )
                )
            )
    return set(wanted) - have


def studies_missing(hub: Hub) -> list[str]:
    """Primary keys of the studies where the newest version of some instance has no
    current row (stored before the table existed, or a row of an older FORMAT)."""
    newer = aliased(Instance)
    query = (
        select(Series.study_pk)
        .distinct()
        .join(Instance, Instance.series_pk == Series.id)
        .where(
            ~exists().where(
                newer.series_pk == Instance.series_pk,
                newer.sop_instance_uid == Instance.sop_instance_uid,
                newer.version > Instance.version,
            ),
            ~exists().where(and_(_table.c.instance_id == Instance.id, _table.c.format == FORMAT)),
        )
        .order_by(Series.study_pk)
    )
    with hub.engine.connect() as conn:
        return list(conn.scalars(query))


def forget(conn: Connection, instance_ids: Sequence[str]) -> None:
    """Remove the rows of these instances (superseded versions), in the caller's transaction."""
    if instance_ids:
        conn.execute(delete(_table).where(_table.c.instance_id.in_(list(instance_ids))))


def absolute_uris(body: bytes, base_url: str) -> bytes:
    """The answer with its stored BulkDataURIs made absolute under `base_url` (the DICOMweb
    root). Only the key can match: a quote inside a JSON string value is escaped."""
    return body.replace(_BULK_KEY, b'"BulkDataURI":"' + base_url.encode() + b"/")


def reseal(hub: Hub, new_key_id: str) -> int:
    """Reseal every row not under `new_key_id` (saf.keys.rotate); how many were."""
    keyring = hub.keyring
    resealed = 0
    while True:
        with hub.engine.begin() as conn:
            batch = conn.execute(
                select(_table.c.instance_id, _table.c.sealed)
                .where(_table.c.key_id != new_key_id)
                .limit(BATCH)
            ).all()
            for instance_id, sealed in batch:
                fresh = reseal_bytes(keyring, sealed, context=_context(instance_id))
                conn.execute(
                    _table.update()
                    .where(_table.c.instance_id == instance_id)
                    .values(sealed=fresh, key_id=bytes_key_id(fresh))
                )
        resealed += len(batch)
        if len(batch) < BATCH:
            return resealed
