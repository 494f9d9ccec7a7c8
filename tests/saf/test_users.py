"""People and EHR clients: registration rules, argon2 passwords, disabling and revoking, and
the `saf user` / `saf client` commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select
from typer.testing import CliRunner

from saf.cli import app
from saf.clinics import add_clinic
from saf.db import transaction
from saf.hub import Hub
from saf.models import ApiClient, User
from saf.settings import Settings
from saf.users import (
    UserError,
    add_client,
    add_user,
    authenticate,
    check_jwks,
    disable_user,
    list_clients,
    list_users,
    revoke_client,
    verify_login,
)
from tests.factories import TEST_PASSWORD, make_client_key


@pytest.fixture
def clinic(hub: Hub) -> str:
    return add_clinic(hub, "Clinic A").name


def test_add_user_rules(hub: Hub, clinic: str) -> None:
    clinician = add_user(hub, "alice", TEST_PASSWORD, "clinician", clinic=clinic)
    specialist = add_user(
        hub, "bob", TEST_PASSWORD, "specialist", specialties=["neuroradiology", "general-radiology"]
    )
    admin = add_user(hub, "root.admin@example.org", TEST_PASSWORD, "admin")

    assert (clinician.role, clinician.clinic) == ("clinician", "Clinic A")
    assert specialist.specialties == ("general-radiology", "neuroradiology")
    assert (admin.clinic, admin.specialties) == (None, ())
    cases: list[tuple[dict[str, Any], str]] = [
        ({"role": "clinician"}, "needs --clinic"),
        ({"role": "clinician", "clinic": "Nowhere"}, "no clinic named 'Nowhere'"),
        ({"role": "specialist"}, "at least one --specialty"),
        ({"role": "specialist", "specialties": ["Neuro Radiology"]}, "worklist name"),
        ({"role": "admin", "clinic": clinic}, "drop --clinic"),
        ({"role": "admin", "specialties": ["general"]}, "drop --specialty"),
        ({"role": "clinician", "clinic": clinic, "specialties": ["x"]}, "drop --specialty"),
        ({"role": "root"}, "role must be one of clinician, specialist, admin"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            add_user(hub, "carol", TEST_PASSWORD, **kwargs)
    with pytest.raises(UserError, match="at least 12 characters"):
        add_user(hub, "carol", "short", "admin")
    with pytest.raises(UserError, match="already exists"):
        add_user(hub, "alice", TEST_PASSWORD, "admin")
    with pytest.raises(UserError, match="username"):
        add_user(hub, "bad name", TEST_PASSWORD, "admin")
    assert [u.username for u in list_users(hub)] == ["alice", "bob", "root.admin@example.org"]


def test_passwords_are_argon2_and_checked(hub: Hub, clinic: str) -> None:
    info = add_user(hub, "alice", TEST_PASSWORD, "clinician", clinic=clinic)
    with hub.sessions() as session:
        stored = session.scalar(select(User.password_hash).where(User.id == info.id))
    assert stored is not None
    assert stored.startswith("$argon2id$")
    assert TEST_PASSWORD not in stored

    principal = authenticate(hub, "alice", TEST_PASSWORD)

    assert principal is not None
    assert (principal.kind, principal.id, principal.role) == ("user", info.id, "clinician")
    assert principal.clinic_id is not None
    assert authenticate(hub, "alice", TEST_PASSWORD + "x") is None
    assert verify_login(hub, "alice", "wrong password!").reason == "wrong password"
    assert verify_login(hub, "mallory", TEST_PASSWORD).reason == "unknown user"
    assert verify_login(hub, "alice", "x" * 5000).reason == "unknown user"
    disable_user(hub, "alice")
    attempt = verify_login(hub, "alice", TEST_PASSWORD)
    assert (attempt.principal, attempt.reason) == (None, "disabled")
    with pytest.raises(UserError, match="no user named"):
        disable_user(hub, "mallory")


def test_a_hash_made_with_old_parameters_is_upgraded_at_login(hub: Hub) -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(TEST_PASSWORD)
    info = add_user(hub, "dora", TEST_PASSWORD, "admin")
    with transaction(hub.sessions) as session:
        row = session.get(User, info.id)
        assert row is not None
        row.password_hash = weak

    assert authenticate(hub, "dora", TEST_PASSWORD) is not None

    with hub.sessions() as session:
        upgraded = session.scalar(select(User.password_hash).where(User.id == info.id))
    assert upgraded != weak
    assert upgraded is not None and "m=65536" in upgraded
    assert authenticate(hub, "dora", TEST_PASSWORD) is not None


def _jwk(alg: str = "ES384") -> dict[str, Any]:
    return make_client_key(alg).public_jwk


def test_jwks_validation() -> None:
    ec_key, rsa_key = _jwk("ES384"), _jwk("RS384")
    assert check_jwks({"keys": [ec_key, rsa_key]}) == {"keys": [ec_key, rsa_key]}
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    private = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()), as_dict=True)
    p256 = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True)
    small = RSAAlgorithm.to_jwk(
        rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(), as_dict=True
    )
    for jwks, message in [
        ({"keys": []}, "at least one key"),
        ([ec_key], "JSON object"),
        ({"keys": [{**private, "kid": "k"}]}, "private key material"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k"}]}, "private key material"),
        ({"keys": [{**p256, "kid": "k"}]}, "P-384"),
        ({"keys": [{**small, "kid": "k"}]}, "at least 2048 bits"),
        ({"keys": [{**rsa_key, "alg": "RS256"}]}, "RS384"),
        ({"keys": [{k: v for k, v in ec_key.items() if k != "kid"}]}, "needs a 'kid'"),
        ({"keys": [ec_key, ec_key]}, "duplicate kid"),
        ({"keys": [{**ec_key, "x": "AAAA"}]}, "not a valid EC public key"),
        ({"keys": [{**ec_key, "use": "enc"}]}, "'use' must be 'sig'"),
        ({"keys": [{"kty": "OKP", "kid": "k"}]}, "RSA or EC"),
    ]:
        with pytest.raises(UserError, match=message):
            check_jwks(jwks)


def test_add_list_and_revoke_clients(hub: Hub, clinic: str) -> None:
    jwk = _jwk()
    info = add_client(hub, "EHR A", clinic, {"keys": [jwk]}, ["system/*.rs system/Task.cu"])

    assert info.clinic == "Clinic A"
    assert info.scopes == ("system/*.rs", "system/Task.cu")
    assert info.key_ids == (jwk["kid"],)
    assert len(info.id) >= 32  # the client_id is unguessable
    for scopes, message in [
        (["user/*.rs"], "acts as a system"),
        (["system/Patient.rs?x=1"], "not a SMART resource scope"),
        (["openid"], "at least one --scope"),
        ([], "at least one --scope"),
    ]:
        with pytest.raises(UserError, match=message):
            add_client(hub, "EHR B", clinic, {"keys": [_jwk()]}, scopes)
    with pytest.raises(UserError, match="already exists"):
        add_client(hub, "EHR A", clinic, {"keys": [_jwk()]}, ["system/*.rs"])
    with pytest.raises(UserError, match="no clinic named"):
        add_client(hub, "EHR C", "Nowhere", {"keys": [_jwk()]}, ["system/*.rs"])

    revoked = revoke_client(hub, "EHR A")

    assert revoked.revoked_at is not None
    assert [c.name for c in list_clients(hub)] == ["EHR A"]
    with pytest.raises(UserError, match="no client named"):
        revoke_client(hub, "EHR Z")


# --- the saf user / saf client commands ---------------------------------------------------


def _env(settings: Settings) -> dict[str, str]:
    env = {"SAF_DATA_DIR": str(settings.data_dir), "COLUMNS": "200"}
    if settings.database_url:
        env["SAF_DATABASE_URL"] = settings.database_url
    return env


def test_user_commands(hub: Hub, clinic: str) -> None:
    runner = CliRunner()
    env = _env(hub.settings)

    added = runner.invoke(
        app,
        ["user", "add", "alice", "--role", "clinician", "--clinic", clinic],
        input=f"{TEST_PASSWORD}\n",
        env=env,
    )
    specialist = runner.invoke(
        app,
        [
            "user",
            "add",
            "bob",
            "--role",
            "specialist",
            "--specialty",
            "neuroradiology",
            "--specialty",
            "general-radiology",
            "--password-stdin",
        ],
        input=f"{TEST_PASSWORD}\n",
        env=env,
    )
    short = runner.invoke(
        app, ["user", "add", "carol", "--role", "admin"], input="short\n", env=env
    )
    no_clinic = runner.invoke(
        app, ["user", "add", "dan", "--role", "clinician"], input=f"{TEST_PASSWORD}\n", env=env
    )
    disabled = runner.invoke(app, ["user", "disable", "alice"], env=env)
    unknown = runner.invoke(app, ["user", "disable", "nobody"], env=env)
    listed = runner.invoke(app, ["user", "list"], env=env)

    assert added.exit_code == 0, added.output
    assert "user alice (clinician: Clinic A)" in added.output
    assert specialist.exit_code == 0, specialist.output
    assert short.exit_code == 2
    assert "at least 12 characters" in short.output
    assert no_clinic.exit_code == 2
    assert "needs --clinic" in no_clinic.output
    assert disabled.exit_code == 0
    assert unknown.exit_code == 2
    assert "saf user list" in unknown.output
    assert listed.exit_code == 0
    assert "general-radiology, neuroradiology" in listed.output
    assert TEST_PASSWORD not in listed.output + added.output
    assert authenticate(hub, "bob", TEST_PASSWORD) is not None
    assert authenticate(hub, "alice", TEST_PASSWORD) is None  # disabled


def test_client_commands(hub: Hub, clinic: str, tmp_path: Path) -> None:
    runner = CliRunner()
    env = _env(hub.settings)
    key_file = tmp_path / "ehr.jwks.json"
    key = make_client_key("RS384")
    key_file.write_text(json.dumps(key.jwks()))
    private_file = tmp_path / "private.json"
    from jwt.algorithms import RSAAlgorithm

    private_file.write_text(
        json.dumps({"keys": [{**RSAAlgorithm.to_jwk(key.private_key, as_dict=True), "kid": "p"}]})
    )

    added = runner.invoke(
        app,
        [
            "client",
            "add",
            "EHR A",
            "--clinic",
            clinic,
            "--jwks",
            str(key_file),
            "--scope",
            "system/*.rs",
            "--scope",
            "system/DocumentReference.cruds",
        ],
        env=env,
    )
    leaked = runner.invoke(
        app,
        [
            "client",
            "add",
            "EHR B",
            "--clinic",
            clinic,
            "--jwks",
            str(private_file),
            "--scope",
            "system/*.rs",
        ],
        env=env,
    )
    missing = runner.invoke(
        app,
        [
            "client",
            "add",
            "EHR C",
            "--clinic",
            clinic,
            "--jwks",
            str(tmp_path / "none.json"),
            "--scope",
            "system/*.rs",
        ],
        env=env,
    )
    revoked = runner.invoke(app, ["client", "revoke", "EHR A"], env=env)
    listed = runner.invoke(app, ["client", "list"], env=env)

    assert added.exit_code == 0, added.output
    with hub.sessions() as session:
        client_id = session.scalar(select(ApiClient.id).where(ApiClient.name == "EHR A"))
    assert client_id is not None and client_id in added.stdout
    assert leaked.exit_code == 2
    assert "private key material" in leaked.output
    assert missing.exit_code == 2
    assert "no such file" in missing.output
    assert revoked.exit_code == 0
    assert "EHR A" in listed.output
    assert key.kid in listed.output
    assert [c.revoked_at is not None for c in list_clients(hub)] == [True]
