"""Alternating A/B measurement: warm-up, then A and B in turns, medians and their ratio."""

from __future__ import annotations

import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Pair:
    a: list[float]
    b: list[float]

    @property
    def a_median(self) -> float:
        return statistics.median(self.a)

    @property
    def b_median(self) -> float:
        return statistics.median(self.b)

    @property
    def ratio(self) -> float:
        return self.a_median / self.b_median


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(a: Callable[[], object], b: Callable[[], object], runs: int, warmup: int = 1,
              before_a: Callable[[], object] | None = None, before_b: Callable[[], object] | None = None) -> Pair:
    """Run A and B in turns (ABAB...), after ``warmup`` untimed rounds; ``before_*`` run untimed."""
    pair = Pair([], [])
    for i in range(warmup + runs):
        if before_a:
            before_a()
        ta = timed(a)
        if before_b:
            before_b()
        tb = timed(b)
        if i >= warmup:
            pair.a.append(ta)
            pair.b.append(tb)
    return pair


def command(args: list[str], env: dict | None = None) -> Callable[[], None]:
    """A callable that runs a command and fails loudly if it fails."""
    def run() -> None:
        result = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.decode()[-500:]}")
    return run
