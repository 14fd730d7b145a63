"""The stages as library calls: score, allocate, prune, evaluate. The CLI only parses and renders.

Each stage takes a loaded model (or a document) and returns a document; none prints or exits.
"""

from __future__ import annotations

import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ecoflap_cli import __version__
from ecoflap_cli.io import artifacts
from ecoflap_cli.data.text import Provenance, calibration_windows, to_batches
from ecoflap_cli.errors import DataError, PlanError
from ecoflap_cli.io.loading import LoadedModel, fingerprint
from ecoflap_cli.models import Adapter, Batch, get_adapter
from ecoflap_cli.engine.pruning import PruneSettings, prune_model
from ecoflap_cli.engine.scoring import ZerothOrderSettings, first_order_scores, owl_outlier_ratios, zeroth_order_scores

Progress = Callable[[str], None]


@dataclass
class CalibrationOptions:
    calib: str | None = None
    samples: int = 128
    seqlen: int | None = None
    batch_size: int = 8
    seed: int = 0
    text_field: str = "text"


@dataclass
class ScoreOptions:
    method: str = "auto"  # auto | zeroth | first | owl
    zeroth: ZerothOrderSettings = field(default_factory=ZerothOrderSettings)
    first_metric: str = "taylor"
    checkpointing: bool = True
    owl_threshold: float = 5.0


def default_seqlen(model: torch.nn.Module) -> int:
    """Calibration length per model: the context length capped at 2048, never more.

    Wanda took ``max_position_embeddings`` as is and ran out of memory on long-context models.
    """
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    limit = getattr(text_config, "max_position_embeddings", None) or 2048
    return int(min(limit, 2048))


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
        seqlen = opts.seqlen or default_seqlen(loaded.model)
        windows, prov = calibration_windows(
            loaded.tokenizer, opts.calib, opts.samples, seqlen, opts.seed, opts.text_field
        )
        return to_batches(windows, opts.batch_size), prov.to_dict()
    from ecoflap_cli.data import multimodal

    if opts.calib is None:
        raise DataError(f"{adapter.family} models need image-text calibration data: pass --calib FILE.jsonl")
    records = multimodal.read_image_text_jsonl(opts.calib)
    if len(records) > opts.samples:  # a seeded sample, in file order (files are often sorted by image)
        chosen = sorted(random.Random(opts.seed).sample(range(len(records)), opts.samples))
        records = [records[i] for i in chosen]
    batches = multimodal.make_multimodal_batches(
        adapter, loaded.processor, records, opts.batch_size, opts.seqlen or 64
    )
    # tokens: text positions the model reads (image placeholders included, padding not)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                 for b in batches)
    prov = Provenance(opts.calib, len(records), opts.seqlen or 64, opts.seed, tokens)
    return batches, prov.to_dict()


def run_score(
    loaded: LoadedModel,
    adapter: Adapter,
    batches: list[Batch],
    calibration: dict[str, Any],
    opts: ScoreOptions,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The coarse stage: a scores document."""
    start = time.perf_counter()
    method: dict[str, Any] = {"name": opts.method}
    if opts.method == "auto":
        choice, reason = choose_score_method(adapter, batches)
        method = {"name": choice, "chosen_by": "auto", "reason": reason}
        opts = ScoreOptions(choice, opts.zeroth, "gradnorm", opts.checkpointing, opts.owl_threshold)
        if progress:
            progress(f"auto: {choice}-order scores ({reason})")
    if opts.method == "zeroth":
        check_zeroth_memory(adapter.model, batches)
        scores = zeroth_order_scores(adapter, batches, opts.zeroth, progress)
        method.update(asdict(opts.zeroth), name="zeroth")
    elif opts.method == "first":
        scores = first_order_scores(adapter, batches, opts.first_metric, opts.checkpointing, progress)
        method.update(metric=opts.first_metric, checkpointing=opts.checkpointing, name="first")
    elif opts.method == "owl":
        scores = owl_outlier_ratios(adapter, batches, opts.owl_threshold, progress)
        method.update(threshold=opts.owl_threshold)
    else:
        raise PlanError(f"unknown scoring method {opts.method!r} (auto, zeroth, first or owl)")
    timings = {"score_s": round(time.perf_counter() - start, 3)}
    return artifacts.scores_document(
        model_info(loaded, adapter), adapter.blocks(), scores, method, calibration, timings
    )


def structure_document(loaded: LoadedModel, adapter: Adapter) -> dict[str, Any]:
    """A scores document without scores: enough for the uniform and depth allocators."""
    return artifacts.scores_document(
        model_info(loaded, adapter), adapter.blocks(), None, {"name": "none"}, None
    )


def run_prune(
    loaded: LoadedModel,
    adapter: Adapter,
    plan: dict[str, Any],
    batches: list[Batch],
    calibration: dict[str, Any] | None,
    settings: PruneSettings,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The fine stage, in place on ``loaded.model``; returns the report document."""
    artifacts.check_model_match(plan, fingerprint(loaded.model), loaded.source, "the plan")
    if settings.nm is not None:
        artifacts.check_nm_plan(plan, settings.nm)
    covered = {t for b in adapter.blocks() for t in b.tensor_names()}
    uncovered = sorted(set(artifacts.prune_counts(plan)) - covered)
    if uncovered:
        hint = " (pass --include-qformer)" if any("qformer" in t for t in uncovered) else ""
        raise PlanError(f"the plan prunes {len(uncovered)} tensors that this run does not cover, "
                        f"e.g. {uncovered[0]}{hint}")
    unknown = sorted(set(settings.compare_groups) - set(adapter.towers()))
    if unknown:
        raise PlanError(f"--compare-group names unknown tower {unknown[0]!r} "
                        f"(this model has: {', '.join(adapter.towers())})")
    start = time.perf_counter()
    results = prune_model(adapter, artifacts.prune_counts(plan), batches, settings, progress)
    elapsed = time.perf_counter() - start
    total = sum(r.numel for r in results)
    return {
        "format": "ecoflap.report",
        "version": 1,
        "ecoflap_version": __version__,
        "model": plan["model"],
        "plan_hash": artifacts.doc_hash(plan),
        "solver": settings.solver,
        "nm": list(settings.nm) if settings.nm else None,
        "compare_groups": settings.compare_groups,
        "calibration": calibration,
        "target_sparsity": plan["target_sparsity"],
        "achieved_sparsity": sum(r.zeros for r in results) / total if total else 0.0,
        "timings": {"prune_s": round(elapsed, 3)},
        "versions": _versions(),
        "tensors": [asdict(r) for r in results],
    }


def _versions() -> dict[str, str]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "ecoflap": __version__}


def load_adapter(loaded: LoadedModel, include_qformer: bool = False) -> Adapter:
    """The family adapter of a loaded model (``include_qformer`` matters for BLIP-2 families only)."""
    return get_adapter(loaded.model, include_qformer=include_qformer)


def hidden_sizes(model: torch.nn.Module) -> list[int]:
    config = getattr(model, "config", None)
    sizes = []
    for cfg in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        size = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
        if isinstance(size, int):
            sizes.append(size)
    return sizes or [0]


def activation_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Calibration activations the block-wise driver holds at once: every sample's block input and
    output (2 x samples x tokens x hidden), at the model's precision. An estimate: attention masks
    and a block's own intermediates come on top."""
    itemsize = next(model.parameters()).element_size()
    return 2 * tokens * max(hidden_sizes(model)) * itemsize


def check_activation_memory(model: torch.nn.Module, opts: CalibrationOptions, store: str | None) -> None:
    """Refuse a run whose calibration activations cannot fit, before any work starts."""
    from ecoflap_cli.engine.blockwise import module_device
    from ecoflap_cli.engine.offload import memory_budget_check

    tokens = opts.samples * (opts.seqlen or default_seqlen(model))
    device = torch.device(store) if store else module_device(model)
    memory_budget_check(activation_bytes(model, tokens), device, "holding the calibration activations",
                        "--samples or --seqlen")


def zeroth_order_bytes(model: torch.nn.Module, batches: list[Batch]) -> int:
    """What zeroth-order scoring stores across all batches: the replayed block outputs (one set,
    plus the next block's while it is recorded) at the model's precision, and dL/dh at the last
    block in fp32 (one hidden-state set) for the linearized head."""
    tokens = sum(int(b["input_ids"].numel()) for b in batches if "input_ids" in b)
    return activation_bytes(model, tokens) + tokens * max(hidden_sizes(model)) * 4


def check_zeroth_memory(model: torch.nn.Module, batches: list[Batch]) -> None:
    """Refuse zeroth-order scoring whose stored activations cannot fit, before any work starts."""
    from ecoflap_cli.engine.blockwise import module_device
    from ecoflap_cli.engine.offload import memory_budget_check

    memory_budget_check(zeroth_order_bytes(model, batches), module_device(model),
                        "zeroth-order scoring (replayed activations and head gradients)", "--samples or --seqlen")


def first_order_bytes(model: torch.nn.Module, batches: list[Batch]) -> int:
    """Estimated extra memory of checkpointed first-order scoring for the largest batch.

    Checkpointed block inputs (one hidden state per block), one block's recomputed activations
    (about 16 hidden-sized tensors), the logits with their gradient in fp32 (3 x tokens x vocab),
    and the largest single weight gradient (gradients are reduced and freed as they arrive).
    """
    tokens = max((int(b["input_ids"].numel()) for b in batches if "input_ids" in b), default=0)
    hidden = max(hidden_sizes(model))
    config = getattr(model, "config", None)
    vocab = getattr(getattr(config, "text_config", None) or config, "vocab_size", 0) or 0
    blocks = len(get_adapter(model).blocks())
    itemsize = next(model.parameters()).element_size()
    largest = max((p.numel() for p in model.parameters()), default=0)
    return tokens * hidden * itemsize * (blocks + 16) + 3 * tokens * vocab * 4 + largest * 4


def choose_score_method(adapter: Adapter, batches: list[Batch]) -> tuple[str, str]:
    """First-order (exact gradient norms) when its memory fits, else forward-only zeroth-order.

    The same allocation rule fed exact per-block gradient norms allocates much better than with a
    four-batch zeroth-order estimate (docs/allocation.md), and costs a few forward passes instead
    of about one per block; zeroth-order remains for models whose backward pass does not fit.
    """
    from ecoflap_cli.engine.blockwise import module_device
    from ecoflap_cli.engine.offload import any_offloaded

    if any_offloaded(adapter.model):
        return "zeroth", "weights are offloaded: forward-only scoring"
    need = first_order_bytes(adapter.model, batches)
    device = module_device(adapter.model)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as handle:
                info = dict(line.split(":", 1) for line in handle)
            free = int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return "zeroth", "free memory unknown: forward-only scoring"
    if need <= 0.8 * free:
        return "first", f"backprop needs about {need / 2**30:.2f} GiB of {free / 2**30:.1f} GiB free on {device}"
    return "zeroth", f"backprop would need about {need / 2**30:.2f} GiB, {free / 2**30:.1f} GiB free on {device}"

