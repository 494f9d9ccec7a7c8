"""The hub's tokens and SMART scopes: signing keys, access/refresh tokens checked against the
database on every use, client assertions, and what each scope and role allows."""

from __future__ import annotations

import stat
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from saf.db import transaction
from saf.hub import Hub
from saf.identity import (
    SYSTEM,
    Principal,
    allows,
    grantable,
    grantable_to,
    parse_scope,
    role_scopes,
)
from saf.models import UsedAssertion, User
from saf.tokens import (
    ASSERTION_MAX_SECONDS,
    TokenError,
    issue_access_token,
    issue_refresh_token,
    jwks,
    prune_used,
    revoke_access_token,
    rotate_signing_key,
    signing_keys,
    use_refresh_token,
    verify_access_token,
    verify_client_assertion,
)
from saf.users import authenticate, disable_user, revoke_client
from tests.factories import TEST_PASSWORD, client_assertion, make_client, make_user

TOKEN_URL = "https://hub.example.org/auth/token"


def _user(hub: Hub, role: str = "clinician", username: str = "alice") -> Principal:
    make_user(hub, role, username=username)
    principal = authenticate(hub, username, TEST_PASSWORD)
    assert principal is not None
    return principal


# --- signing keys -------------------------------------------------------------------------


def test_signing_key_is_private_reused_and_published_without_secrets(hub: Hub) -> None:
    keys = signing_keys(hub)
    path = hub.settings.token_keys_path

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reopened = Hub.open(hub.settings)
    try:
        assert signing_keys(reopened).active.kid == keys.active.kid
    finally:
        reopened.close()
    [jwk] = jwks(hub)["keys"]
    assert jwk["kid"] == keys.active.kid
    assert {"d", "p", "q"}.isdisjoint(jwk)


def test_rotation_keeps_the_previous_key_for_tokens_already_out(hub: Hub) -> None:
    principal = _user(hub)
    before = issue_access_token(hub, principal).token

    new = rotate_signing_key(hub)
    after = issue_access_token(hub, principal).token

    assert jwt.get_unverified_header(after)["kid"] == new.kid
    assert verify_access_token(hub, before).id == principal.id
    assert verify_access_token(hub, after).id == principal.id
    assert len(jwks(hub)["keys"]) == 2
    rotate_signing_key(hub)
    with pytest.raises(TokenError):
        verify_access_token(hub, before)  # its key is gone after the second rotation
    assert verify_access_token(hub, after).id == principal.id


# --- access and refresh tokens ------------------------------------------------------------


def test_access_token_stands_for_the_user_as_the_database_has_them_now(hub: Hub) -> None:
    principal = _user(hub, "specialist", "sam")
    issued = issue_access_token(hub, principal)

    assert issued.expires_in == hub.settings.access_token_user_seconds
    assert set(issued.scope.split()) == role_scopes("specialist")
    seen = verify_access_token(hub, issued.token)
    assert (seen.kind, seen.id, seen.role, seen.specialties) == (
        "user",
        principal.id,
        "specialist",
        frozenset({"general-radiology"}),
    )
    with transaction(hub.sessions) as session:
        row = session.get(User, principal.id)
        assert row is not None
        row.specialties = ["neuroradiology"]
    assert verify_access_token(hub, issued.token).specialties == {"neuroradiology"}
    disable_user(hub, "sam")
    with pytest.raises(TokenError, match="disabled"):
        verify_access_token(hub, issued.token)


def test_refused_tokens(hub: Hub) -> None:
    principal = _user(hub)
    good = issue_access_token(hub, principal).token
    expired = issue_access_token(hub, principal, lifetime=-60).token
    refresh = issue_refresh_token(hub, principal).token
    header, payload, signature = good.split(".")
    other = jwt.decode(good, options={"verify_signature": False})
    forged = jwt.encode(
        {**other, "sub": "someone-else"},
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": signing_keys(hub).active.kid, "typ": "at+jwt"},
    )
    unsigned = jwt.encode(other, "", algorithm="none", headers={"typ": "at+jwt"})

    for token in (
        expired,
        refresh,
        forged,
        unsigned,
        f"{header}.{payload}x.{signature}",
        "",
        "garbage",
    ):
        with pytest.raises(TokenError) as caught:
            verify_access_token(hub, token)
        assert caught.value.error == "invalid_token"
    assert verify_access_token(hub, good).id == principal.id
    assert verify_access_token(hub, good, now=time.time() + 890).id == principal.id
    with pytest.raises(TokenError):
        verify_access_token(hub, good, now=time.time() + 910)


def test_logout_revokes_the_access_token(hub: Hub) -> None:
    principal = _user(hub)
    token = issue_access_token(hub, principal).token

    revoke_access_token(hub, token)
    revoke_access_token(hub, "garbage")  # ignored

    with pytest.raises(TokenError, match="revoked"):
        verify_access_token(hub, token)
    assert verify_access_token(hub, issue_access_token(hub, principal).token).id == principal.id


def test_refresh_token_works_once(hub: Hub) -> None:
    principal = _user(hub)
    refresh = issue_refresh_token(hub, principal, frozenset({"user/Task.rs"})).token

    again, scopes = use_refresh_token(hub, refresh)

    assert again.id == principal.id
    assert scopes == {"user/Task.rs"}
    with pytest.raises(TokenError, match="already used") as caught:
        use_refresh_token(hub, refresh)
    assert caught.value.error == "invalid_grant"
    with pytest.raises(TokenError):
        use_refresh_token(hub, issue_access_token(hub, principal).token)
    with pytest.raises(ValueError, match="people"):
        issue_refresh_token(hub, replace(principal, kind="client"))


def test_client_token_follows_the_client_row(hub: Hub) -> None:
    info, _key = make_client(hub, scopes=["system/*.rs"])
    principal = Principal(
        kind="client",
        id=info.id,
        name=info.name,
        role="system",
        clinic_id="x",
        scopes=frozenset({"system/*.rs", "system/Task.c"}),
    )

    issued = issue_access_token(hub, principal)

    assert issued.expires_in == hub.settings.access_token_client_seconds
    seen = verify_access_token(hub, issued.token)
    assert seen.clinic_id != "x"  # from the database, not from the caller
    assert seen.scopes == {"system/*.rs"}  # a scope no longer registered is dropped
    revoke_client(hub, info.name)
    with pytest.raises(TokenError, match="revoked"):
        verify_access_token(hub, issued.token)
    with pytest.raises(ValueError):
        issue_access_token(hub, SYSTEM)


# --- client assertions ----------------------------------------------------------------------


def test_client_assertion_rules(hub: Hub) -> None:
    info, key = make_client(hub)
    now = time.time()

    principal = verify_client_assertion(
        hub, client_assertion(info.id, key, TOKEN_URL, lifetime=ASSERTION_MAX_SECONDS), [TOKEN_URL]
    )
    assert (principal.kind, principal.id, principal.scopes) == (
        "client",
        info.id,
        frozenset({"system/*.rs"}),
    )
    list_aud = client_assertion(info.id, key, aud=["https://other", TOKEN_URL])
    assert verify_client_assertion(hub, list_aud, [TOKEN_URL]).id == info.id

    for why, assertion in {
        "exp beyond 5 min": client_assertion(info.id, key, TOKEN_URL, lifetime=400),
        "expired": client_assertion(info.id, key, TOKEN_URL, exp=int(now) - 60),
        "no aud": client_assertion(info.id, key, aud=None),
        "long jti": client_assertion(info.id, key, TOKEN_URL, jti="x" * 256),
        "jti not a string": client_assertion(info.id, key, TOKEN_URL, jti=7),
    }.items():
        with pytest.raises(TokenError) as caught:
            verify_client_assertion(hub, assertion, [TOKEN_URL])
        assert caught.value.error == "invalid_client", why


def test_replayed_jti_is_refused_across_processes(hub: Hub) -> None:
    info, key = make_client(hub)
    assertion = client_assertion(info.id, key, TOKEN_URL, jti="same")
    other_process = Hub.open(hub.settings)  # its own engine and connection pool

    try:
        verify_client_assertion(hub, assertion, [TOKEN_URL])
        with pytest.raises(TokenError, match="replay"):
            verify_client_assertion(other_process, assertion, [TOKEN_URL])
    finally:
        other_process.close()


def test_spent_ids_are_pruned_once_expired(hub: Hub) -> None:
    info, key = make_client(hub)
    verify_client_assertion(hub, client_assertion(info.id, key, TOKEN_URL), [TOKEN_URL])
    with transaction(hub.sessions) as session:
        session.add(
            UsedAssertion(
                client_id=info.id, jti="old", expires_at=datetime.now(UTC) - timedelta(hours=1)
            )
        )

    assert prune_used(hub) == 1

    with hub.sessions() as session:
        assert session.scalar(select(func.count()).select_from(UsedAssertion)) == 1


# --- scopes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("system/DocumentReference.cruds", ("system", "DocumentReference", "cruds")),
        ("system/*.rs", ("system", "*", "rs")),
        ("user/Task.u", ("user", "Task", "u")),
        ("patient/Observation.read", ("patient", "Observation", "rs")),
        ("system/Patient.write", ("system", "Patient", "cud")),
        ("system/*.*", ("system", "*", "cruds")),
        ("system/Patient.sr", None),  # v2 letters must be in c r u d s order
        ("system/Patient.", None),
        ("system/Patient.rs?category=x", None),  # granular scopes are not supported
        ("openid", None),
        ("admin/Patient.read", None),
        ("system/patient.read", None),
    ],
)
def test_parse_scope(text: str, expected: tuple[str, str, str] | None) -> None:
    scope = parse_scope(text)
    if expected is None:
        assert scope is None
    else:
        assert scope is not None
        assert (scope.context, scope.resource_type, scope.interactions) == (
            expected[0],
            expected[1],
            frozenset(expected[2]),
        )


def _person(role: str, scopes: frozenset[str] = frozenset()) -> Principal:
    return Principal(kind="user", id="u", name="u", role=role, scopes=scopes)  # type: ignore[arg-type]


def _client(*scopes: str) -> Principal:
    return Principal(kind="client", id="c", name="c", role="system", scopes=frozenset(scopes))


def test_allows_by_scope_and_role() -> None:
    ehr = _client("system/DocumentReference.cruds", "system/ImagingStudy.read")
    assert allows(ehr, "DocumentReference", "d")
    assert allows(ehr, "ImagingStudy", "s")  # v1 read = read + search
    assert not allows(ehr, "ImagingStudy", "c")
    assert not allows(ehr, "Patient", "r")
    assert allows(_client("system/*.rs"), "Patient", "s")
    assert not allows(_client("user/*.cruds"), "Patient", "r")  # a client acts as a system
    assert not allows(_client("patient/*.read"), "Patient", "r")  # no patient context here
    assert allows(SYSTEM, "AuditEvent", "d")

    assert allows(_person("clinician"), "ImagingStudy", "s")
    assert allows(_person("clinician"), "ServiceRequest", "c")
    assert not allows(_person("clinician"), "DiagnosticReport", "c")
    assert not allows(_person("clinician"), "AuditEvent", "r")
    assert allows(_person("specialist"), "DiagnosticReport", "c")
    assert allows(_person("specialist"), "Task", "u")
    assert not allows(_person("specialist"), "Patient", "d")
    assert allows(_person("admin"), "AuditEvent", "s")
    assert not allows(_person("admin"), "Patient", "r")
    assert not allows(_person("admin", frozenset({"user/*.cruds"})), "ImagingStudy", "r")
    # A narrowed token allows only what both the role and the token allow.
    narrowed = _person("clinician", frozenset({"user/Task.rs"}))
    assert allows(narrowed, "Task", "r")
    assert not allows(narrowed, "ImagingStudy", "r")
    with pytest.raises(ValueError, match="interaction"):
        allows(ehr, "Patient", "read")


def test_grantable_keeps_only_covered_scopes() -> None:
    registered = frozenset({"system/*.rs", "system/DocumentReference.cruds"})
    asked = frozenset(
        {
            "system/Patient.r",
            "system/DocumentReference.cu",
            "system/Task.c",
            "system/*.cruds",
            "openid",
        }
    )
    assert grantable(asked, registered) == {"system/Patient.r", "system/DocumentReference.cu"}
    assert grantable_to(_person("admin"), frozenset({"user/*.rs", "user/AuditEvent.rs"})) == {
        "user/AuditEvent.rs"
    }
    assert grantable_to(_person("clinician"), frozenset({"user/AuditEvent.rs"})) == frozenset()
