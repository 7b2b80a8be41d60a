"""Webhook URLs, signatures and delivery attempts: what the API (at create time) and the workers (at
every attempt) share. The SQL is in `service/repositories/webhooks.py`.

Webhook URLs are the first URLs a tenant gives the service, and the service then sends requests to
them from inside its network: left alone, `http://169.254.169.254/...` or `http://localhost:5432`
would let a tenant probe (or reach) what only the service can. So (`check_url`):

- only `http`/`https`, no user info, a host name or address;
- the host is resolved and refused if ANY of its addresses is not public (private, loopback,
  link-local, reserved, multicast, unspecified, shared, IPv4-mapped forms of these), unless the
  operator's `GATT_WEBHOOK_ALLOW_HOSTS` names the host or a network holding every address;
- this is checked when the endpoint is created (422 `invalid_webhook_url`) and again before every
  attempt, and the attempt connects to the address just checked (the URL's host goes in `Host` and
  in TLS's SNI and certificate check), so a DNS answer that changes in between (rebinding) is never
  followed;
- redirects are not followed (a 3xx is a failed attempt), every phase has a timeout, and at most
  `MAX_RESPONSE_BYTES` of the answer are read.

Messages follow the Standard Webhooks spec (`standardwebhooks`): `webhook-id` (the event id, the same
on every attempt), `webhook-timestamp`, `webhook-signature` (`v1,<base64 HMAC-SHA256>`, two of them
for a day after a secret rotation).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import secrets
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from service.db import session_scope
from service.repositories import webhooks as repository
from service.secrets import secret_box
from service.settings import Settings

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 4096
MAX_ERROR_CHARS = 500
MAX_BACKOFF = timedelta(hours=6)
# How long one attempt holds its delivery (see repository.claim): well past any attempt's timeouts.
ATTEMPT_HOLD = timedelta(minutes=2)
SECRET_PREFIX = "whsec_"
USER_AGENT = "gatt-webhooks/1"


class UrlRefused(ValueError):
    """Not a URL the service may send to; the message says why."""


def new_secret() -> str:
    """`whsec_` + base64 of 32 random bytes (the Standard Webhooks form)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class Target:
    url: str  # as given
    scheme: str
    host: str  # the name to send in Host and SNI
    port: int
    path: str  # path and query
    address: str  # the checked address to connect to


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local)


def _allowed(host: str, addresses: list[str], allow: list[str]) -> bool:
    """Whether the operator's allowlist lets `host` (all of its addresses) through."""
    names = {a.strip().lower() for a in allow if "/" not in a}
    if host.lower() in names:
        return True
    networks = []
    for a in allow:
        if "/" in a:
            try:
                networks.append(ipaddress.ip_network(a.strip(), strict=False))
            except ValueError:
                log.warning("GATT_WEBHOOK_ALLOW_HOSTS: %r is no network; ignored", a)
    return bool(networks) and all(
        any(ipaddress.ip_address(addr) in net for net in networks) for addr in addresses
    )


def check_url(url: str, allow: list[str], resolve: Callable[..., list] = socket.getaddrinfo) -> Target:
    """The target of `url` with the address to connect to, or `UrlRefused`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UrlRefused(f"not a valid URL: {e}") from e
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("only http and https URLs are allowed")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("credentials in the URL are not allowed; authenticate the message by its signature")
    host = parts.hostname
    if not host:
        raise UrlRefused("the URL has no host")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise UrlRefused(f"the host {host!r} does not resolve") from e
    addresses = sorted({info[4][0] for info in infos})
    if not addresses:
        raise UrlRefused(f"the host {host!r} does not resolve")
    if not _allowed(host, addresses, allow):
        for addr in addresses:
            if not _public(ipaddress.ip_address(addr.split("%")[0])):
                raise UrlRefused(
                    f"the host {host!r} resolves to {addr}, which is not a public address "
                    "(private, loopback, link-local or reserved targets need the operator's allowlist)"
                )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url, parts.scheme, host, port, path, addresses[0])


def signature_header(
    endpoint_secret: str, previous: str | None, event_id: str, when: datetime, body: str
) -> str:
    sigs = [Webhook(endpoint_secret).sign(event_id, when, body)]
    if previous:
        sigs.append(Webhook(previous).sign(event_id, when, body))
    return " ".join(sigs)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status_code: int | None
    error: str | None


def post(target: Target, headers: dict[str, str], body: bytes, timeout_s: float) -> Outcome:
    """One POST to the checked address, no redirects, bounded in time and in what is read."""
    address = f"[{target.address}]" if ":" in target.address else target.address
    url = f"{target.scheme}://{address}:{target.port}{target.path}"
    host = (
        target.host
        if target.port == (443 if target.scheme == "https" else 80)
        else f"{target.host}:{target.port}"
    )
    deadline = time.monotonic() + 3 * timeout_s  # connect + write + a few slow reads, at most
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            request = client.build_request(
                "POST",
                url,
                content=body,
                headers={
                    **headers,
                    "Host": host,
                    "User-Agent": USER_AGENT,
                    "Content-Type": "application/json",
                },
                extensions={"sni_hostname": target.host} if target.scheme == "https" else {},
            )
            response = client.send(request, stream=True)
            try:
                read = 0
                for chunk in response.iter_raw():  # drained up to a bound, then the connection is dropped
                    read += len(chunk)
                    if read >= MAX_RESPONSE_BYTES or time.monotonic() > deadline:
                        break
                code = response.status_code
            finally:
                response.close()
    except httpx.HTTPError as e:
        return Outcome(False, None, f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS])
    if 200 <= code < 300:
        return Outcome(True, code, None)
    if 300 <= code < 400:
        return Outcome(False, code, "redirects are not followed")
    return Outcome(False, code, f"HTTP {code}")


def backoff(attempt: int, settings: Settings) -> timedelta:
    """Wait after failed attempt `attempt` (1-based): backoff_s, doubling, at most 6 hours."""
    return min(timedelta(seconds=settings.webhook_backoff_s * 2 ** (attempt - 1)), MAX_BACKOFF)


def deliver(factory: sessionmaker[Session], settings: Settings, delivery_id: uuid.UUID) -> float | None:
    """One attempt of a delivery, if it is due. Returns the seconds until the next attempt when this
    one failed and another is left (the caller schedules it), else None."""
    with session_scope(factory) as s:
        claimed = repository.claim(s, delivery_id, ATTEMPT_HOLD)
        if claimed is None:
            return None  # delivered, failed for good, not due yet, or its endpoint deleted
        delivery, endpoint = claimed
        attempt, event_id, payload = delivery.attempts, delivery.event_id, delivery.payload
        box = secret_box(tuple(settings.secret_keys))
        url, secret = endpoint.url, box.open(endpoint.secret)
        now = datetime.now(UTC)
        previous = box.open(endpoint.previous_secret) if endpoint.previous_secret else None
        expires = endpoint.previous_secret_expires_at
        if previous and (expires is None or expires < now):
            previous = None
        # Keys set since it was stored, or a new first key: sealed (again) now, with the first key.
        if box.needs_sealing(endpoint.secret):
            endpoint.secret = box.seal(secret)
        if endpoint.previous_secret and box.needs_sealing(endpoint.previous_secret) and previous:
            endpoint.previous_secret = box.seal(previous)
    body = json.dumps(payload, separators=(",", ":"))
    try:
        target = check_url(url, settings.webhook_allow_hosts)  # again: DNS may say otherwise now
    except UrlRefused as e:
        outcome = Outcome(False, None, f"refused: {e}"[:MAX_ERROR_CHARS])
    else:
        headers = {
            "webhook-id": event_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature_header(secret, previous, event_id, now, body),
        }
        outcome = post(target, headers, body.encode(), settings.webhook_timeout_s)
    retry = None if outcome.ok or attempt >= settings.webhook_max_attempts else backoff(attempt, settings)
    with session_scope(factory) as s:
        disabled = repository.finish_attempt(
            s,
            delivery_id,
            attempt,
            ok=outcome.ok,
            status_code=outcome.status_code,
            error=outcome.error,
            retry_in=retry,
            disable_after=settings.webhook_disable_after,
        )
    if disabled:
        log.warning("webhook endpoint of delivery %s disabled: its deliveries keep failing", delivery_id)
    log.info(
        "webhook %s (%s) attempt %d: %s",
        event_id,
        delivery_id,
        attempt,
        "delivered" if outcome.ok else outcome.error,
    )
    return retry.total_seconds() if retry is not None else None


def send_after_commit(factory: sessionmaker[Session], send: Callable[[uuid.UUID], None]) -> None:
    """Sessions of `factory` hand the deliveries their transaction recorded to `send` once it has
    committed (never before: a worker must find the row). A send that fails is only logged: the
    delivery stays due and the reaper sends it again (`resend_overdue`)."""

    @event.listens_for(factory, "after_commit")
    def _send(session: Session) -> None:
        for delivery_id in session.info.pop(repository.PENDING_KEY, []):
            try:
                send(delivery_id)
            except Exception:
                log.exception("webhook delivery %s: not sent now; the reaper sends it later", delivery_id)

    @event.listens_for(factory, "after_rollback")
    def _forget(session: Session) -> None:
        session.info.pop(repository.PENDING_KEY, None)


def resend_overdue(
    factory: sessionmaker[Session], older_than: timedelta, send: Callable[[uuid.UUID], None]
) -> int:
    """One sweep: send again the deliveries due for longer than `older_than` (their message was lost:
    Redis down when recorded, or a worker gone mid-attempt); how many."""
    with session_scope(factory) as s:
        ids = repository.overdue(s, older_than)
    for delivery_id in ids:
        send(delivery_id)
    return len(ids)
