"""`--data postgresql://...` works everywhere a store does (issue 10), through the real
commands: import, info, export (standard and records), leaderboard, train-reward, the
Train tab's launcher, the Review tab's reader, train-policy's prompts; and a server that
cannot be reached is one clear line, exit 2, no traceback.

`pg_url` (tests/conftest.py) is a fresh empty database on a throwaway PostgreSQL server.
The directory backend is the reference: the same events written to both give the same
records export, leaderboard, pairs and prompts.
"""

import json
import uuid
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import TRAIN_DEVICE, retraction, vote_record, write_store
from helpers import preflab as cli

from annotate import cli as preflab
from annotate.arena import arena_file
from annotate.launcher import Launcher, LaunchError
from annotate.review import Reviewer
from annotate.web.leaderboard_tab import page
from trainer.errors import PolicyInputError
from trainer.prompts import load_prompts
from trainer.reward_data import read_pairs
from trainer.store import SCHEMA, describe, messages_to_json, read_comparisons
from trainer.store.pg_testserver import free_port

MODELS = ("alpha", "beta", "gamma")


def with_password(url: str, password: str) -> str:
    """postgresql://user@host... -> postgresql://user:password@host... (the test server
    trusts local connections, so the password is never checked, only carried)."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{password}@{host}"


# --------------------------------------------------------------------------------------
# The same events, written to either backend
# --------------------------------------------------------------------------------------

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def events() -> list[dict]:
    """30 votes among three models (every choice, strengths, rationale, gen_params,
    two annotators) and one retract, each with a fixed event_id and created_at."""
    out = []
    choices = ["a", "b", "a", "tie", "a", "both_bad", "b", "a"]
    for i in range(30):
        messages = [{"role": "user", "content": f"Question {i % 12}: how do I water a plant?"}]
        if i % 5 == 0:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        a, b = f"answer {i} from one side", f"answer {i} from the other side"
        model_a, model_b = MODELS[i % 3], MODELS[(i + 1 + i // 3) % 3]
        if model_a == model_b:
            model_b = MODELS[(i + 2) % 3]
        choice = choices[i % len(choices)]
        out.append(
            vote_record(
                messages,
                a,
                b,
                choice,
                (1 + i % 2) if choice in ("a", "b") else None,
                event_id=str(uuid.UUID(int=i + 1)),
                model_a=model_a,
                model_b=model_b,
                left="ab"[i % 2],
                rationale="clearer" if i % 4 == 0 else None,
                annotator=f"ann{i % 2}",
                created_at=T0 + timedelta(seconds=i, microseconds=17 * i),
                decision_ms=900 + i,
                gen_params=json.dumps({"a": {"seed": i}, "b": {"seed": i + 1}}) if i % 3 else None,
            )
        )
    out.append(retraction(out[0], event_id=str(uuid.UUID(int=999)), created_at=T0 + timedelta(minutes=5)))
    return out


def fill(target, evs=None):
    return write_store(target, evs if evs is not None else events())


@pytest.fixture
def both(pg_url, tmp_path):
    """(database URL, directory) holding the same events."""
    return fill(pg_url), fill(tmp_path / "dir-store")


def sorted_by_event(table: pa.Table) -> pa.Table:
    return table.sort_by("event_id").combine_chunks()


# --------------------------------------------------------------------------------------
# import, info, export
# --------------------------------------------------------------------------------------


def test_import_info_and_export_on_postgres(pg_url, tmp_path):
    rows = [
        {"prompt": "p1", "chosen": "good", "rejected": "bad", "margin": 2},
        {"prompt": "p2", "chosen": "yes", "rejected": "no"},
        {"prompt": "p3", "chosen": "same", "rejected": "same"},  # bad: skipped
        {"prompt": "p4", "chosen": "short", "rejected": "long and wrong", "margin": 1},
    ]
    src = tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))

    r = cli("import", src, "--data", pg_url, "--source", "trl", "--chunk-rows", 2)
    assert r.returncode == 0, r.stderr
    assert f"imported  3 votes by import:trl into {pg_url} (2 transactions)" in r.stdout
    assert f"{src}:3: chosen and rejected are the same answer" in r.stderr

    r = cli("info", "--data", pg_url)
    assert r.returncode == 0, r.stderr
    assert "backend    PostgreSQL" in r.stdout and "votes      3 standing" in r.stdout
    assert "annotator  import:trl: 3" in r.stdout

    out = tmp_path / "out" / "prefs.jsonl"
    r = cli("export", "--data", pg_url, "--out", out, "--margin")
    assert r.returncode == 0, r.stderr
    assert f"wrote     3 preference rows to {out}" in r.stdout
    got = sorted(
        (x["prompt"], x["chosen"], x["rejected"], x["margin"])
        for x in map(json.loads, out.read_text().splitlines())
    )
    assert got == [
        ("p1", "good", "bad", 2.0),
        ("p2", "yes", "no", 0.0),
        ("p4", "short", "long and wrong", 1.0),
    ]

    # The same file through a directory store exports the same rows.
    assert cli("import", src, "--data", tmp_path / "dir", "--source", "trl").returncode == 0
    r = cli("export", "--data", tmp_path / "dir", "--out", tmp_path / "dir.jsonl", "--margin")
    assert r.returncode == 0, r.stderr
    assert sorted(
        map(json.loads, (tmp_path / "dir.jsonl").read_text().splitlines()), key=json.dumps
    ) == sorted(map(json.loads, out.read_text().splitlines()), key=json.dumps)


def test_records_export_from_postgres_equals_the_directory_one(both, tmp_path):
    url, directory = both
    tables = {}
    for name, target in (("pg", url), ("dir", directory)):
        out = tmp_path / f"{name}.parquet"
        r = cli("export", "--data", target, "--out", out, "--format", "records")
        assert r.returncode == 0, r.stderr
        assert f"wrote     29 records ({len(SCHEMA)} fields each) to {out}" in r.stdout  # 21 since v2
        tables[name] = pq.read_table(out)
        assert tables[name].schema.equals(SCHEMA), tables[name].schema  # exactly the record's fields
    assert sorted_by_event(tables["pg"]).equals(sorted_by_event(tables["dir"]))
    # Every standing vote, ties and both-bad too; the retracted vote and the retract not.
    records = tables["dir"]
    assert str(uuid.UUID(int=1)) not in records["event_id"].to_pylist()
    assert set(records["kind"].to_pylist()) == {"vote"}
    assert {"tie", "both_bad"} <= set(records["choice"].to_pylist())
    assert sorted_by_event(records).equals(sorted_by_event(read_comparisons(directory)))
    assert records["created_at"].to_pylist() == sorted(records["created_at"].to_pylist())  # oldest first

    # JSON Lines: the same records, created_at as ISO 8601 UTC.
    lines = {}
    for name, target in (("pg", url), ("dir", directory)):
        out = tmp_path / f"{name}.jsonl"
        assert cli("export", "--data", target, "--out", out, "--format", "records").returncode == 0
        lines[name] = out.read_text().splitlines()
    assert sorted(lines["pg"]) == sorted(lines["dir"]) and len(lines["pg"]) == 29
    first = json.loads(lines["dir"][0])
    assert list(first) == SCHEMA.names
    assert first["created_at"] == "2025-03-01T12:00:01.000017Z" and first["event_id"] == str(uuid.UUID(int=2))

    # The preference options do not apply to records; said before anything is read.
    r = cli("export", "--data", url, "--out", tmp_path / "x.parquet", "--format", "records", "--margin")
    assert r.returncode == 2 and "--margin does not apply" in r.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_records_format_is_in_the_help():
    r = cli("export", "--help")
    assert r.returncode == 0 and "records" in r.stdout and "postgresql://" in r.stdout


# --------------------------------------------------------------------------------------
# leaderboard, Review, train-reward, the launcher, train-policy's prompts
# --------------------------------------------------------------------------------------


def test_leaderboard_json_on_postgres_matches_the_directory(both, tmp_path):
    url, directory = both
    boards = []
    for target in (url, directory):
        r = cli("leaderboard", "--data", target, "--json", "--rounds", 20)
        assert r.returncode == 0, r.stderr
        board = json.loads(r.stdout)
        board.pop("timings_s")
        boards.append(board)
    assert boards[0] == boards[1]
    assert sorted(m["model"] for m in boards[0]["models"]) == sorted(MODELS)
    assert boards[0]["votes"] == 29
    # style control reads the answers too: the same from either backend
    styled = []
    for target in (url, directory):
        r = cli("leaderboard", "--data", target, "--json", "--rounds", 20, "--style-control")
        assert r.returncode == 0, r.stderr
        board = json.loads(r.stdout)["style_control"]
        board.pop("timings_s")
        styled.append(board)
    assert styled[0] == styled[1] and styled[0]["votes"] == 29

    view = page(url, tmp_path / "runs", rounds=10)  # the Leaderboard tab, on the database
    assert view["ok"] and view["models"] == sorted(MODELS) and "alpha" in view["table"]


def test_reviewer_reads_the_votes_of_a_database(both, tmp_path):
    url, directory = both
    from_pg = Reviewer(url, tmp_path / "runs").read_votes()
    from_dir = Reviewer(directory, tmp_path / "runs").read_votes()
    assert len(from_pg) == 29
    assert sorted(from_pg, key=lambda v: v["event_id"]) == sorted(from_dir, key=lambda v: v["event_id"])
    assert Reviewer(tmp_path / "no-store-yet", tmp_path / "runs").read_votes() == []


def test_train_reward_on_a_postgres_store(both, tmp_path):
    url, directory = both
    key = lambda p: (json.dumps(p[0]), p[1], p[2], p[3])  # noqa: E731
    pg_pairs, dir_pairs = (read_pairs(t, ties="include") for t in (url, directory))
    assert sorted(
        map(key, zip(pg_pairs.prompts, pg_pairs.chosen, pg_pairs.rejected, pg_pairs.label))
    ) == sorted(map(key, zip(dir_pairs.prompts, dir_pairs.chosen, dir_pairs.rejected, dir_pairs.label)))

    run_dir = tmp_path / "runs" / "rm-pg"
    code = preflab.main(
        [
            "train-reward",
            "--data",
            url,
            "--model",
            "tiny",
            "--run-dir",
            str(run_dir),
            "--max-length",
            "64",
            "--batch-size",
            "4",
            "--max-steps",
            "2",
            "--lr",
            "1e-3",
            "--device",
            TRAIN_DEVICE,
            "--no-progress",
        ]
    )
    assert code == 0
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    data = json.loads((run_dir / "config.json").read_text())["data"]
    assert data["source"] == url and data["kind"] == "store" and data["votes"] == 29
    assert (run_dir / "checkpoint" / "config.json").is_file()


def test_launcher_passes_the_url_to_the_trainer_unchanged(pg_url, tmp_path):
    launcher = Launcher(tmp_path / "runs")
    fill(pg_url)
    info = launcher.start_reward(
        pg_url,
        model="tiny",
        epochs=1,
        batch_size=8,
        max_length=64,
        lr=1e-3,
        extra=["--max-steps", "1", "--device", TRAIN_DEVICE],
    )
    argv = json.loads((info.path / "launch.json").read_text())["argv"]
    assert argv[argv.index("--data") + 1] == pg_url
    final = launcher.wait(info.run_id, timeout=300)
    assert final.state == "done", launcher.log_tail(info.run_id)
    # A directory still becomes an absolute path; a missing one is refused up front.
    with pytest.raises(LaunchError, match="does not exist"):
        launcher.start_reward(tmp_path / "nothing-here", model="tiny")
    # The arena's file lives in the server's local state directory, never "in" a URL.
    assert arena_file(tmp_path / "state") == tmp_path / "state" / "arena.json"
    with pytest.raises(ValueError, match="local state directory"):
        arena_file(pg_url)


def test_policy_prompts_from_a_store_url(both):
    url, directory = both
    prompts = load_prompts(url)
    standing = {e["prompt"] for e in events()[1:30]}  # the first vote is retracted
    assert sorted(map(messages_to_json, prompts)) == sorted(standing) and len(prompts) == 17
    assert sorted(map(json.dumps, prompts)) == sorted(map(json.dumps, load_prompts(directory)))


def test_policy_prompts_from_an_empty_database(pg_url):
    with pytest.raises(PolicyInputError, match="holds no votes"):
        load_prompts(pg_url)


# --------------------------------------------------------------------------------------
# A server that cannot be reached: one line, exit 2
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "export", "leaderboard", "import", "train-reward"])
def test_unreachable_server_is_one_clear_line(command, tmp_path):
    target = f"postgresql://127.0.0.1:{free_port()}/x"
    args = {
        "info": [],
        "export": ["--out", tmp_path / "out.parquet"],
        "leaderboard": [],
        "import": ["--source", "s"],
        "train-reward": ["--model", "tiny", "--run-dir", tmp_path / "run", "--device", "cpu"],
    }[command]
    if command == "import":
        (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "y"}) + "\n")
        args = [tmp_path / "in.jsonl", *args]
    r = cli(command, *args, "--data", target)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {target}: cannot connect: connection refused: is PostgreSQL running on "
        f"127.0.0.1:{target.split(':')[2].split('/')[0]}?"
    ], r.stderr
    if command == "train-reward":
        status = json.loads((tmp_path / "run" / "status.json").read_text())
        assert status["state"] == "failed" and status["message"] == errors[0][len("error: ") :]
    assert not (tmp_path / "out.parquet").exists()


def test_a_password_in_the_url_is_never_printed(pg_url, tmp_path):
    url = with_password(pg_url, "s3cret-pw")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "y"}) + "\n")
    runs = []
    r = cli("import", src, "--data", url, "--source", "s")
    assert r.returncode == 0, r.stderr
    assert describe(url) in r.stdout and ":***@" in r.stdout
    runs.append(r)
    r = cli("info", "--data", url)
    assert r.returncode == 0 and "votes      1 standing" in r.stdout and ":***@" in r.stdout
    runs.append(r)
    closed = with_password(f"postgresql://postgres@127.0.0.1:{free_port()}/x", "s3cret-pw")
    r = cli("leaderboard", "--data", closed)
    assert r.returncode == 2 and "cannot connect" in r.stderr
    runs.append(r)
    assert all("s3cret-pw" not in r.stdout + r.stderr for r in runs)


def test_a_trainer_started_from_the_page_never_writes_the_password(pg_url, tmp_path):
    url = with_password(pg_url, "s3cret-pw")
    fill(pg_url)
    launcher = Launcher(tmp_path / "runs", store=url)
    info = launcher.start_reward(
        url,
        model="tiny",
        epochs=1,
        batch_size=8,
        max_length=64,
        lr=1e-3,
        extra=["--max-steps", "1", "--device", TRAIN_DEVICE],
    )
    final = launcher.wait(info.run_id, timeout=300)
    assert final.state == "done", launcher.log_tail(info.run_id)
    argv = json.loads((info.path / "launch.json").read_text())["argv"]
    assert argv[argv.index("--data") + 1] == pg_url  # the URL, less its password
    leaks = [p for p in info.path.rglob("*") if p.is_file() and b"s3cret-pw" in p.read_bytes()]
    assert not leaks, f"the password is in {leaks}"
