"""Forwarding to real dcmtk storescp destinations: one is down at first and started later,
the other is up all along; both end with every instance, byte-identical datasets, and the
backoff of the one that was down shows in `saf forward status` meanwhile."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.forward import make_transport
from saf.app import create_app
from saf.clinics import add_clinic
from saf.db import transaction
from saf.forwarding import Forwarder
from saf.hub import Hub
from saf.ingest import ingest_part10
from saf.models import Instance, OutboxEvent, utcnow
from saf.pipeline import REPLY_TOPIC, handle_event
from saf.routing import default_rules
from saf.settings import Settings
from saf.stability import mark_stable_studies
from tests.factories import dataset_sha256, login_as, make_clinic, make_study
from tests.interop.conftest import dcmtk_env, free_port
from tests.saf.store_scp import make_reply_sr

pytestmark = pytest.mark.usefixtures("dcmtk")


def _storescp(port: int, out: Path, aet: str) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["storescp", "+xa", "-aet", aet, "-od", str(out), str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"storescp did not listen on {port}")


def _wait(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    """Wait for `check`; long enough for a retry after pynetdicom's 30 s DIMSE timeout,
    which a lost C-STORE response (a race in pynetdicom under load) costs now and then."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _received(out: Path) -> set[str]:
    """Dataset digests of the files a storescp wrote (one it is still writing is skipped)."""
    digests = set()
    for path in out.rglob("*"):
        try:
            digests.add(dataset_sha256(path))
        except Exception:
            continue
    return digests


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.terminate()
            proc.wait(timeout=10)


def test_down_destination_gets_everything_once_up_and_never_blocks_the_other(
    hub: Hub, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    settings = hub.settings
    settings.forward_poll_interval = 0.05
    settings.forward_retry_base_seconds = 0.2
    settings.forward_retry_max_seconds = 0.8
    down_port, up_port = free_port(), free_port()
    settings.forwarding_path.write_text(
        f'[[rule]]\nname = "late-pacs"\ndestination = "dicom://LATE@127.0.0.1:{down_port}"\n\n'
        f'[[rule]]\nname = "up-pacs"\nmodality = ["CT"]\n'
        f'destination = "dicom://UP@127.0.0.1:{up_port}"\n'
    )
    sender = make_clinic(hub)
    paths = make_study(tmp_path / "study", "ct", count=6, size=64)
    for path in paths:
        ingest_part10(hub, path, sender)
    mark_stable_studies(hub, now=utcnow() + timedelta(seconds=60))
    with hub.sessions() as session:
        [event] = session.scalars(select(OutboxEvent).where(OutboxEvent.topic == "study.stable"))
    handle_event(hub, event.topic, event.payload, default_rules())  # queues both jobs
    expected = {dataset_sha256(p) for p in paths}

    up_out, late_out = tmp_path / "up", tmp_path / "late"
    procs.append(_storescp(up_port, up_out, "UP"))
    forwarder = Forwarder(hub, make_transport("SAF"))
    forwarder.start()
    try:
        _wait("the destination that is up", lambda: _received(up_out) == expected)

        # Let a few attempts to the one that is down fail, then look at it as an operator.
        time.sleep(1.0)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAF_")}
        env["COLUMNS"] = "300"
        if settings.database_url:
            env["SAF_DATABASE_URL"] = settings.database_url
        shown = subprocess.run(
            [sys.executable, "-m", "saf", "--data-dir", str(settings.data_dir), "forward",
             "status"],
            capture_output=True, text=True, check=True, timeout=60, env=env,
        ).stdout  # fmt: skip
        [late_row] = [line for line in shown.splitlines() if f":{down_port}" in line]
        [up_row] = [line for line in shown.splitlines() if f":{up_port}" in line]
        cells = [c.strip() for c in late_row.split("│")[1:-1]]
        _, kind, pending, sending, done, failed, attempts, next_at, error = cells
        assert kind == "forward", late_row
        assert pending == "1" or sending == "1", late_row
        assert (done, failed) == ("0", "0"), late_row
        assert next_at or sending == "1", late_row  # when the next attempt is due
        assert int(attempts) >= 2, late_row  # retried with backoff, not given up
        assert "no association" in error, late_row
        assert [c.strip() for c in up_row.split("│")[1:-1]][4] == "1", up_row  # done

        procs.append(_storescp(down_port, late_out, "LATE"))
        _wait("the late destination", lambda: _received(late_out) == expected)
    finally:
        forwarder.stop()


def test_stow_rs_forward_to_another_hub_over_real_http(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DICOMweb destination: another saf hub's /dicomweb on a real uvicorn server,
    with a bearer token from `token_env`; it ends with the same datasets."""
    dest = Hub.open(Settings(data_dir=tmp_path / "dest"), create=True)
    make_clinic(dest, "Remote Clinic", "REMOTE")
    app = create_app(dest)
    with TestClient(app) as client:
        headers = login_as(client, "clinician", username="remote", clinic="Remote Clinic")
    monkeypatch.setenv("SAF_TEST_DEST_TOKEN", headers["Authorization"].removeprefix("Bearer "))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    settings = hub.settings
    settings.forward_poll_interval = 0.05
    settings.forwarding_path.write_text(
        f'[[rule]]\nname = "remote hub"\ndestination = "http://127.0.0.1:{port}/dicomweb"\n'
        'token_env = "SAF_TEST_DEST_TOKEN"\n'
    )
    paths = make_study(tmp_path / "study", "ct", count=4, size=64)
    sender = make_clinic(hub)
    for path in paths:
        ingest_part10(hub, path, sender)
    mark_stable_studies(hub, now=utcnow() + timedelta(seconds=60))
    with hub.sessions() as session:
        [event] = session.scalars(select(OutboxEvent).where(OutboxEvent.topic == "study.stable"))
    handle_event(hub, event.topic, event.payload, default_rules())
    forwarder = Forwarder(hub, make_transport("SAF"))
    forwarder.start()
    try:

        def arrived() -> bool:
            with dest.sessions() as session:
                return len(session.scalars(select(Instance.sha256)).all()) == len(paths)

        _wait("the remote hub", arrived, timeout=60)
    finally:
        forwarder.stop()
        server.should_exit = True
        thread.join(timeout=10)
    with dest.sessions() as session:
        stored = set(session.scalars(select(Instance.sha256)))
    assert stored == {dataset_sha256(p) for p in paths}
    dest.close()


def test_a_reply_reaches_the_clinics_pacs_and_nothing_else_does(
    hub: Hub, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """The clinic's PACS (a dcmtk storescp registered with the `reply` permission) gets the
    signed reply's SR, byte-identical, and none of the study's images."""
    settings = hub.settings
    settings.forward_poll_interval = 0.05
    port = free_port()
    sender = make_clinic(hub)
    add_clinic(hub, "Clinic A", "CLINIC_PACS", "127.0.0.1", permissions=["store", "reply"],
               port=port)  # fmt: skip
    paths = make_study(tmp_path / "study", "ct", count=3, size=32)
    for path in paths:
        ingest_part10(hub, path, sender)
    [study_id] = mark_stable_studies(hub, now=utcnow() + timedelta(seconds=60))
    sr = make_reply_sr(paths, tmp_path / "reply.dcm", "No acute findings.")
    ingest_part10(hub, sr, sender)
    payload = {"case_id": "c1", "study_ids": [study_id],
               "series_instance_uids": [str(dcmread(sr).SeriesInstanceUID)]}  # fmt: skip
    with transaction(hub.sessions) as session:
        session.add(OutboxEvent(topic=REPLY_TOPIC, payload=payload))
    with hub.sessions() as session:
        [event] = session.scalars(select(OutboxEvent).where(OutboxEvent.topic == REPLY_TOPIC))
    job_ids = handle_event(hub, event.topic, event.payload, default_rules())
    assert isinstance(job_ids, list) and len(job_ids) == 1  # the clinic's PACS, no rules

    out = tmp_path / "clinic-pacs"
    procs.append(_storescp(port, out, "CLINIC_PACS"))
    forwarder = Forwarder(hub, make_transport("SAF", settings))
    forwarder.start()
    try:
        _wait("the reply at the clinic's PACS", lambda: _received(out) == {dataset_sha256(sr)})
        time.sleep(0.5)  # nothing else follows
        assert _received(out) == {dataset_sha256(sr)}
    finally:
        forwarder.stop()
