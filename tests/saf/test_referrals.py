"""Referrals and studies find one case, whichever arrives first."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from saf.cases import CaseError, Referral, claim, history, on_referral, on_study_stable, worklist
from saf.hub import Hub
from saf.ingest import ingest_part10
from saf.models import Case, CaseReferral, Study
from saf.routing import parse_rules
from tests.factories import make_clinic, make_study

RULES = parse_rules(
    """
[[rule]]
name = "asked for cardiology"
requested_specialty = ["cardiology"]
worklist = "cardiology"

[[rule]]
name = "ct"
modality = ["CT"]
worklist = "radiology"

[[rule]]
name = "default"
worklist = "general"
"""
)


def _study(hub: Hub, tmp_path: Path, *, seed: int = 1, **kw: str) -> str:
    sender = make_clinic(hub)
    paths = make_study(tmp_path / f"s{seed}-{len(list(tmp_path.iterdir()))}", "ct", seed=seed, **kw)
    uid = [ingest_part10(hub, p, sender) for p in paths][-1].study_instance_uid
    with hub.sessions() as session:
        return str(session.scalar(select(Study.id).where(Study.study_instance_uid == uid)))


def _referral(hub: Hub, **kw: str) -> Referral:
    fields = {"patient_id": "MRN-1", "service_request_id": "urn:sys|SR-1", **kw}
    return Referral(clinic_id=make_clinic(hub).clinic_id, **fields)  # type: ignore[arg-type]


def _study_uid(hub: Hub, study_id: str) -> str:
    with hub.sessions() as session:
        return str(session.get_one(Study, study_id).study_instance_uid)


def _cases(hub: Hub) -> int:
    with hub.sessions() as session:
        return int(session.scalar(select(func.count(Case.id))) or 0)


def test_referral_first_then_study_with_its_accession(hub: Hub, tmp_path: Path) -> None:
    referral = _referral(
        hub, accession_number="ACC-1", requested_specialty="cardiology", priority="urgent"
    )
    case_id = on_referral(hub, referral, RULES)
    assert on_referral(hub, referral, RULES) == case_id  # the same referral again
    [item] = worklist(hub, "cardiology")
    assert (item.case_id, item.priority, item.modalities) == (case_id, "urgent", ())

    study_id = _study(hub, tmp_path, accession_number="ACC-1", patient_id="MRN-1")
    assert on_study_stable(hub, study_id, RULES) == case_id
    [item] = worklist(hub, "cardiology")  # the referral's specialty still decides
    assert item.modalities == ("CT",) and _cases(hub) == 1


def test_study_first_then_referral_raises_priority_and_reroutes(hub: Hub, tmp_path: Path) -> None:
    study_id = _study(hub, tmp_path, accession_number="ACC-2", patient_id="MRN-1")
    case_id = on_study_stable(hub, study_id, RULES)
    [routine] = worklist(hub, "radiology")
    referral = _referral(
        hub, accession_number="ACC-2", requested_specialty="cardiology", priority="stat"
    )

    assert on_referral(hub, referral, RULES) == case_id
    assert worklist(hub, "radiology") == []
    [item] = worklist(hub, "cardiology")
    assert item.priority == "stat" and item.due_at < routine.due_at
    notes = [e.note for e in history(hub, case_id)]
    assert notes == [
        "routed by rule ct",
        "referral added",
        "routed again by rule asked for cardiology",
    ]


@pytest.mark.parametrize("referral_first", [True, False])
def test_referral_naming_the_study_uid_joins_it(
    hub: Hub, tmp_path: Path, referral_first: bool
) -> None:
    study_id = _study(hub, tmp_path, accession_number="", patient_id="MRN-1")
    referral = _referral(hub, study_instance_uid=_study_uid(hub, study_id))
    if referral_first:
        first, second = on_referral(hub, referral, RULES), on_study_stable(hub, study_id, RULES)
    else:
        first, second = on_study_stable(hub, study_id, RULES), on_referral(hub, referral, RULES)
    assert first == second and _cases(hub) == 1


def test_a_claimed_case_is_not_rerouted(hub: Hub, tmp_path: Path) -> None:
    case_id = on_study_stable(
        hub, _study(hub, tmp_path, accession_number="ACC-3", patient_id="MRN-1"), RULES
    )
    claim(hub, case_id, "dr.rad")
    referral = _referral(hub, accession_number="ACC-3", requested_specialty="cardiology")
    assert on_referral(hub, referral, RULES) == case_id
    with hub.sessions() as session:
        assert session.get_one(Case, case_id).specialty == "radiology"


def test_another_patient_or_accession_makes_another_case(hub: Hub, tmp_path: Path) -> None:
    case_id = on_study_stable(
        hub, _study(hub, tmp_path, accession_number="ACC-4", patient_id="MRN-1"), RULES
    )
    other_patient = _referral(hub, accession_number="ACC-4", patient_id="MRN-2")
    other_accession = _referral(hub, accession_number="ACC-5", service_request_id="urn:sys|SR-2")
    assert on_referral(hub, other_patient, RULES) != case_id
    assert on_referral(hub, other_accession, RULES) != case_id
    assert _cases(hub) == 3
    with hub.sessions() as session:
        assert session.scalar(select(func.count(CaseReferral.id))) == 2


def test_bad_priority_is_refused(hub: Hub) -> None:
    with pytest.raises(CaseError, match="priority must be one of"):
        on_referral(hub, _referral(hub, priority="whenever"), RULES)
