"""instance_metadata: each instance's sealed DICOM JSON, for WADO-RS metadata from the index

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 16:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "instance_metadata",
        sa.Column("instance_id", sa.String(length=32), nullable=False),
        sa.Column("format", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instance.id"],
            name=op.f("fk_instance_metadata_instance_id_instance"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("instance_id", name=op.f("pk_instance_metadata")),
    )
    op.create_index(
        op.f("ix_instance_metadata_key_id"), "instance_metadata", ["key_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_instance_metadata_key_id"), table_name="instance_metadata")
    op.drop_table("instance_metadata")
