"""Cases: one consult per study (or referral), its FHIR Task state, routing and the worklists."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from sqlalchemy import case, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from saf.db import transaction
from saf.hub import Hub
from saf.models import Case, CaseEvent, CaseStudy, Clinic, Series, Study, utcnow
from saf.routing import CaseFacts, RuleSet

Priority = Literal["stat", "urgent", "routine"]


class TaskStatus(StrEnum):
    """FHIR R4 Task.status codes: the state of a case."""

    REQUESTED = "requested"
    RECEIVED = "received"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    IN_PROGRESS = "in-progress"
    ON_HOLD = "on-hold"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


ALLOWED: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.REQUESTED: frozenset(
        {TaskStatus.RECEIVED, TaskStatus.ACCEPTED, TaskStatus.REJECTED, TaskStatus.CANCELLED}
    ),
    TaskStatus.RECEIVED: frozenset(
        {TaskStatus.ACCEPTED, TaskStatus.REJECTED, TaskStatus.CANCELLED}
    ),
    TaskStatus.ACCEPTED: frozenset(
        {
            TaskStatus.IN_PROGRESS,
            TaskStatus.ON_HOLD,
            TaskStatus.REQUESTED,  # released back to the worklist
            TaskStatus.REJECTED,
            TaskStatus.CANCELLED,
        }
    ),
    TaskStatus.IN_PROGRESS: frozenset(
        {TaskStatus.ON_HOLD, TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}
    ),
    TaskStatus.ON_HOLD: frozenset({TaskStatus.IN_PROGRESS, TaskStatus.CANCELLED}),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.REJECTED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
    TaskStatus.FAILED: frozenset(),
}
"""Legal status changes; anything else is refused (terminal states allow none)."""

OPEN = frozenset(
    {
        TaskStatus.REQUESTED,
        TaskStatus.RECEIVED,
        TaskStatus.ACCEPTED,
        TaskStatus.IN_PROGRESS,
        TaskStatus.ON_HOLD,
    }
)
"""Statuses of a case that is still on a worklist."""

CLAIMABLE = frozenset({TaskStatus.REQUESTED, TaskStatus.RECEIVED})
"""Statuses from which a specialist may claim a case."""

PRIORITY_ORDER: tuple[Priority, ...] = ("stat", "urgent", "routine")
"""Worklist order: most urgent first."""


class CaseError(ValueError):
    """A case operation that cannot be done; the message says why."""


class IllegalTransition(CaseError):
    """A status change the Task state machine does not allow."""


class ClaimRefused(CaseError):
    """The case is already claimed or no longer claimable."""


@dataclass(frozen=True)
class WorklistItem:
    """One line of a worklist (no PHI: ids, clinic, modalities, state, times)."""

    case_id: str
    clinic: str
    priority: str
    status: str
    due_at: datetime
    assigned_to: str | None
    modalities: tuple[str, ...]
    study_description: str | None

    def overdue(self, now: datetime) -> bool:
        """Whether the due time has passed."""
        return self.due_at < now


def due_at(hub: Hub, priority: Priority, start: datetime) -> datetime:
    """When a case of `priority` created at `start` is due (configured turnaround)."""
    settings = hub.settings
    seconds = {
        "stat": settings.turnaround_stat_seconds,
        "urgent": settings.turnaround_urgent_seconds,
        "routine": settings.turnaround_routine_seconds,
    }[priority]
    return start + timedelta(seconds=seconds)


def on_study_stable(hub: Hub, study_id: str, rules: RuleSet) -> str:
    """Make or join the case of a complete study and route it; idempotent; returns the case id.

    A study joins an open case of the same clinic and patient with the same accession
    number;
    otherwise it makes a new routine case (a referral, when one arrives, sets priority
    and specialty). Running it again for the same study changes nothing.
    """
    for _attempt in range(3):
        try:
            with transaction(hub.sessions) as session:
                return _case_for_study(hub, session, study_id, rules)
        except IntegrityError:
            continue  # a concurrent run linked the study first: the next pass finds it
    raise CaseError(f"study {study_id}: could not link it to a case")


def _case_for_study(hub: Hub, session: Session, study_id: str, rules: RuleSet) -> str:
    linked = session.scalar(select(CaseStudy.case_id).where(CaseStudy.study_pk == study_id))
    if linked is not None:
        return linked
    study = session.get(Study, study_id)
    if study is None:
        raise CaseError(f"no study {study_id}")
    existing = None
    if study.accession_number:
        existing = session.scalar(
            select(Case).where(
                Case.clinic_id == study.clinic_id,
                Case.patient_pk == study.patient_pk,
                Case.accession_number == study.accession_number,
                Case.status.in_(list(OPEN)),
            )
        )
    if existing is not None:
        session.add(CaseStudy(study_pk=study_id, case_id=existing.id))
        _record(session, existing.id, "saf", existing.status, existing.status, "study added")
        return existing.id
    facts = _facts(session, study, priority="routine", requested_specialty=None)
    rule = rules.route(facts)
    now = utcnow()
    new = Case(
        clinic_id=study.clinic_id,
        patient_pk=study.patient_pk,
        status=TaskStatus.REQUESTED,
        priority="routine",
        due_at=due_at(hub, "routine", now),
        specialty=rule.worklist,
        routed_by=rule.name,
        accession_number=study.accession_number,
        created_at=now,
        updated_at=now,
    )
    session.add(new)
    session.flush()
    session.add(CaseStudy(study_pk=study_id, case_id=new.id))
    _record(session, new.id, "saf", None, TaskStatus.REQUESTED, f"routed by rule {rule.name}")
    session.flush()
    return new.id


def _facts(
    session: Session, study: Study, *, priority: Priority, requested_specialty: str | None
) -> CaseFacts:
    rows = session.execute(
        select(Series.modality, Series.body_part_examined).where(Series.study_pk == study.id)
    ).all()
    clinic = session.get_one(Clinic, study.clinic_id)
    return CaseFacts(
        modalities=frozenset(m for m, _ in rows if m),
        body_parts=frozenset(b for _, b in rows if b),
        clinic=clinic.name,
        requested_specialty=requested_specialty,
        priority=priority,
    )


def transition(hub: Hub, case_id: str, to: TaskStatus, *, actor: str, note: str = "") -> TaskStatus:
    """Move a case to `to` if the state machine allows it from its current status."""
    with transaction(hub.sessions) as session:
        current = session.scalar(select(Case.status).where(Case.id == case_id))
        if current is None:
            raise CaseError(f"no case {case_id}")
        before = TaskStatus(current)
        if to not in ALLOWED[before]:
            raise IllegalTransition(f"case {case_id}: {before} -> {to} is not allowed")
        changes: dict[str, object] = {"status": to, "updated_at": utcnow()}
        if to is TaskStatus.REQUESTED:
            changes["assigned_to"] = None  # released
        done = session.execute(
            update(Case).where(Case.id == case_id, Case.status == before).values(**changes)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise CaseError(f"case {case_id} changed meanwhile; try again")
        _record(session, case_id, actor, before, to, note)
    return to


def claim(hub: Hub, case_id: str, specialist: str) -> None:
    """Give the case to `specialist` (status accepted); a second claim is refused."""
    with transaction(hub.sessions) as session:
        row = session.execute(
            select(Case.status, Case.assigned_to).where(Case.id == case_id)
        ).first()
        if row is None:
            raise CaseError(f"no case {case_id}")
        status, owner = row
        if owner is not None or status not in CLAIMABLE:
            reason = f"claimed by {owner}" if owner else f"status is {status}"
            raise ClaimRefused(f"case {case_id} cannot be claimed: {reason}")
        done = session.execute(
            update(Case)
            .where(Case.id == case_id, Case.assigned_to.is_(None), Case.status == status)
            .values(status=TaskStatus.ACCEPTED, assigned_to=specialist, updated_at=utcnow())
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise ClaimRefused(f"case {case_id} cannot be claimed: claimed meanwhile")
        _record(session, case_id, specialist, status, TaskStatus.ACCEPTED, "claimed")


def worklist(hub: Hub, specialty: str, *, limit: int = 50, offset: int = 0) -> list[WorklistItem]:
    """Open cases of a worklist, most urgent first, then by due time (paged)."""
    rank = case(
        *((Case.priority == p, i) for i, p in enumerate(PRIORITY_ORDER)),
        else_=len(PRIORITY_ORDER),
    )
    with hub.sessions() as session:
        rows = session.execute(
            select(Case, Clinic.name)
            .join(Clinic, Clinic.id == Case.clinic_id)
            .where(Case.specialty == specialty, Case.status.in_(list(OPEN)))
            .order_by(rank, Case.due_at, Case.id)
            .limit(limit)
            .offset(offset)
        ).all()
        items = []
        for c, clinic_name in rows:
            study_ids = select(CaseStudy.study_pk).where(CaseStudy.case_id == c.id)
            modalities = session.scalars(
                select(Series.modality).where(Series.study_pk.in_(study_ids)).distinct()
            )
            description = session.scalar(
                select(Study.study_description)
                .where(Study.id.in_(study_ids))
                .order_by(Study.created_at)
                .limit(1)
            )
            items.append(
                WorklistItem(
                    case_id=c.id,
                    clinic=clinic_name,
                    priority=c.priority,
                    status=c.status,
                    due_at=c.due_at,
                    assigned_to=c.assigned_to,
                    modalities=tuple(sorted(m for m in modalities if m)),
                    study_description=description,
                )
            )
    return items


def history(hub: Hub, case_id: str) -> list[CaseEvent]:
    """A case's events, oldest first."""
    with hub.sessions() as session:
        return list(
            session.scalars(
                select(CaseEvent).where(CaseEvent.case_id == case_id).order_by(CaseEvent.id)
            )
        )


def _record(
    session: Session,
    case_id: str,
    actor: str,
    before: str | None,
    after: str,
    note: str,
) -> None:
    session.add(
        CaseEvent(case_id=case_id, actor=actor, from_status=before, to_status=after, note=note)
    )
