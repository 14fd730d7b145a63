"""Property tests of the allocation rules: exact budget, caps, monotonicity, uniformity."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ecoflap_cli import allocation
from ecoflap_cli.errors import PlanError

sizes_st = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=24)
target_st = st.floats(min_value=0.0, max_value=0.95)


@st.composite
def request(draw):
    sizes = draw(sizes_st)
    scores = draw(st.lists(st.floats(min_value=0.0, max_value=1e3, allow_nan=False),
                           min_size=len(sizes), max_size=len(sizes)))
    target = draw(target_st)
    cap = draw(st.floats(min_value=target, max_value=1.0))
    return sizes, scores, target, cap


@given(request())
@settings(max_examples=300, deadline=None)
def test_ecoflap_meets_budget_and_cap(req):
    sizes, scores, target, cap = req
    alloc = allocation.ecoflap(sizes, scores, target, cap)
    assert sum(alloc.keep_counts) == allocation.keep_budget(sizes, target)
    # budget met to within one weight per group (it is exact in keep counts)
    assert abs(alloc.global_sparsity - target) <= len(sizes) / sum(sizes) + 1e-12
    for keep, n in zip(alloc.keep_counts, sizes):
        assert 0 <= keep <= n
        # no group sparser than the cap (ceil of the floor can only make it denser)
        assert 1 - keep / n <= cap + 1.0 / n + 1e-12


@given(sizes_st, target_st)
@settings(max_examples=200, deadline=None)
def test_uniform_is_uniform_and_exact(sizes, target):
    alloc = allocation.uniform(sizes, target)
    assert sum(alloc.keep_counts) == allocation.keep_budget(sizes, target)
    for keep, n in zip(alloc.keep_counts, sizes):
        assert abs(keep - n * (1 - target)) <= 1.0 + 1e-9


@given(st.integers(1, 20), st.integers(10, 2000), st.floats(0.0, 1e3), target_st)
@settings(max_examples=200, deadline=None)
def test_equal_scores_equal_sizes_give_uniform_plan(groups, size, score, target):
    alloc = allocation.ecoflap([size] * groups, [score] * groups, target, min(target + 0.1, 1.0))
    assert max(alloc.keep_counts) - min(alloc.keep_counts) <= 1


@given(request(), st.integers(0, 23), st.floats(1.0, 100.0))
@settings(max_examples=300, deadline=None)
def test_raising_a_score_never_lowers_that_groups_keep(req, index, factor):
    sizes, scores, target, cap = req
    assume(index < len(sizes))
    base = allocation.ecoflap(sizes, scores, target, cap).keep_counts[index]
    raised = list(scores)
    raised[index] = scores[index] * factor + 1e-3
    # one weight of slack for largest-remainder rounding
    assert allocation.ecoflap(sizes, raised, target, cap).keep_counts[index] >= base - 1


def test_monotone_in_scores_across_groups():
    sizes = [1000] * 5
    scores = [1.0, 2.0, 3.0, 4.0, 5.0]
    alloc = allocation.ecoflap(sizes, scores, 0.6, 0.8)
    assert list(alloc.keep_counts) == sorted(alloc.keep_counts)
    assert alloc.keep_counts[0] < alloc.keep_counts[-1]


def test_water_filling_redistributes_capped_excess():
    # one group with a huge score would take more than it has; the excess goes to the others
    sizes = [100, 100, 100]
    alloc = allocation.ecoflap(sizes, [1000.0, 1.0, 1.0], 0.5, 0.9)
    assert alloc.keep_counts[0] == 100
    assert sum(alloc.keep_counts) == 150
    assert alloc.keep_counts[1] == alloc.keep_counts[2] == 25


def test_cap_floor_is_respected_with_zero_scores():
    alloc = allocation.ecoflap([100, 100], [0.0, 5.0], 0.5, 0.6)
    assert alloc.keep_counts[0] == 40  # floor: keeps 1 - 0.6
    assert alloc.keep_counts[1] == 60


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sizes=[10], scores=[1.0], target=1.0, max_sparsity=1.0), "sparsity must be in"),
        (dict(sizes=[10], scores=[1.0], target=-0.1, max_sparsity=0.5), "sparsity must be in"),
        (dict(sizes=[10], scores=[1.0], target=0.6, max_sparsity=0.5), "below the target"),
        (dict(sizes=[], scores=[], target=0.5, max_sparsity=0.6), "no prunable groups"),
        (dict(sizes=[10, 0], scores=[1.0, 1.0], target=0.5, max_sparsity=0.6), "positive"),
        (dict(sizes=[10], scores=[math.nan], target=0.5, max_sparsity=0.6), "finite"),
    ],
)
def test_impossible_requests_are_clear_errors(kwargs, message):
    with pytest.raises(PlanError, match=message):
        allocation.ecoflap(**kwargs)


@given(sizes_st, target_st, st.floats(0.0, 0.05))
@settings(max_examples=200, deadline=None)
def test_depth_schedule_exact_mean_and_rising(sizes, target, step):
    alloc = allocation.depth(sizes, target, step)
    assert sum(alloc.keep_counts) == allocation.keep_budget(sizes, target)
    if len(set(sizes)) == 1 and step >= 0.01 and 0.2 < target < 0.8 and len(sizes) > 2:
        sp = alloc.sparsities
        assert sp[0] <= sp[-1]


@given(request(), st.floats(0.0, 0.2))
@settings(max_examples=200, deadline=None)
def test_owl_exact_budget_and_range(req, lam):
    sizes, ratios, target, _ = req
    alloc = allocation.owl(sizes, ratios, target, lam)
    assert sum(alloc.keep_counts) == allocation.keep_budget(sizes, target)


def test_owl_prunes_outlier_rich_blocks_less():
    alloc = allocation.owl([1000] * 4, [0.01, 0.02, 0.03, 0.04], 0.6, 0.08)
    sp = alloc.sparsities
    assert sp[0] > sp[1] > sp[2] > sp[3]
    assert abs(sp[0] - sp[3] - 0.16) < 0.01
