from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from app.core.pagination import Page
from service.models import MAX_URL_CHARS, DeliveryStatus, WebhookDelivery, WebhookEndpoint, WebhookEvent


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=1,
        max_length=MAX_URL_CHARS,
        description="Where events are POSTed: an http(s) URL whose host resolves only to public addresses "
        "(the operator may allow others). Redirects are not followed.",
    )
    event_types: list[WebhookEvent] = Field(
        min_length=1,
        max_length=len(WebhookEvent),
        description="The events to send: `job.succeeded`, `job.failed`, `job.cancelled`, `checkpoint.created`.",
    )


class Webhook(BaseModel):
    id: UUID = Field(description="The webhook endpoint id.")
    url: str = Field(description="Where events are POSTed.")
    event_types: list[WebhookEvent] = Field(description="The events sent to it.")
    created_at: datetime = Field(description="When the endpoint was created.")
    updated_at: datetime = Field(description="Last change (a secret rotation, disabling, enabling).")
    enabled: bool = Field(
        default=True,
        description="False once its deliveries failed `GATT_WEBHOOK_DISABLE_AFTER` times in a row: nothing "
        "is recorded or sent for it until `POST /v1/webhooks/{id}/enable`.",
    )
    disabled_at: datetime | None = Field(default=None, description="When it was disabled.")
    disabled_reason: str | None = Field(default=None, description="Why: the failures and the last error.")

    @classmethod
    def from_row(cls, row: WebhookEndpoint) -> Webhook:
        return cls(
            id=row.id,
            url=row.url,
            event_types=[WebhookEvent(t) for t in row.event_types],
            created_at=row.created_at,
            updated_at=row.updated_at,
            enabled=row.disabled_at is None,
            disabled_at=row.disabled_at,
            disabled_reason=row.disabled_reason,
        )


class WebhookWithSecret(Webhook):
    secret: str = Field(
        description="The signing secret (`whsec_...`), shown only in this answer: verify each message's "
        "`webhook-signature` with it (Standard Webhooks)."
    )

    @classmethod
    def of(cls, row: WebhookEndpoint, secret: str) -> WebhookWithSecret:
        return cls(**Webhook.from_row(row).model_dump(), secret=secret)


class WebhookList(Page[Webhook]):
    """One page of the team's webhook endpoints, newest first."""


class Delivery(BaseModel):
    id: UUID = Field(description="The delivery id (one event to one endpoint).")
    event_id: str = Field(
        description="The `webhook-id` header: the same on every attempt; de-duplicate on it."
    )
    event_type: WebhookEvent = Field(
        description="`job.succeeded`, `job.failed`, `job.cancelled` or `checkpoint.created`."
    )
    status: DeliveryStatus = Field(
        description="`pending` (to be sent), `delivered` (a 2xx), `failed` (attempts used up)."
    )
    attempts: int = Field(description="Attempts made so far.")
    last_status_code: int | None = Field(
        description="HTTP status of the last attempt; null if none answered."
    )
    last_error: str | None = Field(description="Why the last attempt failed, if it did.")
    next_attempt_at: datetime | None = Field(
        description="When it is sent (again); null once delivered or failed."
    )
    delivered_at: datetime | None = Field(description="When the endpoint acknowledged it (a 2xx), if it did.")
    created_at: datetime = Field(description="When the event was recorded.")
    payload: dict = Field(description="The JSON body sent: `{type, timestamp, data}`.")

    @classmethod
    def from_row(cls, row: WebhookDelivery) -> Delivery:
        return cls(
            id=row.id,
            event_id=row.event_id,
            event_type=WebhookEvent(row.event_type),
            status=row.status,
            attempts=row.attempts,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            next_attempt_at=row.next_attempt_at,
            delivered_at=row.delivered_at,
            created_at=row.created_at,
            payload=row.payload,
        )


class DeliveryList(Page[Delivery]):
    """One page of an endpoint's deliveries, newest first."""
