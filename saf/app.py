"""The one ASGI app: health endpoints now; the FHIR API, DICOMweb and viewer mount here later."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Response
from sqlalchemy import text

from saf.hub import Hub


def create_app(hub: Hub) -> FastAPI:
    """The HTTP app for `hub` (the composition root mounts service routers on it)."""
    app = FastAPI(title="saf", version="0.1.0", docs_url=None, redoc_url=None)

    @app.get("/healthz", tags=["health"])
    def healthz(response: Response) -> dict[str, Any]:
        """Liveness and readiness: the index answers and the blob store is reachable."""
        checks: dict[str, str] = {}
        try:
            with hub.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            hub.blobs.check()
            checks["blob_store"] = "ok"
        except Exception as exc:
            checks["blob_store"] = f"error: {type(exc).__name__}"
        healthy = all(v == "ok" for v in checks.values())
        response.status_code = 200 if healthy else 503
        return {"status": "ok" if healthy else "degraded", "checks": checks}

    return app
