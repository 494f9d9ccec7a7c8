"""Demo data: the routed demo case and the demo users, only in demo mode, idempotent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from saf.cases import worklist
from saf.demo import DEMO_CLINICIAN, DEMO_PASSWORD, DEMO_SPECIALIST, load_demo
from saf.hub import Hub
from saf.models import Case, Instance
from saf.settings import Settings
from saf.users import authenticate


@pytest.fixture
def demo_hub(settings: Settings) -> Iterator[Hub]:
    hub = Hub.open(settings.model_copy(update={"demo": True}), create=True)
    try:
        yield hub
    finally:
        hub.close()


def test_demo_case_is_on_the_demo_specialists_worklist(demo_hub: Hub) -> None:
    demo = load_demo(demo_hub, slices=3, size=32)

    assert [item.case_id for item in worklist(demo_hub, demo.worklist)] == [demo.case_id]
    specialist = authenticate(demo_hub, DEMO_SPECIALIST, DEMO_PASSWORD)
    clinician = authenticate(demo_hub, DEMO_CLINICIAN, DEMO_PASSWORD)
    assert specialist is not None and specialist.specialties == frozenset({demo.worklist})
    assert clinician is not None and clinician.clinic_id == demo.clinic_id


def test_loading_the_demo_again_adds_nothing(demo_hub: Hub) -> None:
    first = load_demo(demo_hub, slices=3, size=32)
    again = load_demo(demo_hub, slices=3, size=32)

    assert again == first
    with demo_hub.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Case)) == 1
        assert session.scalar(select(func.count()).select_from(Instance)) == 3


def test_demo_users_are_never_made_outside_demo_mode(hub: Hub) -> None:
    with pytest.raises(RuntimeError, match="demo mode"):
        load_demo(hub)
    assert authenticate(hub, DEMO_SPECIALIST, DEMO_PASSWORD) is None
