"""Stop strings: release generated text as it comes, except a tail that may be the start
of a stop string, and find the first occurrence of any (the text ends before it)."""

from __future__ import annotations


class StopText:
    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._held = ""  # text not released yet: it may begin a stop string

    def push(self, delta: str) -> tuple[str, bool]:
        """The text `delta` releases, and whether a stop string was found (no text after it
        is released, ever)."""
        text = self._held + delta
        found = [at for at in (text.find(stop) for stop in self._stops) if at >= 0]
        if found:
            self._held = ""
            return text[:min(found)], True
        held = max((n for stop in self._stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                    if text.endswith(stop[:n])), default=0)
        self._held = text[len(text) - held:] if held else ""
        return text[:len(text) - held], False

    def flush(self) -> str:
        """The generation ended without a stop: what was held back is text after all."""
        held, self._held = self._held, ""
        return held
