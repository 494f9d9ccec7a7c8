"""The login doors over real HTTP: the token endpoint's grants, discovery, the hub's JWKS, the
viewer session cookie, the rate limit, security headers and the audit trail of every attempt."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import httpx
import jwt
import pytest
from fastapi import Depends
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from saf.app import PUBLIC_PATHS, create_app
from saf.auth_http import ASSERTION_TYPE, RateLimiter
from saf.cli import app as cli_app
from saf.deps import SESSION_COOKIE, CurrentPrincipal, require_scope
from saf.hub import Hub
from saf.identity import Principal
from saf.models import AuditRecord, User
from saf.settings import Settings
from saf.tokens import revoke_access_token, rotate_signing_key
from saf.users import disable_user, revoke_client
from tests.factories import (
    TEST_PASSWORD,
    client_assertion,
    login_as,
    make_client,
    make_client_key,
    make_user,
)

TOKEN_URL = "http://testserver/auth/token"


@pytest.fixture
def client(hub: Hub) -> Iterator[TestClient]:
    """The real app over the hub, with a `/whoami` route behind CurrentPrincipal and one
    behind a scope, standing in for the PHI routers."""
    app = create_app(hub)

    @app.get("/whoami")
    def whoami(principal: CurrentPrincipal) -> dict[str, Any]:
        return {
            "id": principal.id,
            "kind": principal.kind,
            "role": principal.role,
            "clinic_id": principal.clinic_id,
            "scopes": sorted(principal.scopes),
            "address": principal.address,
        }

    @app.get("/tasks")
    def tasks(
        principal: Annotated[Principal, Depends(require_scope("Task", "s"))],
    ) -> dict[str, str]:
        return {"id": principal.id}

    with TestClient(app) as test_client:
        yield test_client


def _password(client: TestClient, username: str, password: str, **extra: str) -> Any:
    return client.post(
        "/auth/token",
        data={"grant_type": "password", "username": username, "password": password, **extra},
    )


def _credentials(client: TestClient, assertion: str, scope: str | None = "system/*.rs") -> Any:
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }
    if scope is not None:
        form["scope"] = scope
    return client.post("/auth/token", data=form)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _audit(hub: Hub, event: str) -> list[AuditRecord]:
    with hub.sessions() as session:
        return list(
            session.scalars(
                select(AuditRecord).where(AuditRecord.event == event).order_by(AuditRecord.id)
            )
        )


# --- people -------------------------------------------------------------------------------


def test_password_grant_and_the_token_it_gives(client: TestClient, hub: Hub) -> None:
    user = make_user(hub, "clinician", username="alice")

    response = _password(client, "alice", TEST_PASSWORD)

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert "user/*.rs" in body["scope"].split()
    assert body["refresh_token"]
    me = client.get("/whoami", headers=_bearer(body["access_token"]))
    assert me.status_code == 200, me.text
    assert me.json()["id"] == user.id
    assert me.json()["role"] == "clinician"
    assert me.json()["clinic_id"] is not None
    assert me.json()["address"] == "testclient"
    # Asking for fewer scopes narrows the token; asking for none of the role's is refused.
    narrow = _password(client, "alice", TEST_PASSWORD, scope="user/Task.rs")
    assert narrow.json()["scope"] == "user/Task.rs"
    wide = _password(client, "alice", TEST_PASSWORD, scope="user/AuditEvent.rs")
    assert wide.status_code == 400
    assert wide.json()["error"] == "invalid_scope"


def test_wrong_password_unknown_user_and_disabled_user_are_refused(
    client: TestClient, hub: Hub
) -> None:
    make_user(hub, "specialist", username="bob")
    good = _password(client, "bob", TEST_PASSWORD).json()["access_token"]
    assert client.get("/whoami", headers=_bearer(good)).status_code == 200

    wrong = _password(client, "bob", "not the password at all")
    unknown = _password(client, "nobody", TEST_PASSWORD)
    disable_user(hub, "bob")
    disabled = _password(client, "bob", TEST_PASSWORD)
    existing = client.get("/whoami", headers=_bearer(good))

    for response in (wrong, unknown, disabled):
        assert response.status_code == 400
        # The same answer whatever was wrong: it must not tell which usernames exist.
        assert response.json() == {
            "error": "invalid_grant",
            "error_description": "wrong username or password, or account disabled",
        }
    assert existing.status_code == 401
    assert existing.json()["error"] == "invalid_token"
    assert existing.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    logins = _audit(hub, "login")
    assert [(r.outcome, r.detail) for r in logins] == [
        (0, "ok"),
        (4, "wrong password"),
        (4, "unknown user"),
        (4, "disabled"),
    ]
    assert logins[1].actor_name == "bob"
    assert logins[2].actor_name is None  # an unknown name may be a mistyped password
    assert all(r.source_address == "testclient" for r in logins)
    assert all(TEST_PASSWORD not in (r.detail or "") for r in logins)
    refused = _audit(hub, "token")
    assert refused[-1].outcome == 4
    assert "/whoami" in (refused[-1].detail or "")


def test_refresh_grant_is_single_use_and_checks_the_user(client: TestClient, hub: Hub) -> None:
    make_user(hub, "clinician", username="carol")
    first = _password(client, "carol", TEST_PASSWORD).json()

    refreshed = client.post(
        "/auth/token", data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    replayed = client.post(
        "/auth/token", data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    as_access = client.get("/whoami", headers=_bearer(first["refresh_token"]))
    as_refresh = client.post(
        "/auth/token", data={"grant_type": "refresh_token", "refresh_token": first["access_token"]}
    )

    assert refreshed.status_code == 200, refreshed.text
    body = refreshed.json()
    assert body["refresh_token"] != first["refresh_token"]
    assert client.get("/whoami", headers=_bearer(body["access_token"])).status_code == 200
    assert replayed.status_code == 400
    assert replayed.json()["error"] == "invalid_grant"
    assert as_access.status_code == 401  # a refresh token is not an access token
    assert as_refresh.status_code == 400  # nor the other way round
    narrowed = client.post(
        "/auth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "scope": "user/Task.rs",
        },
    )
    assert narrowed.json()["scope"] == "user/Task.rs"
    disable_user(hub, "carol")
    after = client.post(
        "/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": narrowed.json()["refresh_token"]},
    )
    assert after.status_code == 400
    assert after.json()["error"] == "invalid_grant"


def test_session_cookie_login_and_logout(client: TestClient, hub: Hub) -> None:
    make_user(hub, "specialist", username="dora")

    bad = client.post("/auth/session", data={"username": "dora", "password": "wrong password!"})
    login = client.post("/auth/session", data={"username": "dora", "password": TEST_PASSWORD})

    assert bad.status_code == 400
    assert login.status_code == 204
    cookie = login.headers["set-cookie"]
    assert f"{SESSION_COOKIE}=" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # plain http in the test; https sets it
    token = client.cookies[SESSION_COOKIE]
    assert client.get("/whoami").json()["role"] == "specialist"

    logout = client.delete("/auth/session")

    assert logout.status_code == 204
    assert SESSION_COOKIE not in client.cookies
    # The token the cookie held is revoked, not just forgotten by the browser.
    client.cookies.set(SESSION_COOKIE, token)
    assert client.get("/whoami").status_code == 401
    assert [r.outcome for r in _audit(hub, "login")] == [4, 0]
    assert len(_audit(hub, "logout")) == 1
    cross_site = client.post(
        "/auth/session",
        data={"username": "dora", "password": TEST_PASSWORD},
        headers={"Origin": "https://evil.example"},
    )
    assert cross_site.status_code == 400


def test_session_cookie_is_secure_over_https(hub: Hub) -> None:
    make_user(hub, "admin", username="erin")
    with TestClient(create_app(hub), base_url="https://testserver") as client:
        login = client.post("/auth/session", data={"username": "erin", "password": TEST_PASSWORD})
        assert login.status_code == 204
        assert "Secure" in login.headers["set-cookie"]
        assert "max-age=31536000" in login.headers["strict-transport-security"]


def test_missing_and_malformed_credentials(client: TestClient) -> None:
    none = client.get("/whoami")
    basic = client.get("/whoami", headers={"Authorization": "Basic YWxpY2U6eA=="})
    garbage = client.get("/whoami", headers=_bearer("not-a-jwt"))

    assert none.status_code == 401
    assert none.headers["www-authenticate"] == 'Bearer realm="saf"'
    assert none.json()["error"] == "missing_token"
    assert basic.status_code == 401
    assert basic.json()["error"] == "invalid_request"
    assert garbage.status_code == 401
    assert garbage.json() == {
        "error": "invalid_token",
        "error_description": "the token is malformed, expired or not ours",
    }


def test_require_scope_refuses_with_403_and_records_it(client: TestClient, hub: Hub) -> None:
    clinician = login_as(client, "clinician")
    admin = login_as(client, "admin")

    assert client.get("/tasks", headers=clinician).status_code == 200
    refused = client.get("/tasks", headers=admin)

    assert refused.status_code == 403
    assert refused.json()["error"] == "insufficient_scope"
    assert 'scope="user/Task.s"' in refused.headers["www-authenticate"]
    record = _audit(hub, "search")[-1]
    assert (record.outcome, record.entity_type, record.actor_name) == (4, "Task", "admin-clinic-a")


# --- EHR clients (SMART Backend Services) ----------------------------------------------


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_client_credentials_grant(client: TestClient, hub: Hub, alg: str) -> None:
    info, key = make_client(
        hub, scopes=["system/*.rs", "system/DocumentReference.cruds"], key=make_client_key(alg)
    )

    response = _credentials(
        client, client_assertion(info.id, key), scope="system/DocumentReference.cud system/Task.rs"
    )

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "system/DocumentReference.cud system/Task.rs"
    assert "refresh_token" not in body
    me = client.get("/whoami", headers=_bearer(body["access_token"])).json()
    assert (me["kind"], me["id"], me["role"]) == ("client", info.id, "system")
    assert me["clinic_id"] is not None
    assert client.get("/tasks", headers=_bearer(body["access_token"])).status_code == 200
    # Without `scope` the client gets what it is registered for.
    whole = _credentials(client, client_assertion(info.id, key), scope=None).json()
    assert whole["scope"] == "system/*.rs system/DocumentReference.cruds"
    record = _audit(hub, "token")[-1]
    assert (record.outcome, record.actor_kind, record.actor_id) == (0, "client", info.id)


def test_client_assertions_that_must_be_refused(client: TestClient, hub: Hub) -> None:
    info, key = make_client(hub, key=make_client_key("ES384"))
    other, other_key = make_client(hub, "EHR B", key=make_client_key("RS384"))
    stranger = make_client_key("ES384", kid=key.kid)  # same kid, key never registered
    now = int(time.time())
    replayed = client_assertion(info.id, key, jti="once")
    assert _credentials(client, replayed).status_code == 200

    attempts = {
        "replayed jti": replayed,
        "expired": client_assertion(info.id, key, exp=now - 120),
        "exp more than 5 min ahead": client_assertion(info.id, key, lifetime=600),
        "no exp": client_assertion(info.id, key, exp=None),
        "no jti": client_assertion(info.id, key, jti=None),
        "unknown kid": client_assertion(info.id, make_client_key("ES384", kid="nope")),
        "key not registered": client_assertion(info.id, stranger),
        "another client's key": client_assertion(info.id, other_key),
        "wrong aud": client_assertion(info.id, key, aud="https://elsewhere.example/token"),
        "iss is not sub": client_assertion(info.id, key, sub=other.id),
        "unknown client": client_assertion("no-such-client", key),
        "HS256": jwt.encode(
            {"iss": info.id, "sub": info.id, "aud": TOKEN_URL, "exp": now + 60, "jti": "h"},
            "a-shared-secret-of-32-bytes-long!",
            algorithm="HS256",
            headers={"kid": key.kid},
        ),
        "alg none": jwt.encode(
            {"iss": info.id, "sub": info.id, "aud": TOKEN_URL, "exp": now + 60, "jti": "n"},
            "",
            algorithm="none",
            headers={"kid": key.kid},
        ),
        "RS256 (not RS384)": jwt.encode(
            {"iss": info.id, "sub": other.id, "aud": TOKEN_URL, "exp": now + 60, "jti": "r"},
            other_key.private_key,
            algorithm="RS256",
            headers={"kid": other_key.kid},
        ),
        "not a JWT": "not.a.jwt",
    }
    for why, assertion in attempts.items():
        response = _credentials(client, assertion)
        assert response.status_code == 401, f"{why}: {response.text}"
        assert response.json()["error"] == "invalid_client", why
        assert response.headers["cache-control"] == "no-store"

    revoke_client(hub, "EHR A")
    revoked = _credentials(client, client_assertion(info.id, key))
    assert revoked.status_code == 401
    assert revoked.json()["error"] == "invalid_client"
    failures = [r for r in _audit(hub, "token") if r.outcome == 4]
    assert len(failures) == len(attempts) + 1


def test_scope_not_registered_and_revocation_of_issued_tokens(client: TestClient, hub: Hub) -> None:
    info, key = make_client(hub, scopes=["system/ImagingStudy.rs"])

    refused = _credentials(client, client_assertion(info.id, key), scope="system/Patient.rs")
    wider = _credentials(client, client_assertion(info.id, key), scope="system/ImagingStudy.cruds")
    token = _credentials(client, client_assertion(info.id, key), scope="system/ImagingStudy.r")

    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_scope"
    assert wider.status_code == 400
    assert token.status_code == 200
    headers = _bearer(token.json()["access_token"])
    assert client.get("/tasks", headers=headers).status_code == 403  # Task not in its scopes
    assert client.get("/whoami", headers=headers).status_code == 200
    revoke_client(hub, info.name)
    assert client.get("/whoami", headers=headers).status_code == 401


def test_assertion_audience_is_the_public_url_when_set(settings: Settings) -> None:
    settings = settings.model_copy(update={"public_url": "https://hub.example.org"})
    hub = Hub.open(settings, create=True)
    try:
        info, key = make_client(hub)
        with TestClient(create_app(hub)) as client:
            local = _credentials(client, client_assertion(info.id, key, aud=TOKEN_URL))
            public = _credentials(
                client, client_assertion(info.id, key, aud="https://hub.example.org/auth/token")
            )
            config = client.get("/.well-known/smart-configuration").json()
        assert local.status_code == 401
        assert public.status_code == 200, public.text
        assert config["token_endpoint"] == "https://hub.example.org/auth/token"
    finally:
        hub.close()


# --- grant errors, discovery, keys, headers, rate limit ----------------------------------


def test_token_endpoint_request_errors(client: TestClient) -> None:
    no_grant = client.post("/auth/token", data={})
    json_body = client.post("/auth/token", json={"grant_type": "password"})
    unsupported = client.post("/auth/token", data={"grant_type": "authorization_code"})
    no_password = client.post("/auth/token", data={"grant_type": "password", "username": "x"})
    no_assertion = client.post("/auth/token", data={"grant_type": "client_credentials"})

    assert (no_grant.status_code, no_grant.json()["error"]) == (400, "invalid_request")
    assert (json_body.status_code, json_body.json()["error"]) == (400, "invalid_request")
    assert (unsupported.status_code, unsupported.json()["error"]) == (400, "unsupported_grant_type")
    assert (no_password.status_code, no_password.json()["error"]) == (400, "invalid_request")
    assert (no_assertion.status_code, no_assertion.json()["error"]) == (400, "invalid_request")


def test_smart_configuration_and_jwks(client: TestClient, hub: Hub) -> None:
    config = client.get("/.well-known/smart-configuration")
    keys = client.get("/auth/jwks")

    assert config.status_code == 200
    body = config.json()
    assert body["token_endpoint"] == TOKEN_URL
    assert body["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert body["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert "client_credentials" in body["grant_types_supported"]
    assert "client-confidential-asymmetric" in body["capabilities"]
    assert "system/*.rs" in body["scopes_supported"]
    assert keys.status_code == 200
    [jwk] = keys.json()["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")
    assert "d" not in jwk
    # The published key verifies the hub's tokens (what a resource server would do).
    make_user(hub, "admin", username="frank")
    token = _password(client, "frank", TEST_PASSWORD).json()["access_token"]
    assert jwt.get_unverified_header(token)["kid"] == jwk["kid"]
    claims = jwt.decode(
        token, jwt.PyJWK(jwk).key, algorithms=["ES256"], audience="saf", issuer="saf"
    )
    assert claims["kind"] == "user"


def test_security_headers_on_every_response(client: TestClient) -> None:
    for response in (
        client.get("/healthz"),
        client.get("/whoami"),
        client.get("/no/such/route"),
        client.post("/auth/token", data={}),
    ):
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        assert "no-store" in headers["cache-control"]
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "strict-transport-security" not in headers  # plain http


def test_public_paths_are_routes_of_the_app(client: TestClient) -> None:
    # FastAPI keeps included routers nested; iter_route_contexts flattens them.
    routes = iter_route_contexts(client.app.routes)  # type: ignore[attr-defined]
    assert {context.path for context in routes} >= PUBLIC_PATHS


def test_rate_limit_answers_429_with_retry_after(settings: Settings) -> None:
    settings = settings.model_copy(update={"auth_rate_burst": 3, "auth_rate_per_minute": 6})
    hub = Hub.open(settings, create=True)
    try:
        with TestClient(create_app(hub)) as client:
            answers = [
                client.post("/auth/token", data={"grant_type": "password"}).status_code
                for _ in range(4)
            ]
            limited = client.post("/auth/session", data={"username": "a", "password": "b"})
            # Other endpoints are not limited.
            assert client.get("/auth/jwks").status_code == 200
        assert answers == [400, 400, 400, 429]
        assert limited.status_code == 429
        assert limited.json()["error"] == "too_many_requests"
        assert 1 <= int(limited.headers["retry-after"]) <= 10
    finally:
        hub.close()


def test_rate_limiter_refills_and_forgets_old_addresses() -> None:
    limiter = RateLimiter(per_minute=60, burst=2, max_addresses=2)

    assert [limiter.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 1.0]
    assert limiter.take("a", now=1.0) == 0.0  # one attempt per second refilled
    assert limiter.take("b", now=1.0) == 0.0
    limiter.take("c", now=1.0)
    assert "a" not in limiter._buckets


# --- HTTPS served directly by uvicorn (saf api --ssl-certfile/--ssl-keyfile) -------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_saf_api_serves_https_with_hsts_and_secure_cookie(hub: Hub, tmp_path: Path) -> None:
    make_user(hub, "admin", username="grace")
    cert, key = _self_signed(tmp_path)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAF_")}
    env.update(
        SAF_DATA_DIR=str(hub.settings.data_dir),
        SAF_HTTP_HOST="127.0.0.1",
        SAF_HTTP_PORT=str(port),
        NO_PROXY="127.0.0.1",
    )
    argv = [sys.executable, "-m", "saf", "api", "--ssl-certfile", str(cert), "--ssl-keyfile"]
    proc = subprocess.Popen(
        [*argv, str(key)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        with httpx.Client(
            base_url=f"https://127.0.0.1:{port}",
            verify=ssl.create_default_context(cafile=str(cert)),
        ) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    health = client.get("/healthz")
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, proc.communicate()
                    assert time.monotonic() < deadline, "saf api did not start"
                    time.sleep(0.2)
            login = client.post(
                "/auth/session", data={"username": "grace", "password": TEST_PASSWORD}
            )
        assert health.status_code == 200
        assert health.headers["strict-transport-security"] == "max-age=31536000"
        assert login.status_code == 204, login.text
        assert "Secure" in login.headers["set-cookie"]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)

    runner = CliRunner()
    half = runner.invoke(cli_app, ["api", "--ssl-certfile", str(cert)], env=env)
    assert half.exit_code == 2
    assert "--ssl-certfile and --ssl-keyfile go together" in half.output


def test_a_token_seen_before_still_meets_every_database_check(client: TestClient, hub: Hub) -> None:
    """The process remembers verified signatures, not answers: each request still sees a
    logout, a changed account or a disabled user at once, and a dropped signing key."""
    user = make_user(hub, "specialist", username="sam", specialties=["neuro"])
    tokens = [_password(client, "sam", TEST_PASSWORD).json()["access_token"] for _ in range(2)]
    for token in tokens:
        for _ in range(2):  # the second request is answered from the remembered signature
            assert client.get("/whoami", headers=_bearer(token)).status_code == 200

    with hub.sessions.begin() as session:
        session.get(User, user.id).specialties = ["chest"]  # type: ignore[union-attr]
    assert client.get("/tasks", headers=_bearer(tokens[0])).status_code == 200
    assert client.get("/whoami", headers=_bearer(tokens[0])).json()["role"] == "specialist"
    revoke_access_token(hub, tokens[0])  # what logging out does
    revoked = client.get("/whoami", headers=_bearer(tokens[0]))
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error_description"]

    rotate_signing_key(hub)  # the old key still verifies until the next rotation drops it
    assert client.get("/whoami", headers=_bearer(tokens[1])).status_code == 200
    rotate_signing_key(hub)
    dropped = client.get("/whoami", headers=_bearer(tokens[1]))
    assert dropped.status_code == 401 and dropped.json()["error"] == "invalid_token"

    fresh = _password(client, "sam", TEST_PASSWORD).json()["access_token"]
    assert client.get("/whoami", headers=_bearer(fresh)).status_code == 200
    disable_user(hub, "sam")
    refused = client.get("/whoami", headers=_bearer(fresh))
    assert refused.status_code == 401
    assert "disabled" in refused.json()["error_description"]
