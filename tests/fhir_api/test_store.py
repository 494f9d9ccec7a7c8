"""saf.fhir_store directly: sealing, key rotation, tenancy of the store's reads."""

from __future__ import annotations

from sqlalchemy import select

from saf import fhir_store
from saf.crypto import value_key_id
from saf.hub import Hub
from saf.identity import SYSTEM, Principal
from saf.keys import rotate
from saf.models import FhirVersion
from saf.routing import default_rules
from tests.factories import make_clinic


def _ehr(hub: Hub, clinic: str) -> Principal:
    sender = make_clinic(hub, clinic, clinic.upper().replace(" ", "_"))
    return Principal(kind="client", id="e", name="e", role="system", clinic_id=sender.clinic_id)


def test_reseal_moves_every_version_to_the_new_key(hub: Hub) -> None:
    ehr = _ehr(hub, "Clinic A")
    rules = default_rules()
    first = fhir_store.create(hub, ehr, {"resourceType": "Practitioner", "active": True}, rules)
    changed = dict(first.content or {}, active=False)
    fhir_store.update(hub, ehr, changed, rules)
    fhir_store.delete(hub, ehr, "Practitioner", first.id)
    new_key = hub.keyring.rotate()

    assert fhir_store.reseal(hub, new_key) == 2
    assert fhir_store.reseal(hub, new_key) == 0
    with hub.sessions() as session:
        tokens = session.scalars(select(FhirVersion.content_sealed)).all()
    assert {value_key_id(t) for t in tokens if t} == {new_key}
    old = fhir_store.vread(hub, ehr, "Practitioner", first.id, 1)
    assert old.content is not None and old.content["active"] is True


def test_saf_keys_rotate_reseals_fhir_content(hub: Hub) -> None:
    ehr = _ehr(hub, "Clinic A")
    fhir_store.create(hub, ehr, {"resourceType": "Practitioner", "active": True}, default_rules())
    report = rotate(hub)
    assert report.fields_resealed >= 1
    with hub.sessions() as session:
        tokens = session.scalars(select(FhirVersion.content_sealed)).all()
    assert {value_key_id(t) for t in tokens if t} == {report.new_key_id}


def test_the_hub_sees_all_and_other_clinics_nothing(hub: Hub) -> None:
    a, b = _ehr(hub, "Clinic A"), _ehr(hub, "Clinic B")
    made = fhir_store.create(hub, a, {"resourceType": "Organization", "name": "A"}, default_rules())
    assert fhir_store.read(hub, SYSTEM, "Organization", made.id).content == made.content
    found, total = fhir_store.search(hub, b, "Organization", fhir_store.Search())
    assert (found, total) == ([], 0)
