"""The one renderer of saf: a DICOM image frame to JPEG, WebP or PNG bytes.

Used for thumbnails (Celery workers), full-size frames (web viewer) and DICOMweb
``/rendered``. Pure over a pydicom ``Dataset``: decoding is pydicom's, the display
pipeline (PS3.3 C.11: Modality LUT, VOI, Presentation LUT) is here.

Choices worth knowing:

- VOI: an explicit ``window`` wins, then the header's first Window Center/Width
  (honouring VOI LUT Function LINEAR, LINEAR_EXACT and SIGMOID), then an
  auto-window over the 1st-99th percentile of the frame, ignoring pixel padding.
- Colour (RGB, YBR_* converted by pydicom, PALETTE COLOR) is shown as is unless a
  window is given, which then applies to every channel.
- Non-square pixels (Pixel Spacing, Imager Pixel Spacing, Pixel Aspect Ratio) are
  stretched so the output has square pixels.
- ``size`` makes the longest side exactly ``size`` (down- or up-scaled), so
  thumbnails tile uniformly.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont, features
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

Format = Literal["jpeg", "webp", "png"]
FloatArray = npt.NDArray[np.float32]
U8Array = npt.NDArray[np.uint8]

FORMATS: tuple[Format, ...] = ("jpeg", "webp", "png")
"""Output formats render() accepts."""

AUTO_WINDOW_PERCENTILES: tuple[float, float] = (1.0, 99.0)
"""Percentiles of the frame's modality values spanned by the auto-window."""

AUTO_WINDOW_MAX_SAMPLES = 1 << 20
"""Pixels sampled (evenly strided) for the auto-window percentiles of large frames."""

ASPECT_TOLERANCE = 0.01
"""Pixel aspect ratios closer than this to 1 are treated as square."""

_PIL_FORMATS: dict[Format, str] = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}
_GREY = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class Window:
    """A linear VOI window in modality units (e.g. HU): centre and width (> 0)."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            raise ValueError(f"window center and width must be finite, got {self}")
        if self.width <= 0:
            raise ValueError(f"window width must be > 0, got {self.width}")


class RenderError(Exception):
    """An image could not be rendered; ``reason`` is short, PHI-free and fit for display."""

    def __init__(self, reason: str, *, sop_instance_uid: str = "") -> None:
        self.reason = reason
        self.sop_instance_uid = sop_instance_uid
        what = f"SOP Instance {sop_instance_uid}" if sop_instance_uid else "image"
        super().__init__(f"cannot render {what}: {reason}")


# --------------------------------------------------------------------------- public API


def frame_count(ds: Dataset) -> int:
    """Number of frames in ``ds`` (1 when Number of Frames is absent or empty)."""
    value = ds.get("NumberOfFrames")
    return max(1, int(value)) if value not in (None, "") else 1


def render(
    ds: Dataset,
    *,
    frame: int | None = None,
    size: int | None = None,
    window: Window | None = None,
    fmt: Format = "jpeg",
    quality: int = 85,
) -> bytes:
    """Render one frame of ``ds`` as encoded image bytes.

    ``frame`` is 0-based; ``None`` picks the middle frame. ``size`` scales the
    longest side to ``size`` pixels; ``None`` keeps the native size (after
    square-pixel correction). Raises ``ValueError`` for bad arguments and
    ``RenderError`` when the pixel data cannot be decoded or displayed.
    """
    _check_output(fmt, quality, size)
    index = _frame_index(ds, frame)
    pixels = _decode_frame(ds, index)
    image = Image.fromarray(_display_values(ds, pixels, window))
    image = _resize(image, _display_size(ds, image.size, size))
    return _encode(image, fmt, quality)


def decode_frame(ds: Dataset, frame: int) -> npt.NDArray[Any]:
    """The stored values of frame ``frame`` (0-based) of ``ds``, for callers that keep
    decoded frames (the viewer's cache) and render them with `render_decoded`."""
    return _decode_frame(ds, _frame_index(ds, frame))


def render_decoded(
    ds: Dataset,
    pixels: npt.NDArray[Any],
    *,
    size: int | None = None,
    window: Window | None = None,
    fmt: Format = "jpeg",
    quality: int = 85,
) -> bytes:
    """`render` for a frame already decoded with `decode_frame` (same pipeline, no decode)."""
    _check_output(fmt, quality, size)
    image = Image.fromarray(_display_values(ds, pixels, window))
    image = _resize(image, _display_size(ds, image.size, size))
    return _encode(image, fmt, quality)


def modality_values(ds: Dataset, pixels: npt.NDArray[Any]) -> FloatArray:
    """Stored values of a grey frame to modality values (Modality LUT or Rescale, e.g. HU)."""
    return _modality_values(ds, pixels)


def header_window(ds: Dataset) -> Window | None:
    """The header's first valid Window Center/Width, or None."""
    return _header_window(ds)


def default_window(ds: Dataset, pixels: npt.NDArray[Any]) -> Window:
    """The window `render` uses when none is given: the header's, else the auto-window."""
    header = _header_window(ds)
    if header is not None:
        return header
    if pixels.ndim != 2:
        return Window(127.5, 256.0)
    return _auto_window(_modality_values(ds, pixels), _padding_mask(ds, pixels))


def render_placeholder(size: int, reason: str, fmt: Format = "jpeg") -> bytes:
    """A grey ``size`` x ``size`` tile saying the image could not be rendered.

    ``reason`` is drawn as given (shortened to fit), so pass ``RenderError.reason``,
    never anything with PHI in it.
    """
    _check_output(fmt, 85, size)
    image = Image.new("L", (size, size), 128)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, size - 1, size - 1), outline=96, width=max(1, size // 64))
    font = _font(max(8, size // 12))
    lines = ["Image could not", "be rendered", _printable(reason)]
    line_height = _text_height(draw, font) * 1.3
    top = (size - line_height * len(lines)) / 2
    for number, line in enumerate(lines):
        text = _fit(draw, line, font, size * 0.9)
        width = draw.textlength(text, font=font)
        draw.text(((size - width) / 2, top + number * line_height), text, fill=32, font=font)
    return _encode(image, fmt, 85)


# --------------------------------------------------------------------------- decoding


def _check_output(fmt: str, quality: int, size: int | None) -> None:
    """Reject output options that would fail later or silently do something else."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "webp" and not features.check("webp"):
        raise ValueError("this Pillow build has no WebP support")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1, got {size}")


def _frame_index(ds: Dataset, frame: int | None) -> int:
    """The 0-based frame to render: the given one, or the middle one."""
    count = frame_count(ds)
    if frame is None:
        return count // 2
    if not 0 <= frame < count:
        raise ValueError(
            f"frame {frame} out of range: the dataset has {count} frame(s), 0..{count - 1}"
        )
    return frame


def _decode_frame(ds: Dataset, index: int) -> npt.NDArray[Any]:
    """Decode only frame ``index``; every failure becomes a RenderError with the reason."""
    uid = str(ds.get("SOPInstanceUID", ""))
    if "PixelData" not in ds:
        raise RenderError("no pixel data", sop_instance_uid=uid)
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not tsyntax:
        raise RenderError("no transfer syntax in the file meta", sop_instance_uid=uid)
    tsyntax = UID(str(tsyntax))
    _check_decoder(tsyntax, uid)
    try:
        arr: npt.NDArray[Any] = pixel_array(ds, index=index)
    except Exception as exc:  # decoders raise anything on a corrupt codestream
        # pydicom lists one line per plugin tried; keep them all, on one line.
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        reason = f"cannot decode {tsyntax.name} pixel data: {detail}"
        raise RenderError(reason, sop_instance_uid=uid) from exc
    return arr


def _check_decoder(tsyntax: UID, uid: str) -> None:
    """Raise a RenderError naming the transfer syntax and what is missing to decode it."""
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise RenderError(
            f"no decoder for transfer syntax {tsyntax}", sop_instance_uid=uid
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        reason = f"no decoder available for {tsyntax.name} ({missing})"
        raise RenderError(reason, sop_instance_uid=uid)


# --------------------------------------------------------------------------- display pipeline


def _display_values(ds: Dataset, pixels: npt.NDArray[Any], window: Window | None) -> U8Array:
    """Stored values of one frame to 8-bit display values (L or RGB)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric in _GREY and pixels.ndim == 2:
        return _grey_display(ds, pixels, window, invert=photometric == "MONOCHROME1")
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return _colour_display(ds, pixels, window)
    uid = str(ds.get("SOPInstanceUID", ""))
    shape = "x".join(map(str, pixels.shape))
    raise RenderError(f"unsupported photometric {photometric!r} ({shape})", sop_instance_uid=uid)


def _grey_display(
    ds: Dataset, pixels: npt.NDArray[Any], window: Window | None, *, invert: bool
) -> U8Array:
    """Modality LUT, VOI and, for MONOCHROME1, inversion."""
    values = _modality_values(ds, pixels)
    if window is not None:
        out = _linear(values, window)
    elif (header := _header_window(ds)) is not None:
        out = _voi(values, header, str(ds.get("VOILUTFunction", "LINEAR")).strip())
    else:
        out = _linear(values, _auto_window(values, _padding_mask(ds, pixels)))
    return np.subtract(255, out, dtype=np.uint8) if invert else out


def _colour_display(ds: Dataset, pixels: npt.NDArray[Any], window: Window | None) -> U8Array:
    """Colour frames as they are; a window, when given, applies to every channel."""
    if window is not None:
        return _linear(pixels.astype(np.float32), window)
    if pixels.dtype == np.uint8:
        return np.asarray(pixels, dtype=np.uint8)
    # More than 8 bits per sample: keep the top 8 (a palette's 16-bit LUT uses all 16).
    palette = str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR"
    bits = 16 if palette else int(ds.get("BitsStored", 8))
    return _to_u8(pixels.astype(np.int64) >> max(0, bits - 8))


def _modality_values(ds: Dataset, pixels: npt.NDArray[Any]) -> FloatArray:
    """Stored values to modality values (e.g. HU), as float32."""
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    slope = _number(ds, "RescaleSlope", 1.0) or 1.0
    intercept = _number(ds, "RescaleIntercept", 0.0)
    values = pixels.astype(np.float32)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _header_window(ds: Dataset) -> Window | None:
    """The first Window Center/Width pair of the header, if present and valid."""
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    try:
        return Window(center, width)
    except ValueError:
        return None


def _auto_window(values: FloatArray, padding: npt.NDArray[np.bool_] | None) -> Window:
    """A window spanning the 1st-99th percentile of the non-padding values."""
    sample = values[~padding] if padding is not None else values.ravel()
    if sample.size == 0:
        sample = values.ravel()
    step = max(1, sample.size // AUTO_WINDOW_MAX_SAMPLES)
    low, high = np.percentile(sample[::step], AUTO_WINDOW_PERCENTILES)
    return Window(float(low + high) / 2.0, max(float(high - low), 1.0))


def _padding_mask(ds: Dataset, pixels: npt.NDArray[Any]) -> npt.NDArray[np.bool_] | None:
    """Pixels equal to Pixel Padding Value (or within the padding range), if any."""
    pad = _first(ds.get("PixelPaddingValue"))
    if pad is None:
        return None
    limit = _first(ds.get("PixelPaddingRangeLimit"))
    if limit is None:
        return np.asarray(pixels == pad)
    low, high = min(pad, limit), max(pad, limit)
    return np.asarray((pixels >= low) & (pixels <= high))


def _linear(values: FloatArray, window: Window) -> U8Array:
    """PS3.3 C.11.2.1.2.1 LINEAR window to 0..255."""
    c, w = window.center, window.width
    if w <= 1.0:  # the formula degenerates to a threshold at c - 0.5
        return np.where(values > c - 0.5, 255, 0).astype(np.uint8)
    scale = np.float32(255.0 / (w - 1.0))
    offset = np.float32((0.5 - (c - 0.5) / (w - 1.0)) * 255.0)
    return _to_u8(values * scale + offset)


def _voi(values: FloatArray, window: Window, function: str) -> U8Array:
    """Header window with its VOI LUT Function (PS3.3 C.11.2.1.3)."""
    c, w = window.center, window.width
    if function == "LINEAR_EXACT":
        return _to_u8((values - np.float32(c)) * np.float32(255.0 / w) + np.float32(127.5))
    if function == "SIGMOID":
        return _to_u8(255.0 / (1.0 + np.exp(-4.0 * (values - np.float32(c)) / np.float32(w))))
    return _linear(values, window)


def _to_u8(values: npt.NDArray[Any]) -> U8Array:
    """Round and clip to 8-bit."""
    out: U8Array = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return out


# --------------------------------------------------------------------------- geometry and output


def _display_size(ds: Dataset, native: tuple[int, int], size: int | None) -> tuple[int, int]:
    """Output (width, height): square pixels, then the longest side scaled to ``size``."""
    width, height = float(native[0]), float(native[1])
    ratio = _pixel_aspect(ds)  # vertical / horizontal pixel size
    if ratio > 1.0:
        height *= ratio
    else:
        width /= ratio
    if size is not None:
        scale = size / max(width, height)
        width, height = width * scale, height * scale
    return max(1, round(width)), max(1, round(height))


def _pixel_aspect(ds: Dataset) -> float:
    """Vertical over horizontal pixel size, 1.0 when unknown or close to square."""
    ratio = 1.0
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "PixelAspectRatio"):
        pair = _pair(ds.get(keyword))
        if pair is not None:
            ratio = pair[0] / pair[1]
            break
    return 1.0 if abs(ratio - 1.0) < ASPECT_TOLERANCE else ratio


def _resize(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Resample to ``target`` with Lanczos, box-reducing first when shrinking 2x or more
    (as Pillow's own thumbnail does: much faster, and no visible difference)."""
    if image.size == target:
        return image
    return image.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)


def _encode(image: Image.Image, fmt: Format, quality: int) -> bytes:
    """Encode with Pillow."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=3)
    else:
        image.save(buffer, format=_PIL_FORMATS[fmt], quality=quality)
    return buffer.getvalue()


# --------------------------------------------------------------------------- small helpers


def _number(ds: Dataset, keyword: str, default: float) -> float:
    """A single numeric attribute as float, ``default`` when absent or empty."""
    value = _first(ds.get(keyword))
    return default if value is None else value


def _first(value: object) -> float | None:
    """First value of a possibly multi-valued numeric attribute, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _pair(value: object) -> tuple[float, float] | None:
    """A positive (first, second) numeric pair, or None."""
    if not isinstance(value, Sequence) or isinstance(value, str | bytes) or len(value) != 2:
        return None
    try:
        first, second = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    return (first, second) if first > 0 and second > 0 else None


def _font(pixels: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font, scalable when FreeType is available."""
    if features.check("freetype2"):
        return ImageFont.load_default(size=pixels)
    return ImageFont.load_default()


def _text_height(
    draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont
) -> float:
    """Height of a line of text in ``font``."""
    _, top, _, bottom = draw.textbbox((0, 0), "Ag", font=font)
    return float(bottom - top)


def _fit(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    max_width: float,
) -> str:
    """``text`` shortened with an ellipsis until it fits ``max_width``."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..." if text else ""


def _printable(text: str, limit: int = 80) -> str:
    """Printable ASCII only (the default bitmap font has nothing else), shortened."""
    cleaned = "".join(ch if " " <= ch <= "~" else " " for ch in text)
    return " ".join(cleaned.split())[:limit]
