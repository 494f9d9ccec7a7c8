"""DICOM TLS with pynetdicom as the peer: mutual TLS, certificate pinning, the plain port."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_node.scp import DicomNode
from dicom_node.tls import TLSConfigError, client_context
from saf.clinics import add_clinic
from saf.hub import Hub
from saf.models import AuditRecord
from tests.dicom_node.certs import KeyPair, Pki, make_pki
from tests.dicom_node.peer import associate, rejection
from tests.factories import make_study, row_counts


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def tls_node(hub: Hub, pki: Pki, *, mutual: bool = True, plain: bool = True) -> Iterator[DicomNode]:
    """A node with a TLS port (mutual: client certificates from pki.ca required)."""
    settings = hub.settings
    settings.dicom_tls_cert, settings.dicom_tls_key = pki.server.cert, pki.server.key
    settings.dicom_tls_ca = pki.ca if mutual else None
    settings.dicom_tls_port = 0
    settings.dicom_plain = plain
    node = DicomNode(hub)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _associate(
    address: tuple[str, int], pki: Pki, client: KeyPair | None, *, tls: bool = True
) -> Association:
    ae = AE(ae_title="MODALITY_A")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    context = client_context(pki.ca, client.cert, client.key) if client else client_context(pki.ca)
    host, port = address
    return associate(ae, host, port, ae_title="SAF", tls_args=(context, host) if tls else None)


def _association_audit(hub: Hub) -> list[tuple[int, str]]:
    with hub.sessions() as session:
        rows = session.execute(
            select(AuditRecord.outcome, AuditRecord.detail)
            .where(AuditRecord.event == "dicom-association")
            .order_by(AuditRecord.id)
        ).all()
    return [(outcome, detail or "") for outcome, detail in rows]


def test_mutual_tls_with_the_registered_certificate_stores_a_study(
    hub: Hub, pki: Pki, tmp_path: Path
) -> None:
    add_clinic(hub, "Clinic A", "MODALITY_A", cert_sha256=pki.client.sha256)
    paths = make_study(tmp_path, count=3)
    with tls_node(hub, pki) as node:
        assoc = _associate(node.tls_address, pki, pki.client)
        assert assoc.is_established
        statuses = [assoc.send_c_store(p).Status for p in paths]
        assoc.release()
    assert statuses == [0x0000] * 3
    assert row_counts(hub)["instance"] == 3
    [(outcome, detail)] = _association_audit(hub)
    assert outcome == 0 and "tls=yes" in detail


def test_pinned_peer_with_another_valid_certificate_is_rejected(hub: Hub, pki: Pki) -> None:
    clinic = add_clinic(hub, "Clinic A", "MODALITY_A", cert_sha256=pki.client.sha256)
    with tls_node(hub, pki) as node:
        assoc = _associate(node.tls_address, pki, pki.other_client)
        assert rejection(assoc) == (0x01, 0x01, 0x03)
    with hub.sessions() as session:
        record = session.scalars(select(AuditRecord)).one()
    assert (record.outcome, record.clinic_id) == (4, clinic.id)
    assert record.detail is not None and "is not the one registered" in record.detail


def test_pinned_peer_on_the_plain_port_is_rejected(hub: Hub, pki: Pki) -> None:
    add_clinic(hub, "Clinic A", "MODALITY_A", cert_sha256=pki.client.sha256)
    with tls_node(hub, pki) as node:
        assoc = _associate(node.address, pki, None, tls=False)
        assert rejection(assoc) == (0x01, 0x01, 0x03)
    [(outcome, detail)] = _association_audit(hub)
    assert outcome == 4 and "tls=no" in detail and "must connect over TLS" in detail


@pytest.mark.parametrize("who", ["no certificate", "untrusted CA"])
def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    hub: Hub, pki: Pki, who: str
) -> None:
    add_clinic(hub, "Clinic A", "MODALITY_A")  # not pinned: any certificate from the CA
    client = None if who == "no certificate" else pki.stranger
    with tls_node(hub, pki) as node:
        refused = _associate(node.tls_address, pki, client)
        assert not refused.is_established
        _wait_for(lambda: bool(_association_audit(hub)))
        good = _associate(node.tls_address, pki, pki.other_client)
        assert good.is_established  # the node is fine; it was that client
        good.release()
    refusal, accepted = _association_audit(hub)
    assert refusal[0] == 4 and "TLS handshake failed" in refusal[1]
    assert accepted[0] == 0


def test_plain_dicom_to_the_tls_port_gets_nothing_and_is_audited(hub: Hub, pki: Pki) -> None:
    add_clinic(hub, "Clinic A", "MODALITY_A")
    with tls_node(hub, pki) as node:
        assoc = _associate(node.tls_address, pki, None, tls=False)
        assert not assoc.is_established and rejection(assoc) is None
        _wait_for(lambda: bool(_association_audit(hub)))
    [(outcome, detail)] = _association_audit(hub)
    assert outcome == 4
    assert detail == "tls=yes no association request: TLS handshake failed or connection dropped"


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.02)


def test_a_silent_connection_does_not_hold_up_other_peers(hub: Hub, pki: Pki) -> None:
    """The TLS handshake runs in the association's thread, not in the accept loop."""
    add_clinic(hub, "Clinic A", "MODALITY_A")
    with tls_node(hub, pki) as node, socket.create_connection(node.tls_address) as silent:
        silent.settimeout(5)
        started = time.monotonic()
        assoc = _associate(node.tls_address, pki, pki.client)
        assert assoc.is_established
        assert time.monotonic() - started < 5
        assoc.release()


def test_tls_only_without_client_certificates(hub: Hub, pki: Pki) -> None:
    """Server-authenticated TLS: unpinned peers connect without a certificate; a pinned
    peer cannot prove itself there and is refused."""
    add_clinic(hub, "Clinic A", "MODALITY_A")
    add_clinic(hub, "Clinic B", "PINNED", cert_sha256=pki.other_client.sha256)
    with tls_node(hub, pki, mutual=False, plain=False) as node:
        with pytest.raises(AssertionError, match="TLS only"):
            _ = node.address
        assoc = _associate(node.tls_address, pki, None)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        ae = AE(ae_title="PINNED")
        ae.add_requested_context(Verification)
        host, port = node.tls_address
        pinned = associate(ae, host, port, ae_title="SAF", tls_args=(client_context(pki.ca), host))
        assert rejection(pinned) == (0x01, 0x01, 0x03)


def test_unusable_tls_files_fail_before_listening(hub: Hub, pki: Pki, tmp_path: Path) -> None:
    hub.settings.dicom_tls_cert = tmp_path / "missing.pem"
    hub.settings.dicom_tls_key = pki.server.key
    node = DicomNode(hub)
    with pytest.raises(TLSConfigError, match=r"no such file .*missing\.pem"):
        node.start()
    hub.settings.dicom_tls_cert = pki.client.cert  # a certificate that is not the key's
    with pytest.raises(TLSConfigError, match="cannot load certificate"):
        DicomNode(hub).start()
