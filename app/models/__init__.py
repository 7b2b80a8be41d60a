"""ORM models: singular classes, plural tables. Importing this package registers every table on
`Base.metadata` (Alembic's autogenerate relies on that)."""

from app.models.api_key import ApiKey
from app.models.base import Base
from app.models.corpus import Corpus
from app.models.instruction_set import InstructionSet
from app.models.job import ACTIVE_JOB_STATUSES, Checkpoint, Job, JobEvent, JobMetric, JobStage, JobStatus
from app.models.team import Team

__all__ = [
    "ACTIVE_JOB_STATUSES",
    "ApiKey",
    "Base",
    "Checkpoint",
    "Corpus",
    "InstructionSet",
    "Job",
    "JobEvent",
    "JobMetric",
    "JobStage",
    "JobStatus",
    "Team",
]
