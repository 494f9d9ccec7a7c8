"""Fixtures for worker tests: a private redis-server that a test may stop and start."""

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
from tests.interop.conftest import free_port


@dataclass
class RedisServer:
    """A redis-server process on a free port, with no persistence."""

    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private Redis the test controls (skipped, or failed under CI, without redis-server)."""
    if shutil.which("redis-server") is None:
        reason = "redis-server is not installed"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Worker:
    """A `saf worker` process with its log file."""

    env: dict[str, str]
    log_path: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        log = self.log_path.open("ab")
        argv = [sys.executable, "-m", "saf", "worker"]
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)

    def kill(self, index: int = -1) -> None:
        """SIGKILL one worker (the newest by default), as the OOM killer would."""
        self.procs[index].kill()
        self.procs[index].wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def worker_env(data_dir: Path, **saf: str) -> dict[str, str]:
    """Environment for a `saf worker` on `data_dir` (other SAF_* variables dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAF_")}
    env.update(SAF_DATA_DIR=str(data_dir), SAF_OUTBOX_POLL_INTERVAL="0.2", **saf)
    return env
