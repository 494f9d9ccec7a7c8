"""Consistency check of index and blob store: missing, corrupt and unindexed blobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select

from saf import vault
from saf.blobstore import BlobNotFound
from saf.crypto import CryptoError
from saf.hub import Hub
from saf.models import Blob


@dataclass
class FsckReport:
    """What `fsck` found; `ok` is False when indexed data is missing or corrupt."""

    blobs_indexed: int = 0
    blobs_verified: int = 0
    missing: list[str] = field(default_factory=list)
    """Indexed blob ids with no object in the store."""
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    """(blob id, reason) for objects that fail authentication (deep check only)."""
    unindexed: list[str] = field(default_factory=list)
    """Objects with no index row: left by a crash between write and commit (never
    acknowledged), or being written right now. Reported, not deleted."""

    @property
    def ok(self) -> bool:
        """No indexed blob is missing or corrupt."""
        return not self.missing and not self.corrupt


def fsck(hub: Hub, *, deep: bool = False) -> FsckReport:
    """Check that every indexed blob exists (and with `deep`, decrypts and authenticates)."""
    report = FsckReport()
    stored = set(hub.blobs.iter_ids())
    with hub.sessions() as session:
        blobs = list(session.scalars(select(Blob).order_by(Blob.id)))
    report.blobs_indexed = len(blobs)
    for blob in blobs:
        if blob.id not in stored and not hub.blobs.exists(blob.id):
            report.missing.append(blob.id)
            continue
        if deep:
            try:
                for _ in vault.read(hub, blob):
                    pass
            except BlobNotFound:
                report.missing.append(blob.id)
                continue
            except CryptoError as exc:
                report.corrupt.append((blob.id, str(exc)))
                continue
            report.blobs_verified += 1
    indexed = {blob.id for blob in blobs}
    report.unindexed = sorted(stored - indexed)
    return report
