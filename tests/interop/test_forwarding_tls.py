"""Forwarding over DICOM TLS to a real dcmtk `storescp +tls` (mutual TLS): the destination's
certificate is verified against SAF_FORWARD_TLS_CA and optionally pinned; a wrong CA or a
wrong pin sends nothing and says so in the job."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.forward import make_transport
from saf.forwarding import enqueue_study, forward_due, parse_forward_rules, retry
from saf.hub import Hub
from saf.ingest import ingest_part10
from saf.models import ForwardJob, utcnow
from saf.stability import mark_stable_studies
from tests.dicom_node.certs import Pki, make_pki
from tests.factories import dataset_sha256, make_clinic, make_study
from tests.interop.conftest import dcmtk_env, free_port

pytestmark = pytest.mark.usefixtures("dcmtk")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_storescp(tmp_path: Path, pki: Pki) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp on a TLS port, requiring a client certificate from the test CA."""
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "+tls", str(pki.server.key), str(pki.server.cert), "-pem", "-rc",
         "+cf", str(pki.ca), "-od", str(out), "-aet", "TLSDEST", str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"storescp +tls did not listen on {port}") from None
                time.sleep(0.05)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _study(hub: Hub, tmp_path: Path) -> tuple[str, list[Path]]:
    sender = make_clinic(hub)
    paths = make_study(tmp_path / "study", "ct", count=3, size=32)
    for path in paths:
        ingest_part10(hub, path, sender)
    [study_id] = mark_stable_studies(hub, now=utcnow() + timedelta(seconds=60))
    return study_id, paths


def _received(out: Path) -> set[str]:
    return {dataset_sha256(p) for p in out.rglob("*") if p.is_file()}


def test_dicoms_destination_verified_pinned_and_refused(
    hub: Hub, tmp_path: Path, pki: Pki, tls_storescp: tuple[int, Path]
) -> None:
    port, out = tls_storescp
    settings = hub.settings
    settings.forward_tls_ca = pki.ca
    settings.dicom_tls_cert, settings.dicom_tls_key = pki.client.cert, pki.client.key
    study_id, paths = _study(hub, tmp_path)
    transport = make_transport("SAF", settings)

    def forward(rule: str) -> ForwardJob:
        enqueue_study(hub, study_id, rules=parse_forward_rules(rule))
        forward_due(hub, transport)
        with hub.sessions() as session:
            return session.scalars(select(ForwardJob).order_by(ForwardJob.id.desc())).first()  # type: ignore[return-value]

    # A pin that is not the destination's certificate: nothing leaves.
    job = forward(f'[[rule]]\nname = "p"\ndestination = "dicoms://TLSDEST@127.0.0.1:{port}"\n'
                  f'tls_sha256 = "{"00" * 32}"\n')  # fmt: skip
    assert job.state == "pending" and job.instances_sent == 0
    assert "no association" in (job.last_error or "")
    assert _received(out) == set()

    job = forward(f'[[rule]]\nname = "p"\ndestination = "dicoms://TLSDEST@127.0.0.2:{port}"\n')
    # 127.0.0.2 reaches the same storescp, but the certificate is not for that address.
    socket.create_connection(("127.0.0.2", port), timeout=5).close()
    assert job.state == "pending" and _received(out) == set()
    # Verified against the CA, pinned to the right certificate (written as openssl prints
    # it): everything, as stored. The trailing slash makes it a new destination entry.
    pin = ":".join(pki.server.sha256[i : i + 2] for i in range(0, 64, 2)).upper()
    job = forward(f'[[rule]]\nname = "p"\ndestination = "dicoms://TLSDEST@127.0.0.1:{port}/"\n'
                  f'tls_sha256 = "{pin}"\n')  # fmt: skip
    assert job.state == "done", job.last_error
    assert _received(out) == {dataset_sha256(p) for p in paths}


def test_dicoms_destination_from_an_untrusted_ca_gets_nothing(
    hub: Hub, tmp_path: Path, pki: Pki, tls_storescp: tuple[int, Path]
) -> None:
    port, out = tls_storescp
    hub.settings.forward_tls_ca = pki.stranger_ca  # trusts another CA only
    hub.settings.dicom_tls_cert, hub.settings.dicom_tls_key = pki.client.cert, pki.client.key
    study_id, _ = _study(hub, tmp_path)
    rules = parse_forward_rules(
        f'[[rule]]\nname = "t"\ndestination = "dicoms://TLSDEST@127.0.0.1:{port}"\n'
    )
    enqueue_study(hub, study_id, rules=rules)
    [result] = forward_due(hub, make_transport("SAF", hub.settings))
    assert result.state == "pending" and result.sent == 0
    assert _received(out) == set()

    # Without a client certificate the destination (which requires one) refuses too.
    hub.settings.forward_tls_ca = pki.ca
    hub.settings.dicom_tls_cert = hub.settings.dicom_tls_key = None
    retry(hub)
    [result] = forward_due(hub, make_transport("SAF", hub.settings))
    assert result.state == "pending" and _received(out) == set()

    # A TLS file that is missing: the job says which one, and nothing crashes.
    hub.settings.forward_tls_ca = tmp_path / "missing-ca.pem"
    retry(hub)
    [result] = forward_due(hub, make_transport("SAF", hub.settings))
    assert result.state == "pending" and "missing-ca.pem" in (result.error or "")
