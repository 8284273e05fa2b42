"""``glmrun serve``: the OpenAI-compatible HTTP server with the web chat page.

Importing this module is cheap: FastAPI, uvicorn and Gradio are imported by :func:`run`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import EXIT_INPUT, EXIT_OK, add_model_args

__all__ = ["add_parser", "run"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``glmrun serve``."""
    p = subparsers.add_parser(
        "serve",
        help="serve the model over HTTP: OpenAI-compatible API, the official api.py endpoint, a web chat",
        description="Serve the model over HTTP: /v1/chat/completions, /v1/completions, /v1/models "
        "(OpenAI-compatible, streaming), POST / (the official ChatGLM2 api.py), /health, /metrics "
        "(Prometheus) and a web chat page at /ui. Concurrent requests share decode steps (continuous batching).",
    )
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    g.add_argument(
        "--api-key",
        default=os.environ.get("GLMRUN_API_KEY"),
        help="require 'Authorization: Bearer KEY' on the API (default: $GLMRUN_API_KEY, else no key)",
    )
    g.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default: 8)")
    g.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for a batch row before 429 (default: 64)"
    )
    g.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="tokens each batch row holds; the KV cache is max-batch x this (default: the model's context)",
    )
    g.add_argument("--no-ui", dest="ui", action="store_false", help="do not mount the Gradio chat page at /ui")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted. glmrun errors propagate to ``glmrun.cli.main``."""
    from ..cli import load_from_args
    from .settings import ServerSettings

    settings = ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_context=args.max_context,
        ui=args.ui,
    )
    if args.threads is not None:
        if args.threads < 1:
            print(f"glmrun serve: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return EXIT_INPUT
        import torch

        torch.set_num_threads(args.threads)
    if settings.host not in _LOOPBACK and settings.api_key is None:
        print(
            f"glmrun serve: warning: listening on {settings.host} without --api-key; anyone who can reach this "
            "machine can use the model",
            file=sys.stderr,
        )
    import uvicorn

    from .app import create_app

    model = load_from_args(args)
    try:
        app = create_app(model, settings)
        where = f"http://{settings.host}:{settings.port}"
        ui = f", web chat at {where}/ui" if settings.ui else ""
        print(f"glmrun: serving {model.model_id} at {where} (OpenAI API at {where}/v1{ui})", file=sys.stderr)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    finally:
        model.close()
    return EXIT_OK
