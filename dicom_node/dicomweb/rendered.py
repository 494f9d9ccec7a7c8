"""WADO-RS rendered resources and thumbnails (PS3.18 10.4.1.1.3, 10.4.1.3)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from fastapi import APIRouter, HTTPException, Request, Response

from dicom_node.dicomweb.common import (
    CACHE_CONTROL,
    Read,
    _accept,
    _audit_read,
    _boundary,
    _multipart_response,
    _Stored,
    _target,
)
from dicom_node.dicomweb.wado import _frame_numbers, _open_dataset
from saf.deps import HubDep
from saf.hub import Hub
from saf.identity import Principal
from saf.render import Format, RenderError, Window, render

router = APIRouter()

THUMBNAIL_SIZE: Final = 128
"""Longest side of a /thumbnail when no viewport is given."""

# ----- rendered and thumbnails


@dataclass(frozen=True)
class _RenderOptions:
    fmt: Format
    size: int | None
    window: Window | None
    quality: int


_IMAGE_TYPES: Final[dict[str, Format]] = {
    "image/jpeg": "jpeg",
    "image/png": "png",
    "image/webp": "webp",
}


def _render_options(request: Request, default_size: int | None) -> _RenderOptions:
    fmt: Format = "jpeg"
    for entry in _accept(request):
        if entry.part_type in _IMAGE_TYPES:
            fmt = _IMAGE_TYPES[entry.part_type]
            break
        if entry.part_type in ("image/*", "*/*", ""):
            break
    else:
        if _accept(request):
            raise HTTPException(406, "rendered images are image/jpeg, image/png or image/webp")
    params = request.query_params
    size = default_size
    if viewport := params.get("viewport"):
        parts = viewport.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise HTTPException(
                400, "viewport must be width,height in pixels (cropping is not supported)"
            )
        size = min(int(p) for p in parts)
    window = None
    if text := params.get("window"):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].lower() != "linear"):
            raise HTTPException(400, "window must be center,width[,linear]")
        try:
            window = Window(float(parts[0]), float(parts[1]))
        except ValueError as exc:
            raise HTTPException(400, f"window: {exc}") from None
    quality = 85
    if text := params.get("quality"):
        if not text.isdigit() or not 1 <= int(text) <= 100:
            raise HTTPException(400, "quality must be 1 to 100")
        quality = int(text)
    return _RenderOptions(fmt, size, window, quality)


def _render(hub: Hub, stored: _Stored, options: _RenderOptions, frame: int | None) -> bytes:
    ds = _open_dataset(hub, stored.blob, pixels=True)
    try:
        return render(
            ds,
            frame=frame,
            size=options.size,
            window=options.window,
            fmt=options.fmt,
            quality=options.quality,
        )
    except RenderError as exc:
        raise HTTPException(422, f"cannot render this instance: {exc.reason}") from None
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


def _image_response(
    hub: Hub,
    caller: Principal,
    stored: _Stored,
    options: _RenderOptions,
    frame: int | None,
    level: str,
    uid: str,
    what: str,
) -> Response:
    data = _render(hub, stored, options, frame)
    _audit_read(hub, caller, [stored], level, uid, what)
    return Response(
        data, media_type=f"image/{options.fmt}", headers={"Cache-Control": CACHE_CONTROL}
    )


def _representative(found: list[_Stored]) -> _Stored:
    """The middle instance of the first series (what a thumbnail shows)."""
    first = found[0].series.id
    members = [s for s in found if s.series.id == first]
    return members[len(members) // 2]


@router.get("/studies/{study}/series/{series}/instances/{instance}/rendered")
def instance_rendered(
    study: str, series: str, instance: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: the instance rendered (JPEG, PNG or WebP; `window`, `viewport`, `quality`)."""
    options = _render_options(request, None)
    [stored] = _target(hub, caller, "read", study, series, instance)
    return _image_response(hub, caller, stored, options, None, "Instance", instance, "rendered")


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered")
def frame_rendered(
    study: str,
    series: str,
    instance: str,
    frames: str,
    request: Request,
    caller: Read,
    hub: HubDep,
) -> Response:
    """WADO-RS: one frame rendered."""
    numbers = _frame_numbers(frames)
    if len(numbers) != 1:
        raise HTTPException(400, "render one frame at a time")
    options = _render_options(request, None)
    [stored] = _target(hub, caller, "read", study, series, instance)
    return _image_response(
        hub, caller, stored, options, numbers[0] - 1, "Instance", instance, "rendered frame"
    )


def _rendered_parts(
    hub: Hub, found: list[_Stored], options: _RenderOptions, boundary: str
) -> Iterator[bytes]:
    """One rendered image per instance, rendered as the body is sent (memory stays flat)."""
    for stored in found:
        try:
            data = _render(hub, stored, options, None)
        except HTTPException:
            continue  # an instance without displayable pixels (SR, PDF) has no rendering
        yield f"--{boundary}\r\nContent-Type: image/{options.fmt}\r\n\r\n".encode()
        yield data
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _rendered_many(
    request: Request, hub: Hub, caller: Principal, found: list[_Stored], level: str, uid: str
) -> Response:
    options = _render_options(request, None)
    boundary = _boundary()
    _audit_read(hub, caller, found, level, uid, "rendered")
    return _multipart_response(
        _rendered_parts(hub, found, options, boundary), boundary, f"image/{options.fmt}"
    )


@router.get("/studies/{study}/rendered")
def study_rendered(study: str, request: Request, caller: Read, hub: HubDep) -> Response:
    """WADO-RS: every image of the study rendered (multipart/related, one part each)."""
    found = _target(hub, caller, "read", study)
    return _rendered_many(request, hub, caller, found, "Study", study)


@router.get("/studies/{study}/series/{series}/rendered")
def series_rendered(
    study: str, series: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: every image of the series rendered (multipart/related, one part each)."""
    found = _target(hub, caller, "read", study, series)
    return _rendered_many(request, hub, caller, found, "Series", series)


@router.get("/studies/{study}/thumbnail")
def study_thumbnail(study: str, request: Request, caller: Read, hub: HubDep) -> Response:
    """WADO-RS: a thumbnail of the study (its first series' middle image)."""
    options = _render_options(request, THUMBNAIL_SIZE)
    found = _target(hub, caller, "read", study)
    stored = _representative(found)
    return _image_response(
        hub, caller, stored, options, None, "Study", stored.study.id, "thumbnail"
    )


@router.get("/studies/{study}/series/{series}/thumbnail")
def series_thumbnail(
    study: str, series: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: a thumbnail of the series (its middle image)."""
    options = _render_options(request, THUMBNAIL_SIZE)
    found = _target(hub, caller, "read", study, series)
    return _image_response(
        hub, caller, _representative(found), options, None, "Series", series, "thumbnail"
    )


@router.get("/studies/{study}/series/{series}/instances/{instance}/thumbnail")
def instance_thumbnail(
    study: str, series: str, instance: str, request: Request, caller: Read, hub: HubDep
) -> Response:
    """WADO-RS: a thumbnail of the instance."""
    options = _render_options(request, THUMBNAIL_SIZE)
    [stored] = _target(hub, caller, "read", study, series, instance)
    return _image_response(hub, caller, stored, options, None, "Instance", instance, "thumbnail")
