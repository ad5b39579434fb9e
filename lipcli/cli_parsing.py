"""How the CLI reads its input and reports bad input: one line on stderr, never click's boxed usage screen.

Also the small parsers the commands share (comma lists, optimizer=value pairs, device names) and the
rebuilding of a command line for torchrun's workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from . import render
from .errors import UserError


class OneLineUsageErrors(TyperGroup):
    """click shows a usage error as usage, a hint and a boxed message; lipcli's rule is one line on stderr, exit 2."""

    def make_context(self, *args: Any, **kwargs: Any) -> typer.Context:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: typer.Context) -> Any:
        with _one_line_usage_errors():  # the subcommand parses its options in here
            return super().invoke(ctx)


# typer vendors click: its BadParameter derives from the UsageError that every parsing error is.
_UsageError: type[Exception] = typer.BadParameter.__base__


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except _UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `lipcli`: the help is the answer
            raise
        where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        raise fail(exc.format_message() + where, exc.exit_code) from None


def fail(message: str, code: int) -> typer.Exit:
    # Escaped: messages hold paths and library text, and rich would read [brackets] in them as markup.
    render.stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def forwarded_args(ctx: typer.Context, drop: str) -> list[str]:
    """The options given on this command line, except ``drop``, written back as arguments for torchrun's workers."""
    args: list[str] = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        # By name: typer may vendor its own copy of click's ParameterSource.
        if param.name == drop or source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False):
            args.append(param.opts[0] if value else param.secondary_opts[0])
            continue
        for item in value if param.multiple else [value]:
            args += [param.opts[0], str(item)]
    return args


def check_device(name: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device; use auto, cpu or cuda") from None


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def optimizer_values(text: str, option: str) -> dict[str, float]:
    """``muon=0.2,adamw=0.003`` as a dict."""
    values = {}
    for item in comma_list(text):
        name, _, value = item.partition("=")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"{option} expects OPTIMIZER=NUMBER pairs separated by commas, got {item!r}") from None
    return values


def comma_floats(text: str, option: str) -> list[float]:
    try:
        return [float(item) for item in comma_list(text)]
    except ValueError:
        raise UserError(f"{option} expects numbers separated by commas, got {text!r}") from None
