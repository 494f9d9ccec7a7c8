"""Generate realistic, synthetic, PHI-free DICOM sample studies (python -m samples.generate)."""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundMultiFrameImageStorage,
    VLPhotographicImageStorage,
    generate_uid,
)

FloatArray = np.ndarray
Grid = tuple[np.ndarray, np.ndarray]

STUDY_DATE = "20240115"
STUDY_TIME = "093000"
INSTITUTION = "Synthetic Clinic"
MANUFACTURER = "saf synthetic samples"
CT_PADDING = -2000  # stored value outside the reconstruction circle
CT_INTERCEPT = -1024


# --------------------------------------------------------------------------- study plan


@dataclass(frozen=True)
class Study:
    """Everything needed to write one synthetic study."""

    kind: str
    spec: KindSpec
    count: int
    rows: int
    columns: int
    seed: int
    patient_id: str
    patient_name: str
    accession_number: str

    def uid(self, role: str, index: int = 0) -> UID:
        """Deterministic UID for (seed, kind, size, role, index)."""
        size = f"{self.count}x{self.rows}x{self.columns}"
        sources = ["saf-samples", str(self.seed), self.kind, size, role, str(index)]
        return generate_uid(entropy_srcs=sources)

    def rng(self) -> np.random.Generator:
        """Random generator seeded from (seed, kind)."""
        return np.random.default_rng([self.seed, zlib.crc32(self.kind.encode())])

    @property
    def instances(self) -> int:
        """Number of files: one per image, or one multi-frame file."""
        return 1 if self.spec.multiframe else self.count

    def z(self, index: int) -> float:
        """Relative slice position in [0, 1]."""
        return index / (self.count - 1) if self.count > 1 else 0.5


PixelSource = Callable[[Study], Iterator[np.ndarray]]
HeaderFn = Callable[[Dataset, Study], None]
InstanceFn = Callable[[Dataset, Study, int], None]
EncodeFn = Callable[[Dataset, np.ndarray, Study], None]


@dataclass(frozen=True)
class KindSpec:
    """Table entry describing how to build one kind of study."""

    sop_class: str
    modality: str
    body_part: str
    study_description: str
    series_description: str
    count: int
    rows: int
    columns: int
    photometric: str
    bits_stored: int
    pixels: PixelSource
    headers: tuple[HeaderFn, ...]
    encode: EncodeFn
    per_instance: InstanceFn | None = None
    multiframe: bool = False
    fov_mm: float = 350.0
    slice_mm: float = 2.5


# --------------------------------------------------------------------------- array helpers


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in normalised image coordinates with a value and a z-profile."""

    cx: float
    cy: float
    a: float
    b: float
    value: float
    angle_deg: float = 0.0
    profile: Callable[[float], float] = lambda z: 1.0


@dataclass(frozen=True)
class Feature:
    """A precomputed normalised radius-squared field plus value and z-profile."""

    r2: FloatArray
    value: float
    profile: Callable[[float], float]


def _grid(rows: int, columns: int) -> Grid:
    """Broadcastable (y, x) coordinates; the inscribed circle has radius 1."""
    half = min(rows, columns) / 2.0
    y = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2.0) / half
    x = (np.arange(columns, dtype=np.float32) - (columns - 1) / 2.0) / half
    return y[:, None], x[None, :]


def _ellipse_r2(grid: Grid, e: Ellipse) -> FloatArray:
    """Normalised squared radius of every pixel with respect to ellipse ``e``."""
    y, x = grid
    theta = math.radians(e.angle_deg)
    dx, dy = x - e.cx, y - e.cy
    u = (dx * math.cos(theta) + dy * math.sin(theta)) / e.a
    v = (-dx * math.sin(theta) + dy * math.cos(theta)) / e.b
    return (u * u + v * v).astype(np.float32)


def _features(grid: Grid, ellipses: Sequence[Ellipse]) -> list[Feature]:
    """Precompute the radius fields of a phantom once per study."""
    return [Feature(_ellipse_r2(grid, e), e.value, e.profile) for e in ellipses]


def _union(grid: Grid, ellipses: Sequence[Ellipse]) -> FloatArray:
    """Radius field of a union of ellipses (minimum of their fields)."""
    return cast(FloatArray, np.minimum.reduce([_ellipse_r2(grid, e) for e in ellipses]))


def _render(
    features: Sequence[Feature], z: float, background: float, shape: tuple[int, int], *, add: bool
) -> FloatArray:
    """Paint (or, Shepp-Logan style, add) every feature visible at ``z``."""
    out = np.full(shape, background, dtype=np.float32)
    for feature in features:
        scale = feature.profile(z)
        if scale <= 0:
            continue
        mask = feature.r2 < scale * scale
        if add:
            out[mask] += feature.value
        else:
            out[mask] = feature.value
    return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> FloatArray:
    """Periodic, unit-variance, low-pass random field (Gaussian filter in Fourier space)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2.0 * (math.pi * scale_px) ** 2 * (fy * fy + fx * fx))
    field = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=shape)
    return cast(FloatArray, (field / (field.std() + 1e-12)).astype(np.float32))


def _grain(
    rng: np.random.Generator, shape: tuple[int, int], noise: float, texture: float, scale_px: float
) -> FloatArray:
    """White noise plus smooth texture, computed once and rolled per slice."""
    white = rng.standard_normal(shape, dtype=np.float32) * noise
    return white + _smooth_field(rng, shape, scale_px) * texture


def _roll(field: np.ndarray, index: int) -> np.ndarray:
    """Cheap deterministic per-slice variation of a precomputed field."""
    rows, columns = field.shape[:2]
    return np.roll(field, ((index * 131) % rows, (index * 71) % columns), axis=(0, 1))


def _to_uint(image: FloatArray, bits: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """Round and clip into an unsigned range of ``bits`` bits."""
    return cast(np.ndarray, np.clip(np.rint(image), 0, 2**bits - 1).astype(dtype))


def _window_u8(hu: FloatArray, center: float, width: float) -> np.ndarray:
    """Apply a linear VOI window and return 8-bit data."""
    scaled = (hu - (center - width / 2.0)) * (255.0 / width)
    return _to_uint(scaled, 8, np.uint8)


def _still_images(base: FloatArray, grain: FloatArray, count: int) -> Iterator[FloatArray]:
    """A single rendered image repeated ``count`` times with rolled grain."""
    for index in range(count):
        yield base + _roll(grain, index)


# --------------------------------------------------------------------------- phantoms


def _lung_profile(z: float) -> float:
    return 0.55 + 0.45 * math.sin(math.pi * z)


def _heart_profile(z: float) -> float:
    return max(0.0, math.sin(math.pi * (z - 0.2) / 0.7)) if 0.2 < z < 0.9 else 0.0


def _nodule_profile(z: float) -> float:
    return math.sqrt(max(0.0, 1.0 - ((z - 0.5) / 0.12) ** 2))


def _rib_profile(z: float) -> float:
    return 1.0 if math.sin(2 * math.pi * 7 * z) > -0.3 else 0.0


CT_ELLIPSES = (
    Ellipse(0.0, 0.78, 0.95, 0.03, 150.0),  # table
    Ellipse(0.0, 0.05, 0.88, 0.64, -90.0),  # subcutaneous fat
    Ellipse(0.0, 0.05, 0.82, 0.58, 45.0),  # muscle / soft tissue
    Ellipse(-0.38, -0.02, 0.27, 0.42, -840.0, 10.0, _lung_profile),
    Ellipse(0.38, -0.02, 0.27, 0.42, -840.0, -10.0, _lung_profile),
    Ellipse(0.08, 0.02, 0.22, 0.19, 40.0, 30.0, _heart_profile),
    Ellipse(-0.06, 0.3, 0.06, 0.06, 180.0),  # contrast-filled aorta
    Ellipse(0.0, 0.45, 0.11, 0.09, 450.0),  # vertebral body
    Ellipse(0.0, 0.58, 0.035, 0.03, 15.0),  # spinal canal
    Ellipse(0.0, -0.52, 0.08, 0.03, 550.0),  # sternum
    Ellipse(0.42, -0.12, 0.035, 0.035, 30.0, 0.0, _nodule_profile),
)


def _rib_ellipses() -> list[Ellipse]:
    """Small bone ellipses along the chest wall, skipping sternum and spine."""
    ribs = []
    for step in range(18):
        angle = 2 * math.pi * step / 18 + 0.17
        if abs(math.sin(angle)) > 0.93:
            continue
        cx, cy = 0.77 * math.cos(angle), 0.05 + 0.54 * math.sin(angle)
        ribs.append(Ellipse(cx, cy, 0.05, 0.025, 0.0, math.degrees(angle) + 90))
    return ribs


def _ct_hu_slices(study: Study) -> Iterator[FloatArray]:
    """Chest phantom in Hounsfield units, one slice at a time."""
    shape = (study.rows, study.columns)
    grid = _grid(*shape)
    features = _features(grid, CT_ELLIPSES)
    features.append(Feature(_union(grid, _rib_ellipses()), 700.0, _rib_profile))
    grain = _grain(study.rng(), shape, noise=12.0, texture=8.0, scale_px=shape[1] / 64)
    outside = (grid[0] ** 2 + grid[1] ** 2) > 1.0
    for index in range(study.count):
        hu = _render(features, study.z(index), -1000.0, shape, add=False)
        hu += _roll(grain, index)
        hu[outside] = CT_PADDING + CT_INTERCEPT
        yield hu


def _ct_stored(study: Study) -> Iterator[np.ndarray]:
    """Signed 16-bit stored values (HU - intercept)."""
    for hu in _ct_hu_slices(study):
        yield np.clip(np.rint(hu - CT_INTERCEPT), CT_PADDING, 4095).astype(np.int16)


def _ct_windowed(study: Study) -> Iterator[np.ndarray]:
    """8-bit soft-tissue-windowed CT, as a workstation secondary capture."""
    for hu in _ct_hu_slices(study):
        yield _window_u8(hu, 40.0, 400.0)


def _head_profile(z: float) -> float:
    return math.sqrt(max(0.0, 1.0 - (0.9 * z) ** 2))


def _ventricle_profile(z: float) -> float:
    return 1.0 if 0.15 < z < 0.6 else 0.0


MR_ELLIPSES = (  # additive, modified Shepp-Logan head with T2-like contrast
    Ellipse(0.0, 0.0, 0.69, 0.92, 700.0, 0.0, _head_profile),  # scalp
    Ellipse(0.0, -0.018, 0.66, 0.87, -500.0, 0.0, _head_profile),  # skull
    Ellipse(0.0, -0.018, 0.62, 0.82, 1000.0, 0.0, _head_profile),  # brain
    Ellipse(0.22, 0.0, 0.11, 0.31, 1600.0, -18.0, _ventricle_profile),
    Ellipse(-0.22, 0.0, 0.16, 0.41, 1600.0, 18.0, _ventricle_profile),
    Ellipse(0.0, 0.35, 0.21, 0.25, 250.0),
    Ellipse(0.0, 0.1, 0.046, 0.046, 400.0),
    Ellipse(-0.08, -0.605, 0.046, 0.023, 300.0),
    Ellipse(0.06, -0.605, 0.023, 0.046, 300.0),
    Ellipse(0.3, 0.45, 0.07, 0.05, 900.0, 0.0, _nodule_profile),  # bright lesion
)


def _mr_slices(study: Study) -> Iterator[np.ndarray]:
    """Head phantom with bias field and Rician-like noise, 12-bit unsigned."""
    shape = (study.rows, study.columns)
    grid = _grid(*shape)
    features = _features(grid, MR_ELLIPSES)
    rng = study.rng()
    bias = 1.0 + 0.12 * grid[0] + 0.06 * grid[1] + 0.05 * _smooth_field(rng, shape, shape[1] / 6)
    grain_re = _grain(rng, shape, noise=40.0, texture=25.0, scale_px=shape[1] / 40)
    grain_im = rng.standard_normal(shape, dtype=np.float32) * 40.0
    for index in range(study.count):
        signal = _render(features, study.z(index), 0.0, shape, add=True) * bias
        real = signal + _roll(grain_re, index)
        yield _to_uint(np.hypot(real, _roll(grain_im, index)), 12, np.uint16)


CHEST_XR_ELLIPSES = (
    Ellipse(0.0, 0.1, 0.95, 1.25, 1800.0),  # body
    Ellipse(-0.42, -0.05, 0.33, 0.7, 950.0, 6.0),  # right lung (viewer's left)
    Ellipse(0.42, -0.05, 0.33, 0.7, 950.0, -6.0),
    Ellipse(0.1, 0.35, 0.33, 0.3, 2300.0, 20.0),  # heart
    Ellipse(0.0, 0.0, 0.09, 1.3, 2700.0),  # spine / mediastinum
    Ellipse(-0.4, -0.78, 0.38, 0.035, 2900.0, -12.0),  # clavicles
    Ellipse(0.4, -0.78, 0.38, 0.035, 2900.0, 12.0),
    Ellipse(0.0, 1.05, 0.7, 0.35, 2100.0),  # diaphragm / abdomen
)


def _chest_xr_image(study: Study) -> Iterator[np.ndarray]:
    """PA chest radiograph, MONOCHROME2 (bone bright), 12-bit unsigned."""
    shape = (study.rows, study.columns)
    grid = _grid(*shape)
    y, x = grid
    image = _render(_features(grid, CHEST_XR_ELLIPSES), 0.5, 150.0, shape, add=False)
    lungs = np.abs(image - 950.0) < 1.0
    ribs = np.sin(2 * math.pi * (4.0 * y + 0.9 * x * x)) > 0.55
    image[lungs & ribs] += 450.0
    image += 120.0 * y  # heel effect
    grain = _grain(study.rng(), shape, noise=25.0, texture=60.0, scale_px=shape[1] / 80)
    for image_i in _still_images(image, grain, study.count):
        yield _to_uint(image_i, 12, np.uint16)


FOREARM_ELLIPSES = (
    Ellipse(0.0, 0.0, 0.48, 1.6, 1500.0, 4.0),  # soft tissue
    Ellipse(-0.17, 0.0, 0.1, 1.2, 3300.0, 4.0),  # radius cortex
    Ellipse(-0.17, 0.0, 0.045, 1.1, 2400.0, 4.0),  # radius medulla
    Ellipse(0.16, 0.0, 0.085, 1.3, 3300.0, 3.0),  # ulna cortex
    Ellipse(0.16, 0.0, 0.035, 1.2, 2400.0, 3.0),  # ulna medulla
)


def _forearm_mono1(study: Study) -> Iterator[np.ndarray]:
    """Forearm radiograph stored MONOCHROME1: bone has low values (displayed white)."""
    shape = (study.rows, study.columns)
    grid = _grid(*shape)
    brightness = _render(_features(grid, FOREARM_ELLIPSES), 0.5, 120.0, shape, add=False)
    grain = _grain(study.rng(), shape, noise=30.0, texture=50.0, scale_px=shape[1] / 60)
    for image in _still_images(brightness, grain, study.count):
        yield _to_uint(4095.0 - image, 12, np.uint16)


def _us_frames(study: Study) -> Iterator[np.ndarray]:
    """Cardiac-like B-mode sector with a beating chamber and colour Doppler, RGB."""
    rows, columns = study.rows, study.columns
    rng = study.rng()
    y = (np.arange(rows, dtype=np.float32)[:, None] + 0.05 * rows) / rows
    x = (np.arange(columns, dtype=np.float32)[None, :] - columns / 2.0) / rows
    depth, theta = np.hypot(y, x), np.arctan2(x, y)
    sector = (np.abs(theta) < 0.7) & (depth > 0.1) & (depth < 1.0)
    echo = 0.45 + 0.12 * _smooth_field(rng, (rows, columns), columns / 30)
    echo += 0.5 * np.exp(-(((depth - 0.3) / 0.015) ** 2))  # bright fascia line
    echo *= np.exp(-0.8 * depth)
    speckle = rng.rayleigh(0.8, (rows, columns)).astype(np.float32)
    chamber_r2 = ((x / 0.2) ** 2 + ((depth - 0.62) / 0.14) ** 2).astype(np.float32)
    doppler_box = (np.abs(theta) < 0.22) & (depth > 0.45) & (depth < 0.8)
    ticks = np.zeros((rows, columns), dtype=bool)
    for k in range(1, 10):
        ticks[int(k * rows / 10) : int(k * rows / 10) + 3, columns - 24 : columns - 14] = True
    frames = np.empty((study.count, rows, columns, 3), dtype=np.uint8)
    for index in range(study.count):
        phase = math.sin(2 * math.pi * index / 15)
        chamber = chamber_r2 < (1.0 + 0.2 * phase) ** 2
        gray = np.where(chamber, 0.04, echo) * np.roll(speckle, 2 * index, axis=0)
        gray = _to_uint(np.where(sector, gray * 255.0, 0.0), 8, np.uint8)
        frames[index] = gray[..., None]
        flow = chamber & doppler_box
        frames[index][flow] = (200, 40, 30) if phase > 0 else (30, 60, 210)
        frames[index][ticks] = 255
    yield frames


def _photo_image(study: Study) -> Iterator[np.ndarray]:
    """Dermatology photograph: textured skin with an irregular pigmented lesion, RGB."""
    shape = (study.rows, study.columns)
    y, x = _grid(*shape)
    rng = study.rng()
    phases = rng.uniform(0, 2 * math.pi, 3)
    rho, phi = np.hypot(x - 0.1, y + 0.05), np.arctan2(y + 0.05, x - 0.1)
    border = 0.42 * (
        1
        + 0.12 * np.sin(3 * phi + phases[0])
        + 0.06 * np.sin(7 * phi + phases[1])
        + 0.03 * np.sin(13 * phi + phases[2])
    )
    lesion = np.clip((border - rho) / 0.04, 0.0, 1.0)[..., None]
    blotch = _smooth_field(rng, shape, shape[1] / 40)[..., None]
    core = np.clip((0.55 * border - rho) / 0.08, 0.0, 1.0)[..., None]
    halo = np.clip(1.0 - (rho - border) / 0.15, 0.0, 1.0)[..., None] * (1 - lesion)
    skin = np.array([222.0, 170.0, 138.0], dtype=np.float32)
    lighting = (0.82 + 0.18 * (1.0 - np.clip(x * x + y * y, 0, 1) / 1.5))[..., None]
    texture = 1.0 + 0.05 * _smooth_field(rng, shape, shape[1] / 90)[..., None]
    image = skin * texture * lighting
    image = image * (1 - 0.35 * halo) + np.array([215.0, 130.0, 125.0]) * 0.35 * halo
    brown = np.array([125.0, 78.0, 52.0]) * (1 + 0.15 * blotch) * (1 - 0.4 * core)
    image = image * (1 - lesion) + brown * lighting * lesion
    grain = rng.standard_normal((*shape, 3), dtype=np.float32) * 3.0
    for photo in _still_images(image.astype(np.float32), grain, study.count):
        yield _to_uint(photo, 8, np.uint8)


# --------------------------------------------------------------------------- headers


def _common_header(ds: Dataset, study: Study) -> None:
    """Patient, study, series, equipment and SOP common attributes."""
    spec = study.spec
    ds.SOPClassUID = spec.sop_class
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = STUDY_TIME
    ds.AccessionNumber = study.accession_number
    ds.Modality = spec.modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = INSTITUTION
    ds.ReferringPhysicianName = "SYNTHETIC^REFERRER"
    ds.StudyDescription = spec.study_description
    ds.SeriesDescription = spec.series_description
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = f"{1940 + study.seed % 60}0101"
    ds.PatientSex = "FMO"[study.seed % 3]
    ds.BodyPartExamined = spec.body_part
    ds.StudyInstanceUID = study.uid("study")
    ds.SeriesInstanceUID = study.uid("series")
    ds.StudyID = f"SYN{study.seed % 10**6}"
    ds.SeriesNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]


def _plane_header(ds: Dataset, study: Study) -> None:
    """Image plane attributes shared by cross-sectional kinds."""
    spacing = study.spec.fov_mm / max(study.rows, study.columns)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = study.uid("frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
    ds.SliceThickness = study.spec.slice_mm
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.AcquisitionNumber = 1


def _plane_instance(ds: Dataset, study: Study, index: int) -> None:
    """Slice position stepping along z (feet to head)."""
    spacing = float(ds.PixelSpacing[0])
    z = round(-study.spec.slice_mm * (study.count - 1) / 2 + index * study.spec.slice_mm, 3)
    ds.ImagePositionPatient = [
        round(-spacing * (study.columns - 1) / 2, 3),
        round(-spacing * (study.rows - 1) / 2, 3),
        z,
    ]
    ds.SliceLocation = z


def _ct_header(ds: Dataset, study: Study) -> None:
    """CT acquisition and rescale attributes."""
    ds.KVP = 120
    ds.XRayTubeCurrent = 200
    ds.ConvolutionKernel = "STANDARD"
    ds.RescaleIntercept = CT_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = [40, -600]
    ds.WindowWidth = [400, 1500]
    ds.WindowCenterWidthExplanation = ["SOFT TISSUE", "LUNG"]
    ds.add_new(Tag(0x0028, 0x0120), "SS", CT_PADDING)  # Pixel Padding Value


def _mr_header(ds: Dataset, study: Study) -> None:
    """MR sequence attributes (T2 TSE)."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "*tse2d1_16"
    ds.RepetitionTime = 4000
    ds.EchoTime = 90
    ds.EchoTrainLength = 16
    ds.MagneticFieldStrength = 1.5
    ds.ImagingFrequency = 63.87
    ds.ImagedNucleus = "1H"
    ds.SpacingBetweenSlices = study.spec.slice_mm
    ds.WindowCenter = 1400
    ds.WindowWidth = 2800


def _projection_header(ds: Dataset, study: Study) -> None:
    """Projection radiography attributes shared by CR and DX."""
    spacing = round(study.spec.fov_mm / max(study.rows, study.columns), 6)
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.KVP = 110
    ds.DistanceSourceToDetector = 1800
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def _dx_header(ds: Dataset, study: Study) -> None:
    """Digital X-Ray (for presentation) specifics."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.DetectorType = "SCINTILLATOR"
    ds.ViewPosition = "AP"
    ds.KVP = 55


def _us_header(ds: Dataset, study: Study) -> None:
    """Ultrasound multi-frame cine attributes."""
    ds.FrameTime = 33.3
    ds.FrameIncrementPointer = Tag(0x0018, 0x1063)  # Frame Time
    ds.CineRate = 30
    ds.RecommendedDisplayFrameRate = 30
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def _photo_header(ds: Dataset, study: Study) -> None:
    """VL photographic attributes."""
    ds.AcquisitionContextSequence = DicomSequence()
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def _sc_header(ds: Dataset, study: Study) -> None:
    """Secondary capture equipment attributes."""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "NO"


# --------------------------------------------------------------------------- encoders


def _encode_native(ds: Dataset, arr: np.ndarray, study: Study) -> None:
    """Uncompressed Explicit VR Little Endian pixel data."""
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(
        arr, study.spec.photometric, study.spec.bits_stored, generate_instance_uid=False
    )


def _encode_with(transfer_syntax: UID) -> EncodeFn:
    """Encoder using pydicom's own ``Dataset.compress`` for ``transfer_syntax``."""

    def encode(ds: Dataset, arr: np.ndarray, study: Study) -> None:
        _encode_native(ds, arr, study)
        ds.compress(transfer_syntax, arr, generate_instance_uid=False)

    return encode


def _encode_jpeg_baseline(ds: Dataset, arr: np.ndarray, study: Study) -> None:
    """JPEG Baseline (8-bit) built with Pillow and encapsulated by pydicom."""
    _encode_native(ds, arr, study)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = round(arr.nbytes / len(jpeg), 2)
    ds.LossyImageCompressionMethod = "ISO_10918_1"


# --------------------------------------------------------------------------- kind table

_CT = KindSpec(
    sop_class=CTImageStorage,
    modality="CT",
    body_part="CHEST",
    study_description="SYNTHETIC CT CHEST",
    series_description="AXIAL 2.5MM STANDARD",
    count=100,
    rows=512,
    columns=512,
    photometric="MONOCHROME2",
    bits_stored=16,
    pixels=_ct_stored,
    headers=(_common_header, _plane_header, _ct_header),
    per_instance=_plane_instance,
    encode=_encode_native,
)


def _small_ct(label: str, encode: EncodeFn) -> KindSpec:
    """The CT kind, reduced to 10x256x256 and stored with another transfer syntax."""
    return replace(
        _CT,
        count=10,
        rows=256,
        columns=256,
        study_description=f"SYNTHETIC CT CHEST {label}",
        encode=encode,
    )


SPECS: dict[str, KindSpec] = {
    "ct": _CT,
    "mr": KindSpec(
        sop_class=MRImageStorage,
        modality="MR",
        body_part="HEAD",
        study_description="SYNTHETIC MR BRAIN",
        series_description="AX T2 TSE",
        count=20,
        rows=256,
        columns=256,
        photometric="MONOCHROME2",
        bits_stored=12,
        pixels=_mr_slices,
        headers=(_common_header, _plane_header, _mr_header),
        per_instance=_plane_instance,
        encode=_encode_native,
        fov_mm=230.0,
        slice_mm=6.0,
    ),
    "cr": KindSpec(
        sop_class=ComputedRadiographyImageStorage,
        modality="CR",
        body_part="CHEST",
        study_description="SYNTHETIC CR CHEST",
        series_description="CHEST PA",
        count=1,
        rows=2500,
        columns=2048,
        photometric="MONOCHROME2",
        bits_stored=12,
        pixels=_chest_xr_image,
        headers=(_common_header, _projection_header),
        encode=_encode_native,
        fov_mm=430.0,
    ),
    "mono1": KindSpec(
        sop_class=DigitalXRayImageStorageForPresentation,
        modality="DX",
        body_part="FOREARM",
        study_description="SYNTHETIC DX FOREARM",
        series_description="FOREARM AP",
        count=1,
        rows=1536,
        columns=1024,
        photometric="MONOCHROME1",
        bits_stored=12,
        pixels=_forearm_mono1,
        headers=(_common_header, _projection_header, _dx_header),
        encode=_encode_native,
        fov_mm=300.0,
    ),
    "us": KindSpec(
        sop_class=UltrasoundMultiFrameImageStorage,
        modality="US",
        body_part="HEART",
        study_description="SYNTHETIC US ECHO",
        series_description="CINE LOOP",
        count=30,
        rows=480,
        columns=640,
        photometric="RGB",
        bits_stored=8,
        pixels=_us_frames,
        headers=(_common_header, _us_header),
        encode=_encode_native,
        multiframe=True,
    ),
    "photo": KindSpec(
        sop_class=VLPhotographicImageStorage,
        modality="XC",
        body_part="ARM",
        study_description="SYNTHETIC DERMATOLOGY PHOTO",
        series_description="CLINICAL PHOTO LESION",
        count=1,
        rows=768,
        columns=1024,
        photometric="RGB",
        bits_stored=8,
        pixels=_photo_image,
        headers=(_common_header, _photo_header),
        encode=_encode_native,
    ),
    "ct-jpeg": replace(
        _small_ct("JPEG BASELINE", _encode_jpeg_baseline),
        sop_class=SecondaryCaptureImageStorage,
        series_description="AXIAL SOFT TISSUE SC",
        photometric="MONOCHROME2",
        bits_stored=8,
        pixels=_ct_windowed,
        headers=(_common_header, _sc_header),
        per_instance=None,
    ),
    "ct-j2k": _small_ct("JPEG 2000 LOSSLESS", _encode_with(JPEG2000Lossless)),
    "ct-jls": _small_ct("JPEG-LS LOSSLESS", _encode_with(JPEGLSLossless)),
    "ct-rle": _small_ct("RLE LOSSLESS", _encode_with(RLELossless)),
}

KINDS: tuple[str, ...] = tuple(SPECS)


# --------------------------------------------------------------------------- writing


def _plan(
    kind: str,
    *,
    count: int | None,
    rows: int | None,
    columns: int | None,
    seed: int,
    patient_id: str | None,
    patient_name: str | None,
    accession_number: str | None,
) -> Study:
    """Resolve defaults and validate the arguments of one study."""
    if kind not in SPECS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    spec = SPECS[kind]
    overrides = (count, rows, columns)
    defaults = (spec.count, spec.rows, spec.columns)
    size = tuple(d if o is None else o for o, d in zip(overrides, defaults, strict=True))
    if min(size) < 1:
        raise ValueError("count, rows and columns must be positive")
    return Study(
        kind=kind,
        spec=spec,
        count=size[0],
        rows=size[1],
        columns=size[2],
        seed=seed,
        patient_id=patient_id or f"SYN{seed:06d}",
        patient_name=patient_name or f"SYNTHETIC^PATIENT^{seed}",
        accession_number=accession_number or f"SYN{seed % 10**9:09d}{KINDS.index(kind):02d}",
    )


def _series_dataset(study: Study) -> Dataset:
    """Dataset with every study/series-level attribute, reused for each instance."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(study.spec.sop_class)
    for header in study.spec.headers:
        header(ds, study)
    return ds


def _set_instance(ds: Dataset, study: Study, index: int) -> None:
    """Instance-level identity and, for cross-sectional kinds, position."""
    uid = study.uid("instance", index)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.InstanceNumber = index + 1
    if study.spec.per_instance is not None:
        study.spec.per_instance(ds, study, index)


def _write_study(study: Study, out_dir: Path) -> list[Path]:
    """Write all instances of ``study`` into a fresh, opaque sub-folder."""
    folder = Path(out_dir) / hashlib.sha256(study.uid("study").encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    ds = _series_dataset(study)
    paths = []
    for index, arr in enumerate(study.spec.pixels(study)):
        _set_instance(ds, study, index)
        study.spec.encode(ds, arr, study)
        path = folder / f"IM{index + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def generate_study(
    kind: str,
    out_dir: Path,
    *,
    count: int | None = None,
    rows: int | None = None,
    columns: int | None = None,
    seed: int = 0,
    patient_id: str | None = None,
    patient_name: str | None = None,
    accession_number: str | None = None,
) -> list[Path]:
    """Write one synthetic study of ``kind`` under ``out_dir`` and return its file paths.

    ``count`` is the number of slices/images (frames for ``us``); ``rows``/``columns``
    override the image size. Output is deterministic for a given seed and size.
    """
    study = _plan(
        kind,
        count=count,
        rows=rows,
        columns=columns,
        seed=seed,
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
    )
    return _write_study(study, out_dir)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m samples.generate",
        description="Write synthetic, PHI-free DICOM Part 10 sample studies.",
    )
    parser.add_argument("out_dir", type=Path, help="output directory")
    parser.add_argument(
        "--kind",
        action="append",
        choices=KINDS,
        help="kind of study (repeatable; default: all kinds)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--count", type=int, help="override number of slices/images/frames")
    parser.add_argument("--rows", type=int, help="override image rows")
    parser.add_argument("--columns", type=int, help="override image columns")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints one summary line per study."""
    args = _parser().parse_args(argv)
    for kind in args.kind or KINDS:
        study = _plan(
            kind,
            count=args.count,
            rows=args.rows,
            columns=args.columns,
            seed=args.seed,
            patient_id=None,
            patient_name=None,
            accession_number=None,
        )
        start = time.perf_counter()
        paths = _write_study(study, args.out_dir)
        size = sum(p.stat().st_size for p in paths)
        elapsed = time.perf_counter() - start
        print(
            f"{kind:8} {len(paths):5d} files {size:>13,d} bytes "
            f"{elapsed:6.2f}s  {study.uid('study')}  {paths[0].parent}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
