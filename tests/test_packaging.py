"""Packaging: what a plain install gets. A missing optional package (an extra of
pyproject.toml) is one line naming the extra; a wheel carries the shipped files, and the
commands that default to them run from an installed wheel, away from the checkout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO, TRAIN_DEVICE, banana_rows, child_env, train_tiny_reward_run, write_jsonl

from trainer.store.pg_testserver import free_port


def _without(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`preflab ARGS` in a Python where `module` cannot be imported: None in sys.modules
    is Python's documented way to make an import fail (ImportError naming the module),
    as it does when the package is not installed."""
    code = f"import sys; sys.modules[{module!r}] = None; from annotate.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=child_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_lora_without_peft_names_the_train_extra(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(8))
    result = _without(
        "peft",
        *("train-reward", "--data", str(data), "--model", "tiny", "--lora-r", "4"),
        *("--run-dir", str(tmp_path / "rm"), "--device", "cpu", "--no-progress"),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip().splitlines()[-1] == "error: --lora-r needs peft: pip install 'preflab[train]'"
    )
    assert "Traceback" not in result.stderr


# psycopg_pool too: the store needs both, and pip can leave one without the other.
@pytest.mark.parametrize("module", ["psycopg", "psycopg_pool"])
def test_a_postgres_store_without_psycopg_names_the_postgres_extra(tmp_path, module):
    # Nothing listens on port 1: the message must come before any connection is tried.
    result = _without(module, "info", "--data", "postgresql://someone@127.0.0.1:1/votes", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: postgresql://someone@127.0.0.1:1/votes: the PostgreSQL store needs {module}: "
        "pip install 'preflab[postgres]'"
    )
    assert "Traceback" not in result.stderr


def test_endpoints_without_openai_names_the_endpoints_extra(tmp_path):
    """The same wording as every other extra (trainer.errors.missing_extra), from the
    endpoints file's own check, before the file or the prompts are read."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}])
    (tmp_path / "endpoints.json").write_text("{}")
    result = _without(
        "openai", "generate", "--prompts", str(prompts), "--endpoints", "endpoints.json", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --endpoints needs openai: pip install 'preflab[endpoints]'"
    )
    assert "Traceback" not in result.stderr


# ---- a wheel, installed --------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment holding preflab from a wheel of this tree. Its
    dependencies come from the test's own environment through a .pth file (no network);
    that adds the directory only, so the editable install of preflab there (its own .pth
    and finder) stays off and the wheel's copy is the only preflab it can import."""
    tmp = tmp_path_factory.mktemp("wheel")
    # The build runs on a copy of the files git knows: building in the checkout would
    # leave build/ and *.egg-info there, and an untracked file must not reach the wheel.
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    src = tmp / "src"
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    wheels = tmp / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            wheels,
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("preflab-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    new_site = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (new_site / "preflab-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            venv / "bin" / "python",
            "install",
            "--no-deps",
            # The test's own environment holds preflab (editable), seen here through the
            # .pth file: without this pip calls the wheel "already satisfied" and installs
            # nothing. It never uninstalls that copy, it only writes into the new venv.
            "--ignore-installed",
            "-q",
            wheel,
        ],
        check=True,
        timeout=300,
    )
    return venv


def _installed_env() -> dict[str, str]:
    env = child_env()
    env.pop("PYTHONPATH", None)  # the checkout must not be importable
    return env


def test_the_wheel_holds_the_shipped_files_and_runs_serve_and_train_policy(installed, tmp_path):
    env, python = _installed_env(), installed / "bin" / "python"
    found = subprocess.run(
        [python, "-c", "import annotate, trainer.data as d; print(annotate.__file__); print(d.PROMPTS)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(installed) for p in found), found
    for name in ("prompts.jsonl", "guidelines.md", "demo-pairs.jsonl", "rubric.toml"):
        shipped = Path(found[1]).parent / name
        assert shipped.read_bytes() == (REPO / "trainer" / "data" / name).read_bytes(), name

    # `preflab serve --model tiny` on its defaults: the prompt pool and the guidelines
    # from the package, from a directory that holds neither.
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [installed / "bin" / "preflab", "serve", "--model", "tiny", "--data", tmp_path / "store"]
            + ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            config = None
            deadline = time.monotonic() + 240
            while config is None and time.monotonic() < deadline:
                assert server.poll() is None, log_path.read_text(errors="replace")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as r:
                        config = r.read().decode()
                except OSError:
                    time.sleep(0.5)
            assert config is not None, log_path.read_text(errors="replace")
            # The Guidelines tab shows the shipped file: its first heading is on the page.
            heading = next(
                line.lstrip("# ").strip()
                for line in (REPO / "trainer" / "data" / "guidelines.md").read_text().splitlines()
                if line.startswith("#")
            )
            assert heading in config
        finally:
            server.terminate()
            server.wait(30)

    # `preflab train-policy` with no --prompts: the shipped pool, from the package.
    reward = train_tiny_reward_run(tmp_path / "runs")
    run_dir = tmp_path / "runs" / "policy"
    result = subprocess.run(
        [installed / "bin" / "preflab", "train-policy", "--reward", reward, "--model", "tiny"]
        + ["--algo", "rloo", "--steps", "1", "--batch-size", "2", "--max-new-tokens", "6"]
        + ["--eval-prompts", "0", "--run-dir", run_dir, "--device", TRAIN_DEVICE, "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    prompts = json.loads((run_dir / "config.json").read_text())["prompts"]
    assert Path(prompts["source"]) == Path(found[1]), prompts
    assert prompts["count"] == sum(1 for line in Path(found[1]).open() if line.strip())
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
