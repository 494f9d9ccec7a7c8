"""Acceptance: `saf up` receives a 200-slice CT from dcmtk's storescu and, within a few
seconds of the stable age, its case is on the routed worklist with every thumbnail."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import func, select

from saf.cases import worklist
from saf.hub import Hub
from saf.models import Case, Series, Thumbnail
from saf.settings import Settings
from tests.factories import make_study
from tests.interop.conftest import dcmtk_env, free_port

pytestmark = [pytest.mark.interop, pytest.mark.slow, pytest.mark.usefixtures("dcmtk")]

STABLE_AGE_S = 2.0
WITHIN_S = 10.0
"""Allowed time after the stable age (measured ~1 s on 2 idle cores; CI may be loaded)."""


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "saf up exited early"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("saf up did not listen")


def test_storescu_ct_ends_on_the_worklist_with_thumbnails(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    saf = [sys.executable, "-m", "saf", "--data-dir", str(data_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAF_")}
    env.update(
        SAF_STABLE_AGE_SECONDS=str(STABLE_AGE_S),
        SAF_STABLE_CHECK_INTERVAL="0.2",
        SAF_OUTBOX_POLL_INTERVAL="0.2",
    )
    subprocess.run([*saf, "init"], env=env, check=True, capture_output=True)
    subprocess.run([*saf, "clinic", "add", "Clinic A", "--aet", "MODALITY_A"],
                   env=env, check=True, capture_output=True)  # fmt: skip
    (tmp_path / "routing.toml").write_text(
        '[[rule]]\nname = "ct to radiology"\nmodality = ["CT"]\nworklist = "radiology"\n\n'
        '[[rule]]\nname = "default"\nworklist = "general"\n'
    )
    (tmp_path / "routing.toml").replace(data_dir / "routing.toml")
    make_study(tmp_path / "ct", "ct", count=200, size=512)

    dicom_port, http_port = free_port(), free_port()
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [*saf, "--dicom-port", str(dicom_port), "--http-port", str(http_port), "up"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    hub = Hub.open(Settings(data_dir=data_dir))
    try:
        _wait_listening(dicom_port, up)
        sent = subprocess.run(
            ["storescu", "-aet", "MODALITY_A", "-aec", "SAF", "+sd", "+r",
             "127.0.0.1", str(dicom_port), str(tmp_path / "ct")],
            env=dcmtk_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        last_store = time.monotonic()

        def done() -> bool:
            with hub.sessions() as session:
                thumbnails = session.scalar(select(func.count(Thumbnail.id)))
            return thumbnails == 201 and bool(worklist(hub, "radiology"))

        while not done():
            after = time.monotonic() - last_store - STABLE_AGE_S
            assert after < WITHIN_S, (tmp_path / "up.log").read_text(errors="replace")[-3000:]
            time.sleep(0.05)
        after = time.monotonic() - last_store - STABLE_AGE_S
    finally:
        up.terminate()
        up.wait(timeout=60)
        hub.close()
    print(f"case on the worklist with thumbnails {after:.2f} s after the stable age")
    [item] = worklist(hub, "radiology")
    with hub.sessions() as session:
        assert session.get(Case, item.case_id).routed_by == "ct to radiology"  # type: ignore[union-attr]
        series = session.scalars(select(Series.id)).all()
        series_thumbs = session.scalar(
            select(func.count(Thumbnail.id)).where(Thumbnail.series_pk.in_(series))
        )
    assert series_thumbs == len(series) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_saf_up_leaves_no_worker_behind(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM stops every component; even a SIGKILLed `saf up` takes its worker along."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAF_")}
    dicom_port, http_port = free_port(), free_port()
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "saf", "--data-dir", str(tmp_path / "data"),
         "--dicom-port", str(dicom_port), "--http-port", str(http_port), "up"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    family: list[psutil.Process] = [psutil.Process(up.pid)]
    try:
        _wait_listening(http_port, up)
        family += family[0].children(recursive=True)
        assert len(family) == 2, family  # saf up and its worker
        up.send_signal(sig)
        up.wait(timeout=60)
        family[1].wait(timeout=60)  # raises psutil.TimeoutExpired if the worker lingers
    finally:
        for proc in family:
            if proc.is_running():
                proc.kill()
    if sig == signal.SIGTERM:
        assert up.returncode == 0, (tmp_path / "up.log").read_text(errors="replace")[-2000:]
