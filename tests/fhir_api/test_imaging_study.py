"""ImagingStudy at /fhir: generated from the archive index, read-only, tenancy and audit;
over HTTP with real tokens, on both databases."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy import func, select

from saf.app import create_app
from saf.hub import Hub
from saf.models import AuditRecord, Instance, Series, Study
from tests.saf.tenants import (
    People,
    World,
    add_fhir_referral,
    ehr_login,
    login,
    make_people,
    make_world,
)


@dataclass
class Setup:
    client: TestClient
    hub: Hub
    world: World
    people: People
    b: dict[str, str]
    a: dict[str, str]


@pytest.fixture
def setup(hub: Hub, tmp_path: Path) -> Iterator[Setup]:
    world = make_world(hub, tmp_path)
    people = make_people(hub, world)
    with TestClient(create_app(hub)) as client:
        yield Setup(
            client,
            hub,
            world,
            people,
            login(client, people.clinician_b),
            login(client, people.clinician_a),
        )


def _ct_study_b(s: Setup) -> Study:
    study_id = next(k for k, v in s.world.b.case_of_study.items() if v == s.world.ct_case_b)
    with s.hub.sessions() as session:
        return session.get_one(Study, study_id)


def _get(s: Setup, url: str, who: dict[str, str], **params: Any) -> Any:
    return s.client.get(url, headers=who, params=params)


def test_read_is_the_index_with_a_wado_endpoint(setup: Setup) -> None:
    s = setup
    study = _ct_study_b(s)
    response = _get(s, f"/fhir/ImagingStudy/{study.id}", s.b)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    get_fhir_model_class("ImagingStudy").model_validate(body)  # valid R4(B)
    assert body["id"] == study.id
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{study.study_instance_uid}"} in body[
        "identifier"
    ]
    with s.hub.sessions() as session:
        n_series = session.scalar(select(func.count()).where(Series.study_pk == study.id))
        n_instances = session.scalar(
            select(func.count())
            .select_from(Instance)
            .join(Series, Series.id == Instance.series_pk)
            .where(Series.study_pk == study.id)
        )
    assert body["numberOfSeries"] == n_series == len(body["series"])
    assert body["numberOfInstances"] == n_instances
    assert body["modality"] == [
        {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}
    ]
    instance = body["series"][0]["instance"][0]
    assert instance["sopClass"]["code"].startswith("urn:oid:1.2.840.10008.")
    [endpoint] = body["contained"]
    assert body["endpoint"] == [{"reference": "#wado"}]
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["address"] == "http://testserver/dicomweb"
    # the Endpoint really serves the study, to the same caller
    wado = s.client.get(
        f"/dicomweb/studies/{study.study_instance_uid}/metadata",
        headers={**s.b, "Accept": "application/dicom+json"},
    )
    assert wado.status_code == 200, wado.text
    assert len(wado.json()) == n_instances
    with s.hub.sessions() as session:
        rec = session.scalars(
            select(AuditRecord)
            .where(AuditRecord.entity_type == "ImagingStudy")
            .order_by(AuditRecord.id.desc())
        ).first()
    assert rec is not None and rec.entity_id == study.id and rec.event == "read"
    assert rec.patient_pk == study.patient_pk and rec.clinic_id == study.clinic_id


def test_another_tenant_sees_nothing(setup: Setup) -> None:
    s = setup
    study = _ct_study_b(s)
    missing = _get(s, f"/fhir/ImagingStudy/{study.id}", s.a)
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"
    assert _get(s, "/fhir/ImagingStudy/nope", s.a).json() == {
        **missing.json(),
        "issue": [{**missing.json()["issue"][0], "diagnostics": "ImagingStudy/nope is not known"}],
    }
    found = _get(s, "/fhir/ImagingStudy", s.a).json()
    assert [e["resource"]["id"] for e in found["entry"]] == s.world.a.studies
    thoracic = login(s.client, s.people.thoracic)
    derm = login(s.client, s.people.derm)
    assert _get(s, f"/fhir/ImagingStudy/{study.id}", thoracic).status_code == 200
    assert _get(s, f"/fhir/ImagingStudy/{study.id}", derm).status_code == 404
    admin = login(s.client, s.people.admin)
    assert _get(s, f"/fhir/ImagingStudy/{study.id}", admin).status_code == 403


def test_search_parameters(setup: Setup) -> None:
    s = setup
    study = _ct_study_b(s)
    uid = study.study_instance_uid

    def ids(**params: Any) -> list[str]:
        response = _get(s, "/fhir/ImagingStudy", s.b, **params)
        assert response.status_code == 200, response.text
        return [
            e["resource"]["id"] for e in response.json()["entry"] if e["search"]["mode"] == "match"
        ]

    assert ids(identifier=f"urn:dicom:uid|{uid}") == [study.id]
    assert ids(identifier=f"urn:dicom:uid|urn:oid:{uid}") == [study.id]
    assert ids(identifier=uid) == [study.id]
    if study.accession_number:
        assert ids(identifier=f"|{study.accession_number}") == [study.id]
    assert ids(identifier="urn:dicom:uid|1.2.3.4") == []
    assert ids(modality="CT") == [study.id]
    assert set(ids(modality="http://dicom.nema.org/resources/ontology/DCM|XC")) == {
        next(k for k, v in s.world.b.case_of_study.items() if v == s.world.derm_case_b)
    }
    assert sorted(ids()) == sorted(s.world.b.studies)
    assert ids(_id=study.id) == [study.id]
    if study.study_date:
        day = f"{study.study_date[:4]}-{study.study_date[4:6]}-{study.study_date[6:]}"
        assert study.id in ids(started=day)
        assert study.id in ids(started=f"ge{day[:7]}")
        assert study.id not in ids(started=f"lt{day}")
        assert study.id in ids(started=f"le{day[:4]}")
    # patient: the FHIR Patient the clinic sent for the study's patient
    patient_id, _ = add_fhir_referral(s.hub, s.world)
    assert ids(patient=f"Patient/{patient_id}") == [study.id]
    assert ids(patient="Patient/unknown") == []
    # paging
    page = _get(s, "/fhir/ImagingStudy", s.b, _count=1).json()
    assert page["total"] == 2 and len(page["entry"]) == 1
    nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
    second = s.client.get(nxt, headers=s.b).json()
    assert second["entry"][0]["resource"]["id"] != page["entry"][0]["resource"]["id"]
    # unknown parameters are reported, or refused under strict handling
    lax = _get(s, "/fhir/ImagingStudy", s.b, bogus="1").json()
    assert lax["entry"][-1]["search"]["mode"] == "outcome"
    strict = s.client.get(
        "/fhir/ImagingStudy?bogus=1", headers={**s.b, "Prefer": "handling=strict"}
    )
    assert strict.status_code == 400 and strict.json()["issue"][0]["expression"] == ["bogus"]
    bad = _get(s, "/fhir/ImagingStudy", s.b, started="ge2026-13-45")
    assert bad.status_code == 400 and bad.json()["issue"][0]["expression"] == ["started"]


def test_writes_are_refused_with_405(setup: Setup) -> None:
    s = setup
    study = _ct_study_b(s)
    ehr = ehr_login(s.client, "ehr-b-w", s.world.b.name, ["system/*.cruds"])
    body = {"resourceType": "ImagingStudy", "status": "available", "subject": {"display": "x"}}
    for method, url in (
        ("POST", "/fhir/ImagingStudy"),
        ("PUT", f"/fhir/ImagingStudy/{study.id}"),
        ("DELETE", f"/fhir/ImagingStudy/{study.id}"),
    ):
        response = s.client.request(
            method, url, headers={**ehr, "Content-Type": "application/fhir+json"}, json=body
        )
        assert response.status_code == 405, (method, response.text)
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert "read-only" in outcome["issue"][0]["diagnostics"]
    assert _get(s, f"/fhir/ImagingStudy/{study.id}", s.b).status_code == 200  # unchanged


def test_capability_lists_it_read_only(setup: Setup) -> None:
    cap = setup.client.get("/fhir/metadata").json()
    [entry] = [r for r in cap["rest"][0]["resource"] if r["type"] == "ImagingStudy"]
    assert {i["code"] for i in entry["interaction"]} == {"read", "search-type"}
    assert {p["name"] for p in entry["searchParam"]} >= {
        "patient",
        "identifier",
        "started",
        "modality",
    }
