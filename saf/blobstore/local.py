"""Blob store on a local filesystem: root/ab/<id>, written by temp file and rename."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Final

from saf.blobstore import BLOB_ID_PATTERN, BlobNotFound, validate_blob_id
from saf.fsutil import fsync_dir

__all__ = ["LocalBlobStore"]

FSYNC_THREADS: Final = 8
"""fsyncs in flight at once in `LocalBlobStore.put_many`."""

_FAN_OUT_PATTERN = re.compile(r"^[0-9a-f]{2}$")
_TEMP_PATTERN = re.compile(r"^\.([0-9a-f]{16,64})\.[0-9a-f]+\.tmp$")


class LocalBlobStore:
    """Blobs as files under `root`, fanned out into 256 directories by the id's first byte.

    One level, not two: ext4/XFS directories index millions of entries, and a
    second level would cost a mkdir and a directory fsync on most puts until
    all 65,536 directories exist.

    Directories are created 0700 and files 0600: sealed content is not secret,
    but which studies exist and how big they are is nobody else's business.
    """

    def __init__(self, root: Path | str) -> None:
        self._root = Path(root).absolute()
        self._known_dirs: set[Path] = set()

    @property
    def root(self) -> Path:
        """The directory holding the fan-out tree."""
        return self._root

    def path_for(self, blob_id: str) -> Path:
        """Where the blob with this id lives (whether or not it exists)."""
        validate_blob_id(blob_id)
        return self._root / blob_id[:2] / blob_id

    def put(self, blob_id: str, chunks: Iterable[bytes]) -> int:
        """Write all chunks to a temp file, fsync, rename into place, fsync the directory."""
        target = self.path_for(blob_id)
        if target.parent not in self._known_dirs:
            self._make_dirs(target.parent)
            self._known_dirs.add(target.parent)
        tmp = target.with_name(f".{blob_id}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        written = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    written += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            # BaseException too: a KeyboardInterrupt or a generator closed
            # mid-way must not leave a temp file behind either.
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
        return written

    def put_many(self, blobs: Sequence[tuple[str, Iterable[bytes]]]) -> list[int]:
        """Write every blob to its temp file, fsync them all at once (`FSYNC_THREADS` in
        flight: the journal commits concurrent fsyncs together), rename each into place,
        then fsync each directory once. On failure, temp files and renamed blobs go."""
        staged: list[tuple[Path, Path]] = []
        placed: list[Path] = []
        written: list[int] = []
        try:
            for blob_id, chunks in blobs:
                target = self.path_for(blob_id)
                if target.parent not in self._known_dirs:
                    self._make_dirs(target.parent)
                    self._known_dirs.add(target.parent)
                tmp = target.with_name(f".{blob_id}.{secrets.token_hex(4)}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                staged.append((tmp, target))
                size = 0
                with os.fdopen(fd, "wb") as f:
                    for chunk in chunks:
                        f.write(chunk)
                        size += len(chunk)
                written.append(size)
            with ThreadPoolExecutor(FSYNC_THREADS) as pool:
                list(pool.map(_fsync_file, [tmp for tmp, _target in staged]))
                for tmp, target in staged:
                    os.replace(tmp, target)
                    placed.append(target)
                list(pool.map(fsync_dir, sorted({target.parent for _tmp, target in staged})))
        except BaseException:
            for tmp, _target in staged:
                tmp.unlink(missing_ok=True)
            for target in placed:
                target.unlink(missing_ok=True)
            raise
        return written

    def open(self, blob_id: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """Open the blob file for reading; BlobNotFound if it does not exist."""
        path = self.path_for(blob_id)
        try:
            return path.open("rb")
        except FileNotFoundError:
            raise BlobNotFound(blob_id, self.describe()) from None

    def exists(self, blob_id: str) -> bool:
        """Whether the blob file exists."""
        return self.path_for(blob_id).is_file()

    def delete(self, blob_id: str) -> None:
        """Remove the blob file if present, durably."""
        path = self.path_for(blob_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def iter_ids(self) -> Iterator[str]:
        """Every stored blob id, in sorted order; temp files and strays are skipped."""
        for fan_out in _sorted_subdirs(self._root):
            for entry in sorted(os.scandir(fan_out), key=lambda e: e.name):
                name = entry.name
                if (
                    BLOB_ID_PATTERN.fullmatch(name)
                    and name.startswith(fan_out.name)
                    and entry.is_file(follow_symlinks=False)
                ):
                    yield name

    def sweep_temp(self, older_than_seconds: float) -> int:
        """Delete temp files left by crashed writes, if untouched for older_than_seconds.

        A put in progress keeps its temp file's mtime fresh as it writes, so a
        threshold well above the longest pause of a slow producer is safe.
        Returns the number of files removed.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        for fan_out in _sorted_subdirs(self._root):
            for entry in os.scandir(fan_out):
                if not _TEMP_PATTERN.fullmatch(entry.name):
                    continue
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass  # finished or swept by someone else meanwhile
        return removed

    def check(self) -> None:
        """The root must be a directory we can write into."""
        if not self._root.is_dir():
            raise NotADirectoryError(f"blob root {self._root} is not a directory")
        if not os.access(self._root, os.W_OK | os.X_OK):
            raise PermissionError(f"blob root {self._root} is not writable")

    def describe(self) -> str:
        """E.g. "local:/var/lib/saf/blobs"."""
        return f"local:{self._root}"

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self._root)!r})"

    def _make_dirs(self, directory: Path) -> None:
        # Created one level at a time: os.makedirs applies `mode` to the leaf
        # only, and each new entry's parent is fsynced so the tree survives a crash.
        missing: list[Path] = []
        d = directory
        while not d.is_dir():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:
                continue  # a concurrent put made it
            fsync_dir(d.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sorted_subdirs(path: Path) -> list[Path]:
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return []
    return sorted(
        Path(e.path)
        for e in entries
        if _FAN_OUT_PATTERN.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
    )
