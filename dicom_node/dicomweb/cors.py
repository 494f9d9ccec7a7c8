"""CORS for /dicomweb, so browser viewers (OHIF) on another origin can call it."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from dicom_node.dicomweb.common import PREFIX

# --------------------------------------------------------------------------- CORS


class DicomwebCORS:
    """CORS for /dicomweb only (OHIF and other browser viewers), other paths untouched."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self._app = app
        self._cors = CORSMiddleware(
            app,
            allow_origins=list(origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            expose_headers=["Content-Type", "Content-Encoding", "Warning"],
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] == "http" and (path == PREFIX or path.startswith(PREFIX + "/")):
            await self._cors(scope, receive, send)
        else:
            await self._app(scope, receive, send)


def cors_origins(setting: str) -> list[str]:
    """The origins of SAF_CORS_ORIGINS (comma-separated; empty for none)."""
    return [o.strip().rstrip("/") for o in setting.split(",") if o.strip()]
