"""The search allocator's engine: per-block sparsity levels found by an evolutionary search.

EvoPress (Sieberling et al., ICML 2025) shows that a pruned model's error is not the sum of its
blocks' errors, so a rule mapping block scores to sparsities is a heuristic; searching the
levels directly, with the model's own output as the judge, does better. This is a small
(1 + lambda) version of that search, sized for a CPU:

- **start**: uniform, the depth schedule (snapped to the grid), ``best`` (both measured, the
  search starts from the one with the lower fitness: depth wins on some models, uniform on
  others), or ``ecoflap``: the coarse stage's own plan (the paper's rule on exact gradient-norm
  scores, as ``--allocator ecoflap`` makes it), which the search then refines;
- **levels**: block b gets ``base_b + k_b * step`` with an integer ``k_b`` in ``[-K, K]``
  (``K = max_offset / step``, clipped so every level stays in [0, 0.99]); the base is the target
  for every block, except from the ``ecoflap`` start, where it is that plan's sparsity;
- **budget**: blocks of equal size form a class; a mutation moves one step of sparsity from one
  block of a class to another of the same class (``k_i += 1, k_j -= 1``), so the sum of ``k`` in
  every class stays 0 and the parameter-weighted mean sparsity stays the base's (the target);
- **candidates**: each block's weights at each level come from one database built once: the
  Wanda score ``|W| * ||X||`` of every weight on the dense model's calibration activations,
  stored as its rank within its row, so level ``s`` keeps the ``round(cols (1 - s))``
  best-ranked weights of each row. A candidate is installed by re-masking only the blocks whose
  level changed since the last one;
- **fitness**: KL divergence of the candidate's next-token distribution from the dense model's
  (dense log-probabilities computed once, for the ``full`` samples the selection measures and no
  others) on held-back calibration samples, or the model's own
  loss for models without token logits;
- **selection in stages**: every offspring is measured on the first ``quick`` calibration samples
  only; the best ``survivors`` on the first ``full`` samples (0: all), and the parent is
  replaced only by an offspring that beats it there (elitist, so the parent's fitness never
  rises);
- **seeded and resumable**: generation g draws its mutations from ``Random(f"{seed}:{g}")``; the
  state (parent, its fitness, history) is written atomically after each generation, so an
  interrupted search resumed from its state file ends with the same levels.

The final plan still goes through the fine stage's own solver (any of them), on its own
calibration data: the search only chooses the per-block sparsities.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ecoflap_cli.core.solvers import accumulate_col_sq, empty_col_sq, wanda_metric
from ecoflap_cli.engine.blockwise import input_statistics
from ecoflap_cli.engine.offload import any_offloaded
from ecoflap_cli.errors import PlanError
from ecoflap_cli.files import write_atomic
from ecoflap_cli.models.base import Adapter, Batch, Block

Progress = Callable[[str], None]
#: the highest level a block may get (a block pruned entirely breaks most models)
MAX_LEVEL = 0.99


def _default(name: str) -> Any:
    """A setting's default, declared once: in the scoring registry's ``search`` entry."""
    from ecoflap_cli.core.methods import SCORING

    return SCORING.get("search").defaults()[name]


@dataclass(frozen=True)
class SearchSettings:
    """The search's settings; the defaults are the registry's (``core.methods``, ``search``)."""

    target: float
    step: float = _default("step")
    max_offset: float = _default("max_offset")
    generations: int = _default("generations")
    offspring: int = _default("offspring")
    survivors: int = _default("survivors")
    moves: int = _default("moves")
    start: str = _default("start")
    depth_step: float = _default("depth_step")
    fitness: str = _default("fitness")
    quick: int = _default("quick")
    full: int = _default("full")
    seed: int = 0
    state: str = _default("state")


def _size_classes(blocks: Sequence[Block]) -> list[list[int]]:
    classes: dict[int, list[int]] = {}
    for i, block in enumerate(blocks):
        classes.setdefault(block.num_params, []).append(i)
    return list(classes.values())


def level_bounds(target: float, step: float, max_offset: float) -> tuple[int, int]:
    """The lowest and highest k: ``target + k step`` within [0, MAX_LEVEL] and |k step| <= max_offset."""
    reach = int(math.floor(max_offset / step + 1e-9))
    low = -min(reach, int(math.floor(target / step + 1e-9)))
    high = min(reach, int(math.floor((MAX_LEVEL - target) / step + 1e-9)))
    return low, high


def snap(offsets: Sequence[float], classes: Sequence[Sequence[int]], step: float, low: int, high: int) -> list[int]:
    """Integer levels nearest to real sparsity offsets, with the sum in every class exactly 0.

    Each class's offsets are centred first; rounding errors are then repaid by moving the entries
    whose rounding went furthest, one step at a time, inside the bounds.
    """
    levels = [0] * len(offsets)
    for members in classes:
        mean = sum(offsets[i] for i in members) / len(members)
        raw = {i: (offsets[i] - mean) / step for i in members}
        for i in members:
            levels[i] = max(low, min(high, round(raw[i])))
        excess = sum(levels[i] for i in members)
        while excess != 0:
            sign = 1 if excess > 0 else -1
            movable = [i for i in members if low <= levels[i] - sign <= high]
            if not movable:
                raise PlanError("the level grid cannot hold this start: raise --param max_offset")
            i = max(movable, key=lambda j: sign * (levels[j] - raw[j]))
            levels[i] -= sign
            excess -= sign
    return levels


def level(base: float, k: int, step: float) -> float:
    """Block sparsity ``base + k step``, clamped to [0, MAX_LEVEL]: the bounds keep it there up to
    round-off (0.15 - 3 x 0.05 is -2.8e-17 in floating point)."""
    return min(max(base + k * step, 0.0), MAX_LEVEL)


def block_bounds(base: Sequence[float], step: float, max_offset: float) -> tuple[list[int], list[int]]:
    """Each block's lowest and highest k around its own base level (``level_bounds`` per block)."""
    bounds = [level_bounds(b, step, max_offset) for b in base]
    return [lo for lo, _ in bounds], [hi for _, hi in bounds]


def start_levels(
    settings: SearchSettings, blocks: Sequence[Block], classes: Sequence[Sequence[int]]
) -> dict[str, list[int]]:
    """The grid starts around the target: ``uniform``, the ``depth`` schedule, or both (``best``:
    the search starts from whichever the fitness prefers; neither is best on every model); the
    ``ecoflap`` start is k = 0 on its own base (``ecoflap_base``)."""
    low, high = level_bounds(settings.target, settings.step, settings.max_offset)
    starts = {
        "uniform": [0] * len(blocks),
        "depth": snap([settings.depth_step * b.index for b in blocks], classes, settings.step, low, high),
    }
    if settings.start == "ecoflap":  # k = 0 on its own base (``ecoflap_base``)
        return {"ecoflap": [0] * len(blocks)}
    if settings.start == "best":
        return starts
    if settings.start in starts:
        return {settings.start: starts[settings.start]}
    raise PlanError(f"unknown search start {settings.start!r} (best, uniform, depth or ecoflap)")


def ecoflap_base(
    adapter: Adapter,
    batches: Sequence[Batch],
    blocks: Sequence[Block],
    target: float,
    seed: int,
    progress: Progress | None,
) -> tuple[list[float], dict[str, Any]]:
    """The coarse stage's plan as the search's base: the default scoring (``auto``: exact gradient
    norms where backprop fits) and the paper's allocation rule with its default cap, as
    ``--allocator ecoflap`` gives it. Returns the block sparsities and the scoring's record."""
    from ecoflap_cli.core import allocation
    from ecoflap_cli.core.methods import SCORING

    entry = SCORING.get("auto")  # the default scoring, as the registry runs it
    scores, record = entry.resolve()(adapter, batches, entry.settings({"seed": seed}), progress)
    plan = allocation.ecoflap([b.num_params for b in blocks], [scores[b.name] for b in blocks], target)
    return list(plan.sparsities), record


def mutate(
    parent: Sequence[int],
    classes: Sequence[Sequence[int]],
    low: int | Sequence[int],
    high: int | Sequence[int],
    rng: random.Random,
    moves: int,
) -> list[int]:
    """Move one step of sparsity between two blocks of one size class, 1..``moves`` times, each
    block within its bounds (one pair for all blocks, or one bound per block)."""
    child = list(parent)
    lows = [low] * len(child) if isinstance(low, int) else list(low)
    highs = [high] * len(child) if isinstance(high, int) else list(high)
    candidates = [c for c in classes if len(c) > 1]
    if not candidates:
        return child
    for _ in range(rng.randint(1, moves)):
        members = rng.choice(candidates)
        up = [i for i in members if child[i] < highs[i]]
        down = [i for i in members if child[i] > lows[i]]
        if not up or not down:
            continue
        i = rng.choice(up)
        rest = [j for j in down if j != i]
        if not rest:
            continue
        j = rng.choice(rest)
        child[i] += 1
        child[j] -= 1
    return child


def _rank_dtype(cols: int) -> torch.dtype:
    """The narrowest integer type that holds a rank within a row of ``cols`` weights."""
    return torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32


def database_bytes(blocks: Sequence[Block]) -> dict[str, int]:
    """Bytes the search holds beyond the model, per device of the weights: a dense copy of every
    prunable weight and its rank within its row (``_Database``)."""
    need: dict[str, int] = {}
    for block in blocks:
        for lin in block.linears.values():
            weight = lin.weight
            rank = torch.iinfo(_rank_dtype(weight.shape[1])).bits // 8
            key = str(weight.device)
            need[key] = need.get(key, 0) + weight.numel() * (weight.element_size() + rank)
    return need


def unavailable(adapter: Adapter) -> str | None:
    """Why the search cannot run on this model, or None: it needs the weights in memory, and room
    for its database beside them, with a fifth of the free memory to spare for forward passes."""
    from ecoflap_cli.engine.memory import free_memory

    if any_offloaded(adapter.model):
        return "the weights are offloaded, and it needs them in memory"
    for device, need in database_bytes(adapter.blocks()).items():
        free = free_memory(device)
        if free is not None and need > 0.8 * free:
            gib = f"{need / 2**30:.1f} GiB beside the weights on {device}"
            return f"it needs {gib}, which has {free / 2**30:.1f} GiB free"
    return None


class _Database:
    """Dense weights and per-row Wanda ranks of every prunable linear; installs levels."""

    def __init__(self, adapter: Adapter, blocks: Sequence[Block], batches: Sequence[Batch]) -> None:
        self.blocks = blocks
        linears = {id(lin): lin for b in blocks for lin in b.linears.values()}
        with input_statistics(linears, empty_col_sq, accumulate_col_sq) as stats, torch.no_grad():
            for batch in batches:
                adapter.forward(batch)
        self.dense: dict[int, torch.Tensor] = {}
        self.ranks: dict[int, torch.Tensor] = {}
        for b in blocks:
            for lin in b.linears.values():
                weight = lin.weight.detach()
                self.dense[id(lin)] = weight.clone()
                metric = wanda_metric(weight, stats[id(lin)])
                order = metric.argsort(dim=1, descending=True, stable=True)
                kind = _rank_dtype(weight.shape[1])
                rank = torch.empty_like(order, dtype=kind)
                positions = torch.arange(weight.shape[1], dtype=kind).expand_as(order).contiguous()
                rank.scatter_(1, order, positions)
                self.ranks[id(lin)] = rank
        self.installed = [None] * len(blocks)  # type: list[float | None]

    def install(self, sparsities: Sequence[float]) -> None:
        with torch.no_grad():
            for i, (block, s) in enumerate(zip(self.blocks, sparsities)):
                if self.installed[i] == s:
                    continue
                for lin in block.linears.values():
                    cols = lin.weight.shape[1]
                    keep = int(round(cols * (1.0 - s)))
                    lin.weight.copy_(self.dense[id(lin)])
                    lin.weight.masked_fill_(self.ranks[id(lin)] >= keep, 0)
                self.installed[i] = s

    def restore(self) -> None:
        with torch.no_grad():
            for block in self.blocks:
                for lin in block.linears.values():
                    lin.weight.copy_(self.dense[id(lin)])
        self.installed = [None] * len(self.blocks)


def split_samples(batches: Sequence[Batch]) -> list[Batch]:
    """One batch per calibration sample (tensors sliced along their first dimension), so the
    stages of the selection can use any number of samples."""
    samples = []
    for batch in batches:
        size = next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), 1)
        for k in range(size):
            samples.append(
                {
                    key: (v[k : k + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v)
                    for key, v in batch.items()
                }
            )
    return samples


def _logits(output: Any) -> torch.Tensor | None:
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) and logits.dim() == 3 else None


class _Fitness:
    """KL to the dense model's next-token distribution (dense log-probs kept in fp16), or loss."""

    def __init__(self, adapter: Adapter, batches: Sequence[Batch], kind: str) -> None:
        self.adapter = adapter
        self.batches = batches
        self.dense: list[torch.Tensor] = []
        if kind in ("auto", "kl"):
            with torch.no_grad():
                for batch in batches:
                    logits = _logits(adapter.forward(batch))
                    if logits is None:
                        if kind == "kl":
                            raise PlanError("fitness kl needs a model with token logits: use --param fitness=loss")
                        self.dense = []
                        break
                    self.dense.append(torch.log_softmax(logits.float(), dim=-1).half())
        self.kind = "kl" if self.dense else "loss"

    def __call__(self, indices: Sequence[int]) -> float:
        total = 0.0
        with torch.no_grad():
            for i in indices:
                batch = self.batches[i]
                if self.kind == "loss":
                    total += float(self.adapter.loss(batch).float())
                    continue
                logits = _logits(self.adapter.forward(batch))
                assert logits is not None
                log_q = torch.log_softmax(logits.float(), dim=-1)
                log_p = self.dense[i].float()
                kl = (log_p.exp() * (log_p - log_q)).sum(-1)
                mask = batch.get("attention_mask")
                if isinstance(mask, torch.Tensor) and mask.shape == kl.shape:
                    total += float((kl * mask).sum() / mask.sum().clamp(min=1))
                else:
                    total += float(kl.mean())
        return total / max(len(indices), 1)


def _fingerprint(settings: SearchSettings, blocks: Sequence[Block], batches: Sequence[Batch]) -> str:
    """What a state file must match to be resumed: the settings (less the state path), the
    blocks and the fitness data."""
    digest = hashlib.sha256()
    body = {k: v for k, v in asdict(settings).items() if k not in ("state", "generations")}
    digest.update(json.dumps(body, sort_keys=True).encode())
    digest.update(json.dumps([(b.name, b.num_params) for b in blocks]).encode())
    for batch in batches:
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            digest.update(ids.cpu().numpy().tobytes())
    return digest.hexdigest()


def _read_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlanError(f"search state {path} is unreadable ({exc}); delete it to start over") from exc
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise PlanError(f"search state {path} belongs to another search (settings, model or data differ)")
    return state


def _write_state(path: Path, state: dict[str, Any]) -> None:
    """Write the state beside its final name, then rename: a kill never leaves half a state."""
    write_atomic(path, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())


def search_levels(
    adapter: Adapter,
    batches: Sequence[Batch],
    settings: SearchSettings,
    progress: Progress | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Block name -> sparsity level found by the search, and the record of the run."""
    if not batches:
        raise PlanError("the search needs calibration batches")
    if any_offloaded(adapter.model):
        raise PlanError("the search needs the weights in memory (not offloaded)")
    if not 0.0 <= settings.target < 1.0:
        raise PlanError(f"search target must be in [0, 1), got {settings.target}")
    blocks = adapter.blocks()
    classes = _size_classes(blocks)
    fingerprint = _fingerprint(settings, blocks, batches)
    state_path = Path(settings.state) if settings.state else None
    state = _read_state(state_path, fingerprint) if state_path else None

    if progress:
        progress("search: dense statistics and log-probabilities")
    base = [settings.target] * len(blocks)
    base_record: dict[str, Any] | None = None
    if state is not None:
        base = [float(b) for b in state.get("base", base)]
    elif settings.start == "ecoflap":
        if progress:
            progress("search: the coarse stage's plan (ECoFLaP's rule) as the start")
        base, base_record = ecoflap_base(adapter, batches, blocks, settings.target, settings.seed, progress)
    lows, highs = block_bounds(base, settings.step, settings.max_offset)
    samples = split_samples(batches)
    every = list(range(len(samples) if settings.full <= 0 else min(settings.full, len(samples))))
    first = every[: max(1, min(settings.quick, len(every)))]
    # the dense log-probabilities only of the samples the selection measures (the first ``full``):
    # the rest would cost a forward pass each and their share of memory for nothing
    fitness = _Fitness(adapter, samples[: len(every)], settings.fitness)
    database = _Database(adapter, blocks, batches)

    def measure(levels: Sequence[int], indices: Sequence[int]) -> float:
        database.install([level(b, k, settings.step) for b, k in zip(base, levels)])
        return fitness(indices)

    try:
        if state is None:
            starts = start_levels(settings, blocks, classes)
            measured = {name: measure(levels, every) for name, levels in starts.items()}
            started_from = min(measured, key=lambda name: measured[name])
            parent, parent_fit = starts[started_from], measured[started_from]
            state = {
                "fingerprint": fingerprint,
                "base": base,
                "base_scoring": base_record,
                "generation": 0,
                "parent": parent,
                "fitness": parent_fit,
                "start_fitness": parent_fit,
                "started_from": started_from,
                "start_fitnesses": measured,
                "history": [parent_fit],
                "evaluations": len(starts),
                "accepted": 0,
            }
            if state_path:
                _write_state(state_path, state)
        for generation in range(int(state["generation"]), settings.generations):
            rng = random.Random(f"{settings.seed}:{generation}")
            parent = list(state["parent"])
            children = [mutate(parent, classes, lows, highs, rng, settings.moves) for _ in range(settings.offspring)]
            _select(state, [c for c in children if c != parent], settings.survivors, measure, first, every)
            state["generation"] = generation + 1
            state["history"].append(float(state["fitness"]))
            if state_path:
                _write_state(state_path, state)
            if progress:
                progress(
                    f"search generation {generation + 1}/{settings.generations}: {fitness.kind} {state['fitness']:.4f}"
                )
    finally:
        database.restore()
    levels = {b.name: round(level(lv, k, settings.step), 10) for b, lv, k in zip(blocks, base, state["parent"])}
    return levels, _record(settings, state, fitness, database)


def _select(
    state: dict[str, Any],
    children: Sequence[list[int]],
    survivors: int,
    measure: Callable[[Sequence[int], Sequence[int]], float],
    first: Sequence[int],
    every: Sequence[int],
) -> None:
    """One generation's selection, in ``state``: every child on the ``first`` samples, the best
    ``survivors`` on ``every`` sample, and the parent replaced only by a child better there."""
    quick = sorted(((measure(c, first), n) for n, c in enumerate(children)), key=lambda t: t[0])
    best_fit, best = float(state["fitness"]), None
    for _quick_fit, n in quick[:survivors]:
        full = measure(children[n], every)
        if full < best_fit:
            best_fit, best = full, children[n]
    state["evaluations"] += len(children) + min(survivors, len(children))
    if best is not None:
        state["parent"], state["fitness"] = best, best_fit
        state["accepted"] += 1


def _record(settings: SearchSettings, state: dict[str, Any], fitness: _Fitness, database: _Database) -> dict[str, Any]:
    """What the scores file records of a search (its seconds are the document's ``score_s``:
    the record holds nothing that differs between identical runs)."""
    return {
        "name": "search",
        **{k: v for k, v in asdict(settings).items() if k != "state"},
        "fitness_kind": fitness.kind,
        "start_fitness": state["start_fitness"],
        "started_from": state["started_from"],
        "start_fitnesses": state["start_fitnesses"],
        "start_scoring": state.get("base_scoring"),
        "final_fitness": state["fitness"],
        "history": state["history"],
        "evaluations": state["evaluations"],
        "accepted": state["accepted"],
        "memory_bytes": {  # what the search holds beyond the model itself
            "dense_weights": _nbytes(database.dense.values()),
            "ranks": _nbytes(database.ranks.values()),
            "dense_logprobs": _nbytes(fitness.dense),
        },
    }


def _nbytes(tensors: Any) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))
