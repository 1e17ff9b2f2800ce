"""Alternating timings: every contender runs once per round, so load changes on a shared machine hit all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def alternate(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each contender, `repeats` rounds after `warmup` untimed ones; the order rotates."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b), measured in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def spread(values: Sequence[float]) -> str:
    """'min–max' of a list of seconds, in ms."""
    return f"{min(values) * 1e3:.0f}–{max(values) * 1e3:.0f}"
