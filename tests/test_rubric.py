"""Rubrics (annotate/rubric.py): the file and its checks, the record's `criteria` field on
both stores (and version-1 / version-2-without-it records beside it), the service's
required criteria, the API, `export --criterion` and the Dashboard's per-criterion
agreement. Real stores (a directory, PostgreSQL from conftest), a real server."""

import json

import pyarrow.parquet as pq
import pytest
from helpers import preflab, vote_record, write_pairs, write_store

from annotate.pairs import load_pairs
from annotate.queue import AssignmentQueue
from annotate.rubric import Rubric, RubricError, load_rubric
from annotate.service import BadRequest, Service
from trainer.data import RUBRIC as SHIPPED_RUBRIC
from trainer.store import open_store, read_comparisons
from trainer.store.record import RecordError, complete_record, validate_record

RUBRIC = """
[[criteria]]
name = "helpful"
label = "More helpful"
kind = "pairwise"
required = true
help = "Which answer does more of what was asked?"

[[criteria]]
name = "honest"
label = "More honest"
kind = "pairwise"

[[criteria]]
name = "clarity"
label = "Clarity"
kind = "scale"
required = true

[[flags]]
name = "unsafe"
label = "Unsafe"

[[flags]]
name = "off_topic"
label = "Off-topic"
"""


def rubric_file(tmp_path, text=RUBRIC, name="rubric.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- the file ----------------------------------------------------------------------------


def test_a_rubric_file_loads_with_its_criteria_and_flags(tmp_path):
    rubric = load_rubric(rubric_file(tmp_path))
    assert [(c.name, c.kind, c.required) for c in rubric.criteria] == [
        ("helpful", "pairwise", True),
        ("honest", "pairwise", False),
        ("clarity", "scale", True),
    ]
    assert [f.name for f in rubric.flags] == ["unsafe", "off_topic"]
    assert rubric.criteria[0].help == "Which answer does more of what was asked?"


def test_the_shipped_example_rubric_loads():

    rubric = load_rubric(SHIPPED_RUBRIC)
    assert [c.name for c in rubric.criteria] == ["helpful", "harmless", "honest", "clarity"]
    assert [f.name for f in rubric.flags] == ["unsafe", "factually_wrong", "off_topic"]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '[[criteria]]\nname="a"\nlabel="A"\nkind="pairwise"\n[[criteria]]\nname="b"\nlabel="B"\nkind="pairwise"\n'
            '[[criteria]]\nname="c"\nlabel="C"\nkind="stars"\n',
            "rubric.toml: criteria[2].kind: must be 'pairwise' or 'scale'",
        ),
        (
            '[[criteria]]\nname="Bad Name"\nlabel="x"\nkind="scale"\n',
            "rubric.toml: criteria[0].name: must match",
        ),
        ('[[criteria]]\nname="flags"\nlabel="x"\nkind="scale"\n', "criteria[0].name: 'flags' is reserved"),
        ('[[criteria]]\nname="x"\nlabel="<b>x</b>"\nkind="scale"\n', "criteria[0].label: the character '<'"),
        (
            '[[criteria]]\nname="x"\nlabel="' + "y" * 61 + '"\nkind="scale"\n',
            "criteria[0].label: 61 characters",
        ),
        ('[[criteria]]\nname="x"\nkind="scale"\n', "criteria[0].label: must be a string"),
        (
            '[[criteria]]\nname="x"\nlabel="X"\nkind="scale"\nrequired="yes"\n',
            "criteria[0].required: must be",
        ),
        ('[[criteria]]\nname="x"\nlabel="X"\nkind="scale"\nweight=2\n', "criteria[0].weight: unknown key"),
        (
            '[[flags]]\nname="u"\nlabel="U"\n[[flags]]\nname="u"\nlabel="V"\n',
            "flags[1].name: 'u' appears twice",
        ),
        ('[[flags]]\nname="u"\nlabel="U"\nhelp="a\\u0007b"\n', "flags[0].help: the character"),
        ("title = 'x'\n", "rubric.toml: title: unknown key"),
        ("[[criteria]\n", "rubric.toml: not valid TOML"),
        ("", "nothing to judge"),
    ],
)
def test_a_bad_rubric_file_is_refused_naming_the_file_and_the_entry(tmp_path, text, message):
    with pytest.raises(RubricError) as e:
        load_rubric(rubric_file(tmp_path, text))
    assert message in str(e.value)


def test_serve_refuses_a_bad_rubric_before_it_starts(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    bad = rubric_file(tmp_path, '[[criteria]]\nname="x"\nlabel="X"\nkind="stars"\n')
    result = preflab("serve", "--pairs", pairs, "--data", tmp_path / "store", "--rubric", bad, "--port", "1")
    assert result.returncode == 2
    assert "rubric.toml: criteria[0].kind: must be 'pairwise' or 'scale'" in result.stderr
    assert not (tmp_path / "store").exists()


# ---- the record ------------------------------------------------------------------------


def test_the_record_checks_the_shape_of_criteria():
    good = {"helpful": "b", "clarity": {"a": 2, "b": 5}, "flags": {"a": ["unsafe"]}}
    assert json.loads(vote_record(criteria=json.dumps(good))["criteria"]) == good
    for bad, reason in [
        ('{"helpful": "left"}', "helpful: must be 'a', 'b' or 'tie'"),
        ('{"clarity": {"a": 6}}', "clarity.a: a scale judgment is an integer 1-5"),
        ('{"clarity": {"a": true}}', "clarity.a"),
        ('{"clarity": {"left": 3}}', "clarity: must be"),
        ('{"Bad": "a"}', "is not a criterion name"),
        ('{"flags": {"a": ["unsafe", "unsafe"]}}', "distinct flag names"),
        ('{"flags": {"c": []}}', "flags: must be an object"),
        ("{}", "non-empty JSON object"),
        ("[1]", "non-empty JSON object"),
        ("{", "not valid JSON"),
    ]:
        with pytest.raises(RecordError, match="criteria") as e:
            vote_record(criteria=bad)
        assert reason in str(e.value), bad


def test_criteria_belong_to_version_2_votes_only():
    with pytest.raises(RecordError, match="version 2 field"):
        vote_record(schema_version=1, criteria='{"helpful": "a"}')
    vote = vote_record(criteria='{"helpful": "a"}')
    retract = complete_record(
        {**{k: vote[k] for k in vote if k not in ("event_id", "created_at")}, "kind": "retract"}
    )
    retract.update(retracts=vote["event_id"], choice=None, strength=None)
    with pytest.raises(RecordError, match="criteria.*must be null on a retract"):
        validate_record(retract)
    flag = complete_record(
        {"kind": "flag", "subject": "bob", "annotator": "rule:gold", "criteria": '{"helpful": "a"}'}
    )
    with pytest.raises(RecordError, match="criteria"):
        validate_record(flag)


@pytest.fixture(params=["directory", "postgres"])
def target(request, tmp_path):
    if request.param == "directory":
        return str(tmp_path / "store")
    return request.getfixturevalue("pg_url")


def test_criteria_round_trip_beside_version_1_and_2_votes_without_them(target):
    judged = '{"clarity":{"a":4,"b":1},"flags":{"b":["unsafe"]},"helpful":"a"}'
    records = [
        vote_record(schema_version=1, annotator="old"),
        vote_record(annotator="plain"),
        vote_record(annotator="judge", criteria=judged),
    ]
    write_store(target, records)
    by_who = {r["annotator"]: r for r in read_comparisons(target).to_pylist()}
    assert by_who["judge"]["criteria"] == judged
    assert by_who["old"]["criteria"] is None and by_who["old"]["schema_version"] == 1
    assert by_who["plain"]["criteria"] is None
    assert read_comparisons(target, columns=["criteria"]).column("criteria").null_count == 2


def test_a_directory_part_file_without_the_criteria_column_still_reads(tmp_path):
    """A store written before `criteria` existed: its Parquet parts lack the column."""
    store = tmp_path / "store"
    write_store(store, [vote_record(annotator="before")])
    (part,) = (store / "parts").glob("*.parquet")
    old = pq.read_table(part)
    pq.write_table(old.drop_columns(["criteria"]), part)
    assert "criteria" not in pq.read_schema(part).names
    write_store(store, [vote_record(annotator="after", criteria='{"helpful": "tie"}')])
    by_who = {r["annotator"]: r["criteria"] for r in read_comparisons(store).to_pylist()}
    assert by_who == {"before": None, "after": '{"helpful": "tie"}'}


# ---- the service ---------------------------------------------------------------------


def rubric_service(store, data, tmp_path, shared=False):
    pairs, _ = load_pairs(write_pairs(tmp_path / "pairs.jsonl", 4))
    queue = AssignmentQueue(seed=3, shared=store if shared else None)
    queue.add(pairs)
    return Service(store, queue, data=data, local_user="me", rubric=load_rubric(rubric_file(tmp_path)))


def test_a_vote_keeps_its_judgments_in_canonical_terms_and_required_ones_are_enforced(target, tmp_path):
    with open_store(target) as store:
        service = rubric_service(store, target, tmp_path, shared=target.startswith("postgresql"))
        pair = service.next("me")["pair"]
        with pytest.raises(BadRequest, match="More helpful is required"):
            service.vote("me", pair["pair_id"], "left", criteria={"clarity": {"left": 3, "right": 2}})
        with pytest.raises(BadRequest, match="Clarity is required: score both answers"):
            service.vote("me", pair["pair_id"], "left", criteria={"helpful": "left", "clarity": {"left": 3}})
        with pytest.raises(BadRequest, match="no criterion 'kindness'"):
            service.vote("me", pair["pair_id"], "left", criteria={"kindness": "left"})
        with pytest.raises(BadRequest, match="flags.right: each must be one of"):
            service.vote(
                "me",
                pair["pair_id"],
                "left",
                criteria={
                    "helpful": "left",
                    "clarity": {"left": 3, "right": 2},
                    "flags": {"right": ["rude"]},
                },
            )
        assert read_comparisons(target).num_rows == 0  # nothing stored by a refusal
        shown = {
            "helpful": "right",
            "honest": "tie",
            "clarity": {"left": 5, "right": 2},
            "flags": {"left": ["unsafe"]},
        }
        view = service.vote("me", pair["pair_id"], "left", criteria=shown)
        assert view["ok"], view["message"]
        (stored,) = read_comparisons(target).to_pylist()
        left, right = stored["left"], "b" if stored["left"] == "a" else "a"
        assert stored[f"response_{left}"] == pair["left"]
        assert json.loads(stored["criteria"]) == {
            "helpful": right,
            "honest": "tie",
            "clarity": {left: 5, right: 2},
            "flags": {left: ["unsafe"]},
        }
        undone = service.undo("me")["undone"]
        assert undone["criteria"] == shown  # back in the terms of the screen


def test_a_server_without_a_rubric_refuses_criteria(tmp_path):
    pairs, _ = load_pairs(write_pairs(tmp_path / "pairs.jsonl", 2))
    queue = AssignmentQueue(seed=1)
    queue.add(pairs)
    data = tmp_path / "store"
    with open_store(data) as store:
        service = Service(store, queue, data=data, local_user="me")
        pair_id = service.next("me")["pair"]["pair_id"]
        with pytest.raises(BadRequest, match="no rubric"):
            service.vote("me", pair_id, "left", criteria={"helpful": "left"})
        assert service.vote("me", pair_id, "left")["ok"]
    assert read_comparisons(data).column("criteria").to_pylist() == [None]


def test_shown_and_canonical_terms_are_inverse():
    rubric = Rubric(criteria=(), flags=())
    for left in ("a", "b"):
        shown = {"h": "left", "s": {"left": 1, "right": 5}, "t": "tie"}
        assert Rubric.to_shown(rubric.to_record(shown, left), left) == shown


def test_a_database_at_migration_2_gets_criteria_and_preflab_vote_stores_them(pg_url, tmp_path):
    import psycopg

    from trainer.store.postgres_schema import LATEST, MIGRATIONS

    with psycopg.connect(pg_url, autocommit=True) as conn:  # a database as version 2 left it
        conn.execute(
            "CREATE TABLE preflab_schema_version (version integer PRIMARY KEY, applied_at timestamptz)"
        )
        for version in (1, 2):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO preflab_schema_version (version) VALUES (%s)", (version,))
        assert "criteria" not in [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name='events'"
            )
        ]
    with open_store(pg_url) as store:  # migrates under the advisory lock
        service = rubric_service(store, pg_url, tmp_path, shared=True)
        pair_id = service.next("me")["pair"]["pair_id"]
        judged = {"helpful": "left", "clarity": {"left": 1, "right": 4}}
        assert service.vote("me", pair_id, "tie", criteria=judged)["ok"]
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM preflab_schema_version ORDER BY version")]
    assert versions == list(range(1, LATEST + 1)) and LATEST >= 3
    (stored,) = read_comparisons(pg_url).to_pylist()
    left, right = stored["left"], "b" if stored["left"] == "a" else "a"
    assert json.loads(stored["criteria"]) == {"helpful": left, "clarity": {left: 1, right: 4}}


# ---- export --criterion ------------------------------------------------------------------


def criterion_votes():
    """Three votes whose overall choice and `helpful` judgment differ, a tie on helpful,
    one vote without criteria, one with only a scale."""
    return [
        vote_record("Q1?", "one", "uno", choice="a", strength=2, criteria='{"helpful": "b"}', annotator="x"),
        vote_record(
            "Q2?", "two", "dos", choice="b", criteria='{"helpful": "a", "honest": "b"}', annotator="x"
        ),
        vote_record("Q3?", "three", "tres", choice="a", criteria='{"helpful": "tie"}', annotator="x"),
        vote_record("Q4?", "four", "cuatro", choice="a", annotator="x"),
        vote_record(
            "Q5?", "five", "cinco", choice="a", criteria='{"clarity": {"a": 3, "b": 4}}', annotator="x"
        ),
    ]


def load_dataset_file(path):
    from datasets import load_dataset

    kind = "parquet" if str(path).endswith(".parquet") else "json"
    return load_dataset(kind, data_files=str(path), split="train", cache_dir=str(path.parent / "hf-cache"))


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_export_criterion_is_a_preference_dataset_by_that_criterion(target, tmp_path, ext):
    write_store(target, criterion_votes())
    out = tmp_path / f"helpful.{ext}"
    result = preflab("export", "--data", target, "--out", out, "--criterion", "helpful", "--ties", "separate")
    assert result.returncode == 0, result.stderr
    assert "criterion helpful: judged in 3 of 5 votes" in result.stdout
    rows = load_dataset_file(out).to_list()
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in rows) == [
        ("Q1?", "uno", "one"),  # the overall vote said "one"; helpfulness says "uno"
        ("Q2?", "two", "dos"),
    ]
    (tie,) = load_dataset_file(tmp_path / f"helpful.ties.{ext}").to_list()
    assert (tie["prompt"], tie["label"]) == ("Q3?", "tie")

    honest = tmp_path / f"honest.{ext}"
    assert preflab("export", "--data", target, "--out", honest, "--criterion", "honest").returncode == 0
    assert [(r["chosen"], r["rejected"]) for r in load_dataset_file(honest).to_list()] == [("dos", "two")]


def test_export_criterion_refuses_what_cannot_be_a_preference(tmp_path):
    store = tmp_path / "store"
    write_store(store, criterion_votes())
    out = tmp_path / "x.parquet"
    for args, message in [
        (["--criterion", "clarity"], "a scale criterion"),
        (["--criterion", "kindness"], "no standing vote judged it"),
        (["--criterion", "Bad Name"], "is not a criterion name"),
        (["--criterion", "helpful", "--margin"], "--margin comes from the overall vote"),
        (["--criterion", "helpful", "--format", "records"], "--criterion does not apply"),
    ]:
        result = preflab("export", "--data", store, "--out", out, *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert not out.exists()


# ---- the Dashboard's per-criterion agreement -----------------------------------------------


def test_the_dashboard_gives_agreement_per_criterion(target, tmp_path):
    records = []
    for i, (helpful, clarity) in enumerate([("a", (5, 1)), ("b", (2, 4)), ("a", (4, 3)), ("b", (1, 2))]):
        for who in ("ann", "ben"):
            judged = {"helpful": helpful, "clarity": {"a": clarity[0], "b": clarity[1]}}
            # honest: ann and ben never agree
            judged["honest"] = {"ann": "a", "ben": "b"}[who] if i % 2 else {"ann": "b", "ben": "tie"}[who]
            if who == "ben" and i == 3:
                judged["clarity"] = {"a": 2}  # one score: no implied preference, left out
            records.append(
                vote_record(f"Q{i}?", f"x{i}", f"y{i}", annotator=who, criteria=json.dumps(judged))
            )
    records.append(vote_record("Q9?", "p", "q", annotator="ann"))  # no judgments at all
    write_store(target, records)
    with open_store(target) as store:
        service = Service(
            store, AssignmentQueue(), data=target, local_user="me", rubric=load_rubric(rubric_file(tmp_path))
        )
        rows = {r["criterion"]: r for r in service.dashboard("me")["tables"]["criteria"]}
    assert list(rows) == ["helpful", "honest", "clarity"]  # the rubric's order
    assert rows["helpful"] == {
        "criterion": "helpful",
        "kind": "pairwise",
        "judged": 8,
        "shared_pairs": 4,
        "agreement": 1.0,
        "mean_kappa": 1.0,
        "alpha": 1.0,
    }
    assert rows["honest"]["agreement"] == 0.0 and rows["honest"]["alpha"] < 0
    assert rows["clarity"]["kind"] == "scale" and rows["clarity"]["judged"] == 7
    assert rows["clarity"]["shared_pairs"] == 3 and rows["clarity"]["agreement"] == 1.0
