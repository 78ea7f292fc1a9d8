"""`pgconv` command line: a click group whose commands are thin wrappers over library functions.

Commands live in `pgconv/cmd_<name>.py` and are imported only when invoked, so `pgconv verify` does not pay
for importing the converter or the benchmark code. Every `InputError` becomes one line on stderr and exit 2
(no traceback unless `--debug`); parity failure is exit 1 (set by the verify command itself). Ctrl-C exits 130
and SIGTERM 143, both after the writers removed their temporary output.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
import traceback
import warnings

import click

from pgconv.errors import InputError, PgconvWarning, printable

__all__ = ["main", "cli"]

COMMANDS = {
    "verify": ("pgconv.cmd_verify", "verify", "Layer-by-layer parity of pgconv's model against transformers."),
    "convert": ("pgconv.cmd_convert", "convert", "Convert a checkpoint between layouts (streaming, atomic)."),
    "inspect": ("pgconv.cmd_inspect", "inspect", "Describe a checkpoint: layout, preset, dtypes, problems."),
    "generate": ("pgconv.cmd_generate", "generate", "Generate text from an image and a prompt."),
    "fixture": ("pgconv.cmd_fixture", "fixture", "Write an offline random-weight checkpoint (tiny or full size)."),
    "golden": ("pgconv.cmd_golden", "golden", "Write transformers' activations at every probe, for any port."),
    "compare": ("pgconv.cmd_compare", "compare", "Compare another implementation's dump with golden activations."),
    "diff": ("pgconv.cmd_diff", "diff", "Is checkpoint B the same model as A? Weights diagnosed, behaviour compared."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text without importing every command module.
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in COMMANDS.items()])


@click.group(cls=LazyGroup)
@click.option("--debug", is_flag=True, help="Show Python tracebacks instead of one-line errors.")
@click.version_option(package_name="pgconv")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """pgconv: PaliGemma conversion and parity verification."""
    ctx.obj = {"debug": debug}


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so every writer removes its temporary output."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A `PgconvWarning` as one `pgconv: warning: ...` line on stderr; other warnings as Python shows them."""
    if issubclass(category, PgconvWarning):
        click.echo(f"pgconv: warning: {_one_line(str(message))}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> None:
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        # With standalone_mode=False click returns a command's `ctx.exit(code)` instead of exiting.
        rv = cli.main(args=argv, prog_name="pgconv", standalone_mode=False)
    except click.exceptions.Abort as e:
        terminated = isinstance(e.__cause__, Terminated)
        click.echo("pgconv: terminated" if terminated else "pgconv: interrupted", err=True)
        sys.exit(143 if terminated else 130)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.format_message())  # bare `pgconv`: the help text, not an error
        sys.exit(0)
    except click.UsageError as e:
        # Bad options are bad input too: one line, exit 2 (click's own format spans several lines).
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"pgconv: error: {_one_line(e.format_message())}{where}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"pgconv: error: {_one_line(e.format_message())}", err=True)
        sys.exit(2 if e.exit_code in (1, 2) else e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except InputError as e:
        if debug:  # the traceback, but still bad input's exit code (1 means a finding)
            traceback.print_exc()
        click.echo(f"pgconv: error: {_one_line(str(e))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        click.echo("pgconv: terminated" if terminated else "pgconv: interrupted", err=True)
        sys.exit(143 if terminated else 130)
    sys.exit(rv if isinstance(rv, int) else 0)


def _one_line(msg: str) -> str:
    # Names in messages come from files: control characters are escaped (no terminal escapes), whitespace folded.
    return " ".join(printable(msg, keep="\t\n\r").split())
