from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Path, status

from app.auth.dependencies import CurrentTeam
from app.core.db import SessionDep, SettingsDep
from app.core.errors import AUTH_RESPONSES, ERROR_RESPONSES, error_response
from app.core.pagination import PageParamsDep
from app.webhooks import service
from app.webhooks.schemas import (
    Delivery,
    DeliveryList,
    Webhook,
    WebhookCreate,
    WebhookList,
    WebhookWithSecret,
)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

WebhookId = Annotated[UUID, Path(description="The webhook endpoint id.")]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookWithSecret,
    summary="Create a webhook endpoint",
    responses={
        **AUTH_RESPONSES,
        **error_response(
            422,
            "`invalid_webhook_url` (`param` `url`): not http(s), credentials in it, a host that does not "
            "resolve, or one with an address that is not public (private, loopback, link-local, "
            "reserved) and not on the operator's allowlist. `invalid_request`: a bad body (the URL longer "
            "than 2048 characters, an unknown event type). `quota_exceeded`: the team has its limit of "
            "endpoints (`details`: `quota` `webhooks`, `limit`, `used`). Nothing is stored.",
        ),
    },
)
def create_webhook(
    session: SessionDep, team: CurrentTeam, settings: SettingsDep, body: WebhookCreate
) -> WebhookWithSecret:
    """Send the team's `event_types` to `url`, signed per Standard Webhooks (`webhook-id`,
    `webhook-timestamp`, `webhook-signature`). The answer holds the signing secret (`whsec_...`); it is
    not shown again (rotate it to get a new one). Each message is delivered at least once: retried
    with exponential backoff on a non-2xx answer, a redirect or a timeout; `webhook-id` is the event
    id, the same on every attempt, to de-duplicate on."""
    row, secret = service.create(session, team, body.url, [t.value for t in body.event_types], settings)
    return WebhookWithSecret.of(row, secret)


@router.get("", response_model=WebhookList, summary="List webhook endpoints", responses=AUTH_RESPONSES)
def list_webhooks(session: SessionDep, team: CurrentTeam, page: PageParamsDep) -> WebhookList:
    """The team's webhook endpoints, newest first, a page at a time (`after`, `limit`). Secrets not included."""
    return WebhookList.of(service.list_page(session, team, page), Webhook.from_row)


@router.get(
    "/{webhook_id}", response_model=Webhook, summary="Get a webhook endpoint", responses=ERROR_RESPONSES
)
def get_webhook(session: SessionDep, team: CurrentTeam, webhook_id: WebhookId) -> Webhook:
    """A webhook endpoint (not its secret)."""
    return Webhook.from_row(service.get(session, team, webhook_id))


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a webhook endpoint",
    responses=ERROR_RESPONSES,
)
def delete_webhook(session: SessionDep, team: CurrentTeam, webhook_id: WebhookId) -> None:
    """Delete the endpoint and its delivery log; deliveries not yet made are dropped."""
    service.delete(session, team, webhook_id)


@router.post(
    "/{webhook_id}/rotate-secret",
    response_model=WebhookWithSecret,
    summary="Rotate a webhook endpoint's secret",
    responses=ERROR_RESPONSES,
)
def rotate_webhook_secret(
    session: SessionDep, team: CurrentTeam, settings: SettingsDep, webhook_id: WebhookId
) -> WebhookWithSecret:
    """A new signing secret, shown once. For 24 hours messages carry two signatures, one with the new
    secret and one with the old, so a receiver can switch over without rejecting any."""
    return WebhookWithSecret.of(*service.rotate_secret(session, team, webhook_id, settings))


@router.get(
    "/{webhook_id}/deliveries",
    response_model=DeliveryList,
    summary="A webhook endpoint's delivery log",
    responses=ERROR_RESPONSES,
)
def list_webhook_deliveries(
    session: SessionDep, team: CurrentTeam, webhook_id: WebhookId, page: PageParamsDep
) -> DeliveryList:
    """Every event recorded for the endpoint, newest first: its event id and type, the attempts made,
    the last status code or error, the next attempt's time, and when it was delivered."""
    return DeliveryList.of(service.deliveries(session, team, webhook_id, page), Delivery.from_row)


@router.post(
    "/{webhook_id}/enable",
    response_model=Webhook,
    summary="Enable a disabled webhook endpoint",
    responses=ERROR_RESPONSES,
)
def enable_webhook(session: SessionDep, team: CurrentTeam, webhook_id: WebhookId) -> Webhook:
    """An endpoint whose deliveries failed `GATT_WEBHOOK_DISABLE_AFTER` times in a row is disabled
    (`disabled_at`, `disabled_reason`): nothing is recorded or sent for it. Enabling it resets the
    count; events from then on are sent. Enabling an enabled endpoint changes nothing."""
    return Webhook.from_row(service.enable(session, team, webhook_id))


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/resend",
    response_model=Delivery,
    summary="Send a delivery again",
    responses={
        **ERROR_RESPONSES,
        **error_response(409, "`webhook_disabled`: the endpoint is disabled; enable it first."),
    },
)
def resend_webhook_delivery(
    session: SessionDep,
    team: CurrentTeam,
    webhook_id: WebhookId,
    delivery_id: Annotated[UUID, Path(description="The delivery id.")],
) -> Delivery:
    """A failed (or delivered) delivery is sent again: pending from now, a fresh set of attempts, the
    same event id and payload. A pending one is left as it is."""
    return Delivery.from_row(service.resend(session, team, webhook_id, delivery_id))
