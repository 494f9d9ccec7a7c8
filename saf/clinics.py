"""Clinics (tenants) and the DICOM peers (calling AE titles) that belong to them.

A peer is a calling AE title, optionally pinned to a host and to the SHA-256
fingerprint of its TLS client certificate, with the DIMSE services it may use
(`PERMISSIONS`; deny by default: a new peer may only store). `resolve_peer` is the one
place that turns an association request into a Principal, so every DICOM service
(C-STORE now, C-FIND/C-MOVE/C-GET later) applies the same identity and tenancy.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from sqlalchemy import or_, select

from saf.aetitle import check_ae_title
from saf.db import transaction
from saf.hub import Hub
from saf.identity import Principal
from saf.models import UNASSIGNED_CLINIC, Clinic, DicomPeer

PERMISSIONS: Final = ("store", "find", "move", "get", "reply")
"""DIMSE services a peer can be allowed (C-ECHO is open to every registered peer); `reply`
is outbound: the hub C-STOREs the clinic's consult replies to the peer's host and port
(saf.forwarding.enqueue_reply)."""

DEFAULT_PERMISSIONS: Final = frozenset({"store"})
"""What a newly registered peer may do: send studies in, nothing out."""

DICOM_SCOPES: Final[dict[str, frozenset[str]]] = {
    "store": frozenset({"system/ImagingStudy.c"}),
    "find": frozenset({"system/ImagingStudy.s", "system/Patient.s"}),
    "move": frozenset({"system/ImagingStudy.r"}),
    "get": frozenset({"system/ImagingStudy.r"}),
    "reply": frozenset(),  # the hub sends to the peer; the peer gains no access
}
"""The SMART scopes each DICOM permission stands for, so saf.identity.allows answers
for an AE exactly as for an EHR client (C-FIND searches studies and patients; C-MOVE
and C-GET read study content)."""

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ClinicError(ValueError):
    """A clinic or peer registration that cannot be made; the message says what to fix."""


class PeerRefused(Exception):
    """An association request that no registered peer accounts for.

    `reason` is for the audit trail and the log (AE titles and fingerprints, no PHI);
    `clinic_id` is set when the AE title is known but its credentials did not match.
    """

    def __init__(self, reason: str, clinic_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.clinic_id = clinic_id


@dataclass(frozen=True)
class PeerInfo:
    """One registered calling AE title, for listing."""

    ae_title: str
    host: str
    """Host the AE title must come from, or '' for any host."""
    permissions: frozenset[str]
    cert_sha256: str | None
    port: int | None = None
    """The peer's own Storage SCP port: set, it is a C-MOVE destination."""

    def describe(self) -> str:
        """`AET@host:port [store,find] cert:ab12cd34…` (host `*`: any), for the terminal."""
        where = f"{self.host or '*'}{f':{self.port}' if self.port else ''}"
        text = f"{self.ae_title}@{where} [{format_permissions(self.permissions)}]"
        if self.cert_sha256:
            text += f" cert:{self.cert_sha256[:16]}…"
        return text


@dataclass(frozen=True)
class ClinicInfo:
    """A clinic and its registered peers, for listing."""

    id: str
    name: str
    peers: tuple[PeerInfo, ...]


@dataclass(frozen=True)
class PeerAccess:
    """What an accepted DICOM peer is: its Principal (kind `ae`) and its permissions."""

    principal: Principal
    permissions: frozenset[str]

    @property
    def clinic_id(self) -> str:
        """The clinic the peer sends for and reads from."""
        assert self.principal.clinic_id is not None  # always set for a resolved peer
        return self.principal.clinic_id

    def may(self, service: str) -> bool:
        """Whether the peer may use `service` (one of PERMISSIONS)."""
        return service in self.permissions


def parse_permissions(text: str | Iterable[str]) -> frozenset[str]:
    """`store,find` (or an iterable of names) as a set; raises ClinicError on unknown names."""
    names = text.split(",") if isinstance(text, str) else list(text)
    wanted = {n.strip().lower() for n in names if n.strip()}
    unknown = sorted(wanted - set(PERMISSIONS))
    if unknown:
        raise ClinicError(
            f"unknown DICOM permission(s) {', '.join(unknown)}: use {', '.join(PERMISSIONS)}"
        )
    if not wanted:
        raise ClinicError(f"give at least one DICOM permission of {', '.join(PERMISSIONS)}")
    return frozenset(wanted)


def format_permissions(permissions: Iterable[str]) -> str:
    """Permissions in canonical order, comma-separated (as stored)."""
    chosen = set(permissions)
    return ",".join(p for p in PERMISSIONS if p in chosen)


def cert_sha256_of_der(der: bytes) -> str:
    """SHA-256 fingerprint (lower-case hex) of a DER certificate, as peers are pinned by."""
    return hashlib.sha256(der).hexdigest()


def cert_sha256_of_pem(pem: str) -> str:
    """SHA-256 fingerprint of the first certificate in PEM text; ClinicError if there is none."""
    begin = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise ClinicError("no PEM certificate (-----BEGIN CERTIFICATE-----) in the file")
    try:
        der = ssl.PEM_cert_to_DER_cert(pem[begin : end + len("-----END CERTIFICATE-----")])
    except ValueError as exc:
        raise ClinicError(f"unreadable PEM certificate: {exc}") from None
    return cert_sha256_of_der(der)


def _check_fingerprint(value: str) -> str:
    fingerprint = value.replace(":", "").strip().lower()
    if not _SHA256_HEX.match(fingerprint):
        raise ClinicError("certificate fingerprint must be 64 hex digits (SHA-256)")
    return fingerprint


def add_clinic(
    hub: Hub,
    name: str,
    ae_title: str | None = None,
    host: str = "",
    *,
    permissions: Iterable[str] | None = None,
    cert_sha256: str | None = None,
    port: int | None = None,
) -> ClinicInfo:
    """Register a clinic (or reuse it by name) and optionally a calling AE title for it.

    Registering an AE title the clinic already has updates it: `permissions` (None keeps
    them; a new peer gets DEFAULT_PERMISSIONS), `cert_sha256` (None keeps it, '' removes
    the pin) and `port` (None keeps it, 0 removes it). A peer with a host and a port is a
    C-MOVE destination and gets Storage Commitment results on a new association.
    """
    name = name.strip()
    if not name or len(name) > 64:
        raise ClinicError("clinic name must be 1-64 characters")
    try:
        aet = check_ae_title(ae_title) if ae_title else None
    except ValueError as exc:
        raise ClinicError(str(exc)) from None
    wanted = parse_permissions(permissions) if permissions is not None else None
    pin = _check_fingerprint(cert_sha256) if cert_sha256 else cert_sha256
    if not aet and (wanted is not None or pin is not None or port is not None):
        raise ClinicError("permissions, certificates and ports belong to an AE title: add --aet")
    if port is not None and not 0 <= port <= 65535:
        raise ClinicError("port must be 1-65535 (0 removes it)")
    if port and not host:
        raise ClinicError("a port needs the peer's address: add --host")
    with transaction(hub.sessions) as session:
        clinic = session.scalar(select(Clinic).where(Clinic.name == name))
        if clinic is None:
            clinic = Clinic(name=name)
            session.add(clinic)
            session.flush()
        if aet:
            peer = session.scalar(
                select(DicomPeer).where(DicomPeer.ae_title == aet, DicomPeer.host == host)
            )
            if peer is not None and peer.clinic_id != clinic.id:
                raise ClinicError(
                    f"AE title {aet!r} (host {host or 'any'}) already belongs to another clinic"
                )
            if peer is None:
                peer = DicomPeer(
                    clinic_id=clinic.id,
                    ae_title=aet,
                    host=host,
                    permissions=format_permissions(wanted or DEFAULT_PERMISSIONS),
                )
                session.add(peer)
            elif wanted is not None:
                peer.permissions = format_permissions(wanted)
            if pin is not None:
                peer.cert_sha256 = pin or None
            if port is not None:
                peer.port = port or None
            if "reply" in _stored_permissions(peer.permissions) and not (peer.host and peer.port):
                raise ClinicError(
                    f"AE title {aet!r} may receive replies only with --host and --port "
                    "(where the hub sends them)"
                )
        clinic_id = clinic.id
    return get_clinic(hub, clinic_id)


def get_clinic(hub: Hub, clinic_id: str) -> ClinicInfo:
    """One clinic with its peers."""
    with hub.sessions() as session:
        clinic = session.get(Clinic, clinic_id)
        if clinic is None:
            raise ClinicError(f"no clinic with id {clinic_id}")
        peers = tuple(
            sorted(
                (
                    PeerInfo(
                        p.ae_title,
                        p.host,
                        _stored_permissions(p.permissions),
                        p.cert_sha256,
                        p.port,
                    )
                    for p in clinic.peers
                ),
                key=lambda p: (p.ae_title, p.host),
            )
        )
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


def resolve_peer(
    hub: Hub, ae_title: str, host: str, *, cert_sha256: str | None = None
) -> PeerAccess:
    """The peer an association request comes from, or PeerRefused saying why not.

    - The calling AE title from `host` selects the peer; a host-pinned entry wins over
      one registered for any host.
    - A peer pinned to a certificate must have presented exactly that certificate
      (`cert_sha256`, the client certificate's fingerprint; None when the connection
      is not TLS or the client sent none).
    - An unknown AE title is refused, unless SAF_DICOM_ACCEPT_UNKNOWN puts it in the
      'unassigned' clinic, with store permission only.
    """
    aet = ae_title.strip()
    with hub.sessions() as session:
        rows = session.scalars(
            select(DicomPeer).where(
                DicomPeer.ae_title == aet, or_(DicomPeer.host == host, DicomPeer.host == "")
            )
        ).all()
        by_host = {peer.host: peer for peer in rows}
        peer = by_host.get(host) or by_host.get("")
        found = (
            None if peer is None else (peer.id, peer.clinic_id, peer.permissions, peer.cert_sha256)
        )
    if found is None:
        if not hub.settings.dicom_accept_unknown:
            raise PeerRefused("calling AE title not registered (for this host)")
        clinic_id = unassigned_clinic_id(hub)
        return _access(f"unknown:{aet}", aet, host, clinic_id, DEFAULT_PERMISSIONS)
    peer_id, clinic_id, stored, pinned = found
    if pinned and cert_sha256 is None:
        raise PeerRefused("peer must connect over TLS with its client certificate", clinic_id)
    if pinned and cert_sha256 != pinned:
        raise PeerRefused(
            f"client certificate sha256:{cert_sha256[:16] if cert_sha256 else ''}… "
            "is not the one registered for this AE title",
            clinic_id,
        )
    return _access(peer_id, aet, host, clinic_id, _stored_permissions(stored))


def _access(
    peer_id: str, aet: str, host: str, clinic_id: str, permissions: frozenset[str]
) -> PeerAccess:
    scopes = frozenset().union(*(DICOM_SCOPES[p] for p in permissions))
    principal = Principal(
        kind="ae",
        id=peer_id,
        name=aet,
        role="system",
        clinic_id=clinic_id,
        scopes=scopes,
        address=host,
    )
    return PeerAccess(principal, permissions)


def _stored_permissions(text: str) -> frozenset[str]:
    """The stored comma list; unknown names (a hand-edited row) grant nothing."""
    return frozenset(p.strip() for p in text.split(",")) & frozenset(PERMISSIONS)


def unassigned_clinic_id(hub: Hub) -> str:
    """The clinic that holds data from unknown peers (created on first use)."""
    return add_clinic(hub, UNASSIGNED_CLINIC).id
