"""The FHIR resource store: every version of the resources FHIR clients write, sealed.

`fhir_api` parses and validates the JSON; this module keeps it. Each write is one
transaction that adds a `FhirVersion` (the JSON sealed with saf.crypto.seal_value under
the context ``fhir/<type>/<id>/<version>``, so a sealed version cannot be passed off as
another), moves the `FhirResource` head (version, time, the plain search columns) and
replaces its `FhirToken` rows. Reads, searches and reference checks start from
saf.tenancy.visible_fhir_resources: another tenant's resource does not exist.

Plain (unsealed) columns: type, status, the ``Patient/<id>`` subject reference and the
identifier tokens (system|value), because searches filter on them; the patient index
keeps DICOM Patient IDs plain already, for the same reason. Names, dates and free text
stay sealed.

A ServiceRequest that is an active order is a referral: it makes or joins a case through
saf.cases.on_referral (see `referral_of` for the mapping). A referral the EHR withdraws
(updated to ``revoked`` or ``entered-in-error``) cancels its case, unless the case is
finished already or another live referral still asks for it.

Writes come in two layers: `create_in`, `update_in`, `delete_in` and `search_in` work in
the caller's Session (a transaction Bundle puts all its entries in one database
transaction); `create`, `update`, `delete` and `search` are the one-resource wrappers.
A conditional create (``If-None-Exist``: `create_if_none_exist`; a Bundle's
``ifNoneExist`` through `lock_condition`) searches and creates in one transaction under a
lock on its criteria, so two identical ones racing make one resource.
Case effects run after the commit, in `settle`, idempotently (a referral's on_referral
finds the same case again; a case already at the target status is left alone), because
saf.cases commits its own transactions: a crash between commit and settle leaves the
resource stored and the effect undone until the same write is retried. What a reply asks
of its case is checked before anything is stored (a question on a completed case: 409).

The reply (the choices written down):

- DiagnosticReport ``final``/``amended``/``corrected`` whose ``basedOn`` names a
  ServiceRequest of a case, or whose ``imagingStudy`` names ``ImagingStudy/<Study.id>``
  of a case, completes the case; ``preliminary`` moves it to in-progress (never back from
  completed). The case goes through the legal states on the way (requested -> accepted,
  claimed by the writing specialist -> in-progress -> completed).
- Communication (status in-progress or completed, i.e. sent) from anyone but the owning
  clinic, ``basedOn`` the ServiceRequest or ``about`` ``Task/<case id>``, puts the case
  on-hold (a question to the clinic); one from the owning clinic with ``inResponseTo``
  (the answer) moves an on-hold case back to in-progress.
- A specialist may write DiagnosticReport, Communication and DocumentReference about a
  case they see (it then belongs to the case's clinic, whose principals read it); anything
  else they write is refused (403).

Documents: a Binary's bytes are a sealed blob (saf.documents), indexed by `FhirBinary`;
a DocumentReference's (and a DiagnosticReport's presentedForm) attachment ``url``
``Binary/<id>`` must name a Binary the writer sees, and its ``size`` and ``hash`` must be
the bytes' (422 otherwise). Creating a Binary or DocumentReference writes a
`DOCUMENT_TOPIC` outbox row in the same transaction.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, cast
from urllib.parse import parse_qsl, urlencode

from sqlalchemy import ColumnElement, Select, Table, and_, bindparam, func, or_, select
from sqlalchemy import delete as sql_delete
from sqlalchemy import update as sql_update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from saf import documents, tenancy
from saf.audit import autocommit_connection
from saf.cases import (
    ALLOWED,
    OPEN,
    CaseError,
    ClaimRefused,
    IllegalTransition,
    Priority,
    Referral,
    TaskStatus,
    claim,
    on_referrals,
    transition,
)
from saf.crypto import open_value, reseal_value, seal_value, value_key_id
from saf.db import insert_all, transaction
from saf.hub import Hub
from saf.identity import Principal
from saf.models import (
    Blob,
    Case,
    CaseStudy,
    FhirBinary,
    FhirResource,
    FhirToken,
    FhirVersion,
    OutboxEvent,
    Patient,
    new_id,
    utcnow,
)
from saf.routing import RuleSet

log = logging.getLogger(__name__)

STORED_TYPES: Final = (
    "Patient",
    "ServiceRequest",
    "Practitioner",
    "Organization",
    "DiagnosticReport",
    "Communication",
    "DocumentReference",
    "List",
)
"""Resource types clients create, read, update, delete and search here."""

BINARY: Final = "Binary"
"""Created and read only (fhir_api.mhd); its bytes are a sealed blob (saf.documents)."""

REFERENCE_TYPES: Final = (*STORED_TYPES, BINARY)
"""Types a relative reference is checked against (it must name a live resource here)."""

REPLY_TYPES: Final = ("DiagnosticReport", "Communication", "DocumentReference")
"""What a specialist may write, about a case they see (it then belongs to the case's
clinic)."""

CASE_LINKED_TYPES: Final = ("DiagnosticReport", "Communication", "DocumentReference", "List")
"""Types linked to the case they are about (`FhirResource.case_id`)."""

DOCUMENT_TYPES: Final = ("Binary", "DocumentReference")
"""Creating one writes a `DOCUMENT_TOPIC` outbox event in the same transaction."""

DOCUMENT_TOPIC: Final = "fhir.document"
"""Outbox topic of a stored document (payload: type, id, case_id); a record for now."""

REPORT_FINAL: Final = frozenset({"final", "amended", "corrected"})
"""DiagnosticReport.status values that complete the case."""

WITHDRAWN: Final = frozenset({"revoked", "entered-in-error"})
"""ServiceRequest.status values that withdraw a referral (its case is cancelled)."""

COMMUNICATION_SENT: Final = frozenset({"in-progress", "completed"})
"""Communication.status values of a message that was sent (the others change nothing)."""

V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
"""HL7 v2 identifier types (MR medical record number, ACSN accession, PLAC placer)."""

DICOM_UID_SYSTEM: Final = "urn:dicom:uid"
"""Identifier system of a DICOM UID (the Study Instance UID a referral asks about)."""

ORDER_INTENTS: Final = frozenset({"order", "original-order"})
"""ServiceRequest.intent values that make a referral a case (a proposal or plan does not)."""

PRIORITY_OF: Final[dict[str, Priority]] = {
    "routine": "routine",
    "urgent": "urgent",
    # FHIR ranks asap above urgent; the case scale has no level between urgent and stat,
    # so asap is escalated rather than under-prioritised.
    "asap": "stat",
    "stat": "stat",
}
"""FHIR request priority -> case priority."""

MAX_TOKEN: Final = 255


class StoreError(Exception):
    """A refused store operation, with what an OperationOutcome needs."""

    status = 400
    code = "invalid"

    def __init__(self, diagnostics: str, expression: str | None = None) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.expression = expression


class NotFound(StoreError):
    """Absent, or another tenant's (the same answer for both)."""

    status = 404
    code = "not-found"


class Gone(StoreError):
    """Deleted."""

    status = 410
    code = "deleted"


class VersionConflict(StoreError):
    """The resource changed under the writer (409)."""

    status = 409
    code = "conflict"


class PreconditionFailed(StoreError):
    """If-Match names a version that is not the current one (412)."""

    status = 412
    code = "conflict"


class Unprocessable(StoreError):
    """Well-formed but inconsistent with what is stored (an attachment's hash or size)."""

    status = 422
    code = "processing"


class Forbidden(StoreError):
    """The caller may not write here (no clinic to own the resource)."""

    status = 403
    code = "forbidden"


class MultipleMatches(StoreError):
    """A conditional create's criteria match more than one resource (412)."""

    status = 412
    code = "duplicate"


@dataclass(frozen=True)
class Stored:
    """One version of a resource as the caller receives it."""

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    deleted: bool
    content: dict[str, Any] | None
    clinic_id: str
    patient_pk: str | None = None
    case_id: str | None = None
    method: str = "POST"


@dataclass
class Search:
    """A parsed search: every list is AND-ed across entries and OR-ed within one."""

    ids: list[list[str]] = field(default_factory=list)
    last_updated: list[tuple[str, datetime]] = field(default_factory=list)
    """(operator, instant) with operator one of gt, ge, lt, le."""
    identifiers: list[list[tuple[str | None, str | None]]] = field(default_factory=list)
    """(system, value); None where the token leaves it open."""
    subjects: list[list[str]] = field(default_factory=list)
    """``Patient/<id>`` references."""
    statuses: list[list[str]] = field(default_factory=list)
    tokens: list[tuple[str, list[tuple[str | None, str | None]]]] = field(default_factory=list)
    """(param, alternatives) for the other token parameters (type, category, code,
    based-on)."""
    dates: list[tuple[str, str]] = field(default_factory=list)
    """(operator, `date_token` text) bounds on the ``date`` parameter (ge or lt)."""
    count: int = 20
    offset: int = 0
    descending: bool = False
    sort_by_date: bool = False
    """Order by the ``date`` parameter's value (then last update and id), not last update."""


# --------------------------------------------------------------------------- sealing


def _context(resource_type: str, resource_id: str, version_id: int) -> str:
    return f"fhir/{resource_type}/{resource_id}/{version_id}"


def _seal(hub: Hub, content: dict[str, Any], version_id: int) -> str:
    text = json.dumps(content, separators=(",", ":"), ensure_ascii=False)
    return seal_value(
        hub.keyring, text, context=_context(content["resourceType"], content["id"], version_id)
    )


def _open(hub: Hub, head: FhirResource, version: FhirVersion) -> dict[str, Any] | None:
    if version.content_sealed is None:
        return None
    context = _context(head.resource_type, head.id, version.version_id)
    return cast(
        dict[str, Any], json.loads(open_value(hub.keyring, version.content_sealed, context=context))
    )


def _stored(hub: Hub, head: FhirResource, version: FhirVersion) -> Stored:
    return Stored(
        resource_type=head.resource_type,
        id=head.id,
        version_id=version.version_id,
        last_updated=version.last_updated,
        deleted=version.content_sealed is None,
        content=_open(hub, head, version),
        clinic_id=head.clinic_id,
        patient_pk=head.patient_pk,
        case_id=head.case_id,
        method=version.method,
    )


# --------------------------------------------------------------------------- indexing


def _reference_of(element: Any) -> str | None:
    if isinstance(element, dict):
        ref = element.get("reference")
        if isinstance(ref, str):
            return ref
    return None


def subject_of(content: dict[str, Any]) -> str | None:
    """The ``Patient/<id>`` a resource is about (its subject or patient), if any."""
    return _subject(content)


def _subject(content: dict[str, Any]) -> str | None:
    for key in ("subject", "patient"):
        ref = _reference_of(content.get(key))
        if ref and ref.startswith("Patient/"):
            return "/".join(ref.split("/")[:2])[:128]
    return None


def _codings(element: Any) -> Iterator[tuple[str, str]]:
    items = element if isinstance(element, list) else [element]
    for concept in items:
        if isinstance(concept, dict):
            for coding in concept.get("coding") or []:
                if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                    system = coding.get("system") if isinstance(coding.get("system"), str) else ""
                    yield str(system)[:MAX_TOKEN], coding["code"][:MAX_TOKEN]


DATE_ELEMENTS: Final[dict[str, tuple[str, ...]]] = {
    "DocumentReference": ("date",),
    "DiagnosticReport": ("effectiveDateTime", "issued"),
    "Communication": ("sent",),
    "ServiceRequest": ("authoredOn",),
    "List": ("date",),
}
"""The element each type's ``date`` search parameter reads (first one present)."""


def date_token(text: str) -> str | None:
    """A FHIR date/dateTime/instant as a sortable UTC string ``YYYY-MM-DDTHH:MM:SS`` (the
    start of what it covers), or None when it is not one."""
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        if len(text) == 4 and text.isdigit():
            return f"{text}-01-01T00:00:00"
        if len(text) == 7 and text[:4].isdigit():
            return f"{text}-01T00:00:00"
        return None
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at.strftime("%Y-%m-%dT%H:%M:%S")


def _tokens(content: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    for ident in content.get("identifier") or []:
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            system = ident.get("system") if isinstance(ident.get("system"), str) else ""
            yield "identifier", str(system)[:MAX_TOKEN], ident["value"][:MAX_TOKEN]
    master = content.get("masterIdentifier")
    if isinstance(master, dict) and isinstance(master.get("value"), str):
        system = master.get("system") if isinstance(master.get("system"), str) else ""
        yield "identifier", str(system)[:MAX_TOKEN], master["value"][:MAX_TOKEN]
    for param, element in (("type", "type"), ("category", "category"), ("code", "code")):
        for system, code in _codings(content.get(element)):
            yield param, system, code
    for _path, ref in _refs(content, "basedOn"):
        yield "based-on", "", ref[:MAX_TOKEN]
    for element in DATE_ELEMENTS.get(content["resourceType"], ()):
        value = content.get(element)
        if isinstance(value, str) and (token := date_token(value)):
            yield "date", "", token
            break


def _has_type(ident: dict[str, Any], code: str) -> bool:
    for coding in (ident.get("type") or {}).get("coding") or []:
        if coding.get("code") == code and coding.get("system", V2_0203) == V2_0203:
            return True
    return False


def references(content: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every ``reference`` string in `content`, with the FHIRPath of its Reference."""
    if isinstance(content, dict):
        for key, value in content.items():
            if key == "reference" and isinstance(value, str):
                yield path, value
            elif key not in ("contained",):
                yield from references(value, f"{path}.{key}")
    elif isinstance(content, list):
        for i, item in enumerate(content):
            yield from references(item, f"{path}[{i}]")


def _local_target(ref: str) -> tuple[str, str] | None:
    """(type, id) of a relative reference to a type stored here; None for anything else
    (contained ``#x``, absolute URLs, ``urn:``, types this server does not keep)."""
    parts = ref.split("/")
    if (
        len(parts) in (2, 4)
        and parts[0] in REFERENCE_TYPES
        and (len(parts) == 2 or parts[2] == "_history")
    ):
        return parts[0], parts[1]
    return None


def _check_references(
    session: Session, principal: Principal, content: dict[str, Any], batch: Batch | None = None
) -> None:
    """Every relative reference to a type kept here must name a live resource the caller
    sees (so a referral cannot point at another clinic's patient); a ``urn:uuid:`` left
    unresolved (outside a transaction Bundle, or naming no entry of it) is refused too."""
    for path, ref in references(content, content["resourceType"]):
        if ref.startswith("urn:uuid:"):
            raise StoreError(f"reference {ref!r} names no entry of a transaction Bundle", path)
        target = _local_target(ref)
        if target is None or (batch is not None and batch.head(*target) is not None):
            continue
        found = session.scalar(
            tenancy.visible_fhir_resources(principal)
            .with_only_columns(FhirResource.id)
            .where(
                FhirResource.id == target[1],
                FhirResource.resource_type == target[0],
                FhirResource.deleted.is_(False),
            )
        )
        if found is None:
            raise StoreError(f"reference {ref!r} does not resolve to a resource here", path)


# --------------------------------------------------------------------------- referrals


def patient_id_of(patient: dict[str, Any], fallback: str) -> str:
    """The clinic's patient identifier of a FHIR Patient: the identifier typed MR (v2-0203
    medical record number), else the first identifier, else `fallback` (its FHIR id)."""
    idents = [i for i in patient.get("identifier") or [] if isinstance(i.get("value"), str)]
    chosen = next((i for i in idents if _has_type(i, "MR")), idents[0] if idents else None)
    return str(chosen["value"])[:64] if chosen else fallback


def referral_of(
    session: Session,
    hub: Hub,
    principal: Principal,
    clinic_id: str,
    sr: dict[str, Any],
    batch: Batch | None = None,
) -> Referral | None:
    """What a ServiceRequest tells saf.cases, or None when it is not (yet) a referral.

    The mapping: an active ServiceRequest with intent order or original-order is a
    referral. Its business id is its identifier typed PLAC (placer order number), else its
    first identifier that is not the accession, else ``urn:saf:fhir|<id>``. Accession
    number: the identifier typed ACSN. Study Instance UID: an identifier with system
    ``urn:dicom:uid`` (value with or without ``urn:oid:``). The patient: the subject
    Patient's MR identifier (`patient_id_of`), or ``subject.identifier.value``. Requested
    specialty: the first ``performerType`` coding's code. Priority: `PRIORITY_OF`.
    """
    if sr.get("status") != "active" or sr.get("intent") not in ORDER_INTENTS:
        return None
    idents = [i for i in sr.get("identifier") or [] if isinstance(i.get("value"), str)]
    accession = next((i["value"] for i in idents if _has_type(i, "ACSN")), None)
    uid = next((i["value"] for i in idents if i.get("system") == DICOM_UID_SYSTEM), None)
    placer = next((i for i in idents if _has_type(i, "PLAC")), None)
    placer = placer or next(
        (i for i in idents if not _has_type(i, "ACSN") and i.get("system") != DICOM_UID_SYSTEM),
        None,
    )
    business = (
        f"{placer.get('system', '')}|{placer['value']}" if placer else f"urn:saf:fhir|{sr['id']}"
    )
    subject = sr.get("subject") or {}
    ref = _reference_of(subject)
    target = _local_target(ref) if ref else None
    if target and target[0] == "Patient":
        patient = batch.content(hub, *target) if batch is not None else None
        if patient is None:
            if batch is not None:
                batch.flush(session)
            head = session.scalar(
                tenancy.visible_fhir_resources(principal).where(FhirResource.id == target[1])
            )
            version = head and session.get(FhirVersion, (head.id, head.version_id))
            patient = _open(hub, head, version) if head and version else None
        if patient is None:
            raise StoreError("the subject Patient does not resolve", "ServiceRequest.subject")
        patient_id = patient_id_of(patient, target[1])
    elif isinstance((subject.get("identifier") or {}).get("value"), str):
        patient_id = subject["identifier"]["value"][:64]
    else:
        raise StoreError(
            "a referral's subject must be a Patient of this server (Patient/<id>) or carry "
            "the clinic's patient identifier",
            "ServiceRequest.subject",
        )
    codings = [c for t in [sr.get("performerType") or {}] for c in t.get("coding") or []]
    specialty = next((c["code"] for c in codings if isinstance(c.get("code"), str)), None)
    return Referral(
        clinic_id=clinic_id,
        patient_id=patient_id,
        service_request_id=business[:255],
        accession_number=accession[:64] if accession else None,
        study_instance_uid=uid.removeprefix("urn:oid:")[:64] if uid else None,
        requested_specialty=specialty[:64] if specialty else None,
        priority=PRIORITY_OF.get(str(sr.get("priority") or "routine"), "routine"),
    )


# --------------------------------------------------------------------------- case links


def _ref_id(ref: str, resource_type: str) -> str | None:
    """The id in a relative (or absolute) reference to `resource_type`, else None."""
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == resource_type and parts[-1]:
        return parts[-1]
    return None


def _refs(content: dict[str, Any], *keys: str) -> Iterator[tuple[str, str]]:
    """(FHIRPath, reference) of the References under the top-level elements `keys`."""
    resource_type = content["resourceType"]
    for key in keys:
        value = content.get(key)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            ref = _reference_of(item)
            if ref is not None:
                path = f"{resource_type}.{key}" + (f"[{i}]" if isinstance(value, list) else "")
                yield path, ref


def _case_of(
    session: Session, principal: Principal, content: dict[str, Any], batch: Batch | None = None
) -> str | None:
    """The case a reply, question or document is about, among the cases the caller sees.

    DiagnosticReport: ``basedOn`` a ServiceRequest of a case, or ``imagingStudy`` naming
    ``ImagingStudy/<saf Study.id>`` of a case. Communication: ``basedOn`` such a
    ServiceRequest, ``about`` one or ``Task/<case id>``, or ``inResponseTo`` a
    Communication of a case. DocumentReference: ``context.related`` a ServiceRequest, else
    the newest open case of its subject Patient. A reference naming a Task or ImagingStudy
    the caller does not see is refused (StoreError naming it).
    """
    resource_type = content["resourceType"]
    if resource_type not in CASE_LINKED_TYPES:
        return None
    keys = {
        "DiagnosticReport": ("basedOn", "imagingStudy"),
        "Communication": ("basedOn", "about", "inResponseTo", "partOf"),
        "DocumentReference": (),
        "List": (),
    }[resource_type]
    candidates = list(_refs(content, *keys))
    context = content.get("context")
    if resource_type == "DocumentReference" and isinstance(context, dict):
        related = context.get("related") or []
        for i, item in enumerate(related if isinstance(related, list) else []):
            ref = _reference_of(item)
            if ref:
                candidates.append((f"DocumentReference.context.related[{i}]", ref))
    for path, ref in candidates:
        if (task_id := _ref_id(ref, "Task")) is not None:
            if tenancy.get_case(session, principal, task_id) is None:
                raise StoreError(f"reference {ref!r} does not resolve to a case here", path)
            return task_id
        if (study_pk := _ref_id(ref, "ImagingStudy")) is not None:
            if tenancy.get_study(session, principal, study_pk) is None:
                raise StoreError(f"reference {ref!r} does not resolve to a study here", path)
            found = session.scalar(
                select(CaseStudy.case_id)
                .where(CaseStudy.study_pk == study_pk)
                .order_by(CaseStudy.case_id)
                .limit(1)
            )
            if found:
                return found
            continue
        for linked_type in ("ServiceRequest", "Communication", "DiagnosticReport"):
            if (rid := _ref_id(ref, linked_type)) is not None:
                cached = batch.head(linked_type, rid) if batch is not None else None
                if cached is not None:
                    if cached.case_id:
                        return cached.case_id
                    continue
                found = session.scalar(
                    tenancy.visible_fhir_resources(principal)
                    .with_only_columns(FhirResource.case_id)
                    .where(FhirResource.id == rid, FhirResource.case_id.is_not(None))
                )
                if found:
                    return found
    if resource_type == "DocumentReference" and (subject := _subject(content)):
        cached = batch.head("Patient", subject.removeprefix("Patient/")) if batch else None
        if batch and cached and cached.patient_pk and cached.patient_pk in batch.open_cases:
            return batch.open_cases[cached.patient_pk]
        patient_pk = session.scalar(
            tenancy.visible_fhir_resources(principal)
            .with_only_columns(FhirResource.patient_pk)
            .where(FhirResource.id == subject.removeprefix("Patient/"))
        )
        if patient_pk:
            return session.scalar(
                tenancy.visible_cases(principal)
                .with_only_columns(Case.id)
                .where(Case.patient_pk == patient_pk, Case.status.in_(list(OPEN)))
                .order_by(Case.created_at.desc())
                .limit(1)
            )
    return None


def _from_clinic(principal: Principal, clinic_id: str) -> bool:
    return (
        principal.kind in tenancy.CLINIC_KINDS
        and principal.clinic_id == clinic_id
        and (principal.kind != "user" or principal.role == "clinician")
    )


def case_effect(content: dict[str, Any], from_clinic: bool) -> TaskStatus | None:
    """The case status a reply or question asks for, or None (see the module docstring)."""
    resource_type, status = content["resourceType"], content.get("status")
    if resource_type == "DiagnosticReport":
        if status in REPORT_FINAL:
            return TaskStatus.COMPLETED
        if status == "preliminary":
            return TaskStatus.IN_PROGRESS
    elif resource_type == "Communication" and status in COMMUNICATION_SENT:
        if from_clinic and content.get("inResponseTo"):
            return TaskStatus.IN_PROGRESS
        if not from_clinic:
            return TaskStatus.ON_HOLD
    return None


def _next_step(current: TaskStatus, target: TaskStatus) -> TaskStatus | None:
    """The next legal status on the way from `current` to `target`; None when there is
    nothing to do (already there, or a step that would move the case backwards)."""
    if current is target:
        return None
    if target is TaskStatus.IN_PROGRESS and current is TaskStatus.COMPLETED:
        return None  # a late preliminary report does not reopen a finished case
    if current in (TaskStatus.REQUESTED, TaskStatus.RECEIVED):
        return TaskStatus.ACCEPTED
    if current is TaskStatus.ACCEPTED:
        return TaskStatus.ON_HOLD if target is TaskStatus.ON_HOLD else TaskStatus.IN_PROGRESS
    if current is TaskStatus.ON_HOLD:
        return TaskStatus.IN_PROGRESS
    if current is TaskStatus.IN_PROGRESS:
        return target
    raise IllegalTransition(f"the case is {current}; it cannot become {target}")


def _check_effect(
    session: Session, case_id: str, content: dict[str, Any], target: TaskStatus
) -> None:
    """Refuse (409, before anything is stored) a reply the case's state machine cannot take."""
    current = session.scalar(select(Case.status).where(Case.id == case_id))
    if current is None:
        return
    if target is TaskStatus.IN_PROGRESS and content["resourceType"] == "Communication":
        return  # an answer to a case that is not on hold changes nothing
    try:
        _next_step(TaskStatus(current), target)
    except IllegalTransition as exc:
        raise VersionConflict(
            f"case {case_id}: {exc}", f"{content['resourceType']}.status"
        ) from None


def apply_case_effect(
    hub: Hub, principal: Principal, case_id: str, content: dict[str, Any], target: TaskStatus
) -> None:
    """Move the case towards `target` through the legal intermediate states (a specialist
    claims an unclaimed case on the way). Idempotent: run again, it finds the case there."""
    if target is TaskStatus.IN_PROGRESS and content["resourceType"] == "Communication":
        with hub.sessions() as session:
            if session.scalar(select(Case.status).where(Case.id == case_id)) != "on-hold":
                return
    actor = principal.name or principal.id
    note = f"{content['resourceType']}/{content['id']} {content.get('status')}"
    for _attempt in range(8):
        with hub.sessions() as session:
            row = session.execute(
                select(Case.status, Case.assigned_to).where(Case.id == case_id)
            ).first()
        if row is None:
            return
        step = _next_step(TaskStatus(row[0]), target)
        if step is None:
            return
        try:
            if (
                step is TaskStatus.ACCEPTED
                and row[1] is None
                and principal.kind == "user"
                and principal.role == "specialist"
            ):
                claim(hub, case_id, actor)
            else:
                transition(hub, case_id, step, actor=actor, note=note)
        except ClaimRefused:
            continue
        except CaseError as exc:
            if "changed meanwhile" in str(exc):
                continue
            raise
    raise CaseError(f"case {case_id}: could not reach {target}")


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """What the POSTs of one transaction Bundle look up, read in a few queries before they
    are written, and the rows they add after their heads, flushed together (`flush`).

    Only for a caller who acts for one clinic: what it sees is its clinic's, whatever the
    entries link meanwhile. A lookup the batch does not hold (a reference to an entry of
    the same Bundle, say) is the query `create_in` makes alone, after `flush`, so every
    answer is the one the entries written one by one would get. Made by `prefetch`.
    """

    heads: dict[tuple[str, str], tuple[FhirResource, FhirVersion]] = field(default_factory=dict)
    """(type, id) -> head and current version of the live resources the entries reference."""
    opened: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    """Resource id -> its unsealed content (opened on first use)."""
    index_patients: dict[tuple[str, str], str | None] = field(default_factory=dict)
    """(clinic id, patient id) -> the index Patient's id, or None when there is none."""
    open_cases: dict[str, str | None] = field(default_factory=dict)
    """Index patient id -> the newest open case the caller sees, or None."""
    cases: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Case id -> (clinic id, patient pk) of the cases in `open_cases`."""
    pending: list[Any] = field(default_factory=list)
    """Versions, tokens, binaries and outbox rows, written after the heads they name."""

    def head(self, resource_type: str, resource_id: str) -> FhirResource | None:
        found = self.heads.get((resource_type, resource_id))
        return found[0] if found else None

    def content(self, hub: Hub, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The current content of a live resource the batch holds (None if it holds none)."""
        found = self.heads.get((resource_type, resource_id))
        if found is None:
            return None
        if resource_id not in self.opened:
            self.opened[resource_id] = _open(hub, *found)
        return self.opened[resource_id]

    def flush(self, session: Session) -> None:
        """Write the pending rows after the heads they reference (the models have no ORM
        relationships, so one flush would not order them)."""
        if self.pending:
            session.flush()
            insert_all(session, self.pending)
            self.pending.clear()


def prefetch(
    session: Session, hub: Hub, principal: Principal, contents: Sequence[dict[str, Any]]
) -> Batch | None:
    """The `Batch` for creating `contents` in `session` (after any deletion the same
    transaction makes), or None when the caller does not act for one clinic. Three queries:
    the live resources they reference, the index patients of their Patients, and the
    newest open case of each DocumentReference's subject."""
    clinic_id = principal.clinic_id
    if not tenancy.acts_for_clinic(principal) or clinic_id is None:
        return None
    batch = Batch()
    targets = {
        target
        for content in contents
        for _path, ref in references(content, content["resourceType"])
        if (target := _local_target(ref)) is not None
    }
    if targets:
        query = _with_current(tenancy.visible_fhir_resources(principal)).where(
            FhirResource.id.in_({rid for _type, rid in targets}), FhirResource.deleted.is_(False)
        )
        for head, version in session.execute(query):
            batch.heads[(head.resource_type, head.id)] = (head, version)
    patient_ids = {
        pid for c in contents if c["resourceType"] == "Patient" if (pid := patient_id_of(c, ""))
    }
    if patient_ids:
        batch.index_patients = dict.fromkeys(((clinic_id, p) for p in patient_ids), None)
        for patient_id, pk in session.execute(
            select(Patient.patient_id, Patient.id).where(
                Patient.clinic_id == clinic_id, Patient.patient_id.in_(patient_ids)
            )
        ):
            batch.index_patients[(clinic_id, patient_id)] = pk
    subjects = [
        batch.head("Patient", subject.removeprefix("Patient/"))
        for c in contents
        if c["resourceType"] == "DocumentReference"
        if (subject := _subject(c))
    ]
    patient_pks = {h.patient_pk for h in subjects if h is not None and h.patient_pk}
    if patient_pks:
        newest = (
            func.row_number()
            .over(partition_by=Case.patient_pk, order_by=Case.created_at.desc())
            .label("newest")
        )
        ranked = (
            tenancy.visible_cases(principal)
            .with_only_columns(Case.id, Case.clinic_id, Case.patient_pk, newest)
            .where(Case.patient_pk.in_(patient_pks), Case.status.in_(list(OPEN)))
            .subquery()
        )
        batch.open_cases = dict.fromkeys(patient_pks, None)
        for case_id, case_clinic, patient_pk in session.execute(
            select(ranked.c.id, ranked.c.clinic_id, ranked.c.patient_pk).where(ranked.c.newest == 1)
        ):
            batch.open_cases[patient_pk] = case_id
            batch.cases[case_id] = (case_clinic, patient_pk)
    return batch


# --------------------------------------------------------------------------- writes


def _owner(principal: Principal, resource_type: str, case_clinic: str | None) -> str:
    """The clinic a new resource belongs to: the writer's clinic; for a specialist's
    reply (REPLY_TYPES), the clinic of the case it is about."""
    clinic = principal.clinic_id if principal.kind in tenancy.CLINIC_KINDS else None
    if principal.kind == "user" and principal.role != "clinician":
        clinic = None
    if clinic:
        return clinic
    if (
        principal.kind == "user"
        and principal.role == "specialist"
        and resource_type in REPLY_TYPES
        and case_clinic
    ):
        return case_clinic
    if principal.kind == "user" and principal.role == "specialist":
        raise Forbidden(
            f"a specialist writes {', '.join(REPLY_TYPES)} about a case they see "
            "(basedOn its ServiceRequest, imagingStudy, about its Task), nothing else",
            resource_type,
        )
    raise Forbidden("only a clinic's users and systems write FHIR resources here", resource_type)


def _write(
    session: Session,
    hub: Hub,
    head: FhirResource,
    content: dict[str, Any] | None,
    method: str,
    now: datetime,
) -> None:
    """A new version of an existing resource, and its tokens in place of the old ones."""
    session.execute(sql_delete(FhirToken).where(FhirToken.resource_id == head.id))
    session.add_all(_version_rows(hub, head, content, method, now))


def _version_rows(
    hub: Hub, head: FhirResource, content: dict[str, Any] | None, method: str, now: datetime
) -> list[FhirVersion | FhirToken]:
    """The version row of `head`'s current version and the token rows of `content`."""
    rows: list[FhirVersion | FhirToken] = [
        FhirVersion(
            resource_id=head.id,
            version_id=head.version_id,
            last_updated=now,
            method=method,
            content_sealed=_seal(hub, content, head.version_id) if content else None,
        )
    ]
    if content is not None:
        rows += [
            FhirToken(resource_id=head.id, param=param, system=system, value=value)
            for param, system, value in _tokens(content)
        ]
    return rows


def _stamp(content: dict[str, Any], resource_id: str, version_id: int, now: datetime) -> None:
    content["id"] = resource_id
    meta = dict(content.get("meta") or {})
    meta["versionId"] = str(version_id)
    meta["lastUpdated"] = now.isoformat().replace("+00:00", "Z")
    content["meta"] = meta


def _patient_link(
    session: Session, clinic_id: str, content: dict[str, Any], batch: Batch | None = None
) -> str | None:
    """The index patient a FHIR Patient stands for, when one with its identifier exists."""
    if content["resourceType"] != "Patient":
        return None
    patient_id = patient_id_of(content, "")
    if not patient_id:
        return None
    if batch is not None and (clinic_id, patient_id) in batch.index_patients:
        return batch.index_patients[(clinic_id, patient_id)]
    return session.scalar(
        select(Patient.id).where(Patient.clinic_id == clinic_id, Patient.patient_id == patient_id)
    )


def _after_link(
    session: Session, head: FhirResource, case_id: str | None, content: dict[str, Any]
) -> None:
    """Tie a resource (and a referral's subject Patient resource, and the Binaries a
    document's attachments name) to the case."""
    if case_id is not None:
        _link_all(session, [(head, case_id, content)])


def _link_all(
    session: Session,
    links: Sequence[tuple[FhirResource, str, dict[str, Any]]],
    case_patients: dict[str, str] | None = None,
) -> None:
    """`_after_link` for many (head, case id, content), in one query for the cases'
    patients (none when `case_patients` has them all) and one statement per kind of row
    linked."""
    if not links:
        return
    patient_of = dict(case_patients or {})
    if missing := {case_id for _h, case_id, _c in links} - patient_of.keys():
        query = select(Case.id, Case.patient_pk).where(Case.id.in_(missing))
        patient_of.update((case_id, patient_pk) for case_id, patient_pk in session.execute(query))
    binaries: list[dict[str, Any]] = []
    subjects: list[dict[str, Any]] = []
    linked: set[str] = set()
    for head, case_id, content in links:
        head.case_id = case_id
        patient_pk = patient_of.get(case_id)
        # A Binary is posted before the DocumentReference that names it, so it knows no
        # case; linked here, the case's specialist can read the bytes the document is.
        binaries += [
            {"b_id": b, "b_clinic": head.clinic_id, "b_case": case_id, "b_patient": patient_pk}
            for b in _binary_ids(content)
        ]
        subject = head.subject.removeprefix("Patient/") if head.subject else None
        held = session.identity_map.get(identity_key(FhirResource, subject)) if subject else None
        if isinstance(held, FhirResource) and held.patient_pk is not None:
            continue  # linked already (a patient_pk is never unset)
        if subject and patient_pk and subject not in linked:
            linked.add(subject)
            subjects.append(
                {
                    "b_id": subject,
                    "b_clinic": head.clinic_id,
                    "b_patient": patient_pk,
                }
            )
    # In id order: two transactions linking the same rows lock them in the same order, so
    # one waits for the other instead of deadlocking.
    binaries.sort(key=lambda p: str(p["b_id"]))
    subjects.sort(key=lambda p: str(p["b_id"]))
    table = cast(Table, FhirResource.__table__)
    if binaries:
        session.execute(
            table.update()
            .where(
                table.c.id == bindparam("b_id"),
                table.c.resource_type == BINARY,
                table.c.clinic_id == bindparam("b_clinic"),
                table.c.case_id.is_(None),
            )
            .values(case_id=bindparam("b_case"), patient_pk=bindparam("b_patient")),
            binaries,
        )
    if subjects:
        session.execute(
            table.update()
            .where(
                table.c.id == bindparam("b_id"),
                table.c.clinic_id == bindparam("b_clinic"),
                table.c.patient_pk.is_(None),
            )
            .values(patient_pk=bindparam("b_patient")),
            subjects,
        )
    # The statements above are Core's (one executemany each): the heads of this session
    # learn their new values here, as an ORM update would have told them.
    for params, unset in [(p, "case_id") for p in binaries] + [(p, "patient_pk") for p in subjects]:
        held = session.identity_map.get(identity_key(FhirResource, params["b_id"]))
        matched = (
            isinstance(held, FhirResource)
            and held.clinic_id == params["b_clinic"]
            and getattr(held, unset) is None
            and (unset != "case_id" or held.resource_type == BINARY)
        )
        if matched and unset == "case_id":
            set_committed_value(held, "case_id", params["b_case"])
        if matched:
            set_committed_value(held, "patient_pk", params["b_patient"])


def _prepare(
    session: Session,
    hub: Hub,
    principal: Principal,
    content: dict[str, Any],
    batch: Batch | None = None,
) -> tuple[str | None, str | None]:
    """Checks every write makes before storing: references, attachments, a referral's
    mapping, the case a reply is about and whether its state machine takes it. Returns
    (case id, clinic of that case)."""
    _check_references(session, principal, content, batch)
    _check_attachments(session, principal, content, batch)
    case_id = _case_of(session, principal, content, batch)
    case_clinic = None
    if case_id is not None:
        if batch is not None and case_id in batch.cases:
            case_clinic = batch.cases[case_id][0]
        else:
            case_clinic = session.scalar(select(Case.clinic_id).where(Case.id == case_id))
        target = case_effect(content, _from_clinic(principal, case_clinic or ""))
        if target is not None:
            _check_effect(session, case_id, content, target)
    elif (
        content["resourceType"] in REPLY_TYPES
        and case_effect(content, False) is not None
        and principal.kind == "user"
        and principal.role == "specialist"
    ):
        raise StoreError(
            "a reply must name the case: basedOn its ServiceRequest, imagingStudy "
            "ImagingStudy/<id> or about Task/<case id>",
            f"{content['resourceType']}.basedOn",
        )
    return case_id, case_clinic


def create_in(
    session: Session,
    hub: Hub,
    principal: Principal,
    content: dict[str, Any],
    *,
    resource_id: str | None = None,
    document: documents.Sealed | None = None,
    batch: Batch | None = None,
) -> Stored:
    """Store a new resource in `session` (the caller's transaction); the server assigns the
    id unless `resource_id` (a transaction's pre-assigned id) is given. A Binary's bytes
    come as `document` (sealed already); its content keeps no ``data``. With `batch` (see
    `prefetch`), the lookups come from it and the rows after the head wait in it for
    `Batch.flush`, which the caller calls before the transaction commits."""
    content = dict(content)
    resource_type = content["resourceType"]
    case_id, case_clinic = _prepare(session, hub, principal, content, batch)
    clinic_id = _owner(principal, resource_type, case_clinic)
    resource_id = resource_id or new_id()
    now = utcnow()
    if resource_type == BINARY:
        content.pop("data", None)  # the bytes are the sealed blob, not the JSON
    _stamp(content, resource_id, 1, now)
    if resource_type == "ServiceRequest":
        referral_of(session, hub, principal, clinic_id, content, batch)  # a bad mapping: now
    head = FhirResource(
        id=resource_id,
        resource_type=resource_type,
        clinic_id=clinic_id,
        version_id=1,
        last_updated=now,
        deleted=False,
        status=_status(content),
        subject=_subject(content),
        patient_pk=_patient_link(session, clinic_id, content, batch),
    )
    session.add(head)
    # The head first: versions, tokens and binaries reference it (no ORM relationships, so
    # the unit of work would not order them). In a batch, they wait for Batch.flush.
    after: list[Any] = _version_rows(hub, head, content, "POST", now)
    if case_id is not None:
        case_patients = (
            {case_id: batch.cases[case_id][1]} if batch and case_id in batch.cases else None
        )
        _link_all(session, [(head, case_id, content)], case_patients)
    if document is not None:
        blob, binary = documents.index_rows(document, resource_id, content["contentType"])
        session.add(blob)  # no foreign key: it goes with the head
        after.append(binary)
    if resource_type in DOCUMENT_TYPES:
        after.append(
            OutboxEvent(
                topic=DOCUMENT_TOPIC,
                payload={"type": resource_type, "id": resource_id, "case_id": case_id},
            )
        )
    if batch is not None:
        batch.pending += after
    else:
        session.flush()
        session.add_all(after)
    # No second flush here: the next query or write of the transaction flushes these rows
    # with its own, the commit flushes the last ones.
    return Stored(
        resource_type, resource_id, 1, now, False, content, clinic_id, head.patient_pk, case_id
    )


def settle(
    hub: Hub, principal: Principal, written: Sequence[Stored], rules: RuleSet
) -> list[Stored]:
    """After commit: referrals make or join their case (saf.cases.on_referral), resources
    about a case not known at write time are linked to it, and replies move their case.

    Every step is idempotent (on_referral finds the same case, a case already at the
    target status is left alone), so running it again after a crash converges; a failure
    here never undoes what was stored.
    """
    done = list(written)
    # Referrals first, so a reply or document in the same Bundle finds their case.
    _settle_referrals(hub, principal, done, rules)
    for i, stored in enumerate(done):
        if stored.deleted or stored.content is None:
            continue
        content = stored.content
        case_id = stored.case_id
        if stored.resource_type == "ServiceRequest":
            if content.get("status") in WITHDRAWN and case_id is not None:
                _withdraw(hub, principal, stored, case_id)
            continue  # a live one was settled above
        if case_id is None and stored.resource_type in CASE_LINKED_TYPES:
            with hub.sessions() as session:
                case_id = _case_of(session, principal, content)
        if case_id is not None and case_id != stored.case_id:
            with transaction(hub.sessions) as session:
                head = session.get_one(FhirResource, stored.id)
                _after_link(session, head, case_id, content)
                patient_pk = head.patient_pk
            done[i] = replace(stored, case_id=case_id, patient_pk=patient_pk)
        if case_id is not None and (case_effect(content, True) or case_effect(content, False)):
            with hub.sessions() as session:
                clinic = session.scalar(select(Case.clinic_id).where(Case.id == case_id))
            target = case_effect(content, _from_clinic(principal, clinic or ""))
            if target is not None:
                try:
                    apply_case_effect(hub, principal, case_id, content, target)
                except CaseError as exc:
                    log.warning("case %s: reply %s not applied: %s", case_id, stored.id, exc)
    return done


def _settle_referrals(hub: Hub, principal: Principal, done: list[Stored], rules: RuleSet) -> None:
    """The live ServiceRequests of `done` make or join their cases, all at once (one
    transaction for the cases, one to link the resources: a Bundle of 100 referrals costs
    two commits, not 200); `done` gets their case ids."""
    live = [
        i
        for i, s in enumerate(done)
        if s.resource_type == "ServiceRequest"
        and not s.deleted
        and s.content is not None
        and s.content.get("status") not in WITHDRAWN
    ]
    if not live:
        return
    referrals: dict[int, Referral] = {}
    with hub.sessions() as session:
        contents = [done[i].content for i in live]
        batch = prefetch(session, hub, principal, [c for c in contents if c is not None])
        for i, content in zip(live, contents, strict=True):
            assert content is not None
            referral = referral_of(session, hub, principal, done[i].clinic_id, content, batch)
            if referral is not None:
                referrals[i] = referral
    cases = on_referrals(hub, list(referrals.values()), rules)
    relink: dict[int, str] = {}
    for i, case_id in zip(referrals, cases, strict=True):
        if isinstance(case_id, CaseError):
            # Stored already: a retry (PUT of the same content) links it later.
            log.warning("ServiceRequest %s: no case yet: %s", done[i].id, case_id)
        elif case_id != done[i].case_id:
            relink[i] = case_id
    if not relink:
        return
    with transaction(hub.sessions) as session:
        ids = [done[i].id for i in relink]
        # The subject Patients' heads too: _link_all leaves alone those linked already.
        subjects = [
            s.removeprefix("Patient/")
            for i in relink
            if done[i].content and (s := _subject(done[i].content or {}))
        ]
        heads = {
            h.id: h
            for h in session.scalars(
                select(FhirResource).where(FhirResource.id.in_([*ids, *subjects]))
            )
        }
        links = []
        for i, case_id in relink.items():
            content = done[i].content
            assert content is not None
            links.append((heads[done[i].id], case_id, content))
        _link_all(session, links)
        for i, case_id in relink.items():
            done[i] = replace(done[i], case_id=case_id, patient_pk=heads[done[i].id].patient_pk)


def _withdraw(hub: Hub, principal: Principal, stored: Stored, case_id: str) -> None:
    """Cancel the case of a withdrawn referral, if no other live referral asks for it and
    the case can still be cancelled (idempotent: a cancelled case is left alone)."""
    with hub.sessions() as session:
        others = session.scalar(
            select(func.count()).where(
                FhirResource.case_id == case_id,
                FhirResource.resource_type == "ServiceRequest",
                FhirResource.id != stored.id,
                FhirResource.deleted.is_(False),
                FhirResource.status.not_in(list(WITHDRAWN)),
            )
        )
        current = session.scalar(select(Case.status).where(Case.id == case_id))
    if others or current is None:
        return
    if TaskStatus.CANCELLED not in ALLOWED[TaskStatus(current)]:
        log.info("case %s is %s: ServiceRequest %s withdrawn too late", case_id, current, stored.id)
        return
    try:
        transition(
            hub,
            case_id,
            TaskStatus.CANCELLED,
            actor=principal.name,
            note=f"referral withdrawn (ServiceRequest/{stored.id})",
        )
    except CaseError as exc:  # changed meanwhile: the next write of the referral retries
        log.warning("case %s: referral withdrawal not applied: %s", case_id, exc)


def _atomically(
    hub: Hub, document: documents.Sealed | None, write: Callable[[Session], Stored]
) -> Stored:
    try:
        with transaction(hub.sessions) as session:
            return write(session)
    except BaseException:
        if document is not None:
            documents.discard(hub, document)
        raise


def create(
    hub: Hub,
    principal: Principal,
    content: dict[str, Any],
    rules: RuleSet,
    *,
    document: documents.Sealed | None = None,
) -> Stored:
    """Store a new resource (the server assigns its id; a client's id is ignored) in one
    transaction, then `settle` its case effects."""
    stored = _atomically(
        hub, document, lambda s: create_in(s, hub, principal, content, document=document)
    )
    return settle(hub, principal, [stored], rules)[0]


# --------------------------------------------------------------------------- conditional create


def condition_key(principal: Principal, resource_type: str, criteria: str) -> int:
    """A signed 64-bit key for (the caller's tenant, `resource_type`, the criteria with
    its parameters in a canonical order): equal conditions from the same tenant get the
    same key, whatever order the client wrote the parameters in."""
    pairs = sorted(parse_qsl(criteria.strip().lstrip("?"), keep_blank_values=True))
    tenant = principal.clinic_id or f"*{principal.id}"
    text = "\x1f".join((tenant, resource_type, urlencode(pairs)))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big", signed=True)


def lock_condition(
    session: Session, principal: Principal, resource_type: str, criteria: str
) -> None:
    """Serialise conditional creates with the same criteria until `session`'s transaction
    ends, so that a search and the create that follows it are one step: of two concurrent
    ``If-None-Exist`` creates of the same resource, the second waits, then finds the first.

    PostgreSQL: a transaction-scoped advisory lock on `condition_key` (released by commit
    or rollback). SQLite: the database write lock (``BEGIN IMMEDIATE``), taken before the
    search, which serialises every writer; pysqlite opens a transaction only at the first
    write, so a transaction that has one open holds that lock already.
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        key = condition_key(principal, resource_type, criteria)
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (key,))
    elif connection.dialect.name == "sqlite":
        dbapi = connection.connection.dbapi_connection
        if dbapi is not None and not dbapi.in_transaction:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:  # pragma: no cover - saf runs on SQLite and PostgreSQL only
        raise NotImplementedError(f"conditional create on {connection.dialect.name}")


def match_in(
    session: Session,
    hub: Hub,
    principal: Principal,
    resource_type: str,
    query: Search,
    criteria: str,
) -> Stored | None:
    """The one resource a conditional create's criteria (`query`, parsed from the
    `criteria` text) match, under `lock_condition` held to the end of the transaction:
    None when nothing matches (the caller creates in the same transaction);
    MultipleMatches when several do."""
    lock_condition(session, principal, resource_type, criteria)
    query = replace(query, count=2, offset=0)
    found, total = search_in(session, hub, principal, resource_type, query)
    if total > 1:
        raise MultipleMatches(f"{resource_type}?{criteria.lstrip('?')} matches {total} resources")
    return found[0] if found else None


def create_if_none_exist(
    hub: Hub,
    principal: Principal,
    content: dict[str, Any],
    query: Search,
    criteria: str,
    rules: RuleSet,
) -> tuple[Stored, bool]:
    """Conditional create (``If-None-Exist``): in one transaction, under `lock_condition`,
    the match of `query` if there is one, else a new resource; returns it and whether it
    was created (then its case effects are settled, as `create` does)."""
    with transaction(hub.sessions) as session:
        existing = match_in(session, hub, principal, content["resourceType"], query, criteria)
        if existing is not None:
            return existing, False
        stored = create_in(session, hub, principal, content)
    return settle(hub, principal, [stored], rules)[0], True


def _status(content: dict[str, Any]) -> str | None:
    status = content.get("status")
    return status[:32] if isinstance(status, str) else None


def _visible_head(
    session: Session, principal: Principal, resource_type: str, resource_id: str
) -> FhirResource:
    head = session.scalar(
        tenancy.visible_fhir_resources(principal).where(
            FhirResource.id == resource_id, FhirResource.resource_type == resource_type
        )
    )
    if head is None:
        raise NotFound(f"{resource_type}/{resource_id} is not known")
    return head


def _may_change(principal: Principal, head: FhirResource) -> None:
    """Writers of an existing resource: its clinic's principals, the hub, and for a reply
    the specialists who see it."""
    if principal.kind == "system":
        return
    if principal.kind == "user" and principal.role == "specialist":
        if head.resource_type in REPLY_TYPES:
            return
        raise Forbidden(f"a specialist may not change a {head.resource_type}")
    if _owner(principal, head.resource_type, None) != head.clinic_id:
        raise NotFound(f"{head.resource_type}/{head.id} is not known")


def update_in(
    session: Session,
    hub: Hub,
    principal: Principal,
    content: dict[str, Any],
    *,
    if_match: int | None = None,
) -> Stored:
    """Store a new version of an existing resource in `session` (a deleted one comes back).

    `if_match` (the version of an ``If-Match`` ETag) must be the current version, else
    PreconditionFailed (412); a ``meta.versionId`` in the body that is not the current
    version, or another writer committing first, is a VersionConflict (409). There is no
    update-as-create: ids are the server's.
    """
    resource_type, resource_id = content["resourceType"], content["id"]
    if resource_type == "Binary":
        raise Forbidden("a Binary is not changed; create a new one", "Binary")
    head = _visible_head(session, principal, resource_type, resource_id)
    current = head.version_id
    if if_match is not None and if_match != current:
        raise PreconditionFailed(
            f"If-Match names version {if_match}, the current version is {current}"
        )
    claimed = (content.get("meta") or {}).get("versionId")
    if claimed is not None and claimed != str(current):
        raise VersionConflict(
            f"meta.versionId is {claimed}, the current version is {current}",
            f"{resource_type}.meta.versionId",
        )
    _may_change(principal, head)
    clinic_id = head.clinic_id
    case_id, _case_clinic = _prepare(session, hub, principal, content)
    if resource_type == "ServiceRequest":
        referral_of(session, hub, principal, clinic_id, content)
    content = dict(content)
    now = utcnow()
    version = current + 1
    _stamp(content, resource_id, version, now)
    moved = session.execute(
        sql_update(FhirResource)
        .where(FhirResource.id == resource_id, FhirResource.version_id == current)
        .values(
            version_id=version,
            last_updated=now,
            deleted=False,
            status=_status(content),
            subject=_subject(content),
        )
        .execution_options(synchronize_session=False)
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        raise VersionConflict(f"{resource_type}/{resource_id} changed while being updated")
    session.refresh(head)
    _write(session, hub, head, content, "PUT", now)
    if head.patient_pk is None:
        head.patient_pk = _patient_link(session, clinic_id, content)
    # A linked resource keeps its case; a new version may name new Binaries to link.
    _after_link(session, head, head.case_id or case_id, content)
    session.flush()
    return Stored(
        resource_type,
        resource_id,
        version,
        now,
        False,
        content,
        clinic_id,
        head.patient_pk,
        head.case_id,
        "PUT",
    )


def update(
    hub: Hub,
    principal: Principal,
    content: dict[str, Any],
    rules: RuleSet,
    *,
    if_match: int | None = None,
) -> Stored:
    """`update_in` in its own transaction, then `settle` its case effects."""
    stored = _atomically(
        hub, None, lambda s: update_in(s, hub, principal, content, if_match=if_match)
    )
    return settle(hub, principal, [stored], rules)[0]


def delete_in(
    session: Session, hub: Hub, principal: Principal, resource_type: str, resource_id: str
) -> Stored:
    """Delete softly in `session`: a version with no content; its history stays. Deleting a
    deleted resource changes nothing. A referral's case is not cancelled by this."""
    head = _visible_head(session, principal, resource_type, resource_id)
    _may_change(principal, head)
    if not head.deleted:
        now = utcnow()
        current = head.version_id
        moved = session.execute(
            sql_update(FhirResource)
            .where(FhirResource.id == resource_id, FhirResource.version_id == current)
            .values(version_id=current + 1, last_updated=now, deleted=True)
            .execution_options(synchronize_session=False)
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            raise VersionConflict(f"{resource_type}/{resource_id} changed while deleted")
        session.refresh(head)
        _write(session, hub, head, None, "DELETE", now)
    return Stored(
        resource_type,
        resource_id,
        head.version_id,
        head.last_updated,
        True,
        None,
        head.clinic_id,
        head.patient_pk,
        head.case_id,
        "DELETE",
    )


def delete(hub: Hub, principal: Principal, resource_type: str, resource_id: str) -> Stored:
    """`delete_in` in its own transaction."""
    return _atomically(
        hub, None, lambda s: delete_in(s, hub, principal, resource_type, resource_id)
    )


# --------------------------------------------------------------------------- documents


def _attachments(content: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(FHIRPath, Attachment) of the attachments whose bytes are checked on the way in."""
    resource_type = content["resourceType"]
    if resource_type == "DocumentReference":
        for i, item in enumerate(content.get("content") or []):
            if isinstance(item, dict) and isinstance(item.get("attachment"), dict):
                yield f"DocumentReference.content[{i}].attachment", item["attachment"]
    elif resource_type == "DiagnosticReport":
        for i, item in enumerate(content.get("presentedForm") or []):
            if isinstance(item, dict):
                yield f"DiagnosticReport.presentedForm[{i}]", item


def _binary_ids(content: dict[str, Any]) -> list[str]:
    """Ids of the Binaries stored here that the attachments of `content` name."""
    ids = []
    for _, attachment in _attachments(content):
        url = attachment.get("url")
        if isinstance(url, str) and url.startswith("Binary/"):
            binary_id = _ref_id(url, "Binary")
            if binary_id:
                ids.append(binary_id)
    return ids


def _check_attachments(
    session: Session, principal: Principal, content: dict[str, Any], batch: Batch | None = None
) -> None:
    """An attachment's ``url`` ``Binary/<id>`` must be a Binary the caller sees, and its
    ``size`` and ``hash`` (base64 SHA-1) must be those of the bytes (stored, or inline
    ``data``); Unprocessable (422) naming the element otherwise."""
    for path, attachment in _attachments(content):
        size, sha1 = None, None
        if isinstance(attachment.get("data"), str):
            try:
                data = base64.b64decode(attachment["data"], validate=True)
            except ValueError:
                raise StoreError("data is not base64", f"{path}.data") from None
            size, sha1 = len(data), hashlib.sha1(data, usedforsecurity=False).hexdigest()
        elif isinstance(attachment.get("url"), str):
            url = attachment["url"]
            binary_id = _ref_id(url, "Binary") if url.startswith("Binary/") else None
            if binary_id is None:
                continue  # an external URL: nothing here to check it against
            if batch is not None:
                batch.flush(session)  # a Binary of the same Bundle
            row = session.execute(
                select(FhirBinary.size, FhirBinary.sha1)
                .join(FhirResource, FhirBinary.resource_id == FhirResource.id)
                .where(
                    tenancy.fhir_resource_clause(principal),
                    FhirResource.id == binary_id,
                    FhirResource.deleted.is_(False),
                )
            ).first()
            if row is None:
                raise StoreError(
                    f"url {attachment['url']!r} does not resolve to a Binary here", f"{path}.url"
                )
            size, sha1 = row
        else:
            continue
        claimed_size = attachment.get("size")
        if claimed_size is not None and claimed_size != size:
            raise Unprocessable(
                f"size is {claimed_size} but the document has {size} bytes", f"{path}.size"
            )
        claimed_hash = attachment.get("hash")
        if claimed_hash is not None:
            try:
                claimed_hex = base64.b64decode(claimed_hash, validate=True).hex()
            except ValueError:
                raise StoreError("hash is not base64", f"{path}.hash") from None
            if claimed_hex != sha1:
                raise Unprocessable(
                    f"hash is not the SHA-1 of the document's bytes (the bytes' SHA-1 is {sha1})",
                    f"{path}.hash",
                )


def read_binary(hub: Hub, principal: Principal, resource_id: str) -> tuple[Stored, str, bytes]:
    """A Binary the caller sees: its resource, media type and bytes (authenticated)."""
    stored = read(hub, principal, "Binary", resource_id)
    with hub.sessions() as session:
        row = session.execute(
            select(FhirBinary, Blob)
            .join(Blob, Blob.id == FhirBinary.blob_id)
            .where(FhirBinary.resource_id == resource_id)
        ).first()
        if row is None:
            raise NotFound(f"Binary/{resource_id} has no content")
        binary, blob = row
        session.expunge(blob)
    return stored, binary.content_type, documents.read(hub, blob)


# --------------------------------------------------------------------------- reads


def read(hub: Hub, principal: Principal, resource_type: str, resource_id: str) -> Stored:
    """The current version; NotFound (absent or not the caller's) or Gone (deleted)."""
    # One autocommitted SELECT of plain columns (no BEGIN and ROLLBACK round trips, no ORM
    # unit of work): every FHIR read runs it.
    params = {"id": resource_id, "type": resource_type}
    with autocommit_connection(hub.engine) as conn:
        row = conn.execute(_read_current(principal), params).first()
    if row is None:
        raise NotFound(f"{resource_type}/{resource_id} is not known")
    # The row has the names `_stored` reads from a head and its version.
    stored = _stored(hub, cast(FhirResource, row), cast(FhirVersion, row))
    if stored.deleted:
        raise Gone(f"{resource_type}/{resource_id} was deleted")
    return stored


_READ_CURRENT: Final = (
    select(
        FhirResource.resource_type, FhirResource.id, FhirResource.clinic_id,
        FhirResource.patient_pk, FhirResource.case_id, FhirVersion.version_id,
        FhirVersion.last_updated, FhirVersion.content_sealed, FhirVersion.method,
    )
    .join(FhirVersion, and_(
        FhirVersion.resource_id == FhirResource.id,
        FhirVersion.version_id == FhirResource.version_id,
    ))
    .where(FhirResource.id == bindparam("id"), FhirResource.resource_type == bindparam("type"))
)  # fmt: skip
"""`read` without its tenancy clause."""


@functools.lru_cache(maxsize=1024)
def _read_current(principal: Principal) -> Select[*tuple[Any, ...]]:
    """`_READ_CURRENT` limited to what `principal` sees (saf.tenancy), built once per caller:
    building it, and adapting SQLAlchemy's cached result metadata to a new statement
    object, cost more than running it. A changed role or clinic is another Principal."""
    return _READ_CURRENT.where(tenancy.fhir_resource_clause(principal))


def _with_current(query: Select[Any]) -> Select[Any]:
    """`query` with each resource's current version joined (one round trip, not two)."""
    current = and_(
        FhirVersion.resource_id == FhirResource.id,
        FhirVersion.version_id == FhirResource.version_id,
    )
    return query.add_columns(FhirVersion).join(FhirVersion, current)


def vread(
    hub: Hub, principal: Principal, resource_type: str, resource_id: str, version_id: int
) -> Stored:
    """One version; NotFound when there is no such version, Gone when it is a deletion."""
    with hub.sessions() as session:
        head = _visible_head(session, principal, resource_type, resource_id)
        version = session.get(FhirVersion, (head.id, version_id))
        if version is None:
            raise NotFound(f"{resource_type}/{resource_id} has no version {version_id}")
        stored = _stored(hub, head, version)
    if stored.deleted:
        raise Gone(f"{resource_type}/{resource_id} version {version_id} is a deletion")
    return stored


def history(
    hub: Hub,
    principal: Principal,
    resource_type: str,
    resource_id: str,
    *,
    count: int = 50,
    offset: int = 0,
) -> tuple[list[Stored], int]:
    """Versions newest first (deletions included), one page, and how many there are."""
    with hub.sessions() as session:
        head = _visible_head(session, principal, resource_type, resource_id)
        versions = session.scalars(
            select(FhirVersion)
            .where(FhirVersion.resource_id == head.id)
            .order_by(FhirVersion.version_id.desc())
            .limit(count)
            .offset(offset)
        ).all()
        return [_stored(hub, head, v) for v in versions], head.version_id


def _between(op: str, at: datetime) -> ColumnElement[bool]:
    column = FhirResource.last_updated
    return {"gt": column > at, "ge": column >= at, "lt": column < at, "le": column <= at}[op]


def _token_clause(
    param: str, alternatives: Sequence[tuple[str | None, str | None]]
) -> ColumnElement[bool]:
    # ``id IN (SELECT resource_id ...)``, not a correlated EXISTS: with no table statistics
    # (SQLite always, PostgreSQL before autovacuum's first ANALYZE) the planner turns an
    # EXISTS into a scan of every resource of the type; the IN form starts from the
    # (param, value) index whatever the statistics say.
    options = []
    for system, value in alternatives:
        conds = [FhirToken.param == param]
        if system is not None:
            conds.append(FhirToken.system == system)
        if value is not None:
            conds.append(FhirToken.value == value)
        options.append(and_(*conds))
    return FhirResource.id.in_(select(FhirToken.resource_id).where(or_(*options)))


def _date_clause(op: str, at: str) -> ColumnElement[bool]:
    value = FhirToken.value >= at if op == "ge" else FhirToken.value < at
    return FhirResource.id.in_(
        select(FhirToken.resource_id).where(FhirToken.param == "date", value)
    )


def search_in(
    session: Session, hub: Hub, principal: Principal, resource_type: str, query: Search
) -> tuple[list[Stored], int]:
    """One page of the live resources of `resource_type` the caller sees that match
    `query`, ordered by last update then id (a stable order), and the total."""
    where: list[ColumnElement[bool]] = [
        FhirResource.resource_type == resource_type,
        FhirResource.deleted.is_(False),
    ]
    where += [FhirResource.id.in_(ids) for ids in query.ids]
    where += [_between(op, at) for op, at in query.last_updated]
    where += [_token_clause("identifier", alts) for alts in query.identifiers]
    where += [_token_clause(param, alts) for param, alts in query.tokens]
    where += [_date_clause(op, at) for op, at in query.dates]
    where += [FhirResource.subject.in_(refs) for refs in query.subjects]
    where += [FhirResource.status.in_(codes) for codes in query.statuses]
    base = tenancy.visible_fhir_resources(principal).where(*where)
    columns: list[Any] = [FhirResource.last_updated, FhirResource.id]
    if query.sort_by_date:
        date = (
            select(func.min(FhirToken.value))
            .where(FhirToken.resource_id == FhirResource.id, FhirToken.param == "date")
            .scalar_subquery()
        )
        columns.insert(0, date)
    order = [c.desc() for c in columns] if query.descending else columns
    total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
    page = base.order_by(*order).limit(query.count).offset(query.offset)
    rows = session.execute(_with_current(page)).all()
    found = [_stored(hub, row[0], row[1]) for row in rows]
    return found, int(total)


def search(
    hub: Hub, principal: Principal, resource_type: str, query: Search
) -> tuple[list[Stored], int]:
    """`search_in` in a session of its own."""
    with hub.sessions() as session:
        return search_in(session, hub, principal, resource_type, query)


# --------------------------------------------------------------------------- key rotation

RESEAL_BATCH: Final = 500


def reseal(hub: Hub, new_key_id: str) -> int:
    """Reseal every stored version not yet under `new_key_id` (for saf.keys.rotate, after
    the ring's active key changed); returns how many were resealed. Re-runnable."""
    keyring = hub.keyring
    resealed = 0
    after = ("", 0)
    while True:
        with transaction(hub.sessions) as session:
            batch = list(
                session.execute(
                    select(FhirVersion, FhirResource.resource_type)
                    .join(FhirResource, FhirResource.id == FhirVersion.resource_id)
                    .where(
                        or_(
                            FhirVersion.resource_id > after[0],
                            and_(
                                FhirVersion.resource_id == after[0],
                                FhirVersion.version_id > after[1],
                            ),
                        )
                    )
                    .order_by(FhirVersion.resource_id, FhirVersion.version_id)
                    .limit(RESEAL_BATCH)
                )
            )
            for version, resource_type in batch:
                token = version.content_sealed
                if token and value_key_id(token) != new_key_id:
                    context = _context(resource_type, version.resource_id, version.version_id)
                    version.content_sealed = reseal_value(keyring, token, context=context)
                    resealed += 1
        if len(batch) < RESEAL_BATCH:
            return resealed
        after = (batch[-1][0].resource_id, batch[-1][0].version_id)
