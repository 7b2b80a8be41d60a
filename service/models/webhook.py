"""A team's webhook endpoints and the deliveries of events to them (the outbox and its log)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base, Timestamps, UUIDPrimaryKey
from service.models.job import _str_enum

MAX_URL_CHARS = 2048


class WebhookEvent(enum.StrEnum):
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    CHECKPOINT_CREATED = "checkpoint.created"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # to be sent (again) at next_attempt_at
    DELIVERED = "delivered"  # a 2xx answer
    FAILED = "failed"  # every attempt used up


class WebhookEndpoint(UUIDPrimaryKey, Timestamps, Base):
    """Where a team wants to hear of some events. Deleted for real (with its deliveries): nothing
    refers to an endpoint but its own log, and a deleted endpoint must receive nothing more."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index(None, "team_id", "created_at", "id"),)

    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(MAX_URL_CHARS))
    # WebhookEvent values.
    event_types: Mapped[list[Any]]
    # `whsec_<base64>`, sealed as `fernet:<token>` when the operator set GATT_SECRET_KEYS
    # (service/secrets.py): signing needs the secret itself (HMAC), unlike an API key's hash.
    secret: Mapped[str] = mapped_column(String(512))
    # After a rotation the old secret also signs, until previous_secret_expires_at, so a receiver
    # can switch over without dropping messages (Standard Webhooks: several signatures per header).
    previous_secret: Mapped[str | None] = mapped_column(String(512))
    previous_secret_expires_at: Mapped[datetime | None]
    # Deliveries that failed for good since the last one delivered; at GATT_WEBHOOK_DISABLE_AFTER the
    # endpoint is disabled: nothing more is recorded for it until the team enables it again.
    consecutive_failures: Mapped[int | None] = mapped_column(Integer)
    disabled_at: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)


class WebhookDelivery(UUIDPrimaryKey, Timestamps, Base):
    """One event for one endpoint: recorded in the transaction that caused it (the outbox), then
    sent by `webhooks.deliver` until a 2xx answer or its attempts are used up."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index(None, "endpoint_id", "created_at", "id"),
        # The reaper's query: pending deliveries overdue (their message lost).
        Index(None, "status", "next_attempt_at"),
        # An event is recorded once per endpoint however often its cause is written again.
        UniqueConstraint("endpoint_id", "event_id"),
    )

    endpoint_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    # The `webhook-id` header: the same on every attempt, for the receiver's de-duplication.
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(32))
    # The JSON body {type, timestamp, data}, fixed when recorded.
    payload: Mapped[dict[str, Any]]
    status: Mapped[DeliveryStatus] = mapped_column(
        _str_enum(DeliveryStatus, "delivery_status"),
        default=DeliveryStatus.PENDING,
        server_default=DeliveryStatus.PENDING.value,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
