"""forwarding: a queue row per (destination, study) and the instances each one acknowledged

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 13:50:37.785423
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "forward_job",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("destination", sa.String(length=255), nullable=False),
        sa.Column("study_pk", sa.String(length=32), nullable=False),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("token_env", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("study_stable_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("instances_total", sa.Integer(), nullable=False),
        sa.Column("instances_sent", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=256), nullable=True),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_pk"], ["study.id"], name=op.f("fk_forward_job_study_pk_study")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forward_job")),
        sa.UniqueConstraint("destination", "study_pk", name="uq_forward_job_destination_study_pk"),
    )
    with op.batch_alter_table("forward_job", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_forward_job_destination"), ["destination"], unique=False
        )
        batch_op.create_index("ix_forward_job_due", ["state", "next_attempt_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_forward_job_study_pk"), ["study_pk"], unique=False)

    op.create_table(
        "forward_ack",
        sa.Column("job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("instance_id", sa.String(length=32), nullable=False),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instance.id"], name=op.f("fk_forward_ack_instance_id_instance")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["forward_job.id"], name=op.f("fk_forward_ack_job_id_forward_job")
        ),
        sa.PrimaryKeyConstraint("job_id", "instance_id", name=op.f("pk_forward_ack")),
    )


def downgrade() -> None:
    op.drop_table("forward_ack")
    with op.batch_alter_table("forward_job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_forward_job_study_pk"))
        batch_op.drop_index("ix_forward_job_due")
        batch_op.drop_index(batch_op.f("ix_forward_job_destination"))

    op.drop_table("forward_job")
