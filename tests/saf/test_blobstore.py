"""Contract tests for saf.blobstore, run against the local backend and S3 (moto over HTTP)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

from saf.blobstore import BlobNotFound, BlobStore, new_blob_id, validate_blob_id
from saf.blobstore.local import LocalBlobStore
from saf.blobstore.s3 import PART_SIZE, S3BlobStore
from saf.crypto import KeyRing, seal, unseal

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MiB = 1 << 20

INVALID_IDS = [
    "",
    "../etc",
    "../../../../etc/passwd",
    "Patient Name",
    "DOE^JOHN",
    "0123456789ABCDEF",  # uppercase
    "0123456789abcde",  # 15 chars: too short
    "a" * 65,  # too long
    "0123456789abcdef/x",
    "0123456789abcdef\n",
    ".0123456789abcdef",
]


@pytest.fixture
def s3_client(moto_s3_endpoint: str) -> S3Client:
    return boto3.client("s3", endpoint_url=moto_s3_endpoint, region_name="us-east-1")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """A fresh, empty store of each backend."""
    if request.param == "local":
        result: BlobStore = LocalBlobStore(tmp_path / "blobs")
        return result
    endpoint = request.getfixturevalue("moto_s3_endpoint")
    s3 = S3BlobStore(
        f"saf-test-{uuid.uuid4().hex[:12]}",
        prefix="blobs",
        endpoint_url=endpoint,
        region_name="us-east-1",
    )
    s3.ensure_bucket()
    result = s3
    return result


def leftovers(store: BlobStore) -> list[str]:
    """Everything physically present in the backend: files, objects, open multipart uploads."""
    if isinstance(store, LocalBlobStore):
        if not store.root.exists():
            return []
        return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    assert isinstance(store, S3BlobStore)
    client = store._client
    objects = client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    uploads = client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return [f"object {o['Key']}" for o in objects] + [f"upload {u['Key']}" for u in uploads]


def read_all(store: BlobStore, blob_id: str, n: int = -1) -> bytes:
    with store.open(blob_id) as f:
        if n < 0:
            return f.read()
        parts = []
        while piece := f.read(n):
            parts.append(piece)
        return b"".join(parts)


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


class Boom(Exception):
    pass


def failing_chunks(good_bytes: int) -> Iterator[bytes]:
    """Yields good_bytes in 1 MiB chunks, then fails like a broken upstream stream."""
    sent = 0
    while sent < good_bytes:
        n = min(MiB, good_bytes - sent)
        yield os.urandom(n)
        sent += n
    raise Boom("upstream connection reset")


# --------------------------------------------------------------------------- contract


def test_put_open_round_trip(store: BlobStore) -> None:
    blob_id = new_blob_id()
    data = os.urandom(100_000)
    written = store.put(blob_id, [data[:10], b"", data[10:50_000], data[50_000:]])
    assert written == len(data)
    assert store.exists(blob_id)
    assert read_all(store, blob_id) == data
    assert read_all(store, blob_id, n=4096) == data


def test_empty_blob(store: BlobStore) -> None:
    blob_id = new_blob_id()
    assert store.put(blob_id, []) == 0
    assert store.exists(blob_id)
    assert read_all(store, blob_id) == b""


def test_put_replaces_existing_blob(store: BlobStore) -> None:
    blob_id = new_blob_id()
    store.put(blob_id, [b"first version"])
    store.put(blob_id, [b"second"])
    assert read_all(store, blob_id) == b"second"
    assert list(store.iter_ids()) == [blob_id]


@pytest.mark.parametrize("size", [PART_SIZE, PART_SIZE + 1, 2 * PART_SIZE + 3 * MiB])
def test_large_blob_round_trip(store: BlobStore, size: int) -> None:
    blob_id = new_blob_id()
    data = os.urandom(size)
    # Odd chunk sizes so part boundaries never line up with chunk boundaries.
    assert store.put(blob_id, chunks_of(data, MiB + 17)) == size
    assert read_all(store, blob_id, n=MiB) == data


def test_failed_put_leaves_nothing(store: BlobStore) -> None:
    blob_id = new_blob_id()
    # More than one part, so that on S3 a multipart upload is open when it fails.
    with pytest.raises(Boom):
        store.put(blob_id, failing_chunks(PART_SIZE + 2 * MiB))
    assert not store.exists(blob_id)
    assert list(store.iter_ids()) == []
    assert leftovers(store) == []
    with pytest.raises(BlobNotFound):
        store.open(blob_id)


def test_failed_small_put_leaves_nothing(store: BlobStore) -> None:
    blob_id = new_blob_id()
    with pytest.raises(Boom):
        store.put(blob_id, failing_chunks(1000))
    assert not store.exists(blob_id)
    assert leftovers(store) == []


def test_failed_put_keeps_previous_version(store: BlobStore) -> None:
    blob_id = new_blob_id()
    store.put(blob_id, [b"good"])
    with pytest.raises(Boom):
        store.put(blob_id, failing_chunks(PART_SIZE + MiB))
    assert read_all(store, blob_id) == b"good"
    assert len(leftovers(store)) == 1


def test_put_many_round_trip(store: BlobStore) -> None:
    blobs = {new_blob_id(): os.urandom(n) for n in (0, 1, 1024, 100_000)}
    written = store.put_many([(blob_id, chunks_of(data, 4096)) for blob_id, data in blobs.items()])
    assert written == [len(data) for data in blobs.values()]
    assert sorted(store.iter_ids()) == sorted(blobs)
    for blob_id, data in blobs.items():
        assert read_all(store, blob_id) == data
    assert store.put_many([]) == []


def test_failed_put_many_leaves_none_of_them(store: BlobStore) -> None:
    kept = new_blob_id()
    store.put(kept, [b"before"])
    good = [(new_blob_id(), [os.urandom(2048)]) for _ in range(5)]
    with pytest.raises(Boom):
        store.put_many([*good, (new_blob_id(), failing_chunks(1000))])
    assert list(store.iter_ids()) == [kept]
    assert len(leftovers(store)) == 1  # the blob put before, nothing else
    assert read_all(store, kept) == b"before"


def test_open_missing_raises_blob_not_found(store: BlobStore) -> None:
    blob_id = new_blob_id()
    with pytest.raises(BlobNotFound) as excinfo:
        store.open(blob_id)
    assert isinstance(excinfo.value, KeyError)
    assert excinfo.value.blob_id == blob_id
    assert blob_id in str(excinfo.value)
    assert store.describe() in str(excinfo.value)
    assert not store.exists(blob_id)


def test_delete_is_idempotent(store: BlobStore) -> None:
    blob_id = new_blob_id()
    store.delete(blob_id)  # never existed
    store.put(blob_id, [b"x"])
    store.delete(blob_id)
    store.delete(blob_id)
    assert not store.exists(blob_id)
    assert list(store.iter_ids()) == []
    with pytest.raises(BlobNotFound):
        store.open(blob_id)


@pytest.mark.parametrize("bad_id", INVALID_IDS)
def test_invalid_ids_refused(store: BlobStore, bad_id: str) -> None:
    with pytest.raises(ValueError, match="invalid blob id") as excinfo:
        store.put(bad_id, [b"x"])
    if bad_id:
        # The refused value may be PHI, so it must not be echoed into logs.
        assert bad_id not in str(excinfo.value)
    for call in (store.open, store.exists, store.delete):
        with pytest.raises(ValueError):
            call(bad_id)
    assert leftovers(store) == []


def test_iter_ids_lists_exactly_what_was_put(store: BlobStore) -> None:
    ids = {new_blob_id() for _ in range(7)}
    ids.add("00" * 8)  # shortest allowed id
    ids.add("ff" * 32)  # longest allowed id
    for blob_id in ids:
        store.put(blob_id, [blob_id.encode()])
    gone = sorted(ids)[3]
    store.delete(gone)
    ids.discard(gone)
    listed = list(store.iter_ids())
    assert sorted(listed) == sorted(ids)
    assert len(listed) == len(set(listed))


def test_describe_names_location_without_credentials(store: BlobStore) -> None:
    text = store.describe()
    if isinstance(store, LocalBlobStore):
        assert text == f"local:{store.root}"
    else:
        assert isinstance(store, S3BlobStore)
        assert text.startswith(f"s3://{store.bucket}/blobs/ @ http://127.0.0.1:")
    assert "testing" not in text  # the dummy access key / secret


def test_sealed_blob_through_store(store: BlobStore, tmp_path: Path) -> None:
    keyring = KeyRing.create(tmp_path / "keys" / "keyring.json")
    blob_id = new_blob_id()
    plaintext = os.urandom(3 * 1000 + 5)
    header, chunks = seal(keyring, blob_id, io.BytesIO(plaintext), chunk_size=1000)
    store.put(blob_id, chunks)
    with store.open(blob_id) as sealed:
        assert b"".join(unseal(keyring, blob_id, header, sealed)) == plaintext


def test_new_blob_id_is_valid_and_fresh() -> None:
    ids = {new_blob_id() for _ in range(1000)}
    assert len(ids) == 1000
    for blob_id in ids:
        assert validate_blob_id(blob_id) == blob_id
        assert len(blob_id) == 32


# --------------------------------------------------------------------------- local only


def test_local_layout_and_modes(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    blob_id = "abcdef" + "0" * 26
    store.put(blob_id, [b"data"])
    path = tmp_path / "blobs" / "ab" / blob_id
    assert path == store.path_for(blob_id)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (tmp_path / "blobs", path.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_local_iter_ids_skips_temp_and_stray_files(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    blob_id = new_blob_id()
    store.put(blob_id, [b"data"])
    fan_out = store.path_for(blob_id).parent
    (fan_out / f".{new_blob_id()}.0badc0de.tmp").write_bytes(b"partial")
    (fan_out / "notes.txt").write_text("not a blob")
    (fan_out / new_blob_id()).write_bytes(b"id that does not belong in this fan-out dir")
    (tmp_path / "README").write_text("stray")
    assert list(store.iter_ids()) == [blob_id]


def test_local_sweep_temp(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    blob_id = new_blob_id()
    store.put(blob_id, [b"data"])
    fan_out = store.path_for(blob_id).parent
    stale = fan_out / f".{blob_id}.1234abcd.tmp"
    fresh = fan_out / f".{blob_id}.5678abcd.tmp"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"a put in progress")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))

    assert store.sweep_temp(older_than_seconds=600) == 1
    assert not stale.exists()
    assert fresh.exists()
    assert store.path_for(blob_id).exists()
    assert store.sweep_temp(older_than_seconds=600) == 0
    assert LocalBlobStore(tmp_path / "missing").sweep_temp(0) == 0


def test_local_crash_mid_put_leaves_only_a_sweepable_temp_file(tmp_path: Path) -> None:
    """A process killed mid-put (SIGKILL: no cleanup runs) leaves no blob, only a temp file."""
    blob_id = new_blob_id()
    script = textwrap.dedent(
        f"""
        import os, signal
        from saf.blobstore.local import LocalBlobStore

        def chunks():
            yield b"x" * 100_000
            os.kill(os.getpid(), signal.SIGKILL)
            yield b"never"

        LocalBlobStore({str(tmp_path)!r}).put({blob_id!r}, chunks())
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    assert proc.returncode == -9
    store = LocalBlobStore(tmp_path)
    assert not store.exists(blob_id)
    assert list(store.iter_ids()) == []
    temp_files = leftovers(store)
    assert len(temp_files) == 1 and temp_files[0].endswith(".tmp")
    assert store.sweep_temp(older_than_seconds=0) == 1
    assert leftovers(store) == []


def test_local_iter_ids_on_missing_root(tmp_path: Path) -> None:
    assert list(LocalBlobStore(tmp_path / "nothing-here").iter_ids()) == []


# --------------------------------------------------------------------------- S3 only


def test_s3_uses_single_put_up_to_part_size_and_multipart_beyond(
    moto_s3_endpoint: str, s3_client: S3Client
) -> None:
    store = S3BlobStore(
        f"saf-test-{uuid.uuid4().hex[:12]}", endpoint_url=moto_s3_endpoint, client=s3_client
    )
    store.ensure_bucket()
    small, large = new_blob_id(), new_blob_id()
    store.put(small, chunks_of(b"s" * PART_SIZE, MiB))
    store.put(large, chunks_of(b"l" * (2 * PART_SIZE + 1), MiB))
    # A multipart object's ETag is "<md5 of part md5s>-<number of parts>".
    small_etag = s3_client.head_object(Bucket=store.bucket, Key=store.key_for(small))["ETag"]
    large_etag = s3_client.head_object(Bucket=store.bucket, Key=store.key_for(large))["ETag"]
    assert "-" not in small_etag
    assert large_etag.strip('"').endswith("-3")


def test_s3_key_layout_and_prefixes(moto_s3_endpoint: str, s3_client: S3Client) -> None:
    bucket = f"saf-test-{uuid.uuid4().hex[:12]}"
    tenant_a = S3BlobStore(bucket, prefix="tenant-a", endpoint_url=moto_s3_endpoint)
    tenant_b = S3BlobStore(bucket, prefix="tenant-b/", endpoint_url=moto_s3_endpoint)
    tenant_a.ensure_bucket()
    tenant_a.ensure_bucket()  # idempotent
    id_a, id_b = new_blob_id(), new_blob_id()
    tenant_a.put(id_a, [b"a"])
    tenant_b.put(id_b, [b"b"])
    s3_client.put_object(Bucket=bucket, Key="tenant-a/README", Body=b"stray")
    s3_client.put_object(Bucket=bucket, Key=f"tenant-a/zz/{new_blob_id()}", Body=b"misfiled")

    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"])
    assert f"tenant-a/{id_a[:2]}/{id_a}" in keys
    assert f"tenant-b/{id_b[:2]}/{id_b}" in keys
    assert list(tenant_a.iter_ids()) == [id_a]
    assert list(tenant_b.iter_ids()) == [id_b]
    assert not tenant_a.exists(id_b)


@pytest.mark.slow
def test_s3_iter_ids_paginates(moto_s3_endpoint: str, s3_client: S3Client) -> None:
    store = S3BlobStore(f"saf-test-{uuid.uuid4().hex[:12]}", client=s3_client)
    store.ensure_bucket()
    ids = sorted(new_blob_id() for _ in range(1003))  # list_objects_v2 pages hold 1000 keys
    for blob_id in ids:
        s3_client.put_object(Bucket=store.bucket, Key=store.key_for(blob_id), Body=b"")
    assert sorted(store.iter_ids()) == ids


def test_s3_describe_hides_userinfo_in_endpoint(moto_s3_endpoint: str) -> None:
    endpoint = moto_s3_endpoint.replace("http://", "http://user:secret@")
    store = S3BlobStore("some-bucket", endpoint_url=endpoint, region_name="us-east-1")
    assert "secret" not in store.describe()
    assert "user" not in store.describe()


def test_check_passes_on_a_usable_store(store: BlobStore) -> None:
    store.put(new_blob_id(), [b"x"])  # a local root is made by the first put (or Hub.open)
    store.check()


def test_local_check_refuses_a_root_that_is_not_a_directory(tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="occupied"):
        LocalBlobStore(occupied).check()
