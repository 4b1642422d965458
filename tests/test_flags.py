"""Annotator flags as events (trainer/flags.py, record schema version 2) on both
backends: the record's checks, flag / confirm / clear round trips, stores written at
version 1 still read (a directory's files and a database at migration 1), flags never
counted as votes, the rule and the admin's decisions (annotate/annotator_review.py), and
the exclusion of confirmed annotators from export and reward training."""

from __future__ import annotations

import json

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import preflab, vote_record, write_store

from annotate.accounts import Forbidden
from annotate.annotator_review import AnnotatorReview, ReviewError
from annotate.queue import AssignmentQueue
from annotate.service import Service
from trainer.flags import (
    RULE_AUTHOR,
    confirmed_flags,
    decision_record,
    flag_states,
    read_flag_events,
)
from trainer.reward_data import read_pairs
from trainer.store import (
    SCHEMA,
    SCHEMA_VERSION,
    RecordError,
    open_store,
    read_comparisons,
    read_events,
    validate_record,
)
from trainer.store.record import complete_record

# The record as version 1 wrote it (trainer/store/record.py before version 2), frozen
# here: old part files have exactly this schema.
V1_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int16(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("retracts", pa.string()),
        *(
            pa.field(f, pa.string(), nullable=False)
            for f in (
                "pair_id",
                "prompt_id",
                "prompt",
                "response_a",
                "response_b",
                "model_a",
                "model_b",
                "left",
            )
        ),
        pa.field("choice", pa.string()),
        pa.field("strength", pa.int8()),
        pa.field("rationale", pa.string()),
        pa.field("annotator", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("decision_ms", pa.int32()),
        pa.field("gen_params", pa.string()),
    ]
)


def flag(subject: str = "mallory", **over) -> dict:
    return {
        "kind": "flag",
        "subject": subject,
        "annotator": RULE_AUTHOR,
        "detail": json.dumps({"gold_failed": 3}),
        **over,
    }


def gold_vote(annotator: str, i: int, correct: bool) -> dict:
    """A vote on gold item i (gold says "a")."""
    return vote_record(
        f"gold {i}?",
        f"right {i}",
        f"wrong {i}",
        "a" if correct else "b",
        annotator=annotator,
        gen_params=json.dumps({"selection": {"method": "gold", "gold": "a"}}),
    )


def team_votes() -> list[dict]:
    """ann gets every gold check right, mallory gets all four wrong; both vote on 6 pool pairs."""
    votes = [gold_vote("ann", i, True) for i in range(4)] + [gold_vote("mallory", i, False) for i in range(4)]
    for who in ("ann", "mallory"):
        votes += [vote_record(f"pool {i}?", f"x{i}", f"y{i}", "a", annotator=who) for i in range(6)]
    return votes


# ---- the record ----------------------------------------------------------------------


def test_a_flag_event_is_about_a_person_and_version_1_records_still_validate():
    rec = validate_record(complete_record(flag()))
    assert rec["schema_version"] == SCHEMA_VERSION and rec["pair_id"] is None and rec["subject"] == "mallory"
    with pytest.raises(RecordError, match="field 'subject'"):
        validate_record(complete_record(flag(subject=None)))
    with pytest.raises(RecordError, match="field 'pair_id': must be null on a flag event"):
        validate_record(complete_record(flag(pair_id="pair-1")))
    with pytest.raises(RecordError, match="field 'detail': not valid JSON"):
        validate_record(complete_record(flag(detail="{")))
    with pytest.raises(RecordError, match="field 'kind'.*needs schema version 2"):
        validate_record(complete_record(flag(schema_version=1)))
    old = validate_record({**vote_record(), "schema_version": 1})  # as version 1 wrote it
    assert old["schema_version"] == 1 and old["subject"] is None
    with pytest.raises(RecordError, match="field 'subject'"):
        validate_record({**vote_record(), "subject": "bob"})
    with pytest.raises(RecordError, match="field 'detail': must be a JSON object"):
        validate_record(complete_record(flag(detail="[1]")))
    # A vote carries no detail (its judgments are `criteria`): PostgreSQL would not keep one.
    with pytest.raises(RecordError, match="field 'detail': only a flag event carries one, not a vote"):
        validate_record(complete_record({**vote_record(), "detail": "{}"}))
    with pytest.raises(RecordError, match="field 'pair_id': missing"):
        validate_record(complete_record({**vote_record(), "pair_id": None}))


# ---- round trips on both backends -----------------------------------------------------


def round_trip(target) -> None:
    votes = [vote_record(annotator="mallory"), vote_record("other?", annotator="ann")]
    with open_store(target) as store:
        store.append_many(votes)
        raised = store.append(flag())
        store.append(decision_record("flag_confirm", "mallory", "admin", raised["event_id"], "random clicks"))
        store.append(flag("ann"))
        store.append(decision_record("flag_clear", "ann", "admin", None))
    events = read_flag_events(target)
    assert [e["kind"] for e in events] == ["flag", "flag_confirm", "flag", "flag_clear"]
    states = flag_states(events)
    assert states["mallory"]["state"] == "confirmed" and states["mallory"]["note"] == "random clicks"
    assert states["mallory"]["flag"] == {"gold_failed": 3}
    assert states["ann"]["state"] == "cleared" and states["ann"]["by"] == "admin"
    assert confirmed_flags(events) == {"mallory"}
    standing = read_comparisons(target)
    assert standing.num_rows == 2, "flag events are never votes"
    assert set(standing["kind"].to_pylist()) == {"vote"}
    assert read_events(target).num_rows == 6
    assert read_events(target).schema.equals(SCHEMA, check_metadata=False)


def test_flag_confirm_clear_round_trip_on_a_directory(tmp_path):
    round_trip(tmp_path / "store")
    from trainer.store.compaction import compact

    compact(tmp_path / "store")  # part files merged: the flags are still there, still not votes
    assert confirmed_flags(read_flag_events(tmp_path / "store")) == {"mallory"}
    assert read_comparisons(tmp_path / "store").num_rows == 2


def test_flag_confirm_clear_round_trip_on_postgresql_and_sync_ignores_them(pg_url):
    from trainer.store.postgres import PostgresStore

    round_trip(pg_url)
    with PostgresStore(pg_url) as store:
        queue = AssignmentQueue(shared=store)
        votes, cursor = store.snapshot()
        queue.restore(votes, cursor=cursor)
        store.append(flag("carol"))  # a flag from another server, seen by sync
        assert queue.sync() == 1
        assert queue.overview()["pairs"] == 0 and "carol" not in queue._people


def test_preflab_copy_moves_flag_events_between_backends_exactly(tmp_path, pg_url):
    from trainer.store.copy import copy_store

    round_trip(tmp_path / "store")
    assert copy_store(str(tmp_path / "store"), pg_url)["copied"] == 6
    assert copy_store(pg_url, str(tmp_path / "back"))["copied"] == 6
    for target in (pg_url, tmp_path / "back"):
        assert read_flag_events(target) == read_flag_events(tmp_path / "store")
        assert read_comparisons(target).num_rows == 2


def test_a_version_1_directory_store_reads_and_takes_flags(tmp_path):
    store = tmp_path / "old"
    (store / "parts").mkdir(parents=True)
    (store / "tail").mkdir()

    def v1(record: dict) -> dict:  # what version 1 wrote: its fields only
        return {f: record[f] for f in V1_SCHEMA.names} | {"schema_version": 1}

    rows = [v1(vote_record(f"q{i}?", annotator="mallory")) for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows, schema=V1_SCHEMA), store / "parts" / "old-writer.1.parquet")
    tail = v1(vote_record("tail?", annotator="ann"))
    # A dead version-1 writer's tail segment (no lock held): what recovery finds.
    (store / "tail" / "old-writer.2.jsonl").write_text(json.dumps(tail) + "\n")
    votes = read_comparisons(store)
    assert votes.num_rows == 4 and set(votes["schema_version"].to_pylist()) == {1}
    assert votes["subject"].null_count == 4
    with open_store(store) as writer:
        writer.append(flag())
        writer.append(decision_record("flag_confirm", "mallory", "admin", None))
    assert confirmed_flags(read_flag_events(store)) == {"mallory"}
    assert read_comparisons(store).num_rows == 4


def test_a_database_at_migration_1_is_migrated_and_its_votes_read(pg_url):
    from trainer.store.postgres import PostgresStore
    from trainer.store.postgres_schema import LATEST, MIGRATIONS

    with psycopg.connect(pg_url, autocommit=True) as conn:  # a database version 1 set up
        conn.execute(
            "CREATE TABLE preflab_schema_version (version integer PRIMARY KEY, applied_at timestamptz)"
        )
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO preflab_schema_version (version) VALUES (1)")
        v = vote_record(annotator="mallory")
        conn.execute(
            "INSERT INTO events (schema_version, event_id, kind, pair_id, prompt_id, prompt, response_a,"
            ' response_b, model_a, model_b, "left", choice, annotator, created_at)'
            " VALUES (1, 'old-1', 'vote', %s, %s, %s, %s, %s, 'm1', 'm2', 'a', 'a', 'mallory', now())",
            (v["pair_id"], v["prompt_id"], v["prompt"], v["response_a"], v["response_b"]),
        )
    with PostgresStore(pg_url) as store:  # migrates to the latest version under the lock
        store.append(flag())
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM preflab_schema_version ORDER BY version")]
    assert versions == list(range(1, LATEST + 1)) and LATEST >= 2
    votes = read_comparisons(pg_url).to_pylist()
    assert [(v["event_id"], v["schema_version"], v["subject"]) for v in votes] == [("old-1", 1, None)]
    assert flag_states(read_flag_events(pg_url))["mallory"]["state"] == "flagged"


# ---- the rule and the admin's decisions ---------------------------------------------------


def test_the_rule_flags_once_an_admin_confirms_or_clears_and_new_evidence_flags_again(tmp_path):
    data = tmp_path / "store"
    write_store(data, team_votes())
    with open_store(data) as store:
        service = Service(store, AssignmentQueue(), data=data, local_user="boss")
        review = AnnotatorReview(store, service, min_failed_gold=2, flag_below=0.6)
        view = review.table("boss")
        rows = {r["annotator"]: r for r in view["rows"]}
        assert rows["mallory"]["flag_state"] == "flagged" and rows["ann"]["flag_state"] == ""
        assert view["flagged"] == ["mallory"]
        review.table("boss")  # computed again: no second flag
        events = read_flag_events(data)
        assert [(e["kind"], e["subject"], e["annotator"]) for e in events] == [
            ("flag", "mallory", RULE_AUTHOR)
        ]
        detail = json.loads(events[0]["detail"])
        assert (detail["gold_n"], detail["gold_correct"], detail["gold_failed"]) == (4, 0, 4)
        assert detail["flag_below"] == 0.6 and detail["gold_high"] < 0.6

        with pytest.raises(ReviewError, match="ann is not flagged"):
            review.decide("boss", "ann", "confirm")
        with pytest.raises(ReviewError, match="note: not valid text"):
            review.decide("boss", "mallory", "confirm", "bad \x00 note")
        with pytest.raises(Forbidden):
            review.decide("mallory", "mallory", "clear")  # not an admin (nor anyone known)
        view = review.decide("boss", "mallory", "confirm", "clicks at random")
        assert view["confirmed"] == ["mallory"]
        assert confirmed_flags(read_flag_events(data)) == {"mallory"}
        with pytest.raises(ReviewError, match="mallory is confirmed"):
            review.decide("boss", "mallory", "confirm")
        view = review.decide("boss", "mallory", "clear", "talked to her")
        assert {r["annotator"]: r["flag_state"] for r in view["rows"]}["mallory"] == "cleared"
        review.table("boss")  # cleared on this evidence: not flagged again
        assert len(read_flag_events(data)) == 3
        store.append(gold_vote("mallory", 9, False))  # a fifth failed check: new evidence
        assert review.table("boss")["flagged"] == ["mallory"]
    kinds = [e["kind"] for e in read_flag_events(data)]
    assert kinds == ["flag", "flag_confirm", "flag_clear", "flag"]
    assert read_comparisons(data).num_rows == len(team_votes()) + 1, "no flag event became a vote"


# ---- downstream: export and reward training ------------------------------------------------


def confirmed_store(target) -> None:
    write_store(target, team_votes())
    with open_store(target) as store:
        raised = store.append(flag())
        store.append(decision_record("flag_confirm", "mallory", "boss", raised["event_id"]))


@pytest.mark.parametrize("backend", ["directory", "postgresql"])
def test_export_and_reward_data_leave_out_confirmed_annotators_by_default(tmp_path, backend, request):
    target = str(tmp_path / "store") if backend == "directory" else request.getfixturevalue("pg_url")
    confirmed_store(target)
    out = tmp_path / "records.jsonl"
    result = preflab("export", "--data", target, "--out", str(out), "--format", "records")
    assert result.returncode == 0, result.stderr
    assert (
        "flagged   10 votes of 1 confirmed-flagged annotator left out (mallory); "
        "--include-flagged keeps them" in result.stdout
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and {r["annotator"] for r in rows} == {"ann"}
    result = preflab(
        "export", "--data", target, "--out", str(out), "--format", "records", "--include-flagged"
    )
    assert result.returncode == 0, result.stderr
    assert len(out.read_text().splitlines()) == 20
    assert "10 votes of 1 confirmed-flagged annotator included (mallory; --include-flagged)" in result.stdout

    pairs = read_pairs(target)
    assert len(pairs) == 10 and pairs.summary["excluded_flagged"] == {"annotators": ["mallory"], "votes": 10}
    assert len(read_pairs(target, exclude_flagged=False)) == 20


def test_train_reward_has_the_include_flagged_switch_and_the_config_default_excludes():
    from trainer.reward_config import RewardConfig

    assert RewardConfig().exclude_flagged is True
    result = preflab("train-reward", "--help")
    assert "--include-flagged" in result.stdout and "--no-exclude-flagged" not in result.stdout


def test_the_dashboard_export_leaves_out_confirmed_annotators_too(tmp_path):
    data = tmp_path / "store"
    confirmed_store(data)
    with open_store(data) as store:
        service = Service(store, AssignmentQueue(), data=data, local_user="boss")
        files, report = service.export("boss", tmp_path, format="standard")
        assert pq.read_table(files[0]).num_rows == 10
        assert "10 votes of 1 confirmed-flagged annotator left out (mallory)" in report
        files, report = service.export("boss", tmp_path, format="standard", include_flagged=True)
        assert pq.read_table(files[0]).num_rows == 20
        assert "10 votes of 1 confirmed-flagged annotator included (mallory" in report
