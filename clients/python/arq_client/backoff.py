"""Reconnection delays, as libarq computes them."""
from __future__ import annotations

import random as _random
from typing import Callable


def backoff_delay(n: int, base: float, cap: float, rand: Callable[[], float] = _random.random) -> float:
    """Delay in seconds before reconnection attempt ``n`` (0-based): uniform
    in [0, min(cap, base * 2**n)] ("full jitter"), so that clients cut at the
    same moment do not all come back at the same moment."""
    ceiling = cap if n >= 64 else min(cap, base * (2**n))
    return rand() * ceiling
