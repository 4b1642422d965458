"""Bad input and a tampered run directory, as an attacker would send them (issue #12).
Real files, the real command line, real stores, real subprocesses and signals.

Threats covered, one a line:
- a lone surrogate (a JSON "\\ud800" escape) in any text field of a pairs file loads, then every vote on that pair fails
- an undecodable byte in a pairs file does the same (it reads as a lone surrogate)
- a NUL character in a pairs file loads into a directory store, then the store cannot be copied to PostgreSQL
- invalid text inside gen_params (an object, or a JSON string of one) or inside the prompt's messages
- invalid text in a prompt pool (prompt, messages, id, tags) or in an import (and in --source)
- a deeply nested JSON line (RecursionError) or nesting past 64 levels crashes a loader with a traceback
- a number too long for Python to convert crashes a loader with a traceback
- an oversized prompt, answer, id or gen_params in a pairs file fills the page and the store (a pair id
  longer than a vote may name would make every vote on it fail)
- a Base model (or any text setting) starting with "-" is taken as a flag by the trainer's argparse
- Cancel signals a process that launch.json claims (a reused pid, another program, a forged record)
- Cancel of a run from an older version signals a process whose command line does not name the run
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import banana_store, preflab, write_jsonl

from annotate.launcher import Launcher, LaunchError
from annotate.pairs import load_pairs
from annotate.processes import start_ticks
from trainer.prompts import load_prompt_pool
from trainer.store import messages_to_json, open_store, read_comparisons

GOOD = {"prompt": "What is 2+2?", "response_a": "4", "response_b": "5"}
DEEP = "[" * 100_000 + "]" * 100_000  # past what json.loads can parse: a RecursionError


def _pair(i: int, **fields) -> dict:
    return {**GOOD, "response_a": f"answer {i}", **fields}


def test_invalid_text_in_any_pairs_field_is_reported_at_load_and_good_pairs_still_vote(tmp_path):
    rows = [
        _pair(1),
        _pair(2, model_a="abcd\ud800"),
        _pair(3, pair_id="p\udfff"),
        _pair(4, gen_params={"a": {"temperature": 0.7, "note": "x\ud83d"}}),
        _pair(5, gen_params=json.dumps({"b": ["ok", "\udc00"]})),
        _pair(6, prompt=[{"role": "user", "content": "hi \ud800"}]),
        _pair(7, response_b="\ud800"),
        _pair(8, model_b="m\ud800", prompt_id="x"),
        _pair(9, prompt_id="\ud801"),
        _pair(10, prompt="\ud800 why?"),
        _pair(11, response_a="fine\x00"),  # NUL: PostgreSQL's text refuses it
        _pair(12, gen_params={"a": {"stop\x00": 1}}),
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with open(path, "ab") as f:  # raw bytes that are not UTF-8
        f.write(b'{"prompt": "q", "response_a": "\xff\xfe", "response_b": "b"}\n')
    pairs, problems = load_pairs(path)
    assert problems == [
        f"{path}:2: model_a: not valid text (a lone surrogate \\ud800 at character 5)",
        f"{path}:3: pair_id: not valid text (a lone surrogate \\udfff at character 2)",
        f"{path}:4: gen_params.a.note: not valid text (a lone surrogate \\ud83d at character 2)",
        f"{path}:5: gen_params.b[1]: not valid text (a lone surrogate \\udc00 at character 1)",
        f"{path}:6: prompt[0].content: not valid text (a lone surrogate \\ud800 at character 4)",
        f"{path}:7: response_b: not valid text (a lone surrogate \\ud800 at character 1)",
        f"{path}:8: model_b: not valid text (a lone surrogate \\ud800 at character 2)",
        f"{path}:9: prompt_id: not valid text (a lone surrogate \\ud801 at character 1)",
        f"{path}:10: prompt: not valid text (a lone surrogate \\ud800 at character 1)",
        f"{path}:11: response_a: not valid text (a NUL character \\x00 at character 5)",
        f"{path}:12: gen_params.a: a key is not valid text (a NUL character \\x00 at character 5)",
        f"{path}:13: response_a: not valid text (a lone surrogate \\udcff, or the invalid UTF-8 byte 0xff, "
        "at character 1)",
    ]
    assert [p.response_a for p in pairs] == ["answer 1"]
    # What did load can be voted on: the store takes every field of it.
    with open_store(tmp_path / "store") as store:
        for pair in pairs:
            store.append(
                {**pair.record_fields(), "kind": "vote", "left": "a", "choice": "a", "annotator": "x"}
            )
    assert read_comparisons(tmp_path / "store").num_rows == 1


def test_nesting_too_deep_is_file_line_reason_not_a_traceback(tmp_path):
    nested70 = json.loads("[" * 70 + "]" * 70)
    lines = [
        json.dumps(_pair(1)),
        DEEP,
        json.dumps(_pair(3, gen_params={"a": nested70})),
        json.dumps(_pair(4, gen_params=DEEP)),  # a JSON string of gen_params, too deep to parse
        json.dumps(_pair(5, gen_params={"a": json.loads("[" * 60 + "]" * 60)})),  # deep, not too deep
        '{"prompt": ' + "1" * 5000 + "}",
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pairs, problems = load_pairs(path)
    assert problems == [
        f"{path}:2: nested deeper than 64 levels",
        f"{path}:3: gen_params: nested deeper than 64 levels",
        f"{path}:4: gen_params: nested deeper than 64 levels",
        f"{path}:6: invalid JSON (a number too long to read)",
    ]
    assert len(pairs) == 2

    # The command line says so in one line, with no traceback: a pool, and a JSON array
    # file (which is parsed whole), where the line is where the brackets got too deep.
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"prompt": "fine"}\n' + DEEP + "\n")
    r = preflab("prompts", pool)
    assert r.returncode == 0 and f"{pool}:2: nested deeper than 64 levels" in r.stdout, r
    assert "Traceback" not in r.stdout + r.stderr
    array = tmp_path / "pool.json"
    array.write_text('[\n{"prompt": "fine"},\n{"prompt":\n' + DEEP + "}\n]\n")
    r = preflab("prompts", array)
    assert r.returncode == 1 and f"error: {array}:4: nested deeper than 64 levels" in r.stderr, r
    assert "Traceback" not in r.stderr


def test_invalid_text_in_a_prompt_pool_is_reported_per_field(tmp_path):
    path = write_jsonl(
        tmp_path / "pool.jsonl",
        [
            {"prompt": "fine"},
            {"prompt": "bad \ud800"},
            {"messages": [{"role": "user", "content": "x\udbff"}]},
            {"prompt": "ok id?", "id": "\ud800"},
            {"prompt": "ok tags?", "tags": ["good", "b\ud800d"]},
            {"prompt": "ok note?", "note": {"deep": ["\ud800"]}},  # an ignored column: still checked
        ],
    )
    pool = load_prompt_pool(path)
    assert [p.messages[0]["content"] for p in pool] == ["fine"]
    assert pool.report.problems == [
        f"{path}:2: prompt: not valid text (a lone surrogate \\ud800 at character 5)",
        f"{path}:3: messages[0].content: not valid text (a lone surrogate \\udbff at character 2)",
        f"{path}:4: id: not valid text (a lone surrogate \\ud800 at character 1)",
        f"{path}:5: tags[1]: not valid text (a lone surrogate \\ud800 at character 2)",
        f"{path}:6: note.deep[0]: not valid text (a lone surrogate \\ud800 at character 1)",
    ]
    csv = tmp_path / "pool.csv"
    csv.write_bytes(b"prompt,id\nfine,1\nbad \xc3(,2\n")  # a broken two-byte sequence
    pool = load_prompt_pool(csv)
    assert pool.report.problems == [
        f"{csv}:3: prompt: not valid text (a lone surrogate \\udcc3, or the invalid UTF-8 byte 0xc3, at character 5)"
    ]


def test_an_import_reports_invalid_text_and_stores_only_good_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "q1", "chosen": "yes", "rejected": "no"},
            {"prompt": "q2", "chosen": "y\ud800s", "rejected": "no"},
            {"prompt": [{"role": "user", "content": "\ud800"}], "chosen": "a", "rejected": "b"},
            {"prompt": "q4", "chosen": "yes", "rejected": "no", "meta": {"k": "\udfff"}},
        ],
    )
    path.write_text(path.read_text() + DEEP + "\n")
    r = preflab("import", path, "--data", tmp_path / "store", "--source", "test")
    assert r.returncode == 0, r
    assert f"{path}:2: chosen: not valid text (a lone surrogate \\ud800 at character 2)" in r.stderr
    assert (
        f"{path}:3: prompt[0].content: not valid text (a lone surrogate \\ud800 at character 1)" in r.stderr
    )
    assert f"{path}:4: meta.k: not valid text (a lone surrogate \\udfff at character 1)" in r.stderr
    assert f"{path}:5: nested deeper than 64 levels" in r.stderr and "Traceback" not in r.stderr
    q1 = messages_to_json([{"role": "user", "content": "q1"}])
    assert read_comparisons(tmp_path / "store").column("prompt").to_pylist() == [q1]
    # --source becomes every vote's annotator: an undecodable byte in it is refused too.
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "annotate.cli",
            "import",
            str(path),
            "--data",
            str(tmp_path / "s2"),
            b"--source",
            b"x\xff",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "--source: not valid text" in bad.stderr, bad
    assert not (tmp_path / "s2").exists()


def test_a_setting_that_starts_with_a_dash_is_refused_before_any_trainer_starts(tmp_path):
    store = banana_store(tmp_path / "store", n=4)
    launcher = Launcher(tmp_path / "runs")
    for model in ("--run-dir/x", "-h", "--config=/tmp/evil.json"):
        with pytest.raises(
            LaunchError, match=r"^Base model: '-.*' starts with '-'; give a name or a path, not a flag$"
        ):
            launcher.start_reward(store, model=model, epochs=1)
    with pytest.raises(LaunchError, match=r"^--device: '--x' starts with '-'"):
        launcher.start_reward(store, model="tiny", device="--x")
    assert not launcher.runs_dir.exists() or not list(launcher.runs_dir.iterdir())  # nothing started
    # The trainer's own command line, where argparse took `--model=--run-dir/x` as a value.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.reward",
            "--data",
            str(store),
            "--model=--run-dir/x",
            "--runs-dir",
            str(tmp_path / "r"),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "error: --model '--run-dir/x' starts with '-'" in r.stderr, r
    assert not (tmp_path / "r").exists()


# ---- Cancel -------------------------------------------------------------------------------


@pytest.fixture
def bystander(tmp_path):
    """A harmless process that is no run's trainer, though its command line has a trainer's
    words in it (what the old check took for one); the test checks it survives."""
    code = "import time; time.sleep(300)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "trainer.reward", "--run-dir", str(tmp_path / "reward-y")]
    )
    yield proc
    proc.kill()
    proc.wait()


def _run_dir(launcher: Launcher, run_id: str, launch: dict | None) -> Path:
    run = launcher.runs_dir / run_id
    run.mkdir(parents=True)
    (run / "status.json").write_text(
        json.dumps({"state": "running", "progress": 0.3, "updated_at": time.time()})
    )
    (run / "config.json").write_text(json.dumps({"kind": "reward", "config": {"model": "tiny"}}))
    if launch is not None:
        (run / "launch.json").write_text(json.dumps({"kind": "reward", "created_at": time.time(), **launch}))
    return run


def test_cancel_refuses_a_process_that_launch_json_claims_and_it_survives(tmp_path, bystander):
    launcher = Launcher(tmp_path / "runs")
    pid, ticks = bystander.pid, start_ticks(bystander.pid)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    run = tmp_path / "runs" / "reward-x"
    trainer_cmd = [sys.executable, "-m", "trainer.reward", "--run-dir", str(run), "--no-progress"]
    elsewhere = [*trainer_cmd[:4], str(tmp_path / "reward-y")]
    refusals = [
        # (launch.json, what the refusal says)
        (
            {"pid": pid},
            f"process {pid} is not a trainer of this run (its command line does not name reward-x)",
        ),
        (
            {"pid": pid, "pid_start": ticks, "cmdline": cmdline},
            "launch.json does not record this run's trainer command",
        ),
        (
            {"pid": pid, "pid_start": ticks, "cmdline": elsewhere},
            "launch.json does not record this run's trainer command",
        ),
        (
            {"pid": pid, "pid_start": ticks, "cmdline": trainer_cmd},
            f"process {pid} runs a different command line",
        ),
        (
            {"pid": pid, "pid_start": None, "cmdline": trainer_cmd},
            "launch.json does not record the process it started",
        ),
    ]
    for launch, expected in refusals:
        _run_dir(launcher, "reward-x", launch)
        with pytest.raises(LaunchError) as e:
            launcher.cancel("reward-x")
        assert str(e.value).startswith(f"reward-x: {expected}") and str(e.value).endswith(
            "; nothing was signalled"
        )
        assert bystander.poll() is None, launch  # still running, never signalled
        for f in run.iterdir():
            f.unlink()
        run.rmdir()
    # Other start ticks under the pid: another process has it now. The page shows the run
    # as failed (its trainer is gone), so there is nothing to cancel.
    _run_dir(launcher, "reward-x", {"pid": pid, "pid_start": ticks + 1, "cmdline": cmdline})
    assert launcher.info("reward-x").state == "failed"
    assert "already failed; nothing to cancel" in launcher.cancel("reward-x")
    # No launch.json at all (a CLI run), status.json naming the pid: the same old-version rule.
    (run / "launch.json").unlink()
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": pid, "updated_at": time.time()}))
    with pytest.raises(LaunchError, match="does not name reward-x\\); nothing was signalled"):
        launcher.cancel("reward-x")
    assert bystander.poll() is None


def test_cancel_stops_the_process_it_recorded_and_trusts_its_own_child_first(tmp_path, bystander):
    """A stand-in trainer (a shell script that sleeps), started through the launcher: after
    a server restart (a new Launcher) Cancel stops it by launch.json's record; a launcher
    that started it signals its own child even when launch.json was made to point elsewhere."""
    store = banana_store(tmp_path / "store", n=4)
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\nsleep 300 &\nwait\n")
    fake_python.chmod(0o755)
    first = Launcher(tmp_path / "runs", python=str(fake_python))
    info = first.start_reward(store, model="tiny", epochs=1)
    launch = json.loads((info.path / "launch.json").read_text())
    assert launch["pid"] == info.pid and launch["pid_start"] == start_ticks(info.pid)
    assert launch["cmdline"][:3] == ["/bin/sh", str(fake_python), "-m"]  # as /proc shows it
    restarted = Launcher(tmp_path / "runs")
    assert "cancel requested" in restarted.cancel(info.run_id)
    final = first.wait(info.run_id, timeout=60)
    assert not final.active and final.path == info.path
    assert first.info(info.run_id).state in ("failed", "cancelled")

    second = first.start_reward(store, model="tiny", epochs=1)
    planted = {**json.loads((second.path / "launch.json").read_text()), "pid": bystander.pid}
    planted["pid_start"] = start_ticks(bystander.pid)
    (second.path / "launch.json").write_text(json.dumps(planted))
    with pytest.raises(LaunchError, match="nothing was signalled"):
        Launcher(tmp_path / "runs").cancel(second.run_id)  # after a restart: the record is checked
    assert "cancel requested" in first.cancel(second.run_id)  # its own Popen, not the file
    first.wait(second.run_id, timeout=60)
    assert not Path(f"/proc/{second.pid}").exists() and bystander.poll() is None


def test_a_real_trainer_is_cancelled_after_a_server_restart(tmp_path):
    """The record written at launch matches the real trainer, so a new server can stop it,
    and the trainer saves and stops as cancelled."""
    store = banana_store(tmp_path / "store")
    first = Launcher(tmp_path / "runs")
    info = first.start_reward(store, model="tiny", epochs=400, batch_size=2, max_length=96, lr=1e-3)
    deadline = time.time() + 180
    while time.time() < deadline:  # until it trains: SIGTERM then means save and stop
        if len(first.metrics(info.run_id).series("train", "loss")) >= 2:
            break
        assert first.info(info.run_id).active, first.log_tail(info.run_id)
        time.sleep(0.2)
    restarted = Launcher(tmp_path / "runs")
    assert "cancel requested" in restarted.cancel(info.run_id)
    final = first.wait(info.run_id, timeout=120)
    assert final.state == "cancelled", (final, first.log_tail(info.run_id))
    assert not Path(f"/proc/{info.pid}").exists()


def test_oversized_fields_of_a_pairs_file_are_refused_row_by_row(tmp_path):
    from annotate.pairs import MAX_NAME_CHARS, MAX_PROMPT_CHARS, MAX_RESPONSE_CHARS

    rows = [
        _pair(0),
        _pair(1, prompt="x" * (MAX_PROMPT_CHARS + 1)),
        _pair(2, response_b="y" * (MAX_RESPONSE_CHARS + 1)),
        _pair(3, pair_id="i" * (MAX_NAME_CHARS + 1)),
        _pair(4, model_a="m" * (MAX_NAME_CHARS + 1)),
        _pair(5, gen_params={"note": "n" * 20_000}),
        _pair(6, response_a="z" * MAX_RESPONSE_CHARS),  # at the limit: kept
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    pairs, problems = load_pairs(path)
    assert [p.response_a for p in pairs] == ["answer 0", "z" * MAX_RESPONSE_CHARS]
    assert [p.split(": ", 2)[1] for p in problems] == [
        "prompt",
        "response_b",
        "pair_id",
        "model_a",
        "gen_params",
    ]
    assert (
        problems[0]
        == f"{path}:2: prompt: {MAX_PROMPT_CHARS + 1:,} characters, more than the {MAX_PROMPT_CHARS:,} a pair may hold"
    )
