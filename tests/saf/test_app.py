"""The HTTP app's health endpoint: 200 when index and blob store answer, else 503 and why."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from fastapi.testclient import TestClient

from saf.app import create_app
from saf.blobstore.local import LocalBlobStore
from saf.blobstore.s3 import S3BlobStore
from saf.db import make_engine
from saf.hub import Hub
from tests.interop.conftest import free_port


def _healthz(hub: Hub) -> tuple[int, dict[str, object]]:
    with TestClient(create_app(hub)) as client:
        response = client.get("/healthz")
    return response.status_code, response.json()


def test_healthz_ok(hub: Hub) -> None:
    status, body = _healthz(hub)

    assert status == 200, body
    assert body == {"status": "ok", "checks": {"database": "ok", "blob_store": "ok"}}


def test_healthz_degraded_when_database_is_down(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nobody listens on this port: the connection is refused at once.
    down = make_engine(f"postgresql://saf@127.0.0.1:{free_port()}/saf")
    monkeypatch.setattr(hub, "engine", down)

    status, body = _healthz(hub)

    assert status == 503, body
    assert body["status"] == "degraded"
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert checks["blob_store"] == "ok"
    assert str(checks["database"]).startswith("error: ")


def test_healthz_degraded_when_blob_store_is_unreachable(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",  # nobody listens there
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=2),
    )
    monkeypatch.setattr(hub, "blobs", S3BlobStore("saf-health", client=client))

    status, body = _healthz(hub)

    assert status == 503, body
    assert body == {
        "status": "degraded",
        "checks": {"database": "ok", "blob_store": "error: EndpointConnectionError"},
    }


def test_healthz_degraded_when_local_blob_root_is_unusable(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    occupied = tmp_path / "occupied"
    occupied.write_text("a file where the blob directory should be")
    monkeypatch.setattr(hub, "blobs", LocalBlobStore(occupied))

    status, body = _healthz(hub)

    assert status == 503, body


def test_healthz_degraded_when_bucket_is_missing(
    hub: Hub, moto_s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = S3BlobStore("saf-no-such-bucket", endpoint_url=moto_s3_endpoint)
    monkeypatch.setattr(hub, "blobs", store)

    status, body = _healthz(hub)

    assert status == 503, body
    assert str(body["checks"]["blob_store"]).startswith("error: ")  # type: ignore[index]
