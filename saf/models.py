"""Index tables: clinics and DICOM peers, patient/study/series/instance, blobs, outbox."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

UNASSIGNED_CLINIC = "unassigned"
"""Clinic that receives studies from unknown AE titles when SAF_DICOM_ACCEPT_UNKNOWN is on."""


def new_id() -> str:
    """An opaque primary key (32 hex characters); never derived from PHI."""
    return secrets.token_hex(16)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware.

    SQLite keeps no zone and hands back naive values; PostgreSQL returns aware ones.
    This makes both return aware UTC, so comparisons never mix the two kinds.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    """Declarative base; naming convention keeps Alembic constraint names stable."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


Base.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Clinic(Base):
    """A tenant: a clinic owns its patients, studies and documents."""

    __tablename__ = "clinic"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    peers: Mapped[list[DicomPeer]] = relationship(back_populates="clinic")


class DicomPeer(Base):
    """A calling AE title (optionally pinned to a host) that belongs to a clinic."""

    __tablename__ = "dicom_peer"
    __table_args__ = (UniqueConstraint("ae_title", "host", name="uq_dicom_peer_ae_title_host"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinic.id"), index=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255), default="")
    """Peer address the AE title must come from; empty means any host."""
    permissions: Mapped[str] = mapped_column(String(32), default="store")
    """DIMSE services the peer may use, comma-separated from store, find, move, get."""
    cert_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    """When set, the peer must connect over TLS with the client certificate of this
    SHA-256 fingerprint (hex, lower case)."""
    port: Mapped[int | None] = mapped_column(Integer, default=None)
    """TCP port of the peer's own Storage SCP; a peer with a host and port is a C-MOVE
    destination and receives Storage Commitment results on a new association."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    clinic: Mapped[Clinic] = relationship(back_populates="peers")


class Patient(Base):
    """A patient as one clinic knows them: the same Patient ID at two clinics is two patients."""

    __tablename__ = "patient"
    __table_args__ = (
        UniqueConstraint("clinic_id", "patient_id", name="uq_patient_clinic_id_patient_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinic.id"), index=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    """DICOM PatientID (0010,0020), the clinic's identifier."""
    name_sealed: Mapped[str | None] = mapped_column(Text)
    """PatientName, sealed with saf.crypto.seal_value (context 'patient.name')."""
    birth_date_sealed: Mapped[str | None] = mapped_column(Text)
    """PatientBirthDate, sealed with saf.crypto.seal_value (context 'patient.birth_date')."""
    sex: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Study(Base):
    """A DICOM study of one clinic's patient."""

    __tablename__ = "study"
    __table_args__ = (
        UniqueConstraint(
            "clinic_id", "study_instance_uid", name="uq_study_clinic_id_study_instance_uid"
        ),
        Index("ix_study_stable_pending", "stable_at", "last_received_at"),
        # QIDO/C-FIND date ranges and paged study lists read a clinic's studies in this
        # order (saf.query) without sorting them all.
        Index(
            "ix_study_clinic_date",
            "clinic_id",
            "study_date",
            "study_time",
            "study_instance_uid",
            "id",
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinic.id"), index=True)
    patient_pk: Mapped[str] = mapped_column(ForeignKey("patient.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    stable_at: Mapped[datetime | None] = mapped_column(default=None)
    """When the study was last found complete; cleared when a new instance arrives."""

    patient: Mapped[Patient] = relationship()
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A series within a study."""

    __tablename__ = "series"
    __table_args__ = (
        UniqueConstraint(
            "study_pk", "series_instance_uid", name="uq_series_study_pk_series_instance_uid"
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    study_pk: Mapped[str] = mapped_column(ForeignKey("study.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Blob(Base):
    """A sealed object in the blob store; its header (wrapped data key) lives here."""

    __tablename__ = "blob"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    header: Mapped[bytes] = mapped_column(LargeBinary)
    """saf.crypto.BlobHeader.to_bytes(); rotation rewrites this, never the object."""
    key_id: Mapped[str] = mapped_column(String(64), index=True)
    """Key-encryption key that wraps the data key (copy of the header's, for queries)."""
    size: Mapped[int] = mapped_column(BigInteger)
    """Plaintext size in bytes."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Instance(Base):
    """One received version of a SOP instance; the stored Part 10 object is a sealed blob."""

    __tablename__ = "instance"
    __table_args__ = (
        UniqueConstraint(
            "series_pk", "sop_instance_uid", "version", name="uq_instance_series_sop_version"
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    series_pk: Mapped[str] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    """1 for the first bytes received under this UID; +1 for each different payload."""
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger)
    """Size of the stored Part 10 object in bytes."""
    sha256: Mapped[str] = mapped_column(String(64))
    """SHA-256 of the encoded dataset as received (after the File Meta group)."""
    blob_id: Mapped[str] = mapped_column(ForeignKey("blob.id"), index=True)
    source: Mapped[str] = mapped_column(String(80))
    """How it arrived, e.g. 'dimse:MODALITY1@10.0.0.5'."""
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")
    blob: Mapped[Blob] = relationship()


class OutboxEvent(Base):
    """Work to do after a commit (thumbnails, routing, notifications), written in the same txn."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    topic: Mapped[str] = mapped_column(String(64), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    """Last time the event was handed to the broker."""
    completed_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    """When its task finished (or, for a topic no task acts on, when it was dispatched).
    A dispatched event still not completed after SAF_OUTBOX_REDELIVER_SECONDS is
    published again, whatever the broker did with the first message."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class Case(Base):
    """One consult: a clinic's patient, their studies (and, later, referral documents).

    Its status is the FHIR Task status (saf.cases.TaskStatus); `specialty` is the
    worklist routing put it on; `assigned_to` is the specialist who claimed it.
    """

    __tablename__ = "consult"  # "case" is an SQL keyword

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinic.id"), index=True)
    patient_pk: Mapped[str] = mapped_column(ForeignKey("patient.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[str] = mapped_column(String(8))
    due_at: Mapped[datetime] = mapped_column()
    specialty: Mapped[str] = mapped_column(String(64), index=True)
    routed_by: Mapped[str] = mapped_column(String(64))
    """Name of the routing rule that chose the worklist."""
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    assigned_to: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    note_sealed: Mapped[str | None] = mapped_column(Text)
    """Task.note (a JSON list of Annotations, free text, so PHI) sealed with
    saf.crypto.seal_value under ``consult/<id>/note``; None when there is none."""


class CaseStudy(Base):
    """A study belongs to at most one case."""

    __tablename__ = "consult_study"

    study_pk: Mapped[str] = mapped_column(ForeignKey("study.id"), primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("consult.id"), index=True)


class CaseReferral(Base):
    """A referral (FHIR ServiceRequest) linked to a case: what joins it to its studies."""

    __tablename__ = "consult_referral"
    __table_args__ = (
        UniqueConstraint(
            "clinic_id",
            "service_request_id",
            name="uq_consult_referral_clinic_id_service_request_id",
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    case_id: Mapped[str] = mapped_column(ForeignKey("consult.id"), index=True)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinic.id"))
    service_request_id: Mapped[str] = mapped_column(String(255))
    """The ServiceRequest's business identifier ("system|value"), unique per clinic."""
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    requested_specialty: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CaseEvent(Base):
    """The history of a case: every status change, routing and claim, append-only."""

    __tablename__ = "consult_event"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("consult.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    note: Mapped[str] = mapped_column(String(256), default="")
    """What happened, for people (no PHI: ids, codes, user names)."""
    state: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The case as its Task shows it after this event (saf.cases.TaskSnapshot: status,
    priority, owner, worklist, due and update times), so each Task version can be read
    again; None for events recorded before migration 0017."""
    note_sealed: Mapped[str | None] = mapped_column(Text)
    """The case's Task.note after this event (a copy of Case.note_sealed)."""


class Thumbnail(Base):
    """A rendered preview, sealed like everything else: of one instance or of a series."""

    __tablename__ = "thumbnail"
    __table_args__ = (
        UniqueConstraint("instance_id", "size", name="uq_thumbnail_instance_id_size"),
        UniqueConstraint("series_pk", "size", name="uq_thumbnail_series_pk_size"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    instance_id: Mapped[str | None] = mapped_column(ForeignKey("instance.id"), index=True)
    """Set for an instance thumbnail (exactly one of instance_id and series_pk is set)."""
    series_pk: Mapped[str | None] = mapped_column(ForeignKey("series.id"), index=True)
    """Set for a series' representative thumbnail."""
    size: Mapped[int] = mapped_column(Integer)
    """Longest side in pixels."""
    media_type: Mapped[str] = mapped_column(String(32))
    blob_id: Mapped[str] = mapped_column(ForeignKey("blob.id"))
    placeholder: Mapped[bool] = mapped_column(default=False)
    """True when the image could not be rendered and a placeholder was stored instead."""
    reason: Mapped[str | None] = mapped_column(String(200))
    """Why rendering failed (no PHI), for placeholders."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class User(Base):
    """A person who logs in: a clinician (one clinic), a specialist or an admin."""

    __tablename__ = "app_user"  # "user" is reserved in PostgreSQL

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    """argon2id hash (PHC string)."""
    role: Mapped[str] = mapped_column(String(16))
    """clinician | specialist | admin."""
    clinic_id: Mapped[str | None] = mapped_column(ForeignKey("clinic.id"), index=True)
    """The clinic of a clinician; None for specialists and admins."""
    specialties: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Worklists a specialist serves."""
    disabled_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiClient(Base):
    """A system (an EHR) that authenticates with SMART Backend Services; one clinic's."""

    __tablename__ = "api_client"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    """The OAuth client_id (the `iss` and `sub` of its assertions)."""
    name: Mapped[str] = mapped_column(String(64), unique=True)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinic.id"), index=True)
    jwks: Mapped[dict[str, Any]] = mapped_column(JSON)
    """Public keys that sign its client assertions (a JWK Set)."""
    scopes: Mapped[str] = mapped_column(String(1024))
    """SMART scopes it may be granted, space-separated."""
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UsedAssertion(Base):
    """A client assertion `jti` already accepted; kept until the assertion expires."""

    __tablename__ = "used_assertion"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class AuditRecord(Base):
    """Who did what to which resource, when, from where, with what outcome. Append-only:
    the code has no update or delete path, and database triggers refuse both."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(32), index=True)
    """What happened: see saf.audit.EVENTS (login, read, search, create, ...)."""
    action: Mapped[str] = mapped_column(String(1))
    """FHIR AuditEvent.action: C, R, U, D or E."""
    outcome: Mapped[int] = mapped_column(Integer)
    """FHIR AuditEvent.outcome: 0 success, 4 minor failure, 8 serious failure, 12 major."""
    actor_kind: Mapped[str] = mapped_column(String(16))
    """user | client | ae | system | anonymous."""
    actor_id: Mapped[str | None] = mapped_column(String(64), index=True)
    actor_name: Mapped[str | None] = mapped_column(String(64))
    """Username, client name or AE title (never a patient's data)."""
    clinic_id: Mapped[str | None] = mapped_column(String(32), index=True)
    """The tenant whose data was touched, when known."""
    source_address: Mapped[str | None] = mapped_column(String(255))
    entity_type: Mapped[str | None] = mapped_column(String(32))
    entity_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_pk: Mapped[str | None] = mapped_column(String(32), index=True)
    """The patient whose data was touched (BALP patient participant), when known."""
    detail: Mapped[str | None] = mapped_column(String(256))
    """Ids and counts only; no PHI."""


class FhirResource(Base):
    """One FHIR resource a client created (saf.fhir_store), as it is now: its tenant, its
    current version and the plain columns searches filter on. Every version's content is a
    FhirVersion row, sealed."""

    __tablename__ = "fhir_resource"
    __table_args__ = (Index("ix_fhir_resource_type_updated", "resource_type", "last_updated"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    """The logical id (server-assigned, unique across types)."""
    resource_type: Mapped[str] = mapped_column(String(64))
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinic.id"), index=True)
    version_id: Mapped[int] = mapped_column(Integer, default=1)
    last_updated: Mapped[datetime] = mapped_column(default=utcnow)
    deleted: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str | None] = mapped_column(String(32), index=True)
    """The `status` element, for types that have one (search by status)."""
    subject: Mapped[str | None] = mapped_column(String(128), index=True)
    """The `subject` (or `patient`) reference as stored, e.g. ``Patient/<id>``."""
    case_id: Mapped[str | None] = mapped_column(ForeignKey("consult.id"), index=True)
    """The case a ServiceRequest made or joined (the specialists of that case see it)."""
    patient_pk: Mapped[str | None] = mapped_column(ForeignKey("patient.id"), index=True)
    """The index patient a FHIR Patient (or a referral's subject) stands for, once known."""


class FhirVersion(Base):
    """One version of a FHIR resource: the JSON sealed, or no content for a deletion."""

    __tablename__ = "fhir_version"

    resource_id: Mapped[str] = mapped_column(ForeignKey("fhir_resource.id"), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_updated: Mapped[datetime] = mapped_column(default=utcnow)
    method: Mapped[str] = mapped_column(String(8))
    """POST, PUT or DELETE: the interaction that made this version (history entries)."""
    content_sealed: Mapped[str | None] = mapped_column(Text)
    """The resource JSON sealed with saf.crypto.seal_value (context
    ``fhir/<type>/<id>``); None for a deletion."""


class FhirToken(Base):
    """A token search value of a resource's current version (identifier system|value)."""

    __tablename__ = "fhir_token"
    __table_args__ = (Index("ix_fhir_token_param_value", "param", "value"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    resource_id: Mapped[str] = mapped_column(ForeignKey("fhir_resource.id"), index=True)
    param: Mapped[str] = mapped_column(String(32))
    system: Mapped[str] = mapped_column(String(255), default="")
    value: Mapped[str] = mapped_column(String(255))


class ForwardJob(Base):
    """One study to send to one forwarding destination (saf.forwarding), or one Storage
    Commitment report to deliver to the AE that asked for it (`report` set, no study):
    its own retry schedule, so a destination that is down delays only its own jobs."""

    __tablename__ = "forward_job"
    __table_args__ = (
        UniqueConstraint(
            "destination", "study_pk", "scope", name="uq_forward_job_destination_study_pk_scope"
        ),
        Index("ix_forward_job_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    destination: Mapped[str] = mapped_column(String(255), index=True)
    """The destination URL as the rules name it (dicom://AET@host:port or https://...)."""
    study_pk: Mapped[str | None] = mapped_column(ForeignKey("study.id"), index=True)
    """The study to send; None for a commitment report."""
    rule: Mapped[str] = mapped_column(String(64))
    """Name of the (first) forwarding rule that queued the job."""
    token_env: Mapped[str | None] = mapped_column(String(64))
    """Environment variable holding the bearer token of a DICOMweb destination."""
    state: Mapped[str] = mapped_column(String(16), default="pending")
    """pending, sending, done or failed."""
    generation: Mapped[int] = mapped_column(Integer, default=1)
    """+1 each time the study is queued again (it changed); a send that started on an
    older generation does not mark the job done."""
    study_stable_at: Mapped[datetime | None] = mapped_column(default=None)
    """The study's stable_at when queued: the same value again is a redelivered event."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    instances_total: Mapped[int] = mapped_column(Integer, default=0)
    instances_sent: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(256))
    """Why the last attempt failed: status codes, AE titles, counts; never PHI."""
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    """Start of the retry window (SAF_FORWARD_MAX_AGE_SECONDS)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Part D (migration 0013): reply jobs, de-identification, TLS pinning.
    scope: Mapped[str] = mapped_column(String(80), default="")
    """'' for the whole study; 'reply:<digest of the series UIDs>' for one reply's series."""
    series_uids: Mapped[str | None] = mapped_column(Text, default=None)
    """JSON list of the Series Instance UIDs to send (a reply's); None: the whole study."""
    deidentify: Mapped[bool] = mapped_column(default=False)
    """Send de-identified (saf.deidentify, PS3.15 Basic Profile) with per-destination keys."""
    tls_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    """dicoms:// destinations: the server certificate's pinned SHA-256 (hex), if any."""
    # Migration 0016: Storage Commitment reports (saf.commitment).
    report: Mapped[str | None] = mapped_column(Text, default=None)
    """JSON: the commitment request (Transaction UID, references, requesting AE and clinic)
    and, once verified, the result to report; None for a study forward."""


class ForwardAck(Base):
    """An instance version the destination of a job acknowledged (not sent again on retry)."""

    __tablename__ = "forward_ack"

    job_id: Mapped[int] = mapped_column(ForeignKey("forward_job.id"), primary_key=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("instance.id"), primary_key=True)
    acked_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    """The SOP Instance UID the destination holds: the remapped one when de-identified."""


# --------------------------------------------------------------------------- part C: the viewer


class Annotation(Base):
    """A specialist's mark on one frame of a case's image, in image pixel coordinates
    (saf.annotations); frozen once the case's reply is signed."""

    __tablename__ = "annotation"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    case_id: Mapped[str] = mapped_column(ForeignKey("consult.id"), index=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("instance.id"), index=True)
    frame: Mapped[int] = mapped_column(Integer)
    """1-based frame number within the instance."""
    kind: Mapped[str] = mapped_column(String(16))
    """arrow, text, line, angle or ellipse."""
    points: Mapped[list[list[float]]] = mapped_column(JSON)
    """[[x, y], ...]: x = column, y = row, (0, 0) the top left corner of the top left pixel."""
    text_sealed: Mapped[str | None] = mapped_column(Text, default=None)
    """The label, sealed with saf.crypto.seal_value (context ``annotation/<id>.text``)."""
    measurement: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """What saf.annotations measured when it was drawn (length, angle, area and ROI stats)."""
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Reply(Base):
    """A case's reply (saf.replies): a draft, then signed, with what signing made."""

    __tablename__ = "reply"

    case_id: Mapped[str] = mapped_column(ForeignKey("consult.id"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="draft")
    """draft, signing (objects being made; annotations frozen) or signed."""
    content_sealed: Mapped[str | None] = mapped_column(Text, default=None)
    """Findings, impression and recommendation as JSON, sealed (context ``reply/<case_id>``)."""
    urgent: Mapped[bool] = mapped_column(default=False)
    updated_by: Mapped[str | None] = mapped_column(String(64), default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    signed_by: Mapped[str | None] = mapped_column(String(64), default=None)
    signed_at: Mapped[datetime | None] = mapped_column(default=None)
    objects: Mapped[list[dict[str, str]] | None] = mapped_column(JSON, default=None)
    """The SR and GSPS instances signing stored ({study_pk, series_instance_uid,
    sop_instance_uid, modality} each); None until that step is done."""
    pdf_blob_id: Mapped[str | None] = mapped_column(ForeignKey("blob.id"), default=None)
    diagnostic_report_id: Mapped[str | None] = mapped_column(String(64), default=None)


class FrameHeader(Base):
    """What the viewer's frame list needs of an image's header (saf.frames), kept once
    read so a series opens from the index alone: geometry, spacing, default window."""

    __tablename__ = "frame_header"

    instance_id: Mapped[str] = mapped_column(ForeignKey("instance.id"), primary_key=True)
    facts: Mapped[dict[str, Any]] = mapped_column(JSON)
    """saf.frames.Header as JSON (no PHI: sizes, spacing, window, position, numbers)."""


class InstanceMetadata(Base):
    """An instance's DICOM JSON (PS3.18 F.2, WADO-RS metadata) kept in the index, so a
    study's metadata is one query instead of a decryption of every blob (saf.instance_metadata)."""

    __tablename__ = "instance_metadata"

    instance_id: Mapped[str] = mapped_column(
        ForeignKey("instance.id", ondelete="CASCADE"), primary_key=True
    )
    format: Mapped[int] = mapped_column(Integer)
    """Version of the JSON made (saf.instance_metadata.FORMAT); older rows are made again."""
    key_id: Mapped[str] = mapped_column(String(64), index=True)
    """Key-encryption key that sealed `sealed` (for rotation)."""
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    """zlib-compressed DICOM JSON, sealed with saf.crypto.seal_bytes (it is PHI)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CaseMessage(Base):
    """A question of the specialist or an answer of the clinic on a case: the FHIR
    Communication that holds it (its text is there, sealed), in order."""

    __tablename__ = "consult_message"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("consult.id"), index=True)
    communication_id: Mapped[str] = mapped_column(String(64))
    sender: Mapped[str] = mapped_column(String(16))
    """specialist or clinic."""
    author: Mapped[str] = mapped_column(String(64))
    sent_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- A2: FHIR Subscriptions (saf.subscriptions) ---------------------------------------


class Subscription(Base):
    """A clinic's FHIR Subscription (R4 backport, rest-hook) to the case-status topic: the
    plain columns the notifier needs; the resource as the client sent it is sealed
    (its channel headers may carry a secret)."""

    __tablename__ = "subscription"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinic.id"), index=True)
    created_by: Mapped[str] = mapped_column(String(64))
    """The principal id that created it (a client id or a user id)."""
    version_id: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), index=True)
    """requested, active, error or off (Subscription.status)."""
    topic: Mapped[str] = mapped_column(String(255))
    statuses: Mapped[str] = mapped_column(String(255), default="")
    """Task statuses the filter accepts (comma-separated); empty means every change."""
    endpoint: Mapped[str] = mapped_column(String(1024))
    content: Mapped[str] = mapped_column(String(16))
    """Payload content: empty, id-only or full-resource."""
    content_sealed: Mapped[str] = mapped_column(Text)
    """The Subscription resource JSON, sealed with saf.crypto.seal_value."""
    end_at: Mapped[datetime | None] = mapped_column(default=None)
    events_since_start: Mapped[int] = mapped_column(BigInteger, default=0)
    """Event numbers handed out so far (the last notification's event number)."""
    confirmed_at: Mapped[datetime | None] = mapped_column(default=None)
    """When the endpoint last answered a handshake with 2xx."""
    last_error: Mapped[str | None] = mapped_column(String(256))
    """Why the last handshake or delivery failed (status codes, no PHI)."""
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class SubscriptionNotification(Base):
    """One event to deliver to one subscription, with its own retry schedule."""

    __tablename__ = "subscription_notification"
    __table_args__ = (
        UniqueConstraint(
            "subscription_id",
            "case_event_id",
            name="uq_subscription_notification_subscription_id_case_event_id",
        ),
        Index("ix_subscription_notification_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    subscription_id: Mapped[str] = mapped_column(ForeignKey("subscription.id"), index=True)
    event_number: Mapped[int] = mapped_column(BigInteger)
    case_event_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("consult_event.id")
    )
    """The case status change notified (one notification per change and subscription)."""
    case_id: Mapped[str] = mapped_column(ForeignKey("consult.id"))
    to_status: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    """pending, sending, delivered or failed."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)


# --- A1: FHIR documents (Binary bytes are sealed blobs; fhir_api/mhd.py, saf/documents.py)


class FhirBinary(Base):
    """The bytes of a FHIR Binary: a sealed blob (never in the database), with the media
    type it came with and its digests (DocumentReference.content.attachment.hash/size)."""

    __tablename__ = "fhir_binary"

    resource_id: Mapped[str] = mapped_column(ForeignKey("fhir_resource.id"), primary_key=True)
    blob_id: Mapped[str] = mapped_column(ForeignKey("blob.id"), index=True)
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha1: Mapped[str] = mapped_column(String(40))
    """Hex SHA-1 of the bytes (FHIR Attachment.hash is its base64)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
