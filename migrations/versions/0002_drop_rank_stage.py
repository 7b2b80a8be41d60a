"""jobs.stage: no 'rank' (ranking is interleaved with sampling turn by turn; no job ever had it)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 02:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _stages(values: str) -> None:
    op.drop_constraint(op.f("ck_jobs_job_stage"), "jobs", type_="check")
    op.create_check_constraint(op.f("ck_jobs_job_stage"), "jobs", f"stage IN ({values})")


def upgrade() -> None:
    _stages("'synthesize', 'sample', 'train', 'evaluate'")


def downgrade() -> None:
    _stages("'synthesize', 'sample', 'rank', 'train', 'evaluate'")
