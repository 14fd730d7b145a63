"""The Python API: the stages on a model in memory or on disk, returning the documents the CLI writes.

    from ecoflap_cli import api

    result = api.oneshot(model="out/dense", sparsity=0.6, calib="calib.txt", output="out/pruned")
    scores = api.score(model, tokenizer=tokenizer, calib="calib.txt")  # a model already in memory
    plan = api.allocate(scores, sparsity=0.6)
    result = api.prune(model, plan=plan, tokenizer=tokenizer, calib="calib.txt")  # prunes in place
    model = api.load_pruned("out/pruned")  # dense or packed, as written by `ecoflap prune`

The ``ecoflap`` commands ``score``, ``allocate`` and ``prune`` run these functions, so an API call
and a command with the same settings do the same work and write the same files. Arguments are
checked against the registries (``ecoflap_cli.core.methods``) before any model is loaded; bad
input raises an :class:`ecoflap_cli.errors.EcoflapError`. docs/api.md has the details.

Importing this module loads no torch: the model stack is imported by the calls that need it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from ecoflap_cli.errors import EcoflapError, ModelError

if TYPE_CHECKING:
    from torch import nn

    from ecoflap_cli.evaluation.tasks import MultimodalTasks
    from ecoflap_cli.io.loading import LoadedModel, LoadOptions
    from ecoflap_cli.io.pruned import load_pruned, model_class

__all__ = [
    "PruneResult",
    "allocate",
    "evaluate",
    "load",
    "load_pruned",
    "model_class",
    "oneshot",
    "prune",
    "score",
]

#: reports one step of a stage: ``step(message)``
Step = Callable[[str], None]
#: ``progress(total, label)`` opens a context that yields a ``Step``; ``total`` None is a stage
#: without steps (loading, writing). The CLI passes rich progress bars; the default is silent.
Progress = Callable[[Union[int, None], str], AbstractContextManager[Step]]
ModelLike = Union[str, "os.PathLike[str]", "nn.Module", "LoadedModel"]

_PLACEMENT = (
    "dtype",
    "device",
    "trust_remote_code",
    "device_map",
    "max_memory",
    "offload_folder",
    "offload",
    "revision",
    "cache_dir",
)


def __getattr__(name: str) -> Any:  # the checkpoint loaders, imported (with torch) on first use
    if name in ("load_pruned", "model_class"):
        from ecoflap_cli.io import pruned

        return getattr(pruned, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def _silent(_total: int | None, _label: str) -> Iterator[Step]:
    yield lambda _message: None


# --- models -----------------------------------------------------------------------------------


def _load_options(placement: Mapping[str, Any]) -> LoadOptions:
    """Placement keywords as LoadOptions; ``max_memory`` as a dict or ``["0=20GiB", ...]``."""
    from ecoflap_cli.io.loading import LoadOptions

    unknown = sorted(set(placement) - set(_PLACEMENT))
    if unknown:
        raise EcoflapError(f"unknown option {unknown[0]!r} (placement options: {', '.join(_PLACEMENT)})")
    values = {k: v for k, v in placement.items() if v is not None}
    memory = values.get("max_memory")
    if memory is not None and not isinstance(memory, Mapping):
        parsed: dict[str, str] = {}
        for item in memory:
            key, sep, value = str(item).partition("=")
            if not sep or not value:
                raise EcoflapError(f"--max-memory takes DEVICE=SIZE (e.g. 0=20GiB), got {item!r}")
            parsed[key.strip()] = value.strip()
        values["max_memory"] = parsed
    if memory is not None:
        values["max_memory"] = {str(k): str(v) for k, v in values["max_memory"].items()}
    for key in ("offload_folder", "cache_dir"):
        if values.get(key) is not None:
            values[key] = os.fspath(values[key])
    return LoadOptions(**values)


def _placed(placement: Mapping[str, Any]) -> dict[str, Any]:
    """The placement options that differ from the defaults."""
    from ecoflap_cli.io.loading import LoadOptions

    defaults = {f.name: getattr(LoadOptions(), f.name) for f in fields(LoadOptions)}
    return {k: v for k, v in placement.items() if v is not None and v != defaults.get(k) and v != {} and v != []}


def load(
    model: ModelLike,
    *,
    processor: Any = None,
    tokenizer: Any = None,
    progress: Progress | None = None,
    **placement: Any,
) -> LoadedModel:
    """A model ready for the stages.

    ``model`` is a hub id, a local model directory, a ``.gguf`` file or a pruned checkpoint
    (dense or packed), loaded with the placement keywords (``dtype``, ``device``,
    ``trust_remote_code``, ``device_map``, ``max_memory``, ``offload_folder``, ``offload``: the
    CLI's options of the same names); or a model already in memory (a transformers
    ``PreTrainedModel``, or a ``LoadedModel``), used as it is (placement keywords are refused:
    place it yourself) and put in eval mode. ``processor`` (or ``tokenizer``) replaces the one
    loaded with the model; an in-memory model needs one to tokenise calibration text.
    """
    if processor is not None and tokenizer is not None:
        raise EcoflapError("give processor or tokenizer, not both")
    processor = processor if processor is not None else tokenizer
    opts = _load_options(placement)
    if isinstance(model, (str, os.PathLike)):
        from ecoflap_cli.io.loading import load_model

        source = os.fspath(model)
        with (progress or _silent)(None, f"loading {source}"):
            loaded = load_model(source, opts)
        if processor is not None:
            loaded.processor = processor
        return loaded
    placed = _placed(placement)
    if placed:
        raise ModelError(
            f"the model is already loaded: {', '.join(sorted(placed))} apply to paths and hub ids (place it yourself)"
        )
    from torch import nn

    from ecoflap_cli.io.loading import LoadedModel

    if isinstance(model, LoadedModel):
        return model if processor is None else LoadedModel(model.model, processor, model.source, model.gguf_file)
    if isinstance(model, nn.Module):
        model.eval()
        source = getattr(model, "name_or_path", None) or type(model).__name__
        return LoadedModel(model, processor, str(source))
    raise ModelError(f"model must be a hub id, a path or a loaded model, got {type(model).__name__}")


def _check_output(output: str | os.PathLike[str] | None, overwrite: bool) -> None:
    if output is not None:
        from ecoflap_cli.io.artifacts import check_json_output

        check_json_output(os.fspath(output), overwrite)


# --- score and allocate -----------------------------------------------------------------------


def score(
    model: ModelLike,
    *,
    calib: str | os.PathLike[str] | None = None,
    method: str = "auto",
    settings: Mapping[str, Any] | None = None,
    samples: int = 32,
    seqlen: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    text_field: str = "text",
    include_qformer: bool = False,
    processor: Any = None,
    tokenizer: Any = None,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    **placement: Any,
) -> dict[str, Any]:
    """The coarse stage (``ecoflap score``): one importance score per block; returns the scores
    document and writes it to ``output`` when given (``-``: stdout).

    ``settings`` are the scoring method's parameters (docs/methods.md), e.g. ``{"eps": 1e-3}``
    for ``method="zeroth"``; a setting of another method is refused.
    """
    from ecoflap_cli.core.methods import SCORING, check_scoring_settings

    checked = check_scoring_settings(method, settings or {})
    if SCORING.get(method).param("target") is not None and checked.get("target") is None:
        raise EcoflapError(f"--method {method} finds levels for one target sparsity: give --sparsity P")
    _check_output(output, overwrite)
    _load_options(placement)
    from ecoflap_cli.io import artifacts
    from ecoflap_cli.stages import driver

    driver.check_sizes(samples=samples, seqlen=seqlen, batch_size=batch_size)

    bars = progress or _silent
    loaded = load(model, processor=processor, tokenizer=tokenizer, progress=bars, **placement)
    adapter = driver.load_adapter(loaded, include_qformer)
    calibration = driver.CalibrationOptions(_path(calib), samples, seqlen, batch_size, seed, text_field)
    batches, provenance = driver.calibration_batches(loaded, adapter, calibration)
    with bars(len(adapter.blocks()), "scoring") as step:
        doc = driver.score(loaded, adapter, batches, provenance, method, checked, step, seed=seed)
    if output is not None:
        artifacts.emit_json(doc, os.fspath(output), overwrite)
    return doc


def allocate(
    scores: Mapping[str, Any] | str | os.PathLike[str],
    sparsity: float,
    *,
    allocator: str = "auto",
    settings: Mapping[str, Any] | None = None,
    per_tower: bool = False,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Scores -> per-block sparsity plan (``ecoflap allocate``); returns the plan document and
    writes it to ``output`` when given. ``scores`` is a scores document or its path (``-``: stdin).
    """
    from ecoflap_cli.core.methods import check_allocator_request
    from ecoflap_cli.io import artifacts
    from ecoflap_cli.stages import driver

    given = dict(settings or {})
    check_allocator_request(allocator, given, sparsity)
    if isinstance(scores, Mapping):
        doc = artifacts.validate_scores(dict(scores), "the scores document")
    else:
        where = os.fspath(scores)
        doc = artifacts.validate_scores(artifacts.read_json(where), "stdin" if where == "-" else where)
    plan = driver.allocate(doc, sparsity, allocator, given, per_tower)
    _check_output(output, overwrite)  # after the input's checks, as the command always did
    if output is not None:
        artifacts.emit_json(plan, os.fspath(output), overwrite)
    return plan


# --- prune and the one-shot path --------------------------------------------------------------


@dataclass
class PruneResult:
    """What a prune did: the pruned model (the one given, pruned in place, or the one loaded), its
    processor, the documents a checkpoint holds, and where it was written (None: not saved)."""

    model: Any
    processor: Any
    report: dict[str, Any]
    plan: dict[str, Any]
    scores: dict[str, Any] | None
    output: Path | None

    @property
    def documents(self) -> dict[str, dict[str, Any]]:
        """File name -> document, as in the checkpoint directory."""
        docs = {} if self.scores is None else {"scores.json": self.scores}
        return {**docs, "plan.json": self.plan, "ecoflap_report.json": self.report}


def _nm_pair(nm: str | tuple[int, int] | None) -> tuple[int, int] | None:
    if nm is None:
        return None
    try:
        n, m = (int(x) for x in (nm.split(":") if isinstance(nm, str) else nm))
    except (ValueError, TypeError):
        raise EcoflapError(f"--nm takes N:M such as 2:4, got {nm!r}") from None
    if not 0 < n < m:
        raise EcoflapError(f"--nm needs 0 < N < M, got {nm!r}")
    return n, m


def _compare_groups(groups: Mapping[str, str] | None) -> dict[str, str]:
    for tower, group in (groups or {}).items():
        if group not in ("row", "matrix"):
            raise EcoflapError(f"--compare-group takes TOWER=row|matrix, got {tower}={group}")
    return dict(groups or {})


def _plan_document(plan: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    from ecoflap_cli.io import artifacts

    if isinstance(plan, Mapping):
        return artifacts.validate_plan(dict(plan), "the plan")
    where = os.fspath(plan)
    return artifacts.validate_plan(artifacts.read_json(where), where)


def _path(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.fspath(value)


def prune(
    model: ModelLike,
    plan: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    sparsity: float | None = None,
    *,
    calib: str | os.PathLike[str] | None = None,
    allocator: str = "auto",
    allocator_settings: Mapping[str, Any] | None = None,
    score_method: str | None = None,
    score_settings: Mapping[str, Any] | None = None,
    score_samples: int = 32,
    score_seqlen: int | None = None,
    solver: str = "wanda",
    solver_settings: Mapping[str, Any] | None = None,
    reconstruct: str | None = None,
    reconstruct_settings: Mapping[str, Any] | None = None,
    nm: str | tuple[int, int] | None = None,
    compare_groups: Mapping[str, str] | None = None,
    samples: int = 128,
    seqlen: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    text_field: str = "text",
    include_qformer: bool = False,
    processor: Any = None,
    tokenizer: Any = None,
    output: str | os.PathLike[str] | None = None,
    packed: bool = False,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    on_plan: Callable[[dict[str, Any]], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    **placement: Any,
) -> PruneResult:
    """The fine stage (``ecoflap prune``): layer-wise pruning to ``plan`` (a plan document or its
    path), or one-shot to ``sparsity`` (score as the allocator needs, allocate, prune).

    A model given in memory is pruned in place. With ``output`` the checkpoint (dense, or packed
    with ``packed=True``) is written with its documents and model card, atomically. Every
    argument is checked before any model is loaded; ``on_plan(plan)`` sees a one-shot plan before
    the pruning starts. ``reconstruct`` (``sublayer`` or ``block``; None or ``none``: off) fits
    each pruned block's remaining weights to the dense block's outputs, masks fixed.
    """
    from ecoflap_cli.core.methods import (
        ALLOCATORS,
        RECONSTRUCTION,
        SCORING,
        SOLVERS,
        check_allocator_request,
        check_plan_methods,
        check_scoring_request,
        scoring_for,
    )
    from ecoflap_cli.io import artifacts
    from ecoflap_cli.io.checkpoint import check_output_dir, parse_size, save_checkpoint
    from ecoflap_cli.stages import driver
    from ecoflap_cli.stages.lifecycle import PruneOutput

    if (plan is None) == (sparsity is None):
        raise EcoflapError("give exactly one of --plan PLAN.json or --sparsity P")
    nm_pair = _nm_pair(nm)
    settings = driver.PruneSettings(
        solver,
        nm_pair,
        _compare_groups(compare_groups),
        solver_settings=SOLVERS.get(solver).settings(dict(solver_settings or {})),
        seed=seed,
    )
    if reconstruct not in (None, "none"):
        settings.reconstruct = RECONSTRUCTION.get(reconstruct).name
        settings.reconstruct_settings = RECONSTRUCTION.get(reconstruct).settings(dict(reconstruct_settings or {}))
    elif reconstruct_settings:
        raise EcoflapError("reconstruction settings given without a reconstruction: add --reconstruct sublayer")
    alloc_settings = dict(allocator_settings or {})
    if sparsity is not None:
        check_allocator_request(allocator, alloc_settings, sparsity)
        check_scoring_request(allocator, score_method)
        if score_settings:  # checked against the scoring method that will run, before any loading
            entry = ALLOCATORS.get(allocator) if allocator != "auto" else None
            method = score_method or (scoring_for(entry, None) if entry is not None else None) or "auto"
            SCORING.get(method).settings(dict(score_settings))
    sources = [os.fspath(model)] if isinstance(model, (str, os.PathLike)) else []
    if output is not None:
        if os.fspath(output) == "-":
            raise EcoflapError("a checkpoint is a directory: -o - (stdout) cannot hold it")
        check_output_dir(output, overwrite, sources)
    parse_size(max_shard_size)
    _load_options(placement)
    plan_doc = _plan_document(plan) if plan is not None else None
    if plan_doc is not None:
        check_plan_methods(plan_doc)
        if nm_pair is not None:
            artifacts.check_nm_plan(plan_doc, nm_pair)
    if sparsity is not None and nm_pair is not None and allocator != "uniform":
        raise EcoflapError(f"--nm needs a uniform plan: add --allocator uniform (got {allocator})")
    driver.check_nm_request(nm_pair, sparsity)
    driver.check_sizes(
        samples=samples, seqlen=seqlen, batch_size=batch_size, score_samples=score_samples, score_seqlen=score_seqlen
    )
    bars = progress or _silent
    with PruneOutput(output, resume, on_note) as out:
        loaded = load(model, processor=processor, tokenizer=tokenizer, progress=bars, **placement)
        if placement.get("offload") or placement.get("device_map") or getattr(loaded.model, "hf_device_map", None):
            settings.store_device = "cpu"  # blocks are spread or offloaded: activations wait on the CPU
        adapter = driver.load_adapter(loaded, include_qformer)
        driver.check_against_model(loaded, adapter, nm_pair, score_seqlen if plan_doc is None else None)
        calibration = driver.CalibrationOptions(_path(calib), samples, seqlen, batch_size, seed, text_field)
        driver.check_calibration_memory(loaded, calibration, settings.store_device)
        batches, provenance = (
            driver.calibration_batches(loaded, adapter, calibration) if settings.needs_data else ([], None)
        )
        request = {
            "sparsity": sparsity,
            "allocator": allocator,
            "allocator_settings": alloc_settings,
            "score": [score_method, dict(score_settings or {}), score_samples, score_seqlen],
            "include_qformer": include_qformer,
        }
        scores_doc = None
        resumed = out.identify(loaded, batches, plan_doc, request, settings, calibration)
        if resumed is not None:
            plan_doc, scores_doc = resumed
        tokens = samples * (seqlen or driver.default_seqlen(loaded.model)) if settings.needs_data else 0
        out.check_space(loaded, adapter, plan_doc, sparsity, packed, sources[0] if sources else None, tokens)
        if plan_doc is None:
            assert sparsity is not None
            one_shot = driver.OneShot(score_method, dict(score_settings or {}), score_samples, score_seqlen)
            with bars(len(adapter.blocks()), "scoring") as step:
                plan_doc, scores_doc = driver.one_shot_plan(
                    loaded, adapter, calibration, sparsity, allocator, alloc_settings, one_shot, step
                )
            if on_plan is not None:
                on_plan(plan_doc)
        out.begin({"plan.json": plan_doc, **({"scores.json": scores_doc} if scores_doc else {})})
        with bars(len(adapter.blocks()), f"pruning ({solver})") as step:
            report = driver.prune(loaded, adapter, plan_doc, batches, provenance, settings, step, out.journal)
        result = PruneResult(loaded.model, loaded.processor, report, plan_doc, scores_doc, None)
        if output is not None:
            with bars(None, f"writing {os.fspath(output)}"):
                result.output = save_checkpoint(
                    loaded,
                    output,
                    result.documents,
                    overwrite,
                    packed=packed,
                    max_shard_size=max_shard_size,
                    n_m=nm_pair,
                )
            out.saved()
    return result


def oneshot(
    model: ModelLike,
    *,
    sparsity: float,
    calib: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    **options: Any,
) -> PruneResult:
    """Score, allocate and prune to ``sparsity`` in one call, as ``ecoflap prune --sparsity`` does
    (llm-compressor's ``oneshot`` habit). ``options`` are :func:`prune`'s keywords."""
    if "plan" in options:
        raise EcoflapError("oneshot makes its own plan: call prune(model, plan=...) to prune to a given one")
    return prune(model, sparsity=sparsity, calib=calib, output=output, **options)


# --- evaluate ---------------------------------------------------------------------------------


def evaluate(
    model: ModelLike,
    *,
    text: str | os.PathLike[str] | None = None,
    compare: ModelLike | None = None,
    plan: str | os.PathLike[str] | None = None,
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    text_field: str = "text",
    tasks: MultimodalTasks | None = None,
    lm_tasks: Any = None,
    processor: Any = None,
    tokenizer: Any = None,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    **placement: Any,
) -> dict[str, Any]:
    """``ecoflap eval``: achieved sparsity against the plan (the checkpoint's plan.json, or
    ``plan``), perplexity on ``text`` and the vision-language ``tasks``, optionally beside the
    dense model ``compare``, and the lm-eval tasks ``lm_tasks`` (an
    ``evaluation.lm_eval_tasks.LmEvalRequest``); returns the results document and writes it to
    ``output`` when given.
    Results written into a checkpoint directory refresh its model card's quality section.
    """
    from ecoflap_cli.io import artifacts
    from ecoflap_cli.io.model_card import refresh_after_eval

    if batch_size < 1:
        raise EcoflapError("--batch-size must be at least 1")
    _check_output(output, overwrite)
    _load_options(placement)
    label = _label(model)
    compare_label = None if compare is None else _label(compare)
    given = {label: model, **({} if compare is None or compare_label is None else {compare_label: compare})}
    own_processor = processor if processor is not None else tokenizer

    def load_one(name: str) -> LoadedModel:
        chosen = given.get(name, name)
        on_disk = isinstance(chosen, (str, os.PathLike))
        loaded = load(chosen, **(placement if on_disk else {}))
        if name == label and own_processor is not None:
            loaded.processor = own_processor
        return loaded

    from ecoflap_cli.evaluation.tasks import run_eval

    results = run_eval(
        label,
        None if text is None else Path(text),
        compare_label,
        _path(plan),
        seqlen,
        max_windows,
        batch_size,
        text_field,
        load_one,
        tasks=tasks,
        progress=progress,
        lm_tasks=lm_tasks,
    )
    if output is not None:
        artifacts.emit_json(results, os.fspath(output), overwrite)
        refresh_after_eval(label, os.fspath(output))
    return results


def _label(model: ModelLike) -> str:
    """How a model is named in results: its path or hub id, or the source of one in memory."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    inner = getattr(model, "model", model)
    source = getattr(model, "source", None) or getattr(inner, "name_or_path", None)
    return str(source or f"<{type(inner).__name__} in memory>")
