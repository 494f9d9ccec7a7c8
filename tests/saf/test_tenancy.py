"""Tenancy: each caller sees exactly its own rows, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from saf import audit, tenancy
from saf.cases import TaskStatus, claim, transition
from saf.hub import Hub
from saf.identity import SYSTEM, Principal
from saf.models import Case, Instance, Patient, Series, Study
from tests.saf.tenants import (
    ADMIN,
    DERMATOLOGY,
    THORACIC,
    World,
    clinician,
    make_world,
    specialist,
)


@pytest.fixture
def world(hub: Hub, tmp_path: Path) -> World:
    return make_world(hub, tmp_path)


def _seen(hub: Hub, principal: Principal) -> dict[str, set[str]]:
    with hub.sessions() as session:
        return {
            "cases": {c.id for c in session.scalars(tenancy.visible_cases(principal))},
            "studies": {s.id for s in session.scalars(tenancy.visible_studies(principal))},
            "series": {s.id for s in session.scalars(tenancy.visible_series(principal))},
            "instances": {i.id for i in session.scalars(tenancy.visible_instances(principal))},
            "patients": {p.id for p in session.scalars(tenancy.visible_patients(principal))},
        }


def test_clinician_sees_own_clinic_only(hub: Hub, world: World) -> None:
    seen_a = _seen(hub, clinician(world.a))
    seen_b = _seen(hub, clinician(world.b))

    assert seen_a == {
        "cases": set(world.a.cases),
        "studies": set(world.a.studies),
        "series": set(world.a.series),
        "instances": set(world.a.instances),
        "patients": set(world.a.patients),
    }
    assert seen_b["cases"] == set(world.b.cases) and len(seen_b["cases"]) == 2
    assert seen_b["instances"] == set(world.b.instances)
    assert not seen_a["instances"] & seen_b["instances"]


def test_getters_answer_none_for_another_clinics_objects(hub: Hub, world: World) -> None:
    caller = clinician(world.a)
    with hub.sessions() as session:
        assert tenancy.get_case(session, caller, world.a.cases[0]) is not None
        assert tenancy.get_study(session, caller, world.a.studies[0]) is not None
        assert tenancy.get_series(session, caller, world.a.series[0]) is not None
        assert tenancy.get_instance(session, caller, world.a.instances[0]) is not None
        assert tenancy.get_patient(session, caller, world.a.patients[0]) is not None

        assert tenancy.get_case(session, caller, world.b.cases[0]) is None
        assert tenancy.get_study(session, caller, world.b.studies[0]) is None
        assert tenancy.get_series(session, caller, world.b.series[0]) is None
        assert tenancy.get_instance(session, caller, world.b.instances[0]) is None
        assert tenancy.get_patient(session, caller, world.b.patients[0]) is None
        assert tenancy.get_case(session, caller, "0" * 32) is None  # same answer as missing


def test_specialist_sees_only_cases_routed_to_their_specialties(hub: Hub, world: World) -> None:
    thoracic = _seen(hub, specialist(THORACIC))
    derm = _seen(hub, specialist(DERMATOLOGY))
    both = _seen(hub, specialist(THORACIC, DERMATOLOGY))

    assert thoracic["cases"] == {world.a.cases[0], world.ct_case_b}
    assert derm["cases"] == {world.derm_case_b}
    assert both["cases"] == set(world.a.cases) | set(world.b.cases)
    ct_study_b, derm_study_b = world.b.studies
    assert thoracic["studies"] == {world.a.studies[0], ct_study_b}
    assert derm["studies"] == {derm_study_b}
    with hub.sessions() as session:
        derm_series = set(session.scalars(select(Series.id).where(Series.study_pk == derm_study_b)))
        derm_patient = session.get_one(Study, derm_study_b).patient_pk
    assert derm["series"] == derm_series
    assert not thoracic["series"] & derm_series
    assert derm["patients"] == {derm_patient}
    assert derm_patient not in thoracic["patients"]
    assert derm["instances"] and derm["instances"] < set(world.b.instances)
    assert not derm["instances"] & thoracic["instances"]
    with hub.sessions() as session:
        caller = specialist(DERMATOLOGY)
        assert tenancy.get_study(session, caller, ct_study_b) is None
        assert tenancy.get_case(session, caller, world.ct_case_b) is None
        assert tenancy.get_instance(session, caller, world.a.instances[0]) is None


def test_specialist_without_specialties_sees_nothing(hub: Hub, world: World) -> None:
    assert _seen(hub, specialist()) == {k: set() for k in _seen(hub, specialist())}


def test_cancelled_before_claim_leaves_the_worklist_view(hub: Hub, world: World) -> None:
    transition(hub, world.ct_case_b, TaskStatus.CANCELLED, actor="saf", note="clinic withdrew")

    assert _seen(hub, specialist(THORACIC))["cases"] == {world.a.cases[0]}
    assert world.ct_case_b in _seen(hub, clinician(world.b))["cases"]  # still the clinic's


def test_a_rejected_case_stays_visible_to_its_assignee_only(hub: Hub, world: World) -> None:
    claim(hub, world.ct_case_b, "dr.one")
    transition(hub, world.ct_case_b, TaskStatus.REJECTED, actor="dr.one", note="wrong body part")

    assert world.ct_case_b in _seen(hub, specialist(THORACIC, name="dr.one"))["cases"]
    assert world.ct_case_b not in _seen(hub, specialist(THORACIC, name="dr.two"))["cases"]
    # ...but not when the case left their specialties' worklists altogether
    assert world.ct_case_b not in _seen(hub, specialist(DERMATOLOGY, name="dr.one"))["cases"]


def test_claimed_and_completed_cases_stay_visible_on_the_worklist(hub: Hub, world: World) -> None:
    claim(hub, world.ct_case_b, "dr.one")
    transition(hub, world.ct_case_b, TaskStatus.IN_PROGRESS, actor="dr.one")
    transition(hub, world.ct_case_b, TaskStatus.COMPLETED, actor="dr.one")

    assert world.ct_case_b in _seen(hub, specialist(THORACIC, name="dr.two"))["cases"]


def test_admin_sees_no_phi_but_the_audit_trail(hub: Hub, world: World) -> None:
    audit.record(hub, "read", clinician(world.a), entity_type="Case", entity_id=world.a.cases[0])

    assert all(not ids for ids in _seen(hub, ADMIN).values())
    with hub.sessions() as session:
        assert len(session.scalars(tenancy.visible_audit(ADMIN)).all()) == 1
        assert session.scalars(tenancy.visible_audit(clinician(world.a))).all() == []
        assert session.scalars(tenancy.visible_audit(specialist(THORACIC))).all() == []
    assert tenancy.can_read_audit(ADMIN) and tenancy.can_read_audit(SYSTEM)
    assert not tenancy.can_read_audit(clinician(world.a))


def test_system_sees_everything(hub: Hub, world: World) -> None:
    seen = _seen(hub, SYSTEM)

    assert seen["cases"] == set(world.a.cases) | set(world.b.cases)
    assert seen["instances"] == set(world.a.instances) | set(world.b.instances)
    assert seen["patients"] == set(world.a.patients) | set(world.b.patients)


def test_clients_and_aes_are_their_clinics_not_the_system(hub: Hub, world: World) -> None:
    # EHR clients and AEs carry role "system"; only kind "system" is the hub itself.
    ehr = Principal(
        kind="client", id="ehr-b", name="ehr-b", role="system", clinic_id=world.b.clinic_id
    )
    ae = Principal(
        kind="ae", id="pacs-a", name="PACS_A", role="system", clinic_id=world.a.clinic_id
    )
    orphan = Principal(kind="client", id="ehr-x", name="ehr-x", role="system")

    assert _seen(hub, ehr)["studies"] == set(world.b.studies)
    assert _seen(hub, ae)["instances"] == set(world.a.instances)
    assert all(not ids for ids in _seen(hub, orphan).values())
    assert not tenancy.can_read_audit(ehr)


def test_a_specialist_with_a_clinic_is_still_a_specialist(hub: Hub, world: World) -> None:
    odd = Principal(
        kind="user",
        id="u",
        name="dr.odd",
        role="specialist",
        clinic_id=world.a.clinic_id,
        specialties=frozenset({DERMATOLOGY}),
    )

    assert _seen(hub, odd)["cases"] == {world.derm_case_b}


def test_unknown_role_sees_nothing(hub: Hub, world: World) -> None:
    odd = Principal(kind="user", id="u", name="x", role="system", clinic_id=world.a.clinic_id)

    assert all(not ids for ids in _seen(hub, odd).values())


@pytest.mark.parametrize("who", ["clinician", "specialist"])
def test_clauses_compose_with_joins_to_the_same_tables(hub: Hub, world: World, who: str) -> None:
    caller = clinician(world.a) if who == "clinician" else specialist(THORACIC)
    expected = set(world.a.series) if who == "clinician" else None
    query = (
        select(Instance.id, Series.id, Study.id, Patient.id, Case.id)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .join(Patient, Patient.id == Study.patient_pk)
        .join(Case, Case.patient_pk == Patient.id)
        .where(
            tenancy.instance_clause(caller),
            tenancy.series_clause(caller),
            tenancy.study_clause(caller),
            tenancy.patient_clause(caller),
            tenancy.case_clause(caller),
        )
    )
    with hub.sessions() as session:
        rows = session.execute(query).all()
    seen = _seen(hub, caller)
    assert rows
    assert {r[0] for r in rows} == seen["instances"]
    assert {r[1] for r in rows} == (expected or seen["series"])
    assert {r[4] for r in rows} <= seen["cases"]
