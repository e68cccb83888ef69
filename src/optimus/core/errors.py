"""What the engine raises to its callers, in one light module: the server maps these to HTTP
statuses in whichever process it runs (the engine's, or a front-end talking to it)."""

from __future__ import annotations


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


class EngineDeadError(RuntimeError):
    """The engine loop crashed or hung; no request can be served."""


class RequestFailedError(RuntimeError):
    """This request ended with an internal error (the log has it); the engine serves on."""


class EngineStartError(RuntimeError):
    """The engine could not load the model; whoever started it reports why."""
