"""Tests for saf.crypto: key ring, sealed blobs, and sealed index fields."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from saf import crypto
from saf.crypto import (
    DEFAULT_CHUNK_SIZE,
    TAG_SIZE,
    BlobHeader,
    CryptoError,
    IntegrityError,
    KeyRing,
    UnknownKeyError,
    open_value,
    reseal_value,
    rewrap,
    seal,
    seal_value,
    sealed_size,
    unseal,
    value_key_id,
)

CHUNK = 64
SEALED_CHUNK = CHUNK + TAG_SIZE
BLOB_ID = "0123456789abcdef0123456789abcdef"
OTHER_BLOB_ID = "fedcba9876543210fedcba9876543210"


@pytest.fixture
def keyring(tmp_path: Path) -> KeyRing:
    return KeyRing.create(tmp_path / "keys" / "keyring.json")


def seal_bytes(
    keyring: KeyRing, data: bytes, *, blob_id: str = BLOB_ID, chunk_size: int = CHUNK
) -> tuple[BlobHeader, bytes]:
    header, chunks = seal(keyring, blob_id, io.BytesIO(data), chunk_size=chunk_size)
    return header, b"".join(chunks)


def unseal_bytes(
    keyring: KeyRing, header: BlobHeader, sealed: bytes, *, blob_id: str = BLOB_ID
) -> bytes:
    return b"".join(unseal(keyring, blob_id, header, io.BytesIO(sealed)))


def sealed_chunks(sealed: bytes) -> list[bytes]:
    return [sealed[i : i + SEALED_CHUNK] for i in range(0, len(sealed), SEALED_CHUNK)]


def flip_bit(data: bytes, byte_index: int, bit: int = 0) -> bytes:
    mutable = bytearray(data)
    mutable[byte_index] ^= 1 << bit
    return bytes(mutable)


class TrickleReader:
    """Returns at most `step` bytes per read, like a socket or an HTTP body."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = data
        self._pos = 0
        self._step = step
        self.reads = 0

    def read(self, n: int = -1) -> bytes:
        self.reads += 1
        take = self._step if n < 0 else min(n, self._step)
        piece = self._data[self._pos : self._pos + take]
        self._pos += len(piece)
        return piece


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 5 * CHUNK, 5 * CHUNK + 7]
)
def test_round_trip(keyring: KeyRing, size: int) -> None:
    data = os.urandom(size)
    header, sealed = seal_bytes(keyring, data)
    assert len(sealed) == sealed_size(size, CHUNK)
    assert unseal_bytes(keyring, header, sealed) == data


def test_round_trip_default_chunk_size(keyring: KeyRing) -> None:
    data = os.urandom(2 * DEFAULT_CHUNK_SIZE + 3)
    header, chunks = seal(keyring, BLOB_ID, io.BytesIO(data))
    sealed_list = list(chunks)
    assert header.chunk_size == DEFAULT_CHUNK_SIZE
    assert [len(c) for c in sealed_list] == [DEFAULT_CHUNK_SIZE + TAG_SIZE] * 2 + [3 + TAG_SIZE]
    sealed = b"".join(sealed_list)
    assert len(sealed) == sealed_size(len(data), DEFAULT_CHUNK_SIZE)
    plain = list(unseal(keyring, BLOB_ID, header, io.BytesIO(sealed)))
    assert [len(p) for p in plain] == [DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE, 3]
    assert b"".join(plain) == data


def test_empty_input_gives_one_empty_final_chunk(keyring: KeyRing) -> None:
    header, chunks = seal(keyring, BLOB_ID, io.BytesIO(b""), chunk_size=CHUNK)
    sealed = list(chunks)
    assert [len(c) for c in sealed] == [TAG_SIZE]
    assert list(unseal(keyring, BLOB_ID, header, io.BytesIO(sealed[0]))) == [b""]


def test_input_on_chunk_boundary_has_no_extra_empty_chunk(keyring: KeyRing) -> None:
    _, chunks = seal(keyring, BLOB_ID, io.BytesIO(b"x" * 3 * CHUNK), chunk_size=CHUNK)
    assert [len(c) for c in chunks] == [SEALED_CHUNK] * 3


def test_short_reads_do_not_change_chunking(keyring: KeyRing) -> None:
    data = os.urandom(4 * CHUNK + 10)
    header, chunks = seal(keyring, BLOB_ID, TrickleReader(data, 7), chunk_size=CHUNK)
    sealed = b"".join(chunks)
    assert len(sealed) == sealed_size(len(data), CHUNK)
    plain = b"".join(unseal(keyring, BLOB_ID, header, TrickleReader(sealed, 5)))
    assert plain == data


def test_seal_is_lazy(keyring: KeyRing) -> None:
    source = TrickleReader(os.urandom(10 * CHUNK), CHUNK)
    header, chunks = seal(keyring, BLOB_ID, source, chunk_size=CHUNK)
    assert header.key_id == keyring.active_key_id
    assert source.reads == 0
    next(chunks)
    assert source.reads == 2  # the first chunk plus the look-ahead


def test_each_blob_gets_fresh_data_key_and_nonce_prefix(keyring: KeyRing) -> None:
    h1, s1 = seal_bytes(keyring, b"same plaintext")
    h2, s2 = seal_bytes(keyring, b"same plaintext")
    assert h1.wrapped_key != h2.wrapped_key
    assert h1.nonce_prefix != h2.nonce_prefix
    assert s1 != s2


def test_sealed_size() -> None:
    assert sealed_size(0, CHUNK) == TAG_SIZE
    assert sealed_size(1, CHUNK) == 1 + TAG_SIZE
    assert sealed_size(CHUNK, CHUNK) == CHUNK + TAG_SIZE
    assert sealed_size(CHUNK + 1, CHUNK) == CHUNK + 1 + 2 * TAG_SIZE
    assert sealed_size(2 << 30, DEFAULT_CHUNK_SIZE) == (2 << 30) + 2048 * TAG_SIZE
    with pytest.raises(ValueError):
        sealed_size(-1, CHUNK)
    with pytest.raises(ValueError):
        sealed_size(10, 0)


def test_too_many_chunks_refused(keyring: KeyRing, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypto, "MAX_CHUNKS", 3)
    header, sealed = seal_bytes(keyring, b"x" * 3 * CHUNK)  # exactly at the limit
    assert unseal_bytes(keyring, header, sealed) == b"x" * 3 * CHUNK
    with pytest.raises(CryptoError, match="more than 3 chunks"):
        seal_bytes(keyring, b"x" * (3 * CHUNK + 1))
    monkeypatch.setattr(crypto, "MAX_CHUNKS", 2)
    with pytest.raises(IntegrityError, match="more than 2 chunks"):
        unseal_bytes(keyring, header, sealed)


@pytest.mark.parametrize("bad_id", ["", None])
def test_seal_needs_a_blob_id(keyring: KeyRing, bad_id: str) -> None:
    with pytest.raises(ValueError):
        seal(keyring, bad_id, io.BytesIO(b"x"))


# --------------------------------------------------------------------------- tampering


@pytest.fixture
def three_chunks(keyring: KeyRing) -> tuple[BlobHeader, bytes, bytes]:
    """A blob of two full chunks and a short final one."""
    data = os.urandom(2 * CHUNK + 20)
    header, sealed = seal_bytes(keyring, data)
    assert len(sealed_chunks(sealed)) == 3
    return header, sealed, data


def test_flipped_bit_anywhere_is_detected(
    keyring: KeyRing, three_chunks: tuple[BlobHeader, bytes, bytes]
) -> None:
    header, sealed, data = three_chunks
    # Every byte: ciphertext and tag of the first, middle and last chunk.
    for i in range(len(sealed)):
        tampered = flip_bit(sealed, i, bit=i % 8)
        yielded: list[bytes] = []
        with pytest.raises(IntegrityError, match=f"chunk {i // SEALED_CHUNK}"):
            yielded.extend(unseal(keyring, BLOB_ID, header, io.BytesIO(tampered)))
        # Only chunks before the tampered one were released.
        assert b"".join(yielded) == data[: (i // SEALED_CHUNK) * CHUNK]


@pytest.mark.parametrize(
    "region", ["first chunk body", "first chunk tag", "last chunk body", "last chunk tag"]
)
def test_flipped_bit_by_region(
    keyring: KeyRing, three_chunks: tuple[BlobHeader, bytes, bytes], region: str
) -> None:
    header, sealed, _ = three_chunks
    index = {
        "first chunk body": 0,
        "first chunk tag": SEALED_CHUNK - 1,
        "last chunk body": 2 * SEALED_CHUNK,
        "last chunk tag": len(sealed) - 1,
    }[region]
    with pytest.raises(IntegrityError, match="failed authentication"):
        unseal_bytes(keyring, header, flip_bit(sealed, index))


def test_tampered_header_is_detected(
    keyring: KeyRing, three_chunks: tuple[BlobHeader, bytes, bytes]
) -> None:
    header, sealed, _ = three_chunks
    bad_nonce = dataclasses.replace(header, nonce_prefix=flip_bit(header.nonce_prefix, 0))
    with pytest.raises(IntegrityError, match="chunk 0 failed authentication"):
        unseal_bytes(keyring, bad_nonce, sealed)
    bad_wrap = dataclasses.replace(header, wrapped_key=flip_bit(header.wrapped_key, 5))
    with pytest.raises(IntegrityError, match=f"KEK {header.key_id}"):
        unseal(keyring, BLOB_ID, bad_wrap, io.BytesIO(sealed))  # raised at call time
    bad_size = dataclasses.replace(header, chunk_size=CHUNK * 2)
    with pytest.raises(IntegrityError):
        unseal_bytes(keyring, bad_size, sealed)


def test_truncated_mid_chunk(
    keyring: KeyRing, three_chunks: tuple[BlobHeader, bytes, bytes]
) -> None:
    header, sealed, _ = three_chunks
    for cut in (SEALED_CHUNK + 40, SEALED_CHUNK + 5, len(sealed) - 1, 1):
        with pytest.raises(IntegrityError, match="truncated"):
            unseal_bytes(keyring, header, sealed[:cut])


def test_truncated_at_chunk_boundary(
    keyring: KeyRing, three_chunks: tuple[BlobHeader, bytes, bytes]
) -> None:
    header, sealed, _ = three_chunks
    with pytest.raises(IntegrityError, match=r"truncated after chunk 0 \(no final chunk\)"):
        unseal_bytes(keyring, header, sealed[:SEALED_CHUNK])
    # Dropping the final chunk leaves a stream that ends exactly on a boundary.
    with pytest.raises(IntegrityError, match=r"truncated after chunk 1 \(no final chunk\)"):
        unseal_bytes(keyring, header, sealed[: 2 * SEALED_CHUNK])


def test_empty_sealed_stream_is_truncation(keyring: KeyRing) -> None:
    header, _ = seal_bytes(keyring, b"something")
    with pytest.raises(IntegrityError, match="truncated"):
        unseal_bytes(keyring, header, b"")


def test_dropping_full_final_chunk(keyring: KeyRing) -> None:
    header, sealed = seal_bytes(keyring, os.urandom(3 * CHUNK))
    with pytest.raises(IntegrityError, match=r"truncated after chunk 1 \(no final chunk\)"):
        unseal_bytes(keyring, header, sealed[: 2 * SEALED_CHUNK])


def test_swapped_and_replayed_chunks(
    keyring: KeyRing, three_chunks: tuple[BlobHeader, bytes, bytes]
) -> None:
    header, sealed, _ = three_chunks
    c0, c1, c2 = sealed_chunks(sealed)
    for reordered in (c1 + c0 + c2, c0 + c0 + c2, c0 + c1 + c1[:36], c2 + c1 + c0):
        with pytest.raises(IntegrityError):
            unseal_bytes(keyring, header, reordered)
    with pytest.raises(IntegrityError, match="chunk 0 failed authentication"):
        unseal_bytes(keyring, header, c1 + c0 + c2)


def test_swapping_with_final_chunk_of_full_size(keyring: KeyRing) -> None:
    header, sealed = seal_bytes(keyring, os.urandom(3 * CHUNK))
    c0, c1, c2 = sealed_chunks(sealed)
    with pytest.raises(IntegrityError):
        unseal_bytes(keyring, header, c0 + c2 + c1)


@pytest.mark.parametrize(
    "garbage",
    [b"\x00", b"x" * TAG_SIZE, os.urandom(SEALED_CHUNK + 3)],
    ids=["one byte", "a tag's worth", "more than a chunk"],
)
def test_appended_garbage(
    keyring: KeyRing, three_chunks: tuple[BlobHeader, bytes, bytes], garbage: bytes
) -> None:
    header, sealed, _ = three_chunks
    with pytest.raises(IntegrityError):
        unseal_bytes(keyring, header, sealed + garbage)


def test_trailing_data_after_full_final_chunk_is_named(keyring: KeyRing) -> None:
    header, sealed = seal_bytes(keyring, os.urandom(2 * CHUNK))
    for garbage in (b"\x00", sealed[:SEALED_CHUNK], sealed):
        with pytest.raises(IntegrityError, match="trailing data after final chunk 1"):
            unseal_bytes(keyring, header, sealed + garbage)


def test_wrong_blob_id(keyring: KeyRing, three_chunks: tuple[BlobHeader, bytes, bytes]) -> None:
    header, sealed, _ = three_chunks
    with pytest.raises(IntegrityError, match=f"blob {OTHER_BLOB_ID}: chunk 0 failed"):
        unseal_bytes(keyring, header, sealed, blob_id=OTHER_BLOB_ID)


def test_blob_sealed_under_other_id_cannot_be_substituted(keyring: KeyRing) -> None:
    header_a, _ = seal_bytes(keyring, b"study A", blob_id=BLOB_ID)
    header_b, sealed_b = seal_bytes(keyring, b"study B", blob_id=OTHER_BLOB_ID)
    with pytest.raises(IntegrityError):
        unseal_bytes(keyring, header_a, sealed_b)
    # Even with the other blob's header, the id in the AAD does not match.
    with pytest.raises(IntegrityError):
        unseal_bytes(keyring, header_b, sealed_b, blob_id=BLOB_ID)


# --------------------------------------------------------------------------- keys and rings


def test_another_key_ring_cannot_open(keyring: KeyRing, tmp_path: Path) -> None:
    other = KeyRing.create(tmp_path / "other" / "keyring.json")
    header, sealed = seal_bytes(keyring, b"secret pixels")
    with pytest.raises(UnknownKeyError) as excinfo:
        unseal(other, BLOB_ID, header, io.BytesIO(sealed))
    message = str(excinfo.value)
    assert header.key_id in message
    assert str(other.path) in message
    with pytest.raises(UnknownKeyError):
        other.unwrap(header.key_id, header.wrapped_key)


def test_same_key_id_with_different_key_fails_integrity(keyring: KeyRing, tmp_path: Path) -> None:
    impostor_path = tmp_path / "impostor.json"
    KeyRing.create(impostor_path)
    doc = json.loads(impostor_path.read_text())
    doc["keys"][0]["id"] = doc["active"] = keyring.active_key_id
    impostor_path.write_text(json.dumps(doc))
    impostor = KeyRing.load(impostor_path)
    assert impostor.active_key_id == keyring.active_key_id

    header, sealed = seal_bytes(keyring, b"secret pixels")
    with pytest.raises(IntegrityError, match="does not unwrap"):
        unseal(impostor, BLOB_ID, header, io.BytesIO(sealed))
    token = seal_value(keyring, "DOE^JANE", context="patient.name")
    with pytest.raises(IntegrityError):
        open_value(impostor, token, context="patient.name")


def test_wrap_unwrap(keyring: KeyRing) -> None:
    data_key = os.urandom(32)
    key_id, wrapped = keyring.wrap(data_key)
    assert key_id == keyring.active_key_id
    assert len(wrapped) == 40
    assert keyring.unwrap(key_id, wrapped) == data_key
    with pytest.raises(IntegrityError):
        keyring.unwrap(key_id, flip_bit(wrapped, 0))


def test_rotation_rewraps_headers_only(keyring: KeyRing) -> None:
    data = os.urandom(3 * CHUNK + 1)
    old_header, sealed = seal_bytes(keyring, data)
    k1 = keyring.active_key_id
    sealed_before = bytes(sealed)

    k2 = keyring.rotate()
    assert k2 != k1
    assert keyring.active_key_id == k2
    assert keyring.key_ids == [k1, k2]

    new_header = rewrap(keyring, old_header)
    assert new_header.key_id == k2
    assert new_header.wrapped_key != old_header.wrapped_key
    assert new_header.nonce_prefix == old_header.nonce_prefix
    assert new_header.chunk_size == old_header.chunk_size
    assert sealed == sealed_before  # content untouched
    assert unseal_bytes(keyring, new_header, sealed) == data
    assert unseal_bytes(keyring, old_header, sealed) == data  # old headers still open

    # A fresh load of the file sees the same thing.
    reloaded = KeyRing.load(keyring.path)
    assert reloaded.key_ids == [k1, k2]
    assert reloaded.active_key_id == k2
    assert unseal_bytes(reloaded, new_header, sealed) == data
    assert unseal_bytes(reloaded, old_header, sealed) == data
    # New blobs are sealed under the new key.
    assert seal_bytes(reloaded, b"new")[0].key_id == k2


def test_key_ids_are_ordered_and_dated(keyring: KeyRing) -> None:
    before = datetime.now(UTC)
    ids = [keyring.active_key_id] + [keyring.rotate() for _ in range(3)]
    assert keyring.key_ids == ids
    assert ids == sorted(ids)
    for key_id in ids:
        assert "." not in key_id
        created = keyring.created(key_id)
        assert created.tzinfo is not None
        assert before - timedelta(seconds=60) < created <= datetime.now(UTC)
    with pytest.raises(UnknownKeyError):
        keyring.created("k9999-000000")


def test_other_process_rotation_is_picked_up_and_never_lost(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    worker = KeyRing.create(path)
    operator = KeyRing.load(path)
    k2 = operator.rotate()
    header, sealed = seal_bytes(operator, b"sealed after rotation")
    # The long-running worker has never seen k2; it finds it on disk.
    assert unseal_bytes(worker, header, sealed) == b"sealed after rotation"
    # A rotation by an instance that has not seen the latest key keeps that key.
    stale = KeyRing.load(path)
    k3 = operator.rotate()
    k4 = stale.rotate()
    final = KeyRing.load(path)
    assert final.key_ids == [worker.key_ids[0], k2, k3, k4]
    assert final.active_key_id == k4


def test_keyring_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "keyring.json"
    ring = KeyRing.create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring.rotate()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["keyring.json"]  # no temp files left


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_readable_by_others(keyring: KeyRing, mode: int) -> None:
    keyring.path.chmod(mode)
    with pytest.raises(CryptoError, match=f"chmod 600 {keyring.path}"):
        KeyRing.load(keyring.path)
    keyring.path.chmod(0o600)
    assert KeyRing.load(keyring.path).key_ids == keyring.key_ids


def test_load_missing_or_corrupt(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(CryptoError, match="does not exist"):
        KeyRing.load(missing)
    corrupt = tmp_path / "corrupt.json"
    for content in ["{not json", "[]", '{"format": "saf-keyring-v1", "active": "x", "keys": []}']:
        corrupt.write_text(content)
        corrupt.chmod(0o600)
        with pytest.raises(CryptoError, match="corrupt"):
            KeyRing.load(corrupt)
    good = tmp_path / "good.json"
    KeyRing.create(good)
    doc = json.loads(good.read_text())
    doc["keys"][0]["key"] = base64.b64encode(b"short").decode()
    corrupt.write_text(json.dumps(doc))
    with pytest.raises(CryptoError, match="corrupt"):
        KeyRing.load(corrupt)


def test_create_refuses_to_overwrite(keyring: KeyRing) -> None:
    before = keyring.path.read_bytes()
    with pytest.raises(CryptoError, match="already exists"):
        KeyRing.create(keyring.path)
    assert keyring.path.read_bytes() == before


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "keyring.json"
    first = KeyRing.load_or_create(path)
    second = KeyRing.load_or_create(path)
    assert first.key_ids == second.key_ids
    header, sealed = seal_bytes(first, b"x")
    assert unseal_bytes(second, header, sealed) == b"x"


def test_repr_shows_no_key_material(keyring: KeyRing) -> None:
    keyring.rotate()
    doc = json.loads(keyring.path.read_text())
    text = repr(keyring) + str(keyring)
    for entry in doc["keys"]:
        raw = base64.b64decode(entry["key"])
        assert entry["key"] not in text
        assert raw.hex() not in text
        assert repr(raw) not in text
        assert entry["id"] in text
    header, _ = seal_bytes(keyring, b"x")
    assert repr(header.wrapped_key) not in repr(header)
    assert header.key_id in repr(header)


# --------------------------------------------------------------------------- blob header


def make_header(**changes: object) -> BlobHeader:
    fields: dict[str, object] = {
        "key_id": "k0001-a1b2c3",
        "wrapped_key": bytes(range(40)),
        "nonce_prefix": b"\x01" * 8,
        "chunk_size": CHUNK,
    }
    fields.update(changes)
    return BlobHeader(**fields)  # type: ignore[arg-type]


def test_header_bytes_round_trip(keyring: KeyRing) -> None:
    header, _ = seal_bytes(keyring, b"x", chunk_size=DEFAULT_CHUNK_SIZE)
    raw = header.to_bytes()
    assert isinstance(raw, bytes)
    assert len(raw) < 100
    assert BlobHeader.from_bytes(raw) == header
    assert BlobHeader.from_bytes(make_header().to_bytes()) == make_header()


@pytest.mark.parametrize(
    "changes",
    [
        {"key_id": ""},
        {"key_id": "k1.bad"},
        {"key_id": "x" * 65},
        {"wrapped_key": b"\x00" * 39},
        {"wrapped_key": b"\x00" * 41},
        {"nonce_prefix": b"\x00" * 7},
        {"nonce_prefix": b"\x00" * 12},
        {"chunk_size": 0},
        {"chunk_size": 15},
        {"chunk_size": (1 << 26) + 1},
        {"chunk_size": -1},
    ],
)
def test_header_validation(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_header(**changes)


def test_header_from_bad_bytes() -> None:
    raw = make_header().to_bytes()
    for bad in (
        b"",
        b"SAF",
        raw[:-1],
        raw + b"\x00",
        b"XYZ" + raw[3:],
        raw[:3] + b"\x02" + raw[4:],
    ):
        with pytest.raises(ValueError):
            BlobHeader.from_bytes(bad)


# --------------------------------------------------------------------------- sealed fields


@pytest.mark.parametrize("value", ["DOE^JOHN", "Müller^Jürgen=ミュラー", "19700101", ""])
def test_value_round_trip(keyring: KeyRing, value: str) -> None:
    token = seal_value(keyring, value, context="patient.name")
    assert token.isascii()
    assert token.startswith(f"v1.{keyring.active_key_id}.")
    assert value_key_id(token) == keyring.active_key_id
    assert open_value(keyring, token, context="patient.name") == value
    if value:
        assert value not in token


def test_value_tokens_differ_each_time(keyring: KeyRing) -> None:
    tokens = {seal_value(keyring, "DOE^JOHN", context="patient.name") for _ in range(20)}
    assert len(tokens) == 20


def test_value_wrong_context_fails(keyring: KeyRing) -> None:
    token = seal_value(keyring, "19700101", context="patient.birth_date")
    with pytest.raises(IntegrityError, match=r"patient\.name"):
        open_value(keyring, token, context="patient.name")


def test_value_tampered_or_malformed(keyring: KeyRing) -> None:
    token = seal_value(keyring, "DOE^JOHN", context="patient.name")
    version, key_id, data = token.split(".")
    flipped = data[:5] + ("A" if data[5] != "A" else "B") + data[6:]
    for bad in (
        f"{version}.{key_id}.{flipped}",
        f"v2.{key_id}.{data}",
        f"{version}.{key_id}",
        f"{version}.{key_id}.{data[:10]}",
        "DOE^JOHN",
        "",
    ):
        with pytest.raises(IntegrityError):
            open_value(keyring, bad, context="patient.name")
    with pytest.raises(UnknownKeyError):
        open_value(keyring, f"{version}.k9999-ffffff.{data}", context="patient.name")


def test_reseal_value_after_rotation(keyring: KeyRing) -> None:
    k1 = keyring.active_key_id
    token = seal_value(keyring, "DOE^JOHN", context="patient.name")
    assert reseal_value(keyring, token, context="patient.name") == token  # already current
    k2 = keyring.rotate()
    new_token = reseal_value(keyring, token, context="patient.name")
    assert value_key_id(token) == k1
    assert value_key_id(new_token) == k2
    assert open_value(keyring, new_token, context="patient.name") == "DOE^JOHN"
    assert open_value(keyring, token, context="patient.name") == "DOE^JOHN"
    with pytest.raises(IntegrityError):
        reseal_value(keyring, token, context="patient.birth_date")
