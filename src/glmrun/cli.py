"""The ``glmrun`` command: one subcommand per front end.

Exit codes (every subcommand): 0 success; 1 a runtime failure (e.g. out of memory); 2 bad input
(arguments, missing or unreadable files, a prompt that does not fit the context); 3 a placement
plan that does not fit (``doctor``); 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "add_model_args", "add_sampling_args", "EXIT_OK", "EXIT_RUNTIME", "EXIT_INPUT"]

EXIT_OK, EXIT_RUNTIME, EXIT_INPUT, EXIT_NO_FIT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# Subcommand modules, imported lazily so `glmrun ask` starts fast.
_COMMANDS = {
    "bench": "glmrun.bench",
    "chat": "glmrun.terminal",
    "ask": "glmrun.terminal",
    "doctor": "glmrun.doctor",
    "serve": "glmrun.server.cli",
    "make-checkpoint": "glmrun.checkpoint",
    "quantize": "glmrun.quantize_cli",
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags every command that loads a model takes."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        "-m",
        default=None,
        help="ChatGLM2/3 folder or .gguf file (default: $GLMRUN_MODEL, else the embedded SmolLM2)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument(
        "--dtype",
        default=None,
        choices=["float16", "bfloat16", "float32"],
        help="dtype (default: the checkpoint's on a GPU; on the CPU float16 matrices with float32 arithmetic)",
    )
    g.add_argument("--quantize", default=None, choices=["int8", "int4"], help="weight-only quantization on load")
    g.add_argument("--devices", default=None, help="GPUs to split the model over, e.g. 0,1")
    g.add_argument("--max-memory", default=None, help="per-GPU budgets for the plan, e.g. 0=7.5GiB,1=11.5GiB")
    g.add_argument("--context", type=int, default=None, help="context length to plan for (default: the model's)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument(
        "--temperature", type=float, default=None, help="0 means greedy (default: 0.8 for ChatGLM; GGUF models: greedy)"
    )
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="top-k sampling (default off)")
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--max-new-tokens", type=int, default=None, help="cap on the answer's length in tokens")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--system", default=None, help="system message")


def sampling_options(args: argparse.Namespace) -> dict[str, object]:
    # A temperature turns sampling on or, at 0, off: glmrun.api.sampling_params derives do_sample from it.
    opts: dict[str, object] = {}
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed"):
        value = getattr(args, name)
        if value is not None:
            opts[name] = value
    return opts


def load_from_args(args: argparse.Namespace, *, announce: bool = True):  # noqa: ANN201 - returns GLMModel
    """Load the model the flags name, announcing the embedded default on stderr."""
    from .api import load
    from .loader import resolve_checkpoint
    from .placement import parse_devices, parse_max_memory

    ckpt = resolve_checkpoint(args.model)
    if ckpt.embedded and announce:
        print(
            f"glmrun: using the embedded model {ckpt.path.name} (small, English). For ChatGLM2-6B pass "
            "--model /path/to/chatglm2-6b (the downloaded folder) or set GLMRUN_MODEL.",
            file=sys.stderr,
        )
    return load(
        ckpt.path,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        devices=parse_devices(args.devices) if args.devices else None,
        max_memory=parse_max_memory(args.max_memory) if args.max_memory else None,
        context=args.context,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glmrun",
        description="Run ChatGLM2-6B (and its family) on your own GPUs or CPU.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 bad input or a prompt too long, 3 no placement fits, "
        "130 interrupted.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"glmrun {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    registered: set[str] = set()
    for module_name in dict.fromkeys(_COMMANDS.values()):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # an optional front end whose extra is not installed
            if exc.name and exc.name.startswith("glmrun"):
                raise
            for cmd, mod in _COMMANDS.items():
                if mod == module_name:
                    p = sub.add_parser(cmd, help=f"(unavailable: {exc.name} is not installed)")
                    p.set_defaults(func=_missing(exc.name or "?", cmd))
            continue
        module.add_parser(sub)
        registered.update(c for c, m in _COMMANDS.items() if m == module_name)
    return parser


def _missing(package: str, cmd: str):  # noqa: ANN202
    def run(_: argparse.Namespace) -> int:
        print(
            f"glmrun {cmd}: needs the package {package!r}; install it with: pip install 'glmrun[server]'",
            file=sys.stderr,
        )
        return EXIT_INPUT

    return run


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import ContextOverflowError, GlmrunError, InvalidArgumentError, OutOfMemoryError, PlacementError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_INPUT
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except PlacementError as exc:
        print(f"glmrun: {exc}", file=sys.stderr)
        return EXIT_NO_FIT
    except OutOfMemoryError as exc:
        print(f"glmrun: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except (ContextOverflowError, InvalidArgumentError, GlmrunError, OSError) as exc:
        print(f"glmrun: {exc}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
