"""A 2 GiB seal → store → unseal round trip in bounded memory."""

from __future__ import annotations

import gc
import hashlib
import random
import threading
import time
from pathlib import Path
from types import TracebackType

import psutil
import pytest

from saf.blobstore import new_blob_id
from saf.blobstore.local import LocalBlobStore
from saf.crypto import DEFAULT_CHUNK_SIZE, KeyRing, seal, sealed_size, unseal

MiB = 1 << 20
TOTAL = 2 << 30
BLOCK = MiB
RSS_LIMIT = 100 * MiB


class GeneratedPlaintext:
    """2 GiB of deterministic, cheap, non-repeating plaintext, hashed as it is read.

    Each 1 MiB block is one fixed random block with the block number written
    over its first 8 bytes: a reordered, dropped or duplicated chunk changes
    the stream's hash, which identical blocks would not.
    """

    def __init__(self, size: int, seed: int = 20261127) -> None:
        self._tail = random.Random(seed).randbytes(BLOCK)[8:]
        self._size = size
        self._pos = 0
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        remaining = self._size - self._pos
        n = remaining if n < 0 else min(n, remaining)
        parts = []
        while n > 0:
            block, offset = divmod(self._pos, BLOCK)
            take = min(n, BLOCK - offset)
            data = block.to_bytes(8, "big") + self._tail
            parts.append(data if take == BLOCK else data[offset : offset + take])
            self._pos += take
            n -= take
        out = b"".join(parts) if len(parts) != 1 else parts[0]
        self.sha256.update(out)
        return out


class PeakRss:
    """Samples this process's RSS in a background thread; `peak_growth` is over the baseline."""

    def __init__(self, interval: float = 0.002) -> None:
        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.baseline = 0
        self.peak = 0
        self.samples = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self.samples += 1
            time.sleep(self._interval)

    @property
    def peak_growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()


def test_sampler_sees_a_large_allocation() -> None:
    """Positive control: the sampler must notice what the streaming test guards against."""
    with PeakRss() as rss:
        # b"\x01" * n writes every page (bytes(n) may get untouched zero pages).
        hog = b"\x01" * (2 * RSS_LIMIT)
        time.sleep(0.05)
        del hog
    assert rss.peak_growth > RSS_LIMIT


@pytest.mark.slow
def test_two_gib_round_trip_in_bounded_memory(tmp_path: Path) -> None:
    keyring = KeyRing.create(tmp_path / "keyring.json")
    store = LocalBlobStore(tmp_path / "blobs")
    blob_id = new_blob_id()
    source = GeneratedPlaintext(TOTAL)
    out_sha256 = hashlib.sha256()
    out_size = 0

    try:
        with PeakRss() as rss:
            started = time.perf_counter()
            header, chunks = seal(keyring, blob_id, source)
            written = store.put(blob_id, chunks)
            sealed_at = time.perf_counter()
            with store.open(blob_id) as sealed:
                for plain in unseal(keyring, blob_id, header, sealed):
                    out_sha256.update(plain)
                    out_size += len(plain)
            finished = time.perf_counter()
    finally:
        # pytest keeps the last few tmp dirs; don't leave 2 GiB in each.
        store.delete(blob_id)

    assert header.chunk_size == DEFAULT_CHUNK_SIZE
    assert written == sealed_size(TOTAL, DEFAULT_CHUNK_SIZE)
    assert out_size == TOTAL
    assert out_sha256.hexdigest() == source.sha256.hexdigest()
    # The sampler ran throughout, so its peak covers the whole round trip.
    assert rss.samples > 100
    assert rss.peak_growth < RSS_LIMIT, f"peak RSS grew by {rss.peak_growth / MiB:.1f} MiB"
    print(
        f"\n2 GiB round trip: seal+put {sealed_at - started:.1f} s, "
        f"open+unseal {finished - sealed_at:.1f} s, total {finished - started:.1f} s, "
        f"peak RSS growth {rss.peak_growth / MiB:.1f} MiB ({rss.samples} samples)"
    )
