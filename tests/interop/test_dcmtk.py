"""dcmtk's echoscu and storescu against a running `saf dicom`; exports match what was sent."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.factories import dataset_sha256, make_study, sop_instance_uid
from tests.interop.conftest import SafProcess, dcmtk_env, free_port

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("dcmtk")]


def _dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=dcmtk_env(), timeout=300)


def test_echoscu(saf_node: SafProcess) -> None:
    ok = _dcmtk("echoscu", "-aet", "MODALITY_A", "-aec", "SAF", "127.0.0.1", str(saf_node.port))
    assert ok.returncode == 0, ok.stderr


def test_echoscu_from_unknown_ae_is_rejected(saf_node: SafProcess) -> None:
    no = _dcmtk("echoscu", "-aet", "STRANGER", "-aec", "SAF", "127.0.0.1", str(saf_node.port))
    assert no.returncode != 0
    assert "Calling AE Title Not Recognized" in no.stderr + no.stdout


# storescu proposes a compressed syntax only when told to; otherwise it would try to
# decompress the file itself before sending.
PROPOSE = {"ct-jpeg": "-xy", "ct-j2k": "-xv", "ct-jls": "-xt", "ct-rle": "-xr"}


@pytest.mark.parametrize(
    ("kind", "count"),
    [("ct", 12), ("mr", 3), ("cr", 1), ("mono1", 1), ("us", 4), ("photo", 1), ("ct-jpeg", 2),
     ("ct-j2k", 2), ("ct-jls", 2), ("ct-rle", 2)],
)  # fmt: skip
def test_storescu_then_export_gives_identical_bytes(
    saf_node: SafProcess, tmp_path: Path, kind: str, count: int
) -> None:
    """Each syntax arrives as stored (no transcoding) and comes back byte for byte."""
    sent = make_study(tmp_path / "sent", kind, count=count, size=128, seed=11)
    study_uid = _study_uid(sent[0])

    result = _dcmtk(
        "storescu", PROPOSE.get(kind, "-xe"), "-aet", "MODALITY_A", "-aec", "SAF", "+sd", "+r",
        "127.0.0.1", str(saf_node.port), str(sent[0].parent),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    out = tmp_path / "exported"
    saf_node.saf("export", "--study", study_uid, "--out", str(out))
    exported = {sop_instance_uid(p): dataset_sha256(p) for p in out.rglob("*.dcm")}
    assert exported == {sop_instance_uid(p): dataset_sha256(p) for p in sent}


def test_saf_send_to_saf(saf_node: SafProcess, tmp_path: Path) -> None:
    sent = make_study(tmp_path / "sent", "ct", count=5, size=64, seed=12)
    result = saf_node.saf(
        "send", str(sent[0].parent), "--to", f"127.0.0.1:{saf_node.port}",
        "--aet", "MODALITY_A", "--called-aet", "SAF", check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = tmp_path / "exported"
    saf_node.saf("export", "--study", _study_uid(sent[0]), "--out", str(out))
    assert {sop_instance_uid(p) for p in out.rglob("*.dcm")} == {sop_instance_uid(p) for p in sent}


def _study_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_saf_send_to_dcmtk_storescp_delivers_identical_datasets(tmp_path: Path) -> None:
    sent = make_study(tmp_path / "sent", "ct-jpeg", count=3, size=64, seed=13)
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    scp = subprocess.Popen(
        ["storescp", "--single-process", "-aet", "STORESCP", "+xa", "-od", str(received),
         str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_port(port)
        result = subprocess.run(
            [sys.executable, "-m", "saf", "send", str(sent[0].parent), "--to",
             f"127.0.0.1:{port}", "--aet", "SAFSCU", "--called-aet", "STORESCP"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    assert result.returncode == 0, result.stdout + result.stderr
    got = {sop_instance_uid(p): dataset_sha256(p) for p in received.iterdir()}
    assert got == {sop_instance_uid(p): dataset_sha256(p) for p in sent}


def test_saf_send_to_nobody_says_so(tmp_path: Path) -> None:
    sent = make_study(tmp_path / "sent", count=2, size=32, seed=14)
    result = subprocess.run(
        [sys.executable, "-m", "saf", "send", str(sent[0].parent), "--to",
         f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no association with 127.0.0.1" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_saf_send_from_unregistered_ae_says_why(saf_node: SafProcess, tmp_path: Path) -> None:
    sent = make_study(tmp_path / "sent", count=1, size=32, seed=15)
    result = saf_node.saf(
        "send", str(sent[0]), "--to", f"127.0.0.1:{saf_node.port}", "--aet", "STRANGER",
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "is calling AE title STRANGER registered there?" in result.stdout + result.stderr


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")
