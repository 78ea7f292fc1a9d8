"""The CLI's own conventions: lazy commands, one-line usage errors with exit 2, exit codes returned by commands."""

from __future__ import annotations

import click
import pytest

from pgconv import cli as cli_module
from pgconv.cli import COMMANDS, main


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["convert", "a", "b"], "Missing option '--to'"),
        (["verify", "--dtype", "float8"], "Invalid value for '--dtype'"),
        (["nope"], "No such command 'nope'"),
        (["inspect"], "Missing argument 'PATH'"),
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, argv, needle):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pgconv: error: ") and needle in err
    assert "--help" in err


def test_bare_command_prints_help(capsys):
    code, out, _ = run([], capsys)
    assert code == 0 and "Commands:" in out and all(name in out for name in COMMANDS)


def test_help_lists_commands_without_importing_them(capsys):
    import sys

    for name, (module, _, _) in COMMANDS.items():
        sys.modules.pop(module, None)
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and all(name in out for name in COMMANDS)
    assert not any(module in sys.modules for module, _, _ in COMMANDS.values())


def test_ctx_exit_code_of_a_command_is_the_process_exit_code(capsys, monkeypatch):
    @click.command()
    @click.pass_context
    def finding(ctx):
        ctx.exit(1)

    monkeypatch.setattr(cli_module.LazyGroup, "get_command", lambda self, ctx, name: finding)
    code, _, _ = run(["finding"], capsys)
    assert code == 1


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_imports_and_has_help(capsys, name):
    code, out, _ = run([name, "--help"], capsys)
    assert code == 0 and f"Usage: pgconv {name}" in out
