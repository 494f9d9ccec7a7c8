"""Two clinics' worth of real data (made through the ingest path and the pipeline), for
the tenancy, API and route-protection tests."""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fastapi.testclient import TestClient
from pydicom import dcmread
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


def stow_body(study_instance_uid: str) -> tuple[bytes, str]:
    """A STOW-RS request body (content, Content-Type) holding one new CT instance filed under
    `study_instance_uid`, of a patient no test world has (WALKER^STOW)."""
    with tempfile.TemporaryDirectory() as tmp:
        [path] = make_study(
            Path(tmp), "ct", count=1, seed=97, patient_id="STOW-1", patient_name="WALKER^STOW"
        )
        ds = dcmread(path)
    ds.StudyInstanceUID = study_instance_uid
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    boundary = "walker-stow-boundary"
    content = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + out.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return content, f'multipart/related; type="application/dicom"; boundary={boundary}'


def fhir_referral(resource_id: str | None = None, study_instance_uid: str = "") -> bytes:
    """Clinic B's chest CT referral as FHIR JSON: a ServiceRequest whose subject is the
    clinic's Patient ID PB1 (a logical reference, so sending it anywhere names nothing of
    clinic B's stored objects)."""
    import json

    identifiers = [{"system": "urn:oid:1.2.3.99.1", "value": "REF-B-1"}]
    if study_instance_uid:
        identifiers.append({"system": "urn:dicom:uid", "value": f"urn:oid:{study_instance_uid}"})
    sr: dict[str, object] = {
        "resourceType": "ServiceRequest",
        "identifier": identifiers,
        "status": "active",
        "intent": "order",
        "subject": {"identifier": {"system": "urn:oid:1.2.3.99.2", "value": "PB1"}},
    }
    if resource_id:
        sr["id"] = resource_id
    return json.dumps(sr).encode()


def add_fhir_referral(hub: Hub, world: World) -> tuple[str, str]:
    """Clinic B's FHIR Patient (PB1) and its referral for the chest CT case, stored the way
    its EHR would send them; returns (Patient id, ServiceRequest id)."""
    import json

    from saf import fhir_store
    from saf.models import Case, CaseStudy

    ehr = Principal(
        kind="client", id="ehr-b", name="ehr-b", role="system", clinic_id=world.b.clinic_id
    )
    with hub.sessions() as session:
        uid = session.scalars(
            select(Study.study_instance_uid)
            .join(CaseStudy, CaseStudy.study_pk == Study.id)
            .join(Case, Case.id == CaseStudy.case_id)
            .where(Case.id == world.ct_case_b)
        ).first()
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3.99.2", "value": "PB1"}],
        "name": [{"family": "BRAVO", "given": ["BERT"]}],
    }
    stored_patient = fhir_store.create(hub, ehr, patient, RULES)
    sr = json.loads(fhir_referral(study_instance_uid=uid or ""))
    sr["subject"] = {"reference": f"Patient/{stored_patient.id}"}
    stored_sr = fhir_store.create(hub, ehr, sr, RULES)
    assert stored_sr.case_id == world.ct_case_b, "the referral must join the chest CT case"
    return stored_patient.id, stored_sr.id


def subscription_body(subscription_id: str | None = None) -> bytes:
    """A FHIR Subscription (R4 backport) to the case-status topic whose endpoint refuses
    connections (https on the discard port of the loopback: the handshake fails at once)."""
    import json

    from saf.subscriptions import TOPIC

    sub: dict[str, object] = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "walker",
        "criteria": TOPIC,
        "channel": {"type": "rest-hook", "endpoint": "https://127.0.0.1:9/hook"},
    }
    if subscription_id:
        sub["id"] = subscription_id
    return json.dumps(sub).encode()


def add_subscription(hub: Hub, world: World) -> str:
    """Clinic B's FHIR Subscription, made as its EHR would; returns its id."""
    import json

    from saf import subscriptions

    ehr = Principal(
        kind="client", id="ehr-b", name="ehr-b", role="system", clinic_id=world.b.clinic_id
    )
    made = subscriptions.create(hub, ehr, json.loads(subscription_body()))
    return str(made["id"])
