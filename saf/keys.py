"""Key rotation: a new key-encryption key; every data key and sealed field re-wrapped under it."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from saf import annotations as anno  # `annotations` is taken by the __future__ import
from saf import cases, fhir_store, instance_metadata, replies, subscriptions
from saf.crypto import BlobHeader, reseal_value, rewrap, value_key_id
from saf.db import transaction
from saf.hub import Hub
from saf.models import Blob, Patient

BATCH = 500
"""Rows re-wrapped per transaction, so rotation of a large archive never holds long locks."""


@dataclass(frozen=True)
class RotationReport:
    """What a rotation did."""

    new_key_id: str
    blobs_rewrapped: int
    fields_resealed: int


def rotate(hub: Hub) -> RotationReport:
    """Add a KEK, make it active, and re-wrap every blob header and sealed field under it.

    Content is never re-encrypted. Old KEKs stay in the ring, so anything written by
    a process that still had the old ring (or a rotation cut short) stays readable;
    running the rotation again finishes the job.
    """
    keyring = hub.keyring
    new_key_id = keyring.rotate()
    keyring = hub.keyring
    blobs = 0
    while True:
        with transaction(hub.sessions) as session:
            batch = list(
                session.scalars(select(Blob).where(Blob.key_id != new_key_id).limit(BATCH))
            )
            for blob in batch:
                header = rewrap(keyring, BlobHeader.from_bytes(blob.header))
                blob.header, blob.key_id = header.to_bytes(), header.key_id
        blobs += len(batch)
        if len(batch) < BATCH:
            break
    fields = (
        _reseal_patients(hub, new_key_id)
        + fhir_store.reseal(hub, new_key_id)
        + subscriptions.reseal(hub, new_key_id)
        + anno.reseal(hub, new_key_id)
        + replies.reseal(hub, new_key_id)
        + instance_metadata.reseal(hub, new_key_id)
        + cases.reseal(hub, new_key_id)
    )
    return RotationReport(new_key_id, blobs, fields)


def _reseal_patients(hub: Hub, new_key_id: str) -> int:
    keyring = hub.keyring
    resealed = 0
    after = ""
    while True:
        with transaction(hub.sessions) as session:
            batch = list(
                session.scalars(
                    select(Patient).where(Patient.id > after).order_by(Patient.id).limit(BATCH)
                )
            )
            for patient in batch:
                for attr, context in _SEALED_FIELDS:
                    token = getattr(patient, attr)
                    if token and value_key_id(token) != new_key_id:
                        setattr(patient, attr, reseal_value(keyring, token, context=context))
                        resealed += 1
        if len(batch) < BATCH:
            return resealed
        after = batch[-1].id


_SEALED_FIELDS = (("name_sealed", "patient.name"), ("birth_date_sealed", "patient.birth_date"))
"""Index columns holding sealed values, with the context each was sealed under."""


def blobs_per_key(hub: Hub) -> dict[str, int]:
    """How many blobs each KEK wraps."""
    with hub.sessions() as session:
        rows = session.execute(select(Blob.key_id, func.count(Blob.id)).group_by(Blob.key_id))
        return {key_id: int(n) for key_id, n in rows}
