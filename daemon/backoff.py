"""Capped exponential backoff with jitter, shared by the replication loop and the alerter."""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff with jitter; the caller sleeps, so tests can shrink it."""

    def __init__(self, initial: float, cap: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * (2**self.attempt))
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
