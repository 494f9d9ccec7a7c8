"""Storage Commitment Push Model with pynetdicom as the SCU: the report comes back on the
same association, or on a new one when the requester hung up; failures say why; the report
is a durable job that is retried until the requester listens, across a hub restart, and
dropped (audited) when too old."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)
from sqlalchemy import select, update

from dicom_node.commitment import make_report_transport
from dicom_node.forward import make_transport
from dicom_node.scp import DicomNode
from saf.clinics import add_clinic
from saf.forwarding import forward_due, status
from saf.hub import Hub
from saf.ingest import Sender, ingest_part10
from saf.models import AuditRecord, ForwardJob, Instance, utcnow
from saf.settings import Settings
from tests.factories import make_study
from tests.interop.conftest import free_port

REPORT_TIMEOUT = 15.0


@dataclass
class World:
    port: int
    paths: list[Path]
    clinic_id: str


@pytest.fixture
def world(hub: Hub, tmp_path: Path) -> Iterator[World]:
    clinic = add_clinic(hub, "Clinic A", "MODALITY_A", "127.0.0.1").id
    add_clinic(hub, "Clinic A", "VIEWER_A", permissions=["find"])
    paths = make_study(tmp_path / "a", "ct", count=3, size=16, seed=31)
    for path in paths:
        ingest_part10(hub, path, Sender(clinic, "test:a"))
    node = DicomNode(hub)
    node.start()
    try:
        yield World(node.address[1], paths, clinic)
    finally:
        node.stop()


def _request(refs: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def _refs(paths: list[Path]) -> list[tuple[str, str]]:
    out = []
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        out.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out


def _reported(reports: queue.Queue[tuple[int, Dataset]]) -> tuple[int, Dataset]:
    return reports.get(timeout=REPORT_TIMEOUT)


def _on_report(reports: queue.Queue[tuple[int, Dataset]], reported: threading.Event | None = None):  # type: ignore[no-untyped-def]
    def handler(event: evt.Event) -> tuple[int, None]:
        reports.put((int(event.request.EventTypeID), event.event_information))
        if reported is not None:
            reported.set()
        return 0x0000, None

    return handler


def _commit(port: int, calling: str, request: Dataset, reports: queue.Queue, *, keep: bool) -> int:  # type: ignore[type-arg]
    """N-ACTION `request` from `calling`; with `keep`, stay for the report on this association
    (it goes to `reports`, as the listeners' do) and release once it has been answered."""
    reported = threading.Event()  # our N-EVENT-REPORT handler ran ...
    answered = threading.Event()  # ... and its response has left

    def on_pdu_sent(event: evt.Event) -> None:
        if reported.is_set() and isinstance(event.pdu, P_DATA_TF):
            answered.set()

    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="SAF",
        evt_handlers=[
            (evt.EVT_N_EVENT_REPORT, _on_report(reports, reported)),
            (evt.EVT_PDU_SENT, on_pdu_sent),
        ],
    )
    assert assoc.is_established
    status, _ = assoc.send_n_action(
        request, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
    )
    if keep:
        # pynetdicom lets release() in while the reactor still sends the N-EVENT-REPORT
        # response (it marks itself paused while a handler runs); the response would then
        # follow the A-RELEASE-RQ, which the state machine refuses, and the hub would wait
        # for an answer that never comes.
        assert reported.wait(REPORT_TIMEOUT), "no N-EVENT-REPORT on the association"
        assert answered.wait(REPORT_TIMEOUT), "the N-EVENT-REPORT was not answered"
    assoc.release()
    return int(status.Status)


def test_commit_on_the_same_association(world: World) -> None:
    reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()
    request = _request(_refs(world.paths))
    assert _commit(world.port, "MODALITY_A", request, reports, keep=True) == 0x0000
    event_type, info = _reported(reports)
    assert event_type == 1
    assert info.TransactionUID == request.TransactionUID
    assert sorted(i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence) == sorted(
        uid for _, uid in _refs(world.paths)
    )
    assert "FailedSOPSequence" not in info


def test_unknown_and_tampered_instances_fail_with_reasons(hub: Hub, world: World) -> None:
    refs = _refs(world.paths)
    tampered_uid = refs[0][1]
    with hub.sessions() as session:
        blob_id = session.scalar(
            select(Instance.blob_id).where(Instance.sop_instance_uid == tampered_uid)
        )
    assert blob_id is not None
    blob_path = next(p for p in hub.settings.data_dir.rglob(blob_id) if p.is_file())
    data = bytearray(blob_path.read_bytes())
    data[-100] ^= 0xFF
    blob_path.write_bytes(bytes(data))
    unknown = (CTImageStorage, generate_uid())
    wrong_class = ("1.2.840.10008.5.1.4.1.1.4", refs[1][1])  # MR, but stored as CT

    reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()
    request = _request([refs[0], refs[2], unknown, wrong_class])
    assert _commit(world.port, "MODALITY_A", request, reports, keep=True) == 0x0000
    event_type, info = _reported(reports)
    assert event_type == 2
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == [refs[2][1]]
    failed = {i.ReferencedSOPInstanceUID: int(i.FailureReason) for i in info.FailedSOPSequence}
    assert failed == {tampered_uid: 0x0110, unknown[1]: 0x0112, refs[1][1]: 0x0119}


def test_report_on_a_new_association_when_the_requester_hung_up(hub: Hub, world: World) -> None:
    reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()
    listen = free_port()
    add_clinic(hub, "Clinic A", "MODALITY_A", "127.0.0.1", port=listen)
    scu = AE(ae_title="MODALITY_A")
    scu.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = scu.start_server(
        ("127.0.0.1", listen),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, _on_report(reports))],
    )
    try:
        request = _request(_refs(world.paths[:2]))
        assert _commit(world.port, "MODALITY_A", request, reports, keep=False) == 0x0000
        event_type, info = _reported(reports)
    finally:
        server.shutdown()  # type: ignore[union-attr]
    assert event_type == 1 and len(info.ReferencedSOPSequence) == 2


def test_other_clinics_instances_do_not_exist(hub: Hub, world: World, tmp_path: Path) -> None:
    other = add_clinic(hub, "Clinic B", "MODALITY_B", "127.0.0.1").id
    [path] = make_study(tmp_path / "b", "ct", count=1, size=16, seed=32)
    ingest_part10(hub, path, Sender(other, "test:b"))
    reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()
    assert _commit(world.port, "MODALITY_A", _request(_refs([path])), reports, keep=True) == 0
    event_type, info = _reported(reports)
    assert event_type == 2 and int(info.FailedSOPSequence[0].FailureReason) == 0x0112


def test_peer_without_store_permission_gets_no_commitment_context(world: World) -> None:
    ae = AE(ae_title="VIEWER_A")
    ae.add_requested_context(StorageCommitmentPushModel)
    role = build_role(StorageCommitmentPushModel, scu_role=True)
    assoc = ae.associate("127.0.0.1", world.port, ae_title="SAF", ext_neg=[role])
    assert not assoc.is_established or not assoc.accepted_contexts
    if assoc.is_established:
        assoc.release()


def _jobs(hub: Hub) -> list[ForwardJob]:
    with hub.sessions() as session:
        jobs = list(session.scalars(select(ForwardJob).where(ForwardJob.report.is_not(None))))
        session.expunge_all()
        return jobs


def _wait_for_state(hub: Hub, state: str) -> ForwardJob:
    deadline = time.monotonic() + REPORT_TIMEOUT
    while time.monotonic() < deadline:
        jobs = _jobs(hub)
        if jobs and jobs[0].state == state:
            return jobs[0]
        time.sleep(0.05)
    raise AssertionError(f"commitment job never reached {state}: {_jobs(hub)}")


def _listener(port: int, reports: queue.Queue[tuple[int, Dataset]]) -> Any:
    scu = AE(ae_title="MODALITY_A")
    scu.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    return scu.start_server(
        ("127.0.0.1", port), block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, _on_report(reports))],
    )  # fmt: skip


def _deliver_due(hub: Hub) -> None:
    with hub.sessions.begin() as session:  # due now, instead of after the backoff
        session.execute(update(ForwardJob).values(next_attempt_at=utcnow()))
    forward_due(hub, make_transport("SAF"), make_report_transport("SAF"))


def test_the_report_is_a_job_shown_as_commitment(hub: Hub, world: World) -> None:
    reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()
    request = _request(_refs(world.paths))
    assert _commit(world.port, "MODALITY_A", request, reports, keep=True) == 0x0000
    job = _wait_for_state(hub, "done")
    assert job.study_pk is None and job.rule == "storage-commitment"
    assert job.destination == "dicom://MODALITY_A@127.0.0.1"  # no port registered
    [row] = [r for r in status(hub) if r.kind == "commitment"]
    assert (row.destination, row.done, row.pending, row.failed) == (job.destination, 1, 0, 0)


def test_report_delivered_once_the_requesters_scp_comes_up(hub: Hub, world: World) -> None:
    listen = free_port()
    add_clinic(hub, "Clinic A", "MODALITY_A", "127.0.0.1", port=listen)
    unknown = (CTImageStorage, generate_uid())
    request = _request([*_refs(world.paths[:2]), unknown])
    reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()
    assert _commit(world.port, "MODALITY_A", request, reports, keep=False) == 0x0000
    job = _wait_for_state(hub, "pending")  # nobody listening yet: first attempt failed
    assert job.attempts == 1 and "no association" in (job.last_error or "")
    assert job.destination == f"dicom://MODALITY_A@127.0.0.1:{listen}"
    [row] = [r for r in status(hub) if r.kind == "commitment"]
    assert row.pending == 1 and row.next_attempt_at is not None
    server = _listener(listen, reports)
    try:
        _deliver_due(hub)
        event_type, info = _reported(reports)
    finally:
        server.shutdown()
    assert event_type == 2 and info.TransactionUID == request.TransactionUID
    assert sorted(i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence) == sorted(
        uid for _, uid in _refs(world.paths[:2])
    )
    assert [(i.ReferencedSOPInstanceUID, int(i.FailureReason)) for i in info.FailedSOPSequence] == [
        (unknown[1], 0x0112)
    ]
    assert _jobs(hub)[0].state == "done"


def test_a_hub_restart_between_n_action_and_delivery_still_delivers(
    settings: Settings, tmp_path: Path
) -> None:
    hub = Hub.open(settings, create=True)
    listen = free_port()
    clinic = add_clinic(hub, "Clinic A", "MODALITY_A", "127.0.0.1", port=listen).id
    paths = make_study(tmp_path / "a", "ct", count=2, size=16, seed=33)
    for path in paths:
        ingest_part10(hub, path, Sender(clinic, "test:a"))
    node = DicomNode(hub)
    node.start()
    reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()
    try:
        request = _request(_refs(paths))
        assert _commit(node.address[1], "MODALITY_A", request, reports, keep=False) == 0
        _wait_for_state(hub, "pending")
    finally:
        node.stop()
        hub.close()
    restarted = Hub.open(settings)
    server = _listener(listen, reports)
    try:
        _deliver_due(restarted)
        event_type, info = _reported(reports)
        assert _jobs(restarted)[0].state == "done"
    finally:
        server.shutdown()
        restarted.close()
    assert event_type == 1 and info.TransactionUID == request.TransactionUID
    assert len(info.ReferencedSOPSequence) == 2


def test_a_report_too_old_is_dropped_and_audited(hub: Hub, world: World) -> None:
    add_clinic(hub, "Clinic A", "MODALITY_A", "127.0.0.1", port=free_port())
    reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()
    request = _request(_refs(world.paths[:1]))
    assert _commit(world.port, "MODALITY_A", request, reports, keep=False) == 0x0000
    _wait_for_state(hub, "pending")
    age = timedelta(seconds=hub.settings.commitment_report_max_age_seconds + 1)
    with hub.sessions.begin() as session:
        session.execute(update(ForwardJob).values(queued_at=utcnow() - age))
    _deliver_due(hub)
    job = _jobs(hub)[0]
    assert job.state == "failed" and "dropped" in (job.last_error or "")
    with hub.sessions() as session:
        records = session.scalars(
            select(AuditRecord).where(AuditRecord.event == "dicom-commitment")
        ).all()
        assert [r.clinic_id for r in records] == [world.clinic_id]
        assert request.TransactionUID in (records[0].detail or "")
    assert reports.empty()
