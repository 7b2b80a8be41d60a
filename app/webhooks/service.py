from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from app.core import quotas
from app.core.errors import Conflict, NotFound, Unprocessable
from service import webhooks as delivery
from service.models import Team, WebhookDelivery, WebhookEndpoint
from service.pagination import PageParams, PageResult
from service.repositories import webhooks as repository
from service.secrets import secret_box
from service.settings import Settings

# After a rotation the old secret signs too for this long, so receivers can switch without a gap.
OLD_SECRET_GRACE = timedelta(hours=24)


def create(
    session: Session, team: Team, url: str, event_types: list[str], settings: Settings
) -> tuple[WebhookEndpoint, str]:
    """Check the URL (SSRF rules, service/webhooks.py) and the team's quota, then store the endpoint
    with a new secret (sealed, with GATT_SECRET_KEYS); the row and the secret, shown once. Nothing is
    stored when either check fails."""
    try:
        delivery.check_url(url, settings.webhook_allow_hosts)
    except delivery.UrlRefused as e:
        raise Unprocessable(
            f"The webhook URL is refused: {e}.", code="invalid_webhook_url", param="url"
        ) from e
    quotas.check_webhook(session, team, settings)
    unique = list(dict.fromkeys(event_types))
    secret = delivery.new_secret()
    box = secret_box(tuple(settings.secret_keys))
    return repository.add(session, team.id, url, unique, box.seal(secret)), secret


def get(session: Session, team: Team, id: uuid.UUID, *, for_update: bool = False) -> WebhookEndpoint:
    row = repository.get(session, team.id, id, for_update=for_update)
    if row is None:
        raise NotFound("No such webhook.", param="webhook_id")
    return row


def list_page(session: Session, team: Team, params: PageParams) -> PageResult[WebhookEndpoint]:
    return repository.page(session, team.id, params)


def delete(session: Session, team: Team, id: uuid.UUID) -> None:
    repository.remove(session, get(session, team, id, for_update=True))


def rotate_secret(
    session: Session, team: Team, id: uuid.UUID, settings: Settings
) -> tuple[WebhookEndpoint, str]:
    row = get(session, team, id, for_update=True)
    secret = delivery.new_secret()
    sealed = secret_box(tuple(settings.secret_keys)).seal(secret)
    repository.rotate(session, row, sealed, datetime.now(UTC) + OLD_SECRET_GRACE)
    return row, secret


def deliveries(
    session: Session, team: Team, id: uuid.UUID, params: PageParams
) -> PageResult[WebhookDelivery]:
    return repository.deliveries(session, get(session, team, id).id, params)


def enable(session: Session, team: Team, id: uuid.UUID) -> WebhookEndpoint:
    """Send to the endpoint again: events from now on are recorded for it (those while it was
    disabled are not; resend a failed delivery to have it sent)."""
    row = get(session, team, id, for_update=True)
    repository.enable(session, row)
    return row


def resend(session: Session, team: Team, id: uuid.UUID, delivery_id: uuid.UUID) -> WebhookDelivery:
    """A delivery sent again from now with a fresh set of attempts and its event id (receivers
    de-duplicate on it); one still pending is left as it is."""
    endpoint = get(session, team, id, for_update=True)
    if endpoint.disabled_at is not None:
        raise Conflict(
            "The webhook endpoint is disabled; enable it first.", code="webhook_disabled", param="webhook_id"
        )
    row = repository.delivery(session, endpoint.id, delivery_id)
    if row is None:
        raise NotFound("No such delivery of this webhook.", param="delivery_id")
    if row.status.value != "pending":
        repository.resend(session, row)
    return row
