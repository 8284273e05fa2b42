"""The application factory: ``create_app(model, settings) -> FastAPI``.

One app holds every front end: the OpenAI routes under ``/v1``, the official api.py route ``POST /``,
``/health``, ``/metrics`` and the Gradio chat page at ``/ui``. All of them submit to one
:class:`~glmrun.scheduler.Scheduler`, created when the server starts (the app's lifespan) and
closed when it stops, so building an app loads nothing and starts no thread.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..api import GLMModel
from .http_errors import APIError, install_error_handlers
from .legacy_api import legacy_router
from .metrics import CONTENT_TYPE
from .openai_api import openai_router
from .service import Service
from .settings import ServerSettings

__all__ = ["create_app"]

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/", "/health", "/metrics")
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def _endpoint_label(path: str) -> str:
    """A bounded set of label values, whatever paths clients send."""
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path == "/ui" or path.startswith("/ui/"):
        return "/ui"
    return "other"


class _CountRequests:
    """ASGI middleware counting answered HTTP requests by endpoint and status (streams count at their start)."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = _endpoint_label(scope.get("path", ""))
        counted = False

        async def counting_send(message: MutableMapping[str, Any]) -> None:
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                self.service.metrics.observe_request(endpoint, int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not counted:
                self.service.metrics.observe_request(endpoint, 500)
            raise


def _key_checker(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    expected = api_key.encode() if api_key is not None else None

    async def check_api_key(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(
                401,
                "Incorrect API key provided. Send it as the header 'Authorization: Bearer <key>' "
                "(the key the server was started with: glmrun serve --api-key).",
                code="invalid_api_key",
            )

    return check_api_key


def create_app(model: GLMModel, settings: ServerSettings | None = None) -> FastAPI:
    """The server for ``model``. The scheduler starts and stops with the app (its lifespan)."""
    settings = settings or ServerSettings()
    service = Service(model, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="glmrun",
        version=__version__,
        description=f"OpenAI-compatible server for {service.model_id}",
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(_CountRequests, service=service)
    auth = _key_checker(settings.api_key)
    app.include_router(openai_router(service, auth))
    app.include_router(legacy_router(service, auth))

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = service.stats()
        alive = stats is not None and stats.worker_alive
        body: dict[str, Any] = {"status": "ok" if alive else "unavailable", "model": service.model_id}
        if stats is not None:
            body.update(waiting=stats.waiting, running=stats.running, max_batch=stats.max_batch)
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    if settings.ui:
        from .ui import mount_chat_ui

        mount_chat_ui(app, service, path="/ui")
    return app
