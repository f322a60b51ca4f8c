"""The pipeline's progress display: a status line per stage boundary, and the time-left estimate
from the median past durations of each stage at a preset (read from the stage cache's done.json)."""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from cf.stages import PlannedStage


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def past_durations(root: Path, preset: str) -> dict[str, float]:
    """Median seconds per stage over this preset's finished (not cached) stages under `root`."""
    seen: dict[str, list[float]] = {}
    for marker in root.glob("*/done.json"):
        with contextlib.suppress(OSError, ValueError):
            d = json.loads(marker.read_text())
            if d.get("preset") == preset and not d.get("resumed") and d.get("seconds") is not None:
                seen.setdefault(d["stage"], []).append(float(d["seconds"]))
    return {k: statistics.median(v) for k, v in seen.items()}


class PipelineProgress:
    """The pipeline's one status display: a line per stage boundary, between the stages' step bars.

        [pipeline ###--- 3/6] student running | done: teacher (cached), teacher_erft 0:04:10 |
            elapsed 0:04:12 | left ~0:15:30

    Time left sums the median past durations of the remaining stages at this preset (from the
    cache's done.json files); stages never timed before are named instead of guessed.
    """

    def __init__(
        self,
        stages: list[PlannedStage],
        estimates: dict[str, float],
        stream: TextIO | None = None,
        title: str = "pipeline",
    ):
        self.stages, self.estimates, self.title = stages, estimates, title
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.time()
        self.finished: dict[str, str] = {}  # stage -> "cached" | duration

    def _left(self, current: str | None, current_start: float | None) -> str:
        todo = [s.name for s in self.stages if s.name not in self.finished]
        unknown = [n for n in todo if n not in self.estimates]
        left = sum(self.estimates.get(n, 0.0) for n in todo)
        if current is not None and current in self.estimates and current_start is not None:
            left -= min(self.estimates[current], time.time() - current_start)
        text = f"left ~{_clock(max(0.0, left))}"
        if unknown:
            text = (
                f"left > {_clock(max(0.0, left))} (not timed yet: {', '.join(unknown)})"
                if left
                else f"left: unknown (not timed yet: {', '.join(unknown)})"
            )
        return text

    def _line(self, what: str, current: str | None = None, start: float | None = None) -> None:
        n, k = len(self.stages), len(self.finished)
        bar = "#" * k + "-" * (n - k)
        done = ", ".join(f"{s} {d}" for s, d in self.finished.items()) or "-"
        print(
            f"[{self.title} {bar} {k}/{n}] {what} | done: {done} | elapsed {_clock(time.time() - self.t0)}"
            f" | {self._left(current, start)}",
            file=self.stream,
            flush=True,
        )

    def start(self, ps: PlannedStage, resumed: bool) -> float:
        now = time.time()
        self._line(f"{ps.name} {'resuming' if resumed else 'running'} in {ps.dir}", ps.name, now)
        return now

    def end(self, ps: PlannedStage, seconds: float | None) -> None:
        self.finished[ps.name] = "cached" if seconds is None else _clock(seconds)

    def close(self) -> None:
        self._line("all stages done")
