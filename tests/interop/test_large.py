"""A large multi-frame instance over C-STORE: stored and exported intact, memory flat."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from samples.generate import generate_study
from tests.factories import dataset_sha256, sop_instance_uid
from tests.interop.conftest import dcmtk_env, new_saf_node

pytestmark = [pytest.mark.slow, pytest.mark.interop, pytest.mark.usefixtures("dcmtk")]

FRAMES = 110
"""Frames of the 480x640 RGB ultrasound loop: a ~97 MB instance (streamed, not in memory)."""


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def test_large_instance_streams_through_with_flat_memory(tmp_path: Path) -> None:
    [big] = generate_study("us", tmp_path / "sent", count=FRAMES, seed=3)
    node = new_saf_node(tmp_path)
    node.start()
    try:
        assert node.proc is not None
        before = _peak_rss_kib(node.proc.pid)
        sent = subprocess.run(
            ["storescu", "-aet", "MODALITY_A", "-aec", "SAF", "127.0.0.1", str(node.port),
             str(big)],
            env=dcmtk_env(), capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        growth_mib = (_peak_rss_kib(node.proc.pid) - before) / 1024
    finally:
        node.stop()
    assert sent.returncode == 0, sent.stderr
    assert big.stat().st_size > 90 * 2**20
    assert growth_mib < 40, f"peak RSS grew by {growth_mib:.0f} MiB for a ~98 MB instance"

    out = tmp_path / "out"
    study = str(dcmread(big, stop_before_pixels=True).StudyInstanceUID)
    node.saf("export", "--study", study, "--out", str(out))
    [exported] = list(out.rglob("*.dcm"))
    assert sop_instance_uid(exported) == sop_instance_uid(big)
    assert dataset_sha256(exported) == dataset_sha256(big)
