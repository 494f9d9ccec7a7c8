"""Factory helpers for tests: synthetic studies, clinics, a running node, file digests."""

from __future__ import annotations

import hashlib
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_preamble
from sqlalchemy import func, select

from dicom_node.scp import DicomNode
from saf.app import create_app
from saf.clinics import add_clinic, find_clinic_id
from saf.hub import Hub
from saf.ingest import Sender
from saf.models import Blob, Instance, OutboxEvent, Patient, Series, Study
from saf.users import ClientInfo, UserInfo
from samples.generate import generate_study

TEST_PATIENT_NAME = "QUIXOTEFIXTURE^ZEBEDEE"
"""A patient name distinctive enough to grep for in stored bytes."""


def make_study(
    out_dir: Path, kind: str = "ct", *, count: int = 3, size: int = 64, seed: int = 1, **kw: str
) -> list[Path]:
    """A small synthetic study (default: 3 CT slices of 64x64)."""
    return generate_study(kind, out_dir, count=count, rows=size, columns=size, seed=seed, **kw)


def make_clinic(hub: Hub, name: str = "Clinic A", aet: str = "MODALITY_A") -> Sender:
    """A registered clinic with a calling AE title; returns the Sender ingest takes."""
    info = add_clinic(hub, name, aet)
    return Sender(info.id, f"test:{aet}")


def dataset_sha256(path: Path) -> str:
    """SHA-256 of a Part 10 file's dataset bytes (everything after the File Meta)."""
    with path.open("rb") as fp:
        read_preamble(fp, force=False)
        _read_file_meta_info(fp)
        return hashlib.sha256(fp.read()).hexdigest()


def sop_instance_uid(path: Path) -> str:
    """The SOP Instance UID of a file."""
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def row_counts(hub: Hub) -> dict[str, int]:
    """Rows per index table."""
    with hub.sessions() as session:
        return {
            model.__tablename__: int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in (Patient, Study, Series, Instance, Blob, OutboxEvent)
        }


def stored_blob_ids(hub: Hub) -> set[str]:
    """Ids of every object in the blob store."""
    return set(hub.blobs.iter_ids())


@contextmanager
def running_node(hub: Hub) -> Iterator[tuple[str, int]]:
    """A DICOM node on a free port for the duration of the block; yields (host, port)."""
    node = DicomNode(hub)
    node.start()
    try:
        yield node.address
    finally:
        node.stop()


T = TypeVar("T")


@contextmanager
def served_api(hub: Hub) -> Iterator[str]:
    """The hub's ASGI app on a real uvicorn server on a free port for the duration of the
    block (one of several, as API processes are); yields its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        create_app(hub), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def at_once(work: Callable[[int], T], n: int) -> list[T]:
    """`work(0)` .. `work(n - 1)` in `n` threads released together (a barrier), for races;
    the results in order; the first exception any of them raised is raised again."""
    start = threading.Barrier(n)
    results: list[T | BaseException] = [RuntimeError("no result")] * n

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # raised again in the caller's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [r for r in results if not isinstance(r, BaseException)]


TEST_PASSWORD = "correct horse battery staple"
"""The password every user made by `make_user` / `login_as` gets."""


def make_user(
    hub: Hub,
    role: str = "clinician",
    *,
    username: str | None = None,
    clinic: str = "Clinic A",
    specialties: Sequence[str] = ("general-radiology",),
    password: str = TEST_PASSWORD,
) -> UserInfo:
    """A user of `role` (a clinician of `clinic`, made if missing; a specialist on
    `specialties`; an admin), or the existing one of that username."""
    from saf.users import add_user, list_users

    username = username or f"{role}-{clinic.lower().replace(' ', '-')}"
    existing = [u for u in list_users(hub) if u.username == username]
    if existing:
        return existing[0]
    if role == "clinician" and find_clinic_id(hub, clinic) is None:
        add_clinic(hub, clinic)
    return add_user(
        hub,
        username,
        password,
        role,
        clinic=clinic if role == "clinician" else None,
        specialties=specialties if role == "specialist" else (),
    )


def login_as(
    client: TestClient,
    role: str = "clinician",
    *,
    username: str | None = None,
    clinic: str = "Clinic A",
    specialties: Sequence[str] = ("general-radiology",),
    scope: str | None = None,
) -> dict[str, str]:
    """Log in through the real ``POST /auth/token`` (password grant) as a user of `role`
    (made with `make_user` on the app's hub if needed); returns the Authorization header.

    Each call is one attempt against the login rate limit (20 per address by default): set
    ``Settings(auth_rate_burst=...)`` higher for a test that logs in very often.
    """
    hub: Hub = client.app.state.hub  # type: ignore[attr-defined]
    user = make_user(hub, role, username=username, clinic=clinic, specialties=specialties)
    form = {"grant_type": "password", "username": user.username, "password": TEST_PASSWORD}
    if scope:
        form["scope"] = scope
    response = client.post("/auth/token", data=form)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


@dataclass(frozen=True)
class ClientKey:
    """A private key an EHR client signs its assertions with, and its public JWK."""

    alg: str
    """RS384 or ES384."""
    kid: str
    private_key: Any
    public_jwk: dict[str, Any]

    def jwks(self) -> dict[str, Any]:
        """The JWK Set to register."""
        return {"keys": [self.public_jwk]}


def make_client_key(alg: str = "ES384", kid: str | None = None) -> ClientKey:
    """A fresh RS384 (RSA 2048) or ES384 (EC P-384) key pair."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    kid = kid or f"{alg.lower()}-{secrets.token_hex(4)}"
    if alg == "RS384":
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        private = ec.generate_private_key(ec.SECP384R1())
        jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return ClientKey(alg, kid, private, {**jwk, "kid": kid, "alg": alg, "use": "sig"})


def make_client(
    hub: Hub,
    name: str = "EHR A",
    *,
    clinic: str = "Clinic A",
    scopes: Sequence[str] = ("system/*.rs",),
    key: ClientKey | None = None,
) -> tuple[ClientInfo, ClientKey]:
    """A registered EHR client of `clinic` (made if missing) and the key it signs with."""
    from saf.users import add_client

    key = key or make_client_key()
    if find_clinic_id(hub, clinic) is None:
        add_clinic(hub, clinic)
    return add_client(hub, name, clinic, key.jwks(), scopes), key


def client_assertion(
    client_id: str,
    key: ClientKey,
    aud: str | list[str] | None = "http://testserver/auth/token",
    *,
    lifetime: int = 120,
    **overrides: Any,
) -> str:
    """A SMART Backend Services client assertion; `overrides` replace claims (None drops
    one), e.g. ``iss="other"`` or ``jti="same"``."""
    import jwt

    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "exp": now + lifetime,
        "iat": now,
        "jti": secrets.token_urlsafe(12),
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid})


def client_token(
    client: TestClient, client_id: str, key: ClientKey, scope: str = "system/*.rs"
) -> dict[str, str]:
    """An EHR client's Authorization header, through the real client_credentials grant."""
    response = client.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": client_assertion(client_id, key),
            "scope": scope,
        },
    )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}
