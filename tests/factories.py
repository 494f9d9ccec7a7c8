"""Factory helpers for tests: synthetic studies, clinics, a running node, file digests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_preamble
from sqlalchemy import func, select

from dicom_node.scp import DicomNode
from saf.clinics import add_clinic
from saf.hub import Hub
from saf.ingest import Sender
from saf.models import Blob, Instance, OutboxEvent, Patient, Series, Study
from samples.generate import generate_study

TEST_PATIENT_NAME = "QUIXOTEFIXTURE^ZEBEDEE"
"""A patient name distinctive enough to grep for in stored bytes."""


def make_study(
    out_dir: Path, kind: str = "ct", *, count: int = 3, size: int = 64, seed: int = 1, **kw: str
) -> list[Path]:
    """A small synthetic study (default: 3 CT slices of 64x64)."""
    return generate_study(kind, out_dir, count=count, rows=size, columns=size, seed=seed, **kw)


def make_clinic(hub: Hub, name: str = "Clinic A", aet: str = "MODALITY_A") -> Sender:
    """A registered clinic with a calling AE title; returns the Sender ingest takes."""
    info = add_clinic(hub, name, aet)
    return Sender(info.id, f"test:{aet}")


def dataset_sha256(path: Path) -> str:
    """SHA-256 of a Part 10 file's dataset bytes (everything after the File Meta)."""
    with path.open("rb") as fp:
        read_preamble(fp, force=False)
        _read_file_meta_info(fp)
        return hashlib.sha256(fp.read()).hexdigest()


def sop_instance_uid(path: Path) -> str:
    """The SOP Instance UID of a file."""
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def row_counts(hub: Hub) -> dict[str, int]:
    """Rows per index table."""
    with hub.sessions() as session:
        return {
            model.__tablename__: int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in (Patient, Study, Series, Instance, Blob, OutboxEvent)
        }


def stored_blob_ids(hub: Hub) -> set[str]:
    """Ids of every object in the blob store."""
    return set(hub.blobs.iter_ids())


@contextmanager
def running_node(hub: Hub) -> Iterator[tuple[str, int]]:
    """A DICOM node on a free port for the duration of the block; yields (host, port)."""
    node = DicomNode(hub)
    node.start()
    try:
        yield node.address
    finally:
        node.stop()
