"""Streaming text assembly: incremental detokenization plus stop strings."""
from __future__ import annotations


class StopMatcher:
    """Feeds text through; holds back any tail that could still become a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.stopped = False

    def push(self, text: str) -> str:
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[:min(hits)], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(self.buf)) + 1)
                    if self.buf.endswith(s[:k])), default=0)
        out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out
