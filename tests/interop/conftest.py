"""Fixtures for tests with real third-party tools: a `saf dicom` process and dcmtk."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import IN_CI


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def dcmtk() -> None:
    """Skip (fail under CI=true) when dcmtk's tools are not installed."""
    if shutil.which("storescu") is None or shutil.which("echoscu") is None:
        reason = "dcmtk is not installed (apt-get install dcmtk)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk tools: TCP_NODELAY avoids Nagle's 40 ms stall per message."""
    return {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class SafProcess:
    """A `saf dicom` process on its own data dir."""

    data_dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    """SAF_* settings for this hub, on top of the test's environment."""

    def saf(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a `saf` command against this data dir."""
        return subprocess.run(
            [sys.executable, "-m", "saf", "--data-dir", str(self.data_dir), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
            env={**os.environ, **self.env},
        )

    def start(self) -> None:
        """Start the node and wait until it answers on its port."""
        log = (self.data_dir.parent / "node.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "saf",
                "--data-dir",
                str(self.data_dir),
                "--dicom-port",
                str(self.port),
                "dicom",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + 30
        port = int(self.env.get("SAF_DICOM_TLS_PORT", self.port))  # the last one to open
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"saf dicom exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("saf dicom did not start listening within 30 s")

    def kill(self) -> None:
        """SIGKILL: no clean-up, no flush, as a power cut would do to the process."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        """Terminate politely."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def new_saf_node(root: Path) -> SafProcess:
    """An initialised hub under `root` with clinic 'Clinic A' (AE MODALITY_A), not started."""
    node = SafProcess(root / "data", free_port())
    node.saf("init")
    node.saf("clinic", "add", "Clinic A", "--aet", "MODALITY_A")
    return node


@pytest.fixture(scope="module")
def saf_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SafProcess]:
    """A running `saf dicom` shared by a test module (tests use distinct studies)."""
    node = new_saf_node(tmp_path_factory.mktemp("saf"))
    node.start()
    try:
        yield node
    finally:
        node.stop()
