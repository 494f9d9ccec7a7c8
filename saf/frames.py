"""The viewer's frames: a series in scroll order, and a per-process cache of decoded frames.

Every frame the viewer shows, measures or reads a value from comes through `load`, which
keeps the parsed instance (header and Pixel Data) and each decoded frame in a
least-recently-used cache bounded in bytes (`CACHE_MAX_BYTES`). A window change or a
pixel read on a frame already seen costs neither a decryption nor a parse nor a decode:
only the display pipeline of saf.render and the image encoder.

Choices worth knowing:

- Instance rows never change (a new payload under the same SOP Instance UID is a new
  row, a new id), so the cache is keyed by instance id and never goes stale; only the
  newest version of each SOP Instance UID of a series is listed.
- Scroll order: along the slice normal (the cross product of Image Orientation
  (Patient)'s row and column directions) by Image Position (Patient), ascending; when
  any instance lacks position or orientation, by Instance Number; then by SOP Instance
  UID, so the order is always total. A multi-frame instance gives its frames in order.
- Pixel spacing: Pixel Spacing (including the Pixel Measures of an enhanced object's
  shared functional groups), else Imager Pixel Spacing (the detector plane: projection
  radiographs are then measured at the detector, without magnification correction, as
  most viewers do and say); else unknown.
- Points and pixel reads use the DICOM pixel convention of SR SCOORD and GSPS PIXEL
  units: (0, 0) is the top left corner of the top left pixel; pixel (row r, column c)
  covers x in [c, c + 1) and y in [r, r + 1), its centre is (c + 0.5, r + 0.5).
"""

from __future__ import annotations

import io
import math
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from saf import vault
from saf.db import transaction
from saf.hub import Hub
from saf.models import Blob, FrameHeader, Instance, Series
from saf.render import (
    Window,
    decode_frame,
    default_window,
    frame_count,
    header_window,
    modality_values,
)

CACHE_MAX_BYTES: Final = 512 << 20
"""Bytes of parsed instances and decoded frames one process keeps (least recently used
out first). A 512x512 16-bit CT slice costs about 0.5 MB parsed plus 0.5 MB decoded, so
this holds two 200-slice series at full size."""

IN_MEMORY_MAX: Final = 64 << 20
"""Instances up to this size are decrypted in memory; larger ones through a spool file."""

COLOUR_WINDOW: Final = Window(127.5, 256.0)
"""The window reported for colour images (shown as they are unless a window is asked)."""


class FrameError(Exception):
    """A frame that does not exist or cannot be decoded; the message names it."""


@dataclass(frozen=True)
class Spacing:
    """Physical size of a pixel: between rows and between columns, in mm, and its source."""

    row_mm: float
    col_mm: float
    source: str
    """PixelSpacing or ImagerPixelSpacing."""


@dataclass(frozen=True)
class FrameInfo:
    """One frame of a series as the viewer lists it."""

    instance_id: str
    sop_instance_uid: str
    frame: int
    """1-based."""
    rows: int
    columns: int
    spacing: Spacing | None
    window: Window
    instance_number: int | None
    slice_location: float | None

    def to_json(self) -> dict[str, Any]:
        """The API's frame entry."""
        return {
            "instance_id": self.instance_id,
            "sop_instance_uid": self.sop_instance_uid,
            "frame": self.frame,
            "rows": self.rows,
            "columns": self.columns,
            "pixel_spacing": [self.spacing.row_mm, self.spacing.col_mm] if self.spacing else None,
            "spacing_source": self.spacing.source if self.spacing else None,
            "window": {"center": self.window.center, "width": self.window.width},
            "instance_number": self.instance_number,
            "slice_location": self.slice_location,
        }


class Loaded:
    """A parsed instance and the frames decoded from it so far (thread-safe to share)."""

    def __init__(self, instance_id: str, ds: Dataset, nbytes: int) -> None:
        self.instance_id = instance_id
        self.ds = ds
        self.frames: dict[int, npt.NDArray[Any]] = {}
        self.nbytes = nbytes
        self.count = frame_count(ds)
        self.spacing = spacing_of(ds)
        self._lock = threading.Lock()

    @property
    def rows(self) -> int:
        return int(self.ds.get("Rows") or 0)

    @property
    def columns(self) -> int:
        return int(self.ds.get("Columns") or 0)

    @property
    def modality(self) -> str:
        return str(self.ds.get("Modality") or "")

    @property
    def is_grey(self) -> bool:
        return int(self.ds.get("SamplesPerPixel") or 1) == 1 and str(
            self.ds.get("PhotometricInterpretation", "MONOCHROME2")
        ).strip() in ("MONOCHROME1", "MONOCHROME2")

    def pixels(self, frame: int) -> npt.NDArray[Any]:
        """Stored values of 1-based `frame` (decoded once, then cached)."""
        if not 1 <= frame <= self.count:
            raise FrameError(
                f"instance {self.instance_id} has {self.count} frame(s); frame {frame} "
                f"is not in 1..{self.count}"
            )
        with self._lock:
            found = self.frames.get(frame)
        if found is not None:
            return found
        array = decode_frame(self.ds, frame - 1)
        array.setflags(write=False)
        with self._lock:
            self.frames.setdefault(frame, array)
            self.nbytes += int(array.nbytes)
        _CACHE.resize(self)
        return array

    def values(self, frame: int) -> npt.NDArray[np.float32]:
        """Modality values (e.g. HU) of a grey frame."""
        return modality_values(self.ds, self.pixels(frame))

    def window(self, frame: int) -> Window:
        """The default display window of `frame` (colour frames: `COLOUR_WINDOW`)."""
        if not self.is_grey:
            return COLOUR_WINDOW
        return header_window(self.ds) or default_window(self.ds, self.pixels(frame))

    def unit(self) -> str | None:
        """Unit of the modality values: HU for CT, else Rescale Type when given."""
        if self.modality == "CT":
            return "HU"
        rescale_type = str(self.ds.get("RescaleType") or "").strip()
        return rescale_type or None


class _Cache:
    """Least recently used `Loaded` instances, bounded by their total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Loaded] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    def get(self, instance_id: str) -> Loaded | None:
        with self._lock:
            entry = self._entries.get(instance_id)
            if entry is not None:
                self._entries.move_to_end(instance_id)
            return entry

    def put(self, entry: Loaded) -> Loaded:
        with self._lock:
            existing = self._entries.get(entry.instance_id)
            if existing is not None:  # another thread loaded it meanwhile
                self._entries.move_to_end(entry.instance_id)
                return existing
            self._entries[entry.instance_id] = entry
            self._sizes[entry.instance_id] = entry.nbytes
            self._total += entry.nbytes
            self._evict()
        return entry

    def resize(self, entry: Loaded) -> None:
        with self._lock:
            if entry.instance_id in self._sizes:
                self._total += entry.nbytes - self._sizes[entry.instance_id]
                self._sizes[entry.instance_id] = entry.nbytes
                self._evict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sizes.clear()
            self._total = 0

    @property
    def total_bytes(self) -> int:
        return self._total

    def _evict(self) -> None:
        # The newest entry always stays, even alone over the bound: it is in use.
        while self._total > self.max_bytes and len(self._entries) > 1:
            old_id, _ = self._entries.popitem(last=False)
            self._total -= self._sizes.pop(old_id)


_CACHE = _Cache(CACHE_MAX_BYTES)


def cache_bytes() -> int:
    """Bytes the frame cache holds now (for tests and stats)."""
    return _CACHE.total_bytes


def clear_cache() -> None:
    """Forget every cached instance and header (tests; a process that must release memory)."""
    _CACHE.clear()
    with _HEADERS_LOCK:
        _HEADERS.clear()


@dataclass(frozen=True)
class Header:
    """What the frame list needs of an instance's header (kept per process, small)."""

    rows: int
    columns: int
    count: int
    spacing: Spacing | None
    window: Window | None
    """The header's window; None when it has none (computed from the pixels if asked)."""
    grey: bool
    position: float | None
    """Image Position (Patient) along the slice normal, when the header says."""
    instance_number: int | None
    slice_location: float | None

    @classmethod
    def of(cls, ds: Dataset) -> Header:
        grey = int(ds.get("SamplesPerPixel") or 1) == 1 and str(
            ds.get("PhotometricInterpretation", "MONOCHROME2")
        ).strip() in ("MONOCHROME1", "MONOCHROME2")
        return cls(
            rows=int(ds.get("Rows") or 0),
            columns=int(ds.get("Columns") or 0),
            count=frame_count(ds),
            spacing=spacing_of(ds),
            window=header_window(ds) if grey else COLOUR_WINDOW,
            grey=grey,
            position=_header_key(ds)[0],
            instance_number=_int(ds.get("InstanceNumber")),
            slice_location=_float(ds.get("SliceLocation")),
        )

    def to_facts(self) -> dict[str, Any]:
        """As stored in `FrameHeader.facts`."""
        return {
            "rows": self.rows,
            "columns": self.columns,
            "count": self.count,
            "spacing": [self.spacing.row_mm, self.spacing.col_mm, self.spacing.source]
            if self.spacing
            else None,
            "window": [self.window.center, self.window.width] if self.window else None,
            "grey": self.grey,
            "position": self.position,
            "instance_number": self.instance_number,
            "slice_location": self.slice_location,
        }

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> Header:
        spacing = facts.get("spacing")
        window = facts.get("window")
        return cls(
            rows=int(facts["rows"]),
            columns=int(facts["columns"]),
            count=int(facts["count"]),
            spacing=Spacing(float(spacing[0]), float(spacing[1]), str(spacing[2]))
            if spacing
            else None,
            window=Window(float(window[0]), float(window[1])) if window else None,
            grey=bool(facts["grey"]),
            position=facts.get("position"),
            instance_number=facts.get("instance_number"),
            slice_location=facts.get("slice_location"),
        )


HEADER_THREADS: Final = 4
"""Threads that read the headers of a series not seen before."""

HEADER_CACHE_MAX: Final = 200_000
"""Instance headers one process remembers (a few hundred bytes each)."""

_HEADERS: OrderedDict[str, Header] = OrderedDict()
_HEADERS_LOCK = threading.Lock()


def header(hub: Hub, instance: Instance, blob: Blob | None = None) -> Header:
    """The instance's header facts: from the cache, from a loaded instance, or read now
    from the first sealed chunk(s) of its blob, without decoding or keeping the pixels."""
    with _HEADERS_LOCK:
        found = _HEADERS.get(instance.id)
    if found is not None:
        return found
    loaded = _CACHE.get(instance.id)
    if loaded is not None:
        made = Header.of(loaded.ds)
    else:
        if blob is None:
            with hub.sessions() as session:
                blob = session.get_one(Blob, instance.blob_id)
        made = Header.of(_read_header(hub, blob))
    with _HEADERS_LOCK:
        _HEADERS[instance.id] = made
        while len(_HEADERS) > HEADER_CACHE_MAX:
            _HEADERS.popitem(last=False)
    return made


def _read_header(hub: Hub, blob: Blob) -> Dataset:
    """The dataset up to its Pixel Data, decrypting only as many chunks as that takes."""
    buffer = bytearray()
    for chunk in vault.read(hub, blob):
        buffer += chunk
        try:
            return dcmread(io.BytesIO(bytes(buffer)), stop_before_pixels=True)
        except Exception:  # cut short inside the header: read on
            continue
    return dcmread(io.BytesIO(bytes(buffer)), stop_before_pixels=True)


def load(hub: Hub, instance: Instance) -> Loaded:
    """The parsed instance, from the cache or decrypted and parsed now.

    The caller has already decided that its principal may see `instance` (saf.tenancy).
    """
    found = _CACHE.get(instance.id)
    if found is not None:
        return found
    blob = instance.blob if "blob" in instance.__dict__ else None
    if blob is None:
        with hub.sessions() as session:
            blob = session.get_one(Blob, instance.blob_id)
    ds = _read(hub, blob)
    pixel_bytes = len(ds.PixelData) if "PixelData" in ds else 0
    return _CACHE.put(Loaded(instance.id, ds, pixel_bytes + 4096))


def _read(hub: Hub, blob: Blob) -> Dataset:
    if blob.size <= IN_MEMORY_MAX:
        return dcmread(io.BytesIO(b"".join(vault.read(hub, blob))))
    with tempfile.TemporaryFile(dir=hub.settings.spool_dir) as spool:
        for chunk in vault.read(hub, blob):
            spool.write(chunk)
        spool.seek(0)
        ds = dcmread(spool)
        ds.PixelData  # noqa: B018 - read every value now, before the spool file goes
        return ds


def newest_instances_with_blobs(hub: Hub, series_pk: str) -> list[tuple[Instance, Blob]]:
    """`newest_instances` with each one's blob row, in one query."""
    newest = (
        select(Instance.sop_instance_uid, func.max(Instance.version).label("version"))
        .where(Instance.series_pk == series_pk)
        .group_by(Instance.sop_instance_uid)
        .subquery()
    )
    with hub.sessions() as session:
        return [
            (instance, blob)
            for instance, blob in session.execute(
                select(Instance, Blob)
                .join(Blob, Blob.id == Instance.blob_id)
                .join(
                    newest,
                    (Instance.sop_instance_uid == newest.c.sop_instance_uid)
                    & (Instance.version == newest.c.version),
                )
                .where(Instance.series_pk == series_pk)
                .order_by(Instance.instance_number, Instance.sop_instance_uid)
            )
        ]


def newest_instances(hub: Hub, series_pk: str) -> list[Instance]:
    """The newest version of each SOP instance of a series (visibility already checked)."""
    newest = (
        select(Instance.sop_instance_uid, func.max(Instance.version).label("version"))
        .where(Instance.series_pk == series_pk)
        .group_by(Instance.sop_instance_uid)
        .subquery()
    )
    with hub.sessions() as session:
        return list(
            session.scalars(
                select(Instance)
                .join(
                    newest,
                    (Instance.sop_instance_uid == newest.c.sop_instance_uid)
                    & (Instance.version == newest.c.version),
                )
                .where(Instance.series_pk == series_pk)
                .order_by(Instance.instance_number, Instance.sop_instance_uid)
            )
        )


def series_frames(hub: Hub, series: Series) -> list[FrameInfo]:
    """Every frame of the series' image instances, in scroll order (headers only: no
    pixel data is decoded unless an image has no window of its own)."""
    images = [
        (instance, blob)
        for instance, blob in newest_instances_with_blobs(hub, series.id)
        if instance.rows and instance.columns  # not an SR, a presentation state, a document
    ]
    heads = _indexed_headers(hub, [instance.id for instance, _ in images])
    missing = [(i, b) for i, b in images if i.id not in heads]
    if missing:
        # Decryption releases the GIL: a few threads read the headers of a new series faster.
        with ThreadPoolExecutor(max_workers=HEADER_THREADS) as pool:
            read = list(pool.map(lambda pair: header(hub, *pair), missing))
        made = {instance.id: head for (instance, _), head in zip(missing, read, strict=True)}
        _index_headers(hub, made)
        heads.update(made)
    entries = [(heads[instance.id], instance) for instance, _ in images]
    positional = all(h.position is not None for h, _ in entries)
    entries.sort(
        key=lambda e: (
            (e[0].position or 0.0) if positional else 0.0,
            e[1].instance_number if e[1].instance_number is not None else math.inf,
            e[1].sop_instance_uid,
        )
    )
    listed: list[FrameInfo] = []
    for head, instance in entries:
        for frame in range(1, head.count + 1):
            listed.append(
                FrameInfo(
                    instance_id=instance.id,
                    sop_instance_uid=instance.sop_instance_uid,
                    frame=frame,
                    rows=head.rows,
                    columns=head.columns,
                    spacing=head.spacing,
                    window=head.window or _pixel_window(hub, instance, frame),
                    instance_number=head.instance_number,
                    slice_location=head.slice_location,
                )
            )
    return listed


def index_study(hub: Hub, study_pk: str) -> int:
    """Read and index the headers of every series of a study (for a worker to call when
    the study is complete, so its first opening in the viewer is index-only); returns
    the number of frames listed."""
    with hub.sessions() as session:
        series = list(session.scalars(select(Series).where(Series.study_pk == study_pk)))
    return sum(len(series_frames(hub, s)) for s in series)


def _indexed_headers(hub: Hub, instance_ids: list[str]) -> dict[str, Header]:
    """Headers from the process cache, then from the index (one query)."""
    found: dict[str, Header] = {}
    with _HEADERS_LOCK:
        for instance_id in instance_ids:
            if (head := _HEADERS.get(instance_id)) is not None:
                found[instance_id] = head
    wanted = [i for i in instance_ids if i not in found]
    if wanted:
        with hub.sessions() as session:
            for row in session.scalars(
                select(FrameHeader).where(FrameHeader.instance_id.in_(wanted))
            ):
                try:
                    found[row.instance_id] = Header.from_facts(row.facts)
                except (KeyError, TypeError, ValueError, IndexError):
                    continue  # an unreadable row is read again from the blob
    return found


def _index_headers(hub: Hub, heads: dict[str, Header]) -> None:
    """Keep headers read from blobs in the index; a concurrent reader may have done it."""
    try:
        with transaction(hub.sessions) as session:
            known = set(
                session.scalars(
                    select(FrameHeader.instance_id).where(FrameHeader.instance_id.in_(list(heads)))
                )
            )
            session.add_all(
                FrameHeader(instance_id=i, facts=h.to_facts())
                for i, h in heads.items()
                if i not in known
            )
    except IntegrityError:
        pass  # another process indexed them meanwhile: theirs are the same facts


def _pixel_window(hub: Hub, instance: Instance, frame: int) -> Window:
    """The auto-window of a grey frame whose header has none (decodes the frame)."""
    try:
        return load(hub, instance).window(frame)
    except Exception:  # an undecodable frame is still listed; rendering says why
        return COLOUR_WINDOW


def _header_key(ds: Dataset) -> tuple[float | None]:
    """Position along the slice normal, or None when the header cannot say."""
    position = _floats(ds.get("ImagePositionPatient"), 3)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    if position is None or orientation is None:
        return (None,)
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    return (float(np.dot(normal, np.array(position))),)


def spacing_of(ds: Dataset) -> Spacing | None:
    """The frame's pixel spacing and where it came from, or None when unknown."""
    pair = _floats(ds.get("PixelSpacing"), 2)
    if pair is None:
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            measures = shared[0].get("PixelMeasuresSequence")
            if measures:
                pair = _floats(measures[0].get("PixelSpacing"), 2)
    if pair is not None and pair[0] > 0 and pair[1] > 0:
        return Spacing(pair[0], pair[1], "PixelSpacing")
    pair = _floats(ds.get("ImagerPixelSpacing"), 2)
    if pair is not None and pair[0] > 0 and pair[1] > 0:
        return Spacing(pair[0], pair[1], "ImagerPixelSpacing")
    return None


def _floats(value: object, count: int) -> list[float] | None:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes) or len(value) != count:
        return None
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _int(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _float(value: object) -> float | None:
    try:
        number = float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None
