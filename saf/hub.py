"""The hub's open resources (settings, database, key ring, blob store), built once per process."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from saf.blobstore import BlobStore
from saf.blobstore.local import LocalBlobStore
from saf.blobstore.s3 import S3BlobStore
from saf.crypto import KeyRing
from saf.db import make_engine, make_sessionmaker, migrate
from saf.settings import Settings


class NotInitialisedError(RuntimeError):
    """The data dir has no key ring yet: `saf init` (or `saf up`) creates it."""


def make_blob_store(settings: Settings) -> BlobStore:
    """The blob store the settings name."""
    if settings.blob_backend == "s3":
        assert settings.s3_bucket  # checked by Settings
        return S3BlobStore(
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
        )
    return LocalBlobStore(settings.blob_dir)


@dataclass
class Hub:
    """Everything a saf function needs to touch storage; thread-safe to share."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    _keyring: KeyRing
    _keyring_mtime: float = 0.0
    row_ids: dict[tuple[str, ...], str] = field(default_factory=dict)
    """Ids of committed study/series rows by natural key, to spare look-ups when ingesting.
    Whatever deletes or merges studies or series must clear it."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, settings: Settings, *, create: bool = False) -> Hub:
        """Open the hub's storage; with `create`, make the data dir, key ring and schema."""
        keyring_path = settings.effective_keyring_path
        if create:
            _make_private_dir(settings.data_dir)
            keyring = KeyRing.load_or_create(keyring_path)
        elif not keyring_path.exists():
            raise NotInitialisedError(
                f"no key ring at {keyring_path}: run `saf init` first "
                "(or point SAF_DATA_DIR / SAF_KEYRING_PATH at an initialised hub)"
            )
        else:
            keyring = KeyRing.load(keyring_path)
        _make_private_dir(settings.spool_dir)
        engine = make_engine(settings.effective_database_url)
        migrate(engine)
        blobs = make_blob_store(settings)
        if create and isinstance(blobs, S3BlobStore):
            blobs.ensure_bucket()
        if isinstance(blobs, LocalBlobStore):
            _make_private_dir(blobs.root)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_sessionmaker(engine),
            blobs=blobs,
            _keyring=keyring,
            _keyring_mtime=_mtime(keyring_path),
        )

    @property
    def keyring(self) -> KeyRing:
        """The key ring, reloaded when `saf keys rotate` changed it in another process."""
        path = self._keyring.path
        mtime = _mtime(path)
        if mtime != self._keyring_mtime:
            with self._lock:
                if mtime != self._keyring_mtime:
                    self._keyring = KeyRing.load(path)
                    self._keyring_mtime = mtime
        return self._keyring

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()


def _mtime(path: Path) -> float:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return 0.0


def _make_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
