"""Terminal front ends: ``glmrun chat`` (interactive, like the official cli_demo) and ``glmrun ask``.

Both stream from :class:`glmrun.chat.Conversation`; Ctrl-C stops the answer being written (the
conversation goes on), ``/clear`` resets it, ``/exit`` or Ctrl-D leaves.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from .cli import EXIT_INPUT, EXIT_OK, add_model_args, add_sampling_args, load_from_args, sampling_options

__all__ = ["add_parser", "run_chat", "run_ask", "read_documents"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    chat = sub.add_parser(
        "chat",
        help="interactive chat in the terminal",
        description="Chat in the terminal: streaming answers with history. /clear resets the "
        "conversation, /exit or Ctrl-D leaves, Ctrl-C stops the current answer.",
    )
    add_model_args(chat)
    add_sampling_args(chat)
    chat.add_argument("--stats", action="store_true", help="print tokens, time to first token and tok/s per turn")
    chat.set_defaults(func=run_chat)

    ask = sub.add_parser(
        "ask",
        help="answer one question (optionally about documents) and exit",
        description="Answer QUESTION once, streamed to stdout. --file adds documents (- reads "
        "stdin). Exit codes: 0 ok; 2 bad input, or the documents + question + --max-new-tokens "
        "do not fit the model's context (nothing is cut unless --truncate); 1 runtime failure.",
    )
    ask.add_argument("question", help="the question")
    ask.add_argument(
        "--file",
        "-f",
        action="append",
        default=[],
        metavar="PATH",
        help="a document to ask about (repeatable; - reads stdin)",
    )
    ask.add_argument(
        "--truncate", action="store_true", help="cut the end of the documents to fit the context instead of refusing"
    )
    add_model_args(ask)
    add_sampling_args(ask)
    ask.add_argument("--stats", action="store_true", help="print token counts, time to first token and tok/s")
    ask.set_defaults(func=run_ask)


def read_documents(paths: list[str], stdin: TextIO | None = None) -> list:  # list[Document]
    """Read --file arguments as UTF-8 text; errors name the file."""
    from .chat import Document
    from .errors import CheckpointNotFoundError, InvalidArgumentError

    docs = []
    for raw in paths:
        if raw == "-":
            docs.append(Document("stdin", (stdin or sys.stdin).read()))
            continue
        path = Path(raw)
        if not path.is_file():
            raise CheckpointNotFoundError(f"--file {raw}: no such file")
        try:
            docs.append(Document(path.name, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"--file {raw}: not UTF-8 text (glmrun reads plain-text documents)") from None
    for doc in docs:
        if not doc.text.strip():
            raise InvalidArgumentError(f"document {doc.name} is empty")
    return docs


@contextmanager
def _ctrl_c_stops() -> Iterator[list[bool]]:
    """While answering, Ctrl-C sets a flag the engine checks between tokens instead of killing the program."""
    flag = [False]

    def handler(signum: int, frame: object) -> None:
        flag[0] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no signal handling
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_options(args: argparse.Namespace) -> None:
    """Bad sampling flags fail before the model is loaded (InvalidArgumentError names the flag)."""
    from .sampling import SamplingParams

    SamplingParams.chatglm2_defaults().replace(**sampling_options(args))


def _stats_line(result) -> str:  # noqa: ANN001 - GenerationResult
    return (
        f"[{result.prompt_tokens} prompt tokens ({result.prefilled_tokens} computed), "
        f"{result.completion_tokens} generated, TTFT {result.time_to_first_token * 1000:.0f} ms, "
        f"{result.decode_tokens_per_second:.1f} tok/s, {result.finish_reason}]"
    )


def run_ask(args: argparse.Namespace) -> int:
    from .chat import Conversation
    from .errors import ContextOverflowError

    if not args.question.strip():
        print("glmrun ask: the question is empty", file=sys.stderr)
        return EXIT_INPUT
    docs = read_documents(args.file)
    _check_options(args)
    glm = load_from_args(args)
    with glm:
        conv: Conversation = glm.conversation(system=args.system, documents=docs, **sampling_options(args))
        max_new = conv.params.max_new_tokens or min(512, glm.context_length // 4)
        conv.params = conv.params.replace(max_new_tokens=max_new)
        try:
            plan = conv.plan(args.question, max_new, truncate=args.truncate)
        except ContextOverflowError as exc:
            print(
                f"glmrun ask: the input does not fit: {exc.prompt_tokens} prompt tokens (documents + question) + "
                f"{exc.max_new_tokens} new tokens (--max-new-tokens) > {exc.context_length} tokens of context.\n"
                "Options: a model with a longer context (e.g. ChatGLM2-6B-32K via --model), a lower "
                "--max-new-tokens, shorter documents, or --truncate to cut the end of the documents.",
                file=sys.stderr,
            )
            return EXIT_INPUT
        if plan.document_tokens_cut or plan.dropped_turns:
            print(
                f"glmrun ask: --truncate cut {plan.document_tokens_cut} document tokens to fit the context",
                file=sys.stderr,
            )
        result = None
        with _ctrl_c_stops() as stop:
            for chunk in conv.stream(args.question, truncate=args.truncate, should_stop=lambda: stop[0]):
                if chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                result = chunk.result or result
        sys.stdout.write("\n")
        if args.stats and result is not None:
            print(_stats_line(result), file=sys.stderr)
    return EXIT_OK


def run_chat(args: argparse.Namespace) -> int:
    from .errors import ContextOverflowError, InvalidArgumentError

    _check_options(args)
    glm = load_from_args(args)
    with glm:
        conv = glm.conversation(system=args.system, **sampling_options(args))
        print(
            f"glmrun chat with {glm.model_id}: type a message; /clear resets, /exit or Ctrl-D leaves, "
            "Ctrl-C stops an answer.",
            file=sys.stderr,
        )
        while True:
            try:
                query = input("\nUser: ")
            except EOFError:
                print(file=sys.stderr)
                return EXIT_OK
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            command = query.strip()
            if command in ("/exit", "/quit"):
                return EXIT_OK
            if command == "/clear":
                conv.reset()
                print("(conversation cleared)", file=sys.stderr)
                continue
            if not command:
                continue
            sys.stdout.write("\nAssistant: ")
            sys.stdout.flush()
            result = None
            try:
                with _ctrl_c_stops() as stop:
                    for chunk in conv.stream(query, should_stop=lambda: stop[0]):
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
                        result = chunk.result or result
            except (ContextOverflowError, InvalidArgumentError) as exc:
                print(f"\nglmrun: {exc} (type /clear to start over)", file=sys.stderr)
                continue
            sys.stdout.write("\n")
            if result is not None and result.finish_reason == "cancelled":
                print("(stopped)", file=sys.stderr)
            if args.stats and result is not None:
                print(_stats_line(result), file=sys.stderr)
