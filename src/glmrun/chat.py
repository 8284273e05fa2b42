"""Conversations: chat templates over history, documents, token budgets and KV-cache reuse.

A :class:`Conversation` turns (system, documents, history, query) into prompt ids with the model's own
chat format, checks they fit before anything is generated, and keeps one engine session so the
next turn prefills only the tokens that are new (the document and earlier turns stay cached).
Truncation happens only when the caller asks for it, and is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .engine import Engine, GenerationResult, Session, StreamChunk
from .errors import ContextOverflowError, InvalidArgumentError
from .sampling import SamplingParams
from .tokenizer import Message

__all__ = ["Document", "Conversation", "PromptPlan", "validate_query", "document_prompt"]


@dataclass(frozen=True)
class Document:
    """A text the user attached; ``name`` is shown to the model (a file name, or "stdin")."""

    name: str
    text: str


@dataclass(frozen=True)
class PromptPlan:
    """The prompt ids of one turn and what was cut to make them fit (nothing unless asked)."""

    ids: list[int]
    dropped_turns: int = 0
    document_tokens_cut: int = 0


def validate_query(query: object) -> str:
    if not isinstance(query, str):
        raise InvalidArgumentError(f"the query must be text (str), got {type(query).__name__}")
    if not query.strip():
        raise InvalidArgumentError("the query is empty: type a question")
    return query


def document_prompt(question: str, documents: Sequence[Document]) -> str:
    """The first user message when documents are attached: the documents first, then the question."""
    if not documents:
        return question
    parts = ["Read the document(s) below, then answer the question that follows them.\n"]
    for doc in documents:
        parts.append(f'<document name="{doc.name}">\n{doc.text}\n</document>\n')
    parts.append(f"Question: {question}")
    return "\n".join(parts)


@dataclass
class Conversation:
    """A multi-turn chat that keeps its KV cache between turns."""

    engine: Engine
    system: str | None = None
    documents: list[Document] = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams.chatglm2_defaults)
    session: Session = field(default_factory=Session)
    last_plan: PromptPlan | None = None

    def messages(
        self, query: str, history: Sequence[tuple[str, str]] | None = None, documents: Sequence[Document] | None = None
    ) -> list[Message]:
        history = self.history if history is None else history
        documents = self.documents if documents is None else documents
        msgs: list[Message] = []
        if self.system:
            msgs.append({"role": "system", "content": self.system})
        for i, (q, a) in enumerate(history):
            msgs.append({"role": "user", "content": document_prompt(q, documents) if i == 0 else q})
            msgs.append({"role": "assistant", "content": a})
        msgs.append({"role": "user", "content": document_prompt(query, documents) if not history else query})
        return msgs

    def prompt_ids(self, query: str) -> list[int]:
        return self.engine.tokenizer.build_chat_ids(self.messages(validate_query(query)))

    def plan(self, query: str, max_new_tokens: int, *, truncate: bool = False) -> PromptPlan:
        """The ids for ``query``; raises ContextOverflowError unless ``truncate`` lets it cut old turns/documents."""
        validate_query(query)
        tok = self.engine.tokenizer
        budget = self.engine.context_length - max_new_tokens
        ids = tok.build_chat_ids(self.messages(query))
        if len(ids) <= budget:
            return PromptPlan(ids)
        if not truncate:
            self.engine.check_fits(len(ids), max_new_tokens)
        history = list(self.history)
        dropped = 0
        while history and len(ids) > budget:  # oldest turns go first
            history.pop(0)
            dropped += 1
            ids = tok.build_chat_ids(self.messages(query, history))
        cut = 0
        if len(ids) > budget and self.documents:
            ids, cut = self._cut_documents(query, history, budget)
        if len(ids) > budget:
            raise ContextOverflowError(
                f"even after truncation the prompt has {len(ids)} tokens; with {max_new_tokens} new tokens that "
                f"exceeds the context of {self.engine.context_length}. Shorten the question or lower max_new_tokens.",
                prompt_tokens=len(ids),
                max_new_tokens=max_new_tokens,
                context_length=self.engine.context_length,
            )
        return PromptPlan(ids, dropped, cut)

    def _cut_documents(self, query: str, history: list[tuple[str, str]], budget: int) -> tuple[list[int], int]:
        """Keep the head of the documents: cut the last document's tokens until the prompt fits."""
        tok = self.engine.tokenizer
        docs = list(self.documents)
        total_cut = 0
        while docs:
            ids = tok.build_chat_ids(self.messages(query, history, docs))
            over = len(ids) - budget
            if over <= 0:
                return ids, total_cut
            last = docs[-1]
            doc_ids = tok.encode(last.text, add_special_tokens=False)
            if over >= len(doc_ids):
                docs.pop()
                total_cut += len(doc_ids)
                continue
            keep = len(doc_ids) - over - 8  # a little slack: re-encoding at the cut can shift a token or two
            docs[-1] = Document(last.name, tok.decode(doc_ids[: max(0, keep)]) + "\n[... truncated ...]")
            total_cut += len(doc_ids) - max(0, keep)
        return tok.build_chat_ids(self.messages(query, history, docs)), total_cut

    def stream(
        self,
        query: str,
        *,
        params: SamplingParams | None = None,
        truncate: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[StreamChunk]:
        """Answer ``query``; the turn joins the history when the answer is complete (or cancelled)."""
        params = params or self.params
        max_new = params.max_new_tokens or 1
        plan = self.plan(query, max_new, truncate=truncate)
        self.last_plan = plan
        for chunk in self.engine.stream(plan.ids, params, session=self.session, should_stop=should_stop):
            if chunk.result is not None:
                if plan.dropped_turns:
                    del self.history[: plan.dropped_turns]
                self.history.append((query, chunk.result.text))
            yield chunk

    def send(self, query: str, **kwargs: object) -> GenerationResult:
        """Blocking turn: consumes :meth:`stream`."""
        result = None
        for chunk in self.stream(query, **kwargs):  # type: ignore[arg-type]
            result = chunk.result or result
        assert result is not None
        return result

    def reset(self) -> None:
        """Forget the history (the documents stay; their cached prefix is reused)."""
        self.history.clear()

    def close(self) -> None:
        self.session.close()
