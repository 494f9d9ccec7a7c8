"""Sealed blobs: seal and put bytes into the blob store, and read them back verified."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from saf.blobstore import new_blob_id
from saf.crypto import BlobHeader, seal, unseal
from saf.hub import Hub
from saf.models import Blob

log = logging.getLogger(__name__)


def store(hub: Hub, plaintext: BinaryIO, size: int) -> Blob:
    """Seal `plaintext` into a new blob; returns its (not yet committed) index row.

    The object is durable when this returns; the caller commits the row, or calls
    `discard` if its transaction fails, so nothing is left behind.
    """
    blob_id = new_blob_id()
    header, sealed = seal(hub.keyring, blob_id, plaintext)
    hub.blobs.put(blob_id, sealed)
    return Blob(id=blob_id, header=header.to_bytes(), key_id=header.key_id, size=size)


def store_many(hub: Hub, plaintexts: Sequence[bytes]) -> list[Blob]:
    """`store` for many small plaintexts at once: all durable when this returns (the
    backend makes them durable together, `BlobStore.put_many`), none left if it raises."""
    blob_ids = [new_blob_id() for _ in plaintexts]
    sealed = [
        seal(hub.keyring, b, io.BytesIO(p)) for b, p in zip(blob_ids, plaintexts, strict=True)
    ]
    hub.blobs.put_many([(b, chunks) for b, (_header, chunks) in zip(blob_ids, sealed, strict=True)])
    return [
        Blob(id=b, header=header.to_bytes(), key_id=header.key_id, size=len(p))
        for b, (header, _chunks), p in zip(blob_ids, sealed, plaintexts, strict=True)
    ]


def discard(hub: Hub, blob: Blob) -> None:
    """Remove a blob whose index row was never committed.

    Best effort: a blob that cannot be removed is unreferenced (never acknowledged),
    harmless but for the space, and `saf fsck` reports it.
    """
    try:
        hub.blobs.delete(blob.id)
    except Exception:
        log.exception("could not remove unreferenced blob %s", blob.id)


def read(hub: Hub, blob: Blob) -> Iterator[bytes]:
    """Plaintext chunks of `blob`, each authenticated; a tampered blob raises IntegrityError.

    A chunk is only yielded once verified, but truncation is only known at the end:
    callers that must not act on a partial object use `write_to`.
    """
    header = BlobHeader.from_bytes(blob.header)
    with hub.blobs.open(blob.id) as sealed:
        yield from unseal(hub.keyring, blob.id, header, sealed)


def write_to(hub: Hub, blob: Blob, path: Path) -> str:
    """Decrypt `blob` to `path` atomically (temp file, fsync, rename); returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".saf-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in read(hub, blob):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()
