"""The DICOM node with pynetdicom as the peer: association control, C-ECHO, C-STORE statuses."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from saf.clinics import add_clinic, list_clinics
from saf.hub import Hub
from saf.models import UNASSIGNED_CLINIC
from tests.dicom_node.peer import associate, rejection
from tests.factories import make_clinic, make_study, row_counts, running_node, stored_blob_ids


@pytest.fixture(autouse=True)
def send_raw_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send files byte for byte, so a broken file reaches the node broken."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _associate(port: int, calling: str, contexts: list[tuple[str, str]]) -> object:
    ae = AE(ae_title=calling)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    return associate(ae, "127.0.0.1", port, ae_title="SAF")


def test_echo_from_registered_peer(hub: Hub) -> None:
    make_clinic(hub, aet="MODALITY_A")
    with running_node(hub) as (_, port):
        assoc = _associate(port, "MODALITY_A", [(Verification, ExplicitVRLittleEndian)])
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()


def test_unknown_calling_aet_is_rejected(hub: Hub) -> None:
    make_clinic(hub, aet="MODALITY_A")
    with running_node(hub) as (_, port):
        assoc = _associate(port, "STRANGER", [(Verification, ExplicitVRLittleEndian)])
        assert rejection(assoc) == (0x01, 0x01, 0x03)  # calling AE title not recognised


def test_wrong_called_aet_is_rejected(hub: Hub) -> None:
    make_clinic(hub, aet="MODALITY_A")
    with running_node(hub) as (_, port):
        ae = AE(ae_title="MODALITY_A")
        ae.add_requested_context(Verification)
        assoc = associate(ae, "127.0.0.1", port, ae_title="NOT_SAF")
        assert rejection(assoc) == (0x01, 0x01, 0x07)  # called AE title not recognised


def test_unknown_peer_lands_in_unassigned_clinic_when_allowed(hub: Hub, tmp_path: Path) -> None:
    hub.settings.dicom_accept_unknown = True
    [path] = make_study(tmp_path, count=1)
    with running_node(hub) as (_, port):
        assoc = _associate(port, "STRANGER", [(CTImageStorage, ExplicitVRLittleEndian)])
        assert assoc.is_established
        assert assoc.send_c_store(path).Status == 0x0000
        assoc.release()
    assert [c.name for c in list_clinics(hub)] == [UNASSIGNED_CLINIC]


def test_store_duplicate_and_new_version(hub: Hub, tmp_path: Path) -> None:
    make_clinic(hub, aet="MODALITY_A")
    paths = make_study(tmp_path / "in", count=2)
    changed = tmp_path / "changed.dcm"
    ds = dcmread(paths[0])
    ds.SeriesDescription = "RESENT WITH CHANGES"
    ds.save_as(changed, enforce_file_format=True)
    with running_node(hub) as (_, port):
        assoc = _associate(port, "MODALITY_A", [(CTImageStorage, ExplicitVRLittleEndian)])
        statuses = [assoc.send_c_store(p).Status for p in [*paths, paths[0], changed]]
        assoc.release()
    assert statuses == [0x0000] * 4
    assert row_counts(hub)["instance"] == 3  # two originals + one new version
    assert len(stored_blob_ids(hub)) == 3


def test_truncated_dataset_fails_with_c000_and_leaves_nothing(hub: Hub, tmp_path: Path) -> None:
    make_clinic(hub, aet="MODALITY_A")
    [path] = make_study(tmp_path, count=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with running_node(hub) as (_, port):
        assoc = _associate(port, "MODALITY_A", [(CTImageStorage, ExplicitVRLittleEndian)])
        rsp = assoc.send_c_store(path)
        assoc.release()
    assert rsp.Status == 0xC000
    assert "truncated" in rsp.ErrorComment
    assert all(n == 0 for n in row_counts(hub).values())
    assert stored_blob_ids(hub) == set()


def test_sop_class_mismatch_fails_with_a900(hub: Hub, tmp_path: Path) -> None:
    make_clinic(hub, aet="MODALITY_A")
    [path] = make_study(tmp_path, count=1)
    data = path.read_bytes()
    # Announce it as MR in the File Meta (first occurrence); the dataset still says CT.
    assert len(CTImageStorage) == len(MRImageStorage)
    path.write_bytes(data.replace(CTImageStorage.encode(), MRImageStorage.encode(), 1))
    with running_node(hub) as (_, port):
        assoc = _associate(port, "MODALITY_A", [(MRImageStorage, ExplicitVRLittleEndian)])
        rsp = assoc.send_c_store(path)
        assoc.release()
    assert rsp.Status == 0xA900
    assert all(n == 0 for n in row_counts(hub).values())
    assert stored_blob_ids(hub) == set()


@pytest.mark.parametrize("kind", ["ct-jpeg", "ct-j2k", "ct-jls", "ct-rle", "us", "photo"])
def test_compressed_and_colour_syntaxes_are_accepted(hub: Hub, tmp_path: Path, kind: str) -> None:
    make_clinic(hub, aet="MODALITY_A")
    [path, *_] = make_study(tmp_path, kind, count=1)
    meta = dcmread(path, stop_before_pixels=True).file_meta
    with running_node(hub) as (_, port):
        assoc = _associate(
            port, "MODALITY_A", [(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)]
        )
        assert assoc.is_established, f"{kind}: {meta.TransferSyntaxUID} refused"
        assert assoc.send_c_store(path).Status == 0x0000
        assoc.release()


def test_concurrent_identical_sends_store_each_instance_once(hub: Hub, tmp_path: Path) -> None:
    make_clinic(hub, aet="MODALITY_A")
    paths = make_study(tmp_path, count=12)
    statuses: list[int] = []
    lock = threading.Lock()

    def send_all() -> None:
        assoc = _associate(port, "MODALITY_A", [(CTImageStorage, ExplicitVRLittleEndian)])
        for path in paths:
            status = assoc.send_c_store(path).Status
            with lock:
                statuses.append(status)
        assoc.release()

    with running_node(hub) as (_, port):
        senders = [threading.Thread(target=send_all) for _ in range(3)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(timeout=120)

    assert statuses == [0x0000] * 36
    counts = row_counts(hub)
    assert (counts["study"], counts["series"], counts["instance"]) == (1, 1, 12)
    assert len(stored_blob_ids(hub)) == 12  # losers of a race removed their copies


def test_ae_title_pinned_to_another_host_is_rejected(hub: Hub) -> None:
    add_clinic(hub, "Clinic P", "PINNED", host="10.9.8.7")  # not where the test connects from
    add_clinic(hub, "Clinic L", "LOCAL", host="127.0.0.1")
    with running_node(hub) as (_, port):
        far = _associate(port, "PINNED", [(Verification, ExplicitVRLittleEndian)])
        near = _associate(port, "LOCAL", [(Verification, ExplicitVRLittleEndian)])
        assert rejection(far) == (0x01, 0x01, 0x03)
        assert near.is_established
        near.release()
