"""What a user gets from `pip install preflab`: the install extras (a feature whose
optional package is missing says, in one line, which extra brings it) and the wheel
itself (it holds the shipped data, and its commands run on their defaults)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO, TRAIN_DEVICE, Server, child_env, vote_record, write_store


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


# ---- the wheel ---------------------------------------------------------------------------


def run(cmd, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout}\n{result.stderr}"
    return result


def outside_the_checkout() -> dict[str, str]:
    """A user's environment: no PYTHONPATH (pytest's, or the Makefile's, would put the
    checkout first and hide what the wheel lacks); one thread for the tiny models."""
    env = child_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with preflab installed from a wheel built here.

    The wheel is built from a copy of exactly what it is made from (pyproject, README,
    the two packages), so the build leaves nothing in the checkout, and offline, with the
    setuptools of this venv. Its dependencies (torch, gradio, ...) are this venv's, made
    visible by a .pth line naming this venv's site-packages: installing them afresh would
    download gigabytes. A plain path line, not a site directory, so that venv's own .pth
    files (among them the editable install of the checkout) are not run: only the wheel
    can provide `annotate` and `trainer`."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("annotate", "trainer"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", src, "-w", base / "dist"])
    (wheel,) = (base / "dist").glob("preflab-*.whl")

    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])  # a venv's venv is on the base Python
    python = venv / "bin" / "python"
    paths = "import sysconfig, json; print(json.dumps(sysconfig.get_paths()))"
    site = Path(json.loads(run([python, "-c", paths]).stdout)["purelib"])
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "preflab-test-deps.pth").write_text("".join(f"{p}\n" for p in ours))
    # This venv's pip, run by the new venv's Python, installs into the new one; --ignore-installed:
    # never touch the editable preflab it can see in this venv's site-packages.
    install = [python, "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "--no-index"]
    run([*install, "--ignore-installed", wheel], env=outside_the_checkout())
    return venv


def test_the_wheel_holds_the_code_and_the_shipped_data(wheel_venv, tmp_path):
    code = (
        "import json, annotate, trainer.shipped as s\n"
        "from importlib.resources import files\n"
        "data = files('trainer').joinpath('data')\n"
        "print(json.dumps({'annotate': annotate.__file__,\n"
        "  'names': sorted(p.name for p in data.iterdir()),\n"
        "  'texts': {p.name: p.read_text(encoding='utf-8') for p in data.iterdir()},\n"
        "  'shipped': [str(p) for p in (s.DEFAULT_PROMPTS, s.DEMO_PAIRS, s.GUIDELINES, s.EXAMPLE_RUBRIC)]}))"
    )
    python = wheel_venv / "bin" / "python"
    found = json.loads(run([python, "-c", code], cwd=tmp_path, env=outside_the_checkout()).stdout)
    assert Path(found["annotate"]).is_relative_to(wheel_venv)
    shipped = sorted(p.name for p in (REPO / "trainer" / "data").iterdir())
    assert found["names"] == shipped == ["demo-pairs.jsonl", "guidelines.md", "prompts.jsonl", "rubric.toml"]
    # The same files, whole: a wheel that cut or re-encoded one would differ here.
    assert found["texts"] == {n: (REPO / "trainer" / "data" / n).read_text(encoding="utf-8") for n in shipped}
    assert all(Path(p).is_relative_to(wheel_venv) and Path(p).is_file() for p in found["shipped"])


def test_the_installed_commands_run_on_their_defaults(wheel_venv, tmp_path):
    """`preflab serve --model tiny` and `preflab train-policy` from a directory that is not
    the checkout, with nothing but their defaults for the shipped files: the prompt pool,
    the guidelines, the demo pairs (which serve reads, and leaves out for tiny)."""
    preflab = wheel_venv / "bin" / "preflab"
    env = outside_the_checkout()
    shipped_pool = wheel_venv.glob("lib/python*/site-packages/trainer/data/prompts.jsonl")
    (pool,) = list(shipped_pool)
    n_prompts = len(pool.read_text().splitlines())

    with Server(tmp_path, "--model", "tiny", command=[preflab], cwd=tmp_path, env=env) as server:
        with urllib.request.urlopen(server.url + "config", timeout=30) as r:
            config = r.read().decode()
        log = server.output()
    assert f"{pool}: {n_prompts} prompts loaded" in log, log
    assert "pregenerated pairs match" in log, log  # the demo pairs were found (and judged)
    # The Guidelines tab holds the shipped guidelines, not "No guidelines were given."
    guidelines = (REPO / "trainer" / "data" / "guidelines.md").read_text().splitlines()[2]
    assert json.dumps(guidelines)[1:-1] in config

    # A reward model of a few pairs, then two policy steps on the default prompts.
    rows = [
        {"prompt": f"Question {i}?", "chosen": "yes, and why " * (1 + i % 3), "rejected": "no"}
        for i in range(16)
    ]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = ["--model", "tiny", "--device", TRAIN_DEVICE, "--no-progress"]
    run([preflab, "train-reward", *train, "--data", "prefs.jsonl", "--run-dir", "rm", "--epochs", "1",
         "--batch-size", "8", "--max-length", "32"], cwd=tmp_path, env=env)  # fmt: skip
    run([preflab, "train-policy", *train, "--reward", "rm", "--run-dir", "policy", "--steps", "2",
         "--batch-size", "2", "--max-new-tokens", "4"], cwd=tmp_path, env=env)  # fmt: skip
    config = json.loads((tmp_path / "policy" / "config.json").read_text())
    assert config["prompts"]["source"] == str(pool)
    assert config["prompts"]["count"] + config["prompts"]["heldout"] == n_prompts
    assert json.loads((tmp_path / "policy" / "status.json").read_text())["state"] == "done"
