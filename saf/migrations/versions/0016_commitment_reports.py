"""storage commitment reports as forwarding jobs: forward_job.study_pk optional, report column

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05 16:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("forward_job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("report", sa.Text(), nullable=True))
        batch_op.alter_column("study_pk", existing_type=sa.String(length=32), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM forward_job WHERE study_pk IS NULL")
    with op.batch_alter_table("forward_job", schema=None) as batch_op:
        batch_op.alter_column("study_pk", existing_type=sa.String(length=32), nullable=False)
        batch_op.drop_column("report")
