"""study index by clinic and date, for QIDO/C-FIND date ranges and paged study lists

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-27 17:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_study_clinic_date",
        "study",
        ["clinic_id", "study_date", "study_time", "study_instance_uid", "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_study_clinic_date", table_name="study")
