"""One typed request per stage: every option of ``score``, ``allocate``, ``prune`` and ``eval``
declared once, with its default, help, valid range and registry check.

Everything else derives from these declarations:

- the Typer options of the ``ecoflap`` commands (``cli/options.py`` builds them from the fields);
- the keywords of the Python API (``api.prune(model, sparsity=0.6, solver="sparsegpt")`` builds a
  :class:`PruneRequest` and checks it the same way);
- recipes (``--recipe FILE`` / ``--save-recipe FILE``): :meth:`Request.to_recipe` and
  :func:`request_from_recipe`;
- the resume fingerprint (:meth:`Request.identity`: the fields that change the weights);
- the provenance in ``ecoflap_report.json`` (the whole request, so a report is a recipe).

A new option is one field here. Nothing in this module imports torch: the command line reads it
to build ``--help``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ecoflap_cli.core.methods import ALLOCATORS, RECONSTRUCTION, SCORING, SOLVERS
from ecoflap_cli.core.registry import Registry
from ecoflap_cli.errors import EcoflapError, PlanError
from ecoflap_cli.evaluation.lm_eval_tasks import INCLUDE_PATH_HELP

RECIPE_FORMAT = "ecoflap.recipe"
RECIPE_VERSION = 1
#: the largest shard of a checkpoint's weights, unless --max-shard-size says otherwise
DEFAULT_MAX_SHARD_SIZE = "5GB"
#: seconds of pruning between two checkpoints of the resume state (0: after every block)
DEFAULT_RESUME_INTERVAL = 300.0


@dataclass(frozen=True)
class Shortcut:
    """A command-line option of its own that sets one key of a settings field (``--lam 0.1`` is
    ``--param lam=0.1``)."""

    flag: str
    key: str
    type: type
    help: str


@dataclass(frozen=True)
class Meta:
    """How one request field is checked, shown on the command line and recorded."""

    help: str
    flags: tuple[str, ...] = ()  # command-line declarations; () gives --field-name
    argument: bool = False  # a positional argument on the command line
    low: float | None = None  # inclusive bounds of a number
    high: float | None = None
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    registry: Registry | None = None  # the value names an entry of this registry (or one of ``extra``)
    extra: tuple[str, ...] = ()
    identity: bool = True  # part of the resume fingerprint: a different value gives different weights
    recipe: bool = True  # written to recipes and reports (not: where the output goes, overwrite, resume)
    cli: bool = True  # offered on the command line
    assign: str | None = None  # dict fields: the command-line syntax of one item (NAME=VALUE)
    shortcuts: tuple[Shortcut, ...] = ()

    def names(self) -> list[str]:
        names = [*self.extra, *(self.registry.names() if self.registry else ())]
        return list(dict.fromkeys(names))


def option(default: Any, help: str, **meta: Any) -> Any:
    """A request field: its default and its :class:`Meta` (see there for the keywords)."""
    info = Meta(help=help, **meta)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"option": info})
    return field(default=default, metadata={"option": info})


REQUIRED: Any = object()  # a field the request cannot do without (checked by ``check``)

R = TypeVar("R", bound="Request")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Request:
    """Base of the stage requests: checking, recipes and fingerprints from the field declarations."""

    stage: ClassVar[str] = ""

    # --- the declarations -------------------------------------------------------------------
    @classmethod
    def fields(cls) -> list[tuple[dataclasses.Field[Any], Meta, Any]]:
        """``(field, meta, type hint)`` of every declared field, in declaration order."""
        hints = typing.get_type_hints(cls)
        return [(f, f.metadata["option"], hints[f.name]) for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f, _meta, _hint in cls.fields()]

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def create(cls: type[R], where: str = "", **values: Any) -> R:
        """A checked request from keyword values (API keywords, recipe entries). An unknown key, a
        value of the wrong type or out of range raises EcoflapError naming the key."""
        known = set(cls.field_names())
        for key in values:
            if key not in known:
                close = [n for n in sorted(known) if n.replace("_", "") == key.replace("_", "").replace("-", "")]
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise EcoflapError(f"{where or cls.stage}: unknown option {key!r}{hint}")
        request = cls(**values)
        request.check(where)
        return request

    def replace(self: R, **values: Any) -> R:
        """A copy with ``values`` changed, checked again."""
        return type(self).create(**{**self.values(), **values})

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    # --- checks -----------------------------------------------------------------------------
    def check(self, where: str = "") -> None:
        """Every field against its declaration, then the request's own cross-field rules."""
        for f, meta, hint in self.fields():
            value = getattr(self, f.name)
            if value is REQUIRED:
                what = meta.flags[0] if meta.flags else "--" + f.name.replace("_", "-")
                raise EcoflapError(f"{where + ': ' if where else ''}Missing option '{what}'")
            flag = meta.flags[0] if meta.flags else f.name if meta.argument else "--" + f.name.replace("_", "-")
            converted = _check_value(value, hint, meta, f"{where + ': ' if where else ''}{flag}")
            object.__setattr__(self, f.name, converted)
        self.validate()

    def validate(self) -> None:
        """Rules between fields (overridden by the stages that have some)."""

    # --- records ----------------------------------------------------------------------------
    def to_recipe(self) -> dict[str, Any]:
        """The request as a recipe document (JSON-able): what reproduces the run."""
        request = {f.name: _jsonable(getattr(self, f.name)) for f, meta, _hint in self.fields() if meta.recipe}
        return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "stage": self.stage, "request": request}

    def identity(self) -> dict[str, Any]:
        """The fields that change the result (the resume fingerprint's part from the request)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f, meta, _hint in self.fields() if meta.identity}


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _type_name(hint: Any) -> str:
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _check_value(value: Any, hint: Any, meta: Meta, where: str) -> Any:
    """``value`` checked against the field's type hint and declaration; converted where lossless
    (a path to its string, an integral float to an int for a count)."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        hint = inner[0]
        args, origin = typing.get_args(hint), typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise EcoflapError(f"{where} takes a mapping of names to values, got {value!r}")
        return {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in value.items()}
    if origin is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise EcoflapError(f"{where} takes a list, got {value!r}")
        return [_check_scalar(v, args[0] if args else str, meta, where) for v in value]
    return _check_scalar(value, hint, meta, where)


def _range(meta: Meta) -> str:
    """``in [0, 1)``, or ``at least 2`` for a bound below alone."""
    if meta.high is None and meta.low is not None:
        return f"at least {meta.low:g}"
    low = "-inf" if meta.low is None else f"{meta.low:g}"
    return f"in [{low}, {meta.high:g}{')' if meta.high_open else ']'}"


def _check_scalar(value: Any, hint: Any, meta: Meta, where: str) -> Any:
    if hint is str and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise EcoflapError(f"{where} takes true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise EcoflapError(f"{where} takes a whole number, got {value!r}")
    elif hint is float:
        if not _is_number(value):
            raise EcoflapError(f"{where} takes a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            ranged = meta.low is not None and meta.high is not None
            raise PlanError(f"{where} must be {_range(meta) if ranged else 'a finite number'}, got {value}")
    elif hint is str and not isinstance(value, str):
        raise EcoflapError(f"{where} takes a string, got {value!r}")
    if _is_number(value):
        too_high = meta.high is not None and (value >= meta.high if meta.high_open else value > meta.high)
        if (meta.low is not None and value < meta.low) or too_high:
            raise PlanError(f"{where} must be {_range(meta)}, got {value!r}")
    if meta.choices is not None and value not in meta.choices:
        raise PlanError(f"{where} must be one of {', '.join(meta.choices)}, got {value!r}")
    if meta.registry is not None and value not in meta.names():
        raise PlanError(f"{where}: unknown {meta.registry.kind} {value!r} (choose from {', '.join(meta.names())})")
    return value


# --- the shared groups of fields --------------------------------------------------------------

_PLACE = {"identity": False}


@dataclass(kw_only=True)
class Placement:
    """Where and how the model is loaded (``io.loading.LoadOptions``)."""

    dtype: str = option("auto", "Weights dtype: auto, float32, float16, bfloat16.", **_PLACE)
    device: str = option("auto", "Compute device: auto (CUDA, MPS, else CPU), cpu, cuda, cuda:1.", **_PLACE)
    trust_remote_code: bool = option(False, "Allow model code from the hub.", flags=("--trust-remote-code",), **_PLACE)
    device_map: str | None = option(None, "accelerate device map: auto, balanced, sequential or JSON.", **_PLACE)
    max_memory: dict[str, str] = option(
        {}, "Per-device budget, e.g. 0=20GiB or cpu=64GiB (repeat).", assign="DEVICE=SIZE", **_PLACE
    )
    offload_folder: str | None = option(None, "Folder for weights that fit on no device.", **_PLACE)
    revision: str | None = option(None, "Hub models: branch, tag or commit to load.", **_PLACE)
    cache_dir: str | None = option(None, "Hub models: download cache folder (default: the hub's).", **_PLACE)

    def placement(self) -> dict[str, Any]:
        """The placement fields as ``LoadOptions`` keywords."""
        names = ("dtype", "device", "trust_remote_code", "device_map", "max_memory", "offload_folder")
        out = {n: getattr(self, n) for n in (*names, "revision", "cache_dir")}
        out["offload"] = getattr(self, "offload", None)
        return out


@dataclass(kw_only=True)
class Offload:
    offload: str | None = option(
        None,
        "Sequential mode: keep every block on cpu or disk (needs --offload-folder) and move it to the "
        "compute device only while it runs.",
        flags=("--offload",),
        choices=("cpu", "disk"),
        identity=False,
    )


@dataclass(kw_only=True)
class Calibration:
    """The calibration data of a stage (``stages.driver.CalibrationOptions``)."""

    # the file's content counts in the fingerprint (through the batches), not its path
    calib: str | None = option(
        None,
        "Calibration data: .txt/.jsonl text, image-text .jsonl, hub:NAME, self (the model writes its own "
        "text), or a mix SOURCE:WEIGHT,... (e.g. wiki.txt:0.5,self:0.5). Default: C4 for language models, "
        "CC3M pairs for vision-language models (from the hub).",
        identity=False,
    )
    samples: int = option(128, "Calibration samples for the layer-wise solver.", low=1)
    seqlen: int | None = option(None, "Tokens per calibration sample (default: context length, at most 2048).", low=2)
    batch_size: int = option(8, "Samples per forward pass.", low=1)
    seed: int = option(0, "Seed for sampling calibration windows and perturbations.", low=0)
    text_field: str = option("text", "Field holding the text in .jsonl records.")

    def calibration(self, samples: int | None = None, seqlen: int | None = None) -> dict[str, Any]:
        """``CalibrationOptions`` keywords (``samples`` / ``seqlen`` replaced when given)."""
        return {
            "calib": self.calib,
            "samples": self.samples if samples is None else samples,
            "seqlen": self.seqlen if seqlen is None else seqlen,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "text_field": self.text_field,
        }


_OUT = {"identity": False, "recipe": False}
_OVERWRITE = option(False, "Replace an existing output.", flags=("--overwrite",), **_OUT)


def _allocator_shortcuts() -> tuple[Shortcut, ...]:
    def help_of(name: str, param: str) -> str:
        found = ALLOCATORS.get(name).param(param)
        text = found.help if found else ""
        return text if text.startswith(f"{name}:") else f"{name}: {text}"

    lams = " / ".join(f"{ALLOCATORS.get(n).defaults()['lam']:g}" for n in ("owl", "rank", "mix"))
    return (
        Shortcut("--max-sparsity", "max_sparsity", float, help_of("ecoflap", "max_sparsity")),
        Shortcut("--temperature", "temperature", float, help_of("ecoflap", "temperature")),
        Shortcut("--depth-step", "step", float, help_of("depth", "step")),
        Shortcut("--lam", "lam", float, f"owl/rank/mix: half-range of block sparsities around the target ({lams})."),
        Shortcut("--alpha", "alpha", float, help_of("mix", "alpha")),
    )


def _scoring_shortcuts() -> tuple[Shortcut, ...]:
    def help_of(name: str, param: str) -> str:
        found = SCORING.get(name).param(param)
        if found is None:
            return ""
        rng = f" ({found.describe_range()})" if found.choices else ""
        return f"{name}: {found.help}{rng}"

    zeroth = ("eps", "granularity", "reuse_activations", "perturbations", "direction", "difference", "head")
    kinds = {"eps": float, "perturbations": int, "reuse_activations": bool}
    return (
        *(Shortcut(f"--{k.replace('_', '-')}", k, kinds.get(k, str), help_of("zeroth", k)) for k in zeroth),
        Shortcut("--first-metric", "metric", str, help_of("first", "metric")),
        Shortcut("--threshold", "m", float, help_of("owl", "m")),
    )


_METHODS = "docs/methods.md describes each method and its settings."


def _allocator_option() -> Any:
    return option(
        "auto",
        "Allocator; auto: ecoflap (the paper's rule), owl for OWL scores, search for search levels; "
        "a one-shot prune of a language model in memory: search, refining the paper's plan "
        "(the plan records which and why). " + _METHODS,
        registry=ALLOCATORS,
        extra=("auto",),
    )


def _allocator_settings_option() -> Any:
    return option(
        {},
        "Any allocator setting as NAME=VALUE (repeat); see docs/methods.md.",
        flags=("--param", "-p"),
        assign="NAME=VALUE",
        shortcuts=_allocator_shortcuts(),
    )


# --- the stages -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ScoreRequest(Calibration, Offload, Placement, Request):
    """``ecoflap score``: one global importance score per block."""

    stage: ClassVar[str] = "score"

    # the weights' own hash is in the fingerprint, not the path they came from
    model: str = option(
        REQUIRED, "Hub id, local model directory or .gguf file.", flags=("--model", "-m"), identity=False
    )
    output: str | None = option("scores.json", "Scores JSON path, or - for stdout.", flags=("--output", "-o"), **_OUT)
    method: str = option(
        "auto",
        "Scoring; auto: exact first-order gradient norms when backprop fits in memory, else zeroth-order. " + _METHODS,
        registry=SCORING,
        extra=("auto",),
    )
    settings: dict[str, Any] = option(
        {},
        "A scoring-method setting as NAME=VALUE (repeat), e.g. eps=1e-3 for zeroth.",
        flags=("--score-param",),
        assign="NAME=VALUE",
        shortcuts=(
            *_scoring_shortcuts(),
            Shortcut("--sparsity", "target", float, "search: the target sparsity to find levels for."),
        ),
    )
    samples: int = option(32, "Calibration samples.", low=1)
    include_qformer: bool = option(False, "Prune (and score) the BLIP-2 Q-Former too.")
    overwrite: bool = _OVERWRITE


@dataclass(kw_only=True)
class AllocateRequest(Request):
    """``ecoflap allocate``: scores -> a per-block sparsity plan under one exact budget."""

    stage: ClassVar[str] = "allocate"

    scores: str = option(REQUIRED, "Scores JSON from `ecoflap score`, or - for stdin.", argument=True, identity=False)
    sparsity: float = option(
        REQUIRED, "Target global sparsity in [0, 1).", flags=("--sparsity", "-s"), low=0.0, high=1.0, high_open=True
    )
    output: str | None = option("plan.json", "Plan JSON path, or - for stdout.", flags=("--output", "-o"), **_OUT)
    allocator: str = _allocator_option()
    settings: dict[str, Any] = _allocator_settings_option()
    per_tower: bool = option(False, "Hold each tower at the target instead of one joint budget.")
    show: bool = option(True, "Print the plan table on stderr.", **_OUT)
    overwrite: bool = _OVERWRITE


@dataclass(kw_only=True)
class PruneRequest(Calibration, Offload, Placement, Request):
    """``ecoflap prune``: layer-wise pruning to a plan, or one-shot to a target sparsity."""

    stage: ClassVar[str] = "prune"

    # the weights' own hash is in the fingerprint, not the path they came from
    model: str = option(
        REQUIRED, "Hub id, local model directory or .gguf file.", flags=("--model", "-m"), identity=False
    )
    output: str | None = option(
        None,
        "Directory for the pruned checkpoint (default: the model's name and the target, e.g. "
        "blip2-opt-2.7b-ecoflap60).",
        flags=("--output", "-o"),
        **_OUT,
    )
    plan: str | None = option(None, "Plan JSON from `ecoflap allocate` (or - for stdin).", identity=False)
    sparsity: float | None = option(
        None,
        "One-shot: score and allocate to this target.",
        flags=("--sparsity", "-s"),
        low=0.0,
        high=1.0,
        high_open=True,
    )
    allocator: str = _allocator_option()
    allocator_settings: dict[str, Any] = _allocator_settings_option()
    score_method: str | None = option(
        None, "One-shot scoring (default: the allocator's, auto for most).", registry=SCORING, extra=("auto",)
    )
    score_settings: dict[str, Any] = option(
        {},
        "A scoring-method setting as NAME=VALUE (repeat), e.g. generations=30 for search.",
        flags=("--score-param",),
        assign="NAME=VALUE",
    )
    score_samples: int = option(32, "One-shot: calibration samples for scoring.", low=1)
    score_seqlen: int | None = option(
        None,
        "One-shot: tokens per scoring sample (default: 128 for language models, at most --seqlen; "
        "--seqlen for the others).",
        low=2,
    )
    solver: str = option("wanda", "Layer-wise solver. " + _METHODS, registry=SOLVERS)
    solver_settings: dict[str, Any] = option(
        {},
        "A solver setting as NAME=VALUE (repeat), e.g. damp=0.02 for sparsegpt; see docs/methods.md.",
        flags=("--solver-param",),
        assign="NAME=VALUE",
    )
    reconstruct: str = option(
        "none",
        "Local reconstruction after each block's masks: fit the kept weights to the dense outputs "
        "(sublayer: attention and MLP separately; block: the whole block); none: off. " + _METHODS,
        registry=RECONSTRUCTION,
        extra=("none",),
    )
    reconstruct_settings: dict[str, Any] = option(
        {},
        "A reconstruction setting as NAME=VALUE (repeat), e.g. steps=32; see docs/methods.md.",
        flags=("--recon-param",),
        assign="NAME=VALUE",
    )
    nm: str | None = option(None, "N:M structured sparsity, e.g. 2:4 (uniform plans only).")
    compare_groups: dict[str, Any] = option(
        {}, "Wanda comparison group per tower: TOWER=row|matrix.", flags=("--compare-group",), assign="TOWER=GROUP"
    )
    include_qformer: bool = option(False, "Prune the BLIP-2 Q-Former too.")
    packed: bool = option(
        False, "Write packed sparse safetensors (smaller; needs ecoflap to load).", flags=("--packed",), identity=False
    )
    max_shard_size: str = option(DEFAULT_MAX_SHARD_SIZE, "Largest weight file, e.g. 5GB or 500MB.", identity=False)
    overwrite: bool = _OVERWRITE
    resume: bool = option(
        False,
        "Continue an interrupted prune into the same -o from its last checkpoint (same options).",
        flags=("--resume",),
        **_OUT,
    )
    resume_interval: float = option(
        DEFAULT_RESUME_INTERVAL,
        "Seconds of pruning between two checkpoints of the resume state (0: after every block).",
        low=0.0,
        **_OUT,
    )

    def validate(self) -> None:
        if (self.plan is None) == (self.sparsity is None):
            raise EcoflapError("give exactly one of --plan PLAN.json or --sparsity P")
        if self.output == "-":
            raise EcoflapError("prune writes a checkpoint directory, not a stream: give -o DIR instead of -o -")
        if self.reconstruct == "none" and self.reconstruct_settings:
            raise EcoflapError("reconstruction settings given without a reconstruction: add --reconstruct sublayer")
        for tower, group in self.compare_groups.items():
            if group not in ("row", "matrix"):
                raise EcoflapError(f"--compare-group takes TOWER=row|matrix, got {tower}={group}")
        self.nm_pair()

    def nm_pair(self) -> tuple[int, int] | None:
        if self.nm is None:
            return None
        try:
            n, m = (int(x) for x in self.nm.split(":"))
        except ValueError:
            raise EcoflapError(f"--nm takes N:M such as 2:4, got {self.nm!r}") from None
        if not 0 < n < m:
            raise EcoflapError(f"--nm needs 0 < N < M, got {self.nm!r}")
        return n, m

    def default_output(self) -> str:
        """The checkpoint directory when -o is not given: the model's name and what was done,
        e.g. ``blip2-opt-2.7b-ecoflap60`` (``-pruned`` for a given plan)."""
        name = Path(self.model.rstrip("/\\")).name or "model"
        name = name.removesuffix(".gguf")
        tail = "pruned" if self.sparsity is None else f"ecoflap{round(self.sparsity * 100):d}"
        return f"{name}-{tail}"


@dataclass(kw_only=True)
class EvalRequest(Placement, Request):
    """``ecoflap eval``: achieved sparsity, perplexity, vision-language and lm-eval tasks."""

    stage: ClassVar[str] = "eval"

    checkpoint: str = option(
        REQUIRED, "Pruned checkpoint directory (or any model id / .gguf).", argument=True, identity=False
    )
    text: str | None = option(
        None, "Text file (.txt/.jsonl) for perplexity (BLIP-2: its language model; LLaVA: the model on text alone)."
    )
    images: str | None = option(
        None, "CLIP / SigLIP zero-shot classification: a folder with one subfolder of images per class."
    )
    template: list[str] = option(
        [], "Zero-shot prompt template, {} is the class name (repeat; default 'a photo of a {}.')."
    )
    template_file: str | None = option(None, "Zero-shot prompt templates, one per line.")
    retrieval: str | None = option(None, "CLIP / SigLIP image-text retrieval R@1/5/10: JSONL of {image, caption}.")
    vqa: str | None = option(
        None, "BLIP-2 / InstructBLIP / LLaVA VQA soft accuracy: JSONL of {image, question, answers}."
    )
    captions: str | None = option(None, "BLIP-2 / InstructBLIP / LLaVA captioning CIDEr-D: JSONL of {image, caption}.")
    prompt: str | None = option(None, "Captioning prompt the model continues (default 'a photo of'; '' for none).")
    question_template: str | None = option(None, "VQA prompt with {question} (default 'Question: {question} Answer:').")
    max_new_tokens: int | None = option(None, "Tokens to generate (default 10 for VQA, 20 for captions).", low=1)
    tasks: list[str] = option(
        [],
        "lm-evaluation-harness tasks, comma-separated or repeated: wiki_cloze (local, offline) or lm-eval's own "
        "(boolq, piqa, hellaswag, arc_easy, winogrande, ...); needs ecoflap[lmeval].",
    )
    num_fewshot: int | None = option(
        None, "lm-eval: examples in each prompt (default: the task's own, else 0).", low=0, high=1000
    )
    limit: float | None = option(None, "lm-eval: documents per task (a count; below 1, a fraction).", low=0.0)
    include_path: list[str] = option([], "lm-eval: " + INCLUDE_PATH_HELP)
    compare: str | None = option(None, "Dense model to evaluate side by side.")
    plan: str | None = option(None, "Plan to check achieved sparsity against (default: the checkpoint's plan.json).")
    seqlen: int = option(512, "Tokens per perplexity window.", low=2)
    max_windows: int | None = option(None, "Evaluate at most this many windows.", low=1)
    batch_size: int = option(4, "Windows (or images) per forward pass.", low=1)
    per_tensor: bool = option(False, "Show every tensor, not one row per block.", **_OUT)
    output: str | None = option(None, "Write results JSON here (- for stdout).", flags=("--output", "-o"), **_OUT)
    text_field: str = option("text", "Field holding the text in .jsonl records.")
    overwrite: bool = _OVERWRITE
    no_verify: bool = option(
        False,
        "Skip checking the checkpoint's weight files against their recorded sha256.",
        flags=("--no-verify",),
        identity=False,
    )

    def validate(self) -> None:
        if self.template and self.images is None and not self.template_file:
            raise EcoflapError("--template/--template-file go with --images (zero-shot classification)")
        if not self.tasks and (self.num_fewshot is not None or self.limit is not None or self.include_path):
            raise EcoflapError("--num-fewshot, --limit and --include-path go with --tasks (lm-eval tasks)")


def _default(cls: type[Request], name: str) -> Any:
    """A field's default, for a request that shares it (the sweep's sizes are prune's and eval's)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[arg-type]


def _method_help() -> str:
    def names(registry: Registry) -> str:
        return ", ".join(registry.names())

    return (
        "ALLOCATOR[-SCORING]:SOLVER[+RECONSTRUCTION][@k=v,..], e.g. uniform:wanda, ecoflap-zeroth:sparsegpt, "
        f"owl:wanda@m=5,lam=0.08, mix:wanda+sublayer (repeat). Allocators: {names(ALLOCATORS)}; "
        f"scoring: {names(SCORING)}; solvers: {names(SOLVERS)}; reconstruction: {names(RECONSTRUCTION)}; "
        "@keys: any of their settings (docs/methods.md)."
    )


@dataclass(kw_only=True)
class SweepRequest(Calibration, Request):
    """``ecoflap sweep``: prune and evaluate many methods x sparsities (``stages.sweep.SweepConfig``
    adds the runner's logic); the data sizes default to ``prune``'s and ``eval``'s."""

    stage: ClassVar[str] = "sweep"

    model: str = option(REQUIRED, "Hub id, local model directory or .gguf file.", flags=("--model", "-m"))
    calib: str = option(REQUIRED, "Calibration text (.txt/.jsonl), self, or a mix SOURCE:WEIGHT,... as for prune.")
    text: str = option(REQUIRED, "Text (.txt/.jsonl) to measure perplexity on.")
    methods: list[str] = option([], _method_help(), flags=("--method",))
    sparsities: list[float] = option([], "Target sparsity (repeat).", flags=("--sparsity", "-s"), low=0.0, high=1.0,
                                     high_open=True)  # fmt: skip
    output: str = option("sweep", "Directory for sweep.json and the run cache.", flags=("--output", "-o"))
    score_samples: int = option(_default(PruneRequest, "score_samples"), "Scoring calibration samples.", low=1)
    score_seqlen: int | None = option(None, "Tokens per scoring sample (default: --seqlen).", low=2)
    eval_seqlen: int = option(_default(EvalRequest, "seqlen"), "Tokens per perplexity window.", low=2)
    eval_windows: int | None = option(None, "Evaluate at most this many windows.", low=1)
    eval_batch_size: int = option(_default(EvalRequest, "batch_size"), "Windows per forward pass.", low=1, cli=False)
    repeats: int = option(1, "Time the prune stage this many times per run (interleaved passes; medians).", low=1)
    #: the extra timing passes (repeats > 1) cover only these methods / sparsities (None: all)
    timing_methods: list[str] | None = option(None, "Methods the extra timing passes cover.", cli=False)
    timing_sparsities: list[float] | None = option(None, "Sparsities the extra timing passes cover.", cli=False)
    # the benchmarks' comparisons (bench.sweep_report): process isolation, llm-compressor, tables and plot
    isolate: bool = option(
        False, "Run each method in its own subprocess (per-method peak memory).", flags=("--isolate",), cli=False
    )
    llmc_python: str | None = option(
        None,
        "Python of a venv with llmcompressor, for llmc:* methods (`python -m ecoflap_cli.bench.llmc_env` makes "
        "one and prints it).",
        cli=False,
    )
    llmc_batch_size: int | None = option(None, "llm-compressor's batch size (default: --batch-size).", cli=False)
    dtype: str = option("auto", "Weights dtype: auto, float32, float16, bfloat16.")
    device: str = option("auto", "Compute device: auto (CUDA, MPS, else CPU), cpu, cuda, cuda:1.")
    threads: int | None = option(None, "torch threads (default: torch's choice).", low=1)
    resume: bool = option(
        True, "Reuse the cached runs and scores in the output directory (--fresh: ignore them).",
        flags=("--resume/--fresh",),
    )  # fmt: skip
    plot: bool = option(True, "Write sweep.png (needs matplotlib).", cli=False)
    title: str | None = option(None, "The title of sweep.md.", cli=False)
    #: further texts every pruned model is also evaluated on (perplexity; same windows settings)
    extra_texts: list[str] | None = option(
        None,
        "Another text every pruned model is also evaluated on (repeat; e.g. another domain).",
        flags=("--extra-text",),
    )


@dataclass(kw_only=True)
class LoadRequest(Offload, Placement, Request):
    """How ``api.load`` loads a model: the placement options alone."""

    stage: ClassVar[str] = "load"


STAGES: dict[str, type[Request]] = {
    r.stage: r
    for r in (ScoreRequest, AllocateRequest, PruneRequest, EvalRequest)  # type: ignore[type-abstract]
}


# --- recipes ----------------------------------------------------------------------------------


def read_recipe(path: str | os.PathLike[str], stage: str) -> dict[str, Any]:
    """The request entries of a recipe file for ``stage``: a recipe (JSON or YAML, as
    ``--save-recipe`` writes), or a checkpoint's ``ecoflap_report.json`` (or its directory), whose
    ``request`` is the recipe of the prune that made it. Only the file is read: nothing is loaded."""
    source = Path(path)
    if source.is_dir():
        source = source / "ecoflap_report.json"
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EcoflapError(f"cannot read recipe {path}: {getattr(exc, 'strerror', None) or exc}") from None
    doc = _parse_recipe_text(text, source)
    if not isinstance(doc, dict):
        raise EcoflapError(f"recipe {path} is not a mapping of options")
    if doc.get("format") == "ecoflap.report":
        doc = doc.get("request") or {}
        if not doc:
            raise EcoflapError(f"{path} records no request (written by an older ecoflap): it cannot be a recipe")
    if doc.get("format") == RECIPE_FORMAT:
        if doc.get("version") != RECIPE_VERSION:
            raise EcoflapError(f"recipe {path} has version {doc.get('version')!r}; this ecoflap reads {RECIPE_VERSION}")
        if doc.get("stage") != stage:
            raise EcoflapError(f"recipe {path} is for `ecoflap {doc.get('stage')}`, not `ecoflap {stage}`")
        doc = doc.get("request")
        if not isinstance(doc, dict):
            raise EcoflapError(f"recipe {path} has no request mapping")
    return dict(doc)


def _parse_recipe_text(text: str, source: Path) -> Any:
    if source.suffix.lower() in (".yaml", ".yml"):
        import yaml  # transformers depends on PyYAML

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise EcoflapError(f"recipe {source} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise EcoflapError(f"recipe {source} is not valid JSON: {exc}") from None


def request_from_recipe(stage: str, path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Any:
    """The checked request of a recipe file, with ``overrides`` (options given on the command line)
    applied on top; settings mappings are merged key by key. Errors name the key, before any loading."""
    cls = STAGES[stage]
    entries = read_recipe(path, stage)
    merged: dict[str, Any] = dict(entries)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return cls.create(f"recipe {os.fspath(path)}", **merged)


def recipe_text(request: Request, path: str) -> str:
    """A request as recipe text: YAML for ``.yaml``/``.yml`` paths, else JSON."""
    doc = request.to_recipe()
    if path.lower().endswith((".yaml", ".yml")):
        import yaml

        return str(yaml.safe_dump(doc, sort_keys=False))
    return json.dumps(doc, indent=2) + "\n"
