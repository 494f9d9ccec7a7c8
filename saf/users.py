"""Who may log in: people (argon2id password hashes) and EHR clients (SMART JWKS), by clinic.

People get a role (clinician, specialist, admin); clients are systems of one clinic that
sign their token requests with a key registered here as a JWK Set (saf.tokens checks it).
Nothing here logs or stores a password in clear.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from saf.db import transaction
from saf.hub import Hub
from saf.identity import OTHER_SCOPES, ROLES, Principal, parse_scope
from saf.models import ApiClient, Clinic, User, utcnow
from saf.routing import WORKLIST_PATTERN

MIN_PASSWORD_LENGTH: Final = 12
"""Shortest password accepted (NIST SP 800-63B asks for at least 8; we ask more)."""

MAX_PASSWORD_LENGTH: Final = 1024
"""Longest password accepted: bounds the work a hostile login can cause."""

_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")

_hasher = PasswordHasher()
"""argon2id with the RFC 9106 "low memory" parameters argon2-cffi defaults to; when those
defaults change, hashes are upgraded at the next successful login."""


class UserError(ValueError):
    """A user or client registration that cannot be made; the message says what to fix."""


@dataclass(frozen=True)
class UserInfo:
    """A person's account, for listing (never the hash)."""

    id: str
    username: str
    role: str
    clinic: str | None
    """The clinic's name, for a clinician."""
    specialties: tuple[str, ...]
    disabled_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class ClientInfo:
    """An EHR client, for listing (its key ids, not its keys)."""

    id: str
    """The OAuth client_id."""
    name: str
    clinic: str
    scopes: tuple[str, ...]
    key_ids: tuple[str, ...]
    revoked_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class LoginAttempt:
    """The result of checking a username and password, with the reason for the audit trail."""

    principal: Principal | None
    reason: str
    """"ok", "unknown user", "wrong password" or "disabled" (never shown to the caller)."""
    user_id: str | None = None


# --- people ---------------------------------------------------------------------------


def add_user(
    hub: Hub,
    username: str,
    password: str,
    role: str,
    clinic: str | None = None,
    specialties: Iterable[str] = (),
) -> UserInfo:
    """Create a person's account. `clinic` is the clinic's name (clinicians need exactly one);
    specialists need at least one specialty (a worklist name); admins take neither."""
    if not _USERNAME.match(username):
        raise UserError(
            f"username {username!r} must be 1-64 letters, digits or . _ @ - (starting with a "
            "letter or digit)"
        )
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    specialty_list = sorted({s.strip() for s in specialties if s.strip()})
    if role == "clinician" and not clinic:
        raise UserError("a clinician needs --clinic (the clinic they work for)")
    if role != "clinician" and clinic:
        raise UserError(f"only clinicians belong to a clinic; drop --clinic for a {role}")
    if role == "specialist" and not specialty_list:
        raise UserError("a specialist needs at least one --specialty (a worklist name)")
    if role != "specialist" and specialty_list:
        raise UserError(f"only specialists have specialties; drop --specialty for a {role}")
    for specialty in specialty_list:
        if not WORKLIST_PATTERN.match(specialty):
            raise UserError(
                f"specialty {specialty!r} must be a worklist name: lower-case letters, digits "
                "and dashes, e.g. thoracic-radiology"
            )
    check_password_policy(password)
    password_hash = _hasher.hash(password)
    try:
        with transaction(hub.sessions) as session:
            clinic_id = _clinic_id(session, clinic) if clinic else None
            if session.scalar(select(User.id).where(User.username == username)) is not None:
                raise UserError(f"user {username!r} already exists")
            user = User(
                username=username,
                password_hash=password_hash,
                role=role,
                clinic_id=clinic_id,
                specialties=specialty_list,
            )
            session.add(user)
            session.flush()
            user_id = user.id
    except IntegrityError:
        raise UserError(f"user {username!r} already exists") from None
    return _user_info(hub, user_id)


def check_password_policy(password: str) -> None:
    """Refuse a password that is too short or absurdly long (length is what counts)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UserError(f"password must be at most {MAX_PASSWORD_LENGTH} characters")


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(24))


def verify_login(hub: Hub, username: str, password: str) -> LoginAttempt:
    """Check a username and password; an unknown or disabled user costs the same argon2
    verification as a real one, so response time does not reveal which names exist."""
    if len(password) > MAX_PASSWORD_LENGTH or len(username) > 64:
        return LoginAttempt(None, "unknown user")
    with hub.sessions() as session:
        user = session.scalar(select(User).where(User.username == username))
    if user is None:
        _verify(_dummy_hash(), password)
        return LoginAttempt(None, "unknown user")
    if not _verify(user.password_hash, password):
        return LoginAttempt(None, "wrong password", user.id)
    if user.disabled_at is not None:
        return LoginAttempt(None, "disabled", user.id)
    if _hasher.check_needs_rehash(user.password_hash):
        new_hash = _hasher.hash(password)
        with transaction(hub.sessions) as session:
            row = session.get(User, user.id)
            if row is not None:
                row.password_hash = new_hash
    return LoginAttempt(principal_of_user(user), "ok", user.id)


def authenticate(hub: Hub, username: str, password: str) -> Principal | None:
    """The Principal for a correct username and password of an enabled user, else None."""
    return verify_login(hub, username, password).principal


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def principal_of_user(user: User) -> Principal:
    """The Principal of a person as the database has them now (role, clinic, specialties)."""
    return Principal(
        kind="user",
        id=user.id,
        name=user.username,
        role=user.role,  # type: ignore[arg-type]  # checked by add_user
        clinic_id=user.clinic_id,
        specialties=frozenset(user.specialties or ()),
    )


def disable_user(hub: Hub, username: str) -> UserInfo:
    """Disable a person's account: logins fail and their tokens stop working at once."""
    with transaction(hub.sessions) as session:
        user = session.scalar(select(User).where(User.username == username))
        if user is None:
            raise UserError(f"no user named {username!r} (see `saf user list`)")
        if user.disabled_at is None:
            user.disabled_at = utcnow()
        user_id = user.id
    return _user_info(hub, user_id)


def list_users(hub: Hub) -> list[UserInfo]:
    """Every account, by username."""
    with hub.sessions() as session:
        rows = session.execute(
            select(User, Clinic.name)
            .outerjoin(Clinic, Clinic.id == User.clinic_id)
            .order_by(User.username)
        ).all()
        return [_to_user_info(user, clinic_name) for user, clinic_name in rows]


def _user_info(hub: Hub, user_id: str) -> UserInfo:
    with hub.sessions() as session:
        user = session.get(User, user_id)
        assert user is not None
        clinic = session.get(Clinic, user.clinic_id) if user.clinic_id else None
        return _to_user_info(user, clinic.name if clinic else None)


def _to_user_info(user: User, clinic_name: str | None) -> UserInfo:
    return UserInfo(
        id=user.id,
        username=user.username,
        role=user.role,
        clinic=clinic_name,
        specialties=tuple(user.specialties or ()),
        disabled_at=user.disabled_at,
        created_at=user.created_at,
    )


def _clinic_id(session: Any, name: str) -> str:
    clinic_id: str | None = session.scalar(select(Clinic.id).where(Clinic.name == name))
    if clinic_id is None:
        raise UserError(f"no clinic named {name!r} (see `saf clinic list`, or `saf clinic add`)")
    return clinic_id


# --- EHR clients ----------------------------------------------------------------------

CLIENT_ASSERTION_ALGORITHMS: Final = ("RS384", "ES384")
"""Signature algorithms SMART Backend Services requires servers to support; we accept
only these for client assertions."""

_PRIVATE_JWK_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def check_jwks(jwks: Any) -> dict[str, Any]:
    """Validate a client's JWK Set: RSA (≥ 2048 bits) or EC P-384 public keys, each with a
    unique `kid`; no private or symmetric key material. Returns the set as stored."""
    from jwt import PyJWK
    from jwt.exceptions import PyJWTError

    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise UserError('the JWKS must be a JSON object {"keys": [...]} with at least one key')
    seen: set[str] = set()
    keys: list[dict[str, Any]] = []
    for index, jwk in enumerate(jwks["keys"]):
        where = f"key {index + 1}"
        if not isinstance(jwk, dict):
            raise UserError(f"{where}: not a JSON object")
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 255:
            raise UserError(f"{where}: every key needs a 'kid' (the assertion header names it)")
        where = f"key {kid!r}"
        if kid in seen:
            raise UserError(f"{where}: duplicate kid")
        seen.add(kid)
        private = sorted(_PRIVATE_JWK_MEMBERS & jwk.keys())
        if private:
            raise UserError(
                f"{where}: holds private key material ({', '.join(private)}); register the "
                "public key only, and treat this private key as exposed"
            )
        kty = jwk.get("kty")
        if kty == "RSA":
            alg = jwk.get("alg", "RS384")
            if alg != "RS384":
                raise UserError(f"{where}: RSA keys must be for RS384, not {alg}")
        elif kty == "EC":
            if jwk.get("crv") != "P-384":
                raise UserError(f"{where}: EC keys must be on curve P-384 (ES384)")
            alg = jwk.get("alg", "ES384")
            if alg != "ES384":
                raise UserError(f"{where}: EC keys must be for ES384, not {alg}")
        else:
            raise UserError(f"{where}: key type must be RSA or EC (P-384), not {kty!r}")
        if jwk.get("use", "sig") != "sig":
            raise UserError(f"{where}: 'use' must be 'sig'")
        try:
            key = PyJWK(jwk, algorithm=alg)
        except (PyJWTError, ValueError, TypeError) as exc:
            raise UserError(f"{where}: not a valid {kty} public key ({exc})") from None
        if kty == "RSA" and getattr(key.key, "key_size", 0) < 2048:
            raise UserError(f"{where}: RSA keys must be at least 2048 bits")
        keys.append(dict(jwk))
    return {"keys": keys}


def check_client_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Validate the scopes a client may be granted: SMART ``system/`` resource scopes."""
    result: list[str] = []
    for text in scopes:
        for item in text.split():
            scope = parse_scope(item)
            if scope is None:
                if item in OTHER_SCOPES:
                    continue
                raise UserError(
                    f"scope {item!r} is not a SMART resource scope; write e.g. "
                    "system/DocumentReference.cruds, system/*.rs or system/Patient.read"
                )
            if scope.context != "system":
                raise UserError(
                    f"scope {item!r}: an EHR client acts as a system; use system/..., not "
                    f"{scope.context}/..."
                )
            if item not in result:
                result.append(item)
    if not result:
        raise UserError("a client needs at least one --scope, e.g. system/*.rs")
    return tuple(result)


def add_client(hub: Hub, name: str, clinic: str, jwks: Any, scopes: Iterable[str]) -> ClientInfo:
    """Register an EHR client of `clinic` (by name) with its public keys and allowed scopes;
    its new client_id is in the result."""
    if not _CLIENT_NAME.match(name):
        raise UserError(
            f"client name {name!r} must be 1-64 letters, digits, spaces or . _ - "
            "(starting with a letter or digit)"
        )
    checked_jwks = check_jwks(jwks)
    checked_scopes = check_client_scopes(scopes)
    try:
        with transaction(hub.sessions) as session:
            clinic_id = _clinic_id(session, clinic)
            if session.scalar(select(ApiClient.id).where(ApiClient.name == name)) is not None:
                raise UserError(f"client {name!r} already exists")
            client = ApiClient(
                id=secrets.token_urlsafe(24),
                name=name,
                clinic_id=clinic_id,
                jwks=checked_jwks,
                scopes=" ".join(checked_scopes),
            )
            session.add(client)
            session.flush()
            client_id = client.id
    except IntegrityError:
        raise UserError(f"client {name!r} already exists") from None
    return _client_info(hub, client_id)


def revoke_client(hub: Hub, name: str) -> ClientInfo:
    """Revoke a client: its token requests fail and its tokens stop working at once."""
    with transaction(hub.sessions) as session:
        client = session.scalar(select(ApiClient).where(ApiClient.name == name))
        if client is None:
            raise UserError(f"no client named {name!r} (see `saf client list`)")
        if client.revoked_at is None:
            client.revoked_at = utcnow()
        client_id = client.id
    return _client_info(hub, client_id)


def list_clients(hub: Hub) -> list[ClientInfo]:
    """Every client, by name."""
    with hub.sessions() as session:
        rows = session.execute(
            select(ApiClient, Clinic.name)
            .join(Clinic, Clinic.id == ApiClient.clinic_id)
            .order_by(ApiClient.name)
        ).all()
        return [_to_client_info(client, clinic_name) for client, clinic_name in rows]


def _client_info(hub: Hub, client_id: str) -> ClientInfo:
    with hub.sessions() as session:
        client = session.get(ApiClient, client_id)
        assert client is not None
        clinic = session.get(Clinic, client.clinic_id)
        assert clinic is not None
        return _to_client_info(client, clinic.name)


def _to_client_info(client: ApiClient, clinic_name: str) -> ClientInfo:
    return ClientInfo(
        id=client.id,
        name=client.name,
        clinic=clinic_name,
        scopes=tuple(client.scopes.split()),
        key_ids=tuple(str(k.get("kid")) for k in client.jwks.get("keys", [])),
        revoked_at=client.revoked_at,
        created_at=client.created_at,
    )


def principal_of_client(client: ApiClient, scopes: frozenset[str]) -> Principal:
    """The Principal of an EHR client holding `scopes`."""
    return Principal(
        kind="client",
        id=client.id,
        name=client.name,
        role="system",
        clinic_id=client.clinic_id,
        scopes=scopes,
    )
