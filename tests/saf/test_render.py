"""Tests for saf.render: the display pipeline, every sample kind, frames, errors, placeholder."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.processing import convert_color_space
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

import saf.render
from saf.render import RenderError, Window, frame_count, render, render_placeholder
from samples.generate import KINDS, generate_study

ROWS, COLUMNS = 48, 64
"""Sample size: small, and not square so a rows/columns swap shows."""

COLOUR_KINDS = {"us", "photo"}


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """First file of a small study of every sample kind."""
    root = tmp_path_factory.mktemp("samples")
    return {
        kind: generate_study(kind, root, count=3, rows=ROWS, columns=COLUMNS, seed=7)[0]
        for kind in KINDS
    }


def make_image(
    pixels: npt.NDArray[np.generic], photometric: str = "MONOCHROME2", **attrs: object
) -> Dataset:
    """A minimal native image dataset holding ``pixels`` (frames first when 3-D grey / 4-D)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    bits = 8 if pixels.dtype.itemsize == 1 else 16
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def decode(data: bytes) -> Image.Image:
    """Open encoded bytes with Pillow, fully loaded."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def png_array(ds: Dataset, **kw: object) -> npt.NDArray[np.uint8]:
    """Render to PNG (lossless) and return the pixels."""
    return np.asarray(decode(render(ds, fmt="png", **kw)))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- every kind


@pytest.mark.parametrize("kind", KINDS)
def test_every_sample_kind_renders_to_jpeg(samples: dict[str, Path], kind: str) -> None:
    ds = dcmread(samples[kind])
    image = decode(render(ds))
    assert image.format == "JPEG"
    assert image.mode == ("RGB" if kind in COLOUR_KINDS else "L")
    assert image.size == (COLUMNS, ROWS)
    thumb = decode(render(ds, size=32))
    assert thumb.size == (32, 24)
    assert np.asarray(image).std() > 5  # an image, not a flat tile


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png"])
def test_formats(samples: dict[str, Path], fmt: str) -> None:
    image = decode(render(dcmread(samples["ct"]), fmt=fmt, size=16))  # type: ignore[arg-type]
    assert image.format == fmt.upper()
    assert image.size == (16, 12)


# --------------------------------------------------------------------------- grey pipeline

HU = np.array([-1000, -160, -60, 40, 140, 1000], dtype=np.float32)
SOFT_TISSUE_U8 = [0, 0, 64, 128, 192, 255]  # PS3.3 C.11.2.1.2.1, centre 40, width 400


def ct_row(photometric: str = "MONOCHROME2", **attrs: object) -> Dataset:
    """2x6 CT image with known HU through slope 2 and intercept -1024."""
    stored = np.tile(((HU + 1024) / 2).astype(np.int16), (2, 1))
    return make_image(stored, photometric, RescaleSlope=2, RescaleIntercept=-1024, **attrs)


def test_explicit_window_maps_hu_exactly() -> None:
    out = png_array(ct_row(), window=Window(40, 400))
    assert out[0].tolist() == SOFT_TISSUE_U8
    assert out[1].tolist() == SOFT_TISSUE_U8


def test_explicit_window_beats_header_window() -> None:
    ds = ct_row(WindowCenter=[-600, 40], WindowWidth=[1500, 400])
    assert png_array(ds, window=Window(40, 400))[0].tolist() == SOFT_TISSUE_U8


def test_first_header_window_is_used() -> None:
    ds = ct_row(WindowCenter=[40, -600], WindowWidth=[400, 1500])
    assert png_array(ds)[0].tolist() == SOFT_TISSUE_U8


def test_monochrome1_is_inverted() -> None:
    mono2 = png_array(ct_row("MONOCHROME2"), window=Window(40, 400))
    mono1 = png_array(ct_row("MONOCHROME1"), window=Window(40, 400))
    assert (mono1.astype(int) == 255 - mono2.astype(int)).all()


def test_auto_window_uses_the_range_and_ignores_padding() -> None:
    ramp = np.linspace(0, 4000, 40 * 40).reshape(40, 40).astype(np.int16)
    ramp[:, :12] = -2000  # 30 % padding far below the data
    out = png_array(make_image(ramp, PixelPaddingValue=-2000))
    body = out[:, 12:]
    assert body.min() <= 5 and body.max() >= 250
    assert len(np.unique(body)) > 200


def test_ct_sample_uses_its_soft_tissue_window(samples: dict[str, Path]) -> None:
    ds = dcmread(samples["ct"])
    assert (png_array(ds) == png_array(ds, window=Window(40, 400))).all()


def test_window_validation() -> None:
    for width in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"width|finite"):
            Window(40, width)


def test_non_square_pixels_are_stretched() -> None:
    ds = make_image(np.zeros((10, 20), np.uint16), PixelSpacing=[1.0, 0.5])
    assert decode(render(ds)).size == (20, 20)
    assert decode(render(ds, size=8)).size == (8, 8)


# --------------------------------------------------------------------------- colour and frames


def test_photo_stays_colour(samples: dict[str, Path]) -> None:
    out = png_array(dcmread(samples["photo"])).astype(int)
    assert out.shape == (ROWS, COLUMNS, 3)
    assert np.abs(out[..., 0] - out[..., 2]).mean() > 20  # skin is redder than blue


def test_ybr_full_renders_as_rgb() -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 120, 40
    ycc = convert_color_space(rgb, "RGB", "YBR_FULL")
    out = png_array(make_image(ycc, "YBR_FULL")).astype(int)
    assert np.abs(out - rgb).max() <= 2


def test_palette_colour_applies_the_lut() -> None:
    ds = make_image(np.array([[0, 1], [2, 3]], np.uint8), "PALETTE COLOR")
    for channel, entry, value in (("Red", 1, 0xFFFF), ("Green", 2, 0xFFFF), ("Blue", 3, 0x8000)):
        lut = np.zeros(256, np.uint16)
        lut[entry] = value
        setattr(ds, f"{channel}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{channel}PaletteColorLookupTableData", lut.tobytes())
    out = png_array(ds).tolist()
    assert out == [[[0, 0, 0], [255, 0, 0]], [[0, 255, 0], [0, 0, 128]]]


def rgb_frames(count: int = 5) -> Dataset:
    """Multi-frame RGB where frame ``i`` has red = 40 * i."""
    frames = np.zeros((count, 4, 6, 3), np.uint8)
    frames[..., 0] = (40 * np.arange(count, dtype=np.uint8))[:, None, None]
    frames[..., 1] = 7
    return make_image(frames, "RGB")


def reference_display(ds: Dataset) -> npt.NDArray[np.float64]:
    """What the display of the middle frame should be, computed here from the standard
    (PS3.3 C.11.2.1.2 linear VOI; MONOCHROME1 inverted) with numpy, independently of
    saf.render. Images without a window use the 1st-99th percentile range."""
    arr = ds.pixel_array.astype(np.float64)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[int(ds.NumberOfFrames) // 2]
    if ds.PhotometricInterpretation == "RGB":
        return arr
    arr = arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    if "WindowCenter" in ds:
        centre = float(np.atleast_1d(ds.WindowCenter)[0])
        width = float(np.atleast_1d(ds.WindowWidth)[0])
    else:
        low, high = np.percentile(arr, [1, 99])
        centre, width = (low + high) / 2 + 0.5, high - low + 1
    out = ((arr - (centre - 0.5)) / (width - 1) + 0.5) * 255
    out = np.clip(out, 0, 255)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 255 - out
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_every_sample_kind_matches_the_reference_display(
    samples: dict[str, Path], kind: str
) -> None:
    """Pixel statistics of saf's render equal those of an independent reference."""
    ds = dcmread(samples[kind])
    expected = reference_display(ds)
    got = png_array(dcmread(samples[kind])).astype(np.float64)
    assert got.shape == expected.shape
    # Rounding (and, without a header window, the auto-window's padding rule) may move
    # levels a little; a wrong LUT, window, inversion or frame moves them a lot.
    assert abs(got.mean() - expected.mean()) < 2.0, (got.mean(), expected.mean())
    assert abs(got.std() - expected.std()) < 2.0, (got.std(), expected.std())
    assert np.abs(got - expected).mean() < 2.0


def test_multiframe_picks_middle_or_given_frame() -> None:
    ds = rgb_frames(5)
    assert frame_count(ds) == 5
    assert (png_array(ds)[..., 0] == 80).all()  # frame 2 of 0..4
    assert (png_array(ds, frame=4)[..., 0] == 160).all()
    assert (png_array(ds, frame=0)[..., 1] == 7).all()
    for bad in (5, -1):
        with pytest.raises(ValueError, match=r"0\.\.4"):
            render(ds, frame=bad)


def test_us_sample_frames_differ(samples: dict[str, Path]) -> None:
    ds = dcmread(samples["us"])
    assert frame_count(ds) == 3
    assert not (png_array(ds, frame=0) == png_array(ds, frame=2)).all()


# --------------------------------------------------------------------------- compressed


@pytest.mark.parametrize("kind", ["ct-j2k", "ct-jls", "ct-rle"])
def test_lossless_kinds_render_like_native(samples: dict[str, Path], kind: str) -> None:
    compressed = dcmread(samples[kind])
    native = dcmread(samples[kind])
    native.decompress()
    assert not native.file_meta.TransferSyntaxUID.is_compressed
    assert (png_array(compressed) == png_array(native)).all()
    assert png_array(compressed).std() > 20


def test_lossy_jpeg_kind_renders(samples: dict[str, Path]) -> None:
    out = png_array(dcmread(samples["ct-jpeg"]))
    assert out.shape == (ROWS, COLUMNS)
    assert out.max() - out.min() > 100


# --------------------------------------------------------------------------- errors


def test_no_pixel_data() -> None:
    ds = ct_row()
    del ds.PixelData
    with pytest.raises(RenderError, match="no pixel data") as info:
        render(ds)
    assert info.value.sop_instance_uid == ds.SOPInstanceUID
    assert ds.SOPInstanceUID in str(info.value)


def test_corrupt_codestream(samples: dict[str, Path]) -> None:
    ds = dcmread(samples["ct-j2k"])
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
    with pytest.raises(RenderError, match="JPEG 2000") as info:
        render(ds)
    assert "cannot decode" in info.value.reason
    assert "header" in info.value.reason  # the decoder's own words are kept


def test_unknown_transfer_syntax(samples: dict[str, Path]) -> None:
    ds = dcmread(samples["ct-rle"])
    ds.file_meta.TransferSyntaxUID = UID("1.2.3.4.5")
    with pytest.raises(RenderError, match=r"no decoder for transfer syntax 1\.2\.3\.4\.5"):
        render(ds)


def test_missing_decoder_is_named(
    samples: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    unavailable = SimpleNamespace(
        is_available=False, missing_dependencies=["pylibjpeg - requires pylibjpeg-openjpeg"]
    )
    monkeypatch.setattr(saf.render, "get_decoder", lambda uid: unavailable)
    with pytest.raises(RenderError, match=r"JPEG 2000.*requires pylibjpeg-openjpeg"):
        render(dcmread(samples["ct-j2k"]))


def test_bad_output_options(samples: dict[str, Path]) -> None:
    ds = dcmread(samples["ct"])
    with pytest.raises(ValueError, match="format"):
        render(ds, fmt="gif")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quality"):
        render(ds, quality=0)
    with pytest.raises(ValueError, match="size"):
        render(ds, size=0)


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png"])
def test_placeholder(fmt: str) -> None:
    data = render_placeholder(96, "cannot decode JPEG 2000 pixel data: " + "x" * 200, fmt=fmt)  # type: ignore[arg-type]
    image = decode(data)
    assert image.size == (96, 96)
    pixels = np.asarray(image.convert("L")).astype(int)
    assert abs(np.median(pixels) - 128) <= 3  # grey tile
    assert pixels.min() < 80  # with text on it
