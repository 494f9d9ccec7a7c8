"""The admin's view of the forwarding queue over HTTP: counts and jobs, one job with what
its destination acknowledged, retry of one job or of a destination; admins only; audited."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from saf.app import create_app
from saf.db import transaction
from saf.forwarding import (
    Destination,
    OutgoingFile,
    SendOutcome,
    enqueue_study,
    forward_due,
    parse_forward_rules,
)
from saf.hub import Hub
from saf.ingest import ingest_part10
from saf.models import AuditRecord, ForwardJob, utcnow
from saf.stability import mark_stable_studies
from tests.factories import TEST_PATIENT_NAME, login_as, make_clinic, make_study

UP = "dicom://UP@127.0.0.1:11113"
DOWN = "dicom://DOWN@127.0.0.1:11114"


def _transport(destination: Destination, files: list[OutgoingFile], _: str | None) -> SendOutcome:
    """Stands in for the network: UP stores everything, DOWN cannot be reached."""
    if destination.ae_title == "UP":
        return SendOutcome(acked={f.instance_id for f in files})
    return SendOutcome(errors={f.instance_id: "no association" for f in files}, unreachable=True)


@pytest.fixture
def queued(hub: Hub, tmp_path: Path) -> str:
    """One study of Clinic A queued for UP (sent) and DOWN (pending, then failed)."""
    sender = make_clinic(hub)
    for path in make_study(tmp_path / "s", count=2, size=16, patient_name=TEST_PATIENT_NAME):
        ingest_part10(hub, path, sender)
    [study_id] = mark_stable_studies(hub, now=utcnow() + timedelta(seconds=60))
    rules = parse_forward_rules(
        f'[[rule]]\nname = "up"\ndestination = "{UP}"\n\n'
        f'[[rule]]\nname = "down"\ndestination = "{DOWN}"\n'
    )
    enqueue_study(hub, study_id, rules=rules)
    forward_due(hub, _transport)
    forward_due(hub, _transport)  # one destination per claim round
    return study_id


def _jobs(hub: Hub) -> dict[str, ForwardJob]:
    with hub.sessions() as session:
        return {j.destination: j for j in session.scalars(select(ForwardJob))}


def test_admin_sees_counts_jobs_and_one_job(hub: Hub, queued: str) -> None:
    jobs = _jobs(hub)
    with TestClient(create_app(hub)) as client:
        admin = login_as(client, "admin", username="root")
        body = client.get("/api/forward/jobs", headers=admin).json()
        assert body["total"] == 2
        by_url = {d["destination"]: d for d in body["destinations"]}
        assert (by_url[UP]["done"], by_url[DOWN]["pending"]) == (1, 1)
        assert "no association" in by_url[DOWN]["last_error"]
        assert {j["study_id"] for j in body["jobs"]} == {queued}
        assert (
            TEST_PATIENT_NAME.split("^")[0]
            not in client.get("/api/forward/jobs", headers=admin).text
        )

        only = client.get("/api/forward/jobs", params={"destination": DOWN}, headers=admin)
        assert [j["destination"] for j in only.json()["jobs"]] == [DOWN]
        assert [d["destination"] for d in only.json()["destinations"]] == [DOWN]
        done = client.get("/api/forward/jobs", params={"state": "done"}, headers=admin).json()
        assert [j["id"] for j in done["jobs"]] == [jobs[UP].id]
        bad = client.get("/api/forward/jobs", params={"state": "lost"}, headers=admin)
        assert bad.status_code == 400 and "pending" in bad.text
        page = client.get("/api/forward/jobs", params={"limit": 1, "offset": 1}, headers=admin)
        assert len(page.json()["jobs"]) == 1 and page.json()["total"] == 2

        one = client.get(f"/api/forward/jobs/{jobs[UP].id}", headers=admin).json()
        assert one["state"] == "done" and one["instances_sent"] == 2 and len(one["acked"]) == 2
        assert all(a["sent_sop_instance_uid"] for a in one["acked"])
        assert client.get("/api/forward/jobs/999999", headers=admin).status_code == 404
    with hub.sessions() as session:
        rows = session.scalars(select(AuditRecord).where(AuditRecord.actor_name == "root")).all()
    assert any(r.event == "search" and r.entity_type == "ForwardJob" for r in rows)
    assert any(r.event == "read" and r.entity_id == queued and r.clinic_id for r in rows)


def test_retry_one_job_and_a_destinations_failed_jobs(hub: Hub, queued: str) -> None:
    jobs = _jobs(hub)
    with TestClient(create_app(hub)) as client:
        admin = login_as(client, "admin", username="root")
        later = utcnow() + timedelta(hours=1)
        with transaction(hub.sessions) as session:
            session.execute(
                update(ForwardJob)
                .where(ForwardJob.destination == DOWN)
                .values(next_attempt_at=later)
            )
        rsp = client.post(f"/api/forward/jobs/{jobs[DOWN].id}/retry", headers=admin)
        assert rsp.json() == {"id": jobs[DOWN].id, "state": "pending"}
        assert _jobs(hub)[DOWN].next_attempt_at <= utcnow()  # due now
        done = client.post(f"/api/forward/jobs/{jobs[UP].id}/retry", headers=admin)
        assert done.status_code == 409 and "done" in done.text
        assert client.post("/api/forward/jobs/999999/retry", headers=admin).status_code == 404

        with transaction(hub.sessions) as session:
            session.execute(
                update(ForwardJob)
                .where(ForwardJob.destination == DOWN)
                .values(state="failed", attempts=9)
            )
        rsp = client.post(
            "/api/forward/retry", params={"destination": DOWN, "failed_only": True}, headers=admin
        )
        assert rsp.json() == {"retried": 1}
        again = _jobs(hub)[DOWN]
        assert (again.state, again.attempts) == ("pending", 0)
        assert _jobs(hub)[UP].state == "done"  # another destination is untouched


@pytest.mark.parametrize("role", ["clinician", "specialist"])
def test_only_admins(hub: Hub, queued: str, role: str) -> None:
    job_id = _jobs(hub)[UP].id
    with TestClient(create_app(hub)) as client:
        other = login_as(client, role, username=f"not-admin-{role}")
        for method, url in [
            ("GET", "/api/forward/jobs"),
            ("GET", f"/api/forward/jobs/{job_id}"),
            ("POST", f"/api/forward/jobs/{job_id}/retry"),
            ("POST", "/api/forward/retry"),
        ]:
            rsp = client.request(method, url, headers=other)
            assert rsp.status_code == 403, (method, url, rsp.text)
            assert queued not in rsp.text
        assert client.get("/api/forward/jobs").status_code == 401
    with hub.sessions() as session:
        refused = session.scalars(
            select(AuditRecord).where(
                AuditRecord.actor_name == f"not-admin-{role}", AuditRecord.outcome == 4
            )
        ).all()
    assert len(refused) == 4
