"""Apportioning an integer total: real shares in, integers out that sum to the total exactly."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ecoflap_cli.errors import PlanError


def largest_remainder(shares: Sequence[float], caps: Sequence[int] | None, total: int) -> list[int]:
    """Round non-negative real ``shares`` to integers that sum to ``total`` exactly.

    Largest-remainder (Hamilton) rounding: every share starts at its floor (at most its cap), then
    the shortfall is handed out one unit at a time in order of decreasing fractional part, ties to
    the lower index, skipping groups at their cap and going round again if needed; an excess is
    taken back in the reverse order from non-zero counts.  ``caps=None`` means no caps.  The
    result is a pure function of the arguments.  Raises PlanError when the caps cannot hold
    ``total`` (or ``total`` is negative and nothing can be taken back).
    """
    limits: list[float] = [math.inf] * len(shares) if caps is None else [float(c) for c in caps]
    counts: list[int] = [int(min(math.floor(s), c)) for s, c in zip(shares, limits)]
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    left = int(total - sum(counts))
    while left > 0:
        open_groups = [i for i in order if counts[i] < limits[i]][:left]
        if not open_groups:
            raise PlanError("budget exceeds the total capacity of the groups")
        for i in open_groups:
            counts[i] += 1
        left -= len(open_groups)
    while left < 0:
        nonzero = [i for i in reversed(order) if counts[i] > 0][:-left]
        if not nonzero:
            raise PlanError(f"cannot apportion a negative total {total}")
        for i in nonzero:
            counts[i] -= 1
        left += len(nonzero)
    return counts
