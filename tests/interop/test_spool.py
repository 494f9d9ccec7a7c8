"""Aborted transfers: the partial spool file (plaintext) is swept, live ones are kept."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from dicom_node.scp import DicomNode
from saf.hub import Hub
from tests.factories import make_clinic, make_study, row_counts
from tests.interop.conftest import dcmtk_env

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("dcmtk")]


def test_partial_file_of_a_killed_sender_is_swept(hub: Hub, tmp_path: Path) -> None:
    make_clinic(hub, aet="MODALITY_A")
    [big] = make_study(tmp_path, "cr", count=1, size=3000)  # ~18 MB, sent in 4 KiB PDUs
    node = DicomNode(hub)
    node.start()
    try:
        _, port = node.address
        sender = subprocess.Popen(
            ["storescu", "-aet", "MODALITY_A", "-aec", "SAF", "--max-send-pdu", "4096",
             "127.0.0.1", str(port), str(big)],
            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        spool = hub.settings.spool_dir
        deadline = time.monotonic() + 20
        while not any(spool.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.02)
        sender.kill()  # mid-transfer: the C-STORE never completes
        sender.wait()
        time.sleep(0.5)
        [partial] = list(spool.iterdir())

        assert node.sweep_spool() == 0  # still within the network timeout: kept
        assert partial.exists()
        later = time.time() + hub.settings.dicom_network_timeout + 60
        assert node.sweep_spool(now=later) == 1
        assert list(spool.iterdir()) == []
        assert row_counts(hub)["instance"] == 0
    finally:
        node.stop()


def test_sweep_keeps_fresh_files(hub: Hub) -> None:
    spool = hub.settings.spool_dir
    fresh, stale = spool / "fresh.dcm", spool / "stale.dcm"
    fresh.write_bytes(b"being received")
    stale.write_bytes(b"abandoned")
    old = time.time() - hub.settings.dicom_network_timeout - 120
    os.utime(stale, (old, old))

    assert DicomNode(hub).sweep_spool() == 1
    assert fresh.exists() and not stale.exists()
