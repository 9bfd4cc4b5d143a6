"""Entry point of the ``qflux`` command: builds the Typer app and turns user errors into exit code 2."""

from __future__ import annotations

import errno
import logging
import sys
import traceback

import typer
from rich.console import Console
from rich.markup import escape

from qflux.cli import cache_cmd, config_cmd, data_cmd, import_cmd, plan_cmd, plugins_cmd, sample_cmd, train_cmd
from qflux.errors import QfluxError

# errno values of a failed write that the user fixes (disk full, quota, read-only file system, ulimit -f)
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}

app = typer.Typer(
    name="qflux",
    help="LoRA training for image-editing diffusion models (FLUX.1 Kontext, Qwen-Image-Edit).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(plugins_cmd.app, name="plugins")
app.add_typer(config_cmd.app, name="config")
app.add_typer(data_cmd.app, name="data")
app.command("train")(train_cmd.train)
app.command("sample")(sample_cmd.sample)
app.command("plan")(plan_cmd.plan)
app.add_typer(cache_cmd.app, name="cache")
app.add_typer(import_cmd.app, name="import")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors (anywhere on the "
                                                           "command line; the exit code stays the same).")) -> None:
    """qflux: train LoRAs for image-editing models."""


def _split_debug(args: list[str]) -> tuple[list[str], bool]:
    """``--debug`` anywhere before a ``--`` (``qflux train c.yaml --debug`` as well as ``qflux --debug train``),
    taken out so that no subcommand needs to declare it."""
    end = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:end]
    return [a for i, a in enumerate(args) if not (a == "--debug" and i < end)], debug


def _report(message: str, debug: bool) -> None:
    """One ``error:`` line; with ``--debug`` the traceback first (the exit code stays the same)."""
    if debug:
        traceback.print_exc()
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", markup=True)


def _show_deprecations() -> None:
    """A moved config key is one ``warning:`` line on stderr (not Python's file:line warning format)."""
    import warnings

    from qflux.errors import ConfigDeprecation

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ConfigDeprecation):
            Console(stderr=True, highlight=False, soft_wrap=True).print(f"[yellow]warning:[/] {escape(str(message))}",
                                                                        markup=True)
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", ConfigDeprecation)


def main(argv: list[str] | None = None) -> None:
    args, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    _show_deprecations()
    # bitsandbytes warns at import on CPU-only machines about an optional kernel package; it is not actionable
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        app(args=args, prog_name="qflux")
    except QfluxError as err:
        _report(str(err), debug)
        sys.exit(err.exit_code)
    except OSError as err:  # a full disk or a read-only folder the writers did not name themselves
        if err.errno not in _DISK_ERRNOS or not err.filename:
            raise
        from qflux.errors import write_failure

        _report(str(write_failure(err, "a file of the run")), debug)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        Console(stderr=True).print("interrupted")
        sys.exit(130)
