"""The `eval` stage as a library call: sparsity against the plan, perplexity, dense comparison."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import artifacts
from .data import read_text, tokenize_documents
from .errors import DataError
from .evaluation import perplexity, sparsity_report, windows_for_eval
from .loading import LoadedModel
from .models import get_adapter


def _plan_for(checkpoint: str, plan: str | None) -> dict[str, Any] | None:
    if plan is not None:
        return artifacts.validate_plan(artifacts.read_json(plan), plan)
    candidate = Path(checkpoint) / "plan.json"
    if candidate.is_file():
        return artifacts.validate_plan(artifacts.read_json(str(candidate)), str(candidate))
    return None


def sparsity_rows(loaded: LoadedModel, plan: dict[str, Any] | None) -> dict[str, Any]:
    adapter = get_adapter(loaded.model)
    tensors = sparsity_report(adapter, plan)
    tensor_rows = [
        {"name": t.name, "tower": t.tower, "params": t.numel, "zeros": t.zeros,
         "achieved": t.sparsity, "planned": None if t.planned_zeros is None else t.planned_zeros / t.numel,
         "matches_plan": t.matches_plan}
        for t in tensors
    ]
    block_rows = []
    for block in adapter.blocks():
        mine = [t for t in tensors if t.name.startswith(block.name + ".")]
        numel = sum(t.numel for t in mine)
        planned = None if any(t.planned_zeros is None for t in mine) else sum(t.planned_zeros or 0 for t in mine)
        matches = None if planned is None else all(t.matches_plan for t in mine)
        block_rows.append({"name": block.name, "tower": block.tower, "params": numel,
                           "zeros": sum(t.zeros for t in mine), "achieved": sum(t.zeros for t in mine) / numel,
                           "planned": None if planned is None else planned / numel, "matches_plan": matches})
    total = sum(t.numel for t in tensors)
    planned_total = None if plan is None else sum(t.planned_zeros or 0 for t in tensors) / total
    return {"tensors": tensor_rows, "blocks": block_rows,
            "summary": {"achieved": sum(t.zeros for t in tensors) / total, "planned": planned_total,
                        "mismatches": sum(1 for t in tensors if t.matches_plan is False)}}


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
) -> dict[str, Any]:
    plan_doc = _plan_for(checkpoint, plan)
    loaded = load(checkpoint)
    if plan_doc is not None:
        from .loading import fingerprint

        artifacts.check_model_match(plan_doc, fingerprint(loaded.model), checkpoint, "the plan")
    results: dict[str, Any] = {"checkpoint": checkpoint, **sparsity_rows(loaded, plan_doc)}
    if text is not None:
        if loaded.tokenizer is None:
            raise DataError(f"{checkpoint} has no tokenizer: cannot measure perplexity")
        tokens = tokenize_documents(loaded.tokenizer, read_text(text, text_field))
        windows = windows_for_eval(tokens, seqlen, max_windows)
        ppl: dict[str, Any] = {"text": str(text), "seqlen": seqlen, "windows": int(windows.shape[0]),
                               "pruned": perplexity(loaded.model, windows, batch_size)}
        if compare is not None:
            del loaded
            dense = load(compare)
            ppl.update(dense=perplexity(dense.model, windows, batch_size), dense_model=compare)
        results["perplexity"] = ppl
    return results
