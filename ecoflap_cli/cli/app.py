"""The `ecoflap` command line: parses options, calls the library, renders to stderr.

Artifacts go to files, or to stdout with ``-o -``; ``-`` as an input path reads stdin. Every
user error ends in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import click
import typer
from rich.console import Console

from ecoflap_cli import __version__
from ecoflap_cli.core.methods import ALLOCATORS, SCORING, SOLVERS
from ecoflap_cli.core.registry import Registry, parse_assignments
from ecoflap_cli.errors import EcoflapError

if TYPE_CHECKING:  # the model stack (torch, transformers) is imported only by commands that run a model
    from ecoflap_cli.io.loading import LoadedModel

console = Console(stderr=True)
if not console.is_terminal:  # logs and pipes: wide enough that tables are not truncated
    console = Console(stderr=True, width=140)
app = typer.Typer(
    name="ecoflap",
    help="Prune language and vision-language models with ECoFLaP (coarse-to-fine layer-wise pruning).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn library errors into one line on stderr and an exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EcoflapError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except MemoryError:
            console.print("[bold red]error:[/] out of memory: lower --samples, --seqlen or --batch-size")
            raise typer.Exit(3) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: nothing was written")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[str], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=total)

        def step(message: str) -> None:
            bar.update(task, advance=1, description=message)

        yield step


# --- choices from the registries -------------------------------------------------------------


def registry_option(registry: Registry, help: str, *decls: str, extra: tuple[str, ...] = ()) -> Any:
    """A typer option whose value is a registry name: listed in ``--help``, offered by shell
    completion and checked as it is parsed (before any model is loaded). The registry is read when
    the option is used, so a method registered at run time is accepted too."""

    def names() -> list[str]:
        return [*extra, *registry.names()]

    def check(value: str | None) -> str | None:
        if value is not None and value not in names():
            raise typer.BadParameter(f"unknown {registry.kind} {value!r} (choose from {', '.join(names())})")
        return value

    def complete(_ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[Any]:
        from click.shell_completion import CompletionItem

        return [CompletionItem(n) for n in names() if n.startswith(incomplete)]

    return typer.Option(
        *decls, help=help, metavar="[" + "|".join(names()) + "]", callback=check, shell_complete=complete
    )


def _param_help(registry: Registry, name: str, param: str, fallback: str = "") -> str:
    entry = registry.get(name)
    found = entry.param(param)
    return found.help if found else fallback


def _choice_help(registry: Registry, name: str, param: str) -> str:
    found = registry.get(name).param(param)
    return f"{found.help} ({found.describe_range()})" if found else ""


def _methods_help(registry: Registry, lead: str) -> str:
    return f"{lead} docs/methods.md describes each {registry.kind} and its settings.".strip()


# --- shared options ---------------------------------------------------------------------------

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id, local model directory or .gguf file.")]
DtypeOpt = Annotated[str, typer.Option(help="Weights dtype: auto, float32, float16, bfloat16.")]
DeviceOpt = Annotated[str, typer.Option(help="Compute device: auto (CUDA, MPS, else CPU), cpu, cuda, cuda:1.")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the hub.")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(help="accelerate device map: auto, balanced, sequential or JSON.")]
MaxMemOpt = Annotated[Optional[list[str]], typer.Option(help="Per-device budget, e.g. 0=20GiB or cpu=64GiB (repeat).")]
OffloadOpt = Annotated[Optional[Path], typer.Option(help="Folder for weights that fit on no device.")]
SequentialOpt = Annotated[
    Optional[str],
    typer.Option(
        "--offload",
        help="Sequential mode: keep every block on cpu or disk (needs --offload-folder) and move "
        "it to the compute device only while it runs.",
    ),
]
CalibOpt = Annotated[
    Optional[str], typer.Option(help="Calibration data: .txt/.jsonl text, image-text .jsonl, or hub:NAME.")
]
SeqlenOpt = Annotated[
    Optional[int], typer.Option(help="Tokens per calibration sample (default: context length, at most 2048).")
]
SeedOpt = Annotated[int, typer.Option(help="Seed for sampling calibration windows and perturbations.")]
TextFieldOpt = Annotated[str, typer.Option(help="Field holding the text in .jsonl records.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
AllocatorOpt = Annotated[
    str,
    registry_option(
        ALLOCATORS,
        _methods_help(
            ALLOCATORS,
            "Allocator; auto: mix for one-tower language models, ecoflap for "
            "multi-tower models (the plan records which and why).",
        ),
        extra=("auto",),
    ),
]
ScoreMethodOpt = Annotated[
    str,
    registry_option(
        SCORING,
        _methods_help(
            SCORING, "Scoring; auto: exact first-order gradient norms when backprop fits in memory, else zeroth-order."
        ),
    ),
]
SolverOpt = Annotated[str, registry_option(SOLVERS, _methods_help(SOLVERS, "Layer-wise solver."))]
MaxSparsityOpt = Annotated[
    Optional[float], typer.Option(help="ecoflap: " + _param_help(ALLOCATORS, "ecoflap", "max_sparsity"))
]
TemperatureOpt = Annotated[
    Optional[float], typer.Option(help="ecoflap: " + _param_help(ALLOCATORS, "ecoflap", "temperature"))
]
DepthStepOpt = Annotated[Optional[float], typer.Option(help="depth: " + _param_help(ALLOCATORS, "depth", "step"))]
LamOpt = Annotated[
    Optional[float],
    typer.Option(
        help="owl/rank/mix: half-range of block sparsities around the target "
        "(defaults " + " / ".join(f"{ALLOCATORS.get(n).defaults()['lam']:g}" for n in ("owl", "rank", "mix")) + ")."
    ),
]
AlphaOpt = Annotated[Optional[float], typer.Option(help="mix: " + _param_help(ALLOCATORS, "mix", "alpha"))]
ParamOpt = Annotated[
    Optional[list[str]],
    typer.Option("--param", "-p", help="Any allocator setting as NAME=VALUE (repeat); see docs/methods.md."),
]
SolverParamOpt = Annotated[
    Optional[list[str]],
    typer.Option(help="A solver setting as NAME=VALUE (repeat), e.g. damp=0.02 for sparsegpt; see docs/methods.md."),
]


def _allocator_settings(params: list[str] | None, **options: float | None) -> dict[str, Any]:
    """The allocator settings given on the command line: its own options and --param NAME=VALUE."""
    given = {name: value for name, value in options.items() if value is not None}
    given.update(parse_assignments(params))
    return given


def _check_allocator(allocator: str, settings: dict[str, Any], sparsity: float | None) -> None:
    """Refuse an impossible allocator request before any model is loaded."""
    from ecoflap_cli.core.methods import check_allocator_request

    check_allocator_request(allocator, settings, sparsity)


def _load(
    model: str,
    dtype: str,
    device: str,
    trust_remote_code: bool,
    device_map: str | None,
    max_memory: list[str] | None,
    offload_folder: Path | None,
    offload: str | None = None,
) -> LoadedModel:
    from ecoflap_cli.io.loading import LoadOptions, load_model

    memory: dict[str, str] = {}
    for item in max_memory or []:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise EcoflapError(f"--max-memory takes DEVICE=SIZE (e.g. 0=20GiB), got {item!r}")
        memory[key.strip()] = value.strip()
    opts = LoadOptions(
        dtype, device, trust_remote_code, device_map, memory, str(offload_folder) if offload_folder else None, offload
    )
    with console.status(f"loading {model}"):
        return load_model(model, opts)


def _check_output(output: str, overwrite: bool) -> None:
    if output != "-" and Path(output).exists() and not overwrite:
        raise EcoflapError(f"{output} exists (pass --overwrite to replace it)")


def _parse_nm(nm: str | None) -> tuple[int, int] | None:
    if nm is None:
        return None
    try:
        n, m = (int(x) for x in nm.split(":"))
    except ValueError:
        raise EcoflapError(f"--nm takes N:M such as 2:4, got {nm!r}") from None
    if not 0 < n < m:
        raise EcoflapError(f"--nm needs 0 < N < M, got {nm!r}")
    return n, m


def _parse_groups(items: list[str] | None) -> dict[str, str]:
    groups = {}
    for item in items or []:
        tower, sep, group = item.partition("=")
        if not sep or group not in ("row", "matrix"):
            raise EcoflapError(f"--compare-group takes TOWER=row|matrix, got {item!r}")
        groups[tower] = group
    return groups


def _check_sparsity(value: float, name: str = "--sparsity") -> None:
    if not 0.0 <= value < 1.0:
        raise EcoflapError(f"{name} must be in [0, 1), got {value}")


# --- commands ---------------------------------------------------------------------------------


@app.command()
@user_errors
def score(
    model: ModelOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="Scores JSON path, or - for stdout.")] = "scores.json",
    method: ScoreMethodOpt = "auto",
    calib: CalibOpt = None,
    samples: Annotated[int, typer.Option(help="Calibration samples.")] = 32,
    seqlen: SeqlenOpt = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 8,
    seed: SeedOpt = 0,
    eps: Annotated[Optional[float], typer.Option(help="zeroth: " + _choice_help(SCORING, "zeroth", "eps"))] = None,
    granularity: Annotated[
        Optional[str], typer.Option(help="zeroth: " + _choice_help(SCORING, "zeroth", "granularity"))
    ] = None,
    reuse_activations: Annotated[
        Optional[bool], typer.Option(help="zeroth: " + _param_help(SCORING, "zeroth", "reuse_activations"))
    ] = None,
    perturbations: Annotated[
        Optional[int], typer.Option(help="zeroth: " + _param_help(SCORING, "zeroth", "perturbations"))
    ] = None,
    direction: Annotated[
        Optional[str], typer.Option(help="zeroth: " + _choice_help(SCORING, "zeroth", "direction"))
    ] = None,
    difference: Annotated[
        Optional[str], typer.Option(help="zeroth: " + _choice_help(SCORING, "zeroth", "difference"))
    ] = None,
    head: Annotated[Optional[str], typer.Option(help="zeroth: " + _choice_help(SCORING, "zeroth", "head"))] = None,
    first_metric: Annotated[
        Optional[str], typer.Option(help="first: " + _choice_help(SCORING, "first", "metric"))
    ] = None,
    threshold: Annotated[Optional[float], typer.Option(help="owl: " + _param_help(SCORING, "owl", "m"))] = None,
    include_qformer: Annotated[bool, typer.Option(help="Prune (and score) the BLIP-2 Q-Former too.")] = False,
    text_field: TextFieldOpt = "text",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    trust_remote_code: RemoteOpt = False,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemOpt = None,
    offload_folder: OffloadOpt = None,
    offload: SequentialOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Coarse stage: one global importance score per block, written as scores JSON."""
    given = {
        "eps": eps,
        "granularity": granularity,
        "reuse_activations": reuse_activations,
        "perturbations": perturbations,
        "direction": direction,
        "difference": difference,
        "head": head,
        "metric": first_metric,
        "m": threshold,
    }
    settings = _scoring_settings(method, {k: v for k, v in given.items() if v is not None})
    _check_output(output, overwrite)
    from ecoflap_cli.io import artifacts
    from ecoflap_cli.stages import driver

    loaded = _load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder, offload)
    adapter = driver.load_adapter(loaded, include_qformer)
    opts = driver.CalibrationOptions(calib, samples, seqlen, batch_size, seed, text_field)
    batches, prov = driver.calibration_batches(loaded, adapter, opts)
    with progress_bar(len(adapter.blocks()), "scoring") as step:
        doc = driver.score(loaded, adapter, batches, prov, method, settings, step, seed=seed)
    artifacts.emit_json(doc, output, overwrite)
    console.print(
        f"scored {len(doc['groups'])} blocks with {doc['method']['name']} in {doc['timings']['score_s']:.1f}s"
        + ("" if output == "-" else f" -> {output}")
    )


def _scoring_settings(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options that apply to ``method``; an option of another method is a clear error."""
    entry = SCORING.get(method)
    for key in given:
        if entry.param(key) is None:
            owners = [e.name for e in SCORING if e.param(key) is not None]
            raise EcoflapError(f"that option applies to --method {' or '.join(owners)}, not {method}")
    entry.settings(given)  # checks every value now, before any model is loaded
    return given


@app.command()
@user_errors
def allocate(
    scores: Annotated[str, typer.Argument(help="Scores JSON from `ecoflap score`, or - for stdin.")],
    sparsity: Annotated[float, typer.Option("--sparsity", "-s", help="Target global sparsity in [0, 1).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Plan JSON path, or - for stdout.")] = "plan.json",
    allocator: AllocatorOpt = "auto",
    max_sparsity: MaxSparsityOpt = None,
    temperature: TemperatureOpt = None,
    depth_step: DepthStepOpt = None,
    lam: LamOpt = None,
    alpha: AlphaOpt = None,
    param: ParamOpt = None,
    per_tower: Annotated[bool, typer.Option(help="Hold each tower at the target instead of one joint budget.")] = False,
    show: Annotated[bool, typer.Option(help="Print the plan table on stderr.")] = True,
    overwrite: OverwriteOpt = False,
) -> None:
    """Scores -> per-block sparsity plan (exact global budget). Shows the plan before any pruning."""
    from ecoflap_cli.cli.render import render_plan
    from ecoflap_cli.io import artifacts
    from ecoflap_cli.stages import driver

    _check_sparsity(sparsity)
    settings = _allocator_settings(
        param, max_sparsity=max_sparsity, temperature=temperature, step=depth_step, lam=lam, alpha=alpha
    )
    _check_allocator(allocator, settings, sparsity)
    doc = artifacts.validate_scores(artifacts.read_json(scores), "stdin" if scores == "-" else scores)
    plan = driver.allocate(doc, sparsity, allocator, settings, per_tower)
    _check_output(output, overwrite)
    if show:
        render_plan(console, plan)
    artifacts.emit_json(plan, output, overwrite)


@app.command()
@user_errors
def prune(
    model: ModelOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="Directory for the pruned checkpoint.")] = "pruned",
    plan: Annotated[Optional[str], typer.Option(help="Plan JSON from `ecoflap allocate` (or - for stdin).")] = None,
    sparsity: Annotated[
        Optional[float], typer.Option("--sparsity", "-s", help="One-shot: score and allocate to this target.")
    ] = None,
    allocator: AllocatorOpt = "auto",
    score_method: Annotated[
        Optional[str], registry_option(SCORING, "One-shot scoring (default: the allocator's, auto for most).")
    ] = None,
    score_samples: Annotated[int, typer.Option(help="One-shot: calibration samples for scoring.")] = 32,
    score_seqlen: Annotated[
        Optional[int], typer.Option(help="One-shot: tokens per scoring sample (default: --seqlen).")
    ] = None,
    max_sparsity: MaxSparsityOpt = None,
    temperature: TemperatureOpt = None,
    depth_step: DepthStepOpt = None,
    lam: LamOpt = None,
    alpha: AlphaOpt = None,
    param: ParamOpt = None,
    solver: SolverOpt = "wanda",
    solver_param: SolverParamOpt = None,
    nm: Annotated[Optional[str], typer.Option(help="N:M structured sparsity, e.g. 2:4 (uniform plans only).")] = None,
    compare_group: Annotated[
        Optional[list[str]], typer.Option(help="Wanda comparison group per tower: TOWER=row|matrix.")
    ] = None,
    calib: CalibOpt = None,
    samples: Annotated[int, typer.Option(help="Calibration samples for the layer-wise solver.")] = 128,
    seqlen: SeqlenOpt = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 8,
    seed: SeedOpt = 0,
    include_qformer: Annotated[bool, typer.Option(help="Prune the BLIP-2 Q-Former too.")] = False,
    packed: Annotated[
        bool, typer.Option("--packed", help="Write packed sparse safetensors (smaller; needs ecoflap to load).")
    ] = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest weight file, e.g. 5GB or 500MB.")] = "5GB",
    text_field: TextFieldOpt = "text",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    trust_remote_code: RemoteOpt = False,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemOpt = None,
    offload_folder: OffloadOpt = None,
    offload: SequentialOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Fine stage: layer-wise pruning to a plan; writes a Hugging Face checkpoint directory."""
    from ecoflap_cli.cli.render import render_plan
    from ecoflap_cli.core.methods import check_plan_methods, check_scoring_request
    from ecoflap_cli.io import artifacts
    from ecoflap_cli.io.checkpoint import check_output_dir, parse_size, save_checkpoint
    from ecoflap_cli.stages import driver

    if (plan is None) == (sparsity is None):
        raise EcoflapError("give exactly one of --plan PLAN.json or --sparsity P")
    if sparsity is not None:
        _check_sparsity(sparsity)
    nm_pair = _parse_nm(nm)
    solver_settings = SOLVERS.get(solver).settings(parse_assignments(solver_param, "--solver-param"))
    settings = driver.PruneSettings(
        solver,
        nm_pair,
        _parse_groups(compare_group),
        store_device="cpu" if (offload or device_map) else None,
        solver_settings=solver_settings,
    )
    alloc_settings = _allocator_settings(
        param, max_sparsity=max_sparsity, temperature=temperature, step=depth_step, lam=lam, alpha=alpha
    )
    if sparsity is not None:
        _check_allocator(allocator, alloc_settings, sparsity)
        check_scoring_request(allocator, score_method)
    check_output_dir(output, overwrite)
    parse_size(max_shard_size)
    plan_doc = artifacts.validate_plan(artifacts.read_json(plan), plan) if plan else None
    if plan_doc is not None:
        check_plan_methods(plan_doc)
        if nm_pair is not None:
            artifacts.check_nm_plan(plan_doc, nm_pair)
    if sparsity is not None and nm_pair is not None and allocator != "uniform":
        raise EcoflapError(f"--nm needs a uniform plan: add --allocator uniform (got {allocator})")
    loaded = _load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder, offload)
    adapter = driver.load_adapter(loaded, include_qformer)
    calib_opts = driver.CalibrationOptions(calib, samples, seqlen, batch_size, seed, text_field)
    documents: dict[str, dict[str, Any]] = {}
    driver.check_calibration_memory(loaded, calib_opts, settings.store_device)
    batches, prov = driver.calibration_batches(loaded, adapter, calib_opts) if settings.needs_data else ([], None)
    if plan_doc is None:
        assert sparsity is not None
        one_shot = driver.OneShot(score_method, None, score_samples, score_seqlen)
        with progress_bar(len(adapter.blocks()), "scoring") as step:
            plan_doc, scores_doc = driver.one_shot_plan(
                loaded, adapter, calib_opts, sparsity, allocator, alloc_settings, one_shot, step
            )
        documents["scores.json"] = scores_doc
        render_plan(console, plan_doc)
    documents["plan.json"] = plan_doc
    with progress_bar(len(adapter.blocks()), f"pruning ({solver})") as step:
        report = driver.prune(loaded, adapter, plan_doc, batches, prov, settings, step)
    documents["ecoflap_report.json"] = report
    with console.status(f"writing {output}"):
        save_checkpoint(loaded, output, documents, overwrite, packed=packed, max_shard_size=max_shard_size, n_m=nm_pair)
    console.print(
        f"pruned to {report['achieved_sparsity']:.4f} sparsity (target {report['target_sparsity']}) "
        f"in {report['timings']['prune_s']:.1f}s -> {output}"
    )


@app.command("eval")
@user_errors
def evaluate(
    checkpoint: Annotated[str, typer.Argument(help="Pruned checkpoint directory (or any model id / .gguf).")],
    text: Annotated[
        Optional[Path],
        typer.Option(
            help="Text file (.txt/.jsonl) for perplexity (BLIP-2: its language model; LLaVA: the model on text alone)."
        ),
    ] = None,
    images: Annotated[
        Optional[Path],
        typer.Option(help="CLIP / SigLIP zero-shot classification: a folder with one subfolder of images per class."),
    ] = None,
    template: Annotated[
        Optional[list[str]],
        typer.Option(help="Zero-shot prompt template, {} is the class name (repeat; default 'a photo of a {}.')."),
    ] = None,
    template_file: Annotated[Optional[Path], typer.Option(help="Zero-shot prompt templates, one per line.")] = None,
    retrieval: Annotated[
        Optional[Path], typer.Option(help="CLIP / SigLIP image-text retrieval R@1/5/10: JSONL of {image, caption}.")
    ] = None,
    vqa: Annotated[
        Optional[Path],
        typer.Option(help="BLIP-2 / InstructBLIP / LLaVA VQA soft accuracy: JSONL of {image, question, answers}."),
    ] = None,
    captions: Annotated[
        Optional[Path],
        typer.Option(help="BLIP-2 / InstructBLIP / LLaVA captioning CIDEr-D: JSONL of {image, caption}."),
    ] = None,
    prompt: Annotated[
        Optional[str], typer.Option(help="Captioning prompt the model continues (default 'a photo of'; '' for none).")
    ] = None,
    question_template: Annotated[
        Optional[str], typer.Option(help="VQA prompt with {question} (default 'Question: {question} Answer:').")
    ] = None,
    max_new_tokens: Annotated[
        Optional[int], typer.Option(help="Tokens to generate (default 10 for VQA, 20 for captions).")
    ] = None,
    compare: Annotated[Optional[str], typer.Option(help="Dense model to evaluate side by side.")] = None,
    plan: Annotated[
        Optional[str],
        typer.Option(help="Plan to check achieved sparsity against (default: the checkpoint's plan.json)."),
    ] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per perplexity window.")] = 512,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows (or images) per forward pass.")] = 4,
    per_tensor: Annotated[bool, typer.Option(help="Show every tensor, not one row per block.")] = False,
    output: Annotated[
        Optional[str], typer.Option("--output", "-o", help="Write results JSON here (- for stdout).")
    ] = None,
    text_field: TextFieldOpt = "text",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    trust_remote_code: RemoteOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Achieved sparsity against the plan; perplexity and vision-language tasks, optionally vs the dense model."""
    from ecoflap_cli.cli.render import render_sparsity, render_tasks
    from ecoflap_cli.evaluation.tasks import MultimodalTasks, run_eval

    if output is not None:
        _check_output(output, overwrite)
    from ecoflap_cli.io import artifacts

    if batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise EcoflapError("--batch-size and --max-new-tokens must be at least 1")
    templates = list(template or [])
    if template_file is not None:
        if not template_file.is_file():
            raise EcoflapError(f"template file not found: {template_file}")
        lines = template_file.read_text(encoding="utf-8").splitlines()
        templates += [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
    if templates and images is None:
        raise EcoflapError("--template/--template-file go with --images (zero-shot classification)")
    tasks = MultimodalTasks(images, templates, retrieval, vqa, captions, prompt, question_template, max_new_tokens)
    results = run_eval(
        checkpoint,
        text,
        compare,
        plan,
        seqlen,
        max_windows,
        batch_size,
        text_field,
        lambda m: _load(m, dtype, device, trust_remote_code, None, None, None),
        tasks=tasks,
        progress=lambda message: console.print(f"[dim]{message}[/]", highlight=False),
    )
    render_sparsity(console, results, per_tensor)
    render_tasks(console, results)
    if output is not None:
        artifacts.emit_json(results, output, overwrite)


@app.command("inspect")
@user_errors
def inspect_command(
    path: Annotated[str, typer.Argument(help="scores.json, plan.json, checkpoint directory, or - (stdin).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    chart: Annotated[Optional[Path], typer.Option(help="PNG of sparsity per block by tower (matplotlib).")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """What an artifact is, and its sparsity per block and per tower (measured for checkpoints)."""
    from ecoflap_cli.cli.render import render_inspect
    from ecoflap_cli.io import artifacts
    from ecoflap_cli.io.inspect import inspect_artifact, write_chart

    if chart is not None:
        _check_output(str(chart), overwrite)
    with console.status(f"reading {path}"):
        summary = inspect_artifact(path)
    render_inspect(console, summary)
    if chart is not None:
        write_chart(summary, chart)
        console.print(f"chart -> {chart}")
    if json_output:
        artifacts.emit_json(summary, "-")


@app.command()
@user_errors
def convert(
    source: Annotated[str, typer.Argument(help="Checkpoint directory to convert.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Directory for the converted checkpoint.")],
    to: Annotated[str, typer.Option("--to", help="Weight layout to write: packed or dense.")],
    max_shard_size: Annotated[str, typer.Option(help="Largest weight file, e.g. 5GB or 500MB.")] = "5GB",
    overwrite: OverwriteOpt = False,
) -> None:
    """Rewrite a checkpoint's weights packed <-> dense, losslessly; other files are copied."""
    from ecoflap_cli.io.checkpoint import convert_checkpoint

    with console.status(f"converting {source} to {to}"):
        done = convert_checkpoint(source, output, to, overwrite, max_shard_size)
    console.print(
        f"{done['source']} ({done['from']}, {done['bytes_before']:,} bytes of weights) -> "
        f"{done['output']} ({done['to']}, {done['bytes_after']:,} bytes)",
        highlight=False,
    )


@app.command()
@user_errors
def sweep(
    method: Annotated[
        Optional[list[str]],
        typer.Option(
            "--method",
            help="ALLOCATOR[-SCORING]:SOLVER[@k=v,..], e.g. uniform:wanda, ecoflap-zeroth:sparsegpt, owl:wanda@m=5,lam=0.08, llmc:wanda (repeat). Allocators: "
            + ", ".join(ALLOCATORS.names())
            + "; scoring: "
            + ", ".join(SCORING.names())
            + "; solvers: "
            + ", ".join(SOLVERS.names())
            + "; @keys: any of their settings (docs/methods.md).",
        ),
    ] = None,
    sparsity: Annotated[
        Optional[list[float]], typer.Option("--sparsity", "-s", help="Target sparsity (repeat).")
    ] = None,
    model: Annotated[
        Optional[str], typer.Option("--model", "-m", help="Hub id, local model directory or .gguf file.")
    ] = None,
    calib: Annotated[Optional[str], typer.Option(help="Calibration text (.txt/.jsonl).")] = None,
    text: Annotated[Optional[str], typer.Option(help="Text (.txt/.jsonl) to measure perplexity on.")] = None,
    extra_text: Annotated[
        Optional[list[str]],
        typer.Option(help="Another text every pruned model is also evaluated on (repeat; e.g. another domain)."),
    ] = None,
    output: Annotated[
        str, typer.Option("--output", "-o", help="Directory for sweep.md, sweep.json, sweep.png and the run cache.")
    ] = "sweep",
    samples: Annotated[Optional[int], typer.Option(help="Pruning calibration samples (default 128).")] = None,
    seqlen: SeqlenOpt = None,
    score_samples: Annotated[Optional[int], typer.Option(help="Scoring calibration samples (default 32).")] = None,
    score_seqlen: Annotated[Optional[int], typer.Option(help="Tokens per scoring sample (default: --seqlen).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples per forward pass (default 8).")] = None,
    seed: SeedOpt = 0,
    eval_seqlen: Annotated[Optional[int], typer.Option(help="Tokens per perplexity window (default 512).")] = None,
    eval_windows: Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows.")] = None,
    repeats: Annotated[
        int, typer.Option(help="Time the prune stage this many times per run (interleaved passes; medians).")
    ] = 1,
    isolate: Annotated[
        bool, typer.Option("--isolate", help="Run each method in its own subprocess (per-method peak memory).")
    ] = False,
    llmc_python: Annotated[
        Optional[str],
        typer.Option(
            help="Python of a venv with llmcompressor, for llmc:* methods (`python -m ecoflap_cli.bench.llmc_env` makes one and prints it)."
        ),
    ] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's choice).")] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Ignore cached runs and scores in the output directory.")
    ] = False,
    plot: Annotated[bool, typer.Option(help="Write sweep.png (needs matplotlib).")] = True,
    text_field: TextFieldOpt = "text",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Prune and evaluate many methods x sparsities; writes a markdown/JSON table and a plot."""
    from ecoflap_cli.stages.sweep import SweepConfig, run_sweep

    sizes = {
        "samples": samples,
        "seqlen": seqlen,
        "score_samples": score_samples,
        "score_seqlen": score_seqlen,
        "batch_size": batch_size,
        "eval_seqlen": eval_seqlen,
        "eval_windows": eval_windows,
    }
    log = lambda message: console.print(f"[dim]{message}[/]", highlight=False)  # noqa: E731
    if model is None or calib is None or text is None or not method or not sparsity:
        raise EcoflapError(
            "give --model, --calib, --text, --method and --sparsity "
            "(the SmolLM2 benchmark: python -m ecoflap_cli.bench.quality)"
        )
    defaults = {"samples": 128, "score_samples": 32, "batch_size": 8, "eval_seqlen": 512}
    values = {k: (v if v is not None else defaults.get(k)) for k, v in sizes.items()}
    cfg = SweepConfig(
        model=model,
        calib=calib,
        text=text,
        methods=list(method),
        sparsities=list(sparsity),
        output=output,
        llmc_python=llmc_python,
        seed=seed,
        **values,
    )
    cfg.repeats, cfg.isolate, cfg.threads, cfg.resume, cfg.plot = repeats, isolate, threads, not fresh, plot
    if extra_text:
        cfg.extra_texts = list(extra_text)
    cfg.text_field, cfg.dtype, cfg.device = text_field, dtype, device
    summary = run_sweep(cfg, log)
    failed = [f"{r['method']}@{r['sparsity']:g}" for r in summary["runs"] if "error" in r]
    console.print(
        f"{len(summary['runs']) - len(failed)} runs -> {cfg.output}/sweep.md"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        highlight=False,
    )
    if failed:
        raise typer.Exit(1)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ecoflap {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Prune language and vision-language models with ECoFLaP."""


def main() -> None:
    app(prog_name="ecoflap")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
