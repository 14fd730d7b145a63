"""The `ecoflap` command line: parses options, calls the library, renders to stderr.

Artifacts go to files, or to stdout with ``-o -``; ``-`` as an input path reads stdin. Every
user error ends in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from ecoflap_cli import __version__
from ecoflap_cli.core.methods import ALLOCATORS, RECONSTRUCTION, SCORING, SOLVERS
from ecoflap_cli.core.registry import Registry, parse_assignments
from ecoflap_cli.errors import EcoflapError

if TYPE_CHECKING:  # the model stack (torch, transformers) is imported only by commands that run a model
    from ecoflap_cli.io.loading import LoadedModel

console = Console(stderr=True)
if not console.is_terminal:  # logs and pipes: wide enough that tables are not truncated
    console = Console(stderr=True, width=140)
INTERRUPTED = 130  # the shell's code for a run ended by SIGINT (128 + 2)


def print_error(message: str) -> None:
    """One ``error:`` line on stderr; the message is text, never rich markup (a path may hold ``[/]``)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


#: click's usage errors; recent typer raises its own copy of click's classes (based on TyperException)
_USAGE_ERRORS: tuple[type[Exception], ...] = (
    click.ClickException,
    getattr(typer, "TyperException", click.ClickException),
)


class OneLineErrors(TyperGroup):
    """The command group, with click's usage errors (a bad number, an unknown option) as one
    ``error:`` line instead of the boxed usage text, and Ctrl-C outside a command as one line too."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _USAGE_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # plain `ecoflap`: the help, as before
                exc.show()
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            print_error(f"{exc.format_message()} (see {ctx.command_path if ctx else 'ecoflap'} --help)")
            sys.exit(exc.exit_code)
        except (KeyboardInterrupt, typer.Abort, click.exceptions.Abort):
            print_error("interrupted: nothing was written")
            sys.exit(INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="ecoflap",
    help="Prune language and vision-language models with ECoFLaP (coarse-to-fine layer-wise pruning).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    cls=OneLineErrors,
)

F = TypeVar("F", bound=Callable[..., Any])

#: what the user can do about an operating-system error writing or reading files
_OS_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "the path is a directory",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "a file is in the way",
}


def os_error_message(exc: OSError) -> str:
    """An OSError as one line: what failed, where, and why in words."""
    why = _OS_HINTS.get(exc.errno or -1) or exc.strerror or str(exc) or type(exc).__name__
    return f"{why}: {exc.filename}" if exc.filename is not None else why


def user_errors(func: F) -> F:
    """Turn library errors into one line on stderr and an exit code, never a traceback.

    Ctrl-C ends with exit code 130; the atomic writers remove their temporary files as the
    interrupt passes through them, so nothing half-written is left behind (what a prune keeps to
    resume from is complete, and named in its own note line).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EcoflapError as exc:
            print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except MemoryError:
            print_error("out of memory: lower --samples, --seqlen or --batch-size")
            raise typer.Exit(3) from None
        except KeyboardInterrupt:
            # not "nothing was written": a prune keeps its finished blocks to --resume from (and a
            # sweep its finished runs), said in a note line before this one
            print_error("interrupted: nothing half-written was left behind")
            raise typer.Exit(INTERRUPTED) from None
        except OSError as exc:
            if _SIGINT["seen"]:
                print_error("interrupted: nothing half-written was left behind")
                raise typer.Exit(INTERRUPTED) from None
            if exc.errno == errno.EPIPE:  # stdout closed by the reader (`| head`): typer exits quietly
                raise
            print_error(os_error_message(exc))
            raise typer.Exit(4) from None
        except Exception:
            if not _SIGINT["seen"]:
                raise
            # an error that follows Ctrl-C is its doing: e.g. a library interrupted halfway through
            # an import (numpy then recurses in its __getattr__) fails on its next use
            print_error("interrupted: nothing half-written was left behind")
            raise typer.Exit(INTERRUPTED) from None

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


@contextmanager
def stage_progress(total: int | None, label: str) -> Iterator[Callable[[str], None]]:
    """The API's progress hook on the terminal: a bar for a stage with steps, else a spinner."""
    if total is not None:
        with progress_bar(total, label) as step:
            yield step
        return
    with console.status(escape(label)):
        yield lambda _message: None


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
RevisionOpt = Annotated[Optional[str], typer.Option(help="Hub models: branch, tag or commit to load.")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(help="Hub models: download cache folder (default: the hub's).")]
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
NoVerifyOpt = Annotated[
    bool, typer.Option("--no-verify", help="Skip checking the checkpoint's weight files against their recorded sha256.")
]
AllocatorOpt = Annotated[
    str,
    registry_option(
        ALLOCATORS,
        _methods_help(
            ALLOCATORS,
            "Allocator; auto: ecoflap (the paper's rule), owl for OWL scores, search for search "
            "levels (the plan records which and why).",
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
ReconstructOpt = Annotated[
    str,
    registry_option(
        RECONSTRUCTION,
        _methods_help(
            RECONSTRUCTION,
            "Local reconstruction after each block's masks: fit the kept weights to the dense outputs "
            "(sublayer: attention and MLP separately; block: the whole block); none: off.",
        ),
        extra=("none",),
    ),
]
ReconParamOpt = Annotated[
    Optional[list[str]],
    typer.Option(help="A reconstruction setting as NAME=VALUE (repeat), e.g. steps=32; see docs/methods.md."),
]
ScoreParamOpt = Annotated[
    Optional[list[str]],
    typer.Option(help="A scoring-method setting as NAME=VALUE (repeat), e.g. generations=30 for search."),
]


def _allocator_settings(params: list[str] | None, **options: float | None) -> dict[str, Any]:
    """The allocator settings given on the command line: its own options and --param NAME=VALUE."""
    given = {name: value for name, value in options.items() if value is not None}
    given.update(parse_assignments(params))
    return given


def _written_by_ecoflap(source: str) -> bool:
    return (Path(source) / "ecoflap_report.json").is_file()


def _integrity_note(integrity: str | None, source: str) -> None:
    # only for checkpoints ecoflap wrote (an older ecoflap recorded no checksums); a plain model
    # directory from elsewhere never had any, so saying so there is noise
    if integrity == "unrecorded" and _written_by_ecoflap(source):
        console.print(f"[yellow]note:[/] {escape(source)} records no checksums: weights not verified", highlight=False)


def _load(
    model: str,
    dtype: str,
    device: str,
    trust_remote_code: bool,
    device_map: str | None,
    max_memory: list[str] | None,
    offload_folder: Path | None,
    offload: str | None = None,
    verify: bool = True,
    revision: str | None = None,
    cache_dir: Path | None = None,
    show_note: bool = False,
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
    opts.verify = verify
    opts.revision, opts.cache_dir = revision, None if cache_dir is None else str(cache_dir)
    with console.status(f"loading {escape(model)}"):
        loaded = load_model(model, opts)
    if loaded.note and show_note and _written_by_ecoflap(model):  # eval: this checkpoint's numbers
        console.print(f"[yellow]note:[/] {escape(loaded.note)}", highlight=False)
    return loaded


def _placement(
    dtype: str,
    device: str,
    trust_remote_code: bool,
    device_map: str | None,
    max_memory: list[str] | None,
    offload_folder: Path | None,
    offload: str | None,
    revision: str | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The placement options (and hub revision and cache folder) as the API's keywords."""
    return {
        "dtype": dtype,
        "device": device,
        "trust_remote_code": trust_remote_code,
        "device_map": device_map,
        "max_memory": max_memory,
        "offload_folder": offload_folder,
        "offload": offload,
        "revision": revision,
        "cache_dir": cache_dir,
    }


def _check_output(output: str, overwrite: bool) -> None:
    from ecoflap_cli.io.artifacts import check_json_output

    check_json_output(output, overwrite)


def _parse_groups(items: list[str] | None) -> dict[str, str]:
    groups = {}
    for item in items or []:
        tower, sep, group = item.partition("=")
        if not sep or group not in ("row", "matrix"):
            raise EcoflapError(f"--compare-group takes TOWER=row|matrix, got {item!r}")
        groups[tower] = group
    return groups


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
    sparsity: Annotated[
        Optional[float], typer.Option("--sparsity", "-s", help="search: the target sparsity to find levels for.")
    ] = None,
    score_param: ScoreParamOpt = None,
    include_qformer: Annotated[bool, typer.Option(help="Prune (and score) the BLIP-2 Q-Former too.")] = False,
    text_field: TextFieldOpt = "text",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    trust_remote_code: RemoteOpt = False,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemOpt = None,
    offload_folder: OffloadOpt = None,
    offload: SequentialOpt = None,
    revision: RevisionOpt = None,
    cache_dir: CacheDirOpt = None,
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
        "target": sparsity,
        **parse_assignments(score_param, "--score-param"),
    }
    from ecoflap_cli import api

    doc = api.score(
        model,
        calib=calib,
        method=method,
        settings={k: v for k, v in given.items() if v is not None},
        samples=samples,
        seqlen=seqlen,
        batch_size=batch_size,
        seed=seed,
        text_field=text_field,
        include_qformer=include_qformer,
        output=output,
        overwrite=overwrite,
        progress=stage_progress,
        **_placement(
            dtype, device, trust_remote_code, device_map, max_memory, offload_folder, offload, revision, cache_dir
        ),
    )
    console.print(
        f"scored {len(doc['groups'])} blocks with {doc['method']['name']} in {doc['timings']['score_s']:.1f}s"
        + ("" if output == "-" else f" -> {escape(output)}")
    )


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
    from ecoflap_cli import api
    from ecoflap_cli.cli.render import render_plan

    settings = _allocator_settings(
        param, max_sparsity=max_sparsity, temperature=temperature, step=depth_step, lam=lam, alpha=alpha
    )
    plan = api.allocate(
        scores,
        sparsity,
        allocator=allocator,
        settings=settings,
        per_tower=per_tower,
        output=output,
        overwrite=overwrite,
    )
    if show:
        render_plan(console, plan)


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
    reconstruct: ReconstructOpt = "none",
    recon_param: ReconParamOpt = None,
    score_param: ScoreParamOpt = None,
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
    revision: RevisionOpt = None,
    cache_dir: CacheDirOpt = None,
    overwrite: OverwriteOpt = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted prune into the same -o from its last finished block (same options).",
        ),
    ] = False,
) -> None:
    """Fine stage: layer-wise pruning to a plan; writes a Hugging Face checkpoint directory."""
    if output == "-":
        raise EcoflapError("prune writes a checkpoint directory, not a stream: give -o DIR instead of -o -")
    from ecoflap_cli import api
    from ecoflap_cli.cli.render import render_plan

    result = api.prune(
        model,
        plan,
        sparsity,
        calib=calib,
        allocator=allocator,
        allocator_settings=_allocator_settings(
            param, max_sparsity=max_sparsity, temperature=temperature, step=depth_step, lam=lam, alpha=alpha
        ),
        score_method=score_method,
        score_settings=parse_assignments(score_param, "--score-param"),
        score_samples=score_samples,
        score_seqlen=score_seqlen,
        solver=solver,
        solver_settings=parse_assignments(solver_param, "--solver-param"),
        reconstruct=reconstruct,
        reconstruct_settings=parse_assignments(recon_param, "--recon-param"),
        nm=nm,
        compare_groups=_parse_groups(compare_group),
        samples=samples,
        seqlen=seqlen,
        batch_size=batch_size,
        seed=seed,
        text_field=text_field,
        include_qformer=include_qformer,
        output=output,
        packed=packed,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        resume=resume,
        progress=stage_progress,
        on_note=lambda text: console.print(text, markup=False, highlight=False),
        on_plan=lambda plan_doc: render_plan(console, plan_doc),
        **_placement(
            dtype, device, trust_remote_code, device_map, max_memory, offload_folder, offload, revision, cache_dir
        ),
    )
    report = result.report
    console.print(
        f"pruned to {report['achieved_sparsity']:.4f} sparsity (target {report['target_sparsity']}) "
        f"in {report['timings']['prune_s']:.1f}s -> {escape(output)}"
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
    lm_tasks: Annotated[
        Optional[list[str]],
        typer.Option(
            "--tasks",
            help="lm-evaluation-harness tasks, comma-separated or repeated: wiki_cloze (local, offline) or "
            "lm-eval's own (boolq, piqa, hellaswag, arc_easy, winogrande, ...); needs ecoflap[lmeval].",
        ),
    ] = None,
    num_fewshot: Annotated[
        Optional[int], typer.Option(help="lm-eval: examples in each prompt (default: the task's own, else 0).")
    ] = None,
    limit: Annotated[
        Optional[float], typer.Option(help="lm-eval: documents per task (a count; below 1, a fraction).")
    ] = None,
    include_path: Annotated[
        Optional[list[Path]], typer.Option(help="lm-eval: a folder of your own task YAML files (repeat).")
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
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemOpt = None,
    offload_folder: OffloadOpt = None,
    revision: RevisionOpt = None,
    cache_dir: CacheDirOpt = None,
    overwrite: OverwriteOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Achieved sparsity against the plan; perplexity, vision-language and lm-eval tasks, optionally vs the dense
    model."""
    from ecoflap_cli.cli.render import render_lm_eval, render_sparsity, render_tasks
    from ecoflap_cli.evaluation.lm_eval_tasks import LmEvalRequest, split_task_names
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
    lm_request = None
    if lm_tasks:
        if limit is not None and limit >= 1 and limit == int(limit):
            limit = int(limit)  # a count of documents, recorded as one
        lm_request = LmEvalRequest(split_task_names(lm_tasks), num_fewshot, limit, list(include_path or []), batch_size)
    elif num_fewshot is not None or limit is not None or include_path:
        raise EcoflapError("--num-fewshot, --limit and --include-path go with --tasks (lm-eval tasks)")
    results = run_eval(
        checkpoint,
        text,
        compare,
        plan,
        seqlen,
        max_windows,
        batch_size,
        text_field,
        lambda m: _load(
            m,
            dtype,
            device,
            trust_remote_code,
            device_map,
            max_memory,
            offload_folder,
            verify=not no_verify,
            show_note=True,
            revision=revision,
            cache_dir=cache_dir,
        ),
        tasks=tasks,
        progress=lambda message: console.print(f"[dim]{escape(message)}[/]", highlight=False),
        lm_tasks=lm_request,
    )
    render_sparsity(console, results, per_tensor)
    render_tasks(console, results)
    render_lm_eval(console, results)
    if output is not None:
        artifacts.emit_json(results, output, overwrite)
        from ecoflap_cli.io.model_card import refresh_after_eval

        if refresh_after_eval(checkpoint, output) is not None:
            console.print(f"model card -> {Path(checkpoint) / 'README.md'}", highlight=False, markup=False)


@app.command("inspect")
@user_errors
def inspect_command(
    path: Annotated[str, typer.Argument(help="scores.json, plan.json, checkpoint directory, or - (stdin).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    chart: Annotated[Optional[Path], typer.Option(help="PNG of sparsity per block by tower (matplotlib).")] = None,
    overwrite: OverwriteOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """What an artifact is, and its sparsity per block and per tower (measured for checkpoints)."""
    from ecoflap_cli.cli.render import render_inspect
    from ecoflap_cli.io import artifacts
    from ecoflap_cli.io.inspect import inspect_artifact, write_chart

    if chart is not None:
        _check_output(str(chart), overwrite)
    with console.status(f"reading {escape(path)}"):
        summary = inspect_artifact(path, verify=not no_verify)
    _integrity_note(summary.get("integrity"), path)
    render_inspect(console, summary)
    if chart is not None:
        write_chart(summary, chart)
        console.print(f"chart -> {chart}", markup=False)
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
    no_verify: NoVerifyOpt = False,
) -> None:
    """Rewrite a checkpoint's weights packed <-> dense, losslessly; other files are copied."""
    from ecoflap_cli.io.checkpoint import convert_checkpoint

    with console.status(escape(f"converting {source} to {to}")):
        done = convert_checkpoint(source, output, to, overwrite, max_shard_size, verify=not no_verify)
    _integrity_note(done["integrity"], source)
    console.print(
        f"{done['source']} ({done['from']}, {done['bytes_before']:,} bytes of weights) -> "
        f"{done['output']} ({done['to']}, {done['bytes_after']:,} bytes)",
        highlight=False,
        markup=False,
    )


@app.command()
@user_errors
def sweep(
    method: Annotated[
        Optional[list[str]],
        typer.Option(
            "--method",
            help="ALLOCATOR[-SCORING]:SOLVER[+RECONSTRUCTION][@k=v,..], e.g. uniform:wanda, "
            "ecoflap-zeroth:sparsegpt, owl:wanda@m=5,lam=0.08, mix:wanda+sublayer, llmc:wanda (repeat). Allocators: "
            + ", ".join(ALLOCATORS.names())
            + "; scoring: "
            + ", ".join(SCORING.names())
            + "; solvers: "
            + ", ".join(SOLVERS.names())
            + "; reconstruction: "
            + ", ".join(RECONSTRUCTION.names())
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
    log = lambda message: console.print(f"[dim]{escape(message)}[/]", highlight=False)  # noqa: E731
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
        markup=False,
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


#: whether Ctrl-C was pressed in this process (set by :func:`_on_sigint`, installed by :func:`main`)
_SIGINT = {"seen": False}


def _on_sigint(_signum: int, _frame: Any) -> None:
    """Python's own Ctrl-C handler (raise KeyboardInterrupt), remembering that it ran."""
    _SIGINT["seen"] = True
    raise KeyboardInterrupt


def main() -> None:
    import signal

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    app(prog_name="ecoflap")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
