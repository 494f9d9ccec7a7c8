"""The audit trail: one append-only record per access to PHI, login and DICOM association.

`record` writes in its own short transaction, so a refused or failed request is
recorded too. There is deliberately no function that changes or removes a record
(and database triggers refuse UPDATE and DELETE on the table).

The write is one autocommitted ``INSERT ... RETURNING`` on its own connection (no ORM
unit of work, no separate BEGIN and COMMIT): every read request pays for it, and on
PostgreSQL each saved round trip is a measurable share of a request. It is still
durable when `record` returns, before the answer it records is sent; nothing is
batched or deferred.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, Protocol

from sqlalchemy import Connection, Engine, insert

from saf.hub import Hub
from saf.identity import Principal
from saf.models import AuditRecord

log = logging.getLogger(__name__)

Action = Literal["C", "R", "U", "D", "E"]
"""FHIR AuditEvent.action: create, read, update, delete, execute."""

SUCCESS = 0
MINOR_FAILURE = 4
"""The request was refused (bad credentials, not allowed, not found)."""
SERIOUS_FAILURE = 8
MAJOR_FAILURE = 12

EVENTS: dict[str, Action] = {
    "login": "E",
    "logout": "E",
    "token": "E",
    "read": "R",
    "search": "E",
    "create": "C",
    "update": "U",
    "delete": "D",
    "export": "R",
    "dicom-association": "E",
    "dicom-store": "C",
    "dicom-find": "E",
    "dicom-retrieve": "R",
    "dicom-commitment": "E",
    "config": "U",
}
"""Event names and the FHIR action each implies (BALP: search and query are E)."""


@dataclass(frozen=True)
class Actor:
    """Who acted, for a record made before a Principal exists (a failed login, an AE)."""

    kind: Literal["user", "client", "ae", "system", "anonymous"]
    id: str | None
    name: str | None
    address: str | None = None


def actor_of(principal: Principal) -> Actor:
    """The audit actor for an authenticated caller."""
    return Actor(principal.kind, principal.id, principal.name, principal.address or None)


def _values(
    event: str,
    who: Principal | Actor,
    *,
    outcome: int,
    entity_type: str | None,
    entity_id: str | None,
    clinic_id: str | None,
    patient_pk: str | None,
    detail: str | None,
) -> dict[str, Any]:
    action = EVENTS.get(event)
    if action is None:
        raise ValueError(f"unknown audit event {event!r} (add it to saf.audit.EVENTS)")
    actor = actor_of(who) if isinstance(who, Principal) else who
    return {
        "event": event,
        "action": action,
        "outcome": outcome,
        "actor_kind": actor.kind,
        "actor_id": actor.id,
        "actor_name": (actor.name or None) and actor.name[:64],
        "clinic_id": clinic_id,
        "source_address": actor.address,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "patient_pk": patient_pk,
        "detail": detail[:256] if detail else None,
    }


def record(
    hub: Hub,
    event: str,
    who: Principal | Actor,
    *,
    outcome: int = SUCCESS,
    entity_type: str | None = None,
    entity_id: str | None = None,
    clinic_id: str | None = None,
    patient_pk: str | None = None,
    detail: str | None = None,
    at: datetime | None = None,
) -> int:
    """Append one audit record and return its id. `detail` must hold ids and counts only."""
    values = _values(
        event,
        who,
        outcome=outcome,
        entity_type=entity_type,
        entity_id=entity_id,
        clinic_id=clinic_id,
        patient_pk=patient_pk,
        detail=detail,
    )
    if at is not None:
        values["at"] = at
    with autocommit_connection(hub.engine) as conn:
        return int(conn.execute(_INSERT, values).scalar_one())


_INSERT: Final = insert(AuditRecord).returning(AuditRecord.id)
_autocommit_engines: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
_autocommit_lock = threading.Lock()


def autocommit_engine(engine: Engine) -> Engine:
    """`engine` with each statement committed on its own (same pool, no BEGIN/COMMIT
    round trips): for a single INSERT that must be durable at once, or a single SELECT."""
    with _autocommit_lock:
        found = _autocommit_engines.get(engine)
        if found is None:
            found = engine.execution_options(isolation_level="AUTOCOMMIT")
            _autocommit_engines[engine] = found
        return found


_held: ContextVar[Connection | None] = ContextVar("saf_autocommit_connection", default=None)


@contextmanager
def autocommit_connection(engine: Engine) -> Iterator[Connection]:
    """An autocommit connection to `engine`'s database: the one an enclosing
    `one_connection` holds in this context, else one checked out of the pool for the block."""
    held = _held.get()
    if held is not None and held.engine.pool is engine.pool:
        yield held
        return
    with autocommit_engine(engine).connect() as conn:
        yield conn


@contextmanager
def one_connection(engine: Engine) -> Iterator[None]:
    """Run every `autocommit_connection` block inside (a read's token check, its select,
    its audit insert) on one pooled connection: one checkout, not one per statement. Each
    statement still commits on its own, before the next one starts."""
    if _held.get() is not None:
        yield
        return
    with autocommit_engine(engine).connect() as conn:
        token = _held.set(conn)
        try:
            yield
        finally:
            _held.reset(token)


class Owned(Protocol):
    """Something a clinic owns about one patient (a Study row, a stored FHIR resource)."""

    @property
    def clinic_id(self) -> str | None: ...

    @property
    def patient_pk(self) -> str | None: ...


def record_access(
    hub: Hub,
    event: str,
    who: Principal,
    entity_type: str,
    entity_id: str | None,
    *,
    owner: Owned | None = None,
    outcome: int = SUCCESS,
    detail: str | None = None,
) -> int:
    """Record an access to one object by a caller: the clinic and patient come from the
    object touched (`owner`) when it was found, else the caller's clinic is named."""
    return record(
        hub,
        event,
        who,
        outcome=outcome,
        entity_type=entity_type,
        entity_id=entity_id[:64] if entity_id else None,
        clinic_id=owner.clinic_id if owner is not None else who.clinic_id,
        patient_pk=owner.patient_pk if owner is not None else None,
        detail=detail,
    )


@dataclass(frozen=True)
class Access:
    """One access of many recorded together (`record_accesses`): a Bundle's entries."""

    event: str
    entity_type: str
    entity_id: str | None
    owner: Owned | None = None
    detail: str | None = None


def record_accesses(hub: Hub, who: Principal, accesses: list[Access]) -> None:
    """Record many accesses by one caller in one statement, durable before it returns (a
    transaction Bundle of 100 entries costs one round trip, not 100); each row is what
    `record_access` would write."""
    if not accesses:
        return
    rows = [
        _values(
            a.event,
            who,
            outcome=SUCCESS,
            entity_type=a.entity_type,
            entity_id=a.entity_id[:64] if a.entity_id else None,
            clinic_id=a.owner.clinic_id if a.owner is not None else who.clinic_id,
            patient_pk=a.owner.patient_pk if a.owner is not None else None,
            detail=a.detail,
        )
        for a in accesses
    ]
    with autocommit_engine(hub.engine).begin() as conn:
        conn.execute(insert(AuditRecord), rows)
