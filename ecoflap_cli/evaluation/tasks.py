"""The `eval` stage as a library call: sparsity against the plan, perplexity, the vision-language
tasks (zero-shot classification and retrieval for image-text matching models, VQA and captioning
for models that generate from images), and the same measurements on a dense model for
comparison. Which tasks a model supports, and which sub-model perplexity is measured on, its
family's adapter says (``eval_tasks``, ``perplexity_module``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecoflap_cli.data.text import check_seqlen, check_understood, read_text, tokenize_documents
from ecoflap_cli.errors import DataError, ModelError
from ecoflap_cli.evaluation.lm_eval_tasks import (
    LmEvalRequest,
    PreparedLmEval,
    prepare_lm_eval,
    run_lm_eval,
    task_settings,
)
from ecoflap_cli.evaluation.measure import perplexity, perplexity_model, sparsity_report, windows_for_eval
from ecoflap_cli.io import artifacts
from ecoflap_cli.io.loading import LoadedModel
from ecoflap_cli.models import Adapter, families_with_task, get_adapter


def _plan_for(checkpoint: str, plan: str | None) -> dict[str, Any] | None:
    if plan is not None:
        return artifacts.validate_plan(artifacts.read_json(plan), plan)
    candidate = Path(checkpoint) / "plan.json"
    if candidate.is_file():
        return artifacts.validate_plan(artifacts.read_json(str(candidate)), str(candidate))
    return None


def pruning_method(checkpoint: str) -> dict[str, Any] | None:
    """How the checkpoint was pruned (solver, settings, reconstruction), from its report; None
    for a directory without one (or a model id)."""
    from ecoflap_cli.io.layout import REPORT_NAME, read_document

    report = read_document(checkpoint, REPORT_NAME) if Path(checkpoint).is_dir() else None
    if report is None:
        return None
    recon = report.get("reconstruction")
    return {
        "solver": report.get("solver"),
        "solver_settings": report.get("solver_settings") or {},
        "nm": report.get("nm"),
        "reconstruction": None if recon is None else {k: v for k, v in recon.items() if k != "units"},
    }


def sparsity_rows(loaded: LoadedModel, plan: dict[str, Any] | None) -> dict[str, Any]:
    # a plan that prunes the BLIP-2 Q-Former is checked against the Q-Former's tensors too
    with_qformer = plan is not None and any(g.get("tower") == "qformer" for g in plan["groups"])
    adapter = get_adapter(loaded.model, include_qformer=with_qformer)
    tensors = sparsity_report(adapter, plan)
    tensor_rows = [
        {
            "name": t.name,
            "tower": t.tower,
            "params": t.numel,
            "zeros": t.zeros,
            "achieved": t.sparsity,
            "planned": None if t.planned_zeros is None else t.planned_zeros / t.numel,
            "matches_plan": t.matches_plan,
        }
        for t in tensors
    ]
    block_rows = []
    for block in adapter.blocks():
        mine = [t for t in tensors if t.name.startswith(block.name + ".")]
        numel = sum(t.numel for t in mine)
        planned = None if any(t.planned_zeros is None for t in mine) else sum(t.planned_zeros or 0 for t in mine)
        matches = None if planned is None else all(t.matches_plan for t in mine)
        block_rows.append(
            {
                "name": block.name,
                "tower": block.tower,
                "params": numel,
                "zeros": sum(t.zeros for t in mine),
                "achieved": sum(t.zeros for t in mine) / numel,
                "planned": None if planned is None else planned / numel,
                "matches_plan": matches,
            }
        )
    total = sum(t.numel for t in tensors)
    planned_total = None if plan is None else sum(t.planned_zeros or 0 for t in tensors) / total
    return {
        "tensors": tensor_rows,
        "blocks": block_rows,
        "summary": {
            "achieved": sum(t.zeros for t in tensors) / total,
            "planned": planned_total,
            "mismatches": sum(1 for t in tensors if t.matches_plan is False),
        },
    }


@dataclass
class MultimodalTasks:
    """Which vision-language tasks to run, on what local data, with which prompts."""

    images: Path | None = None  # class folders: zero-shot classification (CLIP, SigLIP)
    templates: list[str] = field(default_factory=list)  # zero-shot prompts ({} = class name)
    retrieval: Path | None = None  # caption JSONL: image-text retrieval (CLIP, SigLIP)
    vqa: Path | None = None  # question JSONL: VQA (BLIP-2, InstructBLIP, LLaVA)
    captions: Path | None = None  # caption JSONL: captioning (BLIP-2, InstructBLIP, LLaVA)
    prompt: str | None = None  # caption prompt (default multimodal.DEFAULT_CAPTION_PROMPT)
    question_template: str | None = None  # VQA prompt with {question}
    max_new_tokens: int | None = None  # default 10 for VQA, 20 for captions

    def requested(self) -> list[str]:
        """Task names in the order they run (and are reported)."""
        chosen = (("zero_shot", self.images), ("retrieval", self.retrieval), ("vqa", self.vqa),
                  ("captioning", self.captions))  # fmt: skip
        return [name for name, data in chosen if data is not None]


#: task -> the CLI option that asks for it (which families support a task, their adapters say)
TASK_OPTION = {"zero_shot": "--images", "retrieval": "--retrieval", "vqa": "--vqa",
               "captioning": "--captions"}  # fmt: skip


@dataclass
class _PreparedTask:
    name: str
    data: str
    records: list[dict[str, Any]]
    settings: dict[str, Any]


def _prepare_tasks(tasks: MultimodalTasks) -> list[_PreparedTask]:
    """Read and check every task's data and prompts before any model is loaded."""
    from ecoflap_cli.data import multimodal

    prepared = []
    for name in tasks.requested():
        settings: dict[str, Any] = {}
        if name == "zero_shot":
            assert tasks.images is not None
            templates = list(tasks.templates) or list(multimodal.DEFAULT_CLASS_TEMPLATES)
            for template in templates:
                if "{}" not in template and "{class_name}" not in template:
                    raise DataError(
                        f"zero-shot template {template!r} has no {{}} (or {{class_name}}) for the class name"
                    )
            classes, records = multimodal.read_class_folders(tasks.images)
            settings = {"templates": templates, "classes": classes}
            data = tasks.images
        elif name == "retrieval":
            assert tasks.retrieval is not None
            records = _records_with(tasks.retrieval, "caption")
            data = tasks.retrieval
        elif name == "vqa":
            assert tasks.vqa is not None
            template = tasks.question_template or multimodal.DEFAULT_QUESTION_TEMPLATE
            if "{question}" not in template:
                raise DataError(f"--question-template {template!r} has no {{question}} placeholder")
            records = _records_with(tasks.vqa, "question")
            settings = {"question_template": template, "max_new_tokens": tasks.max_new_tokens or 10}
            data = tasks.vqa
        else:
            assert tasks.captions is not None
            records = _records_with(tasks.captions, "caption")
            prompt = multimodal.DEFAULT_CAPTION_PROMPT if tasks.prompt is None else tasks.prompt
            from ecoflap_cli.evaluation.metrics import resolve_cider_tokenizer

            settings = {
                "prompt": prompt,
                "max_new_tokens": tasks.max_new_tokens or 20,
                "cider_tokenizer": resolve_cider_tokenizer("auto"),  # named in the results
            }
            data = tasks.captions
        prepared.append(_PreparedTask(name, str(data), records, settings))
    return prepared


def _records_with(path: Path, key: str) -> list[dict[str, Any]]:
    """The records of an image-text JSONL file that have ``key`` ("caption" or "question")."""
    from ecoflap_cli.data.multimodal import read_image_text_jsonl

    chosen = [r for r in read_image_text_jsonl(path) if key in r]
    if not chosen:
        raise DataError(f'{path} holds no {key} records (each line needs an "image" and a "{key}")')
    return chosen


def _adapter_or_none(loaded: LoadedModel) -> Adapter | None:
    try:
        return get_adapter(loaded.model)
    except ModelError:
        return None


def _check_family(loaded: LoadedModel, prepared: list[_PreparedTask], label: str) -> None:
    """The model's family must support the tasks (``Adapter.eval_tasks``), and its processor must
    bring what the family's data needs (``Adapter.check_processor``)."""
    if not prepared:
        return
    adapter = _adapter_or_none(loaded)
    supported = adapter.eval_tasks if adapter is not None else ()
    for task in prepared:
        if task.name not in supported:
            model_type = getattr(getattr(loaded.model, "config", None), "model_type", None)
            names = families_with_task(task.name)
            raise ModelError(
                f"{TASK_OPTION[task.name]} needs a {' model or a '.join(names)} model; "
                f"{label} is of type {model_type!r}"
            )
    assert adapter is not None
    try:
        adapter.check_processor(loaded.processor)
    except ModelError as err:
        raise ModelError(f"{label} {err}") from None


def _perplexity_module(loaded: LoadedModel, label: str) -> Any:
    """The module to measure perplexity on; a refusal names the tasks the model does support."""
    try:
        return perplexity_model(loaded.model, label)
    except ModelError as err:
        adapter = _adapter_or_none(loaded)
        if adapter is None or not adapter.eval_tasks:
            raise
        options = " / ".join(TASK_OPTION[t] for t in adapter.eval_tasks)
        raise ModelError(f"{err} ({adapter.display_name}: use {options})") from None


def _run_task(loaded: LoadedModel, task: _PreparedTask, batch_size: int) -> dict[str, Any]:
    from ecoflap_cli.evaluation import vlm

    model, processor, s = loaded.model, loaded.processor, task.settings
    start = time.perf_counter()
    if task.name == "zero_shot":
        result = vlm.clip_zero_shot(model, processor, task.data, s["templates"], batch_size=batch_size)
    elif task.name == "retrieval":
        result = vlm.clip_retrieval(model, processor, task.records, batch_size=batch_size)
    elif task.name == "vqa":
        result = vlm.vqa_eval(
            model, processor, task.records, s["question_template"], s["max_new_tokens"], batch_size=batch_size
        )
    else:
        result = vlm.caption_eval(
            model,
            processor,
            task.records,
            s["prompt"],
            s["max_new_tokens"],
            batch_size=batch_size,
            cider_tokenizer=s["cider_tokenizer"],
        )
    return {**result, "time_s": round(time.perf_counter() - start, 3)}


def _perplexity_of(loaded: LoadedModel, windows: Any, batch_size: int, label: str) -> float:
    return perplexity(_perplexity_module(loaded, label), windows, batch_size)


def run_eval(
    checkpoint: str,
    text: Path | None,
    compare: str | None,
    plan: str | None,
    seqlen: int,
    max_windows: int | None,
    batch_size: int,
    text_field: str,
    load: Callable[[str], LoadedModel],
    tasks: MultimodalTasks | None = None,
    progress: Callable[[str], None] | None = None,
    lm_tasks: LmEvalRequest | None = None,
) -> dict[str, Any]:
    """Sparsity against the plan, then perplexity, the requested vision-language tasks and the
    lm-eval tasks (``lm_tasks``) on the checkpoint and (with ``compare``) on a dense model;
    returns the results document.

    Data and prompts are checked before any model is loaded; the checkpoint is released before
    the dense model is loaded, so only one model is in memory at a time.
    """
    say = progress or (lambda _message: None)
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise DataError(f"--seqlen must be at least 2 tokens (a window predicts its next tokens), got {seqlen!r}")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise DataError(f"--max-windows must be at least 1, got {max_windows!r}")
    prepared = _prepare_tasks(tasks or MultimodalTasks())
    lm_prepared = None if lm_tasks is None else prepare_lm_eval(lm_tasks)
    plan_doc = _plan_for(checkpoint, plan)
    loaded = load(checkpoint)
    if plan_doc is not None:
        from ecoflap_cli.io.loading import fingerprint

        artifacts.check_model_match(plan_doc, fingerprint(loaded.model), checkpoint, "the plan")
    _check_family(loaded, prepared, checkpoint)
    results: dict[str, Any] = {"checkpoint": checkpoint, **sparsity_rows(loaded, plan_doc)}
    from ecoflap_cli.io.model_card import IDENTITY_KEY, checkpoint_identity

    identity = checkpoint_identity(checkpoint)  # which weights these numbers belong to (model cards)
    if identity is not None:
        results[IDENTITY_KEY] = identity
    results["pruned_checkpoint"] = is_pruned_checkpoint(checkpoint)
    which = "the pruned model" if results["pruned_checkpoint"] else "the model"
    method = pruning_method(checkpoint)
    if method is not None:
        results["pruning"] = method
    windows = None
    if text is not None:
        if loaded.tokenizer is None:
            raise DataError(f"{checkpoint} has no tokenizer: cannot measure perplexity")
        check_seqlen(_perplexity_module(loaded, checkpoint), seqlen)  # no causal LM, or too long: refuse early
        tokens = tokenize_documents(loaded.tokenizer, read_text(text, text_field))
        check_understood(loaded.tokenizer, tokens, f"evaluation text {text}")
        windows = windows_for_eval(tokens, seqlen, max_windows)
        say(f"perplexity of {which}")
        results["perplexity"] = {
            "text": str(text),
            "text_sha256": _file_sha256(text),  # model cards name the file by base name and this
            "seqlen": seqlen,
            "windows": int(windows.shape[0]),
            "pruned": _perplexity_of(loaded, windows, batch_size, checkpoint),
        }
    task_results: dict[str, Any] = {}
    for task in prepared:
        say(f"{task.name} on {which}")
        task_results[task.name] = {
            "data": task.data,
            **_public(task.settings),
            "pruned": _run_task(loaded, task, batch_size),
        }
    if lm_prepared is not None:
        say(f"lm-eval tasks on {which}")
        results["lm_eval"] = _lm_eval_results(lm_prepared, loaded, checkpoint, "pruned")
    if compare is not None and (windows is not None or prepared or lm_prepared is not None):
        del loaded
        dense = load(compare)
        _check_family(dense, prepared, compare)
        results["dense_model"] = compare
        if windows is not None:
            say("perplexity of the dense model")
            results["perplexity"].update(dense=_perplexity_of(dense, windows, batch_size, compare), dense_model=compare)
        for task in prepared:
            say(f"{task.name} on the dense model")
            task_results[task.name]["dense"] = _run_task(dense, task, batch_size)
        if lm_prepared is not None:
            say("lm-eval tasks on the dense model")
            _lm_eval_results(lm_prepared, dense, compare, "dense", into=results["lm_eval"])
    if task_results:
        results["tasks"] = task_results
    return results


def is_pruned_checkpoint(checkpoint: str) -> bool:
    """Whether ``checkpoint`` is a directory ecoflap pruned (it carries a report or a plan): what
    eval's tables call "pruned"; any other model is called "model"."""
    from ecoflap_cli.io.layout import REPORT_NAME

    path = Path(checkpoint)
    return path.is_dir() and ((path / REPORT_NAME).is_file() or (path / "plan.json").is_file())


def _lm_eval_results(
    prepared: PreparedLmEval, loaded: LoadedModel, label: str, role: str, into: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the lm-eval tasks on one model and file its metrics under ``role`` ("pruned" or
    "dense") of each task in the ``lm_eval`` section of the results (``into``, or a new one)."""
    metrics, seconds = run_lm_eval(loaded, prepared, label)
    section = into if into is not None else {**task_settings(prepared), "tasks": {}, "time_s": {}}
    for name, values in metrics.items():
        section["tasks"].setdefault(name, {})[role] = values
    section["time_s"][role] = round(seconds, 3)
    return section


def _public(settings: dict[str, Any]) -> dict[str, Any]:
    """Task settings worth recording in the results (class names can be many: count them)."""
    out = {k: v for k, v in settings.items() if k != "classes"}
    if "classes" in settings:
        out["n_classes"] = len(settings["classes"])
    return out


def _file_sha256(path: Any) -> str | None:
    """The sha256 of a local file's bytes (None for anything else)."""
    from ecoflap_cli.files import sha256_file

    try:
        return sha256_file(path) if Path(path).is_file() else None
    except OSError:
        return None
