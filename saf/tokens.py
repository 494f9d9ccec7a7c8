"""The hub's tokens: its signing key, access and refresh tokens, and SMART client assertions.

Access tokens are JWTs (RFC 9068 shape, header ``typ: at+jwt``) signed with the hub's own
ES256 key, kept in the data dir (mode 0600) and published at ``/auth/jwks``. The token
only says who the caller is and which scopes it holds; `verify_access_token` reads the user
or client row again on every call, so disabling a user or revoking a client takes effect
at the next request, not at the token's expiry. A changed role, clinic or specialty list
also applies at once (the Principal is built from the database, not from the token).
That check is one autocommitted SELECT (revoked? + the account row); what a process
remembers between requests is only that a token's signature was already verified
(`VERIFIED_CACHE_SIZE` tokens, each until it expires or its key leaves the key ring).

Lifetimes (saf.settings): people 900 s, EHR clients 300 s, refresh tokens 8 h. A refresh
token is a JWT with ``typ: rt+jwt`` that can be used once: its `jti` goes into the
`used_assertion` table (the same one-time ledger as client assertions), so a stolen and
replayed refresh token is refused.

Client assertions (SMART Backend Services): RS384 or ES384 only, `iss` = `sub` = the
client_id, `aud` = the token URL, `exp` at most five minutes ahead, `jti` never accepted
twice (a primary-key insert, so the refusal holds across processes), the key picked by
`kid` from the client's registered JWK Set.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt import PyJWK
from jwt.algorithms import ECAlgorithm
from jwt.exceptions import InvalidTokenError, PyJWTError
from sqlalchemy import bindparam, delete, select
from sqlalchemy.exc import IntegrityError

from saf.audit import autocommit_connection
from saf.db import transaction
from saf.hub import Hub
from saf.identity import Principal, Role, grantable, grantable_to, role_scopes
from saf.models import ApiClient, UsedAssertion, User
from saf.users import CLIENT_ASSERTION_ALGORITHMS, principal_of_client, principal_of_user

ALGORITHM: Final = "ES256"
"""How the hub signs its own tokens (ECDSA P-256 with SHA-256)."""

ISSUER: Final = "saf"
AUDIENCE: Final = "saf"
"""`iss` and `aud` of the hub's own tokens (they are only ever checked by the hub)."""

LEEWAY_SECONDS: Final = 5
"""Clock skew tolerated on the hub's own tokens (several hub processes, one clock each)."""

ASSERTION_MAX_SECONDS: Final = 300
"""A client assertion's `exp` may be at most this far ahead (SMART: five minutes)."""

ASSERTION_LEEWAY_SECONDS: Final = 30
"""Clock skew tolerated between an EHR and the hub on assertion times."""

_ACCESS_TYP: Final = "at+jwt"
_REFRESH_TYP: Final = "rt+jwt"
_REVOKED: Final = "revoked"
"""`used_assertion.client_id` under which revoked access-token ids (logout) are kept."""


class TokenError(Exception):
    """A token or assertion refused; `error` is the OAuth error code, `description` is safe
    to show the caller (it never says which part of a credential was wrong)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description


@dataclass(frozen=True)
class IssuedToken:
    """A token and what the token response says about it."""

    token: str
    expires_in: int
    scope: str
    jti: str


# --- the hub's signing keys -----------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """One of the hub's ES256 keys."""

    kid: str
    created: str
    private_key: ec.EllipticCurvePrivateKey

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK."""
        jwk = ECAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": ALGORITHM, "use": "sig"}


@dataclass(frozen=True)
class SigningKeys:
    """The hub's signing keys: the newest signs, all of them verify."""

    keys: tuple[SigningKey, ...]

    @property
    def active(self) -> SigningKey:
        """The key new tokens are signed with."""
        return self.keys[-1]

    def by_kid(self, kid: str) -> SigningKey | None:
        """The key with this id, if the hub still has it."""
        return next((k for k in self.keys if k.kid == kid), None)


KEEP_KEYS: Final = 2
"""Keys kept after a rotation: the new one and the previous one, so tokens signed just
before the rotation keep working until they expire (rotate again no sooner than the
refresh-token lifetime)."""

_cache: dict[Path, tuple[float, SigningKeys]] = {}
_cache_lock = threading.Lock()


def signing_keys(hub: Hub) -> SigningKeys:
    """The hub's signing keys, created (mode 0600) on first use, reloaded after a rotation."""
    path = hub.settings.token_keys_path
    with _cache_lock:
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            _write_keys(path, [_new_key()], exclusive=True)
            mtime = path.stat().st_mtime
        cached = _cache.get(path)
        if cached and cached[0] == mtime:
            return cached[1]
        keys = _read_keys(path)
        _cache[path] = (mtime, keys)
        return keys


def rotate_signing_key(hub: Hub) -> SigningKey:
    """Add a new signing key (it signs from now on) and drop all but `KEEP_KEYS` keys."""
    current = signing_keys(hub)
    new = _new_key()
    kept = [*current.keys, new][-KEEP_KEYS:]
    with _cache_lock:
        _write_keys(hub.settings.token_keys_path, kept, exclusive=False)
        _cache.pop(hub.settings.token_keys_path, None)
    return new


def jwks(hub: Hub) -> dict[str, Any]:
    """The hub's public signing keys as a JWK Set."""
    return {"keys": [key.public_jwk() for key in signing_keys(hub).keys]}


def _new_key() -> SigningKey:
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return SigningKey(secrets.token_hex(8), created, ec.generate_private_key(ec.SECP256R1()))


def _write_keys(path: Path, keys: Sequence[SigningKey], *, exclusive: bool) -> None:
    body = {
        "keys": [
            {
                "kid": k.kid,
                "created": k.created,
                "private_key_pem": k.private_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode(),
            }
            for k in keys
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fp:
            json.dump(body, fp, indent=1)
            fp.flush()
            os.fsync(fp.fileno())
        if exclusive:
            # Another process may create the file at the same moment: link() refuses to
            # overwrite, so exactly one key set wins and every process then reads it.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_keys(path: Path) -> SigningKeys:
    body = json.loads(path.read_text())
    keys = []
    for item in body["keys"]:
        private = serialization.load_pem_private_key(item["private_key_pem"].encode(), None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path}: key {item['kid']} is not an EC key")
        keys.append(SigningKey(item["kid"], item["created"], private))
    if not keys:
        raise ValueError(f"{path}: no signing keys (delete the file to make a new one)")
    return SigningKeys(tuple(keys))


# --- issuing and verifying the hub's tokens ---------------------------------------------


def default_lifetime(hub: Hub, principal: Principal) -> int:
    """Access-token lifetime in seconds for this kind of caller."""
    settings = hub.settings
    if principal.kind == "client":
        return settings.access_token_client_seconds
    return settings.access_token_user_seconds


def default_scopes(principal: Principal) -> frozenset[str]:
    """The scopes a token gets when none were asked for: a person's role scopes, or the
    Principal's own scopes."""
    if principal.kind == "user":
        return principal.scopes or role_scopes(principal.role)
    return principal.scopes


def issue_access_token(
    hub: Hub,
    principal: Principal,
    scopes: frozenset[str] | None = None,
    lifetime: int | None = None,
    *,
    now: float | None = None,
) -> IssuedToken:
    """Sign an access token for a user or client. `lifetime` in seconds (default from the
    settings; a negative one makes an already expired token, for tests)."""
    return _issue(hub, principal, scopes, lifetime, now, _ACCESS_TYP)


def issue_refresh_token(
    hub: Hub,
    principal: Principal,
    scopes: frozenset[str] | None = None,
    lifetime: int | None = None,
    *,
    now: float | None = None,
) -> IssuedToken:
    """Sign a one-time refresh token for a person (see `use_refresh_token`)."""
    if principal.kind != "user":
        raise ValueError("refresh tokens are for people; clients ask again with an assertion")
    lifetime = hub.settings.refresh_token_seconds if lifetime is None else lifetime
    return _issue(hub, principal, scopes, lifetime, now, _REFRESH_TYP)


def _issue(
    hub: Hub,
    principal: Principal,
    scopes: frozenset[str] | None,
    lifetime: int | None,
    now: float | None,
    typ: str,
) -> IssuedToken:
    if principal.kind not in ("user", "client"):
        raise ValueError(f"tokens are issued to users and clients, not {principal.kind}")
    granted = default_scopes(principal) if scopes is None else scopes
    lifetime = default_lifetime(hub, principal) if lifetime is None else lifetime
    issued_at = int(time.time() if now is None else now)
    jti = secrets.token_urlsafe(16)
    scope = " ".join(sorted(granted))
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": principal.id,
        "kind": principal.kind,
        "scope": scope,
        "iat": issued_at,
        "exp": issued_at + lifetime,
        "jti": jti,
    }
    if principal.kind == "client":
        claims["client_id"] = principal.id
    key = signing_keys(hub).active
    token = jwt.encode(
        claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": typ}
    )
    return IssuedToken(token, lifetime, scope, jti)


def _decode(hub: Hub, token: str, typ: str, now: float | None) -> dict[str, Any]:
    invalid = TokenError("invalid_token", "the token is malformed, expired or not ours")
    try:
        header = jwt.get_unverified_header(token)
    except InvalidTokenError:
        raise invalid from None
    key = signing_keys(hub).by_kid(str(header.get("kid", "")))
    if key is None or header.get("typ") != typ or header.get("alg") != ALGORITHM:
        raise invalid
    options: dict[str, Any] = {"require": ["exp", "iat", "sub", "jti", "iss", "aud"]}
    if now is not None:
        # PyJWT reads the clock itself; a caller-supplied `now` (tests) is applied by hand.
        options["verify_exp"] = False
    try:
        claims = jwt.decode(
            token,
            key.private_key.public_key(),
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            leeway=LEEWAY_SECONDS,
            options=options,  # type: ignore[arg-type]
        )
    except InvalidTokenError:
        raise invalid from None
    if now is not None and claims["exp"] + LEEWAY_SECONDS <= now:
        raise invalid
    if claims.get("kind") not in ("user", "client"):
        raise invalid
    return claims


def verify_access_token(hub: Hub, token: str, *, now: float | None = None) -> Principal:
    """The Principal an access token stands for, as the database has it now.

    Refused (TokenError ``invalid_token``): a bad signature, another kid, wrong `typ`, an
    expired token, a logged-out (revoked) token, a disabled user, a revoked client.
    """
    claims = _verified_access_claims(hub, token, now)
    scopes = frozenset(str(claims.get("scope", "")).split())
    params = {"jti": str(claims["jti"]), "sub": str(claims["sub"])}
    user = claims["kind"] == "user"
    # One autocommitted SELECT answers "revoked?" and "who is it now?" together: this runs
    # on every request, and each round trip to PostgreSQL is a large share of a read.
    with autocommit_connection(hub.engine) as conn:
        row = conn.execute(_USER_NOW if user else _CLIENT_NOW, params).one_or_none()
        revoked = bool(row.revoked if row else conn.execute(_REVOKED_NOW, params).scalar())
    if revoked:
        raise TokenError("invalid_token", "the token was revoked (logged out)")
    if user:
        if row is None or row.disabled_at is not None:
            raise TokenError("invalid_token", "the account is disabled or gone")
        principal = principal_of_user(
            User(
                id=row.id, username=row.username, role=row.role, clinic_id=row.clinic_id,
                specialties=row.specialties,
            )
        )  # fmt: skip
        return replace(principal, scopes=_user_grant(principal.role, scopes))
    if row is None or row.revoked_at is not None:
        raise TokenError("invalid_token", "the client is revoked or gone")
    client = ApiClient(id=row.id, name=row.name, clinic_id=row.clinic_id, scopes=row.scopes)
    return principal_of_client(client, _client_grant(scopes, client.scopes))


_REVOKED_NOW: Final = select(
    select(UsedAssertion.jti)
    .where(UsedAssertion.client_id == _REVOKED, UsedAssertion.jti == bindparam("jti"))
    .exists()
    .label("revoked")
)
_USER_NOW: Final = select(
    _REVOKED_NOW.selected_columns.revoked, User.id, User.username, User.role, User.clinic_id,
    User.specialties, User.disabled_at,
).where(User.id == bindparam("sub"))  # fmt: skip
_CLIENT_NOW: Final = select(
    _REVOKED_NOW.selected_columns.revoked, ApiClient.id, ApiClient.name, ApiClient.clinic_id,
    ApiClient.scopes, ApiClient.revoked_at,
).where(ApiClient.id == bindparam("sub"))  # fmt: skip
"""Built once: building and caching a statement per request costs more than running it."""


@functools.lru_cache(maxsize=1024)
def _user_grant(role: Role, requested: frozenset[str]) -> frozenset[str]:
    """`grantable_to` for a person: it depends on the role and the scopes only."""
    return grantable_to(Principal(kind="user", id="", name="", role=role), requested)


@functools.lru_cache(maxsize=1024)
def _client_grant(requested: frozenset[str], registered: str) -> frozenset[str]:
    return grantable(requested, frozenset(registered.split()))


VERIFIED_CACHE_SIZE: Final = 10_000
"""Access tokens whose signature this process has checked, kept so the next request with
the same token skips the ES256 verification and JWT parsing (the database checks that
make a revoked token or a disabled account fail at once are not cached)."""

_verified: OrderedDict[str, tuple[SigningKey, dict[str, Any]]] = OrderedDict()
_verified_lock = threading.Lock()


def _verified_access_claims(hub: Hub, token: str, now: float | None) -> dict[str, Any]:
    """`_decode` for an access token, remembering tokens already verified.

    A remembered token is accepted only while it has not expired (the same leeway) and
    the very key object that verified it is still the hub's key for its kid (a rotation
    that drops the key, or a reload of the key file, forgets it).
    """
    if now is not None:  # tests set the clock: nothing remembered applies
        return _decode(hub, token, _ACCESS_TYP, now)
    with _verified_lock:
        hit = _verified.get(token)
        if hit is not None:
            _verified.move_to_end(token)
    if hit is not None:
        key, claims = hit
        if (
            signing_keys(hub).by_kid(key.kid) is key
            and time.time() < claims["exp"] + LEEWAY_SECONDS
        ):
            return claims
    claims = _decode(hub, token, _ACCESS_TYP, None)
    key_now = signing_keys(hub).by_kid(str(jwt.get_unverified_header(token)["kid"]))
    if key_now is not None:
        with _verified_lock:
            _verified[token] = (key_now, claims)
            while len(_verified) > VERIFIED_CACHE_SIZE:
                _verified.popitem(last=False)
    return claims


def _principal_now(session: Any, claims: dict[str, Any], scopes: frozenset[str]) -> Principal:
    if claims["kind"] == "user":
        user = session.get(User, claims["sub"])
        if user is None or user.disabled_at is not None:
            raise TokenError("invalid_token", "the account is disabled or gone")
        principal = principal_of_user(user)
        return replace(principal, scopes=grantable_to(principal, scopes))
    client = session.get(ApiClient, claims["sub"])
    if client is None or client.revoked_at is not None:
        raise TokenError("invalid_token", "the client is revoked or gone")
    return principal_of_client(client, grantable(scopes, frozenset(client.scopes.split())))


def revoke_access_token(hub: Hub, token: str) -> None:
    """Refuse this access token from now on (logout). Already invalid tokens are ignored."""
    try:
        claims = _decode(hub, token, _ACCESS_TYP, None)
    except TokenError:
        return
    _spend(hub, _REVOKED, str(claims["jti"]), int(claims["exp"]) + LEEWAY_SECONDS)


def use_refresh_token(hub: Hub, token: str) -> tuple[Principal, frozenset[str]]:
    """Spend a refresh token: the person (checked in the database now) and its scopes.

    Refused (TokenError ``invalid_grant``): anything invalid, already used, or a disabled
    user. Each refresh token works once; the token response carries a new one.
    """
    try:
        claims = _decode(hub, token, _REFRESH_TYP, None)
    except TokenError:
        raise TokenError("invalid_grant", "the refresh token is invalid or expired") from None
    if claims["kind"] != "user":
        raise TokenError("invalid_grant", "the refresh token is invalid or expired")
    scopes = frozenset(str(claims.get("scope", "")).split())
    with hub.sessions() as session:
        try:
            principal = _principal_now(session, claims, scopes)
        except TokenError:
            raise TokenError("invalid_grant", "the account is disabled or gone") from None
    if not _spend(hub, f"refresh:{principal.id}", str(claims["jti"]), int(claims["exp"])):
        raise TokenError("invalid_grant", "the refresh token was already used")
    return principal, principal.scopes


def _spend(hub: Hub, owner: str, jti: str, exp: int) -> bool:
    """Record `jti` as used by `owner`; False when it already was (a replay)."""
    expires_at = datetime.fromtimestamp(exp, UTC)
    try:
        with transaction(hub.sessions) as session:
            session.add(UsedAssertion(client_id=owner[:64], jti=jti, expires_at=expires_at))
    except IntegrityError:
        return False
    return True


def prune_used(hub: Hub) -> int:
    """Forget spent ids whose tokens have expired anyway; returns how many rows went."""
    cutoff = datetime.fromtimestamp(time.time() - ASSERTION_LEEWAY_SECONDS, UTC)
    with transaction(hub.sessions) as session:
        result = session.execute(delete(UsedAssertion).where(UsedAssertion.expires_at < cutoff))
        return int(getattr(result, "rowcount", 0) or 0)


# --- SMART Backend Services client assertions ------------------------------------------


def verify_client_assertion(
    hub: Hub, assertion: str, token_urls: Sequence[str], *, now: float | None = None
) -> Principal:
    """Check a client assertion (RFC 7523, SMART Backend Services) and spend its `jti`.

    Returns the client's Principal with its registered scopes (the caller narrows them to
    what was asked). Raises TokenError ``invalid_client`` with a description that names the
    rule broken, never key material.
    """

    def refuse(why: str) -> TokenError:
        return TokenError("invalid_client", why)

    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except InvalidTokenError:
        raise refuse("client_assertion is not a JWT") from None
    alg = header.get("alg")
    if alg not in CLIENT_ASSERTION_ALGORITHMS:
        raise refuse(f"client_assertion must be signed with RS384 or ES384, not {alg}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise refuse("client_assertion header needs the 'kid' of a registered key")
    client_id = unverified.get("iss")
    if not isinstance(client_id, str) or client_id != unverified.get("sub"):
        raise refuse("client_assertion 'iss' and 'sub' must both be the client_id")
    with hub.sessions() as session:
        client = session.get(ApiClient, client_id[:64])
        if client is None or client.revoked_at is not None:
            raise refuse("unknown or revoked client")
        jwk = next((k for k in client.jwks.get("keys", []) if k.get("kid") == kid), None)
        if jwk is None:
            raise refuse(f"no registered key with kid {kid!r} for this client")
        principal = principal_of_client(client, frozenset(client.scopes.split()))
    expected_kty = "RSA" if alg == "RS384" else "EC"
    if jwk.get("kty") != expected_kty:
        raise refuse(f"key {kid!r} is not a key for {alg}")
    try:
        key = PyJWK(jwk, algorithm=alg).key
    except (PyJWTError, ValueError, TypeError):
        raise refuse(f"registered key {kid!r} is unusable; re-register the client") from None
    current = time.time() if now is None else now
    try:
        claims = jwt.decode(
            assertion,
            key,
            algorithms=[alg],
            audience=list(token_urls),
            issuer=client_id,
            leeway=ASSERTION_LEEWAY_SECONDS,
            options={"require": ["exp", "iss", "sub", "aud", "jti"], "verify_exp": False},
        )
    except jwt.InvalidAudienceError:
        raise refuse(f"client_assertion 'aud' must be the token URL {token_urls[0]}") from None
    except jwt.InvalidSignatureError:
        raise refuse(f"client_assertion signature does not verify with key {kid!r}") from None
    except InvalidTokenError as exc:
        raise refuse(f"client_assertion is invalid ({type(exc).__name__})") from None
    exp = claims["exp"]
    if not isinstance(exp, int | float):
        raise refuse("client_assertion 'exp' must be a number")
    if exp + ASSERTION_LEEWAY_SECONDS <= current:
        raise refuse("client_assertion has expired")
    if exp > current + ASSERTION_MAX_SECONDS + ASSERTION_LEEWAY_SECONDS:
        raise refuse("client_assertion 'exp' must be at most 5 minutes in the future")
    jti = claims["jti"]
    if not isinstance(jti, str) or not jti or len(jti) > 255:
        raise refuse("client_assertion 'jti' must be a string of 1-255 characters")
    prune_used(hub)
    if not _spend(hub, client_id, jti, int(exp) + ASSERTION_LEEWAY_SECONDS):
        raise refuse("client_assertion 'jti' was already used (replay)")
    return principal
