"""Clinics (tenants) and the DICOM peers (calling AE titles) that belong to them."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import or_, select

from saf.aetitle import check_ae_title
from saf.db import transaction
from saf.hub import Hub
from saf.models import UNASSIGNED_CLINIC, Clinic, DicomPeer


class ClinicError(ValueError):
    """A clinic or peer registration that cannot be made; the message says what to fix."""


@dataclass(frozen=True)
class ClinicInfo:
    """A clinic and its registered peers, for listing."""

    id: str
    name: str
    peers: tuple[tuple[str, str], ...]
    """(AE title, host or '' for any host)."""


def add_clinic(hub: Hub, name: str, ae_title: str | None = None, host: str = "") -> ClinicInfo:
    """Register a clinic (or reuse it by name) and optionally a calling AE title for it."""
    name = name.strip()
    if not name or len(name) > 64:
        raise ClinicError("clinic name must be 1-64 characters")
    try:
        aet = check_ae_title(ae_title) if ae_title else None
    except ValueError as exc:
        raise ClinicError(str(exc)) from None
    with transaction(hub.sessions) as session:
        clinic = session.scalar(select(Clinic).where(Clinic.name == name))
        if clinic is None:
            clinic = Clinic(name=name)
            session.add(clinic)
            session.flush()
        if aet:
            taken = session.scalar(
                select(DicomPeer).where(DicomPeer.ae_title == aet, DicomPeer.host == host)
            )
            if taken is not None and taken.clinic_id != clinic.id:
                raise ClinicError(
                    f"AE title {aet!r} (host {host or 'any'}) already belongs to another clinic"
                )
            if taken is None:
                session.add(DicomPeer(clinic_id=clinic.id, ae_title=aet, host=host))
        clinic_id = clinic.id
    return get_clinic(hub, clinic_id)


def get_clinic(hub: Hub, clinic_id: str) -> ClinicInfo:
    """One clinic with its peers."""
    with hub.sessions() as session:
        clinic = session.get(Clinic, clinic_id)
        if clinic is None:
            raise ClinicError(f"no clinic with id {clinic_id}")
        peers = tuple(sorted((p.ae_title, p.host) for p in clinic.peers))
        return ClinicInfo(clinic.id, clinic.name, peers)


def list_clinics(hub: Hub) -> list[ClinicInfo]:
    """All clinics, by name."""
    with hub.sessions() as session:
        ids = list(session.scalars(select(Clinic.id).order_by(Clinic.name)))
    return [get_clinic(hub, clinic_id) for clinic_id in ids]


def find_clinic_id(hub: Hub, name: str) -> str | None:
    """The id of the clinic called `name`, if any."""
    with hub.sessions() as session:
        return session.scalar(select(Clinic.id).where(Clinic.name == name))


def resolve_peer(hub: Hub, ae_title: str, host: str) -> str | None:
    """The clinic id for a calling AE title from `host`; a host-pinned entry wins over 'any'."""
    aet = ae_title.strip()
    with hub.sessions() as session:
        rows = session.execute(
            select(DicomPeer.clinic_id, DicomPeer.host).where(
                DicomPeer.ae_title == aet, or_(DicomPeer.host == host, DicomPeer.host == "")
            )
        ).all()
    by_host = {peer_host: str(clinic_id) for clinic_id, peer_host in rows}
    return by_host.get(host) or by_host.get("")


def unassigned_clinic_id(hub: Hub) -> str:
    """The clinic that holds data from unknown peers (created on first use)."""
    return add_clinic(hub, UNASSIGNED_CLINIC).id
