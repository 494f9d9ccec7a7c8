"""Document bytes (FHIR Binary): sealed into the blob store like DICOM, never into the database.

`put` (`put_many` for a Bundle's) seals the bytes with saf.vault.store (the one sealing
path, shared with saf.ingest) before any transaction; the caller adds the returned `Blob`
row and the `FhirBinary` row in its transaction, and calls `discard` if that transaction
fails, so a failed write leaves neither rows nor objects (`saf fsck` sees no orphan).
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

from saf import vault
from saf.hub import Hub
from saf.models import Blob, FhirBinary


@dataclass(frozen=True)
class Sealed:
    """Bytes sealed into a blob not yet indexed, with their size and digests."""

    blob: Blob
    size: int
    sha1: str
    """Hex SHA-1 (FHIR Attachment.hash carries the base64 of the raw digest)."""

    @property
    def sha1_base64(self) -> str:
        """The digest as FHIR ``Attachment.hash`` writes it."""
        return base64.b64encode(bytes.fromhex(self.sha1)).decode("ascii")


def put(hub: Hub, data: bytes) -> Sealed:
    """Seal `data` into a new blob (durable on return; its row is not yet committed)."""
    blob = vault.store(hub, io.BytesIO(data), len(data))
    return Sealed(blob, len(data), hashlib.sha1(data, usedforsecurity=False).hexdigest())


def put_many(hub: Hub, datas: Sequence[bytes]) -> list[Sealed]:
    """`put` for many documents (a transaction Bundle's Binaries): durable together when
    this returns, none left if it raises."""
    blobs = vault.store_many(hub, datas)
    return [
        Sealed(blob, len(data), hashlib.sha1(data, usedforsecurity=False).hexdigest())
        for blob, data in zip(blobs, datas, strict=True)
    ]


def discard(hub: Hub, sealed: Sealed) -> None:
    """Remove the blob of a write whose transaction failed."""
    vault.discard(hub, sealed.blob)


def read(hub: Hub, blob: Blob) -> bytes:
    """The bytes of a document blob, authenticated (a tampered blob raises)."""
    return b"".join(vault.read(hub, blob))


def index_rows(sealed: Sealed, resource_id: str, content_type: str) -> tuple[Blob, FhirBinary]:
    """The rows that index `sealed` as the bytes of Binary `resource_id`."""
    row = FhirBinary(
        resource_id=resource_id,
        blob_id=sealed.blob.id,
        content_type=content_type[:255],
        size=sealed.size,
        sha1=sealed.sha1,
    )
    return sealed.blob, row
