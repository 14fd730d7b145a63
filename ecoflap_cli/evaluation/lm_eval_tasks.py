"""lm-evaluation-harness tasks on a model ecoflap has already loaded (``eval --tasks``).

The in-memory model (dense or packed checkpoint, any placement) is wrapped in lm-eval's ``HFLM``
and run with lm-eval's evaluator (``lm_eval.evaluator.evaluate``); nothing is reloaded. Task names are looked up in the
tasks shipped with ecoflap (``lm_tasks/``: ``wiki_cloze``), the folders given with
``--include-path``, then lm-eval's own tasks; they are checked, and every task's data loaded,
before any model is.

lm-eval is an optional dependency (``pip install 'ecoflap[lmeval]'``), imported only here and
only when tasks are asked for.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecoflap_cli.errors import DataError, MissingDependencyError, ModelError

#: the task configs shipped with ecoflap (package data)
TASKS_DIR = Path(__file__).resolve().parent / "lm_tasks"
#: bootstrap resamples for the standard error of non-mean metrics (lm-eval's default, 100000,
#: takes longer than a small task itself)
BOOTSTRAP_ITERS = 1000
#: the most few-shot examples a prompt may hold (far past any model's context; the prompts are
#: also checked against the model's context before the run)
MAX_FEWSHOT = 1000
#: help text for ``--include-path`` (and docs/evaluation.md): task YAMLs are code
INCLUDE_PATH_HELP = (
    "Folder of your own lm-eval task YAMLs (repeatable). Task YAMLs can run Python (`!function`), like "
    "--trust-remote-code: include only folders you trust."
)


@dataclass
class LmEvalRequest:
    """Which lm-eval tasks to run, and how; checked when made (DataError with one line)."""

    tasks: list[str]
    num_fewshot: int | None = None
    limit: float | None = None  # documents per task (a count; below 1: a fraction)
    include_paths: list[Path] = field(default_factory=list)
    batch_size: int = 4

    def __post_init__(self) -> None:
        check_request(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_request(request: LmEvalRequest) -> None:
    """The request's values, before anything is loaded: task names are strings; ``num_fewshot``
    a whole number in [0, :data:`MAX_FEWSHOT`]; ``limit`` a finite positive number (a count, or a
    fraction below 1); ``batch_size`` a whole number of at least 1; include paths are paths."""
    if isinstance(request.tasks, (str, bytes)) or not isinstance(request.tasks, (list, tuple)):
        raise DataError(f"tasks must be a list of task names, got {type(request.tasks).__name__}")
    if not all(isinstance(t, str) and t.strip() for t in request.tasks):
        raise DataError("every lm-eval task name must be a non-empty string")
    if request.num_fewshot is not None:
        if not _is_int(request.num_fewshot):
            raise DataError(f"--num-fewshot must be a whole number, got {request.num_fewshot!r}")
        if not 0 <= request.num_fewshot <= MAX_FEWSHOT:
            raise DataError(f"--num-fewshot must be between 0 and {MAX_FEWSHOT}, got {request.num_fewshot}")
    if request.limit is not None:
        numeric = isinstance(request.limit, (int, float)) and not isinstance(request.limit, bool)
        if not numeric or not math.isfinite(request.limit) or request.limit <= 0:
            raise DataError(
                f"--limit must be a positive finite number (documents per task; below 1, a fraction), "
                f"got {request.limit!r}"
            )
        if request.limit >= 1 and request.limit != int(request.limit):
            raise DataError(f"--limit of 1 or more counts documents: a whole number, got {request.limit!r}")
    if not _is_int(request.batch_size) or request.batch_size < 1:
        raise DataError(f"--batch-size must be a whole number of at least 1, got {request.batch_size!r}")
    if isinstance(request.include_paths, (str, bytes)) or not all(
        isinstance(p, (str, os.PathLike)) for p in request.include_paths
    ):
        raise DataError("include_paths must be a list of folders")


@dataclass
class PreparedLmEval:
    """A request whose task names resolved: the task manager that knows them all."""

    request: LmEvalRequest
    manager: Any  # lm_eval.tasks.TaskManager
    version: str


def split_task_names(values: list[str] | None) -> list[str]:
    """``--tasks a,b --tasks c`` -> ``[a, b, c]`` (order kept, duplicates dropped)."""
    names: list[str] = []
    for value in values or []:
        for name in value.split(","):
            if name.strip() and name.strip() not in names:
                names.append(name.strip())
    return names


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise MissingDependencyError("lm-eval", "--tasks (lm-evaluation-harness)", "lmeval") from None
    return lm_eval


@contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval logs every step at INFO/WARNING: keep its errors only, and restore afterwards. It
    also prints to stdout, which is for artifacts (``-o -``): its prints go to stderr."""
    loggers = [logging.getLogger(name) for name in ("lm-eval", "lm_eval", "datasets", "evaluate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _task_manager(include_paths: list[Path], defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *map(str, include_paths)], include_defaults=defaults)


def prepare_lm_eval(request: LmEvalRequest) -> PreparedLmEval:
    """Check the request and load every task's data (building local data files), before any
    model is loaded; raises DataError with one line for an unknown task or unreadable data."""
    lm_eval = _require_lm_eval()
    if not request.tasks:
        raise DataError("--tasks needs at least one task name")
    check_request(request)  # again: a request's fields may have been changed since it was made
    for folder in request.include_paths:
        if not Path(folder).is_dir():
            raise DataError(f"--include-path {folder} is not a folder of task YAML files")
    with _quiet():
        # ecoflap's and the user's own tasks first: the index of lm-eval's thousands of tasks
        # takes seconds, and is built only when a name is not found among them
        manager = _task_manager(request.include_paths, defaults=False)
        if any(name not in manager.all_tasks for name in request.tasks):
            manager = _task_manager(request.include_paths, defaults=True)
        unknown = [name for name in request.tasks if name not in manager.all_tasks]
        if unknown:
            close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (`lm-eval ls tasks` lists them)"
            raise DataError(f"unknown lm-eval task {unknown[0]!r}{hint}")
        try:
            manager.load(list(request.tasks))
        except Exception as exc:  # noqa: BLE001 - any failure to build a task's data is the user's to fix
            raise DataError(
                f"cannot load the data of lm-eval task(s) {', '.join(request.tasks)}: {_line(exc)}"
            ) from None
    return PreparedLmEval(request, manager, getattr(lm_eval, "__version__", "unknown"))


def local_jsonl_dataset(path: str | Path, split: str = "test") -> Any:
    """A local JSON-lines file as a ``datasets.DatasetDict`` with one split, read with the
    ``datasets`` JSON loader: a packaged builder that needs no network (offline-safe)."""
    import datasets

    return datasets.load_dataset("json", data_files={split: str(path)})


def _lm_module(loaded: Any, label: str) -> Any:
    """The language model lm-eval runs on: the family's causal LM (``perplexity_module``)."""
    from ecoflap_cli.evaluation.measure import perplexity_model

    if loaded.tokenizer is None:
        raise ModelError(f"{label} has no tokenizer: lm-eval tasks need one")
    try:
        return perplexity_model(loaded.model, label)
    except ModelError as err:
        raise ModelError(f"--tasks runs language models: {err}") from None


def run_lm_eval(loaded: Any, prepared: PreparedLmEval, label: str) -> tuple[dict[str, dict[str, Any]], float]:
    """Run the prepared tasks on ``loaded`` (a ``LoadedModel``); returns, per task (and group),
    its metrics by name (``acc``, ``acc_stderr``, ... ; ``name (filter)`` for filters other
    than lm-eval's ``none``), ``n_samples`` and ``n_shot``, and the seconds the run took.

    lm-eval's evaluator runs on the tasks with ``simple_evaluate``'s settings (its seeds, few-shot
    override and default of 0 shots), without what ``simple_evaluate`` adds around it: a hub
    lookup of the model's revision, git and environment probes.
    """
    import random
    import time

    import numpy as np
    import torch
    from lm_eval import evaluator
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.models.huggingface import HFLM

    module = _lm_module(loaded, label)
    request = prepared.request
    backend = "seq2seq" if getattr(module.config, "is_encoder_decoder", False) else "causal"
    start = time.perf_counter()
    with _quiet():
        lm = HFLM(pretrained=module, tokenizer=loaded.tokenizer, backend=backend, batch_size=request.batch_size)
        # HFLM sends inputs to the model's first weight's device: "meta" when that weight is
        # offloaded to disk; accelerate's hooks move inputs where each block runs, from any device
        lm._device = next((p.device for p in module.parameters() if p.device.type != "meta"), torch.device("cpu"))
        task_dict = prepared.manager.load(list(request.tasks))
        for task in task_dict["tasks"].values():
            default = task.get_config("num_fewshot")
            if request.num_fewshot is not None and default != 0:  # a task that fixes 0 shots keeps them
                task.set_config(key="num_fewshot", value=request.num_fewshot)
            elif default is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
        truncated = check_task_prompts(task_dict["tasks"], loaded.tokenizer, lm.max_length, request.limit, label)
        random.seed(DEFAULT_RANDOM_SEED)
        np.random.seed(DEFAULT_OTHER_SEED)
        torch.manual_seed(DEFAULT_OTHER_SEED)
        output = evaluator.evaluate(
            lm=lm, task_dict=task_dict, limit=request.limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False
        )
    assert output is not None  # None only on other ranks of a distributed run
    metrics = _metrics(output)
    for name, count in truncated.items():
        if count and name in metrics:  # reported with the numbers they produced
            metrics[name].update(n_truncated=count, context_tokens=int(lm.max_length))
    return metrics, time.perf_counter() - start


def _request_texts(instance: Any) -> tuple[str, str]:
    """``(context, what the model reads after it)`` of one lm-eval request."""
    args = instance.args
    if instance.request_type in ("loglikelihood", "multiple_choice") and len(args) >= 2:
        return str(args[0]), str(args[1])
    return str(args[0]), ""


def check_task_prompts(
    tasks: dict[str, Any], tokenizer: Any, max_length: int, limit: float | None, label: str
) -> dict[str, int]:
    """Before any forward pass, build every task's requests as the evaluator will; returns, per
    task, how many of its prompts are longer than the model's context (lm-eval reads their last
    ``max_length`` tokens: reported as ``n_truncated`` beside the task's numbers).

    Refused, with one DataError line naming the task: a few-shot prompt (``num_fewshot`` above 0)
    past the model's context, whose examples lm-eval would cut from the left without a word; task
    text the tokenizer mostly does not know (the check ``--text`` gets: more than 10 % unknown
    tokens); a few-shot count the task's data cannot supply. Rolling-loglikelihood tasks
    (perplexity) split long text into windows themselves and are checked for unknown tokens only."""
    import torch
    from lm_eval.evaluator_utils import get_sample_size

    from ecoflap_cli.data.text import check_understood

    truncated: dict[str, int] = {}
    for name, task in tasks.items():
        try:
            task.build_all_requests(limit=get_sample_size(task, limit), rank=0, world_size=1)
        except (ValueError, IndexError, KeyError, TypeError) as exc:
            shots = task.get_config("num_fewshot")
            raise DataError(f"lm-eval task {name}: cannot build its {shots}-shot prompts: {_line(exc)}") from None
        seen: set[str] = set()
        ids: list[int] = []
        longest, shots, over = 0, task.get_config("num_fewshot") or 0, 0
        for instance in task.instances:
            context, continuation = _request_texts(instance)
            if context + continuation in seen:
                continue
            seen.add(context + continuation)
            tokens = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            ids.extend(tokens)
            if instance.request_type != "loglikelihood_rolling":
                length = len(tokens) + 1  # and the BOS lm-eval may prepend
                longest, over = max(longest, length), over + (length > max_length)
        truncated[name] = over
        if longest > max_length and shots:
            raise DataError(
                f"lm-eval task {name}: a {shots}-shot prompt takes {longest} tokens, more than the context of "
                f"{label} ({max_length}): lm-eval would cut it silently; lower --num-fewshot"
            )
        check_understood(tokenizer, torch.tensor(ids, dtype=torch.long), f"the text of lm-eval task {name}")
    return truncated


def _metrics(output: dict[str, Any]) -> dict[str, dict[str, Any]]:
    counts, shots = output.get("n-samples", {}), output.get("n-shot", {})
    tasks: dict[str, dict[str, Any]] = {}
    for name, values in {**output.get("results", {}), **output.get("groups", {})}.items():
        row: dict[str, Any] = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            row[metric if filt == "none" else f"{metric} ({filt})"] = float(value)
        if name in counts:
            row["n_samples"] = int(counts[name].get("effective", counts[name].get("original", 0)))
        if isinstance(shots.get(name), int):
            row["n_shot"] = shots[name]
        tasks[name] = row
    return tasks


def task_settings(prepared: PreparedLmEval) -> dict[str, Any]:
    """What the results document records about how the tasks were run."""
    request = prepared.request
    return {
        "tasks": list(request.tasks),
        "num_fewshot": request.num_fewshot,
        "limit": request.limit,
        "include_paths": [str(p) for p in request.include_paths],
        "lm_eval_version": prepared.version,
    }


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
