"""OperationOutcome errors: every 4xx/5xx under /fhir answers with one.

Routes raise `FhirError`; `FhirRoute` (the route class of the FHIR router) turns it, the
store's errors, the hub's 401/403 (saf.deps.AuthError, keeping its WWW-Authenticate
challenge), FastAPI's own HTTP and validation errors, and anything unexpected (500,
logged, no detail leaked) into an OperationOutcome with ``diagnostics`` and, where there
is one, the FHIRPath ``expression`` of the problem.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from saf.deps import AuthError
from saf.fhir_store import StoreError

log = logging.getLogger(__name__)

FHIR_JSON: Final = "application/fhir+json"
"""The one media type served (FHIR R4 JSON)."""

_CODE_OF_STATUS: Final = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "processing",
}


_ACCEPTED: Final = ("application/fhir+json", "application/json", "json", "*/*", "application/*")


def check_format(request: Request) -> None:
    """FHIR JSON only: XML (or anything else) asked for by Accept or _format is 406."""
    wanted = request.query_params.get("_format") or request.headers.get("accept") or "*/*"
    kinds = [part.split(";")[0].strip().lower() for part in wanted.split(",")]
    if not any(kind in _ACCEPTED for kind in kinds):
        raise FhirError(406, f"cannot answer in {wanted!r}; this server speaks {FHIR_JSON}")


BODY_TYPES: Final = (FHIR_JSON, "application/json")
"""Content-Types of a FHIR JSON request body."""

JSON_PATCH: Final = "application/json-patch+json"
"""Content-Type of a JSON Patch (RFC 6902) body (the FHIR patch interaction)."""


def check_content_type(request: Request, accepted: tuple[str, ...] = BODY_TYPES) -> str:
    """The request's media type when it is one of `accepted`; 415 otherwise."""
    kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if kind not in accepted:
        raise FhirError(415, f"Content-Type must be {accepted[0]}, not {kind or 'missing'!r}")
    return kind


def if_match(request: Request) -> int | None:
    """The version an ``If-Match: W/"<n>"`` header names; None without the header (the
    write is then unconditional, as HAPI FHIR does); 400 for anything but a version ETag."""
    header = request.headers.get("if-match")
    if header is None:
        return None
    text = header.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise FhirError(400, f'If-Match must be an ETag such as W/"3", not {header!r}')
    return int(text)


class FhirError(Exception):
    """A refused request: HTTP status, FHIR issue type, diagnostics and locations."""

    def __init__(
        self,
        status: int,
        diagnostics: str,
        *,
        code: str | None = None,
        expression: list[str] | None = None,
        issues: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.issues = issues or [
            issue(code or _CODE_OF_STATUS.get(status, "processing"), diagnostics, expression)
        ]
        self.headers = headers or {}


def issue(
    code: str, diagnostics: str, expression: list[str] | None = None, severity: str = "error"
) -> dict[str, Any]:
    """One OperationOutcome.issue."""
    found: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        found["expression"] = expression
    return found


def operation_outcome(issues: list[dict[str, Any]]) -> dict[str, Any]:
    """An OperationOutcome resource holding `issues`."""
    return {"resourceType": "OperationOutcome", "issue": issues}


def fhir_json(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A FHIR JSON response."""
    return JSONResponse(body, status_code=status, headers=headers, media_type=FHIR_JSON)


def error_response(exc: Exception) -> Response:
    """The OperationOutcome response for any exception a FHIR route raised."""
    if isinstance(exc, FhirError):
        return fhir_json(operation_outcome(exc.issues), exc.status, exc.headers)
    if isinstance(exc, StoreError):
        expression = [exc.expression] if exc.expression else None
        body = operation_outcome([issue(exc.code, exc.diagnostics, expression)])
        return fhir_json(body, exc.status)
    if isinstance(exc, AuthError):
        code = "login" if exc.status_code == 401 else "forbidden"
        body = operation_outcome([issue(code, f"{exc.error}: {exc.description}")])
        return fhir_json(body, exc.status_code, dict(exc.headers or {}))
    if isinstance(exc, HTTPException):
        code = _CODE_OF_STATUS.get(exc.status_code, "processing")
        body = operation_outcome([issue(code, str(exc.detail))])
        return fhir_json(body, exc.status_code, dict(exc.headers or {}))
    if isinstance(exc, RequestValidationError):
        issues = [
            issue("invalid", str(e.get("msg")), [".".join(str(p) for p in e.get("loc", ()))])
            for e in exc.errors()
        ]
        return fhir_json(operation_outcome(issues), 400)
    log.exception("FHIR request failed")
    body = operation_outcome([issue("exception", "internal error; the hub log has the details")])
    return fhir_json(body, 500)


class FhirRoute(APIRoute):
    """An APIRoute whose every error is an OperationOutcome."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return error_response(exc)

        return handle


async def unmatched_path_handler(request: Request, exc: Exception) -> Response:
    """An HTTP error raised outside any route (no route matches, method not allowed):
    an OperationOutcome under /fhir, FastAPI's usual answer elsewhere."""
    from fastapi.exception_handlers import http_exception_handler

    if request.url.path == "/fhir" or request.url.path.startswith("/fhir/"):
        return error_response(exc)
    assert isinstance(exc, HTTPException)
    return await http_exception_handler(request, exc)
