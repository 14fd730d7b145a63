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

import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Union

from ecoflap_cli.errors import EcoflapError, ModelError

if TYPE_CHECKING:
    from torch import nn

    from ecoflap_cli.io.loading import LoadedModel
    from ecoflap_cli.io.pruned import load_pruned, model_class
    from ecoflap_cli.stages.orchestrator import PruneResult

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


def __getattr__(name: str) -> Any:  # the checkpoint loaders, imported (with torch) on first use
    if name in ("load_pruned", "model_class"):
        from ecoflap_cli.io import pruned

        return getattr(pruned, name)
    if name == "PruneResult":
        from ecoflap_cli.stages.orchestrator import PruneResult

        return PruneResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- models -----------------------------------------------------------------------------------


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
    from ecoflap_cli.stages import orchestrator
    from ecoflap_cli.stages.requests import LoadRequest

    name, in_memory = _source(model)
    hooks = _hooks(in_memory, processor, tokenizer, progress)
    return orchestrator.load(_request(LoadRequest, dict(placement)), name, hooks)


def _request(cls: type[Any], values: dict[str, Any], request: Any = None) -> Any:
    """The stage's request from API keywords (``None`` means the field's default), checked with
    the CLI's declarations; ``request`` (a request object) is the base the keywords override."""
    given = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in values.items()}
    memory = given.get("max_memory")
    if memory is not None and not isinstance(memory, Mapping):
        if isinstance(memory, (str, bytes)) or not isinstance(memory, (list, tuple)):
            raise EcoflapError(f"max_memory takes a dict or DEVICE=SIZE items, got {memory!r}")
        parsed: dict[str, str] = {}
        for item in memory:
            key, sep, value = str(item).partition("=")
            if not sep or not value:
                raise EcoflapError(f"--max-memory takes DEVICE=SIZE (e.g. 0=20GiB), got {item!r}")
            parsed[key.strip()] = value.strip()
        given["max_memory"] = parsed
    elif isinstance(memory, Mapping):
        given["max_memory"] = {str(k): str(v) for k, v in memory.items()}
    if request is not None:
        if not isinstance(request, cls):
            raise EcoflapError(f"request must be a {cls.__name__}, got {type(request).__name__}")
        return request.replace(**given)
    return cls.create(**given)


def _source(model: ModelLike) -> tuple[str, Any]:
    """``(name in the request, model in memory or None)``."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model), None
    return _label(model), model


def _hooks(model: Any, processor: Any, tokenizer: Any, progress: Progress | None, **more: Any) -> Any:
    from ecoflap_cli.stages.orchestrator import Hooks, silent

    if processor is not None and tokenizer is not None:
        raise EcoflapError("give processor or tokenizer, not both")
    if model is not None:
        from torch import nn

        from ecoflap_cli.io.loading import LoadedModel

        if not isinstance(model, (nn.Module, LoadedModel)):
            raise ModelError(f"model must be a hub id, a path or a loaded model, got {type(model).__name__}")
    return Hooks(
        progress=progress or silent, model=model, processor=processor if processor is not None else tokenizer, **more
    )


# --- the stages -------------------------------------------------------------------------------


def score(
    model: ModelLike,
    *,
    processor: Any = None,
    tokenizer: Any = None,
    progress: Progress | None = None,
    request: Any = None,
    output: str | os.PathLike[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The coarse stage (``ecoflap score``): one importance score per block; returns the scores
    document and writes it to ``output`` when given (``-``: stdout).

    ``options`` are the fields of :class:`ecoflap_cli.stages.requests.ScoreRequest` (the CLI's
    options: ``calib``, ``method``, ``settings`` (the method's parameters, e.g. ``{"eps": 1e-3}``),
    ``samples``, ``seqlen``, ``batch_size``, ``seed``, placement, ...); ``request`` is a whole
    request to start from.
    """
    from ecoflap_cli.stages import orchestrator
    from ecoflap_cli.stages.requests import ScoreRequest

    name, in_memory = _source(model)
    req = _request(ScoreRequest, {"model": name, "output": output, **options}, request)
    return orchestrator.score(req, _hooks(in_memory, processor, tokenizer, progress))


def allocate(
    scores: Mapping[str, Any] | str | os.PathLike[str],
    sparsity: float,
    *,
    output: str | os.PathLike[str] | None = None,
    request: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Scores -> per-block sparsity plan (``ecoflap allocate``); returns the plan document and
    writes it to ``output`` when given. ``scores`` is a scores document or its path (``-``: stdin);
    ``options``: ``allocator``, ``settings``, ``per_tower``, ``overwrite``."""
    from ecoflap_cli.stages import orchestrator
    from ecoflap_cli.stages.requests import AllocateRequest

    in_memory = scores if isinstance(scores, Mapping) else None
    where = "<in memory>" if in_memory is not None else os.fspath(scores)  # type: ignore[arg-type]
    values = {"scores": where, "sparsity": sparsity, "output": output, **options}
    return orchestrator.allocate(_request(AllocateRequest, values, request), in_memory)


def prune(
    model: ModelLike,
    plan: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    sparsity: float | None = None,
    *,
    processor: Any = None,
    tokenizer: Any = None,
    progress: Progress | None = None,
    on_plan: Callable[[dict[str, Any]], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    request: Any = None,
    **options: Any,
) -> PruneResult:
    """The fine stage (``ecoflap prune``): layer-wise pruning to ``plan`` (a plan document or its
    path), or one-shot to ``sparsity`` (score as the allocator needs, allocate, prune).

    ``options`` are the fields of :class:`ecoflap_cli.stages.requests.PruneRequest` (the CLI's
    options under their field names: ``calib``, ``solver``, ``solver_settings``, ``allocator``,
    ``allocator_settings``, ``reconstruct``, ``nm``, ``samples``, ``output``, ``packed``, ...);
    ``request`` is a whole request (a recipe) to start from. A model given in memory is pruned in
    place. With ``output`` the checkpoint is written with its documents and model card,
    atomically; its report records the request, so it reproduces the run. Every argument is
    checked before any model is loaded; ``on_plan(plan)`` sees a one-shot plan before pruning.
    """
    from ecoflap_cli.stages import orchestrator
    from ecoflap_cli.stages.requests import PruneRequest

    name, in_memory = _source(model)
    plan_doc = plan if isinstance(plan, Mapping) else None
    values: dict[str, Any] = {"model": name, **options}
    if plan is not None or request is None:
        values["plan"] = None if plan is None else "<in memory>" if plan_doc is not None else os.fspath(plan)  # type: ignore[arg-type]
    if sparsity is not None or request is None:
        values["sparsity"] = sparsity
    if values.get("reconstruct", "") is None:
        values["reconstruct"] = "none"
    nm = values.get("nm")
    if isinstance(nm, (tuple, list)):
        values["nm"] = ":".join(str(x) for x in nm)
    req = _request(PruneRequest, values, request)
    hooks = _hooks(in_memory, processor, tokenizer, progress, on_plan=on_plan)
    if on_note is not None:
        hooks.note = on_note
    return orchestrator.prune(req, hooks, plan_doc)


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


def evaluate(
    model: ModelLike,
    *,
    compare: ModelLike | None = None,
    processor: Any = None,
    tokenizer: Any = None,
    progress: Callable[[str], None] | None = None,
    request: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """``ecoflap eval``: achieved sparsity against the plan (the checkpoint's plan.json, or
    ``plan``), perplexity on ``text``, the vision-language tasks (``images``, ``retrieval``,
    ``vqa``, ``captions``) and lm-eval ``tasks``, optionally beside the dense model ``compare``;
    returns the results document and writes it to ``output`` when given. ``options`` are the
    fields of :class:`ecoflap_cli.stages.requests.EvalRequest`. Results written into a
    checkpoint directory refresh its model card's quality section.
    """
    from ecoflap_cli.stages import orchestrator
    from ecoflap_cli.stages.requests import EvalRequest

    name, in_memory = _source(model)
    compare_name, compare_memory = (None, None) if compare is None else _source(compare)
    values = {"checkpoint": name, "compare": compare_name, **options}
    req = _request(EvalRequest, values, request)
    hooks = _hooks(in_memory, processor, tokenizer, None)
    return orchestrator.evaluate(req, hooks, compare_memory, progress)


def _label(model: ModelLike) -> str:
    """How a model is named in results: its path or hub id, or the source of one in memory."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    inner = getattr(model, "model", model)
    source = getattr(model, "source", None) or getattr(inner, "name_or_path", None)
    return str(source or f"<{type(inner).__name__} in memory>")
