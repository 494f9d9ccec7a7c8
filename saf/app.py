"""The one ASGI app: health endpoints now; the FHIR API, DICOMweb and viewer mount here later."""

from __future__ import annotations

from typing import Any, Final

from fastapi import FastAPI, Response
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException

from saf import api_http, auth_http, forward_http
from saf.deps import AuthError, auth_error_handler
from saf.hub import Hub

PUBLIC_PATHS: Final = frozenset(
    {
        "/healthz",
        auth_http.TOKEN_PATH,
        auth_http.SESSION_PATH,
        auth_http.JWKS_PATH,
        auth_http.SMART_CONFIGURATION_PATH,
        "/fhir/metadata",  # the CapabilityStatement holds no data (fhir_api.routes)
        "/login",  # the viewer's login form and its "/" redirect hold no data (viewer.pages)
        "/",
    }
)
"""Route paths reachable without a token; every other route must depend on CurrentPrincipal
(tests/saf/test_routes_protected.py walks the routes and fails on any that does not)."""


def create_app(hub: Hub) -> FastAPI:
    """The HTTP app for `hub` (the composition root mounts service routers on it)."""
    # No anonymous API map either (openapi_url=None): every route but PUBLIC_PATHS needs a token.
    app = FastAPI(title="saf", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    app.add_middleware(auth_http.SecurityHeadersMiddleware)
    app.add_exception_handler(AuthError, auth_error_handler)
    app.include_router(auth_http.router)
    app.include_router(api_http.router)
    app.include_router(forward_http.router)
    from fhir_api.outcome import unmatched_path_handler
    from fhir_api.routes import router as fhir_router  # the composition root mounts it

    app.include_router(fhir_router)
    from fhir_api import lean

    # First of all routes: a read would otherwise be matched against every route above.
    app.router.routes[0:0] = lean.routes
    app.add_exception_handler(StarletteHTTPException, unmatched_path_handler)
    # Imported here, not at module level: saf must not depend on dicom_node at import time.
    from dicom_node import dicomweb

    app.include_router(dicomweb.router)
    from viewer import api as viewer_api
    from viewer import pages as viewer_pages

    app.include_router(viewer_api.router)
    app.include_router(viewer_pages.router)
    app.mount("/static", viewer_pages.static_files(), name="static")  # JS/CSS, no PHI
    if origins := dicomweb.cors_origins(hub.settings.cors_origins):
        app.add_middleware(dicomweb.DicomwebCORS, origins=origins)

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


def app_from_environment() -> FastAPI:
    """The app for the hub the SAF_* variables describe: the factory each worker process
    of ``saf api --workers N`` calls (see saf.cli)."""
    from saf.settings import Settings

    return create_app(Hub.open(Settings()))
