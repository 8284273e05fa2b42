"""What every front end of the server shares: the model, its scheduler, the metrics, and the rules
for turning a request into prompt ids and a running generation.

The scheduler (and its worker thread and KV cache) exists between :meth:`Service.start` and
:meth:`Service.stop`, which the app's lifespan calls; nothing runs before the server starts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from starlette.requests import Request

from ..api import GLMModel
from ..chat_format import Message
from ..engine import Engine, GenerationResult, StreamChunk
from ..errors import ConfigError, GlmrunError, InvalidArgumentError
from ..sampling import SamplingParams
from ..scheduler import RequestHandle, Scheduler, SchedulerClosedError, SchedulerStats
from .http_errors import APIError, from_glmrun_error
from .metrics import ServerMetrics
from .settings import ServerSettings

__all__ = ["Service"]

_DISCONNECT_POLL_S = 0.25


class Service:
    """The model behind the server, with the scheduler every request goes through."""

    def __init__(self, model: GLMModel, settings: ServerSettings) -> None:
        self.model = model
        self.settings = settings
        self.model_id = model.model_id
        self.defaults = model.defaults
        self.scheduler: Scheduler | None = None
        self.metrics = ServerMetrics(self.stats)

    @property
    def engine(self) -> Engine:
        engine = self.model.engine
        if engine is None:
            raise SchedulerClosedError("the model was closed")
        return engine

    # Lifetime ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self.scheduler is None:
            self.scheduler = Scheduler(
                self.engine,
                max_batch=self.settings.max_batch,
                max_queue=self.settings.max_queue,
                max_context=self.settings.max_context,
                on_finish=self.metrics.observe_result,
            )

    def stop(self) -> None:
        scheduler, self.scheduler = self.scheduler, None
        if scheduler is not None:
            scheduler.close()

    def stats(self) -> SchedulerStats | None:
        return self.scheduler.stats() if self.scheduler is not None else None

    @property
    def context_length(self) -> int:
        """Tokens one request may span (prompt + reply): the model's context, or ``max_context`` if smaller."""
        limit = self.engine.context_length
        return min(limit, self.settings.max_context) if self.settings.max_context else limit

    # Requests ----------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.model_id}' (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        try:
            return self.engine.tokenizer.build_chat_ids(messages)
        except (InvalidArgumentError, ConfigError) as exc:
            raise APIError(400, str(exc), param="messages") from None

    def text_ids(self, text: str) -> list[int]:
        if not text:
            raise APIError(400, "the prompt is empty", param="prompt")
        return self.engine.tokenizer.encode(text, add_special_tokens=True)

    def submit(self, ids: list[int], params: SamplingParams, *, request_id: str, param: str) -> RequestHandle:
        """Queue a generation; every refusal becomes an :class:`APIError` (400 with counts, 429, 503)."""
        scheduler = self.scheduler
        if scheduler is None:
            raise APIError(503, "the server is not running (starting up or shutting down)", type="server_error")
        try:
            return scheduler.submit(ids, params, request_id=request_id)
        except GlmrunError as exc:
            raise from_glmrun_error(exc, param=param) from None

    async def stream(self, handle: RequestHandle) -> AsyncIterator[StreamChunk]:
        """The handle's chunks. Cancels the request if the consumer stops early (client gone)."""
        try:
            async for chunk in handle.aiter(coalesce=True):  # a client that falls behind gets larger pieces
                yield chunk
        finally:
            handle.cancel()  # a no-op once finished; frees the row if the consumer went away

    async def complete(self, handle: RequestHandle, request: Request | None = None) -> GenerationResult:
        """Wait for the whole result, cancelling the request if the HTTP client disconnects meanwhile."""
        watcher = asyncio.create_task(self._watch_disconnect(handle, request)) if request is not None else None
        try:
            result = None
            async for chunk in self.stream(handle):
                result = chunk.result or result
            assert result is not None
            return result
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    @staticmethod
    async def _watch_disconnect(handle: RequestHandle, request: Request) -> None:
        while not handle.finished:
            if await request.is_disconnected():
                handle.cancel()
                return
            await asyncio.sleep(_DISCONNECT_POLL_S)
