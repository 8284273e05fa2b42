"""Errors as OpenAI sends them: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Every way a request can fail ends here: invalid fields (400, never FastAPI's 422), a wrong key
(401), an unknown model (404), a prompt too long for the context (400 with the token counts, in
OpenAI's own wording), a full queue (429), a server shutting down (503), a failed step (500).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, ContextOverflowError, GlmrunError, InvalidArgumentError, OutOfMemoryError
from ..scheduler import QueueFullError, SchedulerClosedError

__all__ = ["APIError", "error_body", "from_glmrun_error", "install_error_handlers"]


class APIError(Exception):
    """An error to send to the client, in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers) if headers else None

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def context_overflow(exc: ContextOverflowError, *, param: str) -> APIError:
    """OpenAI's own wording for a prompt that does not fit, with the counts."""
    where = "messages" if param == "messages" else "prompt"
    requested = exc.prompt_tokens + exc.max_new_tokens
    return APIError(
        400,
        f"This model's maximum context length is {exc.context_length} tokens. However, you requested "
        f"{requested} tokens ({exc.prompt_tokens} in the {where}, {exc.max_new_tokens} in the completion). "
        f"Please reduce the length of the {where} or completion.",
        param=param,
        code="context_length_exceeded",
    )


def from_glmrun_error(exc: BaseException, *, param: str | None = None) -> APIError:
    """The HTTP error for an exception glmrun raised while taking or running a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return context_overflow(exc, param=param or "messages")
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, SchedulerClosedError):
        return APIError(503, str(exc), type="server_error", code="shutting_down")
    if isinstance(exc, (InvalidArgumentError, ConfigError)):
        return APIError(400, str(exc), param=param)
    if isinstance(exc, OutOfMemoryError):
        return APIError(500, str(exc), type="server_error", code="out_of_memory")
    if isinstance(exc, GlmrunError):
        return APIError(500, str(exc), type="server_error")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") in ("json_invalid", "model_attributes_type") and not loc:
        return "the request body must be a JSON object", None
    where = f"'{param}': " if param else ""
    return f"{where}{first.get('msg', 'invalid value')}", param


def install_error_handlers(app: FastAPI) -> None:
    """Send every error of ``app``'s own routes in OpenAI's shape."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), type=kind, code=code, headers=exc.headers).response()

    async def glmrun_error(_: Request, exc: Exception) -> JSONResponse:
        return from_glmrun_error(exc).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(GlmrunError, glmrun_error)
