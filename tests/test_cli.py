"""The `preflab` command line as a user meets it: help for every command, no heavy imports."""

import subprocess
import sys

import pytest
from helpers import preflab

from annotate.cli import COMMANDS


def test_top_level_help_lists_every_command():
    out = preflab("--help")
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name in out.stdout


def test_every_flag_of_every_command_has_help_and_honest_defaults():
    import argparse

    from annotate.cli import build_parser

    def parsers(parser, path=()):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from parsers(sub, (*path, name))

    for path, parser in parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.dest == "help" or isinstance(action, argparse._SubParsersAction):
                continue
            where = f"preflab {' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where}: no help"
            shown = formatter._expand_help(action)
            assert shown.count("default") <= 1, f"{where}: {shown!r}"  # never a default said twice
            for dishonest in ("(default: None)", "(default: True)", "(default: False)"):
                assert dishonest not in shown, f"{where}: {shown!r}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_explains_itself(command):
    out = preflab(command, "--help")
    assert out.returncode == 0, out.stderr
    assert f"preflab {command}" in out.stdout
    assert len(out.stdout.splitlines()) >= 3


def test_help_does_not_import_torch_or_gradio():
    # `preflab --help` must answer at once: heavy libraries load only when a command runs.
    code = (
        "import sys; from annotate.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'gradio', 'trl') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_unknown_command_is_an_error():
    out = preflab("frobnicate")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr


def test_a_reader_that_goes_away_is_not_an_error(tmp_path):
    """`preflab info | head -1`: no BrokenPipeError traceback, the exit code of SIGPIPE."""
    from helpers import REPO, child_env, vote_record, write_store

    store = write_store(tmp_path / "store", [vote_record("q", "a", "b")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "annotate.cli", "info", "--data", str(store)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # gone before the command writes its first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
