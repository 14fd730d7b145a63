"""The one driver: the stages score, allocate, prune and evaluate as library calls.

The command line, the Python API and the sweep all run these functions, so a sweep row and an
``ecoflap prune`` with the same options do the same work. Each stage takes a loaded model (or a
document) and returns a document; none prints or exits. Methods and their settings come from
the registries in :mod:`ecoflap_cli.core.methods`.
"""

from __future__ import annotations

import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ecoflap_cli import __version__
from ecoflap_cli.core.methods import (
    ALLOCATORS,
    AUTO_ALLOCATOR,
    SCORING,
    Groups,
    allocator_settings,
    scoring_for,
    with_target,
)
from ecoflap_cli.data.text import Provenance, calibration_windows, check_seqlen, context_length, to_batches
from ecoflap_cli.engine.estimates import check_activation_memory
from ecoflap_cli.engine.pruning import (  # noqa: F401 - PruneSettings is part of the stage API
    Journal,
    PruneSettings,
    TensorResult,
    prune_model,
)
from ecoflap_cli.errors import DataError, PlanError
from ecoflap_cli.io import artifacts
from ecoflap_cli.io.loading import LoadedModel, fingerprint
from ecoflap_cli.models import Adapter, Batch, get_adapter

Progress = Callable[[str], None]


@dataclass
class CalibrationOptions:
    calib: str | None = None
    samples: int = 128
    seqlen: int | None = None
    batch_size: int = 8
    seed: int = 0
    text_field: str = "text"


def default_seqlen(model: torch.nn.Module) -> int:
    """Calibration length per model: the context length capped at 2048, never more.

    Wanda took ``max_position_embeddings`` as is and ran out of memory on long-context models.
    """
    return min(context_length(model) or 2048, 2048)


def model_info(loaded: LoadedModel, adapter: Adapter) -> dict[str, Any]:
    config = getattr(loaded.model, "config", None)
    return {
        "id": loaded.source,
        "model_type": getattr(config, "model_type", None),
        "class": type(loaded.model).__name__,
        "family": adapter.family,
        "fingerprint": fingerprint(loaded.model),
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
    }


def calibration_batches(
    loaded: LoadedModel, adapter: Adapter, opts: CalibrationOptions
) -> tuple[list[Batch], dict[str, Any]]:
    """Calibration batches of the kind the adapter needs, and their provenance."""
    if adapter.data_kind == "text":
        if loaded.tokenizer is None:
            raise DataError("the model ships no tokenizer: cannot tokenise calibration text")
        check_seqlen(loaded.model, opts.seqlen)
        seqlen = opts.seqlen or default_seqlen(loaded.model)
        windows, prov = calibration_windows(
            loaded.tokenizer, opts.calib, opts.samples, seqlen, opts.seed, opts.text_field, model=loaded.model
        )
        return to_batches(windows, opts.batch_size), prov.to_dict()
    from ecoflap_cli.data import multimodal

    if opts.calib is None:  # the default image-text set from the hub, as language models get C4
        records = multimodal.default_image_text_records(opts.samples, opts.seed)
        source = f"hub:{multimodal.DEFAULT_IMAGE_TEXT_DATASET}"
    else:
        records, source = multimodal.read_image_text_jsonl(opts.calib), opts.calib
    if len(records) > opts.samples:  # a seeded sample, in file order (files are often sorted by image)
        chosen = sorted(random.Random(opts.seed).sample(range(len(records)), opts.samples))
        records = [records[i] for i in chosen]
    batches = multimodal.make_multimodal_batches(adapter, loaded.processor, records, opts.batch_size, opts.seqlen or 64)
    # tokens: text positions the model reads (image placeholders included, padding not)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    prov = Provenance(source, len(records), opts.seqlen or 64, opts.seed, tokens)
    return batches, prov.to_dict()


def score(
    loaded: LoadedModel,
    adapter: Adapter,
    batches: list[Batch],
    calibration: dict[str, Any] | None,
    method: str = "auto",
    settings: dict[str, Any] | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The coarse stage: a scores document (one score per block) by a registered scoring method.

    ``settings`` are the method's parameters (names or short keys; checked against its registry
    entry). A zeroth-order direction seed left unset follows the calibration ``seed``.
    """
    entry = SCORING.get(method)
    checked = entry.settings(settings)
    if "seed" in checked and checked["seed"] is None:
        checked["seed"] = seed
    start = time.perf_counter()
    scores, record = entry.resolve()(adapter, batches, checked, progress)
    timings = {"score_s": round(time.perf_counter() - start, 3)}
    return artifacts.scores_document(
        model_info(loaded, adapter), adapter.blocks(), scores, record, calibration, timings
    )


def structure_document(loaded: LoadedModel, adapter: Adapter) -> dict[str, Any]:
    """A scores document without scores: enough for allocators that need none (uniform, depth)."""
    return artifacts.scores_document(model_info(loaded, adapter), adapter.blocks(), None, {"name": "none"}, None)


def auto_allocator(scores_doc: dict[str, Any]) -> tuple[str, str]:
    """The default allocator for a scores file, and why (recorded in the plan)."""
    if (scores_doc.get("method") or {}).get("name") == "owl":
        return "owl", "the scores are OWL outlier ratios"
    if (scores_doc.get("method") or {}).get("name") == "search":
        return "search", (
            "the scores are levels found by the search, which refines the paper's plan by the pruned "
            "model's KL to the dense one (a one-shot prune's default for language models in memory: "
            "on SmolLM2 and Qwen2.5-Coder it beat the paper's plan on Wikipedia, Shakespeare and code "
            "validation text, docs/benchmarks.md)"
        )
    towers = {g["tower"] for g in scores_doc["groups"]}
    return "ecoflap", (
        "the paper's rule (cap target + 0.1) on the scores: with exact gradient norms it tied mix "
        "for the best mean over SmolLM2 and Qwen2.5-Coder validation splits at 0.6 and 0.7, with no "
        "setting tuned on either model (docs/allocation.md)"
        + (
            f"; one joint budget balances the {len(towers)} towers by score: on a CLIP trained from "
            "clip art it beat per-tower budgets and uniform Wanda on zero-shot top-1 at 0.5-0.8 "
            "(docs/clip.md)"
            if len(towers) > 1
            else ""
        )
    )


def depth_positions(groups: list[dict[str, Any]]) -> list[float]:
    """Each group's depth within its tower, in [0, 1] (list order within the tower)."""
    towers = [g["tower"] for g in groups]
    counts = {t: towers.count(t) for t in towers}
    seen: dict[str, int] = {}
    positions = []
    for t in towers:
        i = seen.get(t, 0)
        seen[t] = i + 1
        positions.append(i / (counts[t] - 1) if counts[t] > 1 else 0.5)
    return positions


def allocator_request(allocator: str, settings: dict[str, Any] | None, sparsity: float) -> tuple[str, dict[str, Any]]:
    """Check an allocator and its settings before any work (``auto`` is checked when resolved)."""
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise PlanError(f"--sparsity must be in [0, 1), got {sparsity}")
    if allocator == AUTO_ALLOCATOR:
        return allocator, dict(settings or {})
    return allocator, allocator_settings(allocator, settings, sparsity)


def _groups(part: list[dict[str, Any]]) -> Groups:
    scores = [g["score"] for g in part]
    return Groups(
        tuple(g["name"] for g in part),
        tuple(int(g["params"]) for g in part),
        None if any(s is None for s in scores) else tuple(float(s) for s in scores),
        tuple(depth_positions(part)),
    )


def allocate(
    scores_doc: dict[str, Any],
    sparsity: float,
    allocator: str = "auto",
    settings: dict[str, Any] | None = None,
    per_tower: bool = False,
    note: str | None = None,
) -> dict[str, Any]:
    """Allocation: a plan document (exact global budget, zeros per tensor) from a scores document.
    ``note`` is added to the reason ``auto`` records for its choice."""
    allocator, checked = allocator_request(allocator, settings, sparsity)
    reason = None
    if allocator == AUTO_ALLOCATOR:
        allocator, reason = auto_allocator(scores_doc)
        reason = f"{reason}; {note}" if note else reason
        entry = ALLOCATORS.get(allocator)
        unknown = [k for k in checked if entry.param(k) is None and checked[k] is not None]
        if unknown:
            owners = " or ".join(e.name for e in ALLOCATORS if e.param(unknown[0]) is not None)
            raise PlanError(
                f"the default allocator for this model is {allocator}, which takes no {unknown[0]!r}: "
                f"add --allocator {owners}"
            )
        allocator, checked = allocator_request(allocator, {k: v for k, v in checked.items() if v is not None}, sparsity)
    entry = ALLOCATORS.get(allocator)
    kind = (scores_doc.get("method") or {}).get("name")
    if entry.needs == "outliers" and kind != "owl":
        raise PlanError(f"the {allocator} allocator needs outlier ratios: run `ecoflap score --method owl`")
    if entry.needs == "scores" and kind == "owl":
        raise PlanError(f"the {allocator} allocator needs importance scores, not OWL outlier ratios")
    if (entry.needs == "levels") != (kind == "search"):
        raise PlanError(
            f"the {allocator} allocator needs search levels: run `ecoflap score --method search --sparsity P`"
            if entry.needs == "levels"
            else f"search levels go with --allocator search, not {allocator}"
        )
    groups = scores_doc["groups"]
    towers = list(dict.fromkeys(g["tower"] for g in groups))
    parts = [[g for g in groups if g["tower"] == t] for t in towers] if per_tower else [groups]
    keep: dict[str, int] = {}
    for part in parts:
        result = entry.resolve()(_groups(part), sparsity, **checked)
        keep.update(zip([g["name"] for g in part], result.keep_counts))
    emptied = [g["name"] for g in groups if keep[g["name"]] == 0 and sparsity > 0]
    if emptied:
        raise PlanError(
            f"the {allocator} allocator with these settings prunes block {emptied[0]} entirely "
            f"({len(emptied)} of {len(groups)} blocks at sparsity 1.0): lower --lam, --depth-step or --max-sparsity"
        )
    record = {"name": allocator, "per_tower": per_tower, **checked, **({"chosen": f"auto: {reason}"} if reason else {})}
    return artifacts.plan_document(scores_doc, record, sparsity, keep)


def prune(
    loaded: LoadedModel,
    adapter: Adapter,
    plan: dict[str, Any],
    batches: list[Batch],
    calibration: dict[str, Any] | None,
    settings: PruneSettings,
    progress: Progress | None = None,
    journal: Journal | None = None,
) -> dict[str, Any]:
    """The fine stage, in place on ``loaded.model``; returns the report document. A ``journal``
    (``io.resume.ResumeState``) records each finished block, or continues an interrupted run."""
    artifacts.check_model_match(plan, fingerprint(loaded.model), loaded.source, "the plan")
    if settings.nm is not None:
        artifacts.check_nm_plan(plan, settings.nm)
    covered = {t for b in adapter.blocks() for t in b.tensor_names()}
    uncovered = sorted(set(artifacts.prune_counts(plan)) - covered)
    if uncovered:
        hint = adapter.uncovered_hint(uncovered)
        raise PlanError(
            f"the plan prunes {len(uncovered)} tensors that this run does not cover, e.g. {uncovered[0]}{hint}"
        )
    artifacts.check_plan_structure(plan, adapter.blocks())
    unknown = sorted(set(settings.compare_groups) - set(adapter.towers()))
    if unknown:
        raise PlanError(
            f"--compare-group names unknown tower {unknown[0]!r} (this model has: {', '.join(adapter.towers())})"
        )
    check_nm_widths(adapter, settings.nm)
    start = time.perf_counter()
    notes: list[dict[str, Any]] = []
    results = prune_model(adapter, artifacts.prune_counts(plan), batches, settings, progress, notes, journal)
    elapsed = time.perf_counter() - start
    results = recounted(adapter, results)
    total = sum(r.numel for r in results)
    return {
        "format": "ecoflap.report",
        "version": 1,
        "ecoflap_version": __version__,
        "model": plan["model"],
        "plan_hash": artifacts.doc_hash(plan),
        "solver": settings.solver,
        "solver_settings": settings.solver_settings,
        "reconstruction": reconstruction_record(settings, notes),
        "nm": list(settings.nm) if settings.nm else None,
        "compare_groups": settings.compare_groups,
        "calibration": calibration,
        "target_sparsity": plan["target_sparsity"],
        "achieved_sparsity": sum(r.zeros for r in results) / total if total else 0.0,
        "timings": {"prune_s": round(elapsed, 3)},
        "versions": _versions(),
        "tensors": [asdict(r) for r in results],
    }


def recounted(adapter: Adapter, results: list[TensorResult]) -> list[TensorResult]:
    """The results with every count of zeros taken from the weights themselves (as they will be
    written), not from what the pruning loop or a resume journal recorded."""
    weights = {f"{name}.weight": lin.weight for b in adapter.blocks() for name, lin in b.linears.items()}
    out = []
    for result in results:
        weight = weights.get(result.name)
        if weight is not None and weight.device.type != "meta":
            result = replace(result, zeros=int((weight == 0).sum()))
        out.append(result)
    return out


def check_sizes(**sizes: int | None) -> None:
    """Refuse calibration sizes no run can use, before any model is loaded: ``samples``,
    ``batch_size`` (and ``score_samples``) at least 1, ``seqlen`` (and ``score_seqlen``) at least
    2 tokens (a window predicts its next tokens); None means the default."""
    for name, value in sizes.items():
        least = 2 if name.endswith("seqlen") else 1
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            option = "--" + name.replace("_", "-")
            raise DataError(f"{option} must be a whole number of at least {least}, got {value!r}")


def check_nm_request(nm: tuple[int, int] | None, sparsity: float | None) -> None:
    """N:M fixes the sparsity at 1 - N/M: a one-shot target that differs is refused before loading."""
    if nm is None or sparsity is None:
        return
    n, m = nm
    if abs(sparsity - (m - n) / m) > 1e-3:
        raise PlanError(
            f"--nm {n}:{m} prunes exactly {(m - n) / m:.4g} of every tensor: use --sparsity {(m - n) / m:.4g}"
        )


def check_against_model(
    loaded: LoadedModel, adapter: Adapter, nm: tuple[int, int] | None = None, score_seqlen: int | None = None
) -> None:
    """What can be checked only once the model is loaded, before any calibration or pruning:
    N:M divides every prunable input width, and the scoring windows fit the context."""
    check_nm_widths(adapter, nm)
    check_seqlen(loaded.model, score_seqlen, "--score-seqlen")


def check_nm_widths(adapter: Adapter, nm: tuple[int, int] | None) -> None:
    """N:M groups ``m`` consecutive input weights of a row: refuse, before any work, a model with
    a prunable linear whose input width ``m`` does not divide."""
    if nm is None:
        return
    for block in adapter.blocks():
        for name, linear in block.linears.items():
            width = linear.weight.shape[1]
            if width % nm[1]:
                raise PlanError(
                    f"--nm {nm[0]}:{nm[1]} needs input widths that are multiples of {nm[1]}, but {name} has {width}"
                )


def reconstruction_record(settings: PruneSettings, units: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the report says of the reconstruction: method, settings, seed and each unit's fit."""
    if settings.reconstruct is None:
        return None
    return {"name": settings.reconstruct, **settings.reconstruct_settings, "seed": settings.seed, "units": units}


@dataclass
class OneShot:
    """What the one-shot path scores with (the allocator's scoring and its calibration sizes)."""

    scoring: str | None = None  # None: the allocator's default scoring method
    scoring_settings: dict[str, Any] | None = None
    samples: int = 32
    seqlen: int | None = None  # None: ``one_shot_score_seqlen``


#: tokens per one-shot scoring sample of a text model when none is asked for (at most the pruning
#: calibration's length): every quality figure in docs/benchmarks.md was scored at this length,
#: and on SmolLM2 on a CPU 2,048-token scoring samples took 0.42x a uniform SparseGPT prune's time
#: on its own (docs/benchmarks.md, "What the candidates cost, side by side")
ONE_SHOT_SCORE_SEQLEN = 128


def one_shot_score_seqlen(loaded: LoadedModel, adapter: Adapter, calib: CalibrationOptions) -> int | None:
    """The scoring samples' length when ``--score-seqlen`` is not given: ``ONE_SHOT_SCORE_SEQLEN``
    (at most the pruning calibration's) for text models; the pruning calibration's for the others,
    whose records (a caption, an image's tokens) set their own length."""
    if adapter.data_kind != "text":
        return calib.seqlen
    return min(ONE_SHOT_SCORE_SEQLEN, calib.seqlen or default_seqlen(loaded.model))


def one_shot_plan(
    loaded: LoadedModel,
    adapter: Adapter,
    calib: CalibrationOptions,
    sparsity: float,
    allocator: str,
    allocator_settings: dict[str, Any] | None,
    one_shot: OneShot,
    progress: Progress | None = None,
    scores_cache: Callable[[str, dict[str, Any], Callable[[], dict[str, Any]]], dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score as the allocator needs, then allocate: ``(plan, scores)``.

    ``scores_cache(method, settings, compute)`` lets the sweep share one scores document between
    runs; without it the scores are computed here.
    """
    chosen, note = _resolved_allocator(loaded, adapter, allocator, one_shot, allocator_settings)
    method = scoring_for(ALLOCATORS.get(chosen), one_shot.scoring if one_shot.scoring != "none" else None)
    if method is None:
        scores_doc = structure_document(loaded, adapter)
    else:
        settings = with_target(method, dict(one_shot.scoring_settings or {}), sparsity)

        def compute() -> dict[str, Any]:
            opts = CalibrationOptions(
                calib.calib,
                one_shot.samples,
                one_shot.seqlen or one_shot_score_seqlen(loaded, adapter, calib),
                calib.batch_size,
                calib.seed,
                calib.text_field,
            )
            batches, prov = calibration_batches(loaded, adapter, opts)
            return score(loaded, adapter, batches, prov, method, settings, progress, seed=calib.seed)

        scores_doc = scores_cache(method, settings, compute) if scores_cache else compute()
    return allocate(scores_doc, sparsity, allocator, allocator_settings, note=note), scores_doc


def _resolved_allocator(
    loaded: LoadedModel,
    adapter: Adapter,
    allocator: str,
    one_shot: OneShot,
    allocator_settings: dict[str, Any] | None,
) -> tuple[str, str | None]:
    """The allocator ``auto`` will choose in a one-shot prune of this model, and a note for the
    plan when the family's one-shot default (``Adapter.one_shot_allocator``) cannot run here.

    The search is that default for language models; it runs only when nothing configures the
    paper's rule instead (a scoring method or its settings, allocator settings) and when its
    database fits beside the weights. Otherwise the choice is the scores' own, as in a pipeline.
    """
    if allocator != AUTO_ALLOCATOR:
        return allocator, None
    scoring = one_shot.scoring
    probe = structure_document(loaded, adapter)
    probe["method"] = {"name": scoring if scoring in ("owl", "search") else "auto"}
    configured = (
        scoring not in (None, "auto")
        or bool(one_shot.scoring_settings)
        or any(v is not None for v in (allocator_settings or {}).values())
    )
    if adapter.one_shot_allocator != "search" or configured:
        return auto_allocator(probe)[0], None
    from ecoflap_cli.engine.search import unavailable

    why_not = unavailable(adapter)
    if why_not is None:
        return "search", None
    return auto_allocator(probe)[0], f"the search, this family's one-shot default, did not run: {why_not}"


def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The evaluate stage: achieved sparsity against the plan, perplexity, vision-language tasks
    (see :func:`ecoflap_cli.evaluation.tasks.run_eval` for the arguments)."""
    from ecoflap_cli.evaluation.tasks import run_eval

    return run_eval(*args, **kwargs)


def check_calibration_memory(loaded: LoadedModel, opts: CalibrationOptions, store: str | None) -> None:
    """Refuse a run whose calibration activations cannot fit, before any work starts."""
    check_activation_memory(loaded.model, opts.samples * (opts.seqlen or default_seqlen(loaded.model)), store)


def _versions() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ecoflap": __version__,
    }


def load_adapter(loaded: LoadedModel, include_qformer: bool = False) -> Adapter:
    """The family adapter of a loaded model (``include_qformer`` matters for BLIP-2 families only)."""
    return get_adapter(loaded.model, include_qformer=include_qformer)
