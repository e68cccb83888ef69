"""Stop strings in decoded text, shared by the in-process postprocessor and the HTTP front-ends' streams."""

from __future__ import annotations


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def hold_back_stop_prefix(text: str, stops: tuple[str, ...]) -> str:
    """Withhold a tail that could still grow into a stop string, so streams never show it."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[:len(text) - hold] if hold else text
