"""Record schema version 3: a chat vote's two conversations. Validation naming the field,
versions 1 and 2 still valid and read unchanged (an old Parquet part, a database at
migration 4), a version-3 record round-tripping on both backends, and `side_contexts`."""

from __future__ import annotations

import json

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import chat_vote_record, retraction, vote_record, write_store

from trainer.store import open_store, read_comparisons, read_events, side_contexts
from trainer.store.record import SCHEMA, RecordError, complete_record, messages_to_json, validate_record

TURNS = [("Name a colour.", "Red.", "Blue."), ("Another one?", "Green.", "Yellow.")]


def chat(**fields):
    return chat_vote_record(TURNS, "b", 2, system="Be brief.", **fields)


def with_fields(record, **fields):
    """`record` with fields changed, re-checked from scratch (as a writer would)."""
    return validate_record(complete_record({**record, **fields}))


# ---- validation ------------------------------------------------------------------------


def test_a_chat_vote_keeps_each_sides_own_history():
    v = chat()
    a, b = json.loads(v["conversation_a"]), json.loads(v["conversation_b"])
    assert v["schema_version"] == 3 and v["response_a"] == "Green." and v["response_b"] == "Yellow."
    assert json.loads(v["prompt"]) == a[:2] == b[:2]  # the system message and first user turn
    assert a[2] == {"role": "assistant", "content": "Red."} and b[2] == {
        "role": "assistant",
        "content": "Blue.",
    }
    assert a[3] == b[3] == {"role": "user", "content": "Another one?"}
    assert side_contexts(v) == (a[:-1], b[:-1])


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"conversation_b": None}, "field 'conversation_b': missing: a chat vote carries both"),
        ({"conversation_a": None}, "field 'conversation_a': missing"),
        ({"conversation_a": "[{"}, "field 'conversation_a': not valid JSON"),
        ({"conversation_b": "{}"}, "field 'conversation_b': must be a non-empty JSON list"),
        ({"conversation_a": '[{"role": "user"}]'}, "field 'conversation_a': message 0 needs string"),
        ({"conversation_a": 7}, "field 'conversation_a': must be a string or null"),
        ({"schema_version": 2}, "field 'conversation_a': is a schema version 3 field; a version-2 record"),
        ({"schema_version": 1}, "field 'conversation_a': is a schema version 3 field; a version-1 record"),
        ({"response_a": "Purple."}, "field 'conversation_a': must end with the assistant message voted on"),
        ({"response_b": ""}, "field 'conversation_b': must end with the assistant message"),
    ],
)
def test_bad_conversations_are_refused_naming_the_field(fields, needle):
    with pytest.raises(RecordError, match=needle):
        with_fields(chat(), **fields)


def test_a_conversation_must_open_with_the_prompt_and_end_with_an_assistant_turn():
    v = chat()
    other = messages_to_json(
        [{"role": "user", "content": "Something else"}, {"role": "assistant", "content": "Green."}]
    )
    with pytest.raises(RecordError, match="field 'conversation_a': must start with the messages in 'prompt'"):
        with_fields(v, conversation_a=other)
    just_prompt = messages_to_json(json.loads(v["prompt"]))
    with pytest.raises(RecordError, match="field 'conversation_b': must start with"):
        with_fields(v, conversation_b=just_prompt)
    ends_with_user = messages_to_json(
        [*json.loads(v["conversation_a"]), {"role": "user", "content": "Green."}]
    )
    with pytest.raises(RecordError, match="field 'conversation_a': must end with the assistant message"):
        with_fields(v, conversation_a=ends_with_user)


def test_versions_1_and_2_stay_valid_and_carry_no_conversation():
    for version in (1, 2):
        old = with_fields(vote_record(), schema_version=version)
        assert old["schema_version"] == version and old["conversation_a"] is None
        assert side_contexts(old) == ([{"role": "user", "content": "Which answer is better?"}],) * 2
    with pytest.raises(RecordError, match="field 'conversation_a': must be null on a flag event"):
        validate_record(
            complete_record(
                {
                    "kind": "flag",
                    "subject": "mallory",
                    "annotator": "rule:gold",
                    "conversation_a": chat()["conversation_a"],
                }
            )
        )


def test_a_retract_of_a_chat_vote_carries_its_conversations():
    v = chat()
    undo = retraction(v)
    assert (undo["conversation_a"], undo["conversation_b"]) == (v["conversation_a"], v["conversation_b"])


# ---- the directory backend -------------------------------------------------------------


def test_a_chat_vote_round_trips_in_a_directory_from_the_tail_and_from_parts(tmp_path):
    votes = [chat(), vote_record()]
    write_store(tmp_path / "s", votes)  # closing the writer flushes the tail into a part
    with open_store(tmp_path / "t", flush_every=1000) as store:  # still in the tail when read
        store.append_many(votes)
        tail = read_comparisons(tmp_path / "t")
    for table in (read_comparisons(tmp_path / "s"), tail):
        by_id = {r["event_id"]: r for r in table.to_pylist()}
        for v in votes:
            got = by_id[v["event_id"]]
            assert (got["conversation_a"], got["conversation_b"]) == (
                v["conversation_a"],
                v["conversation_b"],
            )


def test_an_old_version_2_part_file_reads_unchanged_with_null_conversations(tmp_path):
    """A part file as version 2 wrote it: its schema has no conversation columns."""
    old_schema = pa.schema([f for f in SCHEMA if not f.name.startswith("conversation_")])
    old = with_fields(vote_record(rationale="old"), schema_version=2)
    (tmp_path / "parts").mkdir()
    (tmp_path / "tail").mkdir()
    columns = {f.name: [old[f.name]] for f in old_schema}
    columns["created_at"] = pa.array(columns["created_at"], pa.int64()).cast(
        old_schema.field("created_at").type
    )
    pq.write_table(pa.table(columns, schema=old_schema), tmp_path / "parts" / "w1.000001.parquet")
    write_store(tmp_path, [chat()])  # a newer server appends a chat vote beside it
    rows = {r["rationale"]: r for r in read_comparisons(tmp_path).to_pylist()}
    assert rows["old"]["schema_version"] == 2 and rows["old"]["conversation_a"] is None
    assert rows["old"]["prompt"] == old["prompt"] and rows["old"]["event_id"] == old["event_id"]
    assert rows[None]["conversation_b"] is not None and read_events(tmp_path).schema == SCHEMA


# ---- PostgreSQL --------------------------------------------------------------------------


def test_a_chat_vote_round_trips_in_postgres_by_append_and_by_the_shared_vote(pg_url, tmp_path):
    appended, voted = chat(), chat(annotator="bob")
    with open_store(pg_url) as store:
        store.append(appended)
        store.vote(voted, want=3)  # preflab_vote: the shared assignment's insert
        store.append(retraction(appended))
    events = {r["event_id"]: r for r in read_events(pg_url).to_pylist()}
    for v in (appended, voted):
        assert (events[v["event_id"]]["conversation_a"], events[v["event_id"]]["conversation_b"]) == (
            v["conversation_a"],
            v["conversation_b"],
        )
    (standing,) = read_comparisons(pg_url, ["event_id", "conversation_a"]).to_pylist()
    assert standing == {"event_id": voted["event_id"], "conversation_a": voted["conversation_a"]}
    write_store(tmp_path / "dir", [voted])
    assert read_comparisons(tmp_path / "dir").equals(read_comparisons(pg_url))


def test_a_database_at_migration_4_gets_the_conversation_columns_and_its_votes_read(pg_url):
    from trainer.store.postgres_schema import LATEST, MIGRATIONS

    old = with_fields(vote_record(), schema_version=2)
    with psycopg.connect(pg_url, autocommit=True) as conn:  # a database as migration 4 left it
        conn.execute(
            "CREATE TABLE preflab_schema_version (version integer PRIMARY KEY, applied_at timestamptz)"
        )
        for version in (1, 2, 3, 4):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO preflab_schema_version (version) VALUES (%s)", (version,))
        conn.execute(
            "INSERT INTO events (schema_version, event_id, kind, pair_id, prompt_id, prompt, response_a,"
            ' response_b, model_a, model_b, "left", choice, annotator, created_at)'
            " VALUES (2, %s, 'vote', %s, %s, %s, %s, %s, 'm1', 'm2', 'a', 'a', 'alice', now())",
            (
                old["event_id"],
                old["pair_id"],
                old["prompt_id"],
                old["prompt"],
                old["response_a"],
                old["response_b"],
            ),
        )
    new = chat()
    with open_store(pg_url) as store:  # migrates under the advisory lock
        store.vote(new, want=3)
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM preflab_schema_version ORDER BY version")]
    assert versions == list(range(1, LATEST + 1)) and LATEST >= 5
    rows = {r["event_id"]: r for r in read_comparisons(pg_url).to_pylist()}
    assert rows[old["event_id"]]["conversation_a"] is None and rows[old["event_id"]]["schema_version"] == 2
    assert rows[new["event_id"]]["conversation_b"] == new["conversation_b"]


# ---- downstream: the leaderboard ----------------------------------------------------------


def test_chat_votes_count_on_the_leaderboard_like_any_vote(tmp_path):
    from annotate.leaderboard import standings

    turns = [("Hi.", "Hello!", "Hey."), ("More?", "Yes.", "No.")]
    votes = [chat_vote_record(turns, "a", model_a="alpha", model_b="beta") for _ in range(3)]
    votes += [chat_vote_record(turns[:1], "tie", model_a="alpha", model_b="beta")]
    votes += [vote_record("Q?", "x", "y", "b", model_a="beta", model_b="gamma")]
    got = standings(write_store(tmp_path / "s", votes), tmp_path / "runs", rounds=5)
    assert got["ok"], got["message"]
    board = got["board"].to_dict()
    assert (board["votes"], board["battles"]) == (5, 5)
    played = {m["model"]: m["votes"] for m in board["models"]}
    assert played == {"alpha": 4, "beta": 5, "gamma": 1}
    ratings = {m["model"]: m["rating"] for m in board["models"]}
    assert ratings["alpha"] > ratings["beta"]  # three chat wins and a tie
