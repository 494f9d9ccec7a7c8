"""WADO-RS: instances as stored, metadata (DICOM JSON) and frames."""

from __future__ import annotations

import functools
import io
import json
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final

from fastapi import APIRouter, HTTPException, Request, Response
from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.tag import BaseTag
from pydicom.valuerep import VR

from dicom_node.dicomweb.common import (
    CACHE_CONTROL,
    Read,
    _accept,
    _audit_read,
    _boundary,
    _json_response,
    _multipart_response,
    _Stored,
    _syntaxes_for,
    _target,
)
from saf import vault
from saf.deps import HubDep
from saf.hub import Hub
from saf.identity import Principal
from saf.models import Blob

router = APIRouter()

AVAILABLE_TRANSFER_SYNTAX_UID: Final = ("00083002", "UI")
"""(tag, VR) of the attribute metadata adds: the syntax the instance is served in."""


PART_IN_MEMORY_MAX: Final = 64 << 20
"""Objects up to this size are sent as one piece, decrypted while the previous one is
sent; larger ones stream chunk by chunk, so memory stays flat for a multi-GB object."""


def _stream_instances(hub: Hub, found: list[_Stored], boundary: str) -> Iterator[bytes]:
    """The multipart body, one part per stored object, the next decrypted ahead.

    Starlette pulls each piece of a sync iterator through the thread pool and sends it
    before asking for the next, so one piece per object (not per header and chunk) saves
    the hops, and a helper thread decrypts object n+1 while object n is on the wire.
    """

    def head(stored: _Stored) -> bytes:
        return (
            f"--{boundary}\r\nContent-Type: application/dicom; "
            f"transfer-syntax={stored.instance.transfer_syntax_uid}\r\n"
            f"Content-Length: {stored.blob.size}\r\n\r\n"
        ).encode()

    def part(stored: _Stored) -> bytes:
        return b"".join([head(stored), *vault.read(hub, stored.blob), b"\r\n"])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="saf-wado") as pool:
        ahead: Future[bytes] | None = None
        for index, stored in enumerate(found):
            if stored.blob.size > PART_IN_MEMORY_MAX:  # never read ahead (see below)
                yield head(stored)
                yield from vault.read(hub, stored.blob)
                yield b"\r\n"
                continue
            current = ahead or pool.submit(part, stored)
            following = found[index + 1] if index + 1 < len(found) else None
            ahead = (
                pool.submit(part, following)
                if following is not None and following.blob.size <= PART_IN_MEMORY_MAX
                else None
            )
            yield current.result()
    yield f"--{boundary}--\r\n".encode()


def _retrieve(request: Request, hub: Hub, caller: Principal, found: list[_Stored]) -> Response:
    syntaxes = _syntaxes_for(request, "application/dicom")
    if syntaxes is not None:
        stored_as = {s.instance.transfer_syntax_uid for s in found}
        if not stored_as <= syntaxes:
            raise HTTPException(
                406,
                "the hub serves instances in their stored transfer syntax ("
                + ", ".join(sorted(stored_as))
                + "); accept transfer-syntax=* or that syntax",
            )
    boundary = _boundary()
    return _multipart_response(
        _stream_instances(hub, found, boundary), boundary, "application/dicom"
    )


@router.get("/studies/{study}")
def retrieve_study(study: str, request: Request, caller: Read, hub: HubDep) -> Response:
    """WADO-RS: the study's instances as stored (multipart/related; application/dicom)."""
    found = _target(hub, caller, "read", study)
    response = _retrieve(request, hub, caller, found)
    _audit_read(hub, caller, found, "Study", study, "WADO-RS instances")
    return response


@router.get("/studies/{study}/series/{series}")
def retrieve_series(
    study: str, series: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: the series' instances as stored."""
    found = _target(hub, caller, "read", study, series)
    response = _retrieve(request, hub, caller, found)
    _audit_read(hub, caller, found, "Series", series, "WADO-RS instances")
    return response


@router.get("/studies/{study}/series/{series}/instances/{instance}")
def retrieve_instance(
    study: str, series: str, instance: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: one instance as stored."""
    found = _target(hub, caller, "read", study, series, instance)
    response = _retrieve(request, hub, caller, found)
    _audit_read(hub, caller, found, "Instance", instance, "WADO-RS instances")
    return response


# ----- metadata


class _ChunkReader(io.RawIOBase):
    """A seekable read-only file over an iterator of byte chunks (the decrypted blob).

    pydicom seeks and tells while it parses; the bytes read so far are kept so it can
    seek back, and a header-only parse never pulls the pixel data through decryption.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._data = bytearray()
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _fill(self, size: int) -> None:
        while not self._done and len(self._data) < size:
            try:
                self._data += next(self._chunks)
            except StopIteration:
                self._done = True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            self._fill(1 << 62)
            offset += len(self._data)
        elif whence == io.SEEK_CUR:
            offset += self._pos
        self._pos = max(0, offset)
        return self._pos

    def readinto(self, target: Any) -> int:
        self._fill(self._pos + len(target))
        n = max(0, min(len(target), len(self._data) - self._pos))
        target[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()  # closes the blob store handle under the generator
        super().close()


def _open_dataset(hub: Hub, blob: Blob, *, pixels: bool) -> Dataset:
    """The stored object as a dataset (read through the decrypting stream)."""
    if blob.size <= WHOLE_READ_MAX:
        # Decrypting is per chunk anyway (1 MiB by default), and pydicom reads a few bytes
        # at a time: an in-memory file answers those reads far faster than _ChunkReader.
        return dcmread(io.BytesIO(b"".join(vault.read(hub, blob))), stop_before_pixels=not pixels)
    with _ChunkReader(vault.read(hub, blob)) as fp:
        return dcmread(fp, stop_before_pixels=not pixels)


WHOLE_READ_MAX: Final = 1 << 20
"""Objects up to this size are decrypted whole before parsing (see `_open_dataset`)."""


class _MetadataCache:
    """Encoded DICOM JSON of recently served instances, in this process's memory only.

    Keyed by instance row id: a row's stored object never changes (a different payload
    under the same SOP Instance UID is a new row), so an entry never goes stale. Reading
    headers through pydicom costs milliseconds per instance, which a viewer pays again on
    every reopening of a study; this keeps the second time fast without a table or a disk
    copy of PHI. Access is decided before the cache is asked (tenancy query first).
    """

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._size = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._entries.get(key)
            if data is not None:
                self._entries.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            if key in self._entries or len(data) > self._max:
                return
            self._entries[key] = data
            self._size += len(data)
            while self._size > self._max:
                _, dropped = self._entries.popitem(last=False)
                self._size -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._size = 0


METADATA_CACHE_BYTES: Final = 128 << 20
"""Memory the per-process metadata cache may hold (about 50,000 CT instances' headers)."""

metadata_cache = _MetadataCache(METADATA_CACHE_BYTES)


BULK_DATA_THRESHOLD: Final = 1 << 20
"""Binary values up to this size are inlined (base64) in metadata; pixel data is left out."""

MEMO_VALUE_MAX: Final = 1024
"""Longest raw value whose JSON is shared between the instances of one metadata answer."""

_MEMO_VRS: Final = frozenset(
    {
        *("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT"),
        *("PN", "SH", "SL", "SS", "ST", "TM", "UC", "UI", "UL", "UR", "US", "UT"),
    }
)
"""Explicit VRs whose JSON depends only on the value bytes, byte order and character set."""

_Memo = dict[tuple[Any, ...], str]


@functools.lru_cache(maxsize=4096)
def _ambiguous(tag: int) -> bool:
    """Whether pydicom decides the tag's VR from other elements (US or SS, OB or OW...)."""
    try:
        return " or " in dictionary_VR(tag)
    except KeyError:
        return False  # a private or unknown tag: its explicit VR is what it is


def _dataset_json(ds: Dataset, memo: _Memo) -> list[tuple[str, str]]:
    """(tag, encoded JSON element) of every element, as pydicom's to_json_dict makes them.

    Most elements of a study's instances (patient, study, series, equipment, image
    modules) carry the same bytes in every instance; their JSON is made once per answer
    and reused (the memo), which is most of the cost of a cold metadata request.
    """
    charset = str(ds.get("SpecificCharacterSet", ""))
    out = []
    # keys(), not iteration: iterating a Dataset converts every element, the cost avoided here
    for tag in ds.keys():  # noqa: SIM118
        raw = ds.get_item(tag)
        key: tuple[Any, ...] | None = None
        if (
            isinstance(raw, RawDataElement)
            and raw.VR in _MEMO_VRS
            and raw.value is not None
            and len(raw.value) <= MEMO_VALUE_MAX
            and not _ambiguous(int(tag))
        ):
            key = (int(tag), raw.VR, raw.value, raw.is_little_endian, charset)
            cached = memo.get(key)
            if cached is not None:
                out.append((f"{tag:08X}", cached))
                continue
        element = ds[tag].to_json_dict(None, BULK_DATA_THRESHOLD)
        encoded = json.dumps(element, separators=(",", ":"))
        if key is not None:
            memo[key] = encoded
        out.append((f"{tag:08X}", encoded))
    return out


_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
"""Explicit VRs with a reserved field and a 4-byte length (PS3.5 7.1.2)."""
_PIXEL_TAGS: Final = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
"""Where pydicom's stop_before_pixels stops."""
_FAST_SYNTAXES: Final = frozenset(
    {"1.2.840.10008.1.2.1", *(
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5",
    )}
)  # fmt: skip
"""Syntaxes whose data set (before Pixel Data) is plain explicit VR little endian."""
_CHARSET_TAG: Final = 0x00080005


_VRS: Final = {str(vr).encode(): str(vr) for vr in VR if len(str(vr)) == 2}
"""The explicit VRs (PS3.5 6.2), as they appear in the bytes."""
_ELEMENT_HEAD: Final = struct.Struct("<HH2sH")
_LONG_LENGTH: Final = struct.Struct("<L")


def _explicit_elements(data: bytes, offset: int) -> list[tuple[int, str, bytes]] | None:
    """(tag, VR, value) of each top-level element from `offset` up to Pixel Data, read
    directly from explicit VR little endian bytes; None when anything needs pydicom's
    reader (an undefined length, a UN element, a malformed header)."""
    out: list[tuple[int, str, bytes]] = []
    size = len(data)
    while offset < size:
        if offset + 8 > size:
            return None
        group, element, raw_vr, length = _ELEMENT_HEAD.unpack_from(data, offset)
        tag = group << 16 | element
        if tag in _PIXEL_TAGS:
            break
        vr = _VRS.get(raw_vr)
        if vr is None or vr == "UN":
            return None
        if raw_vr in _LONG_VRS:
            if offset + 12 > size:
                return None
            (length,) = _LONG_LENGTH.unpack_from(data, offset + 8)
            start = offset + 12
        else:
            start = offset + 8
        if length == 0xFFFFFFFF:
            return None
        offset = start + length
        if offset > size:
            return None
        out.append((tag, vr, data[start:offset]))
    return out


def _fast_json(data: bytes, syntax: str, memo: _Memo) -> list[tuple[str, str]] | None:
    """`_dataset_json` of a stored Part 10 object without building a pydicom Dataset: its
    elements are split from the bytes and each is converted by pydicom on its own (or
    taken from the memo), so the JSON is pydicom's. None: use the full reader."""
    if syntax not in _FAST_SYNTAXES or data[128:132] != b"DICM":
        return None
    meta = _explicit_elements(data, 132)
    if not meta or meta[0][0] != 0x00020000 or len(meta[0][2]) != 4:
        return None
    (meta_length,) = struct.unpack("<L", meta[0][2])
    elements = _explicit_elements(data, 144 + meta_length)
    if elements is None or any(tag >> 16 == 2 for tag, _, _ in elements):
        return None
    charset_raw = next((v for t, _, v in elements if t == _CHARSET_TAG), None)
    charset, encodings = "", convert_encodings(None)
    if charset_raw is not None:
        value = _convert(_CHARSET_TAG, "CS", charset_raw, None).value
        charset, encodings = str(value), convert_encodings(value)
    out = []
    for tag, vr, value in elements:
        key: tuple[Any, ...] | None = None
        if vr in _MEMO_VRS and len(value) <= MEMO_VALUE_MAX and not _ambiguous(tag):
            key = (tag, vr, value, True, charset)
            cached = memo.get(key)
            if cached is not None:
                out.append((f"{tag:08X}", cached))
                continue
        element = _convert(tag, vr, value, encodings).to_json_dict(None, BULK_DATA_THRESHOLD)
        encoded = json.dumps(element, separators=(",", ":"))
        if key is not None:
            memo[key] = encoded
        out.append((f"{tag:08X}", encoded))
    return out


def _convert(tag: int, vr: str, value: bytes, encodings: list[str] | None) -> DataElement:
    raw = RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)
    return convert_raw_data_element(raw, encoding=encodings)


def _metadata(hub: Hub, stored: _Stored, memo: _Memo) -> bytes:
    """One instance's DICOM JSON (no pixel data), encoded."""
    cached = metadata_cache.get(stored.instance.id)
    if cached is not None:
        return cached
    fast = None
    ds: Dataset
    if stored.blob.size <= WHOLE_READ_MAX:
        data = b"".join(vault.read(hub, stored.blob))
        fast = _fast_json(data, stored.instance.transfer_syntax_uid, memo)
        if fast is None:
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    else:
        ds = _open_dataset(hub, stored.blob, pixels=False)
    tag, vr = AVAILABLE_TRANSFER_SYNTAX_UID
    pairs = fast if fast is not None else _dataset_json(ds, memo)
    elements = [(t, e) for t, e in pairs if t != tag]
    syntax = json.dumps({"vr": vr, "Value": [stored.instance.transfer_syntax_uid]})
    elements.append((tag, syntax.replace(", ", ",").replace(": ", ":")))
    data = ("{" + ",".join(f'"{t}":{e}' for t, e in elements) + "}").encode()
    metadata_cache.put(stored.instance.id, data)
    return data


def _metadata_response(
    request: Request, hub: Hub, caller: Principal, found: list[_Stored], level: str, uid: str
) -> Response:
    memo: _Memo = {}
    body = b"[" + b",".join(_metadata(hub, s, memo) for s in found) + b"]"
    _audit_read(hub, caller, found, level, uid, "WADO-RS metadata")
    return _json_response(request, body)


@router.get("/studies/{study}/metadata")
def study_metadata(study: str, request: Request, caller: Read, hub: HubDep) -> Response:
    """WADO-RS: DICOM JSON metadata of every instance of the study (no bulk data)."""
    found = _target(hub, caller, "read", study)
    return _metadata_response(request, hub, caller, found, "Study", study)


@router.get("/studies/{study}/series/{series}/metadata")
def series_metadata(
    study: str, series: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: DICOM JSON metadata of every instance of the series."""
    found = _target(hub, caller, "read", study, series)
    return _metadata_response(request, hub, caller, found, "Series", series)


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
def instance_metadata(
    study: str, series: str, instance: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: DICOM JSON metadata of one instance."""
    found = _target(hub, caller, "read", study, series, instance)
    return _metadata_response(request, hub, caller, found, "Instance", instance)


# ----- frames

ENCAPSULATED_MEDIA: Final[dict[str, str]] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/x-dicom-rle",
}
"""Media types of frames sent in their stored (compressed) transfer syntax."""

EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"


def _frame_numbers(frames: str) -> list[int]:
    try:
        numbers = [int(f) for f in frames.split(",") if f.strip()]
    except ValueError:
        raise HTTPException(400, "frames must be a comma-separated list of numbers") from None
    if not numbers or any(n < 1 for n in numbers):
        raise HTTPException(400, "frame numbers start at 1")
    return numbers


def _native_frames(ds: Dataset, numbers: list[int]) -> list[bytes]:
    """Frames of an uncompressed object, sliced from Pixel Data as stored."""
    bits = int(ds.BitsAllocated)
    frame_bytes = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
    data = bytes(ds.PixelData)
    return [data[(n - 1) * frame_bytes : n * frame_bytes] for n in numbers]


def _decoded_frames(ds: Dataset, numbers: list[int], count: int) -> list[bytes]:
    """Frames of a compressed object, decoded to little-endian native pixels."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise HTTPException(
            406,
            f"cannot decode frames stored as {ds.file_meta.TransferSyntaxUID}: ask for "
            "transfer-syntax=* to receive them as stored",
        ) from exc
    frames = pixels if count > 1 else pixels[None, ...]
    return [frames[n - 1].astype(frames.dtype.newbyteorder("<")).tobytes() for n in numbers]


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}")
def retrieve_frames(
    study: str,
    series: str,
    instance: str,
    frames: str,
    request: Request,
    caller: Read,
    hub: HubDep,
) -> Response:
    """WADO-RS: frames, uncompressed (application/octet-stream) or, when the client accepts
    it (``transfer-syntax=*`` or the stored one), as stored."""
    numbers = _frame_numbers(frames)
    [stored] = _target(hub, caller, "read", study, series, instance)
    syntax = stored.instance.transfer_syntax_uid
    count = max(1, stored.instance.number_of_frames or 1)
    if max(numbers) > count:
        raise HTTPException(404, f"the instance has {count} frame(s)")
    ds = _open_dataset(hub, stored.blob, pixels=True)
    if "PixelData" not in ds:
        raise HTTPException(404, "the instance has no pixel data")
    compressed = ds.file_meta.TransferSyntaxUID.is_compressed
    part_type = "application/octet-stream"
    if compressed:
        media = ENCAPSULATED_MEDIA.get(syntax, "application/octet-stream")
        as_stored = _accepts_stored(request, media, syntax)
        if as_stored:
            part_type = media
            data = [
                f
                for i, f in enumerate(generate_frames(ds.PixelData, number_of_frames=count))
                if i + 1 in set(numbers)
            ]
            by_number = dict(zip(sorted(set(numbers)), data, strict=True))
            parts = [by_number[n] for n in numbers]
        else:
            _syntaxes_for(request, "application/octet-stream")
            parts = _decoded_frames(ds, numbers, count)
            syntax = EXPLICIT_LE
    else:
        _syntaxes_for(request, "application/octet-stream")
        parts = _native_frames(ds, numbers)
        syntax = EXPLICIT_LE
    boundary = _boundary()
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: {part_type}; transfer-syntax={syntax}\r\n\r\n".encode()
            + part
            + b"\r\n"
            for part in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    _audit_read(hub, caller, [stored], "Instance", instance, f"WADO-RS frames {frames[:64]}")
    return Response(
        body,
        media_type=f'multipart/related; type="{part_type}"; boundary={boundary}',
        headers={"Cache-Control": CACHE_CONTROL},
    )


def _accepts_stored(request: Request, media: str, syntax: str) -> bool:
    """Whether the client takes compressed frames as stored (``*`` or the stored syntax)."""
    for entry in _accept(request):
        if entry.part_type in (media, "*/*", "application/octet-stream") or entry.media_type in (
            media,
        ):
            if entry.params.get("transfer-syntax") in ("*", syntax):
                return True
            if entry.part_type == media and "transfer-syntax" not in entry.params:
                return True
    return False
