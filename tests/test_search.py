"""The search allocator: exact budget on the level grid, seeded, resumable, elitist."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.core import allocation
from ecoflap_cli.engine.search import SearchSettings, level, level_bounds, mutate, search_levels, snap
from ecoflap_cli.io.loading import load_model
from ecoflap_cli.models import get_adapter
from ecoflap_cli.stages import driver


def size_classes(sizes):
    """Indices of blocks of equal size, grouped (the budget's classes)."""
    classes: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        classes.setdefault(size, []).append(i)
    return list(classes.values())


@given(
    st.lists(st.integers(1, 4), min_size=2, max_size=12),
    st.floats(0.05, 0.9),
    st.sampled_from([0.01, 0.05, 0.1]),
    st.integers(0, 10_000),
)
@example(size_ids=[1, 1], target=0.15, step=0.05, seed=0)  # 0.15 - 3 x 0.05 < 0 in floating point
@settings(max_examples=150, deadline=None)
def test_snap_and_mutations_keep_every_class_at_the_target(size_ids, target, step, seed):
    groups = size_classes(size_ids)
    low, high = level_bounds(target, step, 0.2)
    rng = random.Random(seed)
    offsets = [rng.uniform(-0.3, 0.3) for _ in size_ids]
    levels = snap(offsets, groups, step, low, high)
    for _ in range(20):
        for members in groups:
            assert sum(levels[i] for i in members) == 0
        assert all(low <= k <= high for k in levels)
        assert all(-1e-9 <= target + k * step <= 0.99 + 1e-9 for k in levels)  # up to round-off
        assert all(0.0 <= level(target, k, step) <= 0.99 for k in levels)  # what the search installs
        levels = mutate(levels, groups, low, high, rng, moves=3)


@pytest.fixture(scope="module")
def tiny(tiny_llama, calib_text):
    loaded = load_model(str(tiny_llama))
    adapter = get_adapter(loaded.model)
    opts = driver.CalibrationOptions(str(calib_text), samples=8, seqlen=32, batch_size=4, seed=0)
    batches, prov = driver.calibration_batches(loaded, adapter, opts)
    return loaded, adapter, batches, prov


class Stop(Exception):
    """An interruption of the search (a kill, as far as its state file can tell)."""


def interrupt_at(generation: int):
    """A progress callback that stops the search as generation ``generation`` is reported."""

    def interrupt(message: str) -> None:
        if message.startswith(f"search generation {generation}/"):
            raise Stop

    return interrupt


def _run(tiny, progress=None, **overrides):
    _loaded, adapter, batches, _prov = tiny
    # a deliberately poor start (a steep depth schedule) so that the tiny model has room to improve
    options = dict(target=0.7, step=0.1, generations=5, offspring=6, survivors=2, seed=0, start="depth", depth_step=0.1)
    options.update(quick=4, full=8)  # the tests' own selection, whatever the defaults
    options.update(overrides)
    return search_levels(adapter, batches, SearchSettings(**options), progress)


def test_search_improves_monotonically_and_restores_the_model(tiny):
    loaded, _adapter, _batches, _prov = tiny
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    levels, record = _run(tiny)
    history = record["history"]
    assert len(history) == 6  # the start and one per generation
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert history[-1] < history[0], "the search found nothing better than its start on the tiny model"
    assert record["fitness_kind"] == "kl"
    for name, value in loaded.model.state_dict().items():  # dense weights are back
        assert value.equal(before[name]), name
    # on the grid, and the mean is the target exactly (all blocks have the same size)
    assert all(abs(round((s - 0.7) / 0.1) * 0.1 - (s - 0.7)) < 1e-9 for s in levels.values())
    assert sum(levels.values()) / len(levels) == pytest.approx(0.7, abs=1e-9)
    # what it held beyond the model: a dense copy (fp32) and an int16 rank per prunable weight,
    # and the dense model's log-probabilities (fp16) on every calibration token
    prunable = sum(lin.weight.numel() for b in _adapter.blocks() for lin in b.linears.values())
    tokens = sum(b["input_ids"].numel() for b in _batches)
    vocab = loaded.model.config.vocab_size
    assert record["memory_bytes"] == {"dense_weights": 4 * prunable, "ranks": 2 * prunable,
                                      "dense_logprobs": 2 * tokens * vocab}  # fmt: skip


def test_search_is_reproducible_with_a_seed_and_differs_across_seeds(tiny):
    a = _run(tiny)
    b = _run(tiny)
    assert a[0] == b[0] and a[1]["history"] == b[1]["history"]
    c = _run(tiny, seed=7)
    assert c[1]["history"] != a[1]["history"] or c[0] != a[0]


def test_search_resumes_after_an_interruption_to_the_same_result(tiny, tmp_path):
    _loaded, adapter, batches, _prov = tiny
    state = tmp_path / "search.json"
    options = dict(target=0.7, step=0.1, generations=5, offspring=6, survivors=2, seed=0, start="depth", depth_step=0.1)
    full = search_levels(adapter, batches, SearchSettings(**options))

    with pytest.raises(Stop):
        search_levels(adapter, batches, SearchSettings(**options, state=str(state)), interrupt_at(3))
    saved = json.loads(state.read_text())
    assert saved["generation"] == 3
    resumed = search_levels(adapter, batches, SearchSettings(**options, state=str(state)))
    assert resumed[0] == full[0]
    assert resumed[1]["history"] == full[1]["history"]
    other = SearchSettings(**{**options, "step": 0.05}, state=str(state))
    with pytest.raises(Exception, match="another search"):
        search_levels(adapter, batches, other)


def test_search_plan_keeps_the_exact_budget_on_the_grid(tiny):
    loaded, adapter, batches, prov = tiny
    levels, record = _run(tiny, generations=2)
    from ecoflap_cli.io import artifacts

    scores = artifacts.scores_document(driver.model_info(loaded, adapter), adapter.blocks(), levels, record, prov)
    plan = driver.allocate(scores, 0.7)  # auto picks search for search levels
    assert plan["allocator"]["name"] == "search"
    sizes = [g["params"] for g in scores["groups"]]
    counts = artifacts.prune_counts(plan)
    total_zeros = sum(counts.values())
    assert sum(sizes) - total_zeros == allocation.keep_budget(sizes, 0.7)
    by_block = {g["name"]: 0 for g in scores["groups"]}
    for tensor, zeros in counts.items():
        block = next(b for b in by_block if tensor.startswith(b + "."))
        by_block[block] += zeros
    for g in scores["groups"]:
        assert abs(by_block[g["name"]] - levels[g["name"]] * g["params"]) <= 1.0
    with pytest.raises(Exception, match="found for sparsity"):
        driver.allocate(scores, 0.6, "search")
    with pytest.raises(Exception, match="search levels go with"):
        driver.allocate(scores, 0.7, "mix")


def test_one_shot_prune_with_the_search_allocator(tiny_llama, calib_text, tmp_path):
    out = tmp_path / "pruned"
    result = CliRunner().invoke(
        app,
        [
            "prune",
            "--model",
            str(tiny_llama),
            "--sparsity",
            "0.5",
            "--allocator",
            "search",
            "--score-param",
            "generations=2",
            "--score-param",
            "offspring=3",
            "--calib",
            str(calib_text),
            "--samples",
            "4",
            "--seqlen",
            "32",
            "--score-samples",
            "8",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["allocator"]["name"] == "search"
    scores = json.loads((out / "scores.json").read_text())
    assert scores["method"]["name"] == "search" and scores["method"]["target"] == 0.5
    assert len(scores["method"]["history"]) == 3
    # by default the search refines the coarse stage's plan, from its gradient-norm scores
    assert scores["method"]["started_from"] == "ecoflap" and scores["method"]["start_scoring"]["name"] == "first"


def test_search_needs_a_target_and_checks_its_settings(tiny_llama, calib_text, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(
        app, ["score", "--model", str(tiny_llama), "--method", "search", "-o", str(tmp_path / "s.json")]
    )
    assert bad.exit_code != 0 and "target sparsity" in bad.output
    bad = runner.invoke(
        app,
        ["prune", "--model", str(tiny_llama), "-s", "0.5", "--allocator", "search", "--score-param", "gens=-1"],
    )
    assert bad.exit_code != 0 and "generations" in bad.output
    assert not (tmp_path / "s.json").exists()


def test_best_start_is_the_start_with_the_lower_fitness(tiny):
    _levels, record = _run(tiny, start="best", generations=0)
    fits = record["start_fitnesses"]
    assert set(fits) == {"uniform", "depth"}
    assert record["started_from"] == min(fits, key=fits.get)
    assert record["start_fitness"] == min(fits.values()) == record["final_fitness"]
    # the steep depth start is the worse one on the tiny model: the search starts from uniform
    assert record["started_from"] == "uniform"


@given(
    st.lists(st.tuples(st.integers(1, 3), st.floats(0.2, 0.8)), min_size=2, max_size=12),
    st.sampled_from([0.01, 0.05, 0.1]),
    st.integers(0, 10_000),
)
@settings(max_examples=150, deadline=None)
def test_mutations_around_a_per_block_base_keep_its_budget_and_bounds(blocks, step, seed):
    """The ecoflap start: levels base_b + k_b step, each block within its own bounds, and the
    parameter-weighted mean of every class stays that of the base."""
    from ecoflap_cli.engine.search import block_bounds

    sizes = [s * 1000 for s, _ in blocks]
    base = [b for _, b in blocks]
    groups = size_classes(sizes)
    lows, highs = block_bounds(base, step, 0.2)
    rng = random.Random(seed)
    levels = [0] * len(base)
    for _ in range(30):
        levels = mutate(levels, groups, lows, highs, rng, moves=3)
        assert all(lo <= k <= hi for lo, k, hi in zip(lows, levels, highs))
        assert all(-1e-9 <= b + k * step <= 0.99 + 1e-9 and abs(k * step) <= 0.2 + 1e-9 for b, k in zip(base, levels))
        for members in groups:
            assert sum(levels[i] for i in members) == 0


def test_ecoflap_start_is_the_coarse_plan_and_the_search_refines_it(tiny, tmp_path):
    """start=ecoflap: with no generation the levels are the plan `--allocator ecoflap` makes from
    the default scores; with generations the fitness only falls, and a resumed search keeps the
    base it started from."""
    loaded, adapter, batches, prov = tiny
    from ecoflap_cli.core.methods import SCORING
    from ecoflap_cli.engine.score_methods import auto
    from ecoflap_cli.io import artifacts

    scores, record = auto(adapter, batches, SCORING.get("auto").settings({"seed": 0}), None)
    document = artifacts.scores_document(driver.model_info(loaded, adapter), adapter.blocks(), scores, record, prov)
    plan = driver.allocate(document, 0.7, "ecoflap")
    expected = {g["name"]: g["sparsity"] for g in plan["groups"]}
    assert len(set(expected.values())) > 1  # a non-uniform plan, or the test shows nothing

    levels, start = _run(tiny, start="ecoflap", generations=0)
    assert start["started_from"] == "ecoflap" and start["start_scoring"]["name"] == "first"
    assert levels.keys() == expected.keys()
    for name, value in levels.items():
        assert value == pytest.approx(expected[name], abs=1e-9), name

    options = dict(start="ecoflap", generations=4, offspring=6, max_offset=0.1)
    refined, searched = _run(tiny, **options)
    history = searched["history"]
    assert history[0] == pytest.approx(start["start_fitness"]) and all(b <= a for a, b in zip(history, history[1:]))
    sizes = {b.name: b.num_params for b in adapter.blocks()}
    mean = sum(refined[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert mean == pytest.approx(sum(expected[n] * sizes[n] for n in sizes) / sum(sizes.values()), abs=1e-9)
    assert all(abs(refined[n] - expected[n]) <= 0.1 + 1e-9 for n in sizes)

    state = tmp_path / "search.json"

    with pytest.raises(Stop):
        _run(tiny, **options, state=str(state), progress=interrupt_at(2))
    resumed, again = _run(tiny, **options, state=str(state))
    assert resumed == refined and again["history"] == history


def test_dense_log_probabilities_are_kept_only_for_the_measured_samples(tiny):
    """With full=2 of 8 samples the search holds the dense model's log-probabilities of 2 samples:
    the others are never measured, so they would only cost a forward pass and memory each."""
    loaded, _adapter, batches, _prov = tiny
    _levels, record = _run(tiny, generations=1, quick=1, full=2)
    seqlen = batches[0]["input_ids"].shape[1]
    assert record["memory_bytes"]["dense_logprobs"] == 2 * 2 * seqlen * loaded.model.config.vocab_size
