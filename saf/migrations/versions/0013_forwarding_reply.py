"""forwarding: de-identification, reply forwarding, TLS destinations

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-27 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("forward_job", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("scope", sa.String(length=80), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("series_uids", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("deidentify", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("tls_sha256", sa.String(length=64), nullable=True))
        batch_op.drop_constraint("uq_forward_job_destination_study_pk", type_="unique")
        batch_op.create_unique_constraint(
            "uq_forward_job_destination_study_pk_scope", ["destination", "study_pk", "scope"]
        )
    with op.batch_alter_table("forward_ack", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sent_sop_instance_uid", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("forward_ack", schema=None) as batch_op:
        batch_op.drop_column("sent_sop_instance_uid")
    op.execute(
        "DELETE FROM forward_ack WHERE job_id IN (SELECT id FROM forward_job WHERE scope <> '')"
    )
    op.execute("DELETE FROM forward_job WHERE scope <> ''")
    with op.batch_alter_table("forward_job", schema=None) as batch_op:
        batch_op.drop_constraint("uq_forward_job_destination_study_pk_scope", type_="unique")
        batch_op.create_unique_constraint(
            "uq_forward_job_destination_study_pk", ["destination", "study_pk"]
        )
        batch_op.drop_column("tls_sha256")
        batch_op.drop_column("deidentify")
        batch_op.drop_column("series_uids")
        batch_op.drop_column("scope")
