"""Two clinics' worth of real data (made through the ingest path and the pipeline), for
the tenancy, API and route-protection tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from saf.hub import Hub
from saf.identity import Principal
from saf.ingest import Sender, ingest_part10
from saf.models import Instance, Series, Study
from saf.pipeline import complete_study
from saf.routing import parse_rules
from tests.factories import client_token, login_as, make_client, make_clinic, make_study, make_user

RULES = parse_rules(
    """
[[rule]]
name = "derm"
modality = ["XC"]
worklist = "dermatology"

[[rule]]
name = "chest-ct"
modality = ["CT"]
body_part = ["CHEST"]
worklist = "thoracic-radiology"

[[rule]]
name = "default"
worklist = "general-radiology"
"""
)

THORACIC = "thoracic-radiology"
DERMATOLOGY = "dermatology"


@dataclass
class Tenant:
    """One clinic's ids: its studies, their cases, series, instances and patients."""

    clinic_id: str
    name: str
    studies: list[str] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)
    series: list[str] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    case_of_study: dict[str, str] = field(default_factory=dict)


@dataclass
class World:
    """Clinic A (one chest CT, routed to thoracic radiology) and clinic B (a chest CT on the
    same worklist and a skin photo on the dermatology worklist)."""

    a: Tenant
    b: Tenant
    ct_case_b: str
    derm_case_b: str


def _add_study(
    hub: Hub,
    tmp_path: Path,
    tenant: Tenant,
    sender: Sender,
    kind: str,
    *,
    seed: int,
    patient_id: str,
    patient_name: str,
) -> str:
    out = tmp_path / f"{tenant.name}-{kind}-{seed}"
    paths = make_study(
        out, kind, count=2, seed=seed, patient_id=patient_id, patient_name=patient_name
    )
    results = [ingest_part10(hub, p, sender) for p in paths]
    with hub.sessions() as session:
        study = session.scalars(
            select(Study).where(
                Study.clinic_id == tenant.clinic_id,
                Study.study_instance_uid == results[-1].study_instance_uid,
            )
        ).one()
        study_id, patient_pk = study.id, study.patient_pk
        series = list(session.scalars(select(Series.id).where(Series.study_pk == study_id)))
        instances = list(session.scalars(select(Instance.id).where(Instance.series_pk.in_(series))))
    done = complete_study(hub, study_id, RULES)
    tenant.studies.append(study_id)
    tenant.cases.append(done.case_id)
    tenant.case_of_study[study_id] = done.case_id
    tenant.series += series
    tenant.instances += instances
    if patient_pk not in tenant.patients:
        tenant.patients.append(patient_pk)
    return done.case_id


def make_world(hub: Hub, tmp_path: Path) -> World:
    """Ingest and complete the studies of two clinics (thumbnails rendered, cases routed)."""
    sender_a = make_clinic(hub, "Clinic A", "MODALITY_A")
    sender_b = make_clinic(hub, "Clinic B", "MODALITY_B")
    a = Tenant(sender_a.clinic_id, "Clinic A")
    b = Tenant(sender_b.clinic_id, "Clinic B")
    _add_study(
        hub, tmp_path, a, sender_a, "ct", seed=1, patient_id="PA1", patient_name="ALPHA^ANNA"
    )
    ct_b = _add_study(
        hub, tmp_path, b, sender_b, "ct", seed=2, patient_id="PB1", patient_name="BRAVO^BERT"
    )
    derm_b = _add_study(
        hub, tmp_path, b, sender_b, "photo", seed=3, patient_id="PB2", patient_name="CHARLIE^CARA"
    )
    return World(a, b, ct_b, derm_b)


def clinician(tenant: Tenant, name: str = "dr.clinic") -> Principal:
    """A clinician Principal of `tenant` (what a verified token resolves to)."""
    return Principal(
        kind="user", id=f"id-{name}", name=name, role="clinician", clinic_id=tenant.clinic_id
    )


def specialist(*specialties: str, name: str = "dr.spec") -> Principal:
    """A specialist Principal serving `specialties`."""
    return Principal(
        kind="user",
        id=f"id-{name}",
        name=name,
        role="specialist",
        specialties=frozenset(specialties),
    )


ADMIN = Principal(kind="user", id="id-admin", name="root", role="admin")


# --------------------------------------------------------------------------- people


@dataclass(frozen=True)
class People:
    """Usernames of the test accounts made by `make_people`."""

    clinician_a: str = "anna.clinic-a"
    clinician_b: str = "bert.clinic-b"
    thoracic: str = "dr.thorax"
    thoracic_2: str = "dr.lung"
    derm: str = "dr.skin"
    admin: str = "root.admin"


def make_people(hub: Hub, world: World) -> People:
    """Accounts for each kind of caller of `world` (real users with argon2 hashes)."""
    people = People()
    make_user(hub, "clinician", username=people.clinician_a, clinic=world.a.name)
    make_user(hub, "clinician", username=people.clinician_b, clinic=world.b.name)
    make_user(hub, "specialist", username=people.thoracic, specialties=[THORACIC])
    make_user(hub, "specialist", username=people.thoracic_2, specialties=[THORACIC])
    make_user(hub, "specialist", username=people.derm, specialties=[DERMATOLOGY])
    make_user(hub, "admin", username=people.admin)
    return people


def login(client: TestClient, username: str) -> dict[str, str]:
    """The Authorization header of an existing user, through the real password grant."""
    return login_as(client, username=username)


def ehr_login(client: TestClient, name: str, clinic: str, scopes: list[str]) -> dict[str, str]:
    """Register an EHR client of `clinic` with a fresh ES384 key, and its Authorization header
    through the client_credentials grant (a real signed SMART client assertion)."""
    hub: Hub = client.app.state.hub  # type: ignore[attr-defined]
    info, key = make_client(hub, name, clinic=clinic, scopes=scopes)
    return client_token(client, info.id, key, scope=" ".join(scopes))
