"""Cases: made from complete studies, routed by rules, ordered on worklists, claimed once."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from saf.cases import (
    ALLOWED,
    ClaimRefused,
    IllegalTransition,
    TaskStatus,
    claim,
    history,
    on_study_stable,
    transition,
    worklist,
)
from saf.cli import app
from saf.hub import Hub
from saf.ingest import ingest_part10
from saf.models import Case, Study, utcnow
from saf.routing import parse_rules
from tests.factories import make_clinic, make_study

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


def _ingest_study(hub: Hub, tmp_path: Path, kind: str = "ct", *, seed: int = 1, **kw: str) -> str:
    sender = make_clinic(hub)
    out = tmp_path / f"{kind}-{len(list(tmp_path.iterdir()))}"
    paths = make_study(out, kind, count=2, seed=seed, **kw)
    result = [ingest_part10(hub, p, sender) for p in paths][-1]
    with hub.sessions() as session:
        return str(
            session.scalar(
                select(Study.id).where(Study.study_instance_uid == result.study_instance_uid)
            )
        )


def test_complete_study_makes_one_routed_case(hub: Hub, tmp_path: Path) -> None:
    study_id = _ingest_study(hub, tmp_path)

    case_id = on_study_stable(hub, study_id, RULES)
    again = on_study_stable(hub, study_id, RULES)

    assert again == case_id
    [item] = worklist(hub, "thoracic-radiology")
    assert (item.case_id, item.status, item.priority) == (case_id, "requested", "routine")
    assert item.modalities == ("CT",) and item.clinic == "Clinic A"
    assert item.due_at - utcnow() > timedelta(hours=71)  # routine turnaround: 3 days
    assert [e.note for e in history(hub, case_id)] == ["routed by rule chest-ct"]


def test_routing_uses_the_study_modalities(hub: Hub, tmp_path: Path) -> None:
    photo_case = on_study_stable(hub, _ingest_study(hub, tmp_path, "photo"), RULES)
    mr_case = on_study_stable(hub, _ingest_study(hub, tmp_path, "mr"), RULES)

    assert [i.case_id for i in worklist(hub, "dermatology")] == [photo_case]
    assert [i.case_id for i in worklist(hub, "general-radiology")] == [mr_case]


def test_studies_with_one_accession_number_join_one_case(hub: Hub, tmp_path: Path) -> None:
    same = {"accession_number": "ACC-77", "patient_id": "MRN-1"}
    first = _ingest_study(hub, tmp_path, "ct", **same)
    second = _ingest_study(hub, tmp_path, "mr", **same)
    other_patient = _ingest_study(hub, tmp_path, "ct", seed=5, accession_number="ACC-77")

    assert on_study_stable(hub, first, RULES) == on_study_stable(hub, second, RULES)
    assert on_study_stable(hub, other_patient, RULES) != on_study_stable(hub, first, RULES)
    first_item = next(i for i in worklist(hub, "thoracic-radiology") if "MR" in i.modalities)
    assert first_item.modalities == ("CT", "MR")


def test_worklist_order_priority_then_due_time(hub: Hub, tmp_path: Path) -> None:
    ids = [on_study_stable(hub, _ingest_study(hub, tmp_path, seed=n), RULES) for n in range(4)]
    now = utcnow()
    with hub.sessions() as session, session.begin():
        for case_id, priority, hours in zip(
            ids, ["routine", "stat", "routine", "urgent"], [5, 9, 1, 2], strict=True
        ):
            session.execute(
                update(Case)
                .where(Case.id == case_id)
                .values(priority=priority, due_at=now + timedelta(hours=hours))
            )

    order = [i.case_id for i in worklist(hub, "thoracic-radiology")]
    page = [i.case_id for i in worklist(hub, "thoracic-radiology", limit=2, offset=2)]

    assert order == [ids[1], ids[3], ids[2], ids[0]]
    assert page == [ids[2], ids[0]]


def test_claim_once_and_legal_transitions_only(hub: Hub, tmp_path: Path) -> None:
    case_id = on_study_stable(hub, _ingest_study(hub, tmp_path), RULES)

    claim(hub, case_id, "dr.house")
    with pytest.raises(ClaimRefused, match=r"claimed by dr\.house"):
        claim(hub, case_id, "dr.wilson")
    with pytest.raises(IllegalTransition, match=r"accepted -> completed"):
        transition(hub, case_id, TaskStatus.COMPLETED, actor="dr.house")
    transition(hub, case_id, TaskStatus.IN_PROGRESS, actor="dr.house")
    transition(hub, case_id, TaskStatus.COMPLETED, actor="dr.house", note="report sent")

    assert worklist(hub, "thoracic-radiology") == []  # completed cases leave the worklist
    events = [(e.from_status, e.to_status, e.actor) for e in history(hub, case_id)]
    assert events[1:] == [
        ("requested", "accepted", "dr.house"),
        ("accepted", "in-progress", "dr.house"),
        ("in-progress", "completed", "dr.house"),
    ]
    for terminal in (TaskStatus.COMPLETED, TaskStatus.CANCELLED):
        assert ALLOWED[terminal] == frozenset()


def test_release_puts_the_case_back(hub: Hub, tmp_path: Path) -> None:
    case_id = on_study_stable(hub, _ingest_study(hub, tmp_path), RULES)
    claim(hub, case_id, "dr.house")

    transition(hub, case_id, TaskStatus.REQUESTED, actor="dr.house", note="released")
    claim(hub, case_id, "dr.wilson")

    [item] = worklist(hub, "thoracic-radiology")
    assert (item.status, item.assigned_to) == ("accepted", "dr.wilson")


def test_saf_worklist_command_lists_the_case(hub: Hub, tmp_path: Path) -> None:
    case_id = on_study_stable(hub, _ingest_study(hub, tmp_path), RULES)
    env = {"COLUMNS": "200", "SAF_DATABASE_URL": hub.settings.database_url or ""}
    args = ["--data-dir", str(hub.settings.data_dir), "worklist", "thoracic-radiology"]

    result = CliRunner().invoke(app, args, env=env)

    assert result.exit_code == 0, result.output
    assert case_id in result.output and "routine" in result.output and "CT" in result.output
