"""C-FIND, C-MOVE and C-GET against the node with pynetdicom as the peer (and as the
C-MOVE destination): matches, byte-identical retrieve, tenancy, permissions, audit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select

from dicom_node.qr import StoredDataset
from dicom_node.scp import DicomNode
from saf.clinics import ClinicError, add_clinic
from saf.hub import Hub
from saf.ingest import Sender, ingest_part10
from saf.models import AuditRecord, Instance
from saf.query import StoredInstance
from tests.factories import dataset_sha256, make_study, sop_instance_uid
from tests.interop.conftest import free_port


@dataclass
class Receiver:
    """A pynetdicom Storage SCP that records the dataset digest of what it receives."""

    port: int
    received: dict[str, str] = field(default_factory=dict)
    syntaxes: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self.lock:
            self.received[uid] = dataset_sha256(Path(event.dataset_path))
            self.syntaxes[uid] = str(event.context.transfer_syntax)
        return 0x0000


@contextmanager
def receiver(syntaxes: list[str] | None = None, ae_title: str = "DEST_A") -> Iterator[Receiver]:
    ae = AE(ae_title=ae_title)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, syntaxes or ALL_TRANSFER_SYNTAXES)
    rx = Receiver(free_port())
    server = ae.start_server(
        ("127.0.0.1", rx.port), block=False, evt_handlers=[(evt.EVT_C_STORE, rx.on_store)]
    )
    try:
        yield rx
    finally:
        server.shutdown()


@dataclass
class World:
    port: int
    a_study: list[Path]
    b_study: list[Path]
    a_clinic: str


@pytest.fixture
def world(hub: Hub, tmp_path: Path) -> Iterator[World]:
    a = add_clinic(
        hub, "Clinic A", "VIEWER_A", "127.0.0.1", permissions=["store", "find", "move", "get"]
    ).id
    add_clinic(hub, "Clinic A", "FIND_ONLY", permissions=["find"])
    add_clinic(hub, "Clinic A", "STORE_ONLY")
    b = add_clinic(hub, "Clinic B", "VIEWER_B", "127.0.0.1", permissions=["find", "move"]).id
    a_study = make_study(tmp_path / "a", "ct", count=3, size=32, seed=21)
    b_study = make_study(tmp_path / "b", "ct", count=2, size=32, seed=22)
    for path in a_study:
        ingest_part10(hub, path, Sender(a, "test:a"))
    for path in b_study:
        ingest_part10(hub, path, Sender(b, "test:b"))
    node = DicomNode(hub)
    node.start()
    try:
        yield World(node.address[1], a_study, b_study, a)
    finally:
        node.stop()


def _study_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _identifier(level: str = "STUDY", **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _find(
    port: int, calling: str, ds: Dataset, model: str = StudyRootQueryRetrieveInformationModelFind
) -> tuple[list[Dataset], int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="SAF")
    assert assoc.is_established
    found, final = [], -1
    for status, identifier in assoc.send_c_find(ds, model):
        if status and status.Status in (0xFF00, 0xFF01):
            found.append(identifier)
        elif status:
            final = int(status.Status)
    assoc.release()
    return found, final


def _audit(hub: Hub, event: str) -> list[AuditRecord]:
    with hub.sessions() as session:
        return list(session.scalars(select(AuditRecord).where(AuditRecord.event == event)))


def test_find_study_and_patient_root(hub: Hub, world: World) -> None:
    uid = _study_uid(world.a_study[0])
    found, final = _find(
        world.port,
        "VIEWER_A",
        _identifier(
            StudyInstanceUID="",
            PatientName="",
            NumberOfStudyRelatedInstances="",
            ModalitiesInStudy="",
        ),
    )
    assert final == 0x0000
    assert [str(d.StudyInstanceUID) for d in found] == [uid]  # clinic B's study is not there
    assert int(found[0].NumberOfStudyRelatedInstances) == 3 and found[0].ModalitiesInStudy == "CT"
    assert found[0].RetrieveAETitle == "SAF"
    patients, final = _find(
        world.port,
        "VIEWER_A",
        _identifier("PATIENT", PatientID="", PatientName="SYN*"),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert final == 0x0000 and len(patients) == 1
    [record] = _audit(hub, "dicom-find")[:1]
    assert record.clinic_id == world.a_clinic and record.detail is not None
    assert "matches=1" in record.detail


def test_find_bad_level_is_refused(world: World) -> None:
    found, final = _find(world.port, "VIEWER_A", _identifier("NOPE", StudyInstanceUID=""))
    assert found == [] and final == 0xA900


@pytest.mark.parametrize(
    ("calling", "abstract"),
    [
        ("STORE_ONLY", StudyRootQueryRetrieveInformationModelFind),
        ("FIND_ONLY", StudyRootQueryRetrieveInformationModelMove),
        ("FIND_ONLY", StudyRootQueryRetrieveInformationModelGet),
    ],
)
def test_peer_without_the_permission_gets_no_context(
    world: World, calling: str, abstract: str
) -> None:
    ae = AE(ae_title=calling)
    ae.add_requested_context(abstract)
    assoc = ae.associate("127.0.0.1", world.port, ae_title="SAF")
    assert not assoc.accepted_contexts  # pynetdicom then aborts: nothing to talk about
    if assoc.is_established:
        assoc.release()


def _move(port: int, calling: str, destination: str, uid: str) -> Dataset:
    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port, ae_title="SAF")
    assert assoc.is_established
    responses = list(
        assoc.send_c_move(
            _identifier(StudyInstanceUID=uid),
            destination,
            StudyRootQueryRetrieveInformationModelMove,
        )
    )
    assoc.release()
    return responses[-1][0]


def test_move_sends_stored_bytes(hub: Hub, world: World) -> None:
    with receiver() as rx:
        add_clinic(hub, "Clinic A", "DEST_A", "127.0.0.1", port=rx.port)
        final = _move(world.port, "VIEWER_A", "DEST_A", _study_uid(world.a_study[0]))
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 3
    assert rx.received == {sop_instance_uid(p): dataset_sha256(p) for p in world.a_study}
    [record] = _audit(hub, "dicom-retrieve")
    assert record.entity_type == "Study" and record.clinic_id == world.a_clinic
    assert record.detail is not None and "instances=3" in record.detail


def test_move_to_unknown_or_other_clinics_destination_is_a801(hub: Hub, world: World) -> None:
    uid = _study_uid(world.a_study[0])
    assert _move(world.port, "VIEWER_A", "NOBODY", uid).Status == 0xA801
    with receiver(ae_title="DEST_B") as rx:
        add_clinic(hub, "Clinic B", "DEST_B", "127.0.0.1", port=rx.port)
        assert _move(world.port, "VIEWER_A", "DEST_B", uid).Status == 0xA801
        # Clinic B may move to its destination, but clinic A's study does not exist for it.
        final = _move(world.port, "VIEWER_B", "DEST_B", uid)
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 0
    assert rx.received == {}


def test_move_transcodes_only_when_the_receiver_refuses_the_stored_syntax(
    hub: Hub, world: World, tmp_path: Path
) -> None:
    jpeg = make_study(tmp_path / "jpeg", "ct-jpeg", count=2, size=32, seed=23)
    for path in jpeg:
        ingest_part10(hub, path, Sender(world.a_clinic, "test:a"))
    with receiver([ExplicitVRLittleEndian, ImplicitVRLittleEndian]) as rx:
        add_clinic(hub, "Clinic A", "DEST_A", "127.0.0.1", port=rx.port)
        final = _move(world.port, "VIEWER_A", "DEST_A", _study_uid(jpeg[0]))
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 2
    assert set(rx.syntaxes.values()) <= {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    with receiver() as rx:
        add_clinic(hub, "Clinic A", "DEST_A", "127.0.0.1", port=rx.port)
        _move(world.port, "VIEWER_A", "DEST_A", _study_uid(jpeg[0]))
    assert set(rx.syntaxes.values()) == {JPEGBaseline8Bit}
    assert rx.received == {sop_instance_uid(p): dataset_sha256(p) for p in jpeg}


def test_get_returns_stored_bytes_on_the_same_association(hub: Hub, world: World) -> None:
    received: dict[str, str] = {}

    def on_store(event: evt.Event) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = dataset_sha256(
            Path(event.dataset_path)
        )
        return 0x0000

    ae = AE(ae_title="VIEWER_A")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    role = build_role(CTImageStorage, scp_role=True)
    assoc = ae.associate(
        "127.0.0.1",
        world.port,
        ae_title="SAF",
        ext_neg=[role],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    responses = list(
        assoc.send_c_get(
            _identifier(StudyInstanceUID=_study_uid(world.a_study[0])),
            StudyRootQueryRetrieveInformationModelGet,
        )
    )
    other = list(
        assoc.send_c_get(
            _identifier(StudyInstanceUID=_study_uid(world.b_study[0])),
            StudyRootQueryRetrieveInformationModelGet,
        )
    )
    assoc.release()
    final = responses[-1][0]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 3
    assert received == {sop_instance_uid(p): dataset_sha256(p) for p in world.a_study}
    assert other[-1][0].Status == 0x0000 and other[-1][0].NumberOfCompletedSuboperations == 0


def test_a_move_destination_needs_host_and_port(hub: Hub) -> None:
    with pytest.raises(ClinicError):
        add_clinic(hub, "Clinic A", "DEST_A", port=104)  # any host: nowhere to connect to
    info = add_clinic(hub, "Clinic A", "DEST_A", "10.0.0.5", port=104)
    assert info.peers[0].describe() == "DEST_A@10.0.0.5:104 [store]"
    info = add_clinic(hub, "Clinic A", "DEST_A", "10.0.0.5", port=0)
    assert info.peers[0].port is None


def _get(
    port: int, uid: str, syntaxes: list[str]
) -> tuple[Dataset, Dataset | None, dict[str, Dataset]]:
    """C-GET a study as VIEWER_A taking CT in `syntaxes`: the final status, its
    identifier, and the instances received by SOP Instance UID."""
    received: dict[str, Dataset] = {}

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received[str(event.request.AffectedSOPInstanceUID)] = ds
        return 0x0000

    ae = AE(ae_title="VIEWER_A")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, syntaxes)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="SAF",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    responses = list(
        assoc.send_c_get(
            _identifier(StudyInstanceUID=uid), StudyRootQueryRetrieveInformationModelGet
        )
    )
    assoc.release()
    return responses[-1][0], responses[-1][1], received


def test_get_re_encodes_when_the_peer_takes_another_uncompressed_syntax(world: World) -> None:
    final, _, received = _get(world.port, _study_uid(world.a_study[0]), [ImplicitVRLittleEndian])
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 3
    for path in world.a_study:
        original = dcmread(path)
        got = received[sop_instance_uid(path)]
        assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert got.PixelData == original.PixelData
        assert got.PatientID == original.PatientID and got.Rows == original.Rows


def test_get_reports_an_unreadable_instance_as_a_failed_sub_operation(
    hub: Hub, world: World
) -> None:
    damaged = world.a_study[1]
    with hub.sessions() as session:
        blob_id = session.scalars(
            select(Instance.blob_id).where(Instance.sop_instance_uid == sop_instance_uid(damaged))
        ).one()
    path = hub.blobs.path_for(blob_id)  # type: ignore[attr-defined]
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # inside the last sealed chunk: authentication fails
    path.write_bytes(bytes(data))
    final, failed, received = _get(world.port, _study_uid(damaged), [ExplicitVRLittleEndian])
    assert final.Status == 0xB000
    assert final.NumberOfCompletedSuboperations == 2 and final.NumberOfFailedSuboperations == 1
    assert failed is not None and failed.FailedSOPInstanceUIDList == sop_instance_uid(damaged)
    assert sop_instance_uid(damaged) not in received


def test_stored_dataset_is_the_stored_bytes_after_the_file_meta(world: World) -> None:
    path = world.a_study[0]
    data = path.read_bytes()
    ds = dcmread(path)
    item = StoredInstance(
        instance_id="i", sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), blob_id="b",
        study_pk="s", study_instance_uid=str(ds.StudyInstanceUID), patient_pk="p", clinic_id="c",
    )  # fmt: skip
    stored = StoredDataset.from_part10(data, item)
    assert stored is not None
    view = stored.encoded(False, True, False)
    assert isinstance(view, memoryview)  # the stored bytes, not a copy
    raw = bytes(view)
    assert data.endswith(raw) and raw.startswith(b"\x08\x00")
    assert stored.SOPInstanceUID == ds.SOPInstanceUID and stored.SOPClassUID == ds.SOPClassUID
    assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    # Another encoding is a real re-encoding of the parsed object.
    implicit = stored.encoded(True, True, False)
    assert implicit is not None and implicit != raw
    # File Meta that disagrees with the index: not sent as stored, parsed in full instead.
    wrong = StoredInstance(**{**item.__dict__, "transfer_syntax_uid": ImplicitVRLittleEndian})
    assert StoredDataset.from_part10(data, wrong) is None


def test_file_meta_is_read_as_pydicom_reads_it(world: World, tmp_path: Path) -> None:
    from dicom_node.qr import _file_meta, _file_meta_pydicom

    for path in [*world.a_study, *world.b_study]:
        data = path.read_bytes()
        assert _file_meta(data) == _file_meta_pydicom(data)
    ds = dcmread(world.a_study[0])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.45"  # odd: padded
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(tmp_path / "odd.dcm", enforce_file_format=True)
    data = (tmp_path / "odd.dcm").read_bytes()
    assert _file_meta(data) == _file_meta_pydicom(data)
    assert _file_meta(data)[1:] == (JPEGBaseline8Bit, "1.2.3.45")
