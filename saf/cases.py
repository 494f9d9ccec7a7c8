"""Cases: one consult per study (or referral), its FHIR Task state, routing and the worklists."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal, cast

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from saf.crypto import open_value, reseal_value, seal_value, value_key_id
from saf.db import insert_all, transaction
from saf.hub import Hub
from saf.identity import Principal
from saf.models import (
    Case,
    CaseEvent,
    CaseReferral,
    CaseStudy,
    Clinic,
    OutboxEvent,
    Patient,
    Series,
    Study,
    User,
    new_id,
    utcnow,
)
from saf.routing import CaseFacts, Rule, RuleSet

Priority = Literal["stat", "urgent", "routine"]

CASE_STATUS_TOPIC = "case.status"
"""Outbox topic of a case status change (payload: case_id, from, to, actor)."""


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

    A study joins an open case of the same clinic and patient that shares its accession
    number, or whose referral names its Study Instance UID; otherwise it makes a new
    routine case. Joining a case nobody has claimed yet routes it again with what is
    now known (modalities, the referral's specialty and priority). Running it again
    for the same study changes nothing.
    """
    return _retrying(hub, lambda session: _case_for_study(hub, session, study_id, rules), study_id)


@dataclass(frozen=True)
class Referral:
    """What a referral (FHIR ServiceRequest) tells about its case."""

    clinic_id: str
    patient_id: str
    """The clinic's patient identifier (DICOM Patient ID)."""
    service_request_id: str
    """Its business identifier ("system|value"), unique within the clinic."""
    accession_number: str | None = None
    study_instance_uid: str | None = None
    requested_specialty: str | None = None
    priority: Priority = "routine"


def on_referral(hub: Hub, referral: Referral, rules: RuleSet) -> str:
    """Make or join the case of a referral and route it; idempotent; returns the case id.

    A referral joins an open case of the same clinic and patient with its accession
    number or holding its study (whichever came first, the study or the referral);
    its priority and requested specialty then apply (routing again while unclaimed).
    The same referral twice changes nothing.
    """
    if referral.priority not in PRIORITY_ORDER:
        raise CaseError(f"priority must be one of {', '.join(PRIORITY_ORDER)}")
    return _retrying(
        hub,
        lambda session: _case_for_referral(hub, session, referral, rules),
        referral.service_request_id,
    )


def on_referrals(hub: Hub, referrals: Sequence[Referral], rules: RuleSet) -> list[str | CaseError]:
    """`on_referral` for many referrals (a transaction Bundle's) in one transaction: the
    case id of each, or the CaseError that kept it from a case. Same outcome as one by
    one in this order; when a concurrent run linked one of them first (a unique
    constraint, a deadlock), they are done again one by one, each retrying as
    `on_referral` does."""
    results: list[str | CaseError] = []
    for referral in referrals:
        ok = referral.priority in PRIORITY_ORDER
        results.append(
            "" if ok else CaseError(f"priority must be one of {', '.join(PRIORITY_ORDER)}")
        )
    # In one order for everyone (by patient): two Bundles naming the same patients lock
    # their rows in the same order, so they wait for each other instead of deadlocking.
    todo = sorted(
        (i for i, r in enumerate(results) if r == ""),
        key=lambda i: (referrals[i].clinic_id, referrals[i].patient_id, i),
    )
    if not todo:
        return results
    try:
        with transaction(hub.sessions) as session:
            linked = _cases_for_referrals(hub, session, [referrals[i] for i in todo], rules)
    except (IntegrityError, OperationalError):
        # A concurrent run made one of these first, or (PostgreSQL) a deadlock with a
        # writer that locks in another order: nothing was kept; one by one, retrying.
        for i in todo:
            try:
                results[i] = on_referral(hub, referrals[i], rules)
            except CaseError as exc:
                results[i] = exc
        return results
    for i, case_id in zip(todo, linked, strict=True):
        results[i] = case_id
    return results


def _retrying(hub: Hub, link: Callable[[Session], str], what: str) -> str:
    for _attempt in range(3):
        try:
            with transaction(hub.sessions) as session:
                return link(session)
        except IntegrityError:
            continue  # a concurrent run linked it first: the next pass finds it
    raise CaseError(f"{what}: could not link it to a case")


def _case_for_study(hub: Hub, session: Session, study_id: str, rules: RuleSet) -> str:
    linked = session.scalar(select(CaseStudy.case_id).where(CaseStudy.study_pk == study_id))
    if linked is not None:
        return linked
    study = session.get(Study, study_id)
    if study is None:
        raise CaseError(f"no study {study_id}")
    matches = [CaseReferral.study_instance_uid == study.study_instance_uid]
    if study.accession_number:
        matches += [
            Case.accession_number == study.accession_number,
            CaseReferral.accession_number == study.accession_number,
        ]
    existing = session.scalar(
        select(Case)
        .outerjoin(CaseReferral, CaseReferral.case_id == Case.id)
        .where(
            Case.clinic_id == study.clinic_id,
            Case.patient_pk == study.patient_pk,
            Case.status.in_(list(OPEN)),
            or_(*matches),
        )
        .order_by(Case.created_at)
        .limit(1)
    )
    if existing is not None:
        session.add(CaseStudy(study_pk=study_id, case_id=existing.id))
        session.flush()
        _record(session, existing.id, "saf", existing.status, existing.status, "study added")
        _reroute(hub, session, existing, rules)
        return existing.id
    new = _new_case(
        hub, session, study.clinic_id, study.patient_pk, study.accession_number, "routine"
    )
    session.add(CaseStudy(study_pk=study_id, case_id=new.id))
    session.flush()
    _route_new(session, new, rules)
    return new.id


def _case_for_referral(hub: Hub, session: Session, referral: Referral, rules: RuleSet) -> str:
    linked = session.scalar(
        select(CaseReferral.case_id).where(
            CaseReferral.clinic_id == referral.clinic_id,
            CaseReferral.service_request_id == referral.service_request_id,
        )
    )
    if linked is not None:
        return linked
    patient_pk = _patient_pk(session, referral.clinic_id, referral.patient_id)
    matches = []
    if referral.accession_number:
        matches.append(Case.accession_number == referral.accession_number)
    if referral.study_instance_uid:
        matches.append(Study.study_instance_uid == referral.study_instance_uid)
    existing = None
    if matches:
        existing = session.scalar(
            select(Case)
            .outerjoin(CaseStudy, CaseStudy.case_id == Case.id)
            .outerjoin(Study, Study.id == CaseStudy.study_pk)
            .where(
                Case.clinic_id == referral.clinic_id,
                Case.patient_pk == patient_pk,
                Case.status.in_(list(OPEN)),
                or_(*matches),
            )
            .order_by(Case.created_at)
            .limit(1)
        )
    target = existing or _new_case(
        hub, session, referral.clinic_id, patient_pk, referral.accession_number, referral.priority
    )
    session.add(_referral_row(target.id, referral))
    session.flush()
    if existing is None:
        _route_new(session, target, rules)
        return target.id
    if target.priority != referral.priority:
        target.priority = referral.priority
        target.due_at = due_at(hub, referral.priority, target.created_at)
        target.updated_at = utcnow()
    # After the referral's priority applies: the event records the case as it now is.
    _record(session, target.id, "saf", target.status, target.status, "referral added")
    _reroute(hub, session, target, rules)
    return target.id


class _Pending:
    """Rows of `_cases_for_referrals` not yet flushed, in the order their foreign keys
    need (patients, then cases, then the rows naming a case): the models have no ORM
    relationships, so one flush would not order them."""

    def __init__(self) -> None:
        self.patients: list[Patient] = []
        self.cases: list[Case] = []
        self.rest: list[CaseReferral | CaseEvent | OutboxEvent] = []

    def flush(self, session: Session) -> None:
        for rows in (self.patients, self.cases, self.rest):
            insert_all(session, rows)
            rows.clear()


def _cases_for_referrals(
    hub: Hub, session: Session, referrals: Sequence[Referral], rules: RuleSet
) -> list[str]:
    """`_case_for_referral` for each referral in turn, with the same outcome, in a few
    round trips rather than several per referral: the links and patients they name are
    read in one query each, and a referral that makes a new case (the usual one: no
    accession number or study UID to join an open case by) is routed without reading the
    case back (a new case holds no study, and its requested specialty is its referral's),
    and written with the others in three flushes. A referral that may join an open case
    goes `_case_for_referral`'s way, after the rows before it are flushed."""
    links: dict[tuple[str, str], str] = {}
    patients: dict[tuple[str, str], str] = {}
    clinics: dict[str, str] = {}
    for clinic_id in {r.clinic_id for r in referrals}:
        mine = [r for r in referrals if r.clinic_id == clinic_id]
        for service_request_id, case_id in session.execute(
            select(CaseReferral.service_request_id, CaseReferral.case_id).where(
                CaseReferral.clinic_id == clinic_id,
                CaseReferral.service_request_id.in_({r.service_request_id for r in mine}),
            )
        ):
            links[(clinic_id, service_request_id)] = case_id
        for patient_id, pk in session.execute(
            select(Patient.patient_id, Patient.id).where(
                Patient.clinic_id == clinic_id,
                Patient.patient_id.in_({r.patient_id for r in mine}),
            )
        ):
            patients[(clinic_id, patient_id)] = pk
        clinics[clinic_id] = session.get_one(Clinic, clinic_id).name
    pending = _Pending()
    out: list[str] = []
    for referral in referrals:
        key = (referral.clinic_id, referral.service_request_id)
        if key in links:
            out.append(links[key])
            continue
        if referral.accession_number or referral.study_instance_uid:
            pending.flush(session)
            links[key] = _case_for_referral(hub, session, referral, rules)
            out.append(links[key])
            continue
        patient_pk = patients.get((referral.clinic_id, referral.patient_id))
        if patient_pk is None:
            patient = Patient(id=new_id(), clinic_id=referral.clinic_id,
                              patient_id=referral.patient_id)  # fmt: skip
            pending.patients.append(patient)
            patient_pk = patients[(referral.clinic_id, referral.patient_id)] = patient.id
        new = _case_row(hub, referral.clinic_id, patient_pk, None, referral.priority)
        pending.cases.append(new)
        pending.rest.append(_referral_row(new.id, referral))
        facts = CaseFacts(
            modalities=frozenset(),
            body_parts=frozenset(),
            clinic=clinics[referral.clinic_id],
            requested_specialty=referral.requested_specialty,
            priority=referral.priority,
        )
        pending.rest += _routed(new, rules.route(facts))
        links[key] = new.id
        out.append(new.id)
    pending.flush(session)
    return out


def _referral_row(case_id: str, referral: Referral) -> CaseReferral:
    return CaseReferral(
        case_id=case_id,
        clinic_id=referral.clinic_id,
        service_request_id=referral.service_request_id,
        accession_number=referral.accession_number,
        study_instance_uid=referral.study_instance_uid,
        requested_specialty=referral.requested_specialty,
        priority=referral.priority,
    )


def _case_row(
    hub: Hub,
    clinic_id: str,
    patient_pk: str,
    accession_number: str | None,
    priority: Priority,
) -> Case:
    """A new requested case, its id assigned (not yet added to a session)."""
    now = utcnow()
    return Case(
        id=new_id(),
        clinic_id=clinic_id,
        patient_pk=patient_pk,
        status=TaskStatus.REQUESTED,
        priority=priority,
        due_at=due_at(hub, priority, now),
        specialty="",
        routed_by="",
        accession_number=accession_number,
        created_at=now,
        updated_at=now,
    )


def _new_case(
    hub: Hub,
    session: Session,
    clinic_id: str,
    patient_pk: str,
    accession_number: str | None,
    priority: Priority,
) -> Case:
    new = _case_row(hub, clinic_id, patient_pk, accession_number, priority)
    session.add(new)
    session.flush()
    return new


def _route_new(session: Session, new: Case, rules: RuleSet) -> None:
    session.add_all(_routed(new, rules.route(_case_facts(session, new))))
    session.flush()


def _routed(new: Case, rule: Rule) -> list[CaseEvent | OutboxEvent]:
    """Put a new case on `rule`'s worklist; the rows that record it."""
    new.specialty, new.routed_by = rule.worklist, rule.name
    note = f"routed by rule {rule.name}"
    return _record_rows(new.id, "saf", None, TaskStatus.REQUESTED, note, new)


def _reroute(hub: Hub, session: Session, target: Case, rules: RuleSet) -> None:
    """Route a case again with what it now holds, unless a specialist has it already."""
    if target.status not in CLAIMABLE or target.assigned_to is not None:
        return
    rule = rules.route(_case_facts(session, target))
    if (rule.worklist, rule.name) != (target.specialty, target.routed_by):
        target.specialty, target.routed_by = rule.worklist, rule.name
        target.updated_at = utcnow()
        note = f"routed again by rule {rule.name}"
        _record(session, target.id, "saf", target.status, target.status, note)
    session.flush()


def _patient_pk(session: Session, clinic_id: str, patient_id: str) -> str:
    """The clinic's patient, created (with no demographics yet) when first referred."""
    found = session.scalar(
        select(Patient.id).where(Patient.clinic_id == clinic_id, Patient.patient_id == patient_id)
    )
    if found is not None:
        return found
    patient = Patient(clinic_id=clinic_id, patient_id=patient_id)
    session.add(patient)
    session.flush()
    return patient.id


def _case_facts(session: Session, target: Case) -> CaseFacts:
    """Routing facts of a case: its studies' modalities and body parts, its clinic, and
    the requested specialty of its newest referral."""
    study_ids = select(CaseStudy.study_pk).where(CaseStudy.case_id == target.id)
    rows = session.execute(
        select(Series.modality, Series.body_part_examined).where(Series.study_pk.in_(study_ids))
    ).all()
    requested = session.scalar(
        select(CaseReferral.requested_specialty)
        .where(CaseReferral.case_id == target.id, CaseReferral.requested_specialty.is_not(None))
        .order_by(CaseReferral.created_at.desc())
        .limit(1)
    )
    clinic = session.get_one(Clinic, target.clinic_id)
    return CaseFacts(
        modalities=frozenset(m for m, _ in rows if m),
        body_parts=frozenset(b for _, b in rows if b),
        clinic=clinic.name,
        requested_specialty=requested,
        priority=cast(Priority, target.priority),
    )


def transition(hub: Hub, case_id: str, to: TaskStatus, *, actor: str, note: str = "") -> TaskStatus:
    """Move a case to `to` if the state machine allows it from its current status."""
    with transaction(hub.sessions) as session:
        _transition_in(session, case_id, to, actor=actor, note=note)
    return to


def _transition_in(
    session: Session, case_id: str, to: TaskStatus, *, actor: str, note: str
) -> None:
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


def claim(hub: Hub, case_id: str, specialist: str) -> None:
    """Give the case to `specialist` (status accepted); a second claim is refused."""
    with transaction(hub.sessions) as session:
        _claim_in(session, case_id, specialist)


def _claim_in(session: Session, case_id: str, specialist: str) -> None:
    row = session.execute(select(Case.status, Case.assigned_to).where(Case.id == case_id)).first()
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
    now = session.execute(
        select(
            Case.status,
            Case.priority,
            Case.assigned_to,
            Case.specialty,
            Case.due_at,
            Case.updated_at,
            Case.note_sealed,
        ).where(Case.id == case_id)
    ).one()
    session.add_all(_record_rows(case_id, actor, before, after, note, now))


def _record_rows(
    case_id: str, actor: str, before: str | None, after: str, note: str, now: Any
) -> list[CaseEvent | OutboxEvent]:
    """The event (with `now`, the case as it is after it: a Case or a row with its status,
    priority, assigned_to, specialty, due_at, updated_at and note_sealed) and, for a status
    change, the outbox event."""
    state = {
        "status": now.status,
        "priority": now.priority,
        "owner": now.assigned_to,
        "specialty": now.specialty,
        "due_at": now.due_at.isoformat(),
        "updated_at": now.updated_at.isoformat(),
    }
    rows: list[CaseEvent | OutboxEvent] = [
        CaseEvent(
            case_id=case_id,
            actor=actor,
            from_status=before,
            to_status=after,
            note=note,
            state=state,
            note_sealed=now.note_sealed,
        )
    ]
    if before != after:
        # In the same transaction: subscribers (saf.subscriptions) hear of every status
        # change, or of none if the change rolls back.
        rows.append(
            OutboxEvent(
                topic=CASE_STATUS_TOPIC,
                payload={"case_id": case_id, "from": before, "to": after, "actor": actor},
            )
        )
    return rows


# --------------------------------------------------------------------------- Task updates

CLIENT_STATUSES = frozenset(
    {
        TaskStatus.REQUESTED,  # released back to the worklist
        TaskStatus.ACCEPTED,  # claimed
        TaskStatus.IN_PROGRESS,
        TaskStatus.ON_HOLD,
        TaskStatus.REJECTED,
        TaskStatus.CANCELLED,
    }
)
"""Statuses a client may set on a Task (FHIR update/patch). `completed` comes only with
a reply (a final DiagnosticReport, saf.fhir_store), `failed` and `received` only from
the hub."""


class PreconditionFailed(CaseError):
    """The version the caller last saw (``If-Match``) is not the case's current one."""


class NotPermitted(CaseError):
    """The caller sees the case but may not make this change (who may is in the message)."""


class NotSettable(CaseError):
    """A value a client may never set this way; `element` is its FHIRPath (``Task.status``)."""

    def __init__(self, message: str, element: str) -> None:
        super().__init__(message)
        self.element = element


@dataclass(frozen=True)
class TaskState:
    """What a client may change of a case through its Task: the whole wanted state."""

    status: str
    owner: str | None
    """Username of the specialist who has the case (``Task.owner``), None for nobody."""
    priority: str
    notes: tuple[dict[str, Any], ...] = ()
    """``Task.note``: the Annotations, oldest first. Notes are kept as written: a client
    adds notes at the end; changing or removing one is refused."""


def version_of(session: Session, case_id: str) -> int:
    """The case's Task version: how many events it has had (at least 1)."""
    count = session.scalar(select(func.count()).where(CaseEvent.case_id == case_id)) or 0
    return max(1, int(count))


@dataclass(frozen=True)
class TaskVersion:
    """A case as its Task showed it after one of its events: Task version `version`."""

    version: int
    status: str
    priority: str
    owner: str | None
    specialty: str
    due_at: datetime
    updated_at: datetime
    note_sealed: str | None

    @classmethod
    def of_case(cls, case: Case, version: int) -> TaskVersion:
        """The case as it is now, as version `version` (its current one)."""
        return cls(
            version,
            case.status,
            case.priority,
            case.assigned_to,
            case.specialty,
            case.due_at,
            case.updated_at,
            case.note_sealed,
        )


def task_versions(session: Session, case: Case) -> list[TaskVersion]:
    """Every version of the case's Task, oldest first: version n is the case after its
    n-th event (the state each event recorded). An event recorded before migration 0017
    kept no state: its version has the event's status and time, and the rest of the next
    version's (the case's own for the newest), which is what the events can tell."""
    events = session.execute(
        select(CaseEvent.at, CaseEvent.to_status, CaseEvent.state, CaseEvent.note_sealed)
        .where(CaseEvent.case_id == case.id)
        .order_by(CaseEvent.id)
    ).all()
    current = TaskVersion.of_case(case, max(1, len(events)))
    if not events:
        return [current]
    versions: list[TaskVersion] = []
    later = current
    for n in range(len(events), 0, -1):
        at, to_status, state, note_sealed = events[n - 1]
        if state is not None:
            version = TaskVersion(
                n,
                state["status"],
                state["priority"],
                state["owner"],
                state["specialty"],
                datetime.fromisoformat(state["due_at"]),
                datetime.fromisoformat(state["updated_at"]),
                note_sealed,
            )
        elif n == len(events):
            version = current
        else:
            version = replace(
                later,
                version=n,
                status=to_status,
                updated_at=at,
                owner=None if to_status in CLAIMABLE else later.owner,
                note_sealed=None,  # notes came with migration 0017
            )
        versions.append(version)
        later = version
    versions.reverse()
    return versions


def _note_context(case_id: str) -> str:
    return f"consult/{case_id}/note"


def open_notes(hub: Hub, case_id: str, sealed: str | None) -> list[dict[str, Any]]:
    """A case's Task.note (a version's, or the current `Case.note_sealed`), opened."""
    if sealed is None:
        return []
    text = open_value(hub.keyring, sealed, context=_note_context(case_id))
    return cast(list[dict[str, Any]], json.loads(text))


def reseal(hub: Hub, new_key_id: str) -> int:
    """Reseal the cases' notes (current and per event) under the active key
    (saf.keys.rotate); how many values were resealed."""
    keyring = hub.keyring
    resealed = 0
    with transaction(hub.sessions) as session:
        for case_id, token in session.execute(
            select(Case.id, Case.note_sealed).where(Case.note_sealed.is_not(None))
        ).tuples():
            if token is not None and value_key_id(token) != new_key_id:
                new = reseal_value(keyring, token, context=_note_context(case_id))
                session.execute(update(Case).where(Case.id == case_id).values(note_sealed=new))
                resealed += 1
        for event_id, event_case, token in session.execute(
            select(CaseEvent.id, CaseEvent.case_id, CaseEvent.note_sealed).where(
                CaseEvent.note_sealed.is_not(None)
            )
        ).tuples():
            if token is not None and value_key_id(token) != new_key_id:
                new = reseal_value(keyring, token, context=_note_context(event_case))
                session.execute(
                    update(CaseEvent).where(CaseEvent.id == event_id).values(note_sealed=new)
                )
                resealed += 1
    return resealed


def _seal_notes(hub: Hub, case_id: str, notes: Sequence[dict[str, Any]]) -> str | None:
    if not notes:
        return None
    text = json.dumps(list(notes), separators=(",", ":"), ensure_ascii=False)
    return seal_value(hub.keyring, text, context=_note_context(case_id))


def update_task(
    hub: Hub,
    principal: Principal,
    case_id: str,
    wanted: TaskState,
    *,
    if_match: int | None = None,
    rules: RuleSet | None = None,
) -> bool:
    """Bring a case to the `wanted` state a client asked for through its Task, in one
    transaction, through the same steps the viewer and the workers use (`claim`, the state
    machine of `transition`); returns whether anything changed.

    Who may do what (tenancy has already decided the caller sees the case):
    - claim (requested/received -> accepted, owner = the caller): a specialist of the
      case's worklist; releasing it (accepted -> requested, no owner), starting
      (in-progress), holding (on-hold) and handing it over to another specialist of the
      worklist (owner): the specialist who has it;
    - rejected: a specialist of the worklist, while nobody else has the case;
    - cancelled: the requesting clinic (its clinicians and EHR clients);
    - priority: the requesting clinic, or the specialist who has the case (triage); the
      due time follows, and an unclaimed case is routed again;
    - completed: nobody; a reply completes a consult;
    - notes (added after the existing ones, which stay as written): the requesting clinic
      or a specialist of the case's worklist; each addition is an event (a version).
    `if_match` (the version of an ``If-Match`` ETag) must be the current version.
    """
    from saf import tenancy  # tenancy builds on this module's statuses

    actor = principal.name or principal.id
    with transaction(hub.sessions) as session:
        # Lock the case first (a row lock on PostgreSQL, the write lock on SQLite), so the
        # version compared below is the one this transaction changes.
        locked = session.execute(
            update(Case).where(Case.id == case_id).values(updated_at=Case.updated_at)
        )
        if locked.rowcount != 1:  # type: ignore[attr-defined]
            raise CaseError(f"no case {case_id}")
        current = session.execute(
            select(Case).where(Case.id == case_id).execution_options(populate_existing=True)
        ).scalar_one()
        version = version_of(session, case_id)
        if if_match is not None and if_match != version:
            raise PreconditionFailed(
                f"Task/{case_id}: If-Match names version {if_match}, the current version is "
                f"{version}; read it again and reapply the change"
            )
        system = tenancy.sees_everything(principal)
        clinic = system or (
            tenancy.acts_for_clinic(principal) and principal.clinic_id == current.clinic_id
        )
        specialist = (
            tenancy.can_claim(principal) and current.specialty in principal.specialties
        ) or system
        has_it = system or (current.assigned_to is not None and current.assigned_to == actor)
        changed = False
        status = TaskStatus(current.status)
        if wanted.status != status:
            to = _client_status(wanted.status)
            if to not in ALLOWED[status]:
                raise IllegalTransition(f"Task/{case_id}: {status} -> {to} is not allowed")
            if to is TaskStatus.ACCEPTED and status in CLAIMABLE:
                if not specialist:
                    raise NotPermitted("only a specialist of the case's worklist can claim it")
                if wanted.owner not in (None, actor):
                    raise NotSettable(
                        f"a claim makes the caller the owner: Practitioner/{actor}", "Task.owner"
                    )
                _claim_in(session, case_id, actor)
                wanted = replace(wanted, owner=actor)  # a claim names its owner
            else:
                if to is TaskStatus.CANCELLED and not clinic:
                    raise NotPermitted(
                        "only the requesting clinic cancels its consult (a specialist rejects it)"
                    )
                if to is TaskStatus.REJECTED and not (
                    specialist and current.assigned_to in (None, actor)
                ):
                    raise NotPermitted(
                        "only a specialist of the worklist rejects a case nobody else has"
                    )
                if to not in (TaskStatus.CANCELLED, TaskStatus.REJECTED) and not has_it:
                    raise NotPermitted(f"only the specialist who has the case can set {to}")
                if to is TaskStatus.REQUESTED and wanted.owner is not None:
                    raise NotSettable("a case released to the worklist has no owner", "Task.owner")
                _transition_in(session, case_id, to, actor=actor, note=f"Task {to}")
            changed = True
        owner = session.scalar(select(Case.assigned_to).where(Case.id == case_id))
        if wanted.owner != owner:
            if wanted.owner is None:
                raise NotSettable(
                    "to give a case back to the worklist, set status requested", "Task.owner"
                )
            if owner is None:
                raise NotSettable(
                    "to claim a case, set status accepted (owner: yourself)", "Task.status"
                )
            if not has_it:
                raise NotPermitted("only the specialist who has the case can hand it over")
            _hand_over(session, current, wanted.owner, actor)
            changed = True
        if wanted.priority != current.priority:
            if wanted.priority not in PRIORITY_ORDER:
                raise NotSettable(
                    f"priority {wanted.priority!r}: one of {', '.join(PRIORITY_ORDER)}",
                    "Task.priority",
                )
            if not (clinic or has_it):
                raise NotPermitted(
                    "only the requesting clinic or the specialist who has the case sets priority"
                )
            now = session.scalar(select(Case.status).where(Case.id == case_id))
            if now not in OPEN:
                raise IllegalTransition(f"Task/{case_id} is {now}: its priority is final")
            _reprioritise(hub, session, case_id, wanted.priority, actor, rules)
            changed = True
        notes = open_notes(hub, case_id, current.note_sealed)
        if list(wanted.notes) != notes:
            if list(wanted.notes[: len(notes)]) != notes:
                raise NotSettable(
                    "notes are kept as written: add notes after the existing ones, "
                    "do not change or remove them",
                    "Task.note",
                )
            if not (clinic or specialist or has_it):
                raise NotPermitted(
                    "only the requesting clinic or a specialist of the case's worklist adds notes"
                )
            session.execute(
                update(Case)
                .where(Case.id == case_id)
                .values(note_sealed=_seal_notes(hub, case_id, wanted.notes), updated_at=utcnow())
            )
            status_now = session.scalar(select(Case.status).where(Case.id == case_id)) or status
            added = len(wanted.notes) - len(notes)
            _record(session, case_id, actor, status_now, status_now, f"{added} note(s) added")
            changed = True
    return changed


def _client_status(value: str) -> TaskStatus:
    try:
        to = TaskStatus(value)
    except ValueError:
        raise NotSettable(f"{value!r} is not a Task status", "Task.status") from None
    if to is TaskStatus.COMPLETED:
        raise NotSettable(
            "a consult is completed only by its reply: a final DiagnosticReport about the "
            "case (basedOn its ServiceRequest), or signing the reply in the viewer",
            "Task.status",
        )
    if to not in CLIENT_STATUSES:
        raise NotSettable(f"status {to} is set by the hub, not by clients", "Task.status")
    return to


def _hand_over(session: Session, current: Case, username: str, actor: str) -> None:
    """Give a claimed case to another specialist of its worklist."""
    user = session.scalar(select(User).where(User.username == username))
    if (
        user is None
        or user.disabled_at is not None
        or user.role != "specialist"
        or current.specialty not in (user.specialties or [])
    ):
        raise NotSettable(
            f"Practitioner/{username} is not an active specialist of worklist "
            f"{current.specialty!r}",
            "Task.owner",
        )
    session.execute(
        update(Case).where(Case.id == current.id).values(assigned_to=username, updated_at=utcnow())
    )
    _record(session, current.id, actor, current.status, current.status, f"handed to {username}")


def _reprioritise(
    hub: Hub,
    session: Session,
    case_id: str,
    priority: Priority,
    actor: str,
    rules: RuleSet | None,
) -> None:
    """A new priority and the due time that follows; an unclaimed case is routed again."""
    target = session.get_one(Case, case_id, populate_existing=True)
    before = target.priority
    target.priority = priority
    target.due_at = due_at(hub, priority, target.created_at)
    target.updated_at = utcnow()
    session.flush()
    _record(
        session, case_id, actor, target.status, target.status, f"priority {before} -> {priority}"
    )
    if rules is not None:
        _reroute(hub, session, target, rules)
