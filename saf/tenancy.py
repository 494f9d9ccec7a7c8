"""Tenancy: the one place that decides which rows a caller may see.

Every query for PHI (patients, studies, series, instances, cases) and for the audit
trail goes through the clauses and `select` builders here; routers, DICOM handlers
and the viewer never filter by hand. An object the caller may not see is treated
exactly as if it did not exist (the getters return None).

Who sees what:

- `system` (kind, the hub itself: workers, CLI maintenance): everything.
- clinic principals (a `clinician` user, an EHR `client`, a DICOM `ae`) with a
  `clinic_id`: that clinic's patients, studies, series, instances and cases.
  Which resource types a client or AE may touch is its scopes' business (checked at
  the door); which rows is decided here.
- `specialist` users: a case whose `specialty` is one of theirs and whose status is
  in SPECIALIST_STATUSES (the worklist, cases being worked on, and finished
  consults, so colleagues on the same worklist can cover and compare), plus any
  case of their specialties assigned to them whatever its status; and the
  patients, studies, series and instances of those cases only.
- FHIR resources clients stored (saf.fhir_store): a clinic's principals see their
  clinic's; a specialist those linked to a case they see (its ServiceRequests, and the
  Patient resources of its patient).
- `admin`: no PHI at all; the audit trail.
- anything else (no clinic, unknown role): nothing. Deny is the default.

Specialist visibility, the choice written down: routing sets a case's specialty when
the case is made, and its first status is `requested`, so a case is on a worklist
from birth; a future pre-routing status (FHIR `draft`) would simply stay out of
SPECIALIST_STATUSES. A case cancelled or rejected before anyone claimed it is the
clinic's business again and leaves the worklist's view (minimum necessary); a
specialist who had claimed it keeps seeing it.

The clauses are correlated EXISTS subqueries over aliased tables, so they compose
with any outer query (joins included) and answer point look-ups through primary-key
and foreign-key indexes, without loading the caller's whole tenant.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, false, or_, select, true
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.util import AliasedClass

from saf.cases import TaskStatus
from saf.identity import Principal
from saf.models import (
    AuditRecord,
    Case,
    CaseStudy,
    FhirResource,
    Instance,
    Patient,
    Series,
    Study,
    Subscription,
)

SPECIALIST_STATUSES: frozenset[str] = frozenset(
    {
        TaskStatus.REQUESTED,
        TaskStatus.RECEIVED,
        TaskStatus.ACCEPTED,
        TaskStatus.IN_PROGRESS,
        TaskStatus.ON_HOLD,
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
    }
)
"""Case statuses every specialist of the case's specialty sees (cancelled and rejected
cases stay visible only to the specialist they are assigned to)."""

CLINIC_KINDS = frozenset({"user", "client", "ae"})
"""Principal kinds that act for one clinic when they carry a clinic_id."""


def _clinic_of(principal: Principal) -> str | None:
    """The clinic a clinic principal acts for; None for everyone else."""
    if principal.kind == "user" and principal.role != "clinician":
        return None
    if principal.kind in CLINIC_KINDS and principal.clinic_id:
        return principal.clinic_id
    return None


def _is_specialist(principal: Principal) -> bool:
    return principal.kind == "user" and principal.role == "specialist"


def _is_system(principal: Principal) -> bool:
    # kind, not role: EHR clients and AEs carry role "system" but are one clinic's.
    return principal.kind == "system"


def sees_everything(principal: Principal) -> bool:
    """Whether tenancy does not limit this caller (the hub itself)."""
    return _is_system(principal)


def can_read_audit(principal: Principal) -> bool:
    """Whether the caller may read the audit trail (admins and the hub itself)."""
    return _is_system(principal) or (principal.kind == "user" and principal.role == "admin")


def can_claim(principal: Principal) -> bool:
    """Whether the caller is someone who can take a case off a worklist."""
    return _is_specialist(principal)


# --------------------------------------------------------------------------- clauses


def _case_clause(principal: Principal, c: type[Case] | AliasedClass[Case]) -> ColumnElement[bool]:
    if _is_system(principal):
        return true()
    clinic = _clinic_of(principal)
    if clinic is not None:
        return c.clinic_id == clinic
    if _is_specialist(principal) and principal.specialties:
        return and_(
            c.specialty.in_(sorted(principal.specialties)),
            or_(c.status.in_(sorted(SPECIALIST_STATUSES)), c.assigned_to == principal.name),
        )
    return false()


def case_clause(principal: Principal) -> ColumnElement[bool]:
    """WHERE clause on `Case` for the cases the caller may see."""
    return _case_clause(principal, Case)


def _study_pk_clause(principal: Principal, study_pk: Any) -> ColumnElement[bool]:
    """The study whose primary key is the column `study_pk` is visible."""
    if _is_system(principal):
        return true()
    clinic = _clinic_of(principal)
    if clinic is not None:
        s = aliased(Study)
        return exists(select(s.id).where(s.id == study_pk, s.clinic_id == clinic))
    if _is_specialist(principal) and principal.specialties:
        link, c = aliased(CaseStudy), aliased(Case)
        return exists(
            select(link.study_pk)
            .join(c, c.id == link.case_id)
            .where(link.study_pk == study_pk, _case_clause(principal, c))
        )
    return false()


def study_clause(principal: Principal) -> ColumnElement[bool]:
    """WHERE clause on `Study` for the studies the caller may see."""
    clinic = _clinic_of(principal)
    if clinic is not None:
        return Study.clinic_id == clinic  # no subquery needed for the common case
    return _study_pk_clause(principal, Study.id)


def series_clause(principal: Principal) -> ColumnElement[bool]:
    """WHERE clause on `Series` for the series the caller may see."""
    return _study_pk_clause(principal, Series.study_pk)


def instance_clause(principal: Principal) -> ColumnElement[bool]:
    """WHERE clause on `Instance` for the instances the caller may see."""
    if _is_system(principal):
        return true()
    if _clinic_of(principal) is None and not _is_specialist(principal):
        return false()
    s = aliased(Series)
    return exists(
        select(s.id).where(s.id == Instance.series_pk, _study_pk_clause(principal, s.study_pk))
    )


def patient_clause(principal: Principal) -> ColumnElement[bool]:
    """WHERE clause on `Patient` for the patients the caller may see."""
    if _is_system(principal):
        return true()
    clinic = _clinic_of(principal)
    if clinic is not None:
        return Patient.clinic_id == clinic
    if _is_specialist(principal) and principal.specialties:
        c = aliased(Case)
        return exists(select(c.id).where(c.patient_pk == Patient.id, _case_clause(principal, c)))
    return false()


def fhir_resource_clause(principal: Principal) -> ColumnElement[bool]:
    """WHERE clause on `FhirResource` (resources FHIR clients created): a clinic's own;
    for specialists, those linked to a case they see (the case's ServiceRequests, and the
    Patient resources of its patient)."""
    if _is_system(principal):
        return true()
    clinic = _clinic_of(principal)
    if clinic is not None:
        return FhirResource.clinic_id == clinic
    if _is_specialist(principal) and principal.specialties:
        c = aliased(Case)
        linked = or_(
            c.id == FhirResource.case_id,
            and_(FhirResource.patient_pk.is_not(None), c.patient_pk == FhirResource.patient_pk),
        )
        return exists(select(c.id).where(linked, _case_clause(principal, c)))
    return false()


def audit_clause(principal: Principal) -> ColumnElement[bool]:
    """WHERE clause on `AuditRecord`: the whole trail for admins and the hub, else nothing."""
    return true() if can_read_audit(principal) else false()


# --------------------------------------------------------------------------- selects


def visible_cases(principal: Principal) -> Select[Case]:
    """`select(Case)` limited to the caller's cases; add filters, order and paging."""
    return select(Case).where(case_clause(principal))


def visible_studies(principal: Principal) -> Select[Study]:
    """`select(Study)` limited to the caller's studies."""
    return select(Study).where(study_clause(principal))


def visible_series(principal: Principal) -> Select[Series]:
    """`select(Series)` limited to the caller's series."""
    return select(Series).where(series_clause(principal))


def visible_instances(principal: Principal) -> Select[Instance]:
    """`select(Instance)` limited to the caller's instances."""
    return select(Instance).where(instance_clause(principal))


def visible_patients(principal: Principal) -> Select[Patient]:
    """`select(Patient)` limited to the caller's patients."""
    return select(Patient).where(patient_clause(principal))


def visible_fhir_resources(principal: Principal) -> Select[FhirResource]:
    """`select(FhirResource)` limited to the caller's FHIR resources (deleted ones included:
    a deleted resource answers 410 to its owner)."""
    return select(FhirResource).where(fhir_resource_clause(principal))


def acts_for_clinic(principal: Principal) -> bool:
    """Whether the caller acts for one clinic (a clinician, an EHR client, a DICOM AE)."""
    return _clinic_of(principal) is not None


def visible_subscriptions(principal: Principal) -> Select[Subscription]:
    """`select(Subscription)`: a clinic's own FHIR Subscriptions (all of them for the hub),
    none for anyone else (specialists and admins subscribe to nothing)."""
    if _is_system(principal):
        return select(Subscription)
    clinic = _clinic_of(principal)
    if clinic is None:
        return select(Subscription).where(false())
    return select(Subscription).where(Subscription.clinic_id == clinic)


def visible_audit(principal: Principal) -> Select[AuditRecord]:
    """`select(AuditRecord)`: every record for admins and the hub, none for anyone else."""
    return select(AuditRecord).where(audit_clause(principal))


# --------------------------------------------------------------------------- getters


def get_case(session: Session, principal: Principal, case_id: str) -> Case | None:
    """The case, or None when it does not exist or the caller may not see it."""
    return session.scalar(visible_cases(principal).where(Case.id == case_id))


def get_study(session: Session, principal: Principal, study_id: str) -> Study | None:
    """The study (by primary key), or None when absent or not the caller's."""
    return session.scalar(visible_studies(principal).where(Study.id == study_id))


def get_series(session: Session, principal: Principal, series_id: str) -> Series | None:
    """The series (by primary key), or None when absent or not the caller's."""
    return session.scalar(visible_series(principal).where(Series.id == series_id))


def get_instance(session: Session, principal: Principal, instance_id: str) -> Instance | None:
    """The instance (by primary key), or None when absent or not the caller's."""
    return session.scalar(visible_instances(principal).where(Instance.id == instance_id))


def get_patient(session: Session, principal: Principal, patient_pk: str) -> Patient | None:
    """The patient (by primary key), or None when absent or not the caller's."""
    return session.scalar(visible_patients(principal).where(Patient.id == patient_pk))
