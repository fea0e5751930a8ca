"""Counters of the caches that sit on lotus_rt's hot paths, reported beside the worker stats.

A cache (the planner's plan cache, for one) asks for its counter once, by name, and counts
every lookup as a hit or a miss; ``Runtime.stats()`` returns the per-worker rows as before, in
a list that also carries ``caches``: name -> :class:`CacheStats` since the last reset.

    >>> counter = cache_counter("doc-example")
    >>> counter.hit(); counter.miss(); counter.snapshot()
    CacheStats(hits=1, misses=1)
"""
from __future__ import annotations

import threading
from typing import NamedTuple


class CacheStats(NamedTuple):
    hits: int
    misses: int


class CacheCounter:
    """Hits and misses of one cache; safe to count from several threads."""

    __slots__ = ("name", "_lock", "_hits", "_misses")

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def hit(self) -> None:
        with self._lock:
            self._hits += 1

    def miss(self) -> None:
        with self._lock:
            self._misses += 1

    def snapshot(self, reset: bool = False) -> CacheStats:
        with self._lock:
            stats = CacheStats(self._hits, self._misses)
            if reset:
                self._hits = self._misses = 0
        return stats


_counters: dict[str, CacheCounter] = {}
_lock = threading.Lock()


def cache_counter(name: str) -> CacheCounter:
    """The process-wide counter of the cache called ``name`` (made on first use)."""
    with _lock:
        counter = _counters.get(name)
        if counter is None:
            counter = _counters[name] = CacheCounter(name)
        return counter


def cache_stats(reset: bool = False) -> dict[str, CacheStats]:
    with _lock:
        counters = list(_counters.values())
    return {c.name: c.snapshot(reset) for c in counters}


class RunStats(list):
    """``list[WorkerStats]`` (one row per worker), plus ``caches``: name -> CacheStats."""

    def __init__(self, rows, caches: dict[str, CacheStats]):
        super().__init__(rows)
        self.caches = caches
