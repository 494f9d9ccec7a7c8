"""FastAPI dependencies every router shares: the hub, the caller (`CurrentPrincipal`), scopes.

A route says what it needs in its signature::

    @router.get("/cases/{case_id}")
    def read_case(case_id: str, principal: CurrentPrincipal, hub: HubDep) -> ...

    @router.post("/things", dependencies=[Depends(require_scope("Task", "c"))])

The caller is found from ``Authorization: Bearer <token>`` or, for the viewer, the
HttpOnly session cookie (`SESSION_COOKIE`). Failures answer 401 with a
``WWW-Authenticate: Bearer error="..."`` header and an OAuth-style JSON body
(``{"error": ..., "error_description": ...}``, via `auth_error_handler`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Annotated, Final

from fastapi import Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from saf import audit
from saf.hub import Hub
from saf.identity import INTERACTIONS, Principal, allows
from saf.tokens import TokenError, verify_access_token

SESSION_COOKIE: Final = "saf_session"
"""The viewer's session cookie: an access token, HttpOnly, SameSite=Strict."""

_UNSAFE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class AuthError(HTTPException):
    """A refused request: 401 (no or bad credentials) or 403 (insufficient scope)."""

    def __init__(
        self, status_code: int, error: str, description: str, *, scope: str | None = None
    ) -> None:
        quoted = description.replace('"', "'").replace("\n", " ")
        challenge = f'Bearer error="{error}", error_description="{quoted}"'
        if scope:
            challenge += f', scope="{scope}"'
        if error == "missing_token":
            # RFC 6750 §3.1: a request without credentials gets a bare challenge.
            challenge = 'Bearer realm="saf"'
        super().__init__(status_code, description, headers={"WWW-Authenticate": challenge})
        self.error = error
        self.description = description


def auth_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """Render an AuthError as ``{"error": ..., "error_description": ...}``."""
    assert isinstance(exc, AuthError)
    return JSONResponse(
        {"error": exc.error, "error_description": exc.description},
        status_code=exc.status_code,
        headers=exc.headers,
    )


def hub_of(request: Request) -> Hub:
    """The hub the app was built for (`create_app` puts it on ``app.state.hub``)."""
    hub: Hub = request.app.state.hub
    return hub


async def get_hub(request: Request) -> Hub:
    """`hub_of` as a dependency. Async: it does no I/O, and a sync dependency would cost a
    trip through the thread pool."""
    return hub_of(request)


HubDep = Annotated[Hub, Depends(get_hub)]


def client_address(request: Request) -> str:
    """The caller's address (uvicorn resolves X-Forwarded-For from trusted proxies)."""
    return request.client.host if request.client else ""


def bearer_token(request: Request) -> str | None:
    """The token from the Authorization header, or None when there is no Bearer header."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "invalid_request", "Authorization must be 'Bearer <token>'")
    return token.strip()


def current_principal(request: Request, hub: HubDep) -> Principal:
    """The authenticated caller, with `address` set; 401 when there is none or it is bad."""
    address = client_address(request)
    token = bearer_token(request)
    from_cookie = False
    if token is None:
        token = request.cookies.get(SESSION_COOKIE)
        from_cookie = token is not None
    if not token:
        raise AuthError(401, "missing_token", "authentication required")
    if from_cookie and request.method in _UNSAFE_METHODS:
        _check_same_origin(request)
    try:
        principal = verify_access_token(hub, token)
    except TokenError as exc:
        # A presented but refused credential is an authentication failure worth a record;
        # requests with no credential at all are not recorded (they reach nothing).
        audit.record(
            hub,
            "token",
            audit.Actor("anonymous", None, None, address or None),
            outcome=audit.MINOR_FAILURE,
            detail=f"access token refused at {request.url.path[:128]}: {exc.description}",
        )
        raise AuthError(401, exc.error, exc.description) from None
    return replace(principal, address=address)


AUTHENTICATES: Final = "saf_authenticates"
"""Attribute of an `authenticated_endpoint`: it names `current_principal`, which the
endpoint calls itself (tests/saf/test_routes_protected.py accepts such a route, then
attacks it like any other)."""


def authenticated_endpoint(
    handler: Callable[[Request, Principal, Hub], Response],
    on_error: Callable[[Exception], Response],
) -> Callable[[Request], Awaitable[Response]]:
    """A plain Starlette endpoint for a hot route outside FastAPI's dependency injection
    (fhir_api.lean): in one trip through the thread pool, and on one pooled database
    connection (saf.audit.one_connection), it finds the caller with `current_principal`
    and calls `handler`; any exception, a refused caller's AuthError included, becomes
    ``on_error(exc)``."""

    def answer(request: Request) -> Response:
        hub = hub_of(request)
        try:
            with audit.one_connection(hub.engine):
                return handler(request, current_principal(request, hub), hub)
        except Exception as exc:
            return on_error(exc)

    async def endpoint(request: Request) -> Response:
        return await run_in_threadpool(answer, request)

    setattr(endpoint, AUTHENTICATES, current_principal)
    return endpoint


def _check_same_origin(request: Request) -> None:
    """Cookie-authenticated writes must come from our own pages (SameSite=Strict already
    stops most cross-site requests; this also covers browsers that ignore it)."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    expected = f"{request.url.scheme}://{request.url.netloc}"
    if origin != expected:
        raise AuthError(403, "invalid_request", "cross-origin request refused")


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
"""The authenticated caller of a route."""


_INTERACTION_EVENTS: Final = {
    "c": "create",
    "r": "read",
    "u": "update",
    "d": "delete",
    "s": "search",
}
"""The audit event a refused interaction is recorded as."""


def require_scope(resource_type: str, interaction: str) -> Callable[..., Principal]:
    """A dependency that lets the caller through only when its role or SMART scopes allow
    `interaction` (c, r, u, d, s) on `resource_type`; else 403 ``insufficient_scope``.
    It returns the Principal, so it can stand in for `CurrentPrincipal`."""
    if interaction not in INTERACTIONS or len(interaction) != 1:
        raise ValueError(f"interaction must be one of c, r, u, d, s, got {interaction!r}")

    def check(principal: CurrentPrincipal, request: Request, hub: HubDep) -> Principal:
        if not allows(principal, resource_type, interaction):
            context = "system" if principal.kind == "client" else "user"
            audit.record(
                hub,
                _INTERACTION_EVENTS[interaction],
                principal,
                outcome=audit.MINOR_FAILURE,
                entity_type=resource_type,
                detail=f"insufficient scope at {request.url.path[:128]}",
            )
            raise AuthError(
                403,
                "insufficient_scope",
                f"this needs {context}/{resource_type}.{interaction}",
                scope=f"{context}/{resource_type}.{interaction}",
            )
        return principal

    return check
