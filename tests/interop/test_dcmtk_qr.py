"""dcmtk's findscu, movescu (to a dcmtk storescp) and getscu against a running `saf dicom`:
answers match the index, retrieved files are byte-identical, tenancy and permissions hold."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.factories import dataset_sha256, make_study, sop_instance_uid
from tests.interop.conftest import SafProcess, dcmtk_env, free_port, new_saf_node

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("dcmtk")]


def _dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=dcmtk_env(), timeout=120)


def _study_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


@dataclass
class Site:
    node: SafProcess
    dest_port: int
    a_ct: list[Path]
    a_mr: list[Path]
    b_ct: list[Path]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("qr")
    node = new_saf_node(root)
    dest_port = free_port()
    for args in (
        ["Clinic A", "--aet", "FINDER", "--host", "127.0.0.1", "--allow", "find,move,get"],
        ["Clinic A", "--aet", "STORESCP", "--host", "127.0.0.1", "--port", str(dest_port)],
        ["Clinic B", "--aet", "MODALITY_B"],
        ["Clinic B", "--aet", "FINDER_B", "--host", "127.0.0.1", "--allow", "find,move"],
    ):
        node.saf("clinic", "add", *args)
    node.start()
    a_ct = make_study(root / "a_ct", "ct", count=3, size=64, seed=41, patient_name="ALPHA^ONE")
    a_mr = make_study(root / "a_mr", "mr", count=2, size=64, seed=42, patient_name="BETA^TWO")
    b_ct = make_study(root / "b_ct", "ct", count=2, size=64, seed=43, patient_name="ALPHA^ONE")
    for aet, paths in (("MODALITY_A", a_ct), ("MODALITY_A", a_mr), ("MODALITY_B", b_ct)):
        sent = _dcmtk(
            "storescu",
            "-xe",
            "-aet",
            aet,
            "-aec",
            "SAF",
            "+sd",
            "+r",
            "127.0.0.1",
            str(node.port),
            str(paths[0].parent),
        )
        assert sent.returncode == 0, sent.stderr
    try:
        yield Site(node, dest_port, a_ct, a_mr, b_ct)
    finally:
        node.stop()


def _findscu(site: Site, out: Path, *keys: str, root: str = "-S", aet: str = "FINDER") -> list:  # type: ignore[type-arg]
    out.mkdir(parents=True)
    args = [arg for key in keys for arg in ("-k", key)]
    result = _dcmtk(
        "findscu",
        root,
        "-X",
        "-od",
        str(out),
        "-aet",
        aet,
        "-aec",
        "SAF",
        *args,
        "127.0.0.1",
        str(site.node.port),
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_findscu_study_root_keys(site: Site, tmp_path: Path) -> None:
    ct, mr = _study_uid(site.a_ct[0]), _study_uid(site.a_mr[0])
    base = (
        "QueryRetrieveLevel=STUDY",
        "StudyInstanceUID",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedInstances",
        "PatientName",
    )
    every = _findscu(site, tmp_path / "all", *base)
    assert {str(d.StudyInstanceUID) for d in every} == {ct, mr}  # not clinic B's
    counts = {str(d.StudyInstanceUID): int(d.NumberOfStudyRelatedInstances) for d in every}
    assert counts == {ct: 3, mr: 2}
    assert {str(d.StudyInstanceUID): d.ModalitiesInStudy for d in every} == {ct: "CT", mr: "MR"}
    wildcard = _findscu(site, tmp_path / "wild", *base[:-1], "PatientName=alpha*")
    assert [str(d.StudyInstanceUID) for d in wildcard] == [ct]
    dated = _findscu(site, tmp_path / "date", *base, "StudyDate=20240101-20240131")
    assert len(dated) == 2
    none = _findscu(site, tmp_path / "none", *base, "StudyDate=-20231231")
    assert none == []
    listed = _findscu(site, tmp_path / "list", *base[:1], f"StudyInstanceUID={ct}\\{mr}\\1.2.3")
    assert {str(d.StudyInstanceUID) for d in listed} == {ct, mr}


def test_findscu_patient_root(site: Site, tmp_path: Path) -> None:
    patients = _findscu(
        site,
        tmp_path / "p",
        "QueryRetrieveLevel=PATIENT",
        "PatientID",
        "PatientName",
        "NumberOfPatientRelatedStudies",
        root="-P",
    )
    assert sorted(str(d.PatientName) for d in patients) == ["ALPHA^ONE", "BETA^TWO"]
    pid = str(dcmread(site.a_ct[0], stop_before_pixels=True).PatientID)
    series = _findscu(
        site,
        tmp_path / "s",
        "QueryRetrieveLevel=SERIES",
        f"PatientID={pid}",
        f"StudyInstanceUID={_study_uid(site.a_ct[0])}",
        "SeriesInstanceUID",
        "Modality",
        "NumberOfSeriesRelatedInstances",
        root="-P",
    )
    assert [(d.Modality, int(d.NumberOfSeriesRelatedInstances)) for d in series] == [("CT", 3)]


def test_other_clinic_sees_only_its_own(site: Site, tmp_path: Path) -> None:
    found = _findscu(
        site, tmp_path / "b", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", aet="FINDER_B"
    )
    assert [str(d.StudyInstanceUID) for d in found] == [_study_uid(site.b_ct[0])]


def test_findscu_without_find_permission_is_refused(site: Site) -> None:
    result = _dcmtk(
        "findscu",
        "-S",
        "-aet",
        "MODALITY_A",
        "-aec",
        "SAF",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "127.0.0.1",
        str(site.node.port),
    )
    assert result.returncode != 0
    assert "No Acceptable Presentation Contexts" in result.stderr + result.stdout


@pytest.fixture
def storescp(site: Site, tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "+xa", "-aet", "STORESCP", "-od", str(out), str(site.dest_port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", site.dest_port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _movescu(site: Site, study_uid: str, dest: str, aet: str = "FINDER") -> str:
    result = _dcmtk(
        "movescu",
        "-v",
        "-S",
        "-aet",
        aet,
        "-aec",
        "SAF",
        "-aem",
        dest,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "127.0.0.1",
        str(site.node.port),
    )
    return result.stdout + result.stderr


def _digests(paths: list[Path]) -> dict[str, str]:
    return {sop_instance_uid(p): dataset_sha256(p) for p in paths}


def test_movescu_to_storescp_is_byte_identical(site: Site, storescp: Path) -> None:
    log = _movescu(site, _study_uid(site.a_ct[0]), "STORESCP")
    assert "Received Final Move Response (Success)" in log, log
    received = [p for p in storescp.rglob("*") if p.is_file()]
    assert _digests(received) == _digests(site.a_ct)


def test_movescu_unknown_destination_and_other_clinic(site: Site, storescp: Path) -> None:
    log = _movescu(site, _study_uid(site.a_ct[0]), "NOBODY")
    assert "Final Move Response (Refused: MoveDestinationUnknown)" in log, log
    # Clinic B cannot use clinic A's destination, nor move clinic A's study anywhere.
    log = _movescu(site, _study_uid(site.a_ct[0]), "STORESCP", aet="FINDER_B")
    assert "Final Move Response (Refused: MoveDestinationUnknown)" in log, log
    assert not [p for p in storescp.rglob("*") if p.is_file()]


def test_getscu_is_byte_identical(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "got"
    out.mkdir()
    result = _dcmtk(
        "getscu",
        "-S",
        "-aet",
        "FINDER",
        "-aec",
        "SAF",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={_study_uid(site.a_mr[0])}",
        "127.0.0.1",
        str(site.node.port),
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert _digests([p for p in out.rglob("*") if p.is_file()]) == _digests(site.a_mr)
