"""dcmtk's storescu over DICOM TLS (and `saf send --tls`) against a `saf dicom` with mutual TLS."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.dicom_node.certs import KeyPair, Pki, make_pki
from tests.factories import dataset_sha256, make_study, sop_instance_uid
from tests.interop.conftest import SafProcess, dcmtk_env, free_port

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("dcmtk")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[SafProcess]:
    """`saf dicom` with a plain port and a mutual-TLS port; MODALITY_A is pinned to
    pki.client, OPEN_B (another clinic) may store and find with any certificate of the CA."""
    root = tmp_path_factory.mktemp("saf-tls")
    node = SafProcess(root / "data", free_port())
    node.env = {
        "SAF_DICOM_TLS_CERT": str(pki.server.cert),
        "SAF_DICOM_TLS_KEY": str(pki.server.key),
        "SAF_DICOM_TLS_CA": str(pki.ca),
        "SAF_DICOM_TLS_PORT": str(free_port()),
        "COLUMNS": "200",  # `saf clinic list` table rows on one line each
    }
    node.saf("init")
    node.saf("clinic", "add", "Clinic A", "--aet", "MODALITY_A", "--cert", str(pki.client.cert))
    node.saf("clinic", "add", "Clinic B", "--aet", "OPEN_B", "--allow", "store,find")
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _tls_port(node: SafProcess) -> str:
    return node.env["SAF_DICOM_TLS_PORT"]


def _storescu(
    node: SafProcess, pki: Pki, client: KeyPair | None, path: Path, *, aet: str = "MODALITY_A"
) -> subprocess.CompletedProcess[str]:
    tls = ["+tls", str(client.key), str(client.cert), "-pw"] if client else ["+tla"]
    return subprocess.run(
        ["storescu", *tls, "+cf", str(pki.ca), "-aet", aet, "-aec", "SAF", "+sd", "+r",
         "127.0.0.1", _tls_port(node), str(path)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=120,
    )  # fmt: skip


def _exported(node: SafProcess, sent: Path, out: Path) -> dict[str, str]:
    study_uid = str(dcmread(sent, stop_before_pixels=True).StudyInstanceUID)
    node.saf("export", "--study", study_uid, "--out", str(out))
    return {sop_instance_uid(p): dataset_sha256(p) for p in out.rglob("*.dcm")}


def test_storescu_over_mutual_tls_with_the_registered_certificate(
    tls_node: SafProcess, pki: Pki, tmp_path: Path
) -> None:
    sent = make_study(tmp_path / "sent", count=4, size=64, seed=31)
    result = _storescu(tls_node, pki, pki.client, sent[0].parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _exported(tls_node, sent[0], tmp_path / "out") == {
        sop_instance_uid(p): dataset_sha256(p) for p in sent
    }


def test_storescu_with_another_certificate_is_rejected(
    tls_node: SafProcess, pki: Pki, tmp_path: Path
) -> None:
    [path] = make_study(tmp_path / "sent", count=1, size=32, seed=32)
    result = _storescu(tls_node, pki, pki.other_client, path)
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr


def test_storescu_without_a_client_certificate_fails_the_handshake(
    tls_node: SafProcess, pki: Pki, tmp_path: Path
) -> None:
    [path] = make_study(tmp_path / "sent", count=1, size=32, seed=33)
    result = _storescu(tls_node, pki, None, path, aet="OPEN_B")
    assert result.returncode != 0
    assert "Association Request Failed" in result.stdout + result.stderr


def test_storescu_without_tls_on_the_tls_port_fails(
    tls_node: SafProcess, pki: Pki, tmp_path: Path
) -> None:
    [path] = make_study(tmp_path / "sent", count=1, size=32, seed=34)
    result = subprocess.run(
        ["storescu", "-aet", "OPEN_B", "-aec", "SAF", "-to", "5", "-ta", "5", "127.0.0.1",
         _tls_port(tls_node), str(path)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode != 0


def test_pinned_ae_on_the_plain_port_is_rejected(
    tls_node: SafProcess, pki: Pki, tmp_path: Path
) -> None:
    [path] = make_study(tmp_path / "sent", count=1, size=32, seed=35)
    result = subprocess.run(
        ["storescu", "-aet", "MODALITY_A", "-aec", "SAF", "127.0.0.1", str(tls_node.port),
         str(path)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr


def test_unpinned_ae_with_any_certificate_of_the_ca(
    tls_node: SafProcess, pki: Pki, tmp_path: Path
) -> None:
    [path] = make_study(tmp_path / "sent", count=1, size=32, seed=36)
    result = _storescu(tls_node, pki, pki.other_client, path, aet="OPEN_B")
    assert result.returncode == 0, result.stdout + result.stderr


def test_saf_send_over_mutual_tls(tls_node: SafProcess, pki: Pki, tmp_path: Path) -> None:
    sent = make_study(tmp_path / "sent", count=3, size=32, seed=37)
    args = ["send", str(sent[0].parent), "--to", f"127.0.0.1:{_tls_port(tls_node)}",
            "--aet", "MODALITY_A", "--tls", "--ca", str(pki.ca)]  # fmt: skip
    no_cert = tls_node.saf(*args, check=False)
    assert no_cert.returncode == 1
    assert "TLS handshake failed" in no_cert.stdout + no_cert.stderr
    ok = tls_node.saf(*args, "--cert", str(pki.client.cert), "--key", str(pki.client.key))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert set(_exported(tls_node, sent[0], tmp_path / "out")) == {
        sop_instance_uid(p) for p in sent
    }


def test_clinic_list_shows_permissions_and_pins(tls_node: SafProcess, pki: Pki) -> None:
    listed = tls_node.saf("clinic", "list").stdout
    assert "MODALITY_A@* [store]" in listed
    assert f"cert:{pki.client.sha256[:16]}" in listed
    assert "OPEN_B@* [store,find]" in listed
