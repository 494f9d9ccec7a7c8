"""HTTP doors for logging in: the OAuth token endpoint, SMART discovery, the hub's JWKS, the
viewer's session cookie; plus the security headers and the login rate limit.

- ``POST /auth/token`` (form-encoded, RFC 6749): ``password`` for people and scripts,
  ``client_credentials`` with a SMART Backend Services JWT assertion for EHR systems,
  ``refresh_token`` for people. Errors follow RFC 6749 §5.2.
- ``GET /.well-known/smart-configuration`` and ``GET /auth/jwks``.
- ``POST /auth/session`` / ``DELETE /auth/session``: the viewer's HttpOnly cookie;
  ``POST /auth/session/renew`` re-issues it while it is still valid.

Every attempt, success or failure, writes an audit record (never the password).

Rate limit: each client address has a token bucket of `auth_rate_burst` attempts (default
20) refilled at `auth_rate_per_minute` (default 10/min), shared by the token and session
endpoints, in this process (several processes each keep their own; a proxy in front can
add a global limit). Over the limit: 429 with ``Retry-After``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from saf import audit
from saf.deps import SESSION_COOKIE, AuthError, CurrentPrincipal, HubDep, client_address
from saf.hub import Hub
from saf.identity import Principal, grantable, grantable_to, role_scopes
from saf.tokens import (
    TokenError,
    issue_access_token,
    issue_refresh_token,
    jwks,
    revoke_access_token,
    use_refresh_token,
    verify_client_assertion,
)
from saf.users import CLIENT_ASSERTION_ALGORITHMS, verify_login

TOKEN_PATH: Final = "/auth/token"
SESSION_PATH: Final = "/auth/session"
SESSION_RENEW_PATH: Final = "/auth/session/renew"
JWKS_PATH: Final = "/auth/jwks"
SMART_CONFIGURATION_PATH: Final = "/.well-known/smart-configuration"
ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

router = APIRouter(tags=["auth"])


class OAuthError(AuthError):
    """An RFC 6749 §5.2 error response from the token endpoint."""

    def __init__(self, error: str, description: str, status_code: int = 400) -> None:
        super().__init__(status_code, error, description)
        if status_code != 401:
            self.headers = {}


# --- rate limit -------------------------------------------------------------------------


class RateLimiter:
    """Token buckets per client address; bounded in memory (oldest addresses forgotten)."""

    def __init__(self, per_minute: float, burst: int, max_addresses: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, address: str, now: float | None = None) -> float:
        """Spend one attempt for `address`: 0 if allowed, else seconds until the next one."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(address, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[address] = (tokens, now)
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
            return wait


_limiter_lock = threading.Lock()


def rate_limited(request: Request, hub: HubDep) -> None:
    """Refuse with 429 when this address has used up its login attempts."""
    state = request.app.state
    with _limiter_lock:
        limiter = getattr(state, "auth_rate_limiter", None)
        if limiter is None:
            limiter = RateLimiter(hub.settings.auth_rate_per_minute, hub.settings.auth_rate_burst)
            state.auth_rate_limiter = limiter
    wait = limiter.take(client_address(request))
    if wait > 0:
        error = OAuthError("too_many_requests", "too many attempts; retry later", 429)
        error.headers = {"Retry-After": str(math.ceil(wait))}
        raise error


RateLimited = Depends(rate_limited)


# --- token endpoint ---------------------------------------------------------------------

FormField = Annotated[str | None, Form()]


def token_urls(request: Request, hub: Hub) -> list[str]:
    """The token URL client assertions must name as `aud`: <SAF_PUBLIC_URL>/auth/token, or,
    without that setting, the URL this request came to."""
    if hub.settings.public_url:
        return [hub.settings.public_url + TOKEN_PATH]
    return [f"{request.url.scheme}://{request.url.netloc}{TOKEN_PATH}"]


def _token_response(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def _requested_scopes(scope: str | None) -> frozenset[str] | None:
    return frozenset(scope.split()) if scope and scope.strip() else None


def _person_tokens(hub: Hub, principal: Principal, scopes: frozenset[str]) -> dict[str, Any]:
    access = issue_access_token(hub, principal, scopes)
    refresh = issue_refresh_token(hub, principal, scopes)
    return {
        "access_token": access.token,
        "token_type": "Bearer",
        "expires_in": access.expires_in,
        "scope": access.scope,
        "refresh_token": refresh.token,
    }


def _person_scopes(principal: Principal, requested: frozenset[str] | None) -> frozenset[str]:
    if requested is None:
        return role_scopes(principal.role)
    granted = grantable_to(principal, requested)
    if not granted:
        raise OAuthError(
            "invalid_scope", f"none of the requested scopes is open to a {principal.role}"
        )
    return granted


def _login(
    hub: Hub, event: str, username: str | None, password: str | None, address: str
) -> Principal:
    """Check a person's credentials and record the attempt; OAuthError when refused."""
    if not username or password is None:
        audit.record(
            hub,
            event,
            audit.Actor("anonymous", None, None, address or None),
            outcome=audit.MINOR_FAILURE,
            detail="username or password missing",
        )
        raise OAuthError("invalid_request", "username and password are required")
    attempt = verify_login(hub, username, password)
    if attempt.principal is None:
        # An unknown name is not recorded: people type passwords into the username field.
        name = username if attempt.user_id else None
        actor = audit.Actor(
            "user" if attempt.user_id else "anonymous", attempt.user_id, name, address or None
        )
        audit.record(hub, event, actor, outcome=audit.MINOR_FAILURE, detail=attempt.reason)
        raise OAuthError("invalid_grant", "wrong username or password, or account disabled")
    principal = replace(attempt.principal, address=address)
    audit.record(hub, event, principal, clinic_id=principal.clinic_id, detail="ok")
    return principal


@router.post(TOKEN_PATH, dependencies=[RateLimited])
def token(
    request: Request,
    hub: HubDep,
    grant_type: FormField = None,
    username: FormField = None,
    password: FormField = None,
    scope: FormField = None,
    client_assertion_type: FormField = None,
    client_assertion: FormField = None,
    refresh_token: FormField = None,
) -> JSONResponse:
    """OAuth 2.0 token endpoint: password, client_credentials (SMART Backend Services) and
    refresh_token grants."""
    address = client_address(request)
    requested = _requested_scopes(scope)
    if grant_type == "password":
        principal = _login(hub, "login", username, password, address)
        return _token_response(_person_tokens(hub, principal, _person_scopes(principal, requested)))
    if grant_type == "client_credentials":
        return _token_response(
            _client_credentials(hub, request, client_assertion_type, client_assertion, requested)
        )
    if grant_type == "refresh_token":
        return _token_response(_refresh(hub, refresh_token, requested, address))
    anonymous = audit.Actor("anonymous", None, None, address or None)
    audit.record(
        hub,
        "token",
        anonymous,
        outcome=audit.MINOR_FAILURE,
        detail=f"unsupported grant_type {str(grant_type)[:40]}",
    )
    if not grant_type:
        raise OAuthError("invalid_request", "grant_type is required (form-encoded body)")
    raise OAuthError(
        "unsupported_grant_type",
        "grant_type must be password, client_credentials or refresh_token",
    )


def _client_credentials(
    hub: Hub,
    request: Request,
    assertion_type: str | None,
    assertion: str | None,
    requested: frozenset[str] | None,
) -> dict[str, Any]:
    address = client_address(request)
    anonymous = audit.Actor("client", None, None, address or None)
    if assertion_type != ASSERTION_TYPE or not assertion:
        audit.record(
            hub, "token", anonymous, outcome=audit.MINOR_FAILURE, detail="client assertion missing"
        )
        raise OAuthError(
            "invalid_request",
            f"client_credentials needs client_assertion_type={ASSERTION_TYPE} and a "
            "client_assertion",
        )
    try:
        client = verify_client_assertion(hub, assertion, token_urls(request, hub))
    except TokenError as exc:
        audit.record(hub, "token", anonymous, outcome=audit.MINOR_FAILURE, detail=exc.description)
        raise OAuthError(exc.error, exc.description, 401) from None
    client = replace(client, address=address)
    granted = client.scopes if requested is None else grantable(requested, client.scopes)
    if not granted:
        audit.record(
            hub,
            "token",
            client,
            outcome=audit.MINOR_FAILURE,
            clinic_id=client.clinic_id,
            detail="no requested scope is registered",
        )
        raise OAuthError(
            "invalid_scope",
            "none of the requested scopes is registered for this client "
            f"(registered: {' '.join(sorted(client.scopes))})",
        )
    access = issue_access_token(hub, client, granted)
    audit.record(
        hub,
        "token",
        client,
        clinic_id=client.clinic_id,
        detail=f"client_credentials scope={access.scope}"[:256],
    )
    return {
        "access_token": access.token,
        "token_type": "Bearer",
        "expires_in": access.expires_in,
        "scope": access.scope,
    }


def _refresh(
    hub: Hub, refresh_token: str | None, requested: frozenset[str] | None, address: str
) -> dict[str, Any]:
    anonymous = audit.Actor("anonymous", None, None, address or None)
    if not refresh_token:
        audit.record(
            hub, "token", anonymous, outcome=audit.MINOR_FAILURE, detail="refresh_token missing"
        )
        raise OAuthError("invalid_request", "refresh_token is required")
    try:
        principal, scopes = use_refresh_token(hub, refresh_token)
    except TokenError as exc:
        audit.record(
            hub,
            "token",
            anonymous,
            outcome=audit.MINOR_FAILURE,
            detail=f"refresh: {exc.description}",
        )
        raise OAuthError(exc.error, exc.description) from None
    principal = replace(principal, address=address)
    if requested is not None:
        # RFC 6749 §6: a refresh may narrow the scopes, never widen them.
        scopes = grantable(requested, scopes)
        if not scopes:
            audit.record(
                hub,
                "token",
                principal,
                outcome=audit.MINOR_FAILURE,
                detail="refresh: scope wider than granted",
            )
            raise OAuthError("invalid_scope", "a refresh cannot add scopes")
    audit.record(hub, "token", principal, clinic_id=principal.clinic_id, detail="refresh")
    return _person_tokens(hub, principal, scopes)


# --- discovery and keys -----------------------------------------------------------------


@router.get(SMART_CONFIGURATION_PATH)
def smart_configuration(request: Request, hub: HubDep) -> dict[str, Any]:
    """SMART App Launch discovery (what a Backend Services client needs to find us)."""
    base = hub.settings.public_url or f"{request.url.scheme}://{request.url.netloc}"
    return {
        "issuer": base,
        "jwks_uri": base + JWKS_PATH,
        "token_endpoint": base + TOKEN_PATH,
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(CLIENT_ASSERTION_ALGORITHMS),
        "grant_types_supported": ["client_credentials", "password", "refresh_token"],
        "scopes_supported": [
            "system/*.rs",
            "system/*.cruds",
            "system/*.read",
            "system/*.write",
            "user/*.rs",
            "user/*.cruds",
        ],
        "response_types_supported": ["token"],
        "capabilities": [
            "client-confidential-asymmetric",
            "permission-v1",
            "permission-v2",
            "permission-user",
        ],
    }


@router.get(JWKS_PATH)
def hub_jwks(hub: HubDep) -> JSONResponse:
    """The public keys the hub signs its access tokens with."""
    return JSONResponse(jwks(hub), headers={"Cache-Control": "public, max-age=300"})


# --- viewer session cookie --------------------------------------------------------------


def _check_origin(request: Request) -> None:
    """A login form posted from another site (login CSRF) is refused."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise OAuthError("invalid_request", "cross-origin login refused")


def _secure_cookie(request: Request, hub: Hub) -> bool:
    public = hub.settings.public_url or ""
    return request.url.scheme == "https" or public.startswith("https://")


@router.post(SESSION_PATH, status_code=204, dependencies=[RateLimited])
def create_session(
    request: Request, hub: HubDep, username: FormField = None, password: FormField = None
) -> Response:
    """Log a person in for the viewer: sets the HttpOnly session cookie (204)."""
    _check_origin(request)
    principal = _login(hub, "login", username, password, client_address(request))
    access = issue_access_token(hub, principal, role_scopes(principal.role))
    response = Response(status_code=204)
    response.set_cookie(
        SESSION_COOKIE,
        access.token,
        max_age=access.expires_in,
        path="/",
        secure=_secure_cookie(request, hub),
        httponly=True,
        samesite="strict",
    )
    return response


@router.post(SESSION_RENEW_PATH, status_code=204)
def renew_session(request: Request, hub: HubDep, principal: CurrentPrincipal) -> Response:
    """Re-issue the session cookie while the current token is still valid (204), so a
    person at work is not logged out when the access token's lifetime ends; the old
    session token is revoked. An expired or revoked token gets 401 like any other. A
    caller authenticated by a Bearer header has no session here (it renews with the
    refresh grant): 204 and nothing changes."""
    if principal.kind != "user":
        raise AuthError(403, "invalid_request", "only a person's session can be renewed")
    old = request.cookies.get(SESSION_COOKIE)
    if not old or request.headers.get("authorization") is not None:
        return Response(status_code=204)
    access = issue_access_token(hub, principal, role_scopes(principal.role))
    revoke_access_token(hub, old)
    audit.record(hub, "login", principal, clinic_id=principal.clinic_id, detail="session renewed")
    response = Response(status_code=204)
    response.set_cookie(
        SESSION_COOKIE,
        access.token,
        max_age=access.expires_in,
        path="/",
        secure=_secure_cookie(request, hub),
        httponly=True,
        samesite="strict",
    )
    return response


@router.delete(SESSION_PATH, status_code=204)
def delete_session(request: Request, hub: HubDep) -> Response:
    """Log out: the session token is revoked and the cookie cleared (204, even without one)."""
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        revoke_access_token(hub, token)
        anonymous = audit.Actor("anonymous", None, None, client_address(request) or None)
        audit.record(hub, "logout", anonymous, detail="session cookie revoked")
    response = Response(status_code=204)
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        secure=_secure_cookie(request, hub),
        httponly=True,
        samesite="strict",
    )
    return response


# --- security headers -------------------------------------------------------------------

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
"""No inline scripts or styles, nothing from other origins, never framed."""

STATIC_PREFIXES: Final = ("/static/",)
"""Paths of static assets (no PHI): these may be cached; everything else is no-store."""


class SecurityHeadersMiddleware:
    """Adds security headers to every HTTP response (a pure ASGI middleware, so streamed
    responses pass through untouched). A route that sets its own Cache-Control keeps it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = scope.get("scheme") == "https"
        static = str(scope.get("path", "")).startswith(STATIC_PREFIXES)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                wanted = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"cross-origin-resource-policy", b"same-origin"),
                ]
                if not static:
                    wanted.append((b"cache-control", b"no-store"))
                if https:
                    wanted.append((b"strict-transport-security", b"max-age=31536000"))
                headers.extend((k, v) for k, v in wanted if k not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
