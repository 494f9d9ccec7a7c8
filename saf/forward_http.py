"""The forwarding queue over HTTP for admins (`/api/forward`): what `saf forward status` and
`saf forward retry` show and do, for an operator without a shell on the hub.

- ``GET /api/forward/jobs``: per-destination counts (as `saf forward status`) and a page of
  jobs, newest first; filters ``destination`` and ``state``; ``limit``/``offset``.
- ``GET /api/forward/jobs/{job_id}``: one job and what its destination acknowledged
  (instance ids and the SOP Instance UID the destination holds, remapped if de-identified).
- ``POST /api/forward/jobs/{job_id}/retry``: that job due now (a failed one gets a fresh
  retry window); 409 for a job that is done or being sent.
- ``POST /api/forward/retry?destination=...&failed_only=true``: every pending (and failed)
  job of a destination, or only the failed ones.

Admins only (anyone else: 403, audited), like the audit trail. Jobs carry the study's
primary key, UIDs, counts and error texts, never names; every call is audited (ids only).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Final

from fastapi import APIRouter, HTTPException, Query

from saf import audit, forwarding
from saf.deps import CurrentPrincipal, HubDep
from saf.hub import Hub
from saf.identity import Principal

router = APIRouter(prefix="/api/forward", tags=["forwarding"])

PAGE_MAX: Final = 500
"""Largest page of jobs a caller may ask for."""

STATES: Final = ("pending", "sending", "done", "failed")


def _admin_only(hub: Hub, caller: Principal, event: str) -> None:
    if caller.kind == "user" and caller.role == "admin":
        return
    audit.record(hub, event, caller, outcome=audit.MINOR_FAILURE, entity_type="ForwardJob",
                 detail="forwarding is for admins")  # fmt: skip
    raise HTTPException(403, "the forwarding queue is for admins")


def _job(view: forwarding.JobView) -> dict[str, Any]:
    out = asdict(view)
    for key in ("next_attempt_at", "queued_at", "updated_at"):
        out[key] = out[key].isoformat() if out[key] else None
    return out


@router.get("/jobs")
def list_jobs(
    caller: CurrentPrincipal,
    hub: HubDep,
    destination: Annotated[str | None, Query(description="Destination URL as in the rules")] = None,
    state: Annotated[str | None, Query(description="pending, sending, done or failed")] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """Per-destination counts and a page of jobs, newest first (admins)."""
    _admin_only(hub, caller, "search")
    if state is not None and state not in STATES:
        raise HTTPException(400, f"state must be one of {', '.join(STATES)}, not {state!r}")
    jobs, total = forwarding.list_jobs(
        hub, destination=destination, state=state, limit=limit, offset=offset
    )
    destinations = [
        {**asdict(s), "next_attempt_at": s.next_attempt_at and s.next_attempt_at.isoformat()}
        for s in forwarding.status(hub)
        if destination is None or s.destination == destination
    ]
    audit.record(hub, "search", caller, entity_type="ForwardJob",
                 detail=f"{len(jobs)} of {total} jobs")  # fmt: skip
    return {"destinations": destinations, "total": total, "jobs": [_job(j) for j in jobs]}


@router.get("/jobs/{job_id}")
def read_job(job_id: int, caller: CurrentPrincipal, hub: HubDep) -> dict[str, Any]:
    """One job and its acknowledgements (admins)."""
    _admin_only(hub, caller, "read")
    found = forwarding.get_job(hub, job_id)
    if found is None:
        audit.record(hub, "read", caller, outcome=audit.MINOR_FAILURE, entity_type="ForwardJob",
                     entity_id=str(job_id), detail="no such job")  # fmt: skip
        raise HTTPException(404, "not found")
    audit.record(hub, "read", caller, entity_type="Study", entity_id=found.job.study_id,
                 clinic_id=found.clinic_id, patient_pk=found.patient_pk,
                 detail=f"forward job={job_id} acks={len(found.acked)}")  # fmt: skip
    acked = [{"instance_id": i, "sent_sop_instance_uid": uid} for i, uid in found.acked.items()]
    return {**_job(found.job), "acked": acked}


@router.post("/jobs/{job_id}/retry")
def retry_job(job_id: int, caller: CurrentPrincipal, hub: HubDep) -> dict[str, Any]:
    """Make one job due now (admins)."""
    _admin_only(hub, caller, "update")
    before = forwarding.get_job(hub, job_id)
    state = forwarding.retry_job(hub, job_id)
    if before is None or state is None:
        audit.record(hub, "update", caller, outcome=audit.MINOR_FAILURE, entity_type="ForwardJob",
                     entity_id=str(job_id), detail="no such job")  # fmt: skip
        raise HTTPException(404, "not found")
    if state in ("done", "sending"):
        raise HTTPException(409, f"job {job_id} is {state}: nothing to retry")
    audit.record(hub, "update", caller, entity_type="Study", entity_id=before.job.study_id,
                 clinic_id=before.clinic_id, patient_pk=before.patient_pk,
                 detail=f"forward job={job_id} retry (was {before.job.state})")  # fmt: skip
    return {"id": job_id, "state": state}


@router.post("/retry")
def retry_destination(
    caller: CurrentPrincipal,
    hub: HubDep,
    destination: Annotated[str | None, Query(description="Only this destination")] = None,
    failed_only: Annotated[bool, Query(description="Only jobs that gave up")] = False,
) -> dict[str, Any]:
    """Make the pending (and failed) jobs of a destination, or of all, due now (admins)."""
    _admin_only(hub, caller, "update")
    count = forwarding.retry(hub, destination=destination, failed_only=failed_only)
    which = " (failed only)" if failed_only else ""
    audit.record(hub, "update", caller, entity_type="ForwardJob", detail=f"retry {count}{which}")
    return {"retried": count}
