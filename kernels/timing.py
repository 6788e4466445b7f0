"""Wall-clock timing shared by the kernel benchmarks."""
from __future__ import annotations

import statistics
import time

import jax


def time_calls(fn, *args, calls: int = 10, reps: int = 3) -> float:
    """Median over `reps` of the mean seconds of `calls` calls dispatched back to back, one sync at
    the end (as consecutive decode steps run: no host round trip per call), after a warm-up call."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            r = fn(*args)
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t0) / calls)
    return statistics.median(out)
