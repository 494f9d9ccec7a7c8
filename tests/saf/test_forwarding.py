"""Forwarding rules and the per-destination queue: matching, idempotent queueing, retries
with backoff, a destination that is down, partial failures, giving up, retry, audit."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from sqlalchemy import delete, select, update
from typer.testing import CliRunner

from dicom_node.forward import make_transport, send_stow
from saf import annotations, replies
from saf.annotations import Draft
from saf.cli import app
from saf.clinics import ClinicError, add_clinic
from saf.db import transaction
from saf.forwarding import (
    Destination,
    ForwardRulesHolder,
    OutgoingFile,
    SendOutcome,
    claim_due,
    enqueue_reply,
    enqueue_study,
    forward_due,
    load_forward_rules,
    parse_forward_rules,
    retry,
    retry_delay,
    run_job,
    status,
)
from saf.hub import Hub
from saf.ingest import Sender, ingest_part10
from saf.models import (
    AuditRecord,
    Case,
    Clinic,
    ForwardAck,
    ForwardJob,
    OutboxEvent,
    Series,
    Study,
    utcnow,
)
from saf.pipeline import REPLY_TOPIC, handle_event
from saf.replies import ReplyDraft
from saf.routing import RulesError, default_rules
from saf.stability import mark_stable_studies
from tests.factories import TEST_PATIENT_NAME, make_clinic, make_study, sop_instance_uid
from tests.saf.store_scp import make_reply_sr, store_scp
from tests.viewer.consult import RULES as VIEWER_RULES
from tests.viewer.consult import SPECIALIST, make_consult

PACS = "dicom://PACS@127.0.0.1:11113"
ARCHIVE = "https://archive.example.org/dicomweb"

RULES = f"""
[[rule]]
name = "ct-to-pacs"
modality = ["ct"]
destination = "{PACS}"

[[rule]]
name = "everything-to-archive"
destination = "{ARCHIVE}/"
token_env = "ARCHIVE_TOKEN"

[[rule]]
name = "clinic-b-only"
clinic = ["Clinic  B"]
destination = "dicom://OTHER@127.0.0.1:11114"
"""


# --- rules ---------------------------------------------------------------------------


def test_every_matching_rule_applies() -> None:
    rules = parse_forward_rules(RULES)
    names = [r.name for r in rules.matching("study.stable", "Clinic A", {"CT"})]
    assert names == ["ct-to-pacs", "everything-to-archive"]
    assert [r.name for r in rules.matching("study.stable", "clinic b", {"MR"})] == [
        "everything-to-archive",
        "clinic-b-only",
    ]
    assert rules.matching("reply", "Clinic A", {"CT"}) == []
    archive = rules.rules[1].destination
    assert (archive.kind, archive.url, archive.port) == ("dicomweb", ARCHIVE, 443)
    pacs = rules.rules[0].destination
    assert (pacs.kind, pacs.ae_title, pacs.host, pacs.port) == ("dicom", "PACS", "127.0.0.1", 11113)


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ('[[rule]]\nname = "a"\ndestinaton = "dicom://A@h:104"\n', 3, 'did you mean "destination"'),
        ('[[rule]]\nname = "a"\ndestination = "dicon://A@h:104"\n', 3, 'did you mean "dicom://"'),
        ('[[rule]]\nname = "a"\ndestination = "dicom://h:104"\n', 3, "AE title"),
        ('[[rule]]\nname = "a"\n\ndestination = "dicom://A@h:104"\ndeidentify = "yes"\n', 5,
         "deidentify must be true or false"),
        ('[[rule]]\nname = "a"\ndestination = "dicom://A@h:104"\ntls_sha256 = "' + "ab" * 32
         + '"\n', 4, "dicoms:// (DICOM TLS) destinations only"),
        ('[[rule]]\nname = "a"\ndestination = "dicoms://A@h:2762"\ntls_sha256 = "abc"\n', 4,
         "64 hex digits"),
        ('[[rule]]\nname = "a"\ndestination = "dicomss://A@h:2762"\n', 3,
         'did you mean "dicoms://"'),
        ('[[rule]]\nname = "a"\ndestination = "dicom://A@h:104"\nevent = ["study.stabel"]\n', 4,
         'did you mean "study.stable"'),
        ('[[rule]]\nname = "a"\n', 1, "missing destination"),
        ('[[rule]]\nname = "a"\ndestination = "dicom://A@h:104"\n'
         '[[rule]]\nname = "a"\ndestination = "dicom://B@h:104"\n', 5, "duplicate rule name"),
        ('[[rule]\nname = "a"\n', 1, "not valid TOML"),
    ],
)  # fmt: skip
def test_rule_errors_name_file_line_and_fix(text: str, line: int, expected: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_forward_rules(text, source="forwarding.toml")
    assert info.value.line == line, str(info.value)
    assert expected in str(info.value)
    assert str(info.value).startswith(f"forwarding.toml line {line}")


def test_holder_keeps_last_good_rules(tmp_path: Path) -> None:
    path = tmp_path / "forwarding.toml"
    holder = ForwardRulesHolder(path)
    assert holder.current.rules == ()  # no file: no forwarding
    path.write_text(RULES)
    assert len(holder.current.rules) == 3
    path.write_text('[[rule]]\nname = "x"\n')
    assert len(holder.current.rules) == 3
    assert holder.last_error is not None and "missing destination" in str(holder.last_error)
    assert load_forward_rules(tmp_path / "absent.toml").rules == ()


def test_rules_check_command(tmp_path: Path) -> None:
    path = tmp_path / "forwarding.toml"
    path.write_text('[[rule]]\nname = "a"\ndestination = "ftp://x"\n')
    runner = CliRunner(env={"COLUMNS": "300"})
    result = runner.invoke(app, ["forward", "rules", "check", "--path", str(path)])
    assert result.exit_code == 1
    assert "line 3" in result.output and "dicom://" in result.output
    path.write_text(RULES)
    result = runner.invoke(app, ["forward", "rules", "check", "--path", str(path)])
    assert result.exit_code == 0 and "3 rule(s), OK" in result.output


def test_retry_delay_grows_is_jittered_and_capped(hub: Hub) -> None:
    hub.settings.forward_retry_base_seconds = 10
    hub.settings.forward_retry_max_seconds = 3600
    rng = random.Random(7)
    delays = [retry_delay(hub, n, rng) for n in range(1, 12)]
    for n, d in enumerate(delays, start=1):
        full = min(3600, 10 * 2 ** (n - 1))
        assert full / 2 <= d <= full
    assert len({round(d, 6) for d in delays}) == len(delays)


# --- queue ---------------------------------------------------------------------------


def _stable_study(hub: Hub, tmp_path: Path, *, clinic: str = "Clinic A", count: int = 3,
                  seed: int = 1, kind: str = "ct") -> tuple[str, list[Path]]:  # fmt: skip
    sender = make_clinic(hub, clinic, aet=f"MOD_{seed}")
    paths = make_study(tmp_path / f"s{seed}", kind, count=count, size=32, seed=seed)
    for path in paths:
        ingest_part10(hub, path, sender)
    [study_id] = mark_stable_studies(hub, now=utcnow() + timedelta(seconds=60))
    return study_id, paths


Transport = Callable[[Destination, list[OutgoingFile], str | None], SendOutcome]


class Recorder:
    """A transport standing in for destinations: each one up, down, or refusing some UIDs."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.refuse: set[str] = set()
        self.received: dict[str, list[bytes]] = {}
        self.tokens: list[str | None] = []

    def __call__(
        self, destination: Destination, files: list[OutgoingFile], token: str | None
    ) -> SendOutcome:
        self.tokens.append(token)
        if destination.url in self.down:
            reason = "no association with host (refused)"
            return SendOutcome(errors={f.instance_id: reason for f in files}, unreachable=True)
        outcome = SendOutcome()
        for f in files:
            if f.sop_instance_uid in self.refuse:
                outcome.errors[f.instance_id] = f"{f.sop_instance_uid}: status 0xA700"
            else:
                self.received.setdefault(destination.url, []).append(f.path.read_bytes())
                outcome.acked.add(f.instance_id)
        return outcome


def _jobs(hub: Hub) -> dict[tuple[str, str], ForwardJob]:
    with hub.sessions() as session:
        return {(j.destination, j.study_pk): j for j in session.scalars(select(ForwardJob))}


def test_enqueue_is_idempotent_and_requeues_a_changed_study(hub: Hub, tmp_path: Path) -> None:
    study_id, _ = _stable_study(hub, tmp_path)
    rules = parse_forward_rules(RULES)
    first = enqueue_study(hub, study_id, rules=rules)
    assert len(first) == 2  # CT to the PACS, everything to the archive; not clinic B's
    assert enqueue_study(hub, study_id, rules=rules) == first  # redelivered event
    jobs = _jobs(hub)
    assert {j.generation for j in jobs.values()} == {1}
    assert {j.destination for j in jobs.values()} == {PACS, ARCHIVE}

    recorder = Recorder()
    forward_due(hub, recorder)
    assert {j.state for j in _jobs(hub).values()} == {"done"}
    # New instances made the study stable again: each job goes back to pending once.
    with hub.sessions.begin() as session:
        session.execute(update(Study).where(Study.id == study_id).values(stable_at=utcnow()))
    assert enqueue_study(hub, study_id, rules=rules) == first
    assert enqueue_study(hub, study_id, rules=rules) == first
    jobs = _jobs(hub)
    assert {(j.state, j.generation, j.attempts) for j in jobs.values()} == {("pending", 2, 0)}
    # Nothing changed in the study: nothing is sent again (every instance acknowledged).
    results = forward_due(hub, recorder)
    assert [(r.state, r.sent) for r in results] == [("done", 0), ("done", 0)]
    assert sum(len(v) for v in recorder.received.values()) == 6


def test_down_destination_delays_only_its_own_jobs(hub: Hub, tmp_path: Path) -> None:
    hub.settings.forward_retry_base_seconds = 60
    a, paths_a = _stable_study(hub, tmp_path, seed=1)
    b, _ = _stable_study(hub, tmp_path, clinic="Clinic B", seed=2)
    rules = parse_forward_rules(RULES)
    enqueue_study(hub, a, rules=rules)
    enqueue_study(hub, b, rules=rules)
    transport = Recorder()
    transport.down.add(PACS)

    before = utcnow()
    forward_due(hub, transport)  # one job per destination per pass
    forward_due(hub, transport)
    forward_due(hub, transport)
    jobs = _jobs(hub)
    # The archive and the other PACS got everything; the PACS that is down was tried once:
    # its first failure pushed its other job back too (no hammering a dead host).
    assert jobs[(ARCHIVE, a)].state == jobs[(ARCHIVE, b)].state == "done"
    assert jobs[("dicom://OTHER@127.0.0.1:11114", b)].state == "done"
    down = [jobs[(PACS, a)], jobs[(PACS, b)]]
    assert sorted(j.attempts for j in down) == [0, 1]
    assert all(j.state == "pending" for j in down)
    assert all(j.next_attempt_at >= before + timedelta(seconds=29) for j in down)
    assert "no association" in (max(down, key=lambda j: j.attempts).last_error or "")
    assert transport.tokens.count(None) >= 1  # ARCHIVE_TOKEN is not set here

    [row] = [r for r in status(hub) if r.destination == PACS]
    assert (row.pending, row.done, row.attempts) == (2, 0, 1)
    assert row.next_attempt_at is not None and row.next_attempt_at > before

    # The PACS comes back; an operator does not wait for the backoff.
    transport.down.clear()
    assert retry(hub, destination=PACS) == 2
    forward_due(hub, transport)
    forward_due(hub, transport)
    assert {j.state for j in _jobs(hub).values()} == {"done"}
    assert len(transport.received[PACS]) == 6  # both clinics' CT studies
    assert {p.read_bytes() for p in paths_a} <= set(transport.received[PACS])


def test_partial_failure_resends_only_the_rest_and_audits(hub: Hub, tmp_path: Path) -> None:
    hub.settings.forward_retry_base_seconds = 0.01
    study_id, paths = _stable_study(hub, tmp_path, count=4)
    rules = parse_forward_rules(f'[[rule]]\nname = "p"\ndestination = "{PACS}"\n')
    [job_id] = enqueue_study(hub, study_id, rules=rules)
    transport = Recorder()
    refused = sop_instance_uid(paths[1])
    transport.refuse.add(refused)

    [result] = forward_due(hub, transport)
    assert (result.state, result.sent, result.remaining) == ("pending", 3, 1)
    assert result.error is not None and "1 of 4 instance(s)" in result.error
    assert "0xA700" in result.error
    transport.refuse.clear()
    time.sleep(0.05)
    [result] = forward_due(hub, transport)
    assert (result.state, result.sent, result.remaining) == ("done", 1, 0)
    assert len(transport.received[PACS]) == 4  # the refused one once more, no other
    with hub.sessions() as session:
        assert (
            len(list(session.scalars(select(ForwardAck).where(ForwardAck.job_id == job_id)))) == 4
        )
        records = list(session.scalars(select(AuditRecord).where(AuditRecord.event == "export")))
    assert [(r.outcome, r.entity_id) for r in records] == [(8, study_id), (0, study_id)]
    assert all("sent=" in (r.detail or "") for r in records)


def test_gives_up_after_max_age_and_retry_failed_restarts(hub: Hub, tmp_path: Path) -> None:
    hub.settings.forward_max_age_seconds = 0.001
    study_id, _ = _stable_study(hub, tmp_path)
    rules = parse_forward_rules(f'[[rule]]\nname = "p"\ndestination = "{PACS}"\n')
    enqueue_study(hub, study_id, rules=rules)
    transport = Recorder()
    transport.down.add(PACS)
    time.sleep(0.01)
    [result] = forward_due(hub, transport)
    assert result.state == "failed"
    assert forward_due(hub, transport) == []  # failed jobs are not retried by themselves
    [row] = status(hub)
    assert (row.failed, row.pending) == (1, 0)
    hub.settings.forward_max_age_seconds = 3600
    transport.down.clear()
    assert retry(hub, failed_only=True) == 1
    [result] = forward_due(hub, transport)
    assert result.state == "done"


def test_claim_takes_one_job_per_destination_and_stale_sends(hub: Hub, tmp_path: Path) -> None:
    a, _ = _stable_study(hub, tmp_path, seed=1)
    b, _ = _stable_study(hub, tmp_path, seed=2)
    rules = parse_forward_rules(f'[[rule]]\nname = "p"\ndestination = "{PACS}"\n')
    enqueue_study(hub, a, rules=rules)
    enqueue_study(hub, b, rules=rules)
    [claim] = claim_due(hub)
    assert claim_due(hub, busy=[PACS]) == []
    [other] = claim_due(hub)  # the second job; the first is in flight
    assert other.job_id != claim.job_id
    assert claim_due(hub) == []
    # A worker died mid-send: after the lease the job is taken again.
    hub.settings.forward_lease_seconds = 0.001
    time.sleep(0.01)
    assert len(claim_due(hub)) == 1
    # A claim from an old generation does not mark the re-queued job done.
    with hub.sessions.begin() as session:
        session.execute(update(ForwardJob).values(generation=ForwardJob.generation + 1))
    assert run_job(hub, claim, Recorder()).sent == 0


# --- STOW-RS adapter (the destination answered by httpx's mock transport) ------------


def _files(tmp_path: Path, count: int = 3) -> list[OutgoingFile]:
    out = []
    for n, path in enumerate(make_study(tmp_path / "stow", "ct", count=count, size=16)):
        out.append(OutgoingFile(f"i{n}", path, sop_instance_uid(path), "1.2.840.10008.5.1.4.1.1.2",
                                "1.2.840.10008.1.2.1"))  # fmt: skip
    return out


def test_stow_reads_failed_sop_sequence(tmp_path: Path) -> None:
    files = _files(tmp_path)
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = {"00081198": {"vr": "SQ", "Value": [{
            "00081155": {"vr": "UI", "Value": [files[1].sop_instance_uid]},
            "00081197": {"vr": "US", "Value": [0xA700]},
        }]}}  # fmt: skip
        return httpx.Response(202, json=body)

    client = httpx.Client(transport=httpx.MockTransport(answer))
    destination = Destination.parse(ARCHIVE)
    outcome = send_stow(destination, files, "secret", client=client)
    assert outcome.acked == {"i0", "i2"}
    assert "0xA700" in outcome.errors["i1"]
    [request] = seen
    assert str(request.url) == f"{ARCHIVE}/studies"
    assert request.headers["authorization"] == "Bearer secret"
    content_type = request.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    body = request.read()
    for f in files:
        assert f.path.read_bytes() in body  # the stored bytes, unchanged


def test_stow_unreachable_and_http_errors(tmp_path: Path) -> None:
    files = _files(tmp_path, count=2)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    destination = Destination.parse(ARCHIVE)
    client = httpx.Client(transport=httpx.MockTransport(refuse))
    outcome = send_stow(destination, files, None, client=client)
    assert outcome.unreachable and not outcome.acked and len(outcome.errors) == 2

    client = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(503)))
    outcome = send_stow(destination, files, None, client=client)
    assert not outcome.unreachable and not outcome.acked
    assert "HTTP 503" in outcome.errors["i0"]

    ok = httpx.Response(200, json={"00081199": {"vr": "SQ", "Value": []}})
    client = httpx.Client(transport=httpx.MockTransport(lambda r: ok))
    assert send_stow(destination, files, None, client=client).acked == {"i0", "i1"}


def test_a_long_send_keeps_its_lease(hub: Hub, tmp_path: Path) -> None:
    hub.settings.forward_lease_seconds = 0.3
    study_id, _ = _stable_study(hub, tmp_path)
    rules = parse_forward_rules(f'[[rule]]\nname = "p"\ndestination = "{PACS}"\n')
    enqueue_study(hub, study_id, rules=rules)
    taken_meanwhile: list[object] = []
    recorder = Recorder()

    def slow(destination: Destination, files: list[OutgoingFile], token: str | None) -> SendOutcome:
        time.sleep(0.8)  # well past the lease: only the heartbeat keeps the job ours
        taken_meanwhile.extend(claim_due(hub))
        return recorder(destination, files, token)

    [result] = forward_due(hub, slow)
    assert result.state == "done"
    assert taken_meanwhile == []


# --- replies and de-identification (over real C-STORE to an in-process SCP) -------------


def _reply(hub: Hub, tmp_path: Path, study_id: str, evidence: list[Path], text: str,
           *, number: int = 900) -> tuple[dict[str, object], str]:  # fmt: skip
    """Store a reply SR as a new series of the study and write its case.replied event, as
    the reply workflow does; returns the event payload and the SR's SOP Instance UID."""
    sr = make_reply_sr(evidence, tmp_path / f"reply-{number}.dcm", text, series_number=number)
    with hub.sessions() as session:
        clinic_id = session.get_one(Study, study_id).clinic_id
    ingest_part10(hub, sr, Sender(clinic_id, "test:reply"))
    ds = dcmread(sr)
    payload: dict[str, object] = {
        "case_id": "case-1",
        "study_ids": [study_id],
        "series_instance_uids": [str(ds.SeriesInstanceUID)],
    }
    with transaction(hub.sessions) as session:
        session.add(OutboxEvent(topic=REPLY_TOPIC, payload=payload))
    return payload, str(ds.SOPInstanceUID)


def test_a_reply_goes_to_reply_rules_and_the_clinics_reply_peer_only_its_series(
    hub: Hub, tmp_path: Path
) -> None:
    with (
        store_scp("CLINIC_PACS") as (peer_port, at_clinic),
        store_scp("REVIEW") as (rule_port, at_review),
    ):
        study_id, paths = _stable_study(hub, tmp_path)
        add_clinic(hub, "Clinic A", "CLINIC_PACS", "127.0.0.1", permissions=["store", "reply"],
                   port=peer_port)  # fmt: skip
        # Another clinic's reply peer must never get this clinic's reply.
        add_clinic(hub, "Clinic B", "B_PACS", "127.0.0.1", permissions=["reply"], port=peer_port)
        hub.settings.forwarding_path.write_text(
            f'[[rule]]\nname = "review"\nevent = ["reply"]\nmodality = ["SR", "PR"]\n'
            f'destination = "dicom://REVIEW@127.0.0.1:{rule_port}"\n\n'
            f'[[rule]]\nname = "ct-only"\nevent = ["reply"]\nmodality = ["CT"]\n'
            f'destination = "dicom://NEVER@127.0.0.1:{rule_port}"\n'
        )
        _, sr_uid = _reply(hub, tmp_path, study_id, paths, "No acute findings.")
        with hub.sessions() as session:
            [event] = session.scalars(select(OutboxEvent).where(OutboxEvent.topic == REPLY_TOPIC))
        job_ids = handle_event(hub, event.topic, event.payload, default_rules())
        assert isinstance(job_ids, list) and len(job_ids) == 2
        assert handle_event(hub, event.topic, event.payload, default_rules()) == job_ids
        with hub.sessions() as session:
            jobs = session.scalars(select(ForwardJob).order_by(ForwardJob.id)).all()
            assert {j.destination for j in jobs} == {
                f"dicom://REVIEW@127.0.0.1:{rule_port}",
                f"dicom://CLINIC_PACS@127.0.0.1:{peer_port}",
            }
            assert {j.rule for j in jobs} == {"review", "clinic peer CLINIC_PACS"}
            assert all(j.scope.startswith("reply:") for j in jobs)

        results = forward_due(hub, make_transport("SAF"))
        assert sorted(r.state for r in results) == ["done", "done"]
        # Exactly the reply's SR: none of the study's CT images went along.
        assert at_clinic.uids() == {sr_uid} and len(at_clinic.datasets) == 1
        assert at_review.uids() == {sr_uid} and len(at_review.datasets) == 1
        assert at_clinic.calling_aets == ["SAF"]
        with hub.sessions() as session:
            acks = session.scalars(select(ForwardAck)).all()
        assert {a.sent_sop_instance_uid for a in acks} == {sr_uid} and len(acks) == 2

        # The study's own forwarding (study.stable) is a different job for the same place.
        hub.settings.forwarding_path.write_text(
            f'[[rule]]\nname = "all"\ndestination = "dicom://CLINIC_PACS@127.0.0.1:{peer_port}"\n'
        )
        assert len(enqueue_study(hub, study_id)) == 1
        [result] = forward_due(hub, make_transport("SAF"))
        assert result.state == "done" and result.sent == len(paths) + 1
        assert len(at_clinic.datasets) == 1 + len(paths) + 1


def test_reply_event_that_names_nothing_known_queues_nothing(hub: Hub, tmp_path: Path) -> None:
    study_id, _ = _stable_study(hub, tmp_path)
    hub.settings.forwarding_path.write_text(
        '[[rule]]\nname = "r"\nevent = ["reply"]\ndestination = "dicom://R@127.0.0.1:104"\n'
    )
    assert enqueue_reply(hub, {"case_id": "c", "study_ids": [study_id],
                               "series_instance_uids": ["1.2.3.4"]}) == []  # fmt: skip
    assert enqueue_reply(hub, {"case_id": "c", "study_ids": ["nope"],
                               "series_instance_uids": ["1.2.3.4"]}) == []  # fmt: skip
    assert enqueue_reply(hub, {"case_id": "c", "study_ids": "x"}) == []


def test_reply_permission_needs_host_and_port(hub: Hub) -> None:
    with pytest.raises(ClinicError, match="--host and --port"):
        add_clinic(hub, "Clinic A", "PACS", permissions=["store", "reply"])


def test_deidentified_destination_gets_no_phi_and_the_same_uids_on_resend(
    hub: Hub, tmp_path: Path
) -> None:
    sender = make_clinic(hub, "Clinic A", aet="MOD_A")
    paths = make_study(tmp_path / "s", "ct", count=3, size=32, patient_name=TEST_PATIENT_NAME,
                       patient_id="PID-424242", accession_number="ACC-777")  # fmt: skip
    for path in paths:
        ingest_part10(hub, path, sender)
    [study_id] = mark_stable_studies(hub, now=utcnow() + timedelta(seconds=60))
    originals = [dcmread(p) for p in paths]
    assert str(originals[0].PatientName) == TEST_PATIENT_NAME
    assert originals[0].AccessionNumber == "ACC-777"
    with store_scp("RESEARCH") as (port, got), store_scp("PLAIN") as (plain_port, plain):
        hub.settings.forwarding_path.write_text(
            f'[[rule]]\nname = "research"\ndestination = "dicom://RESEARCH@127.0.0.1:{port}"\n'
            "deidentify = true\n\n"
            f'[[rule]]\nname = "plain"\ndestination = "dicom://PLAIN@127.0.0.1:{plain_port}"\n'
        )
        assert len(enqueue_study(hub, study_id)) == 2
        assert sorted(r.state for r in forward_due(hub, make_transport("SAF"))) == ["done"] * 2
        assert len(got.datasets) == 3
        first = [ds.SOPInstanceUID for ds in got.datasets]
        # The plain destination gets the study as stored.
        assert plain.uids() == {str(ds.SOPInstanceUID) for ds in originals}

        raw_uids = {str(v) for ds in originals for v in _values(ds, "UI")}
        assert {str(originals[0].StudyInstanceUID), str(originals[0].SOPInstanceUID)} <= raw_uids
        for ds in got.datasets:
            text = ds.to_json()
            for secret in (TEST_PATIENT_NAME, "QUIXOTEFIXTURE", "PID-424242", "ACC-777",
                           originals[0].StudyDate):  # fmt: skip
                assert secret not in text
            assert not raw_uids & {str(v) for v in _values(ds, "UI")}
            assert ds.PatientIdentityRemoved == "YES"
            assert "113100" in {c.CodeValue for c in ds.DeidentificationMethodCodeSequence}
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert len(got.uids("StudyInstanceUID")) == 1  # one study, remapped consistently
        assert len(got.uids("SeriesInstanceUID")) == 1
        assert len(got.uids("PatientID")) == 1
        with hub.sessions() as session:
            acks = {a.sent_sop_instance_uid for a in session.scalars(select(ForwardAck))}
        assert set(first) <= acks  # the ack table names what the destination holds

        # Resend everything (the study changed? no: an operator resends): same UIDs.
        with transaction(hub.sessions) as session:
            session.execute(delete(ForwardAck))
            session.execute(update(ForwardJob).values(state="pending"))
        forward_due(hub, make_transport("SAF"))
        assert len(got.datasets) == 6
        assert [ds.SOPInstanceUID for ds in got.datasets[3:]] == first
    assert hub.settings.data_dir.joinpath("deidentify.key").stat().st_mode & 0o077 == 0


def _values(ds: Dataset, vr: str) -> list[object]:
    """Every value of that VR in the dataset and its File Meta; for UI, only instance UIDs
    (not class, transfer syntax or implementation UIDs, which identify no one)."""
    found: list[object] = []

    def visit(_: Dataset, element: DataElement) -> None:
        if vr != element.VR or not element.value or element.keyword.endswith("ClassUID"):
            return
        if element.keyword == "TransferSyntaxUID":
            return
        found.extend(element.value if element.VM > 1 else [element.value])

    ds.walk(visit)
    ds.file_meta.walk(visit)
    return found


def test_a_signed_reply_is_forwarded_de_identified_and_to_the_clinic(
    hub: Hub, tmp_path: Path
) -> None:
    """The whole way: the specialist signs (saf.replies makes the SR and GSPS and writes
    case.replied), the pipeline queues, the sender C-STOREs the reply series only: as
    stored to the clinic's PACS, de-identified to a research destination."""
    consult = make_consult(hub, tmp_path)
    for kind, points in (("line", [[10, 5], [20, 5]]), ("arrow", [[40, 30], [30, 20]])):
        # A measurement makes the SR (TID 1500), any mark makes the GSPS.
        annotations.create(hub, SPECIALIST, _case(hub, consult.case_id),
                           Draft(consult.instance_ids[0], 1, kind, points, "here"))  # fmt: skip
    replies.save_draft(hub, SPECIALIST, _case(hub, consult.case_id),
                       ReplyDraft(findings="Nodule.", impression="Benign.", recommendation="",
                                  urgent=False))  # fmt: skip
    with (
        store_scp("CLINIC_PACS") as (pacs_port, at_pacs),
        store_scp("RESEARCH") as (
            research_port,
            at_research,
        ),
    ):
        with hub.sessions() as session:
            clinic = session.get_one(Clinic, consult.clinic_id).name
        add_clinic(hub, clinic, "CLINIC_PACS", "127.0.0.1", permissions=["store", "reply"],
                   port=pacs_port)  # fmt: skip
        hub.settings.forwarding_path.write_text(
            f'[[rule]]\nname = "research"\nevent = ["reply"]\ndeidentify = true\n'
            f'destination = "dicom://RESEARCH@127.0.0.1:{research_port}"\n'
        )
        replies.sign(hub, SPECIALIST, _case(hub, consult.case_id), VIEWER_RULES)
        with hub.sessions() as session:
            [event] = session.scalars(select(OutboxEvent).where(OutboxEvent.topic == REPLY_TOPIC))
            reply_series = set(event.payload["series_instance_uids"])
            modalities = set(session.scalars(select(Series.modality).where(
                Series.series_instance_uid.in_(reply_series))))  # fmt: skip
        assert modalities == {"SR", "PR"}
        job_ids = handle_event(hub, event.topic, event.payload, default_rules())
        assert isinstance(job_ids, list) and len(job_ids) == 2
        assert sorted(r.state for r in forward_due(hub, make_transport("SAF"))) == ["done"] * 2
        assert at_pacs.uids("SeriesInstanceUID") == reply_series
        assert {str(ds.Modality) for ds in at_pacs.datasets} == {"SR", "PR"}
        assert len(at_research.datasets) == len(at_pacs.datasets)
        assert not at_research.uids("SeriesInstanceUID") & reply_series
        assert {str(ds.PatientIdentityRemoved) for ds in at_research.datasets} == {"YES"}
        assert at_research.uids("PatientID").isdisjoint(at_pacs.uids("PatientID"))


def _case(hub: Hub, case_id: str) -> Case:
    with hub.sessions() as session:
        return session.get_one(Case, case_id)
