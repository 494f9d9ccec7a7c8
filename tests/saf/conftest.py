"""Fixtures for the saf core tests: an S3 endpoint served by moto over real HTTP."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer


@pytest.fixture(scope="session")
def moto_s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1 (free port), with dummy AWS credentials set."""
    with pytest.MonkeyPatch.context() as mp:
        # Dummy credentials in the environment win over any real ones in
        # ~/.aws; a stray profile or session token must not leak into tests.
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        # A proxy configured for the outside world must not see local test traffic.
        for name in ("NO_PROXY", "no_proxy"):
            mp.setenv(name, ",".join(filter(None, ["127.0.0.1", os.environ.get(name)])))

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()
