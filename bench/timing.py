"""Noise-resistant timing: batches long enough for the clock, interleaved
rounds over the implementations, medians; and a dependency-free progress bar."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Sequence


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line every
    10% otherwise (logs, CI)."""

    def __init__(self, total: float, stream=None, width: int = 30):
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_decile = -1
        self.label = ""

    def advance(self, amount: float = 1.0, label: str | None = None) -> None:
        self.done = min(self.total, self.done + amount)
        if label is not None:
            self.label = label
        self._draw()

    def set_label(self, label: str) -> None:
        self.label = label
        self._draw()

    def _draw(self) -> None:
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.start
        if self.tty:
            filled = int(round(frac * self.width))
            bar = "#" * filled + "." * (self.width - filled)
            text = f"\r[{bar}] {frac * 100:5.1f}% {elapsed:6.1f}s  {self.label}"
            self.stream.write(text[:118].ljust(118))
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(f"[bench] {frac * 100:3.0f}% {elapsed:6.1f}s  {self.label}\n")
                self.stream.flush()

    def close(self) -> None:
        self.done = self.total
        if self.tty:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


def calibrate(step: Callable[[], None], min_batch_s: float, max_batch: int = 4096) -> int:
    """How many calls of `step` one timed batch needs to last min_batch_s."""
    t0 = time.perf_counter()
    step()
    one = time.perf_counter() - t0
    if one <= 0:
        return max_batch
    return int(max(1, min(max_batch, round(min_batch_s / one))))


def time_batch(step: Callable[[], None], k: int) -> float:
    """Seconds per call, over k back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(k):
        step()
    return (time.perf_counter() - t0) / k


def interleaved(
    steps: dict[str, Callable[[], None]],
    rounds: int,
    min_batch_s: float,
    warmup: int = 2,
    on_round: Callable[[str, int], None] | None = None,
) -> dict[str, list[float]]:
    """Time every step once per round, rotating the order each round, so slow
    drifts of the machine (other tenants, frequency, page cache) hit every
    implementation alike. Returns the per-call seconds of each round."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    batch = {name: calibrate(steps[name], min_batch_s) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            samples[name].append(time_batch(steps[name], batch[name]))
            if on_round is not None:
                on_round(name, r)
    return samples


def summarize(samples: Sequence[float]) -> dict[str, float | list[float]]:
    s = sorted(samples)
    q1, q3 = (s[len(s) // 4], s[(3 * len(s)) // 4]) if len(s) >= 4 else (s[0], s[-1])
    return {
        "median_s": statistics.median(s),
        "min_s": s[0],
        "q1_s": q1,
        "q3_s": q3,
        "samples_s": list(samples),
    }
