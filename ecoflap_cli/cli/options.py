"""Typer commands derived from the stage requests (``stages.requests``): one option per field.

:func:`request_command` turns a request class into a command function whose signature Typer
reads: each field becomes an option (or an argument) with the field's help, default, registry
choices and shell completion; a settings mapping becomes a repeatable ``NAME=VALUE`` option plus
its shortcut options. The command collects the values, applies a ``--recipe`` underneath the
options given on the command line, checks the request (one line on error), and hands it on.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer

from ecoflap_cli.core.registry import parse_assignments
from ecoflap_cli.errors import EcoflapError
from ecoflap_cli.stages.requests import REQUIRED, Meta, Request, Shortcut, recipe_text, request_from_recipe

#: options every derived command takes besides its request's fields
RECIPE = "recipe"
SAVE_RECIPE = "save_recipe"
CONTEXT = "typer_context"  # the click context Typer passes in: which options were typed


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(hint: Any) -> Any:
    """The Typer type of a field's hint: ``X | None`` -> ``Optional[X]``, dicts and lists -> list[str]."""
    origin = typing.get_origin(hint)
    if origin is dict:  # NAME=VALUE items
        return Optional[list[str]]
    if origin is list:
        return Optional[list[typing.get_args(hint)[0]]]  # type: ignore[misc]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:  # X | None
        return _scalar_type(args[0]) if typing.get_origin(args[0]) in (dict, list) else Optional[args[0]]
    return hint


def _registry_parts(meta: Meta) -> dict[str, Any]:
    """Metavar, parse-time check and shell completion for a field that names a registry entry."""
    if meta.registry is None:
        return {}
    kind = meta.registry.kind

    def check(value: str | None) -> str | None:
        if value is not None and value not in meta.names():
            raise typer.BadParameter(f"unknown {kind} {value!r} (choose from {', '.join(meta.names())})")
        return value

    def complete(_ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[Any]:
        from click.shell_completion import CompletionItem

        return [CompletionItem(n) for n in meta.names() if n.startswith(incomplete)]

    return {"metavar": "[" + "|".join(meta.names()) + "]", "callback": check, "shell_complete": complete}


def _help(meta: Meta) -> str:
    if meta.choices:
        return f"{meta.help} ({' | '.join(meta.choices)})"
    return meta.help


def _parameter(name: str, meta: Meta, hint: Any, default: Any) -> inspect.Parameter:
    # required fields are optional here: a --recipe may give them; the request says what is missing
    kind = _scalar_type(hint) if default is not REQUIRED else Optional[_scalar_type(hint)]
    cli_default = None if default is REQUIRED or isinstance(default, (dict, list)) else default
    if meta.argument:
        info: Any = typer.Argument(help=meta.help)
    else:
        parts = _registry_parts(meta)
        if meta.assign is not None:
            parts["metavar"] = meta.assign
        # no flags: Typer names it after the field (--per-tower, and --x/--no-x for a switch)
        info = typer.Option(*meta.flags, help=_help(meta), **parts)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=cli_default, annotation=Annotated[kind, info]
    )


def _shortcut_parameter(field_name: str, cut: Shortcut) -> inspect.Parameter:
    name = f"{field_name}__{cut.key}"
    info = typer.Option(cut.flag, help=cut.help)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[cut.type], info]
    )


def ordered_fields(cls: type[Request]) -> list[tuple[Any, Meta, Any]]:
    """The request's fields for ``--help``: the stage's own first, then the shared groups."""
    own = set(vars(cls).get("__annotations__", {}))
    declared = cls.fields()
    return [f for f in declared if f[0].name in own] + [f for f in declared if f[0].name not in own]


def command_parameters(cls: type[Request]) -> list[inspect.Parameter]:
    params: list[inspect.Parameter] = []
    for f, meta, hint in ordered_fields(cls):
        if not meta.cli:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        params.append(_parameter(f.name, meta, hint, default))
        params.extend(_shortcut_parameter(f.name, cut) for cut in meta.shortcuts)
    recipe = typer.Option(
        "--recipe",
        help="Read the options from a recipe (YAML/JSON) or a checkpoint's ecoflap_report.json; "
        "options given here override it.",
    )
    save = typer.Option("--save-recipe", help="Write this run's options as a recipe file (YAML or JSON by suffix).")
    for name, info in ((RECIPE, recipe), (SAVE_RECIPE, save)):
        kind = Annotated[Optional[Path], info]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind))
    params.append(inspect.Parameter(CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    return params


def _given(ctx: Any, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


def collect(cls: type[Request], values: dict[str, Any], only_given: bool, ctx: Any) -> dict[str, Any]:
    """Request keywords from the command's values; ``only_given``: those typed on the command line."""
    out: dict[str, Any] = {}
    for f, meta, hint in cls.fields():
        if not meta.cli:
            continue
        value = values.get(f.name)
        given = _given(ctx, f.name)
        if meta.assign is not None or typing.get_origin(hint) is dict:
            mapping = _assignments(value, meta, f.name) if value else {}
            for cut in meta.shortcuts:
                extra = values.get(f"{f.name}__{cut.key}")
                if extra is not None:
                    mapping[cut.key] = extra
                    given = True
            if given or not only_given:
                out[f.name] = mapping
            continue
        if typing.get_origin(hint) is list and value is None:
            value = []
        if given or not only_given:
            out[f.name] = value if value is not None or f.default is not REQUIRED else REQUIRED
    return out


def _assignments(items: list[str], meta: Meta, name: str) -> dict[str, Any]:
    flag = meta.flags[0] if meta.flags else _flag(name)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise EcoflapError(f"{flag} takes {meta.assign}, got {item!r}")
    return dict(parse_assignments(items, flag))


def request_command(cls: type[Request], run: Callable[[Any], None]) -> Callable[..., None]:
    """A Typer command function for ``cls``: builds and checks the request, then ``run(request)``."""

    def command(**values: Any) -> None:
        recipe, save, ctx = values.pop(RECIPE, None), values.pop(SAVE_RECIPE, None), values.pop(CONTEXT)
        if recipe is not None:
            request = request_from_recipe(cls.stage, recipe, collect(cls, values, True, ctx))
        else:
            request = cls.create(**collect(cls, values, False, ctx))
        if save is not None:
            from ecoflap_cli.files import write_atomic

            write_atomic(Path(save), recipe_text(request, str(save)).encode())
        run(request)

    command.__signature__ = inspect.Signature(command_parameters(cls))  # type: ignore[attr-defined]
    command.__annotations__ = {}
    command.__doc__ = run.__doc__
    command.__name__ = run.__name__
    return command
