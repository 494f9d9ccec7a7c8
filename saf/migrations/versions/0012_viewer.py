"""viewer: annotations, reply drafts and signed replies

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-27 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "annotation",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("case_id", sa.String(length=32), nullable=False),
        sa.Column("instance_id", sa.String(length=32), nullable=False),
        sa.Column("frame", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("points", sa.JSON(), nullable=False),
        sa.Column("text_sealed", sa.Text(), nullable=True),
        sa.Column("measurement", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["case_id"], ["consult.id"], name=op.f("fk_annotation_case_id_consult")
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instance.id"], name=op.f("fk_annotation_instance_id_instance")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotation")),
    )
    with op.batch_alter_table("annotation", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_annotation_case_id"), ["case_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_annotation_instance_id"), ["instance_id"], unique=False
        )

    op.create_table(
        "reply",
        sa.Column("case_id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("content_sealed", sa.Text(), nullable=True),
        sa.Column("urgent", sa.Boolean(), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("signed_by", sa.String(length=64), nullable=True),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("objects", sa.JSON(), nullable=True),
        sa.Column("pdf_blob_id", sa.String(length=64), nullable=True),
        sa.Column("diagnostic_report_id", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["case_id"], ["consult.id"], name=op.f("fk_reply_case_id_consult")),
        sa.ForeignKeyConstraint(
            ["pdf_blob_id"], ["blob.id"], name=op.f("fk_reply_pdf_blob_id_blob")
        ),
        sa.PrimaryKeyConstraint("case_id", name=op.f("pk_reply")),
    )

    op.create_table(
        "frame_header",
        sa.Column("instance_id", sa.String(length=32), nullable=False),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instance.id"], name=op.f("fk_frame_header_instance_id_instance")
        ),
        sa.PrimaryKeyConstraint("instance_id", name=op.f("pk_frame_header")),
    )

    op.create_table(
        "consult_message",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("case_id", sa.String(length=32), nullable=False),
        sa.Column("communication_id", sa.String(length=64), nullable=False),
        sa.Column("sender", sa.String(length=16), nullable=False),
        sa.Column("author", sa.String(length=64), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["case_id"], ["consult.id"], name=op.f("fk_consult_message_case_id_consult")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consult_message")),
    )
    with op.batch_alter_table("consult_message", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_consult_message_case_id"), ["case_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("consult_message", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_consult_message_case_id"))
    op.drop_table("consult_message")
    op.drop_table("frame_header")
    op.drop_table("reply")
    with op.batch_alter_table("annotation", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_annotation_instance_id"))
        batch_op.drop_index(batch_op.f("ix_annotation_case_id"))
    op.drop_table("annotation")
