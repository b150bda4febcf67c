"""The root of the CLI: wires every ``*_cmd`` module's ``register(app)`` and funnels errors.

Library errors (``GgraftError``) become ``Error: <one line>`` (+ ``Hint:``) on stderr with the
error's exit code; nothing prints a traceback unless GGRAFT_DEBUG=1.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import typer

try:  # typer >= 0.2x raises the exceptions of the click copy it bundles
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions

from ..errors import GgraftError
from . import output


def build_app() -> typer.Typer:
    app = typer.Typer(name="ggraft", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Assemble multimodal models for llama.cpp from parts.")
    package = importlib.import_module("ggraft.cli")
    for mod in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if mod.name.endswith("_cmd"):
            importlib.import_module(f"ggraft.cli.{mod.name}").register(app)

    def print_version(value: bool) -> None:
        if value:
            from .. import __version__

            typer.echo(__version__)
            raise typer.Exit(0)

    @app.callback()
    def root(version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True,
                                          help="Print ggraft's version and exit.")) -> None:
        """Assemble multimodal models for llama.cpp from parts."""

    return app


def main(argv: list[str] | None = None) -> None:
    app = build_app()
    try:
        code = app(args=argv, standalone_mode=False, prog_name="ggraft")
    except GgraftError as e:
        output.error(e.message, e.hint)
        code = e.exit_code
    except click_exceptions.UsageError as e:
        output.error(e.format_message(), f"see 'ggraft {e.ctx.command.name if e.ctx else ''} --help'".replace("  ", " "))
        code = 2
    except click_exceptions.ClickException as e:
        output.error(e.format_message())
        code = 2
    except (click_exceptions.Abort, KeyboardInterrupt):
        output.error("interrupted")
        code = 130
    except BrokenPipeError:
        code = 0
    except Exception as e:  # the last line of defence: still one line, never a traceback
        if os.environ.get("GGRAFT_DEBUG") == "1":
            raise
        output.error(f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                     "this is a bug in ggraft; rerun with GGRAFT_DEBUG=1 for the traceback")
        code = 2
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
