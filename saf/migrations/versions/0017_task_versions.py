"""Task versions and notes: the case state after each event, Task.note sealed

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("consult", schema=None) as batch_op:
        batch_op.add_column(sa.Column("note_sealed", sa.Text(), nullable=True))
    with op.batch_alter_table("consult_event", schema=None) as batch_op:
        batch_op.add_column(sa.Column("state", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("note_sealed", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("consult_event", schema=None) as batch_op:
        batch_op.drop_column("note_sealed")
        batch_op.drop_column("state")
    with op.batch_alter_table("consult", schema=None) as batch_op:
        batch_op.drop_column("note_sealed")
