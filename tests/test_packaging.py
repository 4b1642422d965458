"""What a user gets from `pip install preflab`: the install extras (a feature whose
optional package is missing says, in one line, which extra brings it) and the wheel
itself (it holds the shipped data, and its commands run on their defaults)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import child_env, vote_record, write_store


def without(module: str, tmp_path, *argv: str) -> subprocess.CompletedProcess:
    """`preflab ARGV` in a fresh process where `module` cannot be imported, as if its
    extra were not installed: a None entry in sys.modules is Python's documented way to
    make `import module` raise ImportError (the reference's "The module cache")."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; from annotate.cli import main; "
        f"sys.exit(main({list(argv)!r}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line a user-fixable problem prints (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    return line


def test_lora_without_peft_names_the_train_extra(tmp_path):
    store = write_store(tmp_path / "votes", [vote_record(choice="a"), vote_record("Another?", choice="b")])
    result = without(
        "peft", tmp_path, "train-reward", "--data", str(store), "--model", "tiny", "--lora-r", "4"
    )
    assert one_error_line(result) == "error: --lora-r needs peft: pip install 'preflab[train]'"
    # Refused before anything was made: the run directory it would have created is gone.
    assert not (tmp_path / "runs").exists()


def test_lora_policy_without_peft_names_the_train_extra(tmp_path):
    # The check comes before the reward run is read, so none is needed to see it.
    result = without("peft", tmp_path, "train-policy", "--reward", str(tmp_path / "rm"), "--lora-r", "4")
    assert one_error_line(result) == "error: --lora-r needs peft: pip install 'preflab[train]'"


@pytest.mark.parametrize("module", ["psycopg", "psycopg_pool"])
def test_a_database_without_psycopg_names_the_postgres_extra(tmp_path, module):
    # A password in the URL stays out of the message, as in every other store error.
    url = "postgresql://ann:secret@127.0.0.1:1/votes"
    result = without(module, tmp_path, "info", "--data", url)
    assert one_error_line(result) == (
        f"error: the PostgreSQL store postgresql://ann:***@127.0.0.1:1/votes needs {module}: "
        "pip install 'preflab[postgres]'"
    )


def test_endpoints_without_openai_names_the_endpoints_extra(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text("{}")
    result = without("openai", tmp_path, "generate", "--prompts", str(prompts), "--endpoints", str(endpoints))
    assert one_error_line(result) == "error: --endpoints needs openai: pip install 'preflab[endpoints]'"
