"""Fixtures for the browser tests: a real hub with the demo case served over HTTP by
uvicorn on a free port, and Debian's Chromium driven by Playwright (never downloaded)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from saf.app import create_app
from saf.demo import Demo, load_demo
from saf.hub import Hub
from saf.settings import Settings
from tests.conftest import IN_CI

CHROMIUM = os.environ.get("SAF_TEST_CHROMIUM", "/usr/bin/chromium")
"""Debian's Chromium (apt-get install chromium); .ci/run installs it."""

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    """A hub answering HTTP at `url`, with the demo clinic, case and users loaded."""

    hub: Hub
    url: str
    demo: Demo


@contextmanager
def serve(hub: Hub) -> Iterator[str]:
    """Serve `hub`'s app with uvicorn in a thread for the block; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(hub), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="e2e-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def demo_hub(data_dir: Path, *, slices: int = 24, size: int = 256) -> Iterator[Served]:
    """A demo-mode hub (SQLite, local blobs) with the routed demo case, served over HTTP."""
    settings = Settings(
        data_dir=data_dir, demo=True, dicom_host="127.0.0.1", dicom_port=0, auth_rate_burst=200
    )
    hub = Hub.open(settings, create=True)
    try:
        demo = load_demo(hub, slices=slices, size=size)
        with serve(hub) as url:
            yield Served(hub, url, demo)
    finally:
        hub.close()


def launch_chromium(playwright: Any) -> Any:
    """Debian's Chromium under Playwright; skips (fails under CI=true) when it is missing."""
    if not Path(CHROMIUM).exists():
        reason = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One demo hub for the module's tests."""
    with demo_hub(tmp_path_factory.mktemp("e2e") / "data") as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium for the module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        try:
            yield chromium
        finally:
            chromium.close()
