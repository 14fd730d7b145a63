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


@dataclass
class LmEvalRequest:
    """Which lm-eval tasks to run, and how."""

    tasks: list[str]
    num_fewshot: int | None = None
    limit: float | None = None  # documents per task (a count; below 1: a fraction)
    include_paths: list[Path] = field(default_factory=list)
    batch_size: int = 4


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
    if request.num_fewshot is not None and request.num_fewshot < 0:
        raise DataError(f"--num-fewshot must be at least 0, got {request.num_fewshot}")
    if request.limit is not None and request.limit <= 0:
        raise DataError(f"--limit must be positive, got {request.limit:g}")
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
        random.seed(DEFAULT_RANDOM_SEED)
        np.random.seed(DEFAULT_OTHER_SEED)
        torch.manual_seed(DEFAULT_OTHER_SEED)
        output = evaluator.evaluate(
            lm=lm, task_dict=task_dict, limit=request.limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False
        )
    assert output is not None  # None only on other ranks of a distributed run
    return _metrics(output), time.perf_counter() - start


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
