"""FHIR Subscriptions (R4 backport, topic "case status changed"): who is told what, and
the delivery of notifications through the outbox.

The shape follows the HL7 "Subscriptions R5 Backport" IG for R4:

- ``Subscription.criteria`` is the topic canonical `TOPIC`; an optional filter rides in the
  ``_criteria`` extension `FILTER_EXT` as ``Task?status=<code>[,<code>...]`` (only
  ``status`` of ``Task``: the case status, the one state; anything else is refused with
  the FHIRPath of the offending value);
- ``channel.type`` is ``rest-hook`` (the only channel), ``channel.endpoint`` an https URL
  (http only with SAF_SUBSCRIPTION_ALLOW_HTTP or SAF_DEMO), ``channel.header`` extra
  headers sent with every POST (e.g. ``Authorization: Bearer ...``; the resource is kept
  sealed because of them), ``channel.payload`` ``application/fhir+json`` with the content
  extension `CONTENT_EXT` ``empty``, ``id-only`` (the default) or ``full-resource``;
  no payload at all means ``empty``.

Lifecycle: a created (or updated) Subscription is stored ``requested`` and the hub POSTs
a handshake at once (a ``history`` Bundle whose first entry is the SubscriptionStatus
Parameters with ``type=handshake``): 2xx makes it ``active``, anything else ``error``
(with the reason in ``Subscription.error``); the client fixes it and PUTs it again. A
client may set ``off`` itself (no handshake, no events).

Events: every case status change writes an outbox event (saf.cases) in the same
transaction, and `on_case_status` (run from the outbox, so a crash loses nothing) records
one `SubscriptionNotification` per matching subscription of the case's clinic (a clinic
is told only of its own cases), numbered per subscription. Recording is idempotent: each
notification names the case event (`CaseEvent`) it reports, unique per subscription, so
an outbox event handled twice records nothing new.

Delivery (`deliver_due`, looped by `Notifier` in ``saf worker``, like the Forwarder, not
a Celery task per notification: the schedule lives in the table, with leases and SKIP
LOCKED, so any number of workers share it and a broker outage changes nothing): one
notification at a time per subscription, in event order; a failure retries after an
exponential backoff with equal jitter up to SAF_SUBSCRIPTION_MAX_ATTEMPTS, and marks the
subscription ``error`` until a delivery succeeds again (then ``active``). A notification
that ran out of attempts is ``failed`` and the next one goes. Clinics behind NAT poll
``Task?_lastUpdated=gt...`` instead; ``$status`` tells a clinic where its subscription is.

Every delivery is audited (event ``export``, the Task and patient ids, no content).
Heartbeats and ``$events`` are not implemented.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session

from saf import audit, tenancy
from saf.cases import TaskStatus
from saf.crypto import open_value, reseal_value, seal_value, value_key_id
from saf.db import transaction
from saf.hub import Hub
from saf.identity import Principal
from saf.models import Case, CaseEvent, Subscription, SubscriptionNotification, utcnow

log = logging.getLogger(__name__)

TOPIC: Final = "http://saf.example.org/fhir/SubscriptionTopic/case-status"
"""The one topic: a case (Task) changed status."""

BACKPORT: Final = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
FILTER_EXT: Final = f"{BACKPORT}/backport-filter-criteria"
CONTENT_EXT: Final = f"{BACKPORT}/backport-payload-content"
STATUS_PROFILE: Final = f"{BACKPORT}/backport-subscription-status-r4"
SUBSCRIPTION_PROFILE: Final = f"{BACKPORT}/backport-subscription"

CONTENTS: Final = ("empty", "id-only", "full-resource")
_HEADER_NAME: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
"""An HTTP header field name (RFC 9110 token)."""
PAYLOAD_TYPES: Final = ("application/fhir+json", "application/json")
LIVE: Final = ("active", "error")
"""Statuses under which events are recorded and delivered."""

TaskRenderer = Callable[[Hub, Session, Principal, Case], dict[str, Any]]
"""Makes the Task resource of a case as a principal sees it (fhir_api.tasks.task_of; given
by the composition root, since saf does not import the FHIR package)."""


class SubscriptionError(Exception):
    """A refused Subscription request: HTTP status, diagnostics and FHIRPath location."""

    def __init__(self, status: int, diagnostics: str, expression: str | None = None) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics
        self.expression = expression


@dataclass(frozen=True)
class Spec:
    """What a Subscription resource asks for, validated."""

    statuses: tuple[str, ...]
    endpoint: str
    content: str
    headers: tuple[tuple[str, str], ...]
    end_at: datetime | None
    off: bool


# --------------------------------------------------------------------------- validation


def parse_spec(hub: Hub, content: dict[str, Any]) -> Spec:
    """Check the parts of a (structurally valid) Subscription the hub acts on."""
    if content.get("criteria") != TOPIC:
        raise SubscriptionError(
            400,
            f"criteria must be the topic {TOPIC} (the only topic served), "
            f"not {content.get('criteria')!r}",
            "Subscription.criteria",
        )
    statuses: list[str] = []
    for i, ext in enumerate((content.get("_criteria") or {}).get("extension") or []):
        if ext.get("url") != FILTER_EXT:
            continue
        statuses += _filter_statuses(
            str(ext.get("valueString") or ""), f"Subscription.criteria.extension[{i}]"
        )
    channel = content.get("channel") or {}
    if channel.get("type") != "rest-hook":
        raise SubscriptionError(
            400,
            f"channel.type {channel.get('type')!r} is not served; use rest-hook",
            "Subscription.channel.type",
        )
    endpoint = _check_endpoint(hub, str(channel.get("endpoint") or ""))
    payload = channel.get("payload")
    kind = "empty"
    if payload is not None:
        if payload not in PAYLOAD_TYPES:
            raise SubscriptionError(
                400,
                f"channel.payload {payload!r}: only application/fhir+json is sent",
                "Subscription.channel.payload",
            )
        kind = "id-only"
        for i, ext in enumerate((channel.get("_payload") or {}).get("extension") or []):
            if ext.get("url") == CONTENT_EXT:
                kind = str(ext.get("valueCode"))
                if kind not in CONTENTS:
                    raise SubscriptionError(
                        400,
                        f"payload content {kind!r} is not one of {', '.join(CONTENTS)}",
                        f"Subscription.channel.payload.extension[{i}]",
                    )
    headers: list[tuple[str, str]] = []
    for i, line in enumerate(channel.get("header") or []):
        name, sep, value = str(line).partition(":")
        if not sep or not _HEADER_NAME.match(name.strip()) or any(c in str(line) for c in "\r\n"):
            raise SubscriptionError(
                400, "a channel.header must read 'Name: value'", f"Subscription.channel.header[{i}]"
            )
        headers.append((name.strip(), value.strip()))
    end_at = None
    if content.get("end"):
        try:
            end_at = datetime.fromisoformat(str(content["end"]).replace("Z", "+00:00"))
        except ValueError:
            raise SubscriptionError(400, "end must be an instant", "Subscription.end") from None
        if end_at.tzinfo is None:
            end_at = end_at.replace(tzinfo=UTC)  # a date (or a time without zone): UTC
    status = content.get("status")
    if status not in ("requested", "active", "off", None):
        raise SubscriptionError(
            400,
            f"status {status!r} is set by the server; send requested (or off to pause)",
            "Subscription.status",
        )
    unique = tuple(dict.fromkeys(statuses))
    return Spec(unique, endpoint, kind, tuple(headers), end_at, status == "off")


def _filter_statuses(text: str, where: str) -> list[str]:
    resource, _, query = text.partition("?")
    if resource != "Task" or not query:
        raise SubscriptionError(400, f"filter {text!r}: use Task?status=<code>[,<code>...]", where)
    found: list[str] = []
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name != "status":
            raise SubscriptionError(
                400, f"filter parameter {name!r} is not supported (only status)", where
            )
        for code in value.split(","):
            if code not in {s.value for s in TaskStatus}:
                raise SubscriptionError(400, f"{code!r} is not a Task status", where)
            found.append(code)
    return found


def _check_endpoint(hub: Hub, endpoint: str) -> str:
    parts = urlsplit(endpoint)
    allow_http = hub.settings.subscription_allow_http or hub.settings.demo
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes or not parts.hostname:
        raise SubscriptionError(
            400,
            f"channel.endpoint must be an absolute {' or '.join(schemes)} URL"
            + ("" if allow_http else " (http needs SAF_SUBSCRIPTION_ALLOW_HTTP)"),
            "Subscription.channel.endpoint",
        )
    if len(endpoint) > 1024:
        raise SubscriptionError(
            400, "channel.endpoint is longer than 1024 characters", "Subscription.channel.endpoint"
        )
    if parts.username or parts.password:
        raise SubscriptionError(
            400,
            "channel.endpoint must not carry credentials; use channel.header",
            "Subscription.channel.endpoint",
        )
    return endpoint


# --------------------------------------------------------------------------- CRUD


def _context(subscription_id: str) -> str:
    return f"subscription/{subscription_id}"


def _clinic(principal: Principal) -> str:
    if principal.clinic_id is None or not tenancy.acts_for_clinic(principal):
        raise SubscriptionError(
            403, "only a clinic (its EHR client or clinician) can subscribe to its cases"
        )
    return principal.clinic_id


def create(hub: Hub, principal: Principal, content: dict[str, Any]) -> dict[str, Any]:
    """Store a new subscription of the caller's clinic, then handshake (unless it is off);
    returns the resource as stored, with the status the handshake left."""
    clinic_id = _clinic(principal)
    spec = parse_spec(hub, content)
    row = Subscription(
        clinic_id=clinic_id,
        created_by=principal.id[:64],
        status="off" if spec.off else "requested",
        topic=TOPIC,
        content_sealed="",
    )
    _apply(hub, row, spec, content)
    with transaction(hub.sessions) as session:
        session.add(row)
        session.flush()
        row.content_sealed = _seal(hub, row.id, content)
        subscription_id = row.id
    if not spec.off:
        handshake(hub, subscription_id)
    return read(hub, principal, subscription_id)


def update_subscription(
    hub: Hub, principal: Principal, subscription_id: str, content: dict[str, Any]
) -> dict[str, Any]:
    """Replace a subscription (a new version) and handshake again unless it is now off."""
    spec = parse_spec(hub, content)
    with transaction(hub.sessions) as session:
        row = _get(session, principal, subscription_id, for_update=True)
        content = _unmasked(_content(hub, row), content)
        spec = parse_spec(hub, content)
        _apply(hub, row, spec, content)
        row.version_id += 1
        row.status = "off" if spec.off else "requested"
        row.last_error = None
        row.updated_at = utcnow()
        row.content_sealed = _seal(hub, row.id, content)
    if not spec.off:
        handshake(hub, subscription_id)
    return read(hub, principal, subscription_id)


def delete(hub: Hub, principal: Principal, subscription_id: str) -> None:
    """Turn a subscription off for good (kept for the audit trail; reads answer 410)."""
    with transaction(hub.sessions) as session:
        row = _get(session, principal, subscription_id, for_update=True)
        row.status = "off"
        row.deleted_at = row.updated_at = utcnow()
        row.version_id += 1


def _apply(hub: Hub, row: Subscription, spec: Spec, content: dict[str, Any]) -> None:
    row.statuses = ",".join(spec.statuses)
    row.endpoint = spec.endpoint
    row.content = spec.content
    row.end_at = spec.end_at


def _seal(hub: Hub, subscription_id: str, content: dict[str, Any]) -> str:
    clean = {k: v for k, v in content.items() if k not in ("id", "meta", "status", "error")}
    return seal_value(hub.keyring, json.dumps(clean), context=_context(subscription_id))


def _get(
    session: Session, principal: Principal, subscription_id: str, *, for_update: bool = False
) -> Subscription:
    query = tenancy.visible_subscriptions(principal).where(Subscription.id == subscription_id)
    if for_update:
        query = query.with_for_update()
    row = session.scalar(query)
    if row is None:
        raise SubscriptionError(404, f"Subscription/{subscription_id} is not known")
    if row.deleted_at is not None:
        raise SubscriptionError(410, f"Subscription/{subscription_id} was deleted")
    return row


def reseal(hub: Hub, new_key_id: str) -> int:
    """Reseal every subscription's content under the active key (saf.keys.rotate); how many."""
    keyring = hub.keyring
    resealed = 0
    with transaction(hub.sessions) as session:
        for row in session.scalars(select(Subscription)):
            if row.content_sealed and value_key_id(row.content_sealed) != new_key_id:
                row.content_sealed = reseal_value(
                    keyring, row.content_sealed, context=_context(row.id)
                )
                resealed += 1
    return resealed


def read(hub: Hub, principal: Principal, subscription_id: str) -> dict[str, Any]:
    """The Subscription resource (the client's content plus server-managed elements)."""
    with hub.sessions() as session:
        return _resource(hub, _get(session, principal, subscription_id))


def search(
    hub: Hub,
    principal: Principal,
    *,
    status: list[str] | None = None,
    ids: list[str] | None = None,
    count: int = 50,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """The caller's clinic's subscriptions (not deleted), oldest first; and the total."""
    query = tenancy.visible_subscriptions(principal).where(Subscription.deleted_at.is_(None))
    if status:
        query = query.where(Subscription.status.in_(status))
    if ids:
        query = query.where(Subscription.id.in_(ids))
    with hub.sessions() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.scalars(
            query.order_by(Subscription.created_at, Subscription.id).limit(count).offset(offset)
        ).all()
        return [_resource(hub, r) for r in rows], int(total)


MASKED: Final = "***"
"""What a read shows instead of a channel.header value: headers carry the endpoint's
credentials, which are write-only (a PUT that sends a header back as ``Name: ***`` keeps
the stored value)."""


def _content(hub: Hub, row: Subscription) -> dict[str, Any]:
    content: dict[str, Any] = json.loads(
        open_value(hub.keyring, row.content_sealed, context=_context(row.id))
    )
    return content


def _masked(content: dict[str, Any]) -> dict[str, Any]:
    channel = content.get("channel")
    if not isinstance(channel, dict) or not channel.get("header"):
        return content
    lines = [f"{str(line).partition(':')[0].strip()}: {MASKED}" for line in channel["header"]]
    return {**content, "channel": {**channel, "header": lines}}


def _unmasked(stored: dict[str, Any], content: dict[str, Any]) -> dict[str, Any]:
    """`content` with each ``Name: ***`` header line given back its stored value."""
    channel = content.get("channel")
    if not isinstance(channel, dict) or not channel.get("header"):
        return content
    known = {}
    for line in (stored.get("channel") or {}).get("header") or []:
        name, _, value = str(line).partition(":")
        known[name.strip().lower()] = f"{name.strip()}: {value.strip()}"
    lines = []
    for line in channel["header"]:
        name, _, value = str(line).partition(":")
        keep = value.strip() == MASKED and name.strip().lower() in known
        lines.append(known[name.strip().lower()] if keep else line)
    return {**content, "channel": {**channel, "header": lines}}


def _resource(hub: Hub, row: Subscription) -> dict[str, Any]:
    content = _masked(_content(hub, row))
    resource: dict[str, Any] = {
        "resourceType": "Subscription",
        "id": row.id,
        "meta": {
            "versionId": str(row.version_id),
            "lastUpdated": _instant(row.updated_at),
            "profile": [SUBSCRIPTION_PROFILE],
        },
        **{k: v for k, v in content.items() if k != "resourceType"},
        "status": row.status,
    }
    if row.last_error:
        resource["error"] = row.last_error
    return resource


def status_of(hub: Hub, principal: Principal, subscription_id: str, base: str) -> dict[str, Any]:
    """The SubscriptionStatus (``$status``): a searchset Bundle holding its Parameters."""
    with hub.sessions() as session:
        row = _get(session, principal, subscription_id)
        parameters = _status_parameters(row, "query-status", base, int(row.events_since_start))
    if row.last_error:
        parameters["parameter"].append({"name": "error", "valueCodeableConcept": {
            "text": row.last_error}})  # fmt: skip
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 1,
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": parameters,
                "search": {"mode": "match"},
            }
        ],
    }


def _status_parameters(row: Subscription, kind: str, base: str, events: int) -> dict[str, Any]:
    subscription = _ref(base, "Subscription", row.id)
    return {
        "resourceType": "Parameters",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": subscription}},
            {"name": "topic", "valueCanonical": TOPIC},
            {"name": "status", "valueCode": row.status},
            {"name": "type", "valueCode": kind},
            {"name": "events-since-subscription-start", "valueString": str(events)},
        ],
    }  # fmt: skip


def _ref(base: str, resource_type: str, resource_id: str) -> str:
    return f"{base}/{resource_type}/{resource_id}" if base else f"{resource_type}/{resource_id}"


def _instant(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _base(hub: Hub) -> str:
    return (hub.settings.public_url or "").rstrip("/") + "/fhir" if hub.settings.public_url else ""


# --------------------------------------------------------------------------- HTTP out


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A notification goes to the endpoint the clinic registered, nowhere else."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post(hub: Hub, row: Subscription, bundle: dict[str, Any]) -> str | None:
    """POST a notification Bundle; None on 2xx, else why it failed (no PHI)."""
    content = json.loads(open_value(hub.keyring, row.content_sealed, context=_context(row.id)))
    headers = {"Content-Type": "application/fhir+json", "User-Agent": "saf-subscriptions"}
    for line in (content.get("channel") or {}).get("header") or []:
        name, _, value = str(line).partition(":")
        headers[name.strip()] = value.strip()
    request = urllib.request.Request(
        row.endpoint, data=json.dumps(bundle).encode(), headers=headers, method="POST"
    )
    try:
        with _OPENER.open(request, timeout=hub.settings.subscription_timeout_seconds) as response:
            code = int(response.status)
    except urllib.error.HTTPError as exc:
        code = int(exc.code)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"endpoint unreachable: {type(reason).__name__}: {str(reason)[:150]}"
    if 200 <= code < 300:
        return None
    return f"endpoint answered HTTP {code}"


def handshake(hub: Hub, subscription_id: str) -> bool:
    """POST the handshake; the subscription becomes active on 2xx, error otherwise."""
    with hub.sessions() as session:
        row = session.get_one(Subscription, subscription_id)
        session.expunge(row)
    bundle = _bundle([_status_entry(row, "handshake", _base(hub), int(row.events_since_start))])
    error = _post(hub, row, bundle)
    now = utcnow()
    with transaction(hub.sessions) as session:
        session.execute(
            update(Subscription)
            .where(Subscription.id == subscription_id, Subscription.status == "requested")
            .values(
                status="error" if error else "active",
                last_error=f"handshake failed: {error}" if error else None,
                confirmed_at=None if error else now,
                updated_at=now,
            )
        )
    log.info("subscription %s handshake: %s", subscription_id, error or "ok")
    return error is None


def _bundle(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "history",
        "timestamp": _instant(utcnow()),
        "entry": entries,
    }


def _status_entry(row: Subscription, kind: str, base: str, events: int) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": _status_parameters(row, kind, base, events),
        "request": {"method": "GET", "url": f"Subscription/{row.id}/$status"},
        "response": {"status": "200"},
    }


# --------------------------------------------------------------------------- events


def on_case_status(hub: Hub, payload: dict[str, Any]) -> int:
    """Queue a notification for each active subscription that a case status change
    concerns; returns how many were queued."""
    case_id = str(payload["case_id"])
    before, after = payload.get("from"), str(payload["to"])
    now = utcnow()
    queued = 0
    # A concurrent worker recording the same change raises IntegrityError (unique per
    # subscription and case event): the outbox retries, and then finds nothing new.
    with transaction(hub.sessions) as session:
        case = session.get(Case, case_id)
        if case is None:
            return 0
        subs = session.scalars(
            select(Subscription).where(
                Subscription.clinic_id == case.clinic_id,
                Subscription.status.in_(LIVE),
                Subscription.deleted_at.is_(None),
                Subscription.confirmed_at.is_not(None),
            )
        ).all()
        for sub in subs:
            if sub.statuses and after not in sub.statuses.split(","):
                continue
            if sub.end_at is not None and sub.end_at < now:
                continue
            event_id = _unreported_event(session, sub, case_id, before, after)
            if event_id is None:
                continue  # already recorded (a redelivered outbox event) or too old
            number = session.execute(
                update(Subscription)
                .where(Subscription.id == sub.id)
                .values(events_since_start=Subscription.events_since_start + 1)
                .returning(Subscription.events_since_start)
            ).scalar_one()
            session.add(
                SubscriptionNotification(
                    subscription_id=sub.id,
                    event_number=int(number),
                    case_event_id=event_id,
                    case_id=case_id,
                    to_status=after,
                    next_attempt_at=now,
                )
            )
            queued += 1
    return queued


def _unreported_event(
    session: Session, sub: Subscription, case_id: str, before: Any, after: str
) -> int | None:
    """The oldest change of the case from `before` to `after`, made since the subscription
    began, that this subscription has no notification of yet."""
    n = SubscriptionNotification
    mine = CaseEvent.id
    from_clause = CaseEvent.from_status.is_(None) if before is None else (
        CaseEvent.from_status == str(before))  # fmt: skip
    found = session.scalar(
        select(CaseEvent.id)
        .where(
            CaseEvent.case_id == case_id,
            from_clause,
            CaseEvent.to_status == after,
            CaseEvent.at >= sub.created_at,
            ~exists(select(n.id).where(n.subscription_id == sub.id, n.case_event_id == mine)),
        )
        .order_by(CaseEvent.id)
        .limit(1)
    )  # fmt: skip
    return int(found) if found is not None else None


# --------------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class Delivery:
    """The outcome of one delivery attempt."""

    notification_id: int
    subscription_id: str
    event_number: int
    error: str | None
    state: str
    """delivered, pending (will retry) or failed (out of attempts)."""


def retry_delay(hub: Hub, attempts: int, rng: random.Random | None = None) -> float:
    """Seconds before attempt ``attempts + 1``: exponential from
    SAF_SUBSCRIPTION_RETRY_BASE_SECONDS, capped, with equal jitter (half fixed, half random)
    so notifications that failed together do not all come back at once."""
    s = hub.settings
    exp = min(s.subscription_retry_max_seconds,
              s.subscription_retry_base_seconds * 2 ** max(0, attempts - 1))  # fmt: skip
    return float(exp / 2 + (rng or random).uniform(0, exp / 2))


def _lease(hub: Hub) -> timedelta:
    return timedelta(seconds=max(60.0, 3 * hub.settings.subscription_timeout_seconds))


def claim_due(hub: Hub, *, limit: int = 50) -> list[int]:
    """Take the due head notification of each live subscription (the oldest not yet
    delivered or failed: events go out in order) and mark it sending; their ids."""
    n = SubscriptionNotification
    now = utcnow()
    head = (
        select(n.subscription_id, func.min(n.id).label("first"))
        .where(n.state.in_(("pending", "sending")))
        .group_by(n.subscription_id)
        .subquery()
    )
    with transaction(hub.sessions) as session:
        ids = list(
            session.scalars(
                select(n.id)
                .join(head, head.c.first == n.id)
                .join(Subscription, Subscription.id == n.subscription_id)
                .where(
                    Subscription.status.in_(LIVE),
                    Subscription.deleted_at.is_(None),
                    or_(
                        and_(n.state == "pending", n.next_attempt_at <= now),
                        and_(n.state == "sending", n.updated_at < now - _lease(hub)),
                    ),
                )
                .order_by(n.next_attempt_at, n.id)
                .limit(limit)
                .with_for_update(of=n, skip_locked=True)
            )
        )
        if ids:
            session.execute(update(n).where(n.id.in_(ids)).values(state="sending", updated_at=now))
    return [int(i) for i in ids]


def deliver(hub: Hub, notification_id: int, render_task: TaskRenderer) -> Delivery:
    """Send one claimed notification and record the outcome."""
    with hub.sessions() as session:
        note = session.get_one(SubscriptionNotification, notification_id)
        sub = session.get_one(Subscription, note.subscription_id)
        case = session.get_one(Case, note.case_id)
        base = _base(hub)
        owner = Principal(
            kind="client", id=sub.created_by, name="subscription", role="system",
            clinic_id=sub.clinic_id,
        )  # fmt: skip
        entries = [_status_entry(sub, "event-notification", base, int(sub.events_since_start))]
        event: dict[str, Any] = {
            "name": "notification-event",
            "part": [
                {"name": "event-number", "valueString": str(note.event_number)},
                {"name": "timestamp", "valueInstant": _instant(note.created_at)},
            ],
        }
        task_url = _ref(base, "Task", case.id)
        if sub.content != "empty":
            event["part"].append({"name": "focus", "valueReference": {"reference": task_url}})
            entry: dict[str, Any] = {
                "fullUrl": task_url,
                "request": {"method": "PUT", "url": f"Task/{case.id}"},
                "response": {"status": "200"},
            }
            if sub.content == "full-resource":
                entry["resource"] = render_task(hub, session, owner, case)
            entries.append(entry)
        entries[0]["resource"]["parameter"].append(event)
        patient_pk, clinic_id = case.patient_pk, case.clinic_id
        session.expunge(sub)
    error = _post(hub, sub, _bundle(entries))
    state = _record_outcome(hub, notification_id, sub.id, error)
    if error is None and sub.content != "empty":
        audit.record(
            hub,
            "export",
            audit.Actor("system", "saf", "subscriptions"),
            entity_type="Task",
            entity_id=note.case_id,
            clinic_id=clinic_id,
            patient_pk=patient_pk,
            detail=f"subscription {sub.id} event {note.event_number} ({sub.content})",
        )
    return Delivery(notification_id, sub.id, int(note.event_number), error, state)


def _record_outcome(hub: Hub, notification_id: int, subscription_id: str, error: str | None) -> str:
    n = SubscriptionNotification
    now = utcnow()
    with transaction(hub.sessions) as session:
        note = session.get_one(n, notification_id, with_for_update=True)
        if note.state != "sending":
            return note.state  # someone else finished it (our lease ran out)
        note.attempts += 1
        note.updated_at = now
        if error is None:
            note.state, note.delivered_at, note.last_error = "delivered", now, None
            session.execute(
                update(Subscription)
                .where(Subscription.id == subscription_id, Subscription.status == "error")
                .values(status="active", last_error=None, updated_at=now)
            )
            return note.state
        note.last_error = error[:256]
        if note.attempts >= hub.settings.subscription_max_attempts:
            note.state = "failed"
        else:
            note.state = "pending"
            note.next_attempt_at = now + timedelta(seconds=retry_delay(hub, note.attempts))
        session.execute(
            update(Subscription)
            .where(Subscription.id == subscription_id, Subscription.status.in_(LIVE))
            .values(
                status="error",
                last_error=f"event {note.event_number}, attempt {note.attempts}: {error}"[:256],
                updated_at=now,
            )
        )
        return note.state


def deliver_due(hub: Hub, render_task: TaskRenderer, *, limit: int = 50) -> list[Delivery]:
    """Claim and deliver every due notification once (one per subscription), in turn."""
    return [deliver(hub, i, render_task) for i in claim_due(hub, limit=limit)]


class Notifier:
    """Delivers due notifications every SAF_SUBSCRIPTION_POLL_INTERVAL seconds, in
    ``saf worker`` next to the Forwarder: a few at a time on a small thread pool (each
    from another subscription, by claim_due), so one slow endpoint holds one thread, and
    claiming no more than there are threads, so none waits past its lease."""

    def __init__(self, hub: Hub, render_task: TaskRenderer, *, threads: int = 4) -> None:
        self._hub = hub
        self._render_task = render_task
        self._threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="saf-notify")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="saf-notifier", daemon=True)

    def start(self) -> None:
        """Start delivering in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the deliveries in flight (a cut one is redone after its lease)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.wait(self._hub.settings.subscription_poll_interval):
            try:
                claimed = claim_due(self._hub, limit=self._threads)
                list(self._pool.map(self._deliver, claimed))
            except Exception as exc:  # database away: try again next tick
                log.warning("subscription delivery failed, will retry: %s", type(exc).__name__)

    def _deliver(self, notification_id: int) -> Delivery | None:
        try:
            return deliver(self._hub, notification_id, self._render_task)
        except Exception:
            # Left `sending`: taken again when its lease runs out.
            log.exception("notification %d failed unexpectedly; retried after its lease",
                          notification_id)  # fmt: skip
            return None
