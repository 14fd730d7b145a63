"""The one orchestrator: the run policy of every stage, on a typed request.

Each function takes a checked request (``stages.requests``) and the things a request cannot hold
(a model already in memory, a plan document, progress hooks), checks what can be checked before
any loading, loads, places, checks memory, takes the output's lock and resume state where the
stage has one, runs the stage through :mod:`ecoflap_cli.stages.driver`, and writes its artifacts
atomically. The Python API, every CLI command and the sweep call these functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from ecoflap_cli.errors import EcoflapError, ModelError
from ecoflap_cli.stages.requests import AllocateRequest, EvalRequest, Placement, PruneRequest, ScoreRequest

if TYPE_CHECKING:
    from ecoflap_cli.io.loading import LoadedModel, LoadOptions

#: reports one step of a stage: ``step(message)``
Step = Callable[[str], None]
#: ``progress(total, label)`` opens a context that yields a ``Step``; ``total`` None is a stage
#: without steps (loading, writing)
Progress = Callable[[Union[int, None], str], AbstractContextManager[Step]]


@contextlib.contextmanager
def silent(_total: int | None, _label: str) -> Iterator[Step]:
    yield lambda _message: None


@dataclass
class Hooks:
    """What a caller sees of a run: progress bars, notes, the plan before pruning, a model given
    in memory and its processor."""

    progress: Progress = silent
    note: Callable[[str], None] = lambda _text: None
    on_plan: Callable[[dict[str, Any]], None] | None = None
    model: Any = None  # a model in memory (nn.Module or LoadedModel) instead of request.model
    processor: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


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


# --- loading ----------------------------------------------------------------------------------


def load_options(request: Placement, verify: bool = True) -> LoadOptions:
    """The request's placement as ``LoadOptions`` (checked: --max-memory values, paths)."""
    from ecoflap_cli.io.loading import LoadOptions

    values = {k: v for k, v in request.placement().items() if v is not None}
    for key, value in values.get("max_memory", {}).items():
        if not str(key).strip() or not str(value).strip():
            raise EcoflapError(f"--max-memory takes DEVICE=SIZE (e.g. 0=20GiB), got {key}={value}")
    values["max_memory"] = {str(k): str(v) for k, v in values.get("max_memory", {}).items()}
    return LoadOptions(**values, verify=verify)


def _placed(request: Placement) -> list[str]:
    """The placement options that differ from the defaults (refused for a model in memory)."""
    from ecoflap_cli.io.loading import LoadOptions

    defaults = {f.name: getattr(LoadOptions(), f.name) for f in fields(LoadOptions)}
    given = request.placement()
    return sorted(k for k, v in given.items() if v is not None and v != defaults.get(k) and v not in ({}, []))


def load(request: Placement, source: str, hooks: Hooks, verify: bool = True) -> LoadedModel:
    """The model of a run: ``hooks.model`` as it is when one was given in memory, else ``source``
    loaded with the request's placement."""
    from ecoflap_cli.io.loading import LoadedModel, load_model

    given = hooks.model
    if given is None:
        with hooks.progress(None, f"loading {source}"):
            loaded = load_model(source, load_options(request, verify))
        if hooks.processor is not None:
            loaded.processor = hooks.processor
        return loaded
    placed = _placed(request)
    if placed:
        raise ModelError(
            f"the model is already loaded: {', '.join(placed)} apply to paths and hub ids (place it yourself)"
        )
    from torch import nn

    if isinstance(given, LoadedModel):
        return given if hooks.processor is None else LoadedModel(given.model, hooks.processor, given.source)
    if isinstance(given, nn.Module):
        given.eval()
        return LoadedModel(given, hooks.processor, source)
    raise ModelError(f"model must be a hub id, a path or a loaded model, got {type(given).__name__}")


def _calibration(request: Any, samples: int | None = None, seqlen: int | None = None) -> Any:
    from ecoflap_cli.stages import driver

    return driver.CalibrationOptions(**request.calibration(samples, seqlen))


def _inputs(request: Any, *names: str) -> list[str]:
    """The paths a run reads (an output must never land on or inside one of them)."""
    return [v for v in (getattr(request, n, None) for n in names) if isinstance(v, str) and v not in ("", "-")]


def check_json_output(output: str | None, overwrite: bool, inputs: list[str], kind: str = "file") -> None:
    """The one output rule (``files.check_output_path``) for a JSON artifact, before any work."""
    if output is None:
        return
    from ecoflap_cli.io.artifacts import check_json_output as check

    check(output, overwrite, inputs=inputs, kind=kind)


# --- score and allocate -----------------------------------------------------------------------


def score(request: ScoreRequest, hooks: Hooks | None = None) -> dict[str, Any]:
    """The coarse stage: load, calibrate, score; writes the scores document to ``request.output``
    when it is not None (``-``: stdout)."""
    from ecoflap_cli.core.methods import SCORING, check_scoring_settings
    from ecoflap_cli.io import artifacts
    from ecoflap_cli.stages import driver

    hooks = hooks or Hooks()
    checked = check_scoring_settings(request.method, request.settings)
    if SCORING.get(request.method).param("target") is not None and checked.get("target") is None:
        raise EcoflapError(f"--method {request.method} finds levels for one target sparsity: give --sparsity P")
    check_json_output(request.output, request.overwrite, _inputs(request, "model", "calib"))
    load_options(request)
    loaded = load(request, request.model, hooks)
    adapter = driver.load_adapter(loaded, request.include_qformer)
    batches, provenance = driver.calibration_batches(loaded, adapter, _calibration(request))
    with hooks.progress(len(adapter.blocks()), "scoring") as step:
        doc = driver.score(loaded, adapter, batches, provenance, request.method, checked, step, seed=request.seed)
    if request.output is not None:
        artifacts.emit_json(doc, request.output, request.overwrite)
    return doc


def allocate(request: AllocateRequest, scores: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Scores -> plan; ``scores`` is the document when given in memory, else ``request.scores``
    is read (``-``: stdin). Writes the plan to ``request.output`` when it is not None."""
    from ecoflap_cli.core.methods import check_allocator_request
    from ecoflap_cli.io import artifacts
    from ecoflap_cli.stages import driver

    check_allocator_request(request.allocator, dict(request.settings), request.sparsity)
    if scores is not None:
        doc = artifacts.validate_scores(dict(scores), "the scores document")
    else:
        where = request.scores
        doc = artifacts.validate_scores(artifacts.read_json(where), "stdin" if where == "-" else where)
    plan = driver.allocate(doc, request.sparsity, request.allocator, dict(request.settings), request.per_tower)
    check_json_output(request.output, request.overwrite, _inputs(request, "scores"))
    if request.output is not None:
        artifacts.emit_json(plan, request.output, request.overwrite)
    return plan


# --- prune ------------------------------------------------------------------------------------


def _prune_settings(request: PruneRequest) -> Any:
    from ecoflap_cli.core.methods import RECONSTRUCTION, SOLVERS
    from ecoflap_cli.stages import driver

    settings = driver.PruneSettings(
        request.solver,
        request.nm_pair(),
        dict(request.compare_groups),
        solver_settings=SOLVERS.get(request.solver).settings(dict(request.solver_settings)),
        seed=request.seed,
    )
    if request.reconstruct != "none":
        entry = RECONSTRUCTION.get(request.reconstruct)
        settings.reconstruct = entry.name
        settings.reconstruct_settings = entry.settings(dict(request.reconstruct_settings))
    return settings


def _check_prune_request(request: PruneRequest, plan_doc: dict[str, Any] | None, in_memory: bool) -> None:
    """Everything about a prune that can be checked before loading the model."""
    from ecoflap_cli.core.methods import (
        ALLOCATORS,
        SCORING,
        check_allocator_request,
        check_plan_methods,
        check_scoring_request,
        scoring_for,
    )
    from ecoflap_cli.io import artifacts
    from ecoflap_cli.io.checkpoint import check_output_dir, parse_size
    from ecoflap_cli.stages import driver

    nm = request.nm_pair()
    if request.sparsity is not None:
        check_allocator_request(request.allocator, dict(request.allocator_settings), request.sparsity)
        check_scoring_request(request.allocator, request.score_method)
        if request.score_settings:  # checked against the scoring method that will run
            entry = ALLOCATORS.get(request.allocator) if request.allocator != "auto" else None
            method = request.score_method or (scoring_for(entry, None) if entry is not None else None) or "auto"
            SCORING.get(method).settings(dict(request.score_settings))
        if nm is not None and request.allocator != "uniform":
            raise EcoflapError(f"--nm needs a uniform plan: add --allocator uniform (got {request.allocator})")
    if request.output is not None:
        sources = [] if in_memory else [request.model]
        check_output_dir(request.output, request.overwrite, sources, inputs=_inputs(request, "plan", "calib"))
    parse_size(request.max_shard_size)
    load_options(request)
    _prune_settings(request)
    if plan_doc is not None:
        check_plan_methods(plan_doc)
        if nm is not None:
            artifacts.check_nm_plan(plan_doc, nm)
    driver.check_nm_request(nm, request.sparsity)


def _plan_document(request: PruneRequest, given: Mapping[str, Any] | None) -> dict[str, Any] | None:
    from ecoflap_cli.io import artifacts

    if given is not None:
        return artifacts.validate_plan(dict(given), "the plan")
    if request.plan is None:
        return None
    return artifacts.validate_plan(artifacts.read_json(request.plan), request.plan)


def prune(request: PruneRequest, hooks: Hooks | None = None, plan: Mapping[str, Any] | None = None) -> PruneResult:
    """The fine stage: layer-wise pruning to the request's plan (or ``plan``, a document), or
    one-shot to its sparsity. Writes the checkpoint to ``request.output`` when it is not None;
    holds the output's lock and its resume state from before loading to after saving."""
    from ecoflap_cli.stages.lifecycle import PruneOutput

    hooks = hooks or Hooks()
    plan_doc = _plan_document(request, plan)
    _check_prune_request(request, plan_doc, hooks.model is not None)
    with PruneOutput(request.output, request.resume, hooks.note, request.resume_interval) as out:
        loaded = load(request, request.model, hooks)
        run = _PruneRun(request, hooks, loaded, out)
        return run.execute(plan_doc)


class _PruneRun:
    """One prune after loading: calibration, resume identity, space, plan, pruning, saving."""

    def __init__(self, request: PruneRequest, hooks: Hooks, loaded: LoadedModel, out: Any) -> None:
        from ecoflap_cli.stages import driver

        self.request, self.hooks, self.loaded, self.out = request, hooks, loaded, out
        self.settings = _prune_settings(request)
        if request.offload or request.device_map or getattr(loaded.model, "hf_device_map", None):
            self.settings.store_device = "cpu"  # blocks are spread or offloaded: activations wait on the CPU
        self.adapter = driver.load_adapter(loaded, request.include_qformer)

    def execute(self, plan_doc: dict[str, Any] | None) -> PruneResult:
        from ecoflap_cli.stages import driver

        request, loaded, adapter, out = self.request, self.loaded, self.adapter, self.out
        score_seqlen = request.score_seqlen if plan_doc is None else None
        driver.check_against_model(loaded, adapter, request.nm_pair(), score_seqlen)
        calibration = _calibration(request)
        driver.check_calibration_memory(loaded, calibration, self.settings.store_device)
        batches, provenance = (
            driver.calibration_batches(loaded, adapter, calibration) if self.settings.needs_data else ([], None)
        )
        scores_doc = None
        resumed = out.identify(loaded, batches, plan_doc, request.identity())
        if resumed is not None:
            plan_doc, scores_doc = resumed
        seqlen = request.seqlen or driver.default_seqlen(loaded.model)
        tokens = request.samples * seqlen if self.settings.needs_data else 0
        source = None if self.hooks.model is not None else request.model
        out.check_space(loaded, adapter, plan_doc, request.sparsity, request.packed, source, tokens)
        if plan_doc is None:
            plan_doc, scores_doc = self.one_shot(calibration)
        out.begin({"plan.json": plan_doc, **({"scores.json": scores_doc} if scores_doc else {})})
        with self.hooks.progress(len(adapter.blocks()), f"pruning ({request.solver})") as step:
            report = driver.prune(loaded, adapter, plan_doc, batches, provenance, self.settings, step, out.journal)
        report["request"] = request.to_recipe()["request"]
        result = PruneResult(loaded.model, loaded.processor, report, plan_doc, scores_doc, None)
        if request.output is not None:
            self.save(result)
        return result

    def one_shot(self, calibration: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        from ecoflap_cli.stages import driver

        request = self.request
        assert request.sparsity is not None
        one_shot = driver.OneShot(
            request.score_method, dict(request.score_settings), request.score_samples, request.score_seqlen
        )
        with self.hooks.progress(len(self.adapter.blocks()), "scoring") as step:
            plan_doc, scores_doc = driver.one_shot_plan(
                self.loaded,
                self.adapter,
                calibration,
                request.sparsity,
                request.allocator,
                dict(request.allocator_settings),
                one_shot,
                step,
            )
        if self.hooks.on_plan is not None:
            self.hooks.on_plan(plan_doc)
        return plan_doc, scores_doc

    def save(self, result: PruneResult) -> None:
        from ecoflap_cli.io.checkpoint import save_checkpoint

        request = self.request
        assert request.output is not None
        with self.hooks.progress(None, f"writing {request.output}"):
            result.output = save_checkpoint(
                self.loaded,
                request.output,
                result.documents,
                request.overwrite,
                packed=request.packed,
                max_shard_size=request.max_shard_size,
                n_m=request.nm_pair(),
            )
        self.out.saved()


# --- eval -------------------------------------------------------------------------------------


def _templates(request: EvalRequest) -> list[str]:
    templates = list(request.template)
    if request.template_file is not None:
        path = Path(request.template_file)
        if not path.is_file():
            raise EcoflapError(f"template file not found: {path}")
        lines = path.read_text(encoding="utf-8").splitlines()
        templates += [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
    return templates


def _lm_request(request: EvalRequest) -> Any:
    from ecoflap_cli.evaluation.lm_eval_tasks import LmEvalRequest, split_task_names

    if not request.tasks:
        return None
    limit: float | int | None = request.limit
    if limit is not None and limit >= 1 and limit == int(limit):
        limit = int(limit)  # a count of documents, recorded as one
    paths = [Path(p) for p in request.include_path]
    return LmEvalRequest(split_task_names(request.tasks), request.num_fewshot, limit, paths, request.batch_size)


def evaluate(
    request: EvalRequest,
    hooks: Hooks | None = None,
    compare_model: Any = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``ecoflap eval``: achieved sparsity against the plan, perplexity, the vision-language and
    lm-eval tasks, optionally beside the dense model ``request.compare`` (or ``compare_model``
    in memory); writes the results to ``request.output`` and refreshes a checkpoint's card."""
    from ecoflap_cli.evaluation.tasks import MultimodalTasks, run_eval
    from ecoflap_cli.io import artifacts
    from ecoflap_cli.io.model_card import refresh_after_eval

    hooks = hooks or Hooks()
    inputs = _inputs(request, "checkpoint", "text", "compare", "plan", "images", "retrieval", "vqa", "captions")
    check_json_output(request.output, request.overwrite, inputs, kind="results")
    load_options(request)
    templates = _templates(request)
    if templates and request.images is None:
        raise EcoflapError("--template/--template-file go with --images (zero-shot classification)")
    tasks = MultimodalTasks(
        None if request.images is None else Path(request.images),
        templates,
        None if request.retrieval is None else Path(request.retrieval),
        None if request.vqa is None else Path(request.vqa),
        None if request.captions is None else Path(request.captions),
        request.prompt,
        request.question_template,
        request.max_new_tokens,
    )
    label, compare_label = request.checkpoint, request.compare

    def load_one(name: str) -> LoadedModel:
        if name == label:
            return load(request, name, hooks, verify=not request.no_verify)
        return load(request, name, Hooks(model=compare_model), verify=not request.no_verify)

    results = run_eval(
        label,
        None if request.text is None else Path(request.text),
        compare_label,
        request.plan,
        request.seqlen,
        request.max_windows,
        request.batch_size,
        request.text_field,
        load_one,
        tasks=tasks,
        progress=say,
        lm_tasks=_lm_request(request),
    )
    if request.output is not None:
        artifacts.emit_json(results, request.output, request.overwrite)
        card = refresh_after_eval(label, request.output)
        if card is not None:
            hooks.note(f"model card -> {Path(label) / 'README.md'}")
    return results
