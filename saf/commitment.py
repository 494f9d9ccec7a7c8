"""Storage Commitment (PS3.4 Annex J) in the core: what the hub commits to, and the report
as a durable job on the forwarding queue.

An N-ACTION request becomes a `forward_job` row with a `report` (JSON) and no study, in
the transaction that must commit before the N-ACTION is answered: once acknowledged,
the report survives a restart of the hub. The job is verified on its first attempt (the
result is then stored in the job, so every retry reports the same thing) and delivered
by a :data:`ReportTransport` (``dicom_node.commitment``: N-EVENT-REPORT on the
requester's open association, else on a new one to its registered host and port), with
the forwarding queue's claim, lease and retry/backoff. A report not delivered within
SAF_COMMITMENT_REPORT_MAX_AGE_SECONDS is dropped (failed, logged and audited): the
requester must ask again.

The hub commits to an instance only when it is durably stored (its index row is
committed, which ingest does after the blob is written) AND its blob decrypts and
authenticates now (every chunk through saf.vault.read). Unknown instances, or ones of
another clinic (tenancy: they do not exist for this peer), fail with 0x0112 (no such
object instance); a blob that fails verification with 0x0110 (processing failure); a
SOP class that does not match the stored one with 0x0119.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

from sqlalchemy import update
from sqlalchemy.orm import joinedload

from saf import audit, vault
from saf.crypto import IntegrityError
from saf.db import transaction
from saf.hub import Hub
from saf.identity import Principal
from saf.models import DicomPeer, ForwardJob, Instance, utcnow
from saf.tenancy import visible_instances

log = logging.getLogger(__name__)

PROCESSING_FAILURE: Final = 0x0110
NO_SUCH_OBJECT_INSTANCE: Final = 0x0112
CLASS_INSTANCE_CONFLICT: Final = 0x0119

ALL_COMMITTED, SOME_FAILED = 1, 2
"""N-EVENT-REPORT Event Type IDs."""

RULE: Final = "storage-commitment"
"""The `rule` a commitment job is filed under (`saf forward status` shows the kind)."""

ACTOR: Final = audit.Actor("system", "commitment", "saf storage commitment")


@dataclass(frozen=True)
class Reference:
    """One instance the requester asks the hub to commit to."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class Report:
    """A commitment request and, once verified, its result."""

    transaction_uid: str
    ae_title: str
    peer_id: str
    clinic_id: str
    refs: list[Reference]
    verified: bool = False
    committed: list[Reference] = field(default_factory=list)
    failed: list[tuple[Reference, int]] = field(default_factory=list)

    @property
    def event_type(self) -> int:
        """1 (all committed) or 2 (some failed)."""
        return SOME_FAILED if self.failed else ALL_COMMITTED

    def to_json(self) -> str:
        """The `forward_job.report` text."""
        return json.dumps({
            "transaction_uid": self.transaction_uid, "ae_title": self.ae_title,
            "peer_id": self.peer_id, "clinic_id": self.clinic_id,
            "refs": [[r.sop_class_uid, r.sop_instance_uid] for r in self.refs],
            "verified": self.verified,
            "committed": [[r.sop_class_uid, r.sop_instance_uid] for r in self.committed],
            "failed": [[r.sop_class_uid, r.sop_instance_uid, why] for r, why in self.failed],
        })  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Report:
        """Read a `forward_job.report`."""
        data: dict[str, Any] = json.loads(text)
        return cls(
            str(data["transaction_uid"]), str(data["ae_title"]), str(data["peer_id"]),
            str(data["clinic_id"]), [Reference(c, i) for c, i in data["refs"]],
            bool(data.get("verified")),
            [Reference(c, i) for c, i in data.get("committed", [])],
            [(Reference(c, i), int(why)) for c, i, why in data.get("failed", [])],
        )  # fmt: skip


ReportTransport = Callable[[str, Report], str | None]
"""Delivers a verified report to a destination (``dicom://AET@host:port``, or ``""`` for a
peer with no registered port); returns None once the peer acknowledged it, else why not."""


def verify(hub: Hub, principal: Principal, refs: list[Reference]) -> Report:
    """A report committing to each reference that is stored, visible to `principal`, of the
    stored SOP class and readable (decrypts and authenticates) right now."""
    report = Report("", principal.name, principal.id, principal.clinic_id or "", refs, True)
    for ref in refs:
        with hub.sessions() as session:
            newest = session.scalars(
                visible_instances(principal)
                .options(joinedload(Instance.blob))
                .where(Instance.sop_instance_uid == ref.sop_instance_uid)
                .order_by(Instance.version.desc())
                .limit(1)
            ).first()
            if newest is None:
                report.failed.append((ref, NO_SUCH_OBJECT_INSTANCE))
                continue
            if newest.sop_class_uid != ref.sop_class_uid:
                report.failed.append((ref, CLASS_INSTANCE_CONFLICT))
                continue
            try:
                for _ in vault.read(hub, newest.blob):
                    pass
            except (IntegrityError, OSError, ValueError, KeyError):
                log.error(
                    "storage commitment: instance %s (blob %s) failed verification",
                    ref.sop_instance_uid,
                    newest.blob_id,
                )
                report.failed.append((ref, PROCESSING_FAILURE))
                continue
        report.committed.append(ref)
    return report


def destination_of(hub: Hub, peer_id: str, ae_title: str, address: str) -> str:
    """``dicom://AET@host:port`` of the requesting peer's registered address; ``""`` when it
    has no port (then only the open association can carry the report)."""
    with hub.sessions() as session:
        peer = session.get(DicomPeer, peer_id)
        host = (peer.host if peer else "") or address
        port = peer.port if peer else None
    return f"dicom://{ae_title}@{host}:{port}" if port and host else ""


def enqueue(hub: Hub, principal: Principal, transaction_uid: str, refs: list[Reference]) -> int:
    """Store a commitment request as a report job, claimed (state `sending`) by the caller,
    which tries to deliver it at once; if the caller dies, the lease hands it to the
    forwarding loop. Returns the job id. Raises if it could not be stored: the N-ACTION
    must then not be acknowledged."""
    destination = destination_of(hub, principal.id, principal.name, principal.address)
    report = Report(transaction_uid, principal.name, principal.id, principal.clinic_id or "",
                    refs)  # fmt: skip
    now = utcnow()
    with transaction(hub.sessions) as session:
        job = ForwardJob(
            destination=destination or f"dicom://{principal.name}@{principal.address}",
            study_pk=None, rule=RULE, state="sending", generation=1, attempts=0,
            next_attempt_at=now, queued_at=now, created_at=now, updated_at=now,
            scope=f"commitment:{transaction_uid}"[:80], report=report.to_json(),
            instances_total=len(refs),
        )  # fmt: skip
        session.add(job)
        session.flush()
        return int(job.id)


@dataclass(frozen=True)
class ReportResult:
    """The outcome of one delivery attempt."""

    job_id: int
    state: str
    error: str | None = None


def run_report_job(
    hub: Hub, job_id: int, generation: int, transport: ReportTransport
) -> ReportResult:
    """One attempt of a claimed commitment job: drop it if too old, verify it if not yet
    verified (and store the result), deliver it; then done, or pending with the
    forwarding queue's backoff. Never raises for the peer's failure."""
    max_age = timedelta(seconds=hub.settings.commitment_report_max_age_seconds)
    with hub.sessions() as session:
        job = session.get(ForwardJob, job_id)
        if job is None or job.generation != generation or job.state != "sending":
            return ReportResult(job_id, "pending")
        assert job.report is not None
        report = Report.from_json(job.report)
        destination, queued_at, attempts = job.destination, job.queued_at, job.attempts
        real_destination = destination if job.destination.rpartition(":")[2].isdigit() else ""
    now = utcnow()
    if now - queued_at >= max_age:
        return _drop(hub, job_id, report, attempts)
    if not report.verified:
        principal = Principal(kind="ae", id=report.peer_id, name=report.ae_title,
                              role="system", clinic_id=report.clinic_id)  # fmt: skip
        result = verify(hub, principal, report.refs)
        report.verified, report.committed, report.failed = True, result.committed, result.failed
        log.info(
            "storage commitment %s from %s: committed=%d failed=%d",
            report.transaction_uid, report.ae_title, len(report.committed), len(report.failed),
        )  # fmt: skip
        with transaction(hub.sessions) as session:
            session.execute(
                update(ForwardJob)
                .where(ForwardJob.id == job_id, ForwardJob.generation == generation)
                .values(report=report.to_json(), instances_sent=len(report.committed),
                        updated_at=utcnow())
            )  # fmt: skip
    try:
        error = transport(real_destination, report)
    except Exception as exc:  # a transport bug must not kill the sender loop
        log.exception("storage commitment report %s: delivery failed", report.transaction_uid)
        error = f"delivery failed: {type(exc).__name__}"
    now = utcnow()
    values: dict[str, Any] = {"updated_at": now}
    if error is None:
        state = "done"
        values |= {"state": "done", "last_error": None}
    else:
        from saf.forwarding import retry_delay  # forwarding imports this module

        attempts += 1
        state = "pending"
        next_at = now + timedelta(seconds=retry_delay(hub, attempts))
        values |= {"state": "pending", "attempts": attempts, "last_error": error[:256],
                   "next_attempt_at": next_at}  # fmt: skip
    with transaction(hub.sessions) as session:
        session.execute(
            update(ForwardJob)
            .where(ForwardJob.id == job_id, ForwardJob.generation == generation)
            .values(**values)
        )
    if error is None:
        log.info("storage commitment report %s delivered to %s", report.transaction_uid,
                 report.ae_title)  # fmt: skip
    else:
        log.warning("storage commitment report %s to %s not delivered (attempt %d): %s",
                    report.transaction_uid, report.ae_title, attempts, error)  # fmt: skip
    return ReportResult(job_id, state, error)


def _drop(hub: Hub, job_id: int, report: Report, attempts: int) -> ReportResult:
    why = (
        f"report not delivered within {hub.settings.commitment_report_max_age_seconds:g} s "
        f"({attempts} attempt(s)); dropped"
    )
    with transaction(hub.sessions) as session:
        session.execute(
            update(ForwardJob)
            .where(ForwardJob.id == job_id)
            .values(state="failed", last_error=why[:256], updated_at=utcnow())
        )
    log.warning("storage commitment report %s to %s: %s", report.transaction_uid,
                report.ae_title, why)  # fmt: skip
    audit.record(
        hub, "dicom-commitment", ACTOR, outcome=audit.MINOR_FAILURE,
        entity_type="ForwardJob", entity_id=str(job_id), clinic_id=report.clinic_id or None,
        detail=f"transaction_uid={report.transaction_uid} ae={report.ae_title} {why}",
    )  # fmt: skip
    return ReportResult(job_id, "failed", why)
