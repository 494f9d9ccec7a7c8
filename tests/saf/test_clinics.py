"""Clinics and DICOM peers: registration, permissions, certificate pins, peer resolution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from saf.clinics import (
    ClinicError,
    PeerRefused,
    add_clinic,
    cert_sha256_of_pem,
    list_clinics,
    parse_permissions,
    resolve_peer,
)
from saf.hub import Hub
from saf.identity import allows
from saf.models import UNASSIGNED_CLINIC
from tests.dicom_node.certs import make_pki

PIN = "ab" * 32


def test_new_peer_may_only_store_and_resolves_to_an_ae_principal(hub: Hub) -> None:
    clinic = add_clinic(hub, "Clinic A", "MODALITY_A")
    access = resolve_peer(hub, "MODALITY_A ", "10.1.2.3")
    assert access.permissions == {"store"}
    who = access.principal
    assert (who.kind, who.name, who.role, who.clinic_id, who.address) == (
        "ae", "MODALITY_A", "system", clinic.id, "10.1.2.3",
    )  # fmt: skip
    assert allows(who, "ImagingStudy", "c")
    assert not allows(who, "ImagingStudy", "s") and not allows(who, "ImagingStudy", "r")


def test_permissions_are_updated_by_adding_again(hub: Hub) -> None:
    add_clinic(hub, "Clinic A", "PACS_A")
    info = add_clinic(hub, "Clinic A", "PACS_A", permissions=["find", "store", "get"])
    assert [p.permissions for p in info.peers] == [{"store", "find", "get"}]
    assert info.peers[0].describe() == "PACS_A@* [store,find,get]"
    again = add_clinic(hub, "Clinic A", "PACS_A")  # no permissions given: unchanged
    assert again.peers == info.peers
    access = resolve_peer(hub, "PACS_A", "10.0.0.1")
    assert access.may("find") and access.may("get") and not access.may("move")
    assert allows(access.principal, "ImagingStudy", "s")
    assert allows(access.principal, "Patient", "s")
    assert allows(access.principal, "ImagingStudy", "r")


@pytest.mark.parametrize(
    ("text", "message"),
    [("store,peek", "unknown DICOM permission"), ("", "at least one"), (" , ", "at least one")],
)
def test_bad_permissions_say_what_to_use(text: str, message: str) -> None:
    with pytest.raises(ClinicError, match=message):
        parse_permissions(text)


def test_permissions_need_an_ae_title(hub: Hub) -> None:
    with pytest.raises(ClinicError, match="add --aet"):
        add_clinic(hub, "Clinic A", permissions=["find"])


def test_host_pinned_entry_wins_over_any_host(hub: Hub) -> None:
    anywhere = add_clinic(hub, "Clinic A", "SHARED")
    pinned = add_clinic(hub, "Clinic B", "SHARED", host="10.0.0.7", permissions=["find"])
    assert resolve_peer(hub, "SHARED", "10.0.0.7").clinic_id == pinned.id
    assert resolve_peer(hub, "SHARED", "10.0.0.8").clinic_id == anywhere.id


def test_certificate_pin(hub: Hub) -> None:
    clinic = add_clinic(hub, "Clinic A", "MODALITY_A", cert_sha256=PIN.upper())
    assert clinic.peers[0].cert_sha256 == PIN
    assert resolve_peer(hub, "MODALITY_A", "h", cert_sha256=PIN).clinic_id == clinic.id
    with pytest.raises(PeerRefused, match="must connect over TLS") as no_cert:
        resolve_peer(hub, "MODALITY_A", "h")
    with pytest.raises(PeerRefused, match="not the one registered") as wrong:
        resolve_peer(hub, "MODALITY_A", "h", cert_sha256="cd" * 32)
    assert no_cert.value.clinic_id == wrong.value.clinic_id == clinic.id
    cleared = add_clinic(hub, "Clinic A", "MODALITY_A", cert_sha256="")
    assert cleared.peers[0].cert_sha256 is None
    assert resolve_peer(hub, "MODALITY_A", "h").clinic_id == clinic.id


def test_bad_fingerprint_is_refused(hub: Hub) -> None:
    with pytest.raises(ClinicError, match="64 hex digits"):
        add_clinic(hub, "Clinic A", "MODALITY_A", cert_sha256="abc")


def test_unknown_ae_is_refused_unless_unassigned_is_allowed(hub: Hub) -> None:
    with pytest.raises(PeerRefused, match="not registered") as refused:
        resolve_peer(hub, "STRANGER", "10.0.0.1")
    assert refused.value.clinic_id is None
    hub.settings.dicom_accept_unknown = True
    access = resolve_peer(hub, "STRANGER", "10.0.0.1")
    assert access.permissions == {"store"}
    assert [c.name for c in list_clinics(hub)] == [UNASSIGNED_CLINIC]
    assert access.clinic_id == list_clinics(hub)[0].id


def test_fingerprint_of_a_pem_file_matches_the_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    assert cert_sha256_of_pem(pki.client.cert.read_text()) == pki.client.sha256
    with pytest.raises(ClinicError, match="no PEM certificate"):
        cert_sha256_of_pem(pki.client.key.read_text())


def test_cli_clinic_add_with_cert_and_allow(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")

    def saf(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "saf", "--data-dir", str(tmp_path / "data"), *args],
            capture_output=True, text=True, timeout=60, check=False,
            env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        )  # fmt: skip

    assert saf("init").returncode == 0
    added = saf("clinic", "add", "Clinic A", "--aet", "MODALITY_A", "--allow", "store,find",
                "--cert", str(pki.client.cert))  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "MODALITY_A@* [store,find]" in added.stdout
    assert f"cert:{pki.client.sha256[:16]}" in added.stdout
    key_as_cert = saf("clinic", "add", "Clinic A", "--aet", "MODALITY_A", "--cert",
                      str(pki.client.key))  # fmt: skip
    assert key_as_cert.returncode == 2
    assert "no PEM certificate" in key_as_cert.stderr and "Traceback" not in key_as_cert.stderr
    bad_allow = saf("clinic", "add", "Clinic A", "--aet", "MODALITY_A", "--allow", "all")
    assert bad_allow.returncode == 2 and "store, find, move, get" in bad_allow.stderr
    unpinned = saf("clinic", "add", "Clinic A", "--aet", "MODALITY_A", "--no-cert")
    assert unpinned.returncode == 0 and "cert:" not in unpinned.stdout
    listed = saf("clinic", "list")
    assert "MODALITY_A@* [store,find]" in listed.stdout
