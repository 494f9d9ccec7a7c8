"""WADO-RS: instances as stored, metadata (DICOM JSON), bulk data and frames."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final

from fastapi import APIRouter, HTTPException, Request, Response
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_node.dicomweb.common import (
    CACHE_CONTROL,
    Read,
    _accept,
    _audit_read,
    _base_url,
    _boundary,
    _json_response,
    _multipart_response,
    _Stored,
    _syntaxes_for,
    _target,
)
from saf import instance_metadata as metadata_index
from saf import vault
from saf.deps import HubDep
from saf.dicomjson import TagPathError, bulk_value, pixel_data_entry
from saf.hub import Hub
from saf.identity import Principal
from saf.models import Blob

router = APIRouter()

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
        return _part_head(boundary, stored)

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
    yield _closing(boundary)


def _part_head(boundary: str, stored: _Stored) -> bytes:
    return (
        f"--{boundary}\r\nContent-Type: application/dicom; "
        f"transfer-syntax={stored.instance.transfer_syntax_uid}\r\n"
        f"Content-Length: {stored.blob.size}\r\n\r\n"
    ).encode()


def _closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode()


def _body_length(found: list[_Stored], boundary: str) -> int:
    """The length of `_stream_instances`' body: each part's header, object and CRLF."""
    parts = sum(len(_part_head(boundary, s)) + s.blob.size + 2 for s in found)
    return parts + len(_closing(boundary))


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
        _stream_instances(hub, found, boundary),
        boundary,
        "application/dicom",
        length=_body_length(found, boundary),
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


def _instance_json(hub: Hub, stored: _Stored) -> bytes:
    """An instance's metadata made from its stored object (it has no row yet)."""
    instance = stored.instance
    syntax = UID(instance.transfer_syntax_uid)
    study_uid, series_uid = stored.study.study_instance_uid, stored.series.series_instance_uid
    prefix = metadata_index.bulk_prefix(study_uid, series_uid, instance.sop_instance_uid)
    extra: dict[str, dict[str, Any]] = {}
    if stored.blob.size <= WHOLE_READ_MAX or syntax == DeflatedExplicitVRLittleEndian:
        ds = dcmread(io.BytesIO(b"".join(vault.read(hub, stored.blob))))
    else:
        # Pixel data is where the bytes are: stop before it, and describe it from its header.
        with _ChunkReader(vault.read(hub, stored.blob)) as fp:
            ds = dcmread(fp, stop_before_pixels=True)
            head = fp.read(12)
        entry = pixel_data_entry(
            head,
            little_endian=syntax.is_little_endian,
            implicit_vr=syntax.is_implicit_VR,
            bulk_uri=lambda path: prefix + path,
        )
        if entry is not None:
            extra[entry[0]] = entry[1]
    return metadata_index.make(
        ds,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=instance.sop_instance_uid,
        transfer_syntax_uid=instance.transfer_syntax_uid,
        extra=extra,
    )


def _metadata_response(
    request: Request, hub: Hub, caller: Principal, found: list[_Stored], level: str, uid: str
) -> Response:
    """The instances' rows in one query; an instance without one gets it made, stored and
    served. The answer is the rows joined as they are (no JSON parsed)."""
    items = metadata_index.load(hub, [s.instance.id for s in found])
    made = []
    for stored in found:
        if stored.instance.id not in items:
            data = items[stored.instance.id] = _instance_json(hub, stored)
            made.append(metadata_index.sealed_row(hub, stored.instance.id, data))
    metadata_index.store(hub, made)
    body = b"[" + b",".join(items[s.instance.id] for s in found) + b"]"
    body = metadata_index.absolute_uris(body, _base_url(request))
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


# ----- bulk data


@router.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{path:path}")
def retrieve_bulkdata(
    study: str,
    series: str,
    instance: str,
    path: str,
    request: Request,
    caller: Read,
    hub: HubDep,
) -> Response:
    """WADO-RS: one binary value of an instance, as its metadata's BulkDataURI names it (a
    tag path), read from the stored object: multipart/related with one
    application/octet-stream part, or the bare bytes when only that is accepted. A
    single-range ``Range: bytes=`` header answers 206 with those bytes."""
    [stored] = _target(hub, caller, "read", study, series, instance)
    ds = _open_dataset(hub, stored.blob, pixels=True)
    try:
        value = bulk_value(ds, path)
    except TagPathError as exc:
        raise HTTPException(404, str(exc)) from None
    status, headers, value = _byte_range(request.headers.get("range"), value)
    _audit_read(hub, caller, [stored], "Instance", instance, f"WADO-RS bulkdata {path[:64]}")
    headers["Cache-Control"] = CACHE_CONTROL
    if _bare_octets(request):
        headers["Accept-Ranges"] = "bytes"
        return Response(value, status, headers, media_type="application/octet-stream")
    boundary = _boundary()
    part_head = "Content-Type: application/octet-stream\r\n"
    if "Content-Range" in headers:
        part_head += f"Content-Range: {headers.pop('Content-Range')}\r\n"
    body = f"--{boundary}\r\n{part_head}\r\n".encode() + value + f"\r\n--{boundary}--\r\n".encode()
    media = f'multipart/related; type="application/octet-stream"; boundary={boundary}'
    return Response(body, status, headers, media_type=media)


def _bare_octets(request: Request) -> bool:
    """Whether the client asks for the bytes alone (Accept names application/octet-stream
    and no multipart)."""
    types = {entry.media_type for entry in _accept(request)}
    return "application/octet-stream" in types and "multipart/related" not in types


def _byte_range(header: str | None, value: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, bytes) for an optional ``Range: bytes=first-last`` (one range;
    a suffix ``-n`` too). Several ranges are answered whole (RFC 9110 allows it); a range
    past the end is 416."""
    size = len(value)
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if match is None or match[1] == match[2] == "":
        return 200, {}, value
    if match[1] == "":
        first, last = max(0, size - int(match[2])), size - 1
    else:
        first = int(match[1])
        last = min(int(match[2]), size - 1) if match[2] else size - 1
    if first >= size or last < first:
        raise HTTPException(
            416,
            f"range not satisfiable: the value has {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return 206, {"Content-Range": f"bytes {first}-{last}/{size}"}, value[first : last + 1]


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
