"""A step loop's failure handling, shared by the in-process loop thread (``AsyncEngine``) and
the engine process (``EngineCore``): a step that raises ends the requests it held
(``Engine.recover``), waiting ones stay queued; after ``MAX_CONSECUTIVE_FAILED_STEPS`` in a
row, or a failed recovery, the loop must stop (``why`` says why)."""

from __future__ import annotations

import logging

from optimus.core.outputs import RequestOutput

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILED_STEPS = 3


class StepGuard:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.failures = 0  # consecutive steps that raised
        self.why = ""  # set when ``step`` returns None

    def step(self) -> list[RequestOutput] | None:
        """One engine step's outputs (a failed step's: its requests ended with an error);
        None once the loop cannot continue."""
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self.failures += 1
            log.exception("engine step failed (%d in a row); ending its requests", self.failures)
            return self._recover(exc)
        self.failures = 0
        return outputs

    def _recover(self, exc: Exception) -> list[RequestOutput] | None:
        if self.failures < MAX_CONSECUTIVE_FAILED_STEPS:
            try:
                return self.engine.recover(exc)
            except Exception:
                log.exception("engine recovery failed")
        self.why = f"engine loop stopped after {self.failures} failed steps: {type(exc).__name__}: {exc}"
        return None
