"""What the client raises. Every non-2xx answer of the API becomes an `ApiError` (a subclass per
status) carrying the API's stable `code`, its message, the field at fault and the list of
problems, so that a script branches on `e.code`, not on wording."""

from __future__ import annotations

from typing import Any

import httpx


class GattError(Exception):
    """Anything this client raises on purpose."""


class ApiError(GattError):
    status_code: int = 0

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status_code = response.status_code
        body: dict[str, Any] = {}
        try:
            parsed = response.json()
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                body = parsed["error"]
        except ValueError:
            pass
        self.code: str = body.get("code") or f"http_{response.status_code}"
        self.message: str = body.get("message") or response.reason_phrase or "error"
        self.param: str | None = body.get("param")
        self.details: list[dict[str, Any]] = body.get("details") or []
        super().__init__(f"{self.status_code} {self.code}: {self.message}")

    def __str__(self) -> str:
        lines = [f"{self.status_code} {self.code}: {self.message}"]
        for d in self.details[:20]:
            where = d.get("field") or (f"line {d['line']}" if d.get("line") else None)
            lines.append(f"  - {where + ': ' if where else ''}{d.get('message')} ({d.get('code')})")
        if len(self.details) > 20:
            lines.append(f"  ... and {len(self.details) - 20} more")
        return "\n".join(lines)


class BadRequest(ApiError):
    status_code = 400


class AuthenticationError(ApiError):
    status_code = 401


class PermissionDenied(ApiError):
    status_code = 403


class NotFound(ApiError):
    status_code = 404


class Conflict(ApiError):
    status_code = 409


class PayloadTooLarge(ApiError):
    status_code = 413


class Unprocessable(ApiError):
    status_code = 422


class RateLimited(ApiError):
    """429: too many requests, or a team quota (`code` says which)."""

    status_code = 429

    @property
    def retry_after(self) -> float | None:
        return retry_after(self.response)


class ServiceUnavailable(ApiError):
    status_code = 503


class ChecksumMismatch(GattError):
    """A downloaded checkpoint whose files do not match its manifest."""


class StreamEnded(GattError):
    """The event stream broke off more often than the client retries."""


_BY_STATUS = {cls.status_code: cls for cls in ApiError.__subclasses__()}


def error_for(response: httpx.Response) -> ApiError:
    return _BY_STATUS.get(response.status_code, ApiError)(response)


def retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (the API sends a number of seconds), or None."""
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
