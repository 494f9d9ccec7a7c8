"""Searching the audit trail: the filters /api/audit and /fhir/AuditEvent share, applied
on top of saf.tenancy.visible_audit (admins and the hub see the trail, nobody else).

Parameters (FHIR AuditEvent search, as far as saf's records carry them):

- ``date``: ``ge``/``gt``/``le``/``lt``/``eq`` + an ISO date or date-time (a bare date is
  that whole UTC day); repeat to AND;
- ``agent``: the actor's name or id (``Practitioner/<id>``-style prefixes are dropped);
- ``entity``: an entity id, ``Type/id``, or a patient id;
- ``patient``: ``Patient/<id>``: the index patient id, or a FHIR Patient standing for one;
- ``type``/``subtype``: ``[system|]code`` of the BALP codings (saf.audit_fhir);
- ``outcome``: ``0``, ``4``, ``8``, ``12`` (comma-separated);
- ``_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, or_, select

from saf import audit, tenancy
from saf.audit_fhir import event_codes
from saf.hub import Hub
from saf.identity import Principal
from saf.models import AuditRecord, FhirResource

_PREFIXES = ("ge", "gt", "le", "lt", "eq")


@dataclass
class AuditQuery:
    """Filters of one audit search (empty = no filter); ValueError from `where` names the
    parameter and the expected form."""

    date: list[str] = field(default_factory=list)
    agent: str | None = None
    entity: str | None = None
    patient: str | None = None
    type: str | None = None
    subtype: str | None = None
    outcome: str | None = None
    ids: list[str] = field(default_factory=list)


def select_audit(principal: Principal, query: AuditQuery) -> Select[AuditRecord]:
    """`select(AuditRecord)` for what the caller may see, filtered by `query`."""
    found = tenancy.visible_audit(principal)
    for value in query.date:
        found = found.where(date_clause(value))
    if query.outcome:
        found = found.where(AuditRecord.outcome.in_(outcomes(query.outcome)))
    if query.agent:
        agent = query.agent.rsplit("/", 1)[-1]
        found = found.where(or_(AuditRecord.actor_name == agent, AuditRecord.actor_id == agent))
    if query.entity:
        entity_id = query.entity.rsplit("/", 1)[-1]
        found = found.where(
            or_(AuditRecord.entity_id == entity_id, AuditRecord.patient_pk == entity_id)
        )
    if query.patient:
        pid = query.patient.removeprefix("Patient/")
        # The id of a FHIR Patient is mapped to the index patient it stands for: the
        # filter reveals no content, and the caller already reads the whole trail.
        standing = select(FhirResource.patient_pk).where(
            FhirResource.id == pid, FhirResource.resource_type == "Patient"
        )
        found = found.where(
            or_(
                AuditRecord.patient_pk == pid,
                AuditRecord.patient_pk.in_(standing.scalar_subquery()),
            )
        )
    if query.type or query.subtype:
        found = found.where(
            AuditRecord.event.in_(sorted(events_matching(query.type, query.subtype)))
        )
    if query.ids:
        if not all(i.isdigit() for i in query.ids):
            raise ValueError("_id: AuditEvent ids are integers")
        found = found.where(AuditRecord.id.in_([int(i) for i in query.ids]))
    return found


def search(
    hub: Hub, principal: Principal, query: AuditQuery, *, count: int, offset: int = 0
) -> tuple[list[AuditRecord], int]:
    """A page of matching records, newest first, and the total."""
    found = select_audit(principal, query)
    with hub.sessions() as session:
        total = session.scalar(select(func.count()).select_from(found.subquery())) or 0
        records = list(
            session.scalars(
                found.order_by(AuditRecord.at.desc(), AuditRecord.id.desc())
                .limit(count)
                .offset(offset)
            )
        )
    return records, int(total)


def get(hub: Hub, principal: Principal, record_id: str) -> AuditRecord | None:
    """One record the caller may see, or None (absent, not an integer, or not theirs)."""
    if not record_id.isdigit():
        return None
    with hub.sessions() as session:
        return session.scalar(
            tenancy.visible_audit(principal).where(AuditRecord.id == int(record_id))
        )


def date_clause(value: str) -> Any:
    """A FHIR date search parameter on the record time; a bare date means that whole day."""
    prefix, text = ("eq", value)
    if value[:2] in _PREFIXES:
        prefix, text = value[:2], value[2:]
    try:
        start = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"date {value!r}: use a prefix ge, gt, le, lt or eq and an ISO date or date-time, "
            "e.g. ge2026-01-31 or lt2026-01-31T12:00:00Z"
        ) from None
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    whole_day = len(text) == 10
    end = start + timedelta(days=1) if whole_day else start
    column = AuditRecord.at
    return {
        "ge": column >= start,
        "gt": column >= end if whole_day else column > start,
        "le": column < end if whole_day else column <= start,
        "lt": column < start,
        "eq": and_(column >= start, column < end) if whole_day else column == start,
    }[prefix]


def outcomes(value: str) -> list[int]:
    """The outcome codes of an ``outcome`` parameter; ValueError for anything else."""
    codes = [v.strip() for v in value.split(",") if v.strip()]
    if not codes or any(c not in ("0", "4", "8", "12") for c in codes):
        raise ValueError(f"outcome {value!r}: use 0, 4, 8 or 12 (comma-separated)")
    return [int(c) for c in codes]


def events_matching(type_code: str | None, subtype_code: str | None) -> set[str]:
    """The saf audit events whose BALP type and subtype match the given codes."""
    matching = set()
    for event in audit.EVENTS:
        type_coding, subtype_coding = event_codes(event)
        if type_code and not _coding_matches(type_coding, type_code):
            continue
        if subtype_code and (
            subtype_coding is None or not _coding_matches(subtype_coding, subtype_code)
        ):
            continue
        matching.add(event)
    return matching


def _coding_matches(coding: dict[str, str], token: str) -> bool:
    system, sep, code = token.rpartition("|")
    if sep and system and system != coding["system"]:
        return False
    return code == coding["code"]
