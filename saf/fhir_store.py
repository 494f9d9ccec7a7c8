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
saf.cases.on_referral (see `referral_of` for the mapping).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, cast

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy import delete as sql_delete
from sqlalchemy import update as sql_update
from sqlalchemy.orm import Session

from saf import tenancy
from saf.cases import CaseError, Priority, Referral, on_referral
from saf.crypto import open_value, reseal_value, seal_value, value_key_id
from saf.db import transaction
from saf.hub import Hub
from saf.identity import Principal
from saf.models import Case, FhirResource, FhirToken, FhirVersion, Patient, new_id, utcnow
from saf.routing import RuleSet

STORED_TYPES: Final = ("Patient", "ServiceRequest", "Practitioner", "Organization")
"""Resource types clients create, read, update, delete and search here."""

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


class Forbidden(StoreError):
    """The caller may not write here (no clinic to own the resource)."""

    status = 403
    code = "forbidden"


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
    count: int = 20
    offset: int = 0
    descending: bool = False


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


def _subject(content: dict[str, Any]) -> str | None:
    for key in ("subject", "patient"):
        ref = _reference_of(content.get(key))
        if ref and ref.startswith("Patient/"):
            return "/".join(ref.split("/")[:2])[:128]
    return None


def _tokens(content: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    for ident in content.get("identifier") or []:
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            system = ident.get("system") if isinstance(ident.get("system"), str) else ""
            yield "identifier", str(system)[:MAX_TOKEN], ident["value"][:MAX_TOKEN]


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
        and parts[0] in STORED_TYPES
        and (len(parts) == 2 or parts[2] == "_history")
    ):
        return parts[0], parts[1]
    return None


def _check_references(session: Session, principal: Principal, content: dict[str, Any]) -> None:
    """Every relative reference to a type kept here must name a live resource the caller
    sees (so a referral cannot point at another clinic's patient)."""
    for path, ref in references(content, content["resourceType"]):
        target = _local_target(ref)
        if target is None:
            continue
        found = session.scalar(
            tenancy.visible_fhir_resources(principal).where(
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
    session: Session, hub: Hub, principal: Principal, clinic_id: str, sr: dict[str, Any]
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
        head = session.scalar(
            tenancy.visible_fhir_resources(principal).where(FhirResource.id == target[1])
        )
        version = head and session.get(FhirVersion, (head.id, head.version_id))
        patient = _open(hub, head, version) if head and version else None
        if patient is None:
            raise StoreError("the subject Patient does not resolve", "ServiceRequest.subject")
        patient_id = patient_id_of(patient, head.id if head else "")
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


def _link_referral(
    hub: Hub, principal: Principal, clinic_id: str, content: dict[str, Any], rules: RuleSet
) -> str | None:
    """Make or join the case of a ServiceRequest before it is stored (so every stored
    referral is linked); on_referral is idempotent, so a retried write joins the same case."""
    if content["resourceType"] != "ServiceRequest":
        return None
    with hub.sessions() as session:
        referral = referral_of(session, hub, principal, clinic_id, content)
    if referral is None:
        return None
    try:
        return on_referral(hub, referral, rules)
    except CaseError as exc:
        raise StoreError(f"the referral cannot make a case: {exc}", "ServiceRequest") from None


# --------------------------------------------------------------------------- writes


def _owner(principal: Principal) -> str:
    clinic = principal.clinic_id if principal.kind in tenancy.CLINIC_KINDS else None
    if principal.kind == "user" and principal.role != "clinician":
        clinic = None
    if not clinic:
        raise Forbidden("only a clinic's users and systems write FHIR resources here")
    return clinic


def _write(
    session: Session,
    hub: Hub,
    head: FhirResource,
    content: dict[str, Any] | None,
    method: str,
    now: datetime,
) -> None:
    session.add(
        FhirVersion(
            resource_id=head.id,
            version_id=head.version_id,
            last_updated=now,
            method=method,
            content_sealed=_seal(hub, content, head.version_id) if content else None,
        )
    )
    session.execute(sql_delete(FhirToken).where(FhirToken.resource_id == head.id))
    if content is not None:
        for param, system, value in _tokens(content):
            session.add(FhirToken(resource_id=head.id, param=param, system=system, value=value))


def _stamp(content: dict[str, Any], resource_id: str, version_id: int, now: datetime) -> None:
    content["id"] = resource_id
    meta = dict(content.get("meta") or {})
    meta["versionId"] = str(version_id)
    meta["lastUpdated"] = now.isoformat().replace("+00:00", "Z")
    content["meta"] = meta


def _patient_link(session: Session, clinic_id: str, content: dict[str, Any]) -> str | None:
    """The index patient a FHIR Patient stands for, when one with its identifier exists."""
    if content["resourceType"] != "Patient":
        return None
    patient_id = patient_id_of(content, "")
    if not patient_id:
        return None
    return session.scalar(
        select(Patient.id).where(Patient.clinic_id == clinic_id, Patient.patient_id == patient_id)
    )


def _after_link(session: Session, head: FhirResource, case_id: str | None) -> None:
    """Tie a referral and its subject Patient resource to the case and its patient."""
    if case_id is None:
        return
    head.case_id = case_id
    patient_pk = session.scalar(select(Case.patient_pk).where(Case.id == case_id))
    if head.subject and patient_pk:
        session.execute(
            sql_update(FhirResource)
            .where(
                FhirResource.id == head.subject.removeprefix("Patient/"),
                FhirResource.clinic_id == head.clinic_id,
                FhirResource.patient_pk.is_(None),
            )
            .values(patient_pk=patient_pk)
        )


def create(hub: Hub, principal: Principal, content: dict[str, Any], rules: RuleSet) -> Stored:
    """Store a new resource (the server assigns its id; a client's id is ignored)."""
    clinic_id = _owner(principal)
    content = dict(content)
    resource_id = new_id()
    now = utcnow()
    _stamp(content, resource_id, 1, now)
    with hub.sessions() as session:
        _check_references(session, principal, content)
    case_id = _link_referral(hub, principal, clinic_id, content, rules)
    with transaction(hub.sessions) as session:
        head = FhirResource(
            id=resource_id,
            resource_type=content["resourceType"],
            clinic_id=clinic_id,
            version_id=1,
            last_updated=now,
            deleted=False,
            status=_status(content),
            subject=_subject(content),
            patient_pk=_patient_link(session, clinic_id, content),
        )
        session.add(head)
        session.flush()
        _write(session, hub, head, content, "POST", now)
        _after_link(session, head, case_id)
    return Stored(
        head.resource_type, head.id, 1, now, False, content, clinic_id, head.patient_pk, case_id
    )


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


def update(
    hub: Hub,
    principal: Principal,
    content: dict[str, Any],
    rules: RuleSet,
    *,
    if_match: int | None = None,
) -> Stored:
    """Store a new version of an existing resource (a deleted one comes back).

    `if_match` (the version of an ``If-Match`` ETag) must be the current version, else
    PreconditionFailed (412); a ``meta.versionId`` in the body that is not the current
    version, or another writer committing first, is a VersionConflict (409). There is no
    update-as-create: ids are the server's.
    """
    resource_type, resource_id = content["resourceType"], content["id"]
    with hub.sessions() as session:
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
        _check_references(session, principal, content)
    clinic_id = head.clinic_id
    if principal.kind != "system" and _owner(principal) != clinic_id:
        raise NotFound(f"{resource_type}/{resource_id} is not known")
    content = dict(content)
    now = utcnow()
    version = current + 1
    _stamp(content, resource_id, version, now)
    case_id = _link_referral(hub, principal, clinic_id, content, rules)
    with transaction(hub.sessions) as session:
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
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            raise VersionConflict(f"{resource_type}/{resource_id} changed while being updated")
        head = session.get_one(FhirResource, resource_id)
        _write(session, hub, head, content, "PUT", now)
        if head.patient_pk is None:
            head.patient_pk = _patient_link(session, clinic_id, content)
        _after_link(session, head, case_id)
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


def delete(hub: Hub, principal: Principal, resource_type: str, resource_id: str) -> Stored:
    """Delete a resource softly: a version with no content; its history stays. Deleting a
    deleted resource changes nothing. A referral's case is not cancelled by this."""
    with transaction(hub.sessions) as session:
        head = _visible_head(session, principal, resource_type, resource_id)
        if principal.kind != "system" and _owner(principal) != head.clinic_id:
            raise NotFound(f"{resource_type}/{resource_id} is not known")
        if not head.deleted:
            now = utcnow()
            current = head.version_id
            moved = session.execute(
                sql_update(FhirResource)
                .where(FhirResource.id == resource_id, FhirResource.version_id == current)
                .values(version_id=current + 1, last_updated=now, deleted=True)
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


# --------------------------------------------------------------------------- reads


def read(hub: Hub, principal: Principal, resource_type: str, resource_id: str) -> Stored:
    """The current version; NotFound (absent or not the caller's) or Gone (deleted)."""
    with hub.sessions() as session:
        row = session.execute(
            _with_current(tenancy.visible_fhir_resources(principal)).where(
                FhirResource.id == resource_id, FhirResource.resource_type == resource_type
            )
        ).first()
        if row is None:
            raise NotFound(f"{resource_type}/{resource_id} is not known")
        stored = _stored(hub, row[0], row[1])
    if stored.deleted:
        raise Gone(f"{resource_type}/{resource_id} was deleted")
    return stored


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
    options = []
    for system, value in alternatives:
        conds = [FhirToken.resource_id == FhirResource.id, FhirToken.param == param]
        if system is not None:
            conds.append(FhirToken.system == system)
        if value is not None:
            conds.append(FhirToken.value == value)
        options.append(and_(*conds))
    return select(FhirToken.id).where(or_(*options)).exists()


def search(
    hub: Hub, principal: Principal, resource_type: str, query: Search
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
    where += [FhirResource.subject.in_(refs) for refs in query.subjects]
    where += [FhirResource.status.in_(codes) for codes in query.statuses]
    base = tenancy.visible_fhir_resources(principal).where(*where)
    order = (
        (FhirResource.last_updated.desc(), FhirResource.id.desc())
        if query.descending
        else (FhirResource.last_updated, FhirResource.id)
    )
    with hub.sessions() as session:
        total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
        page = base.order_by(*order).limit(query.count).offset(query.offset)
        rows = session.execute(_with_current(page)).all()
        found = [_stored(hub, row[0], row[1]) for row in rows]
    return found, int(total)


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
