"""Examples written after the FHIR R4 specification's own (samples/fhir/*.json) round-trip:
create, then read, gives the same content (server-managed id and meta aside), on both
databases; and the sample ITI-65 bundle is accepted as an MHD Document Source sends it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fhir_api.test_bundles import send
from tests.fhir_api.test_routes import FHIR, Api, api

__all__ = ["api"]

SAMPLES = Path(__file__).parents[2] / "samples" / "fhir"
EXAMPLES = sorted(p.name for p in SAMPLES.glob("*-example*.json"))


def _meta_aside(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


def _create(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    created = api.client.post(
        f"/fhir/{body['resourceType']}",
        content=json.dumps(body),
        headers={**api.ehr, "Content-Type": FHIR},
    )
    assert created.status_code == 201, created.text
    return dict(created.json())


def test_there_are_examples_of_every_written_type() -> None:
    types = {json.loads((SAMPLES / n).read_text())["resourceType"] for n in EXAMPLES}
    assert types == {
        "Patient",
        "Practitioner",
        "Organization",
        "ServiceRequest",
        "DiagnosticReport",
        "Communication",
        "DocumentReference",
        "List",
    }


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_round_trips(api: Api, name: str) -> None:
    patient = _create(api, json.loads((SAMPLES / "patient-example.json").read_text()))
    doctor = _create(api, json.loads((SAMPLES / "practitioner-example.json").read_text()))
    text = (SAMPLES / name).read_text()
    text = text.replace("Patient/example", f"Patient/{patient['id']}")
    text = text.replace("Practitioner/example", f"Practitioner/{doctor['id']}")
    sent = json.loads(text)
    created = _create(api, sent)
    read = api.client.get(f"/fhir/{sent['resourceType']}/{created['id']}", headers=api.ehr)
    assert read.status_code == 200, read.text
    assert _meta_aside(read.json()) == sent
    assert read.json()["meta"]["versionId"] == "1"


def test_sample_provide_document_bundle_is_accepted(api: Api) -> None:
    bundle = json.loads((SAMPLES / "bundle-iti65-minimal.json").read_text())
    answer = send(api, bundle)
    assert answer.status_code == 200, answer.text
    entries = answer.json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["201 Created"] * len(entries)
    binary = next(e for e in entries if e["response"]["location"].startswith("Binary/"))
    raw = api.client.get(f"/fhir/Binary/{binary['fullUrl'].rsplit('/', 1)[1]}", headers=api.ehr)
    assert raw.status_code == 200 and raw.content.startswith(b"<?xml")
