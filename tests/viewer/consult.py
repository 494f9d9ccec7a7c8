"""A consult with images of known pixels and spacing, made through the real ingest path, for
the viewer API, annotation and reply tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from saf.cases import claim, on_study_stable
from saf.clinics import add_clinic, find_clinic_id
from saf.hub import Hub
from saf.identity import Principal
from saf.ingest import Sender, ingest_part10
from saf.models import Case, Instance, Series
from saf.routing import parse_rules

RULES = parse_rules(
    """
[[rule]]
name = "ct"
modality = ["CT"]
worklist = "thoracic-radiology"

[[rule]]
name = "default"
worklist = "general-radiology"
"""
)

ROWS, COLUMNS = 40, 60
ROW_MM, COL_MM = 0.5, 0.8
"""Pixel Spacing: 0.5 mm between rows, 0.8 mm between columns (deliberately anisotropic)."""
SLICES = 3
INTERCEPT = -1024


def hu_of(column: int, slice_index: int = 0) -> int:
    """The HU the synthetic image holds at `column` (the same down every column)."""
    return 10 * column - 100 * slice_index


def ct_slice(
    out: Path,
    *,
    study_uid: str,
    series_uid: str,
    index: int,
    z: float,
    instance_number: int,
    patient_id: str = "VIEW-1",
    spacing: bool = True,
) -> Path:
    """One 40x60 CT slice: HU = 10 * column - 100 * index, stored + 1024."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "VIEWER^VERA"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20240115"
    ds.StudyTime = "093000"
    ds.AccessionNumber = f"ACC-{patient_id}"
    ds.StudyID = "1"
    ds.StudyDescription = "CT CHEST"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 2
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame-of-reference"])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, z]
    ds.SliceLocation = z
    if spacing:
        ds.PixelSpacing = [ROW_MM, COL_MM]
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    hu = np.tile(np.arange(COLUMNS, dtype=np.int32) * 10 - 100 * index, (ROWS, 1))
    ds.PixelData = (hu - INTERCEPT).astype(np.uint16).tobytes()
    path = out / f"slice-{index}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass(frozen=True)
class Consult:
    """A routed, claimed CT case of clinic `clinic_id` with three slices."""

    case_id: str
    clinic_id: str
    study_id: str
    series_id: str
    instance_ids: list[str]
    """By instance number: slice 0, 1, 2 (z = 10, 5, 0); scroll order (ascending z) is
    the reverse."""
    specialist: Principal


SPECIALIST = Principal(
    kind="user",
    id="id-dr.thorax",
    name="dr.thorax",
    role="specialist",
    specialties=frozenset({"thoracic-radiology"}),
)


def make_consult(
    hub: Hub,
    tmp_path: Path,
    *,
    clinic: str = "Clinic A",
    patient_id: str = "VIEW-1",
    claim_as: str | None = "dr.thorax",
    spacing: bool = True,
) -> Consult:
    """Ingest three slices (instance numbers run against z, so sorting by position and by
    number differ), make the case, and have `claim_as` claim it."""
    clinic_id = find_clinic_id(hub, clinic) or add_clinic(hub, clinic).id
    out = tmp_path / f"consult-{patient_id}"
    out.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    for index in range(SLICES):
        # Slice 0 is highest (z = 10) and number 1: ascending z is slice 2, 1, 0.
        path = ct_slice(
            out,
            study_uid=study_uid,
            series_uid=series_uid,
            index=index,
            z=10.0 - 5.0 * index,
            instance_number=index + 1,
            patient_id=patient_id,
            spacing=spacing,
        )
        ingest_part10(hub, path, Sender(clinic_id, "test:viewer"))
    with hub.sessions() as session:
        series = session.scalars(
            select(Series).where(Series.series_instance_uid == series_uid)
        ).one()
        instances = list(
            session.scalars(
                select(Instance)
                .where(Instance.series_pk == series.id)
                .order_by(Instance.instance_number)
            )
        )
        study_id = series.study_pk
    case_id = on_study_stable(hub, study_id, RULES)
    if claim_as:
        claim(hub, case_id, claim_as)
    with hub.sessions() as session:
        assert session.get_one(Case, case_id).specialty == "thoracic-radiology"
    return Consult(
        case_id=case_id,
        clinic_id=clinic_id,
        study_id=study_id,
        series_id=series.id,
        instance_ids=[i.id for i in instances],
        specialist=SPECIALIST,
    )
