"""saf.subscriptions: handshake, events from the outbox, delivery with retries, tenancy;
against a real HTTP receiver, on both databases."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from fhir_api.tasks import task_of
from saf import subscriptions
from saf.cases import Referral, TaskStatus, claim, on_referral, transition
from saf.hub import Hub
from saf.identity import Principal
from saf.models import OutboxEvent, Subscription, SubscriptionNotification, utcnow
from saf.pipeline import handle_event
from saf.routing import parse_rules
from saf.settings import Settings
from saf.subscriptions import (
    CONTENT_EXT,
    FILTER_EXT,
    TOPIC,
    SubscriptionError,
    deliver_due,
    on_case_status,
)
from tests.factories import make_clinic
from tests.saf.hook_receiver import Receiver

RULES = parse_rules('[[rule]]\nname = "default"\nworklist = "general-radiology"\n')


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        dicom_port=0,
        subscription_allow_http=True,
        subscription_timeout_seconds=2,
        subscription_retry_base_seconds=0.01,
        subscription_retry_max_seconds=0.02,
        subscription_max_attempts=3,
    )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def ehr(clinic_id: str, name: str = "ehr") -> Principal:
    return Principal(kind="client", id=f"id-{name}", name=name, role="system", clinic_id=clinic_id)


def subscription(
    endpoint: str, *, status_filter: str | None = None, content: str = "full-resource"
) -> dict[str, Any]:
    sub: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "tell the clinic when its consults change",
        "criteria": TOPIC,
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": CONTENT_EXT, "valueCode": content}]},
            "header": ["Authorization: Bearer clinic-secret"],
        },
    }
    if status_filter:
        sub["_criteria"] = {"extension": [{"url": FILTER_EXT, "valueString": status_filter}]}
    return sub


def run_outbox(hub: Hub) -> int:
    """Handle every case.status outbox event the way the worker does (the real pipeline)."""
    with hub.sessions() as session:
        rows = session.execute(
            select(OutboxEvent.topic, OutboxEvent.payload)
            .where(OutboxEvent.topic == "case.status")
            .order_by(OutboxEvent.id)
        ).all()
    return sum(int(handle_event(hub, t, p, RULES) or 0) for t, p in rows)  # type: ignore[call-overload]


def new_case(hub: Hub, clinic_id: str, ref: str = "REF-1") -> str:
    return on_referral(
        hub,
        Referral(clinic_id=clinic_id, patient_id="P1", service_request_id=f"urn:x|{ref}"),
        RULES,
    )


def complete(hub: Hub, case_id: str) -> None:
    claim(hub, case_id, "dr.who")
    transition(hub, case_id, TaskStatus.IN_PROGRESS, actor="dr.who")
    transition(hub, case_id, TaskStatus.COMPLETED, actor="dr.who")


def test_handshake_then_a_completed_case_is_notified(hub: Hub, receiver: Receiver) -> None:
    clinic = make_clinic(hub).clinic_id
    created = subscriptions.create(
        hub, ehr(clinic), subscription(receiver.url, status_filter="Task?status=completed")
    )
    assert created["status"] == "active"
    [hello] = receiver.received
    assert hello.kind == "handshake"
    assert hello.body["type"] == "history"
    assert hello.headers["Authorization"] == "Bearer clinic-secret"
    case_id = new_case(hub, clinic)
    complete(hub, case_id)
    assert run_outbox(hub) == 1  # only the change to completed passes the filter
    assert run_outbox(hub) == 0  # the outbox handled again records nothing new
    [done] = deliver_due(hub, task_of)
    assert done.error is None and done.state == "delivered" and done.event_number == 1
    [note] = receiver.of_kind("event-notification")
    status, task_entry = note.body["entry"]
    params = {p["name"]: p for p in status["resource"]["parameter"]}
    assert params["events-since-subscription-start"]["valueString"] == "1"
    event = {p["name"]: p for p in params["notification-event"]["part"]}
    assert event["event-number"]["valueString"] == "1"
    assert event["focus"]["valueReference"]["reference"].endswith(f"Task/{case_id}")
    assert task_entry["resource"]["resourceType"] == "Task"
    assert task_entry["resource"]["status"] == "completed"
    assert deliver_due(hub, task_of) == []  # nothing left


def test_every_change_without_a_filter_and_id_only(hub: Hub, receiver: Receiver) -> None:
    clinic = make_clinic(hub).clinic_id
    subscriptions.create(hub, ehr(clinic), subscription(receiver.url, content="id-only"))
    case_id = new_case(hub, clinic)
    complete(hub, case_id)  # requested (creation), accepted, in-progress, completed
    assert run_outbox(hub) == 4
    numbers = []
    while batch := deliver_due(hub, task_of):
        numbers += [d.event_number for d in batch]
    assert numbers == [1, 2, 3, 4]  # in order, one at a time per subscription
    notes = receiver.of_kind("event-notification")
    assert len(notes) == 4
    assert all("resource" not in n.body["entry"][1] for n in notes)  # id-only: a reference
    assert notes[-1].body["entry"][1]["fullUrl"].endswith(f"Task/{case_id}")


def test_receiver_down_then_up_is_delivered_after_retry(hub: Hub, receiver: Receiver) -> None:
    clinic = make_clinic(hub).clinic_id
    sub = subscriptions.create(
        hub, ehr(clinic), subscription(receiver.url, status_filter="Task?status=accepted")
    )
    case_id = new_case(hub, clinic)
    receiver.stop()
    claim(hub, case_id, "dr.who")
    run_outbox(hub)
    [failed] = deliver_due(hub, task_of)
    assert failed.error and "unreachable" in failed.error and failed.state == "pending"
    bundle = subscriptions.status_of(hub, ehr(clinic), sub["id"], "")
    params = {p["name"]: p for p in bundle["entry"][0]["resource"]["parameter"]}
    assert params["status"]["valueCode"] == "error"
    assert "unreachable" in params["error"]["valueCodeableConcept"]["text"]
    receiver.start()  # same port
    _due_now(hub)
    [delivered] = deliver_due(hub, task_of)
    assert delivered.state == "delivered" and delivered.error is None
    assert len(receiver.of_kind("event-notification")) == 1
    assert subscriptions.read(hub, ehr(clinic), sub["id"])["status"] == "active"


def test_attempts_run_out_then_the_next_event_goes(hub: Hub, receiver: Receiver) -> None:
    clinic = make_clinic(hub).clinic_id
    subscriptions.create(hub, ehr(clinic), subscription(receiver.url))
    receiver.status = 500
    new_case(hub, clinic)
    run_outbox(hub)
    states = []
    for _ in range(3):  # subscription_max_attempts
        _due_now(hub)
        [d] = deliver_due(hub, task_of)
        states.append(d.state)
        assert d.error == "endpoint answered HTTP 500"
    assert states == ["pending", "pending", "failed"]
    with hub.sessions() as session:
        assert session.scalars(select(SubscriptionNotification.state)).all() == ["failed"]


def test_another_clinics_case_is_not_notified(hub: Hub, receiver: Receiver) -> None:
    a = make_clinic(hub, "Clinic A", "MOD_A").clinic_id
    b = make_clinic(hub, "Clinic B", "MOD_B").clinic_id
    subscriptions.create(hub, ehr(a), subscription(receiver.url))
    complete(hub, new_case(hub, b))
    assert run_outbox(hub) == 0
    assert deliver_due(hub, task_of) == []
    assert receiver.of_kind("event-notification") == []
    # and clinic B cannot see clinic A's subscription
    with pytest.raises(SubscriptionError) as refused:
        [sub_id] = [s["id"] for s in subscriptions.search(hub, ehr(a))[0]]
        subscriptions.read(hub, ehr(b), sub_id)
    assert refused.value.status == 404
    assert subscriptions.search(hub, ehr(b)) == ([], 0)


def test_failed_handshake_is_error_and_records_no_events(hub: Hub, receiver: Receiver) -> None:
    clinic = make_clinic(hub).clinic_id
    receiver.status = 401
    created = subscriptions.create(hub, ehr(clinic), subscription(receiver.url))
    assert created["status"] == "error"
    assert created["error"] == "handshake failed: endpoint answered HTTP 401"
    new_case(hub, clinic)
    assert run_outbox(hub) == 0


def test_off_and_deleted_subscriptions_hear_nothing(hub: Hub, receiver: Receiver) -> None:
    clinic = make_clinic(hub).clinic_id
    sub = subscriptions.create(hub, ehr(clinic), subscription(receiver.url))
    subscriptions.delete(hub, ehr(clinic), sub["id"])
    paused = subscriptions.create(hub, ehr(clinic), {**subscription(receiver.url), "status": "off"})
    assert paused["status"] == "off"
    assert len(receiver.of_kind("handshake")) == 1  # none for the paused one
    new_case(hub, clinic)
    assert run_outbox(hub) == 0
    with pytest.raises(SubscriptionError) as gone:
        subscriptions.read(hub, ehr(clinic), sub["id"])
    assert gone.value.status == 410


@pytest.mark.parametrize(
    ("change", "expression"),
    [
        ({"criteria": "Task?status=completed"}, "Subscription.criteria"),
        (
            {"_criteria": {"extension": [{"url": FILTER_EXT, "valueString": "Task?owner=x"}]}},
            "Subscription.criteria.extension[0]",
        ),
        (
            {"_criteria": {"extension": [{"url": FILTER_EXT, "valueString": "Task?status=done"}]}},
            "Subscription.criteria.extension[0]",
        ),
        ({"channel": {"type": "websocket"}}, "Subscription.channel.type"),
        (
            {"channel": {"type": "rest-hook", "endpoint": "ftp://x/y"}},
            "Subscription.channel.endpoint",
        ),
        (
            {"channel": {"type": "rest-hook", "endpoint": "https://u:p@x/y"}},
            "Subscription.channel.endpoint",
        ),
        (
            {"channel": {"type": "rest-hook", "endpoint": "https://x/y", "header": ["no colon"]}},
            "Subscription.channel.header[0]",
        ),
        (
            {
                "channel": {
                    "type": "rest-hook",
                    "endpoint": "https://x/y",
                    "payload": "application/fhir+xml",
                }
            },
            "Subscription.channel.payload",
        ),
        (
            {"channel": {"type": "rest-hook", "endpoint": "https://x/y", "header": ["A b: c"]}},
            "Subscription.channel.header[0]",
        ),
        (
            {"channel": {"type": "rest-hook", "endpoint": "https://x/" + "y" * 1100}},
            "Subscription.channel.endpoint",
        ),
        ({"end": "tomorrow"}, "Subscription.end"),
        ({"end": "2026-12-31"}, None),  # a date: that day, UTC
        ({"status": "active"}, None),  # allowed: treated as requested
        ({"status": "error"}, "Subscription.status"),
    ],
)
def test_bad_subscriptions_are_refused_with_a_location(
    hub: Hub, change: dict[str, Any], expression: str | None
) -> None:
    content = {**subscription("https://clinic.example.org/hook"), **change}
    if expression is None:
        subscriptions.parse_spec(hub, content)
        return
    with pytest.raises(SubscriptionError) as refused:
        subscriptions.parse_spec(hub, content)
    assert refused.value.status == 400 and refused.value.expression == expression


def test_http_needs_the_setting(tmp_path: Path) -> None:
    strict = Hub.open(Settings(data_dir=tmp_path / "d", dicom_port=0), create=True)
    try:
        with pytest.raises(SubscriptionError, match="SAF_SUBSCRIPTION_ALLOW_HTTP"):
            subscriptions.parse_spec(strict, subscription("http://127.0.0.1:9/hook"))
        subscriptions.parse_spec(strict, subscription("https://127.0.0.1:9/hook"))
    finally:
        strict.close()


def test_only_clinics_subscribe(hub: Hub) -> None:
    make_clinic(hub)
    specialist = Principal(
        kind="user", id="s", name="s", role="specialist", specialties=frozenset({"x"})
    )
    with pytest.raises(SubscriptionError) as refused:
        subscriptions.create(hub, specialist, subscription("https://x.example.org/hook"))
    assert refused.value.status == 403


def test_retry_delay_grows_with_jitter(hub: Hub) -> None:
    rng = random.Random(7)
    base = hub.settings.subscription_retry_base_seconds
    cap = hub.settings.subscription_retry_max_seconds
    for attempts in range(1, 8):
        exp = min(cap, base * 2 ** (attempts - 1))
        delay = subscriptions.retry_delay(hub, attempts, rng)
        assert exp / 2 <= delay <= exp


def test_an_unknown_case_queues_nothing(hub: Hub) -> None:
    """on_case_status for a case id that does not exist (a stale event): nothing."""
    assert (
        on_case_status(hub, {"case_id": "nope", "from": None, "to": "requested", "actor": "x"}) == 0
    )


def _due_now(hub: Hub) -> None:
    with hub.sessions.begin() as session:
        session.execute(
            update(SubscriptionNotification)
            .where(SubscriptionNotification.state == "pending")
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )


def _sub_row(hub: Hub, subscription_id: str) -> Subscription:
    with hub.sessions() as session:
        return session.get_one(Subscription, subscription_id)


def test_key_rotation_reseals_the_subscription(hub: Hub, receiver: Receiver) -> None:
    from saf.crypto import value_key_id
    from saf.keys import rotate

    clinic = make_clinic(hub).clinic_id
    sub = subscriptions.create(hub, ehr(clinic), subscription(receiver.url))
    report = rotate(hub)
    assert value_key_id(_sub_row(hub, sub["id"]).content_sealed) == report.new_key_id
    # the credential still opens under the new key: the next handshake carries it
    subscriptions.handshake(hub, sub["id"])
    assert receiver.received[-1].headers["Authorization"] == "Bearer clinic-secret"


def test_an_ended_subscription_hears_nothing(hub: Hub, receiver: Receiver) -> None:
    clinic = make_clinic(hub).clinic_id
    subscriptions.create(hub, ehr(clinic), {**subscription(receiver.url), "end": "2020-01-01"})
    new_case(hub, clinic)
    assert run_outbox(hub) == 0
