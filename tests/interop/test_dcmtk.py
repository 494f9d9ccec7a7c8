"""dcmtk's echoscu and storescu against a running `saf dicom`; exports match what was sent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.factories import dataset_sha256, make_study, sop_instance_uid
from tests.interop.conftest import SafProcess, dcmtk_env

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
