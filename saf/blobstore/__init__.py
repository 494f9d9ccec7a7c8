"""Where sealed blob bytes live: the BlobStore contract shared by every backend."""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

__all__ = [
    "BLOB_ID_PATTERN",
    "BlobNotFound",
    "BlobStore",
    "Readable",
    "new_blob_id",
    "validate_blob_id",
]

BLOB_ID_PATTERN: re.Pattern[str] = re.compile(r"^[0-9a-f]{16,64}$")
"""What a blob id may look like: opaque lowercase hex, so no PHI can become a key or path."""


class BlobNotFound(KeyError):
    """No blob is stored under the requested id."""

    def __init__(self, blob_id: str, where: str) -> None:
        super().__init__(blob_id)
        self.blob_id = blob_id
        self.where = where

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the argument; operators want a sentence.
        return f"blob {self.blob_id} not found in {self.where}"


class Readable(Protocol):
    """A byte stream being read: a local file, or the body of an S3 response."""

    def read(self, n: int = -1) -> bytes: ...


class BlobStore(Protocol):
    """Durable, atomic storage of sealed blobs under opaque hex ids."""

    def put(self, blob_id: str, chunks: Iterable[bytes]) -> int:
        """Store all chunks under blob_id and return the number of bytes written.

        Durable when it returns. Atomic: readers never see a partial object, and
        if `chunks` raises (or the process dies) nothing is left under blob_id.
        An existing blob with the same id is replaced.
        """
        ...

    def put_many(self, blobs: Sequence[tuple[str, Iterable[bytes]]]) -> list[int]:
        """`put` each (blob_id, chunks) and return the bytes written for each.

        Durable when it returns, every blob atomic as with `put`; if it raises, none of
        them is left. A backend may make them durable together (cheaper than one by one).
        """
        ...

    def open(self, blob_id: str) -> contextlib.AbstractContextManager[Readable]:
        """Open a stored blob for reading; raises BlobNotFound if it is missing."""
        ...

    def exists(self, blob_id: str) -> bool:
        """Whether a blob is stored under blob_id."""
        ...

    def delete(self, blob_id: str) -> None:
        """Remove a blob; deleting a missing blob is not an error."""
        ...

    def iter_ids(self) -> Iterator[str]:
        """Every stored blob id (in-progress and abandoned writes excluded)."""
        ...

    def describe(self) -> str:
        """Where the blobs live, for logs and error messages (never credentials)."""
        ...

    def check(self) -> None:
        """Raise OSError (or the backend's error) if blobs cannot be written now."""
        ...


def validate_blob_id(blob_id: str) -> str:
    """Return blob_id unchanged if it is a well-formed blob id, else raise ValueError."""
    if isinstance(blob_id, str) and BLOB_ID_PATTERN.fullmatch(blob_id):
        return blob_id
    # The value is not echoed: a caller that passed something other than an id
    # may well have passed PHI (a patient name, an accession number).
    got = f"{len(blob_id)} characters" if isinstance(blob_id, str) else type(blob_id).__name__
    raise ValueError(f"invalid blob id: expected 16-64 lowercase hex characters, got {got}")


def new_blob_id() -> str:
    """A fresh random blob id (128 bits, 32 hex characters)."""
    return secrets.token_hex(16)
