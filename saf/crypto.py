"""Envelope encryption for everything saf stores: key ring, sealed blobs, sealed index fields.

Layout of the keys:

* A **key ring** file holds the key-encryption keys (KEKs). One is active; older
  ones stay so that data sealed under them stays readable.
* Every blob gets a fresh random 256-bit **data key**, wrapped (RFC 3394) under
  the active KEK. The wrapped key lives in the blob's `BlobHeader`, which the
  index stores; the blob store holds only the sealed chunks.
* Small values kept in the index (a patient name, an instance's DICOM JSON) are
  sealed directly under a subkey of the KEK (`seal_value` for strings, `seal_bytes`
  for bytes), bound to a context naming the field and row.
* Rotation (`saf keys rotate`) adds a KEK and rewraps headers (`rewrap`) and
  sealed index fields (`reseal_value`, `reseal_bytes`); blob contents are never rewritten.

Sealed blob stream: the plaintext is cut into chunks of `chunk_size` bytes (the
last one may be shorter, or empty for an empty blob) and each chunk is sealed
with AES-256-GCM, giving `len(chunk) + 16` bytes. Chunk *i* uses nonce
``nonce_prefix || i`` (4 bytes, big-endian) and associated data
``b"saf-blob-v1" || blob_id || i (8 bytes) || last-flag (1 byte)``, so a chunk
moved, dropped, appended, or read under another blob's id fails authentication,
and a stream cut at a chunk boundary lacks its final-flagged chunk.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import secrets
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from saf.blobstore import Readable
from saf.fsutil import fsync_dir

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNKS",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "BlobHeader",
    "CryptoError",
    "IntegrityError",
    "KeyRing",
    "UnknownKeyError",
    "bytes_key_id",
    "open_bytes",
    "open_value",
    "reseal_bytes",
    "reseal_value",
    "rewrap",
    "seal",
    "seal_bytes",
    "seal_value",
    "sealed_size",
    "unseal",
    "value_key_id",
]

DEFAULT_CHUNK_SIZE: int = 1 << 20
"""Plaintext bytes per sealed chunk (1 MiB): bounds memory per blob stream."""

MIN_CHUNK_SIZE: int = 16
"""Smallest chunk size a header may declare (below this the 16-byte tags dominate)."""

MAX_CHUNK_SIZE: int = 1 << 26
"""Largest chunk size a header may declare (64 MiB), so a bad header cannot demand huge reads."""

MAX_CHUNKS: int = 2**32 - 1
"""Most chunks one blob may have: the chunk index is 4 bytes of the GCM nonce."""

TAG_SIZE: int = 16
"""Bytes an AES-GCM tag adds to each sealed chunk."""

_DATA_KEY_SIZE = 32
_WRAPPED_KEY_SIZE = _DATA_KEY_SIZE + 8  # RFC 3394 adds one 64-bit block
_NONCE_PREFIX_SIZE = 8
_KEK_SIZE = 32
_BLOB_AAD_MAGIC = b"saf-blob-v1"
_FIELD_HKDF_INFO = b"saf-field-v1"
_FIELD_TOKEN_VERSION = "v1"
_FIELD_NONCE_SIZE = 12
_BYTES_MAGIC = b"SB1"
_HEADER_MAGIC = b"SAF"
_HEADER_VERSION = 1
_KEYRING_FORMAT = "saf-keyring-v1"
# Key ids end up inside value tokens ("v1.<key id>.<data>") and headers, so they
# must never contain a dot and must stay short.
_KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class CryptoError(Exception):
    """Something saf cannot seal or open; the message says what and where."""


class IntegrityError(CryptoError):
    """Sealed data or a wrapped key did not verify: tampered, truncated, reordered, wrong key."""


class UnknownKeyError(CryptoError):
    """Data was sealed under a key id that the key ring does not hold."""


# --------------------------------------------------------------------------- key ring


@dataclass(frozen=True)
class _Kek:
    key_id: str
    created: datetime
    key: bytes = dataclasses.field(repr=False)


class KeyRing:
    """Key-encryption keys in a JSON file with mode 0600; one is active for new data.

    Instances are safe to share between threads. If another process rotates the
    file, `unwrap` and `open_value` pick up the new key the first time they meet
    its id; sealing keeps using the active key this instance last loaded.
    """

    def __init__(self, path: Path, keks: list[_Kek], active_key_id: str) -> None:
        # Use load/create/load_or_create: this only assembles already-validated parts.
        self._path = path
        self._keks: dict[str, _Kek] = {k.key_id: k for k in keks}
        self._active = active_key_id
        self._field_aeads: dict[str, AESGCM] = {}
        self._lock = threading.Lock()

    # ---- construction

    @classmethod
    def load(cls, path: Path | str) -> KeyRing:
        """Read an existing key ring; refuses files that group or others can access."""
        path = Path(path)
        keks, active = _read_keyring_file(path)
        return cls(path, keks, active)

    @classmethod
    def create(cls, path: Path | str) -> KeyRing:
        """Make a new key ring with one fresh KEK; refuses to overwrite an existing file."""
        path = Path(path)
        try:
            return cls._create(path)
        except FileExistsError:
            raise CryptoError(
                f"key ring {path} already exists; refusing to overwrite it "
                "(its keys may be the only way to read stored data)"
            ) from None

    @classmethod
    def load_or_create(cls, path: Path | str) -> KeyRing:
        """Load the key ring at path, creating it first if there is none."""
        path = Path(path)
        if not path.exists():
            try:
                return cls._create(path)
            except FileExistsError:
                pass  # another process created it first: use theirs
        return cls.load(path)

    @classmethod
    def _create(cls, path: Path) -> KeyRing:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        kek = _new_kek(1)
        _write_keyring_file(path, [kek], kek.key_id, overwrite=False)
        return cls(path, [kek], kek.key_id)

    # ---- inspection

    @property
    def path(self) -> Path:
        """The key ring file."""
        return self._path

    @property
    def active_key_id(self) -> str:
        """Id of the KEK that wraps new data keys and seals new values."""
        return self._active

    @property
    def key_ids(self) -> list[str]:
        """Ids of all KEKs, oldest first."""
        return list(self._keks)

    def created(self, key_id: str) -> datetime:
        """When a KEK was made (timezone-aware, UTC)."""
        return self._kek(key_id).created

    def __repr__(self) -> str:
        return (
            f"KeyRing(path={str(self._path)!r}, active={self._active!r}, key_ids={self.key_ids!r})"
        )

    # ---- rotation

    def rotate(self) -> str:
        """Add a new KEK, make it active, save the file atomically; return the new id."""
        with self._lock, _locked_dir(self._path.parent):
            # Start from the file, not from memory: another process may have
            # rotated since we loaded, and writing our stale list would destroy
            # its key and with it every blob sealed under that key.
            on_disk, _ = _read_keyring_file(self._path)
            merged = {k.key_id: k for k in on_disk}
            for kek in self._keks.values():
                merged.setdefault(kek.key_id, kek)
            new = _new_kek(len(merged) + 1)
            merged[new.key_id] = new
            _write_keyring_file(self._path, list(merged.values()), new.key_id, overwrite=True)
            self._keks = merged
            self._active = new.key_id
            return new.key_id

    # ---- data keys

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        """Wrap a data key under the active KEK (RFC 3394); returns (key id, wrapped key)."""
        kek = self._kek(self._active)
        return kek.key_id, aes_key_wrap(kek.key, data_key)

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        """Unwrap a data key wrapped under key_id; IntegrityError if it does not verify."""
        kek = self._kek(key_id)
        try:
            return aes_key_unwrap(kek.key, wrapped)
        except (InvalidUnwrap, ValueError):
            raise IntegrityError(
                f"wrapped data key does not unwrap under KEK {key_id} of key ring {self._path} "
                "(tampered header, or a different key ring that reuses the id)"
            ) from None

    # ---- internals

    def _kek(self, key_id: str) -> _Kek:
        kek = self._keks.get(key_id)
        if kek is None:
            self._reload()
            kek = self._keks.get(key_id)
        if kek is None:
            raise UnknownKeyError(
                f"key id {key_id} is not in key ring {self._path} "
                f"(it holds {', '.join(self._keks)}); was the data sealed with another key ring?"
            )
        return kek

    def _reload(self) -> None:
        # Another process (`saf keys rotate`) may have added keys since we loaded.
        with self._lock:
            try:
                keks, active = _read_keyring_file(self._path)
            except CryptoError:
                return  # keep serving the keys we have; the caller reports the unknown id
            for kek in keks:
                self._keks.setdefault(kek.key_id, kek)
            self._active = active

    def _field_aead(self, key_id: str) -> AESGCM:
        aead = self._field_aeads.get(key_id)
        if aead is None:
            subkey = HKDF(
                algorithm=hashes.SHA256(), length=32, salt=None, info=_FIELD_HKDF_INFO
            ).derive(self._kek(key_id).key)
            aead = self._field_aeads[key_id] = AESGCM(subkey)
        return aead


def _new_kek(sequence: int) -> _Kek:
    return _Kek(
        key_id=f"k{sequence:04d}-{secrets.token_hex(3)}",
        created=datetime.now(UTC).replace(microsecond=0),
        key=secrets.token_bytes(_KEK_SIZE),
    )


def _read_keyring_file(path: Path) -> tuple[list[_Kek], str]:
    try:
        # Symlinks are followed on purpose: secret mounts (Kubernetes, Docker)
        # present files through them. The mode check below is on the target.
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CryptoError(
            f"key ring {path} does not exist: check the configured path, or create a key ring"
        ) from None
    except OSError as exc:
        raise CryptoError(f"cannot open key ring {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        # fstat on the open descriptor: checks the file we actually read.
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise CryptoError(
                f"key ring {path} is accessible by group or others (mode {mode & 0o777:04o}); "
                f"refusing to use it. Run: chmod 600 {path}"
            )
        raw = f.read()
    try:
        doc = json.loads(raw)
        return _parse_keyring(doc)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise CryptoError(f"key ring {path} is corrupt: {exc}") from None


def _parse_keyring(doc: Any) -> tuple[list[_Kek], str]:
    if not isinstance(doc, dict) or doc.get("format") != _KEYRING_FORMAT:
        raise ValueError(f"not a {_KEYRING_FORMAT} document")
    keks: list[_Kek] = []
    for entry in doc["keys"]:
        key_id = entry["id"]
        if not isinstance(key_id, str) or not _KEY_ID_PATTERN.fullmatch(key_id):
            raise ValueError("malformed key id")
        if any(k.key_id == key_id for k in keks):
            raise ValueError(f"duplicate key id {key_id}")
        key = base64.b64decode(entry["key"], validate=True)
        if len(key) != _KEK_SIZE:
            raise ValueError(f"key {key_id} is not {_KEK_SIZE * 8} bits")
        created = datetime.fromisoformat(entry["created"])
        if created.tzinfo is None:
            raise ValueError(f"key {key_id} has a creation time without a timezone")
        keks.append(_Kek(key_id, created, key))
    active = doc["active"]
    if not any(k.key_id == active for k in keks):
        raise ValueError("active key id is not among the keys")
    return keks, active


def _write_keyring_file(path: Path, keks: list[_Kek], active: str, *, overwrite: bool) -> None:
    doc = {
        "format": _KEYRING_FORMAT,
        "active": active,
        "keys": [
            {
                "id": k.key_id,
                "created": k.created.isoformat(),
                "key": base64.b64encode(k.key).decode("ascii"),
            }
            for k in keks
        ],
    }
    data = json.dumps(doc, indent=2).encode("utf-8") + b"\n"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # 0600 from the first byte: never a moment where the keys are readable by others.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if path exists, so two concurrent creators cannot
            # overwrite each other's keys (rename would silently replace).
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def _locked_dir(path: Path) -> Iterator[None]:
    # flock on the directory itself: the key ring file is replaced by rename,
    # so a lock on the file would not be seen by the next writer.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- blob header


@dataclass(frozen=True)
class BlobHeader:
    """What is needed, besides the key ring, to open one sealed blob. Stored in the index."""

    key_id: str
    wrapped_key: bytes = dataclasses.field(repr=False)
    nonce_prefix: bytes = dataclasses.field(repr=False)
    chunk_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, str) or not _KEY_ID_PATTERN.fullmatch(self.key_id):
            raise ValueError("blob header: key_id must be 1-64 characters of [A-Za-z0-9_-]")
        if not isinstance(self.wrapped_key, bytes) or len(self.wrapped_key) != _WRAPPED_KEY_SIZE:
            raise ValueError(f"blob header: wrapped_key must be {_WRAPPED_KEY_SIZE} bytes")
        if not isinstance(self.nonce_prefix, bytes) or len(self.nonce_prefix) != _NONCE_PREFIX_SIZE:
            raise ValueError(f"blob header: nonce_prefix must be {_NONCE_PREFIX_SIZE} bytes")
        if (
            not isinstance(self.chunk_size, int)
            or isinstance(self.chunk_size, bool)
            or not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE
        ):
            raise ValueError(
                f"blob header: chunk_size must be an int in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
            )

    def to_bytes(self) -> bytes:
        """Compact binary form: b"SAF", version, key id, wrapped key, nonce prefix, chunk size."""
        key_id = self.key_id.encode("ascii")
        return b"".join(
            (
                _HEADER_MAGIC,
                bytes((_HEADER_VERSION, len(key_id))),
                key_id,
                bytes((len(self.wrapped_key),)),
                self.wrapped_key,
                self.nonce_prefix,
                struct.pack(">I", self.chunk_size),
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> BlobHeader:
        """Parse `to_bytes` output; ValueError if it is not a well-formed header."""
        data = bytes(data)
        magic_len = len(_HEADER_MAGIC)
        if len(data) < magic_len + 2 or data[:magic_len] != _HEADER_MAGIC:
            raise ValueError("blob header: not a saf blob header")
        version, key_id_len = data[magic_len], data[magic_len + 1]
        if version != _HEADER_VERSION:
            raise ValueError(f"blob header: unsupported version {version}")
        pos = magic_len + 2
        key_id_raw = data[pos : pos + key_id_len]
        pos += key_id_len
        if pos >= len(data):
            raise ValueError("blob header: truncated")
        wrapped_len = data[pos]
        pos += 1
        wrapped_key = data[pos : pos + wrapped_len]
        pos += wrapped_len
        nonce_prefix = data[pos : pos + _NONCE_PREFIX_SIZE]
        pos += _NONCE_PREFIX_SIZE
        if len(data) != pos + 4:
            raise ValueError("blob header: wrong length (truncated or trailing bytes)")
        (chunk_size,) = struct.unpack(">I", data[pos:])
        try:
            key_id = key_id_raw.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("blob header: key id is not ASCII") from None
        return cls(key_id, wrapped_key, nonce_prefix, chunk_size)


# --------------------------------------------------------------------------- sealed blobs


def seal(
    keyring: KeyRing,
    blob_id: str,
    plaintext: Readable,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[BlobHeader, Iterator[bytes]]:
    """Seal a plaintext stream under a fresh data key.

    Returns the header at once and a lazy iterator of sealed chunks that reads
    `plaintext` as it is consumed; memory stays O(chunk_size) whatever the size.
    Typical use: ``header, chunks = seal(...); store.put(blob_id, chunks)``,
    then record the header in the index.
    """
    _check_blob_id(blob_id)
    data_key = AESGCM.generate_key(bit_length=256)
    key_id, wrapped_key = keyring.wrap(data_key)
    header = BlobHeader(key_id, wrapped_key, secrets.token_bytes(_NONCE_PREFIX_SIZE), chunk_size)
    return header, _seal_chunks(AESGCM(data_key), blob_id, header, plaintext)


def _seal_chunks(
    aead: AESGCM, blob_id: str, header: BlobHeader, plaintext: Readable
) -> Iterator[bytes]:
    aad_prefix = _BLOB_AAD_MAGIC + blob_id.encode("utf-8")
    chunk_size = header.chunk_size
    current = _read_exact(plaintext, chunk_size)
    index = 0
    while True:
        # A short read means end of input; a full one needs a look ahead to know
        # whether this chunk is the last (an input that ends on a chunk boundary
        # gets a full-size final chunk, not an extra empty one).
        following = _read_exact(plaintext, chunk_size) if len(current) == chunk_size else b""
        last = not following
        if index >= MAX_CHUNKS:
            raise CryptoError(
                f"blob {blob_id}: plaintext too large for chunk size {chunk_size} "
                f"(more than {MAX_CHUNKS} chunks)"
            )
        yield aead.encrypt(
            _chunk_nonce(header.nonce_prefix, index),
            current,
            _chunk_aad(aad_prefix, index, last),
        )
        if last:
            return
        current = following
        index += 1


def unseal(keyring: KeyRing, blob_id: str, header: BlobHeader, sealed: Readable) -> Iterator[bytes]:
    """Open a sealed stream, yielding plaintext chunks, each verified before it is yielded.

    The data key is unwrapped at once (UnknownKeyError / IntegrityError raised
    by this call); chunk problems are raised as IntegrityError by the iterator.

    Caution: each chunk is authentic, but whether the *stream* is complete (not
    truncated, no trailing data) is known only when the iterator finishes. A
    caller that must not act on unverified data writes the plaintext to a
    temporary file and commits it only after the loop ends without error; a
    caller streaming to a client lets a late IntegrityError abort the response.
    """
    _check_blob_id(blob_id)
    data_key = keyring.unwrap(header.key_id, header.wrapped_key)
    if len(data_key) != _DATA_KEY_SIZE:
        raise IntegrityError(f"blob {blob_id}: unwrapped data key has the wrong length")
    return _unseal_chunks(AESGCM(data_key), blob_id, header, sealed)


def _unseal_chunks(
    aead: AESGCM, blob_id: str, header: BlobHeader, sealed: Readable
) -> Iterator[bytes]:
    aad_prefix = _BLOB_AAD_MAGIC + blob_id.encode("utf-8")
    full = header.chunk_size + TAG_SIZE
    current = _read_exact(sealed, full)
    if not current:
        raise IntegrityError(f"blob {blob_id}: truncated: sealed stream is empty (no chunks)")
    index = 0

    def attempt(chunk: bytes, index: int, last: bool) -> bytes | None:
        try:
            return aead.decrypt(
                _chunk_nonce(header.nonce_prefix, index), chunk, _chunk_aad(aad_prefix, index, last)
            )
        except InvalidTag:
            return None

    while True:
        if index >= MAX_CHUNKS:
            raise IntegrityError(f"blob {blob_id}: more than {MAX_CHUNKS} chunks")
        following = _read_exact(sealed, full) if len(current) == full else b""
        at_end = not following
        plain = attempt(current, index, last=at_end)
        if plain is not None:
            yield plain
            if at_end:
                return
            current = following
            index += 1
            continue
        # Failure path only: the second try tells the operator *what* went wrong.
        if at_end:
            if len(current) < TAG_SIZE:
                raise IntegrityError(
                    f"blob {blob_id}: truncated in chunk {index} "
                    f"({len(current)} bytes left, less than one tag)"
                )
            if attempt(current, index, last=False) is not None:
                raise IntegrityError(
                    f"blob {blob_id}: truncated after chunk {index} (no final chunk)"
                )
            raise IntegrityError(
                f"blob {blob_id}: chunk {index} failed authentication at end of stream "
                "(truncated mid-chunk, bytes appended, tampered, or wrong blob id/header)"
            )
        if attempt(current, index, last=True) is not None:
            raise IntegrityError(f"blob {blob_id}: trailing data after final chunk {index}")
        raise IntegrityError(
            f"blob {blob_id}: chunk {index} failed authentication "
            "(tampered, reordered, or wrong blob id/header)"
        )


def sealed_size(plain_size: int, chunk_size: int) -> int:
    """Size in bytes of the sealed stream for plain_size bytes of plaintext."""
    if plain_size < 0:
        raise ValueError("plain_size must be >= 0")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
    chunks = max(1, -(-plain_size // chunk_size))
    return plain_size + chunks * TAG_SIZE


def rewrap(keyring: KeyRing, header: BlobHeader) -> BlobHeader:
    """The same header with its data key rewrapped under the active KEK; content untouched."""
    data_key = keyring.unwrap(header.key_id, header.wrapped_key)
    key_id, wrapped_key = keyring.wrap(data_key)
    return dataclasses.replace(header, key_id=key_id, wrapped_key=wrapped_key)


def _chunk_nonce(prefix: bytes, index: int) -> bytes:
    return prefix + index.to_bytes(4, "big")


def _chunk_aad(aad_prefix: bytes, index: int, last: bool) -> bytes:
    return aad_prefix + index.to_bytes(8, "big") + (b"\x01" if last else b"\x00")


def _read_exact(stream: Readable, n: int) -> bytes:
    # Sockets, HTTP bodies and pipes may return less than asked before the end;
    # chunk boundaries must not depend on that, so read until n bytes or EOF.
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _check_blob_id(blob_id: str) -> None:
    if not isinstance(blob_id, str) or not blob_id:
        raise ValueError("blob_id must be a non-empty string")


# --------------------------------------------------------------------------- sealed fields


def seal_value(keyring: KeyRing, value: str, *, context: str) -> str:
    """Seal a short string (e.g. a patient name) for the index; returns an ASCII token.

    `context` names the field (e.g. "patient.name"); a token opens only under
    the same context. Each call uses a fresh nonce, so equal values give
    different tokens (the index cannot be searched by equality on them).
    The token reveals the value's length.
    """
    _check_context(context)
    key_id = keyring.active_key_id
    nonce = secrets.token_bytes(_FIELD_NONCE_SIZE)
    sealed = keyring._field_aead(key_id).encrypt(
        nonce, value.encode("utf-8"), context.encode("utf-8")
    )
    data = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")
    return f"{_FIELD_TOKEN_VERSION}.{key_id}.{data}"


def open_value(keyring: KeyRing, token: str, *, context: str) -> str:
    """Open a token made by seal_value under the same context; IntegrityError otherwise."""
    _check_context(context)
    key_id, blob = _parse_token(token)
    try:
        plain = keyring._field_aead(key_id).decrypt(
            blob[:_FIELD_NONCE_SIZE], blob[_FIELD_NONCE_SIZE:], context.encode("utf-8")
        )
    except InvalidTag:
        raise IntegrityError(
            f"sealed value under key {key_id} failed authentication for context {context!r} "
            "(wrong field, tampered, or a different key ring that reuses the id)"
        ) from None
    return plain.decode("utf-8")


def value_key_id(token: str) -> str:
    """Id of the KEK a token was sealed under (to find values that rotation must reseal)."""
    return _parse_token(token)[0]


def reseal_value(keyring: KeyRing, token: str, *, context: str) -> str:
    """Reseal a token under the active KEK.

    A token already under the active KEK is verified and returned unchanged, so
    a rotation pass that is re-run writes only what still needs it.
    """
    value = open_value(keyring, token, context=context)
    if value_key_id(token) == keyring.active_key_id:
        return token
    return seal_value(keyring, value, context=context)


def _parse_token(token: str) -> tuple[str, bytes]:
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3 or parts[0] != _FIELD_TOKEN_VERSION:
        raise IntegrityError(
            f"malformed sealed value: expected '{_FIELD_TOKEN_VERSION}.<key id>.<data>'"
        )
    _, key_id, data = parts
    if not _KEY_ID_PATTERN.fullmatch(key_id):
        raise IntegrityError("malformed sealed value: bad key id")
    try:
        blob = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        raise IntegrityError(f"malformed sealed value under key {key_id}: bad base64") from None
    if len(blob) < _FIELD_NONCE_SIZE + TAG_SIZE:
        raise IntegrityError(f"malformed sealed value under key {key_id}: too short")
    return key_id, blob


def _check_context(context: str) -> None:
    if not isinstance(context, str) or not context:
        raise ValueError("context must be a non-empty string such as 'patient.name'")


# --------------------------------------------------------------------------- sealed bytes


def seal_bytes(keyring: KeyRing, data: bytes, *, context: str) -> bytes:
    """Seal bytes for an index column (same keys as `seal_value`); returns
    ``b"SB1" || len(key id) || key id || nonce || ciphertext``.

    `context` names the field and the row it belongs to (e.g. "instance_metadata:<id>"),
    so sealed bytes copied into another row or column do not open.
    """
    _check_context(context)
    key_id = keyring.active_key_id
    nonce = secrets.token_bytes(_FIELD_NONCE_SIZE)
    sealed = keyring._field_aead(key_id).encrypt(nonce, data, context.encode("utf-8"))
    key = key_id.encode("ascii")
    return b"".join((_BYTES_MAGIC, bytes((len(key),)), key, nonce, sealed))


def open_bytes(keyring: KeyRing, sealed: bytes, *, context: str) -> bytes:
    """Open bytes made by seal_bytes under the same context; IntegrityError otherwise."""
    _check_context(context)
    key_id, nonce, body = _parse_sealed_bytes(sealed)
    try:
        return keyring._field_aead(key_id).decrypt(nonce, body, context.encode("utf-8"))
    except InvalidTag:
        raise IntegrityError(
            f"sealed bytes under key {key_id} failed authentication for context {context!r} "
            "(wrong row or field, tampered, or a different key ring that reuses the id)"
        ) from None


def bytes_key_id(sealed: bytes) -> str:
    """Id of the KEK that sealed `sealed` (made by seal_bytes)."""
    return _parse_sealed_bytes(sealed)[0]


def reseal_bytes(keyring: KeyRing, sealed: bytes, *, context: str) -> bytes:
    """Reseal bytes under the active KEK; already under it: verified and returned unchanged."""
    data = open_bytes(keyring, sealed, context=context)
    if bytes_key_id(sealed) == keyring.active_key_id:
        return sealed
    return seal_bytes(keyring, data, context=context)


def _parse_sealed_bytes(sealed: bytes) -> tuple[str, bytes, bytes]:
    sealed = bytes(sealed)
    head = len(_BYTES_MAGIC)
    if len(sealed) < head + 1 or sealed[:head] != _BYTES_MAGIC:
        raise IntegrityError("malformed sealed bytes: not made by seal_bytes")
    end = head + 1 + sealed[head]
    try:
        key_id = sealed[head + 1 : end].decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError("malformed sealed bytes: bad key id") from None
    if not _KEY_ID_PATTERN.fullmatch(key_id):
        raise IntegrityError("malformed sealed bytes: bad key id")
    if len(sealed) < end + _FIELD_NONCE_SIZE + TAG_SIZE:
        raise IntegrityError(f"malformed sealed bytes under key {key_id}: too short")
    return key_id, sealed[end : end + _FIELD_NONCE_SIZE], sealed[end + _FIELD_NONCE_SIZE :]
