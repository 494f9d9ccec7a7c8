"""The audit trail: records are written, and the database refuses to change or delete them."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.exc import DBAPIError

from saf import audit
from saf.hub import Hub
from saf.identity import Principal
from saf.models import AuditRecord


def test_record_and_read_back(hub: Hub) -> None:
    who = Principal(kind="user", id="u1", name="dr.who", role="specialist", address="10.0.0.9")
    rid = audit.record(hub, "read", who, entity_type="Case", entity_id="c1", clinic_id="k1")
    with hub.sessions() as session:
        row = session.get(AuditRecord, rid)
        assert row is not None
        assert (row.event, row.action, row.outcome) == ("read", "R", audit.SUCCESS)
        assert (row.actor_kind, row.actor_name, row.source_address) == (
            "user",
            "dr.who",
            "10.0.0.9",
        )


def test_unknown_event_is_refused(hub: Hub) -> None:
    with pytest.raises(ValueError, match="unknown audit event"):
        audit.record(hub, "peek", audit.Actor("anonymous", None, None))


@pytest.mark.parametrize("statement", ["update", "delete"])
def test_records_are_append_only_in_the_database(hub: Hub, statement: str) -> None:
    audit.record(hub, "login", audit.Actor("anonymous", None, "mallory"), outcome=4)
    stmt = update(AuditRecord).values(outcome=0) if statement == "update" else delete(AuditRecord)
    with pytest.raises(DBAPIError, match="append-only"), hub.sessions() as session:
        session.execute(stmt)
        session.commit()
    with hub.sessions() as session:
        assert session.scalars(select(AuditRecord.outcome)).all() == [4]


def test_one_connection_shares_a_connection_and_each_record_commits_at_once(hub: Hub) -> None:
    who = Principal(kind="user", id="u1", name="dr.who", role="specialist")
    with audit.autocommit_connection(hub.engine) as a, audit.autocommit_connection(hub.engine) as b:
        assert a is not b  # outside one_connection: a checkout per block
    with audit.one_connection(hub.engine):
        with audit.autocommit_connection(hub.engine) as first:
            pass
        with audit.autocommit_connection(hub.engine) as second:
            assert second is first
        rid = audit.record(hub, "read", who, entity_type="Patient", entity_id="p1")
        # durable before the block ends: another connection of the pool sees it already
        with hub.engine.connect() as other:
            assert other is not first
            found = other.scalar(select(AuditRecord.id).where(AuditRecord.id == rid))
        assert found == rid
