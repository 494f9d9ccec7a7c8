"""FHIR documents (DocumentReference/Binary bytes through ingest), MHD and transactions

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "fhir_binary",
        sa.Column("resource_id", sa.String(length=64), nullable=False),
        sa.Column("blob_id", sa.String(length=64), nullable=False),
        sa.Column("content_type", sa.String(length=255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha1", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["blob_id"], ["blob.id"], name=op.f("fk_fhir_binary_blob_id_blob")),
        sa.ForeignKeyConstraint(
            ["resource_id"],
            ["fhir_resource.id"],
            name=op.f("fk_fhir_binary_resource_id_fhir_resource"),
        ),
        sa.PrimaryKeyConstraint("resource_id", name=op.f("pk_fhir_binary")),
    )
    with op.batch_alter_table("fhir_binary", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_fhir_binary_blob_id"), ["blob_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("fhir_binary", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fhir_binary_blob_id"))
    op.drop_table("fhir_binary")
