"""Index-side query matching (saf.query): every matching kind, tenancy, computed keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import update

from saf.clinics import add_clinic
from saf.hub import Hub
from saf.identity import Principal
from saf.ingest import Sender, ingest_part10
from saf.models import Patient
from saf.query import MAX_MATCHES, QueryError, find, parse_matcher, retrieve_instances
from tests.factories import make_study


def _ae(clinic_id: str) -> Principal:
    return Principal(kind="ae", id="p", name="VIEWER", role="system", clinic_id=clinic_id)


def _ingest(
    hub: Hub,
    sender: Sender,
    out: Path,
    kind: str = "ct",
    *,
    seed: int,
    count: int = 2,
    **changes: str,
) -> list[Path]:
    """A synthetic study with some header values changed, stored for `sender`."""
    name = changes.pop("patient_name", None)
    pid = changes.pop("patient_id", None)
    paths = make_study(
        out,
        kind,
        count=count,
        size=16,
        seed=seed,
        **{k: v for k, v in (("patient_name", name), ("patient_id", pid)) if v},
    )
    for path in paths:
        ds = dcmread(path)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
        ingest_part10(hub, path, sender)
    return paths


def _uid(path: Path, keyword: str = "StudyInstanceUID") -> str:
    return str(getattr(dcmread(path, stop_before_pixels=True), keyword))


def _q(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture
def world(hub: Hub, tmp_path: Path) -> dict[str, object]:
    a = add_clinic(hub, "Clinic A", "MODALITY_A").id
    b = add_clinic(hub, "Clinic B", "MODALITY_B").id
    sa, sb = Sender(a, "test:a"), Sender(b, "test:b")
    ct = _ingest(
        hub,
        sa,
        tmp_path / "ct",
        "ct",
        seed=1,
        count=3,
        StudyDate="20240110",
        StudyTime="081500",
        StudyDescription="CT CHEST",
        patient_name="Doe^John",
        patient_id="P1",
    )
    mr = _ingest(
        hub,
        sa,
        tmp_path / "mr",
        "mr",
        seed=2,
        StudyDate="20240131",
        StudyTime="141000",
        StudyDescription="MR BRAIN",
        patient_name="Smith^Anna",
        patient_id="P2",
    )
    old = _ingest(
        hub,
        sa,
        tmp_path / "old",
        "cr",
        seed=3,
        count=1,
        StudyDate="20231201",
        StudyDescription="Chest 100%_x",
        patient_name="DOE^JANE",
        patient_id="P3",
    )
    other = _ingest(
        hub,
        sb,
        tmp_path / "b",
        "ct",
        seed=4,
        StudyDate="20240110",
        StudyDescription="CT CHEST",
        patient_name="Doe^John",
        patient_id="P1",
    )
    return {"a": a, "b": b, "ct": ct, "mr": mr, "old": old, "other": other}


def _studies(hub: Hub, clinic: object, **keys: object) -> list[str]:
    result = find(hub, _ae(str(clinic)), _q("STUDY", **{"StudyInstanceUID": "", **keys}))
    return sorted(str(ds.StudyInstanceUID) for ds in result.identifiers)


def test_matching_kinds(hub: Hub, world: dict[str, object]) -> None:
    ct, mr, old = (_uid(world[k][0]) for k in ("ct", "mr", "old"))  # type: ignore[index]
    a = world["a"]
    assert _studies(hub, a) == sorted([ct, mr, old])  # universal
    assert _studies(hub, a, StudyDate="20240110") == [ct]
    assert _studies(hub, a, StudyDate="20240101-20240131") == sorted([ct, mr])
    assert _studies(hub, a, StudyDate="-20231231") == [old]
    assert _studies(hub, a, StudyDate="20240111-") == [mr]
    assert _studies(hub, a, StudyTime="0800-0900") == [ct]
    assert _studies(hub, a, StudyTime="1410-") == [mr]
    assert _studies(hub, a, StudyDescription="CT*") == [ct]
    assert _studies(hub, a, StudyDescription="ct*") == []  # case-sensitive, both databases
    assert _studies(hub, a, StudyDescription="?R BRAIN") == [mr]
    assert _studies(hub, a, StudyDescription="Chest 100%_*") == [old]  # LIKE escaping
    assert _studies(hub, a, StudyDescription="Chest 1%") == []
    assert _studies(hub, a, StudyInstanceUID=[ct, old]) == sorted([ct, old])  # UID list
    assert _studies(hub, a, ModalitiesInStudy=["MR", "CR"]) == sorted([mr, old])
    assert _studies(hub, a, PatientID="P1") == [ct]


def test_patient_name_is_case_insensitive_and_sealed_keys_match(
    hub: Hub, world: dict[str, object]
) -> None:
    ct, old = (_uid(world[k][0]) for k in ("ct", "old"))  # type: ignore[index]
    a = world["a"]
    assert _studies(hub, a, PatientName="doe*") == sorted([ct, old])
    assert _studies(hub, a, PatientName="DOE^JOHN") == [ct]
    assert _studies(hub, a, PatientName="d?e^ja*") == [old]
    result = find(
        hub, _ae(str(a)), _q("STUDY", StudyInstanceUID=ct, PatientName="", PatientBirthDate="")
    )
    [ds] = result.identifiers
    assert str(ds.PatientName) == "Doe^John" and len(ds.PatientBirthDate) == 8
    born = str(ds.PatientBirthDate)
    assert _studies(hub, a, StudyInstanceUID=ct, PatientBirthDate=f"{born}-") == [ct]
    assert _studies(hub, a, StudyInstanceUID=ct, PatientBirthDate=f"-{int(born) - 1}") == []


def test_answers_carry_requested_and_computed_keys(hub: Hub, world: dict[str, object]) -> None:
    ct = _uid(world["ct"][0])  # type: ignore[index]
    q = _q(
        "STUDY",
        StudyInstanceUID=ct,
        StudyDescription="",
        ModalitiesInStudy="",
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
        ReferringPhysicianName="",
        PatientID="",
    )
    [ds] = find(hub, _ae(str(world["a"])), q).identifiers
    assert ds.QueryRetrieveLevel == "STUDY" and ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.RetrieveAETitle == "SAF"
    assert ds.StudyDescription == "CT CHEST" and ds.PatientID == "P1"
    assert list(ds.ModalitiesInStudy) == ["CT"] or ds.ModalitiesInStudy == "CT"
    assert int(ds.NumberOfStudyRelatedSeries) == 1
    assert int(ds.NumberOfStudyRelatedInstances) == 3
    assert "ReferringPhysicianName" in ds and not ds.ReferringPhysicianName  # unknown: empty


def test_levels(hub: Hub, world: dict[str, object]) -> None:
    principal = _ae(str(world["a"]))
    ct = world["ct"]
    study = _uid(ct[0])  # type: ignore[index]
    patients = find(
        hub, principal, _q("PATIENT", PatientID="", NumberOfPatientRelatedStudies=""), "patient"
    ).identifiers
    assert sorted(str(d.PatientID) for d in patients) == ["P1", "P2", "P3"]
    series = find(
        hub,
        principal,
        _q(
            "SERIES",
            StudyInstanceUID=study,
            SeriesInstanceUID="",
            Modality="",
            NumberOfSeriesRelatedInstances="",
        ),
    ).identifiers
    assert [(d.Modality, int(d.NumberOfSeriesRelatedInstances)) for d in series] == [("CT", 3)]
    images = find(
        hub, principal, _q("IMAGE", StudyInstanceUID=study, SOPInstanceUID="", InstanceNumber="")
    ).identifiers
    assert sorted(str(d.SOPInstanceUID) for d in images) == sorted(
        _uid(p, "SOPInstanceUID")
        for p in ct  # type: ignore[attr-defined]
    )
    with pytest.raises(QueryError) as err:
        find(hub, principal, _q("PATIENT", PatientID=""), "study")
    assert err.value.status == 0xA900
    with pytest.raises(QueryError):
        find(hub, principal, _q("NOPE"))


def test_other_clinics_rows_are_invisible(hub: Hub, world: dict[str, object]) -> None:
    other = _uid(world["other"][0])  # type: ignore[index]
    assert _studies(hub, world["a"], StudyInstanceUID=other) == []
    assert _studies(hub, world["b"]) == [other]
    assert retrieve_instances(hub, _ae(str(world["a"])), _q("STUDY", StudyInstanceUID=other)) == []
    nobody = Principal(kind="ae", id="x", name="X", role="system")  # no clinic: nothing
    assert find(hub, nobody, _q("STUDY", StudyInstanceUID="")).identifiers == []


def test_retrieve_selects_newest_versions_by_unique_keys(
    hub: Hub, world: dict[str, object], tmp_path: Path
) -> None:
    a = str(world["a"])
    ct: list[Path] = world["ct"]  # type: ignore[assignment]
    changed = dcmread(ct[0])
    changed.SeriesDescription = "RESENT"
    changed.save_as(tmp_path / "v2.dcm", enforce_file_format=True)
    ingest_part10(hub, tmp_path / "v2.dcm", Sender(a, "test:a"))
    got = retrieve_instances(hub, _ae(a), _q("STUDY", StudyInstanceUID=_uid(ct[0])))
    assert sorted(i.sop_instance_uid for i in got) == sorted(_uid(p, "SOPInstanceUID") for p in ct)
    [first] = [i for i in got if i.sop_instance_uid == _uid(ct[0], "SOPInstanceUID")]
    one = find(
        hub, _ae(a), _q("STUDY", StudyInstanceUID=_uid(ct[0]), NumberOfStudyRelatedInstances="")
    ).identifiers
    assert int(one[0].NumberOfStudyRelatedInstances) == 3  # the new version replaces the old
    assert first.instance_id != "" and first.clinic_id == a
    # Non-unique keys do not select anything on their own.
    with pytest.raises(QueryError):
        retrieve_instances(hub, _ae(a), _q("STUDY", StudyDescription="CT*"))


def test_limit_cuts_and_says_so(hub: Hub, world: dict[str, object]) -> None:
    result = find(hub, _ae(str(world["a"])), _q("STUDY", StudyInstanceUID=""), limit=2)
    assert len(result.identifiers) == 2 and result.truncated
    assert MAX_MATCHES >= 1000


def test_parse_matcher() -> None:
    assert parse_matcher([""], "LO") is None and parse_matcher(["*"], "LO") is None
    assert parse_matcher(["A*"], "LO") is not None
    assert parse_matcher(["1.2*"], "UI").kind == "single"  # type: ignore[union-attr]
    with pytest.raises(QueryError):
        parse_matcher(["A", "B"], "LO")
    with pytest.raises(QueryError):
        parse_matcher(["-"], "DA")


def test_patient_name_without_wildcards_is_the_whole_name(
    hub: Hub, world: dict[str, object]
) -> None:
    ct = _uid(world["ct"][0])  # type: ignore[index]
    a = world["a"]
    assert _studies(hub, a, PatientName="DOE") == []  # not a component: PS3.4 C.2.2.2.1
    assert _studies(hub, a, PatientName="john") == []
    assert _studies(hub, a, PatientName="doe^john^^") == [ct]  # empty components aside
    assert _studies(hub, a, PatientName="*^john") == [ct]


@pytest.mark.parametrize("keys", [{}, {"PatientName": "*"}, {"PatientName": "*o*"}])
def test_offset_pages_through_every_match_once(
    hub: Hub, world: dict[str, object], keys: dict[str, str]
) -> None:
    # {} is paged in SQL; a PatientName with a wildcard is matched (and paged) in Python.
    principal = _ae(str(world["a"]))
    q = _q("STUDY", StudyInstanceUID="", **keys)
    every = [str(d.StudyInstanceUID) for d in find(hub, principal, q).identifiers]
    pages = [find(hub, principal, q, limit=2, offset=offset) for offset in (0, 2, 4)]

    assert [str(d.StudyInstanceUID) for p in pages for d in p.identifiers] == every
    assert [p.truncated for p in pages] == [len(every) > end for end in (2, 4, 6)]
    assert len(every) == (2 if keys.get("PatientName") == "*o*" else 3)


def test_image_level_across_studies_carries_every_levels_counts(
    hub: Hub, world: dict[str, object]
) -> None:
    # QIDO-RS /instances: no StudyInstanceUID, keys of the upper levels narrow the match.
    q = _q(
        "IMAGE",
        Modality="CT",
        PatientName="doe^john",
        SOPInstanceUID="",
        ModalitiesInStudy="",
        NumberOfStudyRelatedInstances="",
        NumberOfSeriesRelatedInstances="",
        NumberOfPatientRelatedStudies="",
    )
    images = find(hub, _ae(str(world["a"])), q).identifiers

    assert sorted(str(d.SOPInstanceUID) for d in images) == sorted(
        _uid(p, "SOPInstanceUID")
        for p in world["ct"]  # type: ignore[attr-defined]
    )
    for ds in images:
        assert ds.ModalitiesInStudy == "CT"
        assert int(ds.NumberOfStudyRelatedInstances) == 3
        assert int(ds.NumberOfSeriesRelatedInstances) == 3
        assert int(ds.NumberOfPatientRelatedStudies) == 1


def test_a_date_that_is_not_a_date_is_refused() -> None:
    for value in ("last-week", "2024", "20240101-2024", "2024-01-01"):
        with pytest.raises(QueryError) as err:
            parse_matcher([value], "DA")
        assert err.value.status == 0xA900, value
    assert parse_matcher(["20240101-"], "DA") is not None


def test_a_damaged_sealed_name_matches_nothing_and_fails_nothing(
    hub: Hub, world: dict[str, object]
) -> None:
    ct, old = (_uid(world[k][0]) for k in ("ct", "old"))  # type: ignore[index]
    with hub.sessions() as session:
        session.execute(
            update(Patient)
            .where(Patient.patient_id == "P2", Patient.clinic_id == world["a"])
            .values(name_sealed="v1.damaged")
        )
        session.commit()

    assert _studies(hub, world["a"], PatientName="*^*") == sorted([ct, old])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_patient_id_is_matched_through_the_patient_index(hub: Hub, tmp_path: Path) -> None:
    """A PatientID search looks the patient up by (clinic, Patient ID) rather than
    scanning every study of the clinic (the plan, on SQLite; PostgreSQL plans by cost)."""
    from sqlalchemy.dialects import sqlite

    from saf.query import _parse, _statement

    clinic = add_clinic(hub, "Clinic A", "MODALITY_A").id
    paths = _ingest(hub, Sender(clinic, "test"), tmp_path / "a", seed=61, patient_id="PX1")
    _ingest(hub, Sender(clinic, "test"), tmp_path / "b", seed=62, patient_id="PX2")
    stmt = _statement(_ae(clinic), _parse(_q("STUDY", PatientID="PX1"), "study"))
    compiled = stmt.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True})
    with hub.engine.connect() as conn:
        plan = " | ".join(
            str(row[3]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")
        )
    assert "patient USING INDEX sqlite_autoindex_patient_2" in plan, plan
    assert "ix_study_clinic_id" not in plan, plan
    [study] = find(hub, _ae(clinic), _q("STUDY", PatientID="PX1", StudyInstanceUID="")).identifiers
    assert study.StudyInstanceUID == _uid(paths[0])
