"""kill -9 of `saf dicom` in the middle of a study: nothing acknowledged is lost, nothing corrupt.

A pynetdicom SCU sends a study on one association and records every instance the node
acknowledged (status 0x0000). The node is killed with SIGKILL part-way, restarted on the
same data dir, and the study exported: every acknowledged instance must be there, byte
for byte; instances never acknowledged may or may not be. A resend then completes it.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.factories import dataset_sha256, make_study, sop_instance_uid
from tests.interop.conftest import SafProcess, new_saf_node

pytestmark = [pytest.mark.slow, pytest.mark.interop]

INSTANCES = 150
"""Instances in the study (128x128 CT, ~34 kB each)."""

KILL_AFTER = 40
"""Acknowledgements to wait for before the SIGKILL."""

WAIT = 60.0
"""Seconds any one step may take before the test gives up."""

DEAD_PEER_TIMEOUT = 3.0
"""DIMSE timeout of the association whose node gets killed: pynetdicom notices a dead peer
only when waiting for the C-STORE response times out (each C-STORE takes ~10 ms)."""


@pytest.fixture(autouse=True)
def send_raw_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send files byte for byte (no decode and re-encode by the SCU)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


class StudySender(threading.Thread):
    """Sends files over one association, recording those acknowledged with status 0x0000."""

    def __init__(
        self, port: int, paths: list[Path], notify_after: int | None, timeout: float
    ) -> None:
        super().__init__(name="test-scu", daemon=True)
        self.port = port
        self.paths = paths
        self.notify_after = notify_after
        self.timeout = timeout
        self.acked: list[Path] = []
        self.reached = threading.Event()
        """Set once `notify_after` acknowledgements arrived, or when sending ends."""
        self.error: BaseException | None = None

    def run(self) -> None:
        ae = AE(ae_title="MODALITY_A")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        assoc = None
        try:
            assoc = ae.associate("127.0.0.1", self.port, ae_title="SAF")
            if assoc.is_established:
                # Without it every C-STORE stalls ~40 ms on Nagle + delayed ACK (as dcmtk_env).
                assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for path in self.paths:
                if not assoc.is_established:
                    break  # the node went away
                status = assoc.send_c_store(path)
                if status and status.get("Status") == 0x0000:
                    self.acked.append(path)
                    if len(self.acked) == self.notify_after:
                        self.reached.set()
        except Exception as exc:  # the node dying under a send may surface as an error
            self.error = exc
        finally:
            self.reached.set()
            if assoc is not None and assoc.is_established:
                assoc.release()
            ae.shutdown()


def _send(
    port: int, paths: list[Path], notify_after: int | None = None, timeout: float = WAIT
) -> StudySender:
    sender = StudySender(port, paths, notify_after, timeout)
    sender.start()
    return sender


def _export(node: SafProcess, study_uid: str, out: Path) -> dict[str, str]:
    """SOP Instance UID -> dataset sha256 of every file `saf export` wrote."""
    node.saf("export", "--study", study_uid, "--out", str(out))
    return {sop_instance_uid(p): dataset_sha256(p) for p in out.rglob("*.dcm")}


def test_sigkill_mid_study_loses_nothing_acknowledged(tmp_path: Path) -> None:
    sent = make_study(tmp_path / "sent", "ct", count=INSTANCES, size=128, seed=31)
    source = {sop_instance_uid(p): dataset_sha256(p) for p in sent}
    study_uid = str(dcmread(sent[0], stop_before_pixels=True).StudyInstanceUID)
    node = new_saf_node(tmp_path)
    try:
        node.start()
        sender = _send(node.port, sent, KILL_AFTER, timeout=DEAD_PEER_TIMEOUT)
        assert sender.reached.wait(WAIT), "no acknowledgements from the node"
        node.kill()
        node.start()  # while the SCU is still finding out that its peer died
        sender.join(WAIT)
        assert not sender.is_alive(), "the SCU did not notice the node dying"
        acked = {sop_instance_uid(p) for p in sender.acked}
        assert len(acked) >= KILL_AFTER, f"only {len(acked)} acknowledged: {sender.error!r}"
        assert len(acked) < INSTANCES, "the whole study went through before the kill"

        exported = _export(node, study_uid, tmp_path / "after-kill")

        missing = acked - set(exported)
        assert not missing, f"{len(missing)} acknowledged instance(s) lost by the kill"
        corrupt = [uid for uid, digest in exported.items() if source.get(uid) != digest]
        assert not corrupt, f"exported instances differ from what was sent: {corrupt}"
        stats = json.loads(node.saf("stats").stdout)
        assert stats["instances"] == len(exported), stats

        resend = _send(node.port, sent)
        resend.join(WAIT)
        assert not resend.is_alive() and resend.error is None, resend.error
        assert len(resend.acked) == INSTANCES
        leftovers = list((node.data_dir / "spool").iterdir())
        assert not leftovers, f"plaintext spool files left after the crash: {leftovers}"

        assert _export(node, study_uid, tmp_path / "after-resend") == source
    finally:
        node.stop()
