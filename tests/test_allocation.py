"""Property tests of the allocation rules: exact budget, caps, monotonicity, uniformity."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ecoflap_cli.core import allocation
from ecoflap_cli.errors import PlanError

sizes_st = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=24)
target_st = st.floats(min_value=0.0, max_value=0.95)


@st.composite
def request(draw):
    sizes = draw(sizes_st)
    scores = draw(
        st.lists(st.floats(min_value=0.0, max_value=1e3, allow_nan=False), min_size=len(sizes), max_size=len(sizes))
    )
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
    budget = allocation.keep_budget(sizes, target)
    assert sum(alloc.keep_counts) == budget
    # each group is within one weight of its exact share of the (integer) budget; measured against
    # n * (1 - target) instead, the budget's own rounding (up to half a weight, spread over all
    # groups) can add to a group's rounding and pass one weight (sizes [1, 2, 249, 249, 999] at 0.001)
    for keep, n in zip(alloc.keep_counts, sizes):
        assert abs(keep - n * budget / sum(sizes)) < 1.0 + 1e-9


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


# --- rules beyond the paper: temperature, score rank, depth + rank ------------------------------


@given(request(), st.floats(0.1, 10.0))
@settings(max_examples=200, deadline=None)
def test_temperature_keeps_budget_and_cap(req, temperature):
    sizes, scores, target, cap = req
    alloc = allocation.ecoflap(sizes, scores, target, cap, temperature)
    assert sum(alloc.keep_counts) == allocation.keep_budget(sizes, target)
    for keep, n in zip(alloc.keep_counts, sizes):
        assert 0 <= keep <= n and 1 - keep / n <= cap + 1.0 / n + 1e-12


def test_temperature_one_is_the_paper_rule_and_higher_flattens():
    sizes, scores = [10_000] * 6, [9.0, 5.0, 3.0, 2.0, 1.5, 1.0]
    paper = allocation.ecoflap(sizes, scores, 0.6)
    assert allocation.ecoflap(sizes, scores, 0.6, temperature=1.0) == paper
    spreads = [
        max(a.sparsities) - min(a.sparsities)
        for a in (allocation.ecoflap(sizes, scores, 0.6, temperature=t) for t in (0.5, 1.0, 2.0, 8.0))
    ]
    assert spreads == sorted(spreads, reverse=True) and spreads[0] > spreads[-1]
    with pytest.raises(PlanError, match="temperature"):
        allocation.ecoflap(sizes, scores, 0.6, temperature=0.0)


def test_centered_ranks_span_and_ties():
    assert allocation.centered_ranks([3.0, 1.0, 2.0]) == [1.0, -1.0, 0.0]
    assert allocation.centered_ranks([5.0]) == [0.0]
    tied = allocation.centered_ranks([1.0, 2.0, 2.0, 3.0])
    assert tied[1] == tied[2] and tied[0] == -1.0 and tied[3] == 1.0


@given(request(), st.floats(0.0, 0.3))
@settings(max_examples=200, deadline=None)
def test_rank_exact_budget(req, lam):
    sizes, scores, target, _ = req
    alloc = allocation.rank(sizes, scores, target, lam)
    assert sum(alloc.keep_counts) == allocation.keep_budget(sizes, target)
    assert all(0 <= k <= n for k, n in zip(alloc.keep_counts, sizes))


@given(
    st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=2, max_size=24, unique=True),
    st.floats(0.2, 0.8),
    st.floats(0.0, 0.15),
)
@settings(max_examples=200, deadline=None)
def test_rank_more_important_is_pruned_less_within_range(scores, target, lam):
    # ranks are only defined for scores that stay distinct after the monotone squash below
    assume(len({math.log1p(s) for s in scores}) == len(scores))
    n = 10_000
    alloc = allocation.rank([n] * len(scores), scores, target, lam)
    sp = alloc.sparsities
    by_score = sorted(range(len(scores)), key=lambda i: scores[i])
    for lo, hi in zip(by_score, by_score[1:]):  # higher score: never sparser (one weight of rounding)
        assert sp[hi] <= sp[lo] + 1.0 / n + 1e-12
    assert max(sp) <= target + lam + 1e-3 and min(sp) >= target - lam - 1e-3
    # only the order of the scores matters
    squashed = allocation.rank([n] * len(scores), [math.log1p(s) for s in scores], target, lam)
    assert squashed == alloc


@given(request(), st.floats(0.0, 0.3), st.floats(0.0, 1.0))
@settings(max_examples=200, deadline=None)
def test_mix_exact_budget(req, lam, alpha):
    sizes, scores, target, _ = req
    positions = [i / max(len(sizes) - 1, 1) for i in range(len(sizes))]
    alloc = allocation.mix(sizes, scores, positions, target, lam, alpha)
    assert sum(alloc.keep_counts) == allocation.keep_budget(sizes, target)


def test_mix_ends_are_depth_and_rank():
    sizes = [4000, 4000, 4000, 4000, 4000]
    scores = [1.0, 5.0, 2.0, 4.0, 3.0]
    positions = [i / 4 for i in range(5)]
    assert allocation.mix(sizes, scores, positions, 0.6, 0.1, 1.0) == allocation.depth(sizes, 0.6, 0.1 * 2 / 4)
    assert allocation.mix(sizes, scores, positions, 0.6, 0.1, 0.0) == allocation.rank(sizes, scores, 0.6, 0.1)
    with pytest.raises(PlanError, match="alpha"):
        allocation.mix(sizes, scores, positions, 0.6, 0.1, 1.5)


def test_plan_records_allocator_settings():
    from ecoflap_cli.stages import driver

    groups = [
        {
            "name": f"b{i}",
            "tower": "lm",
            "index": i,
            "params": 100,
            "score": float(s),
            "tensors": [{"name": f"b{i}.w", "numel": 100}],
        }
        for i, s in enumerate([3, 1, 2, 5])
    ]
    doc = {"model": {"id": "m"}, "groups": groups, "method": {"name": "first"}}
    plan = driver.allocate(doc, 0.5, "mix", {"lam": 0.2, "alpha": 0.25})
    assert plan["allocator"] == {"name": "mix", "per_tower": False, "lam": 0.2, "alpha": 0.25}
    assert sum(g["zeros"] for g in plan["groups"]) == 200
    plan = driver.allocate(doc, 0.5, "ecoflap", {"temperature": 2.0})
    assert plan["allocator"]["temperature"] == 2.0 and plan["allocator"]["max_sparsity"] == 0.6


def test_auto_allocator_follows_towers_and_score_kind():
    from ecoflap_cli.stages import driver

    def doc(towers, method="first"):
        groups = [
            {
                "name": f"{t}{i}",
                "tower": t,
                "index": i,
                "params": 100,
                "score": float(i + 1),
                "tensors": [{"name": f"{t}{i}.w", "numel": 100}],
            }
            for t in towers
            for i in range(3)
        ]
        return {"model": {"id": "m"}, "groups": groups, "method": {"name": method}}

    one = driver.allocate(doc(["language"]), 0.5, "auto")
    assert one["allocator"]["name"] == "ecoflap" and one["allocator"]["chosen"].startswith("auto: the paper's rule")
    assert one["allocator"]["max_sparsity"] == 0.6
    two = driver.allocate(doc(["vision", "language"]), 0.5, "auto")
    assert two["allocator"]["name"] == "ecoflap" and two["allocator"]["max_sparsity"] == 0.6
    owl = driver.allocate(doc(["language"], "owl"), 0.5, "auto")
    assert owl["allocator"]["name"] == "owl" and owl["allocator"]["lam"] == 0.08
    for plan in (one, two, owl):
        assert sum(g["zeros"] for g in plan["groups"]) == round(0.5 * sum(g["params"] for g in plan["groups"]))
