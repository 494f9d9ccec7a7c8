"""Per-peer DICOM permissions at association negotiation, and the association audit trail."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)
from sqlalchemy import select

from dicom_node.scp import DicomNode, dimse_service
from saf.clinics import add_clinic
from saf.hub import Hub
from saf.models import AuditRecord, Study
from tests.dicom_node.peer import associate, rejection
from tests.factories import make_study

QR_CONTEXTS = (
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)


@contextmanager
def node_with_query_retrieve(hub: Hub) -> Iterator[int]:
    """A running node (it offers the Q/R contexts); yields the port. Negotiation is what is
    tested here; tests/dicom_node/test_qr.py tests the handlers."""
    node = DicomNode(hub)
    node.start()
    try:
        yield node.address[1]
    finally:
        node.stop()


def _associate(port: int, calling: str, *abstract: str, called: str = "SAF") -> Association:
    ae = AE(ae_title=calling)
    for uid in abstract:
        ae.add_requested_context(uid, [ExplicitVRLittleEndian])
    return associate(ae, "127.0.0.1", port, ae_title=called)


def _accepted(assoc: Association) -> set[str]:
    return {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}


def _audit(hub: Hub, event: str) -> list[AuditRecord]:
    with hub.sessions() as session:
        return list(
            session.scalars(
                select(AuditRecord).where(AuditRecord.event == event).order_by(AuditRecord.id)
            )
        )


def test_services_of_presentation_contexts() -> None:
    assert dimse_service(Verification) == "echo"
    assert dimse_service(CTImageStorage) == "store"
    assert dimse_service(StudyRootQueryRetrieveInformationModelFind) == "find"
    assert dimse_service(PatientRootQueryRetrieveInformationModelMove) == "move"
    assert dimse_service(StudyRootQueryRetrieveInformationModelGet) == "get"
    assert dimse_service("1.2.3.4") is None


def test_store_only_peer_gets_no_query_retrieve_contexts(hub: Hub) -> None:
    add_clinic(hub, "Clinic A", "MODALITY_A")  # default permissions: store
    with node_with_query_retrieve(hub) as port:
        assoc = _associate(port, "MODALITY_A", CTImageStorage, Verification, *QR_CONTEXTS)
        assert assoc.is_established
        assert _accepted(assoc) == {CTImageStorage, Verification}
        assoc.release()


def test_find_permission_accepts_find_context_only(hub: Hub) -> None:
    add_clinic(hub, "Clinic A", "VIEWER_A", permissions=["find"])
    with node_with_query_retrieve(hub) as port:
        assoc = _associate(port, "VIEWER_A", CTImageStorage, *QR_CONTEXTS)
        assert assoc.is_established
        assert _accepted(assoc) == {StudyRootQueryRetrieveInformationModelFind}
        assoc.release()


def test_changing_permissions_applies_to_the_next_association(hub: Hub) -> None:
    add_clinic(hub, "Clinic A", "PACS_A")
    with node_with_query_retrieve(hub) as port:
        before = _associate(port, "PACS_A", *QR_CONTEXTS)
        assert _accepted(before) == set()
        if before.is_established:
            before.release()
        add_clinic(hub, "Clinic A", "PACS_A", permissions=["store", "find", "move", "get"])
        after = _associate(port, "PACS_A", *QR_CONTEXTS)
        assert _accepted(after) == set(QR_CONTEXTS)
        after.release()


def test_get_only_peer_keeps_storage_contexts_but_may_not_store(hub: Hub, tmp_path: Path) -> None:
    """C-GET sends instances back over storage contexts, so they stay; the peer's own
    C-STOREs are refused with 0x0124 (Refused: Not Authorised) and store nothing."""
    add_clinic(hub, "Clinic A", "WORKSTATION", permissions=["get"])
    [path] = make_study(tmp_path, count=1)
    with node_with_query_retrieve(hub) as port:
        assoc = _associate(port, "WORKSTATION", CTImageStorage)
        assert assoc.is_established
        rsp = assoc.send_c_store(path)
        assoc.release()
    assert rsp.Status == 0x0124
    with hub.sessions() as session:
        assert session.scalars(select(Study)).all() == []
    assert _audit(hub, "dicom-store") == []


def test_every_association_request_is_audited(hub: Hub) -> None:
    clinic = add_clinic(hub, "Clinic A", "MODALITY_A")
    with node_with_query_retrieve(hub) as port:
        ok = _associate(
            port, "MODALITY_A", Verification, StudyRootQueryRetrieveInformationModelFind
        )
        assert ok.is_established
        ok.release()
        unknown = _associate(port, "STRANGER", Verification)
        wrong_called = _associate(port, "MODALITY_A", Verification, called="NOT_SAF")
        assert rejection(unknown) == (0x01, 0x01, 0x03)
        assert rejection(wrong_called) == (0x01, 0x01, 0x07)

    accepted, stranger, misaddressed = _audit(hub, "dicom-association")
    assert (accepted.outcome, accepted.actor_kind, accepted.actor_name) == (0, "ae", "MODALITY_A")
    assert accepted.clinic_id == clinic.id and accepted.actor_id is not None
    assert accepted.source_address == "127.0.0.1"
    assert accepted.detail is not None
    assert "called=SAF" in accepted.detail and "tls=no" in accepted.detail
    assert "accepted=1 rejected=1 services=echo" in accepted.detail
    assert (stranger.outcome, stranger.actor_name, stranger.clinic_id) == (4, "STRANGER", None)
    assert stranger.detail is not None and "not registered" in stranger.detail
    assert misaddressed.outcome == 4 and misaddressed.detail is not None
    assert "called=NOT_SAF" in misaddressed.detail
    assert "called AE title not recognised" in misaddressed.detail


def test_stored_instances_are_audited_once_per_study_per_association(
    hub: Hub, tmp_path: Path
) -> None:
    clinic = add_clinic(hub, "Clinic A", "MODALITY_A")
    first = make_study(tmp_path / "one", count=3, seed=1)
    second = make_study(tmp_path / "two", count=2, seed=2)
    with node_with_query_retrieve(hub) as port:
        assoc = _associate(port, "MODALITY_A", CTImageStorage)
        statuses = [assoc.send_c_store(p).Status for p in [*first, *second, first[0]]]
        assoc.release()
        again = _associate(port, "MODALITY_A", CTImageStorage)
        assert again.send_c_store(second[0]).Status == 0x0000
        again.abort()
        _wait_for(lambda: len(_audit(hub, "dicom-store")) == 3)
    assert statuses == [0] * 6

    with hub.sessions() as session:
        studies = {
            s.study_instance_uid: (s.id, s.patient_pk) for s in session.scalars(select(Study))
        }
    records = _audit(hub, "dicom-store")
    got = sorted((r.entity_id, r.patient_pk, r.detail) for r in records)
    uid_one = str(dcmread(first[0], stop_before_pixels=True).StudyInstanceUID)
    uid_two = str(dcmread(second[0], stop_before_pixels=True).StudyInstanceUID)
    assert got == sorted(
        [
            (*studies[uid_one], f"instances=4 study_instance_uid={uid_one}"),  # 3 + a resend
            (*studies[uid_two], f"instances=2 study_instance_uid={uid_two}"),
            (*studies[uid_two], f"instances=1 study_instance_uid={uid_two}"),  # aborted assoc
        ]
    )
    assert {
        (r.action, r.actor_kind, r.actor_name, r.clinic_id, r.entity_type) for r in records
    } == {("C", "ae", "MODALITY_A", clinic.id, "Study")}


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    pytest.fail("condition not met in time")
