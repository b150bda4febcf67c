"""The root of the CLI: wires every command module and funnels errors.

A command is the module ``ggraft/cli/<name>_cmd.py`` and, in it, the function ``<name>``; its
docstring's first paragraph is the line in ``ggraft --help``.

Every way out ends in one line on stderr and an exit code, through typer's public names only
(``typer.TyperException`` for usage errors, ``typer.Exit``, ``typer.Abort``):
- ``GgraftError`` -> ``Error: <message>`` (+ ``Hint:``), the error's exit code (2 bad input, 1 incompatible);
- a usage error -> ``Error: <what>`` + ``Hint: see 'ggraft <command> --help'``, exit 2;
- an OSError of the system (permission, full disk) -> ``Error: <file>: <reason>``, exit 2;
- anything else is a bug in ggraft: one line saying so, exit 2; ``GGRAFT_DEBUG=1`` shows the traceback.
Python warnings are printed as one ``Warning:`` line each; a closed stdout (``ggraft --help | head``)
ends quietly with exit 1, since the output was cut short.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import sys
import warnings

import typer

from ggraft.errors import GgraftError
from . import output

DEBUG_ENV = "GGRAFT_DEBUG"
#: PIL's DecompressionBombWarning (an image of more than ~89 megapixels) refuses the image
#: instead of printing PIL's own text; matched by message so PIL is not imported here
DECOMPRESSION_BOMB = r".*decompression bomb"


def _cli_exception_types() -> tuple[type[BaseException], ...]:
    """What typer raises for bad usage: ``typer.TyperException`` (typer 0.2x), else click's
    ``ClickException`` (older typer, which used click itself)."""
    found = getattr(typer, "TyperException", None)
    if isinstance(found, type):
        return (found,)
    try:  # pragma: no cover - older typer
        import click

        return (click.ClickException,)
    except ImportError:  # pragma: no cover
        return ()


def _paragraphs(doc: str | None) -> list[str]:
    """A docstring's paragraphs, each on one line (the terminal wraps them, not the source)."""
    return [" ".join(p.split()) for p in inspect.cleandoc(doc or "").split("\n\n") if p.strip()]


def _first_sentence(paragraph: str) -> str:
    return re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0]


def _commands() -> list[tuple[str, object]]:
    package = importlib.import_module("ggraft.cli")
    names = sorted(m.name.removesuffix("_cmd") for m in pkgutil.iter_modules(package.__path__)
                   if m.name.endswith("_cmd"))
    return [(name, getattr(importlib.import_module(f"ggraft.cli.{name}_cmd"), name)) for name in names]


def build_app() -> typer.Typer:
    app = typer.Typer(name="ggraft", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Assemble multimodal models for llama.cpp from parts.")
    for name, command in _commands():
        paragraphs = _paragraphs(command.__doc__)
        app.command(name=name, help="\n\n".join(paragraphs),
                    short_help=_first_sentence(paragraphs[0]) if paragraphs else None)(command)

    def print_version(value: bool) -> None:
        if value:
            from ggraft import __version__

            typer.echo(__version__)
            raise typer.Exit(0)

    @app.callback()
    def root(version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True,
                                          help="Print ggraft's version and exit.")) -> None:
        """Assemble multimodal models for llama.cpp from parts.

        Bad input: one 'Error:' line and exit 2 (1: an incompatible pair); GGRAFT_DEBUG=1 shows tracebacks.
        """

    return app


def build_command():
    """The click-style command of the app, with help that reads well: flags show no ``<bool>``,
    arguments are named in capitals."""
    command = typer.main.get_command(build_app())
    for sub in [command, *getattr(command, "commands", {}).values()]:
        for param in sub.params:
            _tidy(param)
        sub.get_help_option = _tidied(sub.get_help_option)
    return command


def _tidy(param) -> None:
    """A flag shows no type (``<bool>``); an argument is named in capitals."""
    if getattr(param, "is_flag", False):
        param.metavar = ""
    elif getattr(param, "param_type_name", "") == "argument" and param.metavar is None:
        param.metavar = param.name.upper()


def _tidied(get_help_option):
    def get(ctx):
        option = get_help_option(ctx)
        if option is not None:
            _tidy(option)
        return option

    return get


def _usage_hint(e: BaseException) -> str | None:
    ctx = getattr(e, "ctx", None)
    path = getattr(ctx, "command_path", None)
    return f"see '{path} --help'" if path else None


def _bug_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"unexpected {type(e).__name__}" + (f": {text}" if text else "")


def _quiet_stdout() -> None:
    """stdout's reader has gone (``| head``): send the rest to /dev/null so exit is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    output.note(f"Warning: {output.one_line(str(message))}")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code (every error already printed)."""
    debug = os.environ.get(DEBUG_ENV) == "1"
    usage_errors = _cli_exception_types()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            warnings.filterwarnings("error", message=DECOMPRESSION_BOMB)
            args = sys.argv[1:] if argv is None else list(argv)
            code = build_command().main(args=args or ["--help"], standalone_mode=False, prog_name="ggraft")
    except GgraftError as e:
        output.error(e.message, e.hint)
        code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        output.error("interrupted")
        code = 130
    except BrokenPipeError:  # as rich does for what it prints: quiet, exit 1 (the output was cut short)
        _quiet_stdout()
        code = 1
    except Exception as e:  # noqa: BLE001 - the last line of defence: still one line, never a traceback
        if usage_errors and isinstance(e, usage_errors):
            output.error(e.format_message(), _usage_hint(e))
        elif debug:
            raise
        elif isinstance(e, OSError) and e.strerror:  # the system's, not ggraft's: permissions, a full disk
            output.error(f"{e.filename}: {e.strerror}" if e.filename else e.strerror)
        else:
            output.error(_bug_line(e), f"this is a bug in ggraft; rerun with {DEBUG_ENV}=1 to see the traceback")
        code = 2
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> None:
    code = run(argv)
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _quiet_stdout()
    sys.exit(code)


if __name__ == "__main__":
    main()
