"""The reply's DICOM objects, made with highdicom: a TID 1500 Comprehensive 3D SR and a GSPS.

Given one study's annotated images and the annotations drawn on them (saf.annotations),
`measurement_report` makes the Comprehensive 3D SR (TID 1500 Measurement Report) and
`presentation_states` the Grayscale Softcopy Presentation State(s). The caller
(saf.replies) stores them through saf.ingest as new series of the study.

What goes where (choices written down):

- SR: one Planar ROI measurement group (TID 1410) per measuring annotation, with its
  region as a 2D SCOORD on the source image (and frame): a line is a POLYLINE with its
  Length (mm, or ``{pixels}`` when the spacing is unknown); an angle a 3-point POLYLINE
  with its Angle (deg); an ellipse an ELLIPSE (major axis end points, then minor) with
  its Area (mm2 or ``{pixels2}``) and, over the pixels inside, Mean, Standard Deviation,
  Minimum and Maximum in modality units (HU as UCUM ``[hnsf'U]``). A label becomes the
  group's Tracking Identifier text. Arrows and text notes are not measurements: they go
  only to the GSPS, where every PACS viewer shows them.
- GSPS: every annotation as a graphic object on the PIXEL grid of its image (arrows as a
  polyline with a head, ellipses as ELLIPSE), with a text object for labels and values,
  on one graphic layer ``SAF_REPLY``. A presentation state references images of one
  size; images of several sizes give several instances (in one series). Colour images
  take no GSPS (a Color Softcopy PS needs an ICC profile we do not have): their
  measurements are in the SR only.
- UIDs are derived from a seed fixed when signing starts (the case and the signing
  time), so a retried signing makes the same UIDs and finds what it stored before.
- Text is limited to ASCII-safe Latin-1 in the GSPS's ST values (Specific Character
  Set ISO_IR 100 is declared by highdicom for the SR; the GSPS strings are folded).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import highdicom as hd
import numpy as np
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GrayscaleSoftcopyPresentationState,
    TextObject,
)
from highdicom.pr import GraphicTypeValues as PRGraphicType
from highdicom.sr import (
    Comprehensive3DSR,
    ImageRegion,
    Measurement,
    MeasurementReport,
    ObservationContext,
    ObserverContext,
    PersonObserverIdentifyingAttributes,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    SourceImageForRegion,
    TrackingIdentifier,
)
from highdicom.sr import GraphicTypeValues as SRGraphicType
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

MANUFACTURER: Final = "saf"
MODEL: Final = "saf viewer"
SOFTWARE_VERSION: Final = "0.1.0"
DEVICE_SERIAL: Final = "saf"
SR_SERIES_NUMBER: Final = 9901
PR_SERIES_NUMBER: Final = 9902
LAYER: Final = "SAF_REPLY"

PIXELS: Final = Code("{pixels}", "UCUM", "pixels")
SQUARE_PIXELS: Final = Code("{pixels2}", "UCUM", "square pixels")


@dataclass(frozen=True)
class Mark:
    """One annotation as the reply objects need it."""

    annotation_id: str
    kind: str
    points: list[list[float]]
    text: str | None
    frame: int
    measurement: dict[str, Any]
    image: Dataset
    """The annotated image (header is enough; highdicom reads patient, study, UIDs)."""


def uid(seed: str, *parts: str) -> str:
    """A UID derived from the signing seed and `parts` (same inputs, same UID)."""
    return str(generate_uid(entropy_srcs=[seed, *parts]))


def _multiframe(ds: Dataset) -> bool:
    return int(ds.get("NumberOfFrames") or 1) > 1


def _ellipse_axes(points: list[list[float]]) -> np.ndarray:
    """The four ELLIPSE points (major axis end points, then minor) of a bounding box."""
    (x0, y0), (x1, y1) = points
    cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0) / 2, abs(y1 - y0) / 2
    horizontal = [[cx - a, cy], [cx + a, cy]]
    vertical = [[cx, cy - b], [cx, cy + b]]
    axes = horizontal + vertical if a >= b else vertical + horizontal
    return np.array(axes, dtype=np.float64)


# --------------------------------------------------------------------------- SR


def _unit(measurement: dict[str, Any]) -> Code:
    unit = measurement.get("unit")
    if unit == "HU":
        hu: Code = codes.UCUM.HounsfieldUnit
        return hu
    if unit:
        return Code("{" + str(unit) + "}", "UCUM", str(unit))
    none: Code = codes.UCUM.NoUnits
    return none


def _measurements(mark: Mark) -> list[Measurement]:
    m = mark.measurement
    if mark.kind == "line":
        if "length_mm" in m:
            return [Measurement(codes.SCT.Length, float(m["length_mm"]), codes.UCUM.Millimeter)]
        return [Measurement(codes.SCT.Length, float(m["length_px"]), PIXELS)]
    if mark.kind == "angle":
        return [Measurement(codes.SCT.Angle, float(m["angle_deg"]), codes.UCUM.Degree)]
    if mark.kind == "ellipse":
        out = [
            Measurement(codes.SCT.Area, float(m["area_mm2"]), codes.UCUM.SquareMillimeter)
            if "area_mm2" in m
            else Measurement(codes.SCT.Area, float(m["area_px2"]), SQUARE_PIXELS)
        ]
        unit = _unit(m)
        for key, name in (
            ("mean", codes.SCT.Mean),
            ("sd", codes.SCT.StandardDeviation),
            ("min", codes.SCT.Minimum),
            ("max", codes.SCT.Maximum),
        ):
            if m.get(key) is not None:
                out.append(Measurement(name, float(m[key]), unit))
        return out
    return []


def _region(mark: Mark) -> ImageRegion:
    image = mark.image
    source = SourceImageForRegion(
        referenced_sop_class_uid=str(image.SOPClassUID),
        referenced_sop_instance_uid=str(image.SOPInstanceUID),
        referenced_frame_numbers=[mark.frame] if _multiframe(image) else None,
    )
    if mark.kind == "ellipse":
        return ImageRegion(SRGraphicType.ELLIPSE, _ellipse_axes(mark.points), source)
    data = np.array(mark.points, dtype=np.float64)
    return ImageRegion(SRGraphicType.POLYLINE, data, source)


def measuring(marks: Sequence[Mark]) -> list[Mark]:
    """The marks the SR reports (lines, angles, ellipses)."""
    return [m for m in marks if m.kind in ("line", "angle", "ellipse")]


def measurement_report(
    marks: Sequence[Mark],
    *,
    seed: str,
    observer: str,
    signed_at: datetime,
    institution: str | None = None,
) -> Comprehensive3DSR:
    """The TID 1500 report of one study's measuring marks (at least one)."""
    reported = measuring(marks)
    if not reported:
        raise ValueError("a measurement report needs at least one line, angle or ellipse")
    groups = [
        PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=uid(seed, "tracking", mark.annotation_id),
                identifier=(mark.text or f"{mark.kind} {n}")[:64],
            ),
            referenced_region=_region(mark),
            measurements=_measurements(mark),
        )
        for n, mark in enumerate(reported, start=1)
    ]
    context = ObservationContext(
        observer_person_context=ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=PersonObserverIdentifyingAttributes(
                name=_person_name(observer)
            ),
        )
    )
    report = MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    evidence = _unique_images(reported)
    study_uid = str(evidence[0].StudyInstanceUID)
    sr = Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uid(seed, study_uid, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uid(seed, study_uid, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,
        is_verified=True,
        verifying_observer_name=_person_name(observer),
        verifying_organization=(institution or "saf")[:64],
        institution_name=institution[:64] if institution else None,
        series_description="saf reply measurements",
    )
    _stamp(sr, signed_at)
    return sr


# --------------------------------------------------------------------------- GSPS


def _arrow_head(tail: list[float], head: list[float]) -> np.ndarray:
    """A two-stroke arrow head at `head`, a fifth of the shaft long (at least 3 px)."""
    dx, dy = head[0] - tail[0], head[1] - tail[1]
    length = math.hypot(dx, dy) or 1.0
    size = max(3.0, length / 5)
    ux, uy = dx / length, dy / length
    left = [head[0] - size * (ux - uy * 0.6), head[1] - size * (uy + ux * 0.6)]
    right = [head[0] - size * (ux + uy * 0.6), head[1] - size * (uy - ux * 0.6)]
    return np.array([left, head, right], dtype=np.float64)


def _label(mark: Mark) -> str | None:
    """What the GSPS writes next to a mark: its label and its values."""
    m = mark.measurement
    parts = [mark.text] if mark.text else []
    if mark.kind == "line":
        parts.append(f"{m['length_mm']:.1f} mm" if "length_mm" in m else f"{m['length_px']:.1f} px")
    elif mark.kind == "angle":
        parts.append(f"{m['angle_deg']:.1f} deg")
    elif mark.kind == "ellipse":
        parts.append(f"{m['area_mm2']:.1f} mm2" if "area_mm2" in m else f"{m['area_px2']:.1f} px2")
        if m.get("mean") is not None:
            unit = f" {m['unit']}" if m.get("unit") else ""
            parts.append(f"mean {m['mean']:.1f} sd {m['sd']:.1f}{unit}")
    text = " ".join(parts)
    return _latin1(text)[:1024] if text else None


def _clamp(x: float, y: float, columns: int, rows: int) -> tuple[float, float]:
    return min(max(x, 0.0), float(columns)), min(max(y, 0.0), float(rows))


def _objects(mark: Mark) -> tuple[list[GraphicObject], list[TextObject]]:
    pixel = AnnotationUnitsValues.PIXEL
    tracking_id, tracking_uid = mark.annotation_id, uid("gsps", mark.annotation_id)
    graphics: list[GraphicObject] = []
    points = np.array(mark.points, dtype=np.float64)
    if mark.kind in ("line", "angle"):
        graphics.append(
            GraphicObject(
                PRGraphicType.POLYLINE,
                points,
                pixel,
                tracking_id=tracking_id,
                tracking_uid=tracking_uid,
            )
        )
    elif mark.kind == "arrow":
        graphics.append(
            GraphicObject(
                PRGraphicType.POLYLINE,
                points,
                pixel,
                tracking_id=tracking_id,
                tracking_uid=tracking_uid,
            )
        )
        head = _arrow_head(mark.points[0], mark.points[1])
        columns, rows = int(mark.image.Columns), int(mark.image.Rows)
        head = np.array([_clamp(x, y, columns, rows) for x, y in head], dtype=np.float64)
        graphics.append(GraphicObject(PRGraphicType.POLYLINE, head, pixel))
    elif mark.kind == "ellipse":
        graphics.append(
            GraphicObject(
                PRGraphicType.ELLIPSE,
                _ellipse_axes(mark.points),
                pixel,
                tracking_id=tracking_id,
                tracking_uid=tracking_uid,
            )
        )
    texts: list[TextObject] = []
    label = _label(mark)
    if label:
        anchor = mark.points[0] if mark.kind in ("text", "arrow") else mark.points[-1]
        texts.append(
            TextObject(
                label,
                pixel,
                anchor_point=(float(anchor[0]), float(anchor[1])),
                anchor_point_visible=mark.kind != "text",
            )
        )
    return graphics, texts


def presentation_states(
    marks: Sequence[Mark], *, seed: str, observer: str, signed_at: datetime
) -> list[GrayscaleSoftcopyPresentationState]:
    """GSPS instances (one per image size) showing every mark on a grey image of the study."""
    grey = [m for m in marks if int(m.image.get("SamplesPerPixel") or 1) == 1]
    by_size: dict[tuple[int, int], list[Mark]] = defaultdict(list)
    for mark in grey:
        by_size[(int(mark.image.Rows), int(mark.image.Columns))].append(mark)
    layer = GraphicLayer(LAYER, order=1, description="saf reply annotations")
    out: list[GrayscaleSoftcopyPresentationState] = []
    for number, (size, group) in enumerate(sorted(by_size.items()), start=1):
        annotations: list[GraphicAnnotation] = []
        by_frame: dict[tuple[str, int], list[Mark]] = defaultdict(list)
        for mark in group:
            by_frame[(str(mark.image.SOPInstanceUID), mark.frame)].append(mark)
        for (_, frame), on_frame in sorted(by_frame.items()):
            graphics: list[GraphicObject] = []
            texts: list[TextObject] = []
            for mark in on_frame:
                g, t = _objects(mark)
                graphics += g
                texts += t
            image = on_frame[0].image
            annotations.append(
                GraphicAnnotation(
                    referenced_images=[image],
                    graphic_layer=layer,
                    referenced_frame_number=frame if _multiframe(image) else None,
                    graphic_objects=graphics or None,
                    text_objects=texts or None,
                )
            )
        images = _unique_images(group)
        study_uid = str(images[0].StudyInstanceUID)
        pr = GrayscaleSoftcopyPresentationState(
            referenced_images=images,
            series_instance_uid=uid(seed, study_uid, "pr-series"),
            series_number=PR_SERIES_NUMBER,
            sop_instance_uid=uid(seed, study_uid, "pr", f"{size[0]}x{size[1]}"),
            instance_number=number,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MODEL,
            software_versions=SOFTWARE_VERSION,
            device_serial_number=DEVICE_SERIAL,
            content_label="SAF_REPLY",
            content_description="saf reply annotations",
            graphic_annotations=annotations,
            graphic_layers=[layer],
            content_creator_name=_person_name(observer),
            series_description="saf reply annotations",
        )
        _stamp(pr, signed_at)
        out.append(pr)
    return out


# --------------------------------------------------------------------------- helpers


def _unique_images(marks: Sequence[Mark]) -> list[Dataset]:
    seen: dict[str, Dataset] = {}
    for mark in marks:
        seen.setdefault(str(mark.image.SOPInstanceUID), mark.image)
    return list(seen.values())


def _person_name(username: str) -> str:
    """A login name as a DICOM PN (family name component only; no ^ or = inside)."""
    return _latin1(username).replace("^", " ").replace("=", " ").replace("\\", " ")[:63] + "^"


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1").replace("\\", "/")


def _stamp(ds: hd.SOPClass, at: datetime) -> None:
    """Dates and times from the signing, not the clock: a retry makes the same object."""
    date, time = at.strftime("%Y%m%d"), at.strftime("%H%M%S")
    for keyword in ("ContentDate", "InstanceCreationDate", "SeriesDate"):
        if keyword in ds or keyword == "ContentDate":
            setattr(ds, keyword, date)
    for keyword in ("ContentTime", "InstanceCreationTime", "SeriesTime"):
        if keyword in ds or keyword == "ContentTime":
            setattr(ds, keyword, time)
    if "PresentationCreationDate" in ds:
        ds.PresentationCreationDate = date
        ds.PresentationCreationTime = time
    stamp = at.strftime("%Y%m%d%H%M%S")
    for item in ds.get("VerifyingObserverSequence") or []:
        item.VerificationDateTime = stamp
    for item in ds.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = stamp
