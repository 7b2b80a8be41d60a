"""One error hierarchy and the one envelope every error response uses.

Every non-2xx answer has the body::

    {"error": {"code": "not_found", "message": "...", "param": "instruction_set_id", "details": [...]}}

`code` is stable and meant for programs; `message` is for people and may change; `param` names the
request field at fault (or null); `details` is present only when there is a list to give, e.g. every
problem of a rejected corpus as `{"line", "field", "code", "message"}`.

Services raise `AppError` subclasses and never `HTTPException`; the handlers installed by
`install_error_handlers` render those, FastAPI's request validation errors, Starlette's HTTP errors
(unknown route, wrong method, body too large) and unexpected exceptions (500, logged, never leaked).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gatt.errors import Problem

log = logging.getLogger(__name__)


class AppError(Exception):
    """An error with an HTTP status and a stable code. Subclasses set the defaults."""

    status_code: int = 500
    code: str = "internal_error"
    message: str = "Internal server error."

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        param: str | None = None,
        details: Sequence[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        status_code: int | None = None,
    ) -> None:
        self.status_code = status_code or type(self).status_code
        self.message = message or type(self).message
        self.code = code or type(self).code
        self.param = param
        self.details = list(details) if details is not None else None
        self.headers = headers
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "param": self.param}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


class BadRequest(AppError):
    status_code, code, message = 400, "invalid_request", "The request is malformed."


class Unauthorized(AppError):
    status_code, code, message = 401, "invalid_api_key", "The API key is not valid."

    def __init__(self, message: str | None = None, *, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(AppError):
    status_code, code, message = 403, "forbidden", "Not allowed."


class NotFound(AppError):
    status_code, code, message = 404, "not_found", "No such resource."


class MethodNotAllowed(AppError):
    status_code, code, message = 405, "method_not_allowed", "Method not allowed on this path."


class Conflict(AppError):
    status_code, code, message = 409, "conflict", "The request conflicts with the resource's state."


class PayloadTooLarge(AppError):
    status_code, code, message = 413, "payload_too_large", "The request body is too large."


class UnsupportedMediaType(AppError):
    status_code, code, message = 415, "unsupported_media_type", "Unsupported Content-Type."


class Unprocessable(AppError):
    status_code, code, message = 422, "validation_failed", "The request could not be validated."

    @classmethod
    def from_problems(
        cls, problems: Iterable[Problem], *, code: str, message: str, field_prefix: str = ""
    ) -> Unprocessable:
        """Every `gatt` validation problem as one 422; `param` is the first problem's field."""
        details = [problem_detail(p, field_prefix) for p in problems]
        param = next((d["field"] for d in details if d["field"]), None)
        return cls(message, code=code, param=param, details=details)


class RateLimited(AppError):
    status_code, code, message = 429, "rate_limited", "Too many requests."

    def __init__(self, message: str | None = None, *, retry_after_s: int | None = None) -> None:
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
        super().__init__(message, headers=headers)


class InternalError(AppError):
    pass


class ServiceUnavailable(AppError):
    status_code, code, message = 503, "service_unavailable", "The service is not available right now."


def problem_detail(problem: Problem, field_prefix: str = "") -> dict[str, Any]:
    field = problem.field
    if field_prefix:
        # "spec" + "families[0].name" -> "spec.families[0].name"; "spec" + "" -> "spec"
        field = f"{field_prefix}.{field}" if field and not field.startswith("[") else f"{field_prefix}{field}"
    return {"line": problem.line, "field": field, "code": problem.code, "message": problem.message}


# --- the envelope, as documented in the OpenAPI ----------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code of this one problem.")
    message: str = Field(description="Human-readable explanation.")
    field: str | None = Field(
        default=None,
        description='Path of the offending field, e.g. "messages[2].role" or "spec.families[0].name".',
    )
    line: int | None = Field(default=None, description="1-based line of an uploaded file, for file problems.")
    location: str | None = Field(
        default=None,
        description='Where a request-validation problem was found: "path", "query", "header" or "body".',
    )


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. not_found or invalid_corpus.")
    message: str = Field(description="Human-readable explanation; wording may change.")
    param: str | None = Field(description="The request parameter or field at fault, if any.")
    details: list[ErrorDetail] | None = Field(
        default=None,
        description="Every individual problem, when there is a list of them (validation errors).",
    )


class ErrorResponse(BaseModel):
    """The body of every non-2xx response."""

    error: ErrorBody = Field(description="What went wrong.")


# --- handlers --------------------------------------------------------------------------------------

_HTTP_CODES: dict[int, type[AppError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: Unprocessable,
    429: RateLimited,
    503: ServiceUnavailable,
}


def _render(error: AppError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


async def _app_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    if exc.status_code >= 500:
        log.error("%s: %s", exc.code, exc.message)
    return _render(exc)


def _loc_to_field(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


async def _request_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        location = str(loc[0]) if loc else None
        details.append(
            {
                "code": err.get("type", "invalid"),
                "message": err.get("msg", "invalid value"),
                "field": _loc_to_field(loc[1:]) or None,
                "location": location,
            }
        )
    first = details[0] if details else {}
    where = f" ({first['location']} parameter {first['field']!r})" if first.get("field") else ""
    message = f"{first.get('message', 'Invalid request')}{where}."
    return _render(
        AppError(message, code="invalid_request", param=first.get("field"), details=details, status_code=422)
    )


def _unparsable_body(cause: BaseException) -> AppError:
    """FastAPI answers 400 when a JSON body fails to parse for another reason than its syntax (a JSON
    syntax error is a 422 `invalid_request`): the same 422 here, saying why."""
    if isinstance(cause, UnicodeDecodeError):
        message = f"The body is not valid UTF-8 (byte {cause.start} of it cannot be decoded)."
    elif isinstance(cause, RecursionError):
        message = "The JSON body is nested too deeply."
    else:
        message = "The body could not be parsed as JSON."
    detail = {"code": "json_invalid", "message": message, "field": None, "location": "body"}
    return AppError(message, code="invalid_request", details=[detail], status_code=422)


async def _http_exception(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.__cause__ is not None:  # raised by FastAPI's body parsing
        return _render(_unparsable_body(exc.__cause__))
    known = _HTTP_CODES.get(exc.status_code)
    message = {404: "No such route.", 405: "Method not allowed on this path."}.get(exc.status_code)
    error = AppError(
        message or str(exc.detail or (known.message if known else "HTTP error")),
        code=known.code if known else "http_error",
        headers=dict(exc.headers) if exc.headers else None,
        status_code=exc.status_code,
    )
    return _render(error)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, never to the client.
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _render(InternalError())


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)


# --- OpenAPI: the error responses shared by routes ------------------------------------------------


def _response(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _response("Missing (`missing_api_key`), unknown or revoked (`invalid_api_key`) API key."),
    422: _response(
        "Invalid path, query or body parameters (`invalid_request`), or a more specific validation code."
    ),
    429: {
        **_response("Too many requests with this API key (`rate_limited`); retry after `Retry-After`."),
        "headers": {
            "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
        },
    },
}
NOT_FOUND_RESPONSE: dict[int | str, dict[str, Any]] = {
    404: _response("No such resource for this team (`not_found`); another team's ids are 404 too."),
}
ERROR_RESPONSES = {**AUTH_RESPONSES, **NOT_FOUND_RESPONSE}
"""401, 404, 422 and 429 in the envelope: pass as `responses=` to routes taking an id."""


def error_response(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    """One more documented error, e.g. `error_response(409, "... (`in_use`)")`."""
    return {status: _response(description)}
