"""dicom_node.throughput: the fast DIMSE send writes exactly upstream pynetdicom's bytes,
falls back when per-PDU hooks are bound, and a C-GET through it returns stored bytes."""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, dimse, evt
from pynetdicom.dimse_primitives import C_ECHO, C_GET, C_STORE, N_ACTION, N_EVENT_REPORT
from pynetdicom.dsutils import encode as pydicom_encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from dicom_node import throughput
from dicom_node.scp import DicomNode
from saf.clinics import add_clinic
from saf.hub import Hub
from saf.ingest import Sender, ingest_part10
from tests.factories import dataset_sha256, make_study, sop_instance_uid
from tests.interop.conftest import free_port


def _store_rq(originator: str = "", data: bytes = b"\x00" * 10) -> C_STORE:
    rq = C_STORE()
    rq.MessageID = 7
    rq.AffectedSOPClassUID = CTImageStorage
    rq.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.12345"  # odd length: padded
    rq.Priority = 2
    if originator:
        rq.MoveOriginatorApplicationEntityTitle = originator
        rq.MoveOriginatorMessageID = 3
    rq.DataSet = BytesIO(data)
    return rq


def _primitives() -> list[Any]:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3.4"
    rsp.Status = 0xA700
    rsp.ErrorComment = "out of resources"  # even
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = Verification
    get_rsp = C_GET()
    get_rsp.MessageIDBeingRespondedTo = 2
    get_rsp.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelGet
    get_rsp.Status = 0xFF00
    get_rsp.NumberOfRemainingSuboperations = 199
    get_rsp.NumberOfCompletedSuboperations = 1
    get_rsp.NumberOfFailedSuboperations = 0
    get_rsp.NumberOfWarningSuboperations = 0
    report = N_EVENT_REPORT()
    report.MessageID = 9
    report.AffectedSOPClassUID = "1.2.840.10008.1.20.1"
    report.AffectedSOPInstanceUID = "1.2.840.10008.1.20.1.1"
    report.EventTypeID = 1
    report.EventInformation = BytesIO(b"\x08\x00\x55\x11\x00\x00\x00\x00")
    action = N_ACTION()
    action.MessageID = 4
    action.RequestedSOPClassUID = "1.2.840.10008.1.20.1"
    action.RequestedSOPInstanceUID = "1.2.840.10008.1.20.1.1"
    action.ActionTypeID = 1
    action.ActionInformation = BytesIO(b"")
    return [
        _store_rq(),
        _store_rq("MODALITY"),
        _store_rq("ODD"),
        rsp,
        echo,
        get_rsp,
        report,
        action,
    ]


def _message(primitive: Any) -> Any:
    table: Any = (
        dimse._RQ_TO_MESSAGE
        if primitive.MessageIDBeingRespondedTo is None
        else dimse._RSP_TO_MESSAGE
    )
    msg = table[primitive.__class__]()
    msg.primitive_to_message(primitive)
    return msg


@pytest.mark.parametrize("index", range(8))
def test_command_sets_encode_as_pydicom_writes_them(index: int) -> None:
    msg = _message(_primitives()[index])
    ours = throughput.encode_command_set(msg.command_set)
    assert ours is not None
    assert ours == pydicom_encode(msg.command_set, True, True)


def test_unusual_command_elements_go_to_pydicom() -> None:
    ds = Dataset()
    ds.CommandGroupLength = 0
    ds.AttributeIdentifierList = [0x00100010, 0x00100020]  # AT, multi-valued
    assert throughput.encode_command_set(ds) is None
    data = Dataset()
    data.PatientName = "A"
    assert throughput.encode_command_set(data) is None  # not group 0000


@pytest.mark.parametrize("max_pdu", [0, 7, 1000, 4096, 16384])
@pytest.mark.parametrize("size", [0, 1, 994, 995, 16378, 16379, 50_001])
def test_pdata_pdus_are_upstreams_bytes(max_pdu: int, size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    msg = _message(_store_rq("MOVER", data[:size]))
    upstream = b"".join(P_DATA_TF(p).encode() for p in msg.encode_msg(5, max_pdu))
    command = pydicom_encode(msg.command_set, True, True)
    assert command is not None
    assert throughput.encode_pdata_pdus(5, command, data[:size], max_pdu) == upstream
    parts = throughput.pdata_pdu_parts(5, command, memoryview(data)[:size], max_pdu)
    assert b"".join(parts) == upstream


def test_send_parts_writes_everything_in_order_through_partial_writes() -> None:
    """A 2 MB message in 16 KiB PDUs to a reader that drains slowly through a small
    socket buffer: sendmsg writes part of a buffer many times; the bytes arrive whole.
    (TLS sockets have no sendmsg: there the parts are joined, see test_cstore_loop's TLS
    retrieve.)"""
    import socket
    import threading
    import time

    data = bytes(range(256)) * 8192
    parts = throughput.pdata_pdu_parts(1, b"\x00" * 10, memoryview(data), 16384)
    expected = b"".join(parts)

    class Counting(socket.socket):
        calls = 0

        def sendmsg(self, *args: Any) -> int:
            Counting.calls += 1
            return super().sendmsg(*args)

    first, b = socket.socketpair()
    a = Counting(first.family, first.type, first.proto, first.detach())
    a.settimeout(30)  # as pynetdicom's sockets: a write may then be partial
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    received = bytearray()

    def drain() -> None:
        while len(received) < len(expected):
            chunk = b.recv(3000)
            if not chunk:
                return
            received.extend(chunk)
            time.sleep(0.0005)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        throughput.send_parts(a, parts)
        reader.join(timeout=30)
    finally:
        a.close()
        b.close()
    assert bytes(received) == expected
    assert Counting.calls > 10  # the writes were partial


@pytest.fixture
def node(hub: Hub, tmp_path: Path) -> Iterator[tuple[int, list[Path]]]:
    clinic = add_clinic(hub, "Clinic A", "VIEWER_A", "127.0.0.1", permissions=["get"]).id
    study = make_study(tmp_path / "a", "ct", count=4, size=64, seed=31)
    for path in study:
        ingest_part10(hub, path, Sender(clinic, "test:a"))
    dicom = DicomNode(hub)
    dicom.start()
    try:
        yield dicom.address[1], study
    finally:
        dicom.stop()


def test_get_through_the_fast_path_is_fragmented_and_byte_identical(
    node: tuple[int, list[Path]],
) -> None:
    """A peer with a 1,024-byte maximum PDU gets many PDUs per instance, none too long,
    and the instances exactly as stored."""
    port, study = node
    assert throughput.install()
    received: dict[str, str] = {}
    pdu_lengths: list[int] = []

    def on_store(event: evt.Event) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = dataset_sha256(
            Path(event.dataset_path)
        )
        return 0x0000

    def on_pdu(event: evt.Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            pdu_lengths.append(len(event.pdu.encode()))

    ae = AE(ae_title="VIEWER_A")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="SAF", max_pdu=1024,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_PDU_RECV, on_pdu)],
    )  # fmt: skip
    assert assoc.is_established
    uid = str(dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = uid
    responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    assoc.release()
    assert responses[-1][0].Status == 0x0000
    assert received == {sop_instance_uid(p): dataset_sha256(p) for p in study}
    assert len(pdu_lengths) > 4 * 8  # 64x64x2 bytes of pixels alone need 8+ per instance
    assert max(pdu_lengths) <= 1024 + 6  # the PDU header is not counted in the maximum


def test_per_pdu_hooks_keep_upstreams_one_event_per_pdu(tmp_path: Path) -> None:
    """With EVT_PDU_SENT bound, send_msg goes the upstream way: one event per PDU."""
    assert throughput.install()
    scp = AE(ae_title="ECHO_SCP")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    sent: list[int] = []
    try:
        ae = AE(ae_title="ECHO_SCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate(
            "127.0.0.1", port, ae_title="ECHO_SCP",
            evt_handlers=[(evt.EVT_PDU_SENT, lambda e: sent.append(e.pdu.pdu_type))],
        )  # fmt: skip
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert sent == [0x01, 0x04, 0x05]  # A-ASSOCIATE-RQ, the C-ECHO-RQ's P-DATA, A-RELEASE-RQ


def test_context_deepcopy_is_the_default_copy_without_rebuilding_uids() -> None:
    """pynetdicom deep-copies the supported contexts per association: the copy equals
    the default one, its transfer syntax list is its own, an unusual context is copied
    the default way."""
    import copy

    from pynetdicom import ALL_TRANSFER_SYNTAXES, build_context

    assert throughput.install()
    context = build_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    context.context_id = 3
    context._as_scu = True
    copied = copy.deepcopy(context)
    assert vars(copied) == vars(context) and type(copied) is type(context)
    assert copied._transfer_syntax is not context._transfer_syntax
    copied.add_transfer_syntax("1.2.3.4")
    assert "1.2.3.4" not in context.transfer_syntax
    context.extra = ["mutable"]  # type: ignore[attr-defined]
    odd = copy.deepcopy(context)
    assert odd.extra == ["mutable"] and odd.extra is not context.extra
