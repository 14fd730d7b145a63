"""The `ecoflap` command line: parses options, calls the library, renders to stderr.

Artifacts go to files, or to stdout with ``-o -``; ``-`` as an input path reads stdin. Every
user error ends in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from ecoflap_cli import __version__
from ecoflap_cli.cli.options import request_command
from ecoflap_cli.errors import EcoflapError
from ecoflap_cli.stages.requests import AllocateRequest, EvalRequest, PruneRequest, ScoreRequest, SweepRequest

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

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        passed = (args, prog_name, complete_var, False, windows_expand_args)
        if not standalone_mode:
            return super().main(*passed, **extra)
        try:
            code = super().main(*passed, **extra)
        except _USAGE_ERRORS as caught:
            exc: Any = caught  # click's and typer's usage errors share these methods, not a base class
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
            if _SIGINT["seen"]:  # a library turned the interrupt into an error we wrapped (transformers' imports)
                _interrupted()
            print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except MemoryError:
            print_error("out of memory: lower --samples, --seqlen or --batch-size")
            raise typer.Exit(3) from None
        except KeyboardInterrupt:
            _interrupted()
        except OSError as exc:
            if _SIGINT["seen"]:
                _interrupted()
            if exc.errno == errno.EPIPE:  # stdout closed by the reader (`| head`): typer exits quietly
                raise
            print_error(os_error_message(exc))
            raise typer.Exit(4) from None
        except Exception:
            if not _SIGINT["seen"]:
                raise
            # an error that follows Ctrl-C is its doing: e.g. a library interrupted halfway through
            # an import (numpy then recurses in its __getattr__) fails on its next use
            _interrupted()

    return wrapper  # type: ignore[return-value]


def _interrupted() -> NoReturn:
    """Ctrl-C as one line and exit code 130. Not "nothing was written": a prune keeps its finished
    blocks to --resume from (and a sweep its finished runs), said in a note line before this one."""
    print_error("interrupted: nothing half-written was left behind")
    raise typer.Exit(INTERRUPTED) from None


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


# --- the stage commands: options derived from the stage requests ------------------------------

NoVerifyOpt = Annotated[
    bool, typer.Option("--no-verify", help="Skip checking the checkpoint's weight files against their recorded sha256.")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]


def _written_by_ecoflap(source: str) -> bool:
    return (Path(source) / "ecoflap_report.json").is_file()


def _integrity_note(integrity: str | None, source: str) -> None:
    # only for checkpoints ecoflap wrote (an older ecoflap recorded no checksums); a plain model
    # directory from elsewhere never had any, so saying so there is noise
    if integrity == "unrecorded" and _written_by_ecoflap(source):
        console.print(f"[yellow]note:[/] {escape(source)} records no checksums: weights not verified", highlight=False)


def _check_output(output: str, overwrite: bool) -> None:
    from ecoflap_cli.io.artifacts import check_json_output

    check_json_output(output, overwrite)


def run_score(request: ScoreRequest) -> None:
    """Coarse stage: one global importance score per block, written as scores JSON."""
    from ecoflap_cli.stages import orchestrator

    doc = orchestrator.score(request, orchestrator.Hooks(progress=stage_progress))
    console.print(
        f"scored {len(doc['groups'])} blocks with {doc['method']['name']} in {doc['timings']['score_s']:.1f}s"
        + ("" if request.output == "-" else f" -> {escape(str(request.output))}")
    )


def run_allocate(request: AllocateRequest) -> None:
    """Scores -> per-block sparsity plan (exact global budget). Shows the plan before any pruning."""
    from ecoflap_cli.cli.render import render_plan
    from ecoflap_cli.stages import orchestrator

    plan = orchestrator.allocate(request)
    if request.show:
        render_plan(console, plan)


def run_prune(request: PruneRequest) -> None:
    """Fine stage: layer-wise pruning to a plan (or one-shot to --sparsity); writes a Hugging Face
    checkpoint directory whose report is also a recipe of this run."""
    from ecoflap_cli.cli.render import render_plan
    from ecoflap_cli.stages import orchestrator

    if request.output is None:  # named after the model and the target, never silently reused
        request = request.replace(output=request.default_output())
        console.print(f"output: {escape(str(request.output))} (give -o to choose)", highlight=False)
    hooks = orchestrator.Hooks(
        progress=stage_progress,
        note=lambda text: console.print(text, markup=False, highlight=False),
        on_plan=lambda plan_doc: render_plan(console, plan_doc),
    )
    report = orchestrator.prune(request, hooks).report
    console.print(
        f"pruned to {report['achieved_sparsity']:.4f} sparsity (target {report['target_sparsity']}) "
        f"in {report['timings']['prune_s']:.1f}s -> {escape(str(request.output))}"
    )


def run_eval(request: EvalRequest) -> None:
    """Achieved sparsity against the plan; perplexity, vision-language and lm-eval tasks, optionally vs the dense
    model."""
    from ecoflap_cli.cli.render import render_lm_eval, render_sparsity, render_tasks
    from ecoflap_cli.stages import orchestrator

    def loading(total: int | None, label: str) -> Any:
        return console.status(escape(label))

    notes: list[str] = []
    results = orchestrator.evaluate(
        request,
        orchestrator.Hooks(progress=loading, note=notes.append),
        say=lambda message: console.print(f"[dim]{escape(message)}[/]", highlight=False),
    )
    render_sparsity(console, results, request.per_tensor)
    render_tasks(console, results)
    render_lm_eval(console, results)
    for text in notes:
        console.print(text, highlight=False, markup=False)


app.command("score")(user_errors(request_command(ScoreRequest, run_score)))
app.command("allocate")(user_errors(request_command(AllocateRequest, run_allocate)))
app.command("prune")(user_errors(request_command(PruneRequest, run_prune)))
app.command("eval")(user_errors(request_command(EvalRequest, run_eval)))


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


def run_sweep(request: SweepRequest) -> None:
    """Prune and evaluate many methods x sparsities; writes sweep.json and prints the table."""
    from ecoflap_cli.cli.render import render_sweep
    from ecoflap_cli.stages.sweep import SweepConfig, run_sweep

    if not request.methods or not request.sparsities:
        raise EcoflapError(
            "give --model, --calib, --text, --method and --sparsity "
            "(the SmolLM2 benchmark: python -m ecoflap_cli.bench.quality)"
        )
    cfg = SweepConfig(**request.values())
    log = lambda message: console.print(f"[dim]{escape(message)}[/]", highlight=False)  # noqa: E731
    summary = run_sweep(cfg, log)
    render_sweep(console, summary)
    failed = [f"{r['method']}@{r['sparsity']:g}" for r in summary["runs"] if "error" in r]
    console.print(
        f"{len(summary['runs']) - len(failed)} runs -> {cfg.output}/sweep.json"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        highlight=False,
        markup=False,
    )
    if failed:
        raise typer.Exit(1)


app.command("sweep")(user_errors(request_command(SweepRequest, run_sweep)))


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
    main()
