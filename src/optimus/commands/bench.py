"""``optimus bench <kind>``. Each kind is a module exposing ``add_arguments(parser)`` and
``run(args) -> int``, registered in :data:`SUBCOMMANDS` (heavy imports such as matplotlib stay
inside those modules' functions, so registering every kind is cheap)."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {  # name -> (module, help)
    "serve": ("optimus.bench.serve", "load an OpenAI-compatible server and report latency/throughput/goodput"),
    "sweep": ("optimus.bench.sweep", "start the server once per policy, sweep the request rate, plot capacity"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="KIND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_bench_run=mod.run)


def run(args: argparse.Namespace) -> int:
    runner = getattr(args, "_bench_run", None)
    if runner is None:
        print(f"optimus bench: choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    return int(runner(args) or 0)
