"""`optimus` command line. Each subcommand lives in ``optimus.commands.<name>`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "generate": "answer one prompt on the serving engine, with its decoding statistics",
    "serve": "serve a model over an OpenAI-compatible HTTP API",
    "profile": "measure the step-latency curve T(tokens) and its knee on this device",
    "eval": "score decoding configurations on held-out task sets",
    "bench": "benchmarks: offline engine throughput, serving load, policy sweeps",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimus",
        description="Optimus: serve diffusion LLMs with chunked decoding and saturation-aware scheduling.",
    )
    from optimus import __version__
    parser.add_argument("--version", action="version", version=f"optimus {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that will run
            module = importlib.import_module(f"optimus.commands.{name}")
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (FileNotFoundError, ValueError) as exc:
        print(f"optimus {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
