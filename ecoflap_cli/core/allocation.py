"""Pure allocation rules: group sizes and scores in, per-group keep counts out.

Every allocator returns integer keep counts (weights left non-zero per group) whose sum equals
the global budget ``round(N * (1 - target))`` exactly, so the achieved global sparsity equals the
target to within one weight. Nothing here knows about torch, models or the command line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ecoflap_cli.core.rounding import largest_remainder
from ecoflap_cli.errors import PlanError

ALLOCATORS = ("ecoflap", "uniform", "owl", "depth", "rank", "mix")


@dataclass(frozen=True)
class Allocation:
    """Keep counts per group, plus the sparsity each count implies."""

    keep_counts: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def sparsities(self) -> tuple[float, ...]:
        return tuple(1.0 - k / n for k, n in zip(self.keep_counts, self.sizes))

    @property
    def global_sparsity(self) -> float:
        return 1.0 - sum(self.keep_counts) / sum(self.sizes)


def check_request(sizes: Sequence[int], target: float, max_sparsity: float | None = None) -> None:
    """Raise PlanError for requests no allocator can satisfy."""
    if not sizes:
        raise PlanError("no prunable groups: the model has nothing to prune")
    if any(n <= 0 for n in sizes):
        raise PlanError("every group must have a positive parameter count")
    if not 0.0 <= target < 1.0:
        raise PlanError(f"sparsity must be in [0, 1), got {target}")
    if max_sparsity is not None:
        if not 0.0 <= max_sparsity <= 1.0:
            raise PlanError(f"--max-sparsity must be in [0, 1], got {max_sparsity}")
        if max_sparsity < target:
            raise PlanError(
                f"--max-sparsity {max_sparsity} is below the target sparsity {target}: no plan can reach the target"
            )


def keep_budget(sizes: Sequence[int], target: float) -> int:
    """Weights to keep over all groups: round(N * (1 - target))."""
    return int(round(sum(sizes) * (1.0 - target)))


def water_fill(weights: Sequence[float], capacities: Sequence[int], total: float) -> list[float]:
    """Split ``total`` in proportion to ``weights``, capping each share at its capacity.

    A share that would pass its capacity is fixed there and its excess goes to the others, in
    proportion to their weights, until nothing moves. Zero total weight among the open groups
    falls back to proportional-to-capacity so the budget is still spent.
    """
    shares = [0.0] * len(weights)
    open_groups = {i for i, c in enumerate(capacities) if c > 0}
    left = float(total)
    while left > 1e-9 and open_groups:
        basis = {i: max(float(weights[i]), 0.0) for i in open_groups}
        if sum(basis.values()) <= 0.0:
            basis = {i: float(capacities[i] - shares[i]) for i in open_groups}
        norm = sum(basis.values())
        proposal = {i: left * basis[i] / norm for i in open_groups}
        full = [i for i in open_groups if shares[i] + proposal[i] >= capacities[i]]
        if not full:
            for i in open_groups:
                shares[i] += proposal[i]
            break
        for i in full:
            left -= capacities[i] - shares[i]
            shares[i] = float(capacities[i])
            open_groups.discard(i)
    return shares


def _check_scores(scores: Sequence[float], sizes: Sequence[int]) -> None:
    if len(scores) != len(sizes):
        raise PlanError(f"{len(scores)} scores for {len(sizes)} groups")
    if any(not math.isfinite(s) or s < 0 for s in scores):
        raise PlanError("scores must be finite and non-negative")


def ecoflap(
    sizes: Sequence[int],
    scores: Sequence[float],
    target: float,
    max_sparsity: float | None = None,
    temperature: float = 1.0,
) -> Allocation:
    """ECoFLaP's rule: a floor from the cap, the rest of the budget water-filled by score.

    ``temperature`` T water-fills by score^(1/T) instead of the score itself: T = 1 is the paper's
    rule, T > 1 flattens the allocation towards equal shares, T < 1 sharpens it.
    """
    cap = min(target + 0.1, 1.0) if max_sparsity is None else max_sparsity
    check_request(sizes, target, cap)
    _check_scores(scores, sizes)
    if not (math.isfinite(temperature) and temperature > 0):
        raise PlanError(f"temperature must be positive, got {temperature}")
    if temperature != 1.0:
        top = max(scores) or 1.0  # normalise first so that s^(1/T) cannot overflow
        scores = [(s / top) ** (1.0 / temperature) for s in scores]
    budget = keep_budget(sizes, target)
    floors = [min(n, math.ceil(n * (1.0 - cap) - 1e-9)) for n in sizes]
    if sum(floors) > budget:
        # Rounding of the floors alone can overshoot by < one weight per group.
        floors = largest_remainder([n * (1.0 - cap) for n in sizes], list(sizes), budget)
    capacities = [n - f for n, f in zip(sizes, floors)]
    extra = water_fill(scores, capacities, budget - sum(floors))
    extra_counts = largest_remainder(extra, capacities, budget - sum(floors))
    keep = tuple(f + e for f, e in zip(floors, extra_counts))
    return Allocation(keep, tuple(sizes))


def from_sparsities(sizes: Sequence[int], sparsities: Sequence[float], target: float) -> Allocation:
    """Turn per-group sparsities into keep counts meeting the exact budget.

    The real keep shares are corrected by parameter count so that they sum to the budget, then
    rounded with largest remainders.
    """
    check_request(sizes, target)
    budget = keep_budget(sizes, target)
    shares = [n * (1.0 - min(max(s, 0.0), 1.0)) for n, s in zip(sizes, sparsities)]
    total = sum(shares)
    if total <= 0:
        raise PlanError("every group would be pruned entirely")
    # Shift every group's sparsity by one common offset (found by bisection) so that the
    # parameter-weighted mean is exactly the target while staying inside [0, 1].
    lo, hi = -1.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        kept = sum(n * (1.0 - min(max(s + mid, 0.0), 1.0)) for n, s in zip(sizes, sparsities))
        if kept > budget:
            lo = mid
        else:
            hi = mid
    shares = [n * (1.0 - min(max(s + hi, 0.0), 1.0)) for n, s in zip(sizes, sparsities)]
    return Allocation(tuple(largest_remainder(shares, list(sizes), budget)), tuple(sizes))


def uniform(sizes: Sequence[int], target: float) -> Allocation:
    """The Wanda / SparseGPT baseline: every group at the target sparsity."""
    return from_sparsities(sizes, [target] * len(sizes), target)


def depth(sizes: Sequence[int], target: float, step: float = 0.01) -> Allocation:
    """Sparsity rising linearly with block index (ATP-style), mean exactly the target.

    ``step`` is the sparsity added per block of depth; the schedule is centred so that its
    parameter-weighted mean equals the target, then clipped to [0, 1].
    """
    if step < 0:
        raise PlanError(f"depth step must be non-negative, got {step}")
    raw = [target + step * i for i in range(len(sizes))]
    return from_sparsities(sizes, raw, target)


def owl(
    sizes: Sequence[int],
    outlier_ratios: Sequence[float],
    target: float,
    lam: float = 0.08,
) -> Allocation:
    """OWL: blocks with more outliers are pruned less, within [target - lam, target + lam].

    Outlier ratios (share of Wanda scores above M x their layer mean) are mapped linearly so the
    highest ratio gets ``target - lam`` and the lowest ``target + lam``; the parameter-weighted
    mean is then corrected to the target exactly (OWL itself assumes equal block sizes).
    """
    check_request(sizes, target)
    if len(outlier_ratios) != len(sizes):
        raise PlanError(f"{len(outlier_ratios)} outlier ratios for {len(sizes)} groups")
    if lam < 0:
        raise PlanError(f"OWL lambda must be non-negative, got {lam}")
    low, high = min(outlier_ratios), max(outlier_ratios)
    spread = high - low
    if spread <= 0:
        raw = [target] * len(sizes)
    else:
        raw = [target + lam - 2 * lam * (r - low) / spread for r in outlier_ratios]
    return from_sparsities(sizes, raw, target)


def centered_ranks(values: Sequence[float]) -> list[float]:
    """Ranks mapped linearly onto [-1, 1]: the largest value gets +1, the smallest -1.

    Tied values share the mean of their ranks, so equal scores always get equal sparsity.
    """
    n = len(values)
    if n == 1:
        return [0.0]
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return [2.0 * r / (n - 1) - 1.0 for r in ranks]


def rank(sizes: Sequence[int], scores: Sequence[float], target: float, lam: float = 0.1) -> Allocation:
    """Sparsity linear in the *rank* of the global score, within [target - lam, target + lam].

    The most important block is pruned least (target - lam), the least important most. Only the
    order of the scores matters, so a noisy estimate can only move a block by the ranks it swaps,
    and one outlier score cannot starve every other block (the proportional rule's weakness).
    With scores that fall steadily with depth this is the depth schedule with step 2 lam / (n - 1).
    The parameter-weighted mean is corrected to the target exactly.
    """
    check_request(sizes, target)
    _check_scores(scores, sizes)
    if lam < 0:
        raise PlanError(f"rank lambda must be non-negative, got {lam}")
    return from_sparsities(sizes, [target - lam * r for r in centered_ranks(scores)], target)


def mix(
    sizes: Sequence[int],
    scores: Sequence[float],
    positions: Sequence[float],
    target: float,
    lam: float = 0.15,
    alpha: float = 0.5,
) -> Allocation:
    """A blend of the depth schedule and the score-rank rule.

    ``positions`` are each block's depth in [0, 1] (0 the first block of its tower). Sparsity is
    target + lam * (alpha * (2 position - 1) - (1 - alpha) * rank), with rank in [-1, 1] as in
    :func:`rank`: alpha = 1 is a depth schedule of half-range lam, alpha = 0 the rank rule.
    The parameter-weighted mean is corrected to the target exactly.
    """
    check_request(sizes, target)
    _check_scores(scores, sizes)
    if len(positions) != len(sizes) or any(not 0.0 <= x <= 1.0 for x in positions):
        raise PlanError("mix needs one depth position in [0, 1] per group")
    if lam < 0 or not 0.0 <= alpha <= 1.0:
        raise PlanError(f"mix needs lam >= 0 and alpha in [0, 1], got lam={lam}, alpha={alpha}")
    ranks = centered_ranks(scores)
    raw = [target + lam * (alpha * (2 * x - 1) - (1 - alpha) * r) for x, r in zip(positions, ranks)]
    return from_sparsities(sizes, raw, target)
