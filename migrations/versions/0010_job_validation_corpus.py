"""jobs.validation_corpus_id: held-out dialogues for the evaluation, apart from the training corpus

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 15:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("validation_corpus_id", sa.Uuid(), nullable=True))
    op.create_foreign_key(
        op.f("fk_jobs_validation_corpus_id_corpora"),
        "jobs",
        "corpora",
        ["validation_corpus_id"],
        ["id"],
        ondelete="RESTRICT",
    )
    op.create_index(op.f("ix_jobs_validation_corpus_id"), "jobs", ["validation_corpus_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_jobs_validation_corpus_id"), table_name="jobs")
    op.drop_constraint(op.f("fk_jobs_validation_corpus_id_corpora"), "jobs", type_="foreignkey")
    op.drop_column("jobs", "validation_corpus_id")
