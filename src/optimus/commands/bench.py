"""``optimus bench <kind>``. Each kind is a module exposing ``add_arguments(parser)`` and
``run(args) -> int``, registered in :data:`SUBCOMMANDS`. A kind's module is imported only when
that kind is parsed (``offline`` pulls in torch; ``serve`` must stay light)."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {  # name -> (module, help)
    "serve": ("optimus.bench.serve", "load an OpenAI-compatible server and report latency/throughput/goodput"),
    "sweep": ("optimus.bench.sweep", "start the server once per policy, sweep the request rate, plot capacity"),
    "http": ("optimus.bench.http_vs_engine", "the same closed-loop load in-process and over HTTP: the ratio, "
                                             "TTFT/TPOT and step times"),
    "offline": ("optimus.bench.offline", "engine throughput at 8B shapes on random weights (CUDA)"),
    "host": ("optimus.bench.host_time", "the engine's host work per step at many requests, the device left out"),
    "latency-fit": ("optimus.bench.latency_fit", "a model's step latency over batch x chunk, and how well each "
                                                 "latency model predicts held-out steps (MoE: experts touched)"),
    "acceptance": ("optimus.bench.acceptance", "measure a model's commits per step by chunk size (replayed by offline)"),
}


class _KindParser(argparse.ArgumentParser):
    """A kind's parser: imports its module and adds its arguments on first use."""

    def __init__(self, *args, module: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._module = module

    def parse_known_args(self, args=None, namespace=None):
        self._load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._load()
        return super().format_help()

    def _load(self) -> None:
        if self._module is None:
            return
        mod = importlib.import_module(self._module)
        self._module = None
        mod.add_arguments(self)
        self.set_defaults(_bench_run=mod.run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="KIND", parser_class=_KindParser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, module=module)


def run(args: argparse.Namespace) -> int:
    runner = getattr(args, "_bench_run", None)
    if runner is None:
        print(f"optimus bench: choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    return int(runner(args) or 0)
