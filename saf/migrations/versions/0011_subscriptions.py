"""FHIR Subscriptions (R4 backport, rest-hook) and their delivery state

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "subscription",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("clinic_id", sa.String(length=32), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("topic", sa.String(length=255), nullable=False),
        sa.Column("statuses", sa.String(length=255), nullable=False),
        sa.Column("endpoint", sa.String(length=1024), nullable=False),
        sa.Column("content", sa.String(length=16), nullable=False),
        sa.Column("content_sealed", sa.Text(), nullable=False),
        sa.Column("end_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("events_since_start", sa.BigInteger(), nullable=False),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=256), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["clinic_id"], ["clinic.id"], name=op.f("fk_subscription_clinic_id_clinic")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscription")),
    )
    with op.batch_alter_table("subscription", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_subscription_clinic_id"), ["clinic_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_subscription_status"), ["status"], unique=False)

    op.create_table(
        "subscription_notification",
        sa.Column("id", _BIGINT, nullable=False),
        sa.Column("subscription_id", sa.String(length=64), nullable=False),
        sa.Column("event_number", sa.BigInteger(), nullable=False),
        sa.Column("case_event_id", _BIGINT, nullable=False),
        sa.Column("case_id", sa.String(length=32), nullable=False),
        sa.Column("to_status", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["case_event_id"],
            ["consult_event.id"],
            name=op.f("fk_subscription_notification_case_event_id_consult_event"),
        ),
        sa.ForeignKeyConstraint(
            ["case_id"],
            ["consult.id"],
            name=op.f("fk_subscription_notification_case_id_consult"),
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscription.id"],
            name=op.f("fk_subscription_notification_subscription_id_subscription"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscription_notification")),
        sa.UniqueConstraint(
            "subscription_id",
            "case_event_id",
            name="uq_subscription_notification_subscription_id_case_event_id",
        ),
    )
    with op.batch_alter_table("subscription_notification", schema=None) as batch_op:
        batch_op.create_index(
            "ix_subscription_notification_due", ["state", "next_attempt_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_subscription_notification_subscription_id"),
            ["subscription_id"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("subscription_notification", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_subscription_notification_subscription_id"))
        batch_op.drop_index("ix_subscription_notification_due")
    op.drop_table("subscription_notification")
    with op.batch_alter_table("subscription", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_subscription_status"))
        batch_op.drop_index(batch_op.f("ix_subscription_clinic_id"))
    op.drop_table("subscription")
