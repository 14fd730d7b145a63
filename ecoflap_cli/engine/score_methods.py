"""The scoring methods behind the registry: ``(adapter, batches, settings, progress)`` ->
``(score per block, what was run)``. The second item is recorded in the scores file."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ecoflap_cli.engine.blockwise import module_device
from ecoflap_cli.engine.estimates import check_zeroth_memory, first_order_bytes
from ecoflap_cli.engine.offload import any_offloaded
from ecoflap_cli.engine.scoring import (
    ZerothOrderSettings,
    first_order_scores,
    owl_outlier_ratios,
    zeroth_order_scores,
)
from ecoflap_cli.models import Adapter, Batch

Progress = Callable[[str], None]
Scored = tuple[dict[str, float], dict[str, Any]]


def zeroth(adapter: Adapter, batches: Sequence[Batch], settings: dict[str, Any], progress: Progress | None) -> Scored:
    check_zeroth_memory(adapter.model, batches)
    zeroth_settings = ZerothOrderSettings(**settings)
    scores = zeroth_order_scores(adapter, batches, zeroth_settings, progress)
    return scores, {"name": "zeroth", **settings}


def first(adapter: Adapter, batches: Sequence[Batch], settings: dict[str, Any], progress: Progress | None) -> Scored:
    scores = first_order_scores(adapter, batches, settings["metric"], settings["checkpointing"], progress)
    return scores, {"name": "first", **settings}


def owl(adapter: Adapter, batches: Sequence[Batch], settings: dict[str, Any], progress: Progress | None) -> Scored:
    scores = owl_outlier_ratios(adapter, batches, settings["m"], progress)
    return scores, {"name": "owl", "threshold": settings["m"]}


def search(adapter: Adapter, batches: Sequence[Batch], settings: dict[str, Any], progress: Progress | None) -> Scored:
    from ecoflap_cli.engine.search import SearchSettings, search_levels
    from ecoflap_cli.errors import PlanError

    if settings.get("target") is None:
        raise PlanError("the search needs the target sparsity: --sparsity (or --param target=P)")
    levels, record = search_levels(adapter, batches, SearchSettings(**settings), progress)
    return levels, record


def auto(adapter: Adapter, batches: Sequence[Batch], settings: dict[str, Any], progress: Progress | None) -> Scored:
    """Exact gradient norms where backprop fits in memory, else the zeroth-order estimate.

    The same allocation rule fed exact per-block gradient norms allocates much better than with a
    four-batch zeroth-order estimate (docs/allocation.md), and costs a few forward passes instead
    of about one per block; zeroth-order remains for models whose backward pass does not fit.
    """
    from ecoflap_cli.core.methods import SCORING

    choice, reason = choose_score_method(adapter, batches)
    if progress:
        progress(f"auto: {choice}-order scores ({reason})")
    given = {"metric": "gradnorm"} if choice == "first" else {"seed": settings["seed"]}
    chosen = SCORING.get(choice).settings(given)
    scores, record = (first if choice == "first" else zeroth)(adapter, batches, chosen, progress)
    return scores, {**record, "chosen_by": "auto", "reason": reason}


def choose_score_method(adapter: Adapter, batches: Sequence[Batch]) -> tuple[str, str]:
    """``("first" | "zeroth", why)``: first-order when its memory estimate fits in 80% of free memory."""
    from ecoflap_cli.engine.memory import free_memory

    if any_offloaded(adapter.model):
        return "zeroth", "weights are offloaded: forward-only scoring"
    need = first_order_bytes(adapter.model, batches)
    device = module_device(adapter.model)
    free = free_memory(device)
    if free is None:
        return "zeroth", "free memory unknown: forward-only scoring"
    # the reason is stored in the scores file: it names the need, not the free memory of the
    # moment, so that two identical runs write identical files
    if need <= 0.8 * free:
        return "first", f"backprop needs about {need / 2**30:.2f} GiB, within 80% of the free memory on {device}"
    return "zeroth", f"backprop would need about {need / 2**30:.2f} GiB, over 80% of the free memory on {device}"
