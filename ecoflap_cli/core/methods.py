"""The methods ecoflap knows: allocators, layer-wise solvers and scoring methods, each declared once.

Adding an allocator is one function (in :mod:`ecoflap_cli.core.allocation`, or anywhere) and one
``ALLOCATORS.add(Entry(...))``; the command line's choices, option checks, plan validation, the
sweep's ``ALLOCATOR[-SCORING]:SOLVER@key=value`` syntax and docs/methods.md follow from it.

Allocator functions take ``(groups, target, **settings)`` and return an
:class:`~ecoflap_cli.core.allocation.Allocation`. Solver functions take
``(weight, statistic, prune_count, *, group, nm, **settings)`` and prune ``weight`` in place.
Scoring functions take ``(adapter, batches, settings, progress)`` and return a score per block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ecoflap_cli.core import allocation
from ecoflap_cli.core.allocation import Allocation
from ecoflap_cli.core.registry import Entry, Param, Registry
from ecoflap_cli.errors import PlanError

ALLOCATORS = Registry("allocator")
SOLVERS = Registry("solver")
SCORING = Registry("scoring method")
RECONSTRUCTION = Registry("reconstruction")


@dataclass(frozen=True)
class Groups:
    """What an allocator sees of the blocks it shares the budget between."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    scores: tuple[float, ...] | None  # None when the scores file holds structure only
    depths: tuple[float, ...]  # each block's depth within its tower, in [0, 1]

    def need_scores(self, allocator: str) -> Sequence[float]:
        if self.scores is None:
            raise PlanError(f"allocator {allocator!r} needs scores; this scores file has none (run `ecoflap score`)")
        return self.scores


# --- allocators -------------------------------------------------------------------------------


def _uniform(groups: Groups, target: float) -> Allocation:
    return allocation.uniform(groups.sizes, target)


def _ecoflap(groups: Groups, target: float, max_sparsity: float, headroom: float, temperature: float) -> Allocation:
    return allocation.ecoflap(groups.sizes, groups.need_scores("ecoflap"), target, max_sparsity, temperature)


def _ecoflap_cap(settings: dict[str, Any], target: float) -> dict[str, Any]:
    """The cap every released ECoFLaP script uses: target + 0.1, unless given outright."""
    if settings["max_sparsity"] is None:
        return {**settings, "max_sparsity": round(min(target + settings["headroom"], 1.0), 10)}
    return settings


def _rank(groups: Groups, target: float, lam: float) -> Allocation:
    return allocation.rank(groups.sizes, groups.need_scores("rank"), target, lam)


def _mix(groups: Groups, target: float, lam: float, alpha: float) -> Allocation:
    return allocation.mix(groups.sizes, groups.need_scores("mix"), groups.depths, target, lam, alpha)


def _depth(groups: Groups, target: float, step: float) -> Allocation:
    return allocation.depth(groups.sizes, target, step)


def _owl(groups: Groups, target: float, lam: float) -> Allocation:
    return allocation.owl(groups.sizes, groups.need_scores("owl"), target, lam)


def _lam(default: float, what: str) -> Param:
    return Param(
        "lam", default, f"{what}: half-range of block sparsities around the target.", low=0.0, high=0.5, option="--lam"
    )


ALLOCATORS.add(
    Entry(
        "ecoflap",
        "ECoFLaP's rule (the paper): a floor from the cap, the rest of the keep budget "
        "water-filled in proportion to the scores.",
        _ecoflap,
        needs="scores",
        default_scoring="auto",
        finalize=_ecoflap_cap,
        params=(
            Param(
                "max_sparsity",
                None,
                "Cap on any block's sparsity (default: target + headroom).",
                low=0.0,
                high=1.0,
                option="--max-sparsity",
            ),
            Param(
                "headroom", 0.1, "Cap above the target when --max-sparsity is not given.", low=0.0, high=1.0, key="max"
            ),
            Param(
                "temperature",
                1.0,
                "Allocate by score^(1/T); 1 is the paper's rule.",
                low=1e-6,
                high=1e6,
                key="temp",
                option="--temperature",
            ),
        ),
    )
)
ALLOCATORS.add(Entry("uniform", "Every block at the target (the Wanda / SparseGPT baseline).", _uniform))
ALLOCATORS.add(
    Entry(
        "owl",
        "OWL: blocks with more activation outliers are pruned less, linearly within target +/- lam.",
        _owl,
        needs="outliers",
        default_scoring="owl",
        params=(_lam(0.08, "owl"),),
        # OWL's published settings (m = 5, lam = 0.08) are part of its name in sweep tables
        extra={"name_with_defaults": True},
    )
)
ALLOCATORS.add(
    Entry(
        "depth",
        "Sparsity rising linearly with block depth (ATP-style).",
        _depth,
        params=(Param("step", 0.01, "Sparsity added per block of depth.", low=0.0, high=1.0, option="--depth-step"),),
    )
)
ALLOCATORS.add(
    Entry(
        "rank",
        "Sparsity linear in the rank of the block's score, within target +/- lam.",
        _rank,
        needs="scores",
        default_scoring="auto",
        params=(_lam(0.1, "rank"),),
    )
)
ALLOCATORS.add(
    Entry(
        "mix",
        "A depth schedule blended with the score-rank rule (the default for language models).",
        _mix,
        needs="scores",
        default_scoring="auto",
        params=(
            _lam(0.15, "mix"),
            Param("alpha", 0.5, "mix: weight of depth against score rank.", low=0.0, high=1.0, option="--alpha"),
        ),
    )
)


def _search(groups: Groups, target: float) -> Allocation:
    """The levels a search found (``ecoflap score --method search``), made exact for the budget."""
    levels = groups.need_scores("search")
    total = sum(groups.sizes)
    mean = sum(n * s for n, s in zip(groups.sizes, levels)) / total
    # a start from an exact plan (integer keep counts) is off the target by up to one weight
    if abs(mean - target) > max(1e-6, 1.0 / total):
        raise PlanError(
            f"these search levels were found for sparsity {mean:.4f}, not {target}: "
            f"run the search for {target} (`ecoflap score --method search --sparsity {target}`)"
        )
    return allocation.from_sparsities(groups.sizes, levels, target)


ALLOCATORS.add(
    Entry(
        "search",
        "Per-block levels found by an evolutionary search on the pruned model's KL to the dense "
        "model (EvoPress-style); needs `score --method search`.",
        _search,
        needs="levels",
        default_scoring="search",
    )
)

#: what ``--allocator auto`` may choose; the stage records which and why in the plan
AUTO_ALLOCATOR = "auto"


# --- solvers ----------------------------------------------------------------------------------

SOLVERS.add(
    Entry(
        "wanda",
        "Wanda: |W| x input column norm, lowest pruned per comparison group.",
        "ecoflap_cli.core.solvers:wanda_prune",
        needs="col_sq",
    )
)
SOLVERS.add(
    Entry(
        "sparsegpt",
        "SparseGPT: OBS mask per 128-column block and update of the surviving weights.",
        "ecoflap_cli.core.solvers:sparsegpt_prune",
        needs="hessian",
        params=(
            Param("damp", 0.01, "Damping, as a fraction of the Hessian's mean diagonal.", low=0.0, high=10.0),
            Param("block_size", 128, "Columns per OBS block.", kind="int", low=1, high=1 << 20),
        ),
    )
)
SOLVERS.add(
    Entry(
        "magnitude", "Magnitude: |W|, lowest pruned (no calibration data).", "ecoflap_cli.core.solvers:magnitude_prune"
    )
)


# --- reconstruction after masking ------------------------------------------------------------

#: the settings both granularities take; defaults chosen on SmolLM2's validation split
#: (docs/reconstruction.md): about SparseGPT's prune time on a CPU, lower block error than it
_RECONSTRUCTION_PARAMS = (
    Param("steps", 8, "Adam steps per unit, each on `batch` rows of one calibration batch.", kind="int",
          low=0, high=100000),
    Param("lr", 0.015, "Adam step size, relative: each tensor's rate is lr x its root-mean-square.", low=0.0,
          high=1.0),
    Param("batch", 1, "Rows (samples) per step; 0: a whole calibration batch.", kind="int", low=0, high=100000),
    Param("bias", True, "Fit the pruned linears' biases too.", kind="bool"),
    Param("inputs_from", "pruned", "Each unit's inputs: what it sees in the pruned block (earlier units "
          "fitted) or in the dense block.", kind="str", choices=("pruned", "dense"), key="from"),
)  # fmt: skip
RECONSTRUCTION.add(
    Entry(
        "sublayer",
        "Fit each sub-layer (attention, MLP, ...) of a pruned block, on the inputs it sees, to the "
        "dense block's sub-layer outputs; masks fixed.",
        "ecoflap_cli.engine.reconstruction:reconstruct_block",
        params=_RECONSTRUCTION_PARAMS,
    )
)
RECONSTRUCTION.add(
    Entry(
        "block",
        "Fit the whole pruned block to the dense block's output on its inputs, masks fixed.",
        "ecoflap_cli.engine.reconstruction:reconstruct_block",
        params=_RECONSTRUCTION_PARAMS,
    )
)


# --- scoring methods --------------------------------------------------------------------------

SCORING.add(
    Entry(
        "auto",
        "Exact first-order gradient norms when backprop fits in memory, else zeroth-order.",
        "ecoflap_cli.engine.score_methods:auto",
        params=(
            Param(
                "seed",
                None,
                "Seed of zeroth-order directions if chosen (default: --seed).",
                kind="int",
                low=0,
                key="zseed",
            ),
        ),
    )
)
SCORING.add(
    Entry(
        "zeroth",
        "The paper's forward-only estimate: central differences along random directions.",
        "ecoflap_cli.engine.score_methods:zeroth",
        params=(
            Param("eps", 1e-3, "Perturbation size.", low=1e-12, high=1.0, option="--eps"),
            Param("seed", None, "Seed of the directions (default: --seed).", kind="int", low=0, key="zseed"),
            Param(
                "granularity",
                "block",
                "Perturb a whole block at once, or each tensor (the reference).",
                kind="str",
                choices=("block", "tensor"),
                option="--granularity",
            ),
            Param(
                "reuse_activations",
                True,
                "Replay the blocks before the perturbed one from stored activations.",
                kind="bool",
                key="reuse",
            ),
            Param(
                "perturbations",
                1,
                "Random directions per block and batch.",
                kind="int",
                low=1,
                high=1024,
                option="--perturbations",
            ),
            Param(
                "direction",
                "gaussian",
                "Direction distribution.",
                kind="str",
                choices=("gaussian", "rademacher"),
                option="--direction",
            ),
            Param(
                "difference",
                "central",
                "central (L+ - L-)/2eps, or forward (L+ - L0)/eps: half the passes.",
                kind="str",
                choices=("central", "forward"),
                option="--difference",
            ),
            Param(
                "head",
                "auto",
                "linearized: stop each pass at the last block (dL/dh there computed once); "
                "exact: the loss every pass (the reference).",
                kind="str",
                choices=("auto", "linearized", "exact"),
                option="--head",
            ),
        ),
    )
)
SCORING.add(
    Entry(
        "first",
        "Backprop (checkpointed): sum of |w * dL/dw| (taylor) or the gradient norm per block.",
        "ecoflap_cli.engine.score_methods:first",
        params=(
            Param(
                "metric",
                "taylor",
                "taylor (|w*g|) or gradnorm.",
                kind="str",
                choices=("taylor", "gradnorm"),
                option="--first-metric",
            ),
            Param("checkpointing", True, "Recompute block activations in the backward pass.", kind="bool"),
        ),
    )
)
SCORING.add(
    Entry(
        "owl",
        "OWL outlier ratios: share of Wanda scores above m x their layer mean, per block.",
        "ecoflap_cli.engine.score_methods:owl",
        params=(Param("m", 5.0, "Outlier threshold, in multiples of the layer mean.", low=1e-6, high=1e6),),
    )
)

SCORING.add(
    Entry(
        "search",
        "Search per-block sparsity levels for one target (the search allocator's input): "
        "mutations that keep the budget, judged by KL to the dense model on calibration batches.",
        "ecoflap_cli.engine.score_methods:search",
        params=(
            Param(
                "target",
                None,
                "The sparsity the levels are for (one-shot: --sparsity).",
                low=0.0,
                high=1.0,
                high_open=True,
            ),
            Param("step", 0.05, "Grid of levels: sparsity between neighbouring levels.", low=1e-3, high=0.5),
            Param(
                "max_offset",
                0.2,
                "Levels within the base (the target; the ecoflap start's own level) +/- this.",
                low=0.0,
                high=0.5,
                key="offset",
            ),
            Param(
                "generations",
                8,
                "Generations (one parent, offspring per generation).",
                kind="int",
                low=0,
                high=100000,
                key="gens",
            ),
            Param("offspring", 4, "Mutated candidates per generation.", kind="int", low=1, high=10000),
            Param(
                "survivors", 2, "Candidates measured on the full samples per generation.", kind="int", low=1, high=10000
            ),
            Param("moves", 2, "Most level swaps in one mutation.", kind="int", low=1, high=1000),
            Param(
                "start",
                "ecoflap",
                "Starting levels: uniform, the depth schedule, best (whichever has the lower fitness), "
                "or ecoflap (the coarse stage's plan from gradient-norm scores, refined by the search).",
                kind="str",
                choices=("best", "depth", "uniform", "ecoflap"),
            ),
            Param("depth_step", 0.01, "Depth start: sparsity added per block.", low=0.0, high=0.1),
            Param(
                "fitness",
                "auto",
                "kl (to the dense model; auto where the model has token logits) or loss.",
                kind="str",
                choices=("auto", "kl", "loss"),
            ),
            Param("quick", 1, "Samples every offspring is measured on (stage 1).", kind="int", low=1, high=100000),
            Param(
                "full",
                2,
                "Samples the survivors and the parent are measured on (0: all).",
                kind="int",
                low=0,
                high=100000,
            ),
            Param("seed", None, "Seed of the mutations (default: --seed).", kind="int", low=0, key="sseed"),
            Param("state", "", "File to keep the search state in (resume after an interruption).", kind="str"),
        ),
    )
)

#: the scores kind each scoring method produces, matched against an allocator's ``needs``
PRODUCES = {
    "auto": "scores",
    "zeroth": "scores",
    "first": "scores",
    "owl": "outliers",
    "search": "levels",
    "none": None,
}


def with_target(scoring: str, settings: dict[str, Any], sparsity: float) -> dict[str, Any]:
    """A scoring method's settings for one target: a method that scores for one sparsity (the
    search) gets ``target`` unless the settings give one."""
    if SCORING.get(scoring).param("target") is not None and settings.get("target") is None:
        return {**settings, "target": sparsity}
    return settings


def scoring_for(allocator: Entry, scoring: str | None) -> str | None:
    """The scoring method an allocator runs with (its default when ``scoring`` is None or auto
    and the allocator needs a particular kind); a mismatch is a PlanError."""
    if allocator.needs is None:
        if scoring not in (None, "none"):
            raise PlanError(f"allocator {allocator.name} uses no scores (got scoring {scoring!r})")
        return None
    chosen = scoring or allocator.default_scoring or "auto"
    produced = PRODUCES.get(chosen, "scores") if chosen in SCORING else None
    if chosen not in SCORING:
        SCORING.get(chosen)  # raises the unknown-name error
    if produced != allocator.needs:
        allowed = [n for n in SCORING.names() if PRODUCES.get(n, "scores") == allocator.needs]
        raise PlanError(f"allocator {allocator.name} takes scoring {', '.join(allowed)}, not {chosen!r}")
    return chosen


# --- checks of a request before any work ------------------------------------------------------


def allocator_settings(allocator: str, settings: dict[str, Any] | None, sparsity: float | None) -> dict[str, Any]:
    """A registered allocator's settings: defaults filled, every value checked, and those that
    depend on the target (``finalize``) resolved when the target is known."""
    entry = ALLOCATORS.get(allocator)
    checked = entry.settings(settings)
    if entry.finalize is not None and sparsity is not None:
        checked = entry.finalize(checked, sparsity)
    return checked


def _check_half_range(settings: dict[str, Any], sparsity: float | None) -> None:
    """A given ``lam`` (block sparsities within target +/- lam) must keep every block below 1.0:
    a block at sparsity 1.0 is pruned entirely. (Defaults are checked on the plan they give.)"""
    lam = settings.get("lam")
    if sparsity is None or lam is None:
        return
    try:
        reach = sparsity + float(lam)
    except (TypeError, ValueError):
        return  # not a number: the parameter's own check says so
    if math.isfinite(reach) and reach >= 1.0:
        raise PlanError(
            f"--lam {float(lam):g} around --sparsity {sparsity:g} reaches block sparsity {reach:g}, which prunes "
            f"whole blocks: use --lam below {1.0 - sparsity:g}"
        )


def check_allocator_request(allocator: str, settings: dict[str, Any], sparsity: float | None) -> None:
    """Refuse an unknown allocator, a setting it does not take or an out-of-range value.

    For ``auto`` (resolved only once the scores are known) each setting must belong to some
    allocator and be valid there.
    """
    if sparsity is not None and not (math.isfinite(sparsity) and 0.0 <= sparsity < 1.0):
        raise PlanError(f"--sparsity must be in [0, 1), got {sparsity}")
    if allocator != AUTO_ALLOCATOR:
        checked = allocator_settings(allocator, settings, sparsity)
        cap = checked.get("max_sparsity")
        if sparsity is not None and cap is not None and cap < sparsity:
            raise PlanError(f"--max-sparsity {cap} is below the target sparsity {sparsity}: no plan can reach it")
        _check_half_range(settings, sparsity)
        return
    for key, value in settings.items():
        owners = [e for e in ALLOCATORS if e.param(key) is not None]
        if not owners:
            raise PlanError(f"no allocator takes a setting {key!r}")
        param = owners[0].param(key)
        assert param is not None
        param.check(value, f"allocator {owners[0].name}")
    _check_half_range(settings, sparsity)


def check_scoring_settings(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The settings given for a scoring method, each one its own and valid (before any work);
    an option of another method is named as such."""
    entry = SCORING.get(method)
    for key in given:
        if entry.param(key) is None:
            owners = [e.name for e in SCORING if e.param(key) is not None]
            if not owners:
                raise PlanError(f"no scoring method takes a setting {key!r}")
            raise PlanError(f"that option applies to --method {' or '.join(owners)}, not {method}")
    entry.settings(given)
    return dict(given)


def check_scoring_request(allocator: str, scoring: str | None) -> None:
    """The scoring method must exist and produce what the allocator reads."""
    if scoring is not None:
        SCORING.get(scoring)
    if allocator != AUTO_ALLOCATOR:
        scoring_for(ALLOCATORS.get(allocator), scoring)


#: keys of a plan's allocator record that are not the allocator's own settings
PLAN_RECORD_KEYS = ("name", "per_tower", "chosen")


def check_plan_methods(plan: dict[str, Any]) -> None:
    """A plan's allocator must be a registered one, with settings it takes and valid values."""
    record = plan.get("allocator")
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise PlanError("the plan does not say which allocator made it")
    entry = ALLOCATORS.get(record["name"])
    entry.settings({k: v for k, v in record.items() if k not in PLAN_RECORD_KEYS}, owner=f"the plan's {entry.name}")
