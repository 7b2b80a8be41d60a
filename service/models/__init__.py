"""ORM models: singular classes, plural tables. Importing this package registers every table on
`Base.metadata` (Alembic's autogenerate relies on that)."""

from service.models.api_key import ApiKey
from service.models.base import Base
from service.models.corpus import Corpus
from service.models.instruction_set import InstructionSet
from service.models.job import ACTIVE_JOB_STATUSES, Checkpoint, Job, JobEvent, JobMetric, JobStage, JobStatus
from service.models.team import Team
from service.models.webhook import (
    MAX_URL_CHARS,
    DeliveryStatus,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)

__all__ = [
    "ACTIVE_JOB_STATUSES",
    "MAX_URL_CHARS",
    "ApiKey",
    "Base",
    "Checkpoint",
    "Corpus",
    "DeliveryStatus",
    "InstructionSet",
    "Job",
    "JobEvent",
    "JobMetric",
    "JobStage",
    "JobStatus",
    "Team",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookEvent",
]
