"""Export (votes -> TRL / datasets preference data) and import (the reverse).

The end of this file trains TRL's RewardTrainer and DPOTrainer for a step or two on
exported files, unchanged, with a tiny random model: the proof that the format is right.
"""

import json
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import preflab as cli
from helpers import vote_record as vote
from helpers import write_jsonl

from annotate.export import export_preferences
from annotate.importers import import_file
from annotate.table_files import ties_path_for, write_table
from trainer.store import messages_to_json, pair_id_for, prompt_id_for, read_comparisons
from trainer.store.directory_writer import DirectoryStore

SKY = [{"role": "user", "content": 'What colour is the sky?\nAnswer in one "word".'}]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "Name a prime."},
]
SUM = [{"role": "user", "content": "2+2?"}]
CHAT_TEXT = (
    "\n\nSystem: Be brief.\n\nHuman: Hi!\n\nAssistant: Hello. How can I help?"
    "\n\nHuman: Name a prime.\n\nAssistant:"
)


@pytest.fixture
def store(tmp_path):
    """Votes of every kind; appended one by one so their order is their created_at."""
    path = tmp_path / "store"
    with DirectoryStore(path) as s:
        s.append(vote(SKY, "Blue.", "Green.", "a", 2))
        s.append(vote(SKY, "Blue.", "Green.", "b", 1, annotator="bob"))
        s.append(vote(CHAT, "Seven.", "Eight.", "a", None, model_b="m3"))
        s.append(vote(SUM, "4", "5", "tie"))
        s.append(vote(SUM, "4", "22", "both_bad", annotator="bob"))
        undone = s.append(vote(SUM, "4", "5", "a", 2, annotator="carol"))
        s.retract(undone["event_id"], annotator="carol", vote=undone)
    return path


def load(path):
    """What `datasets` gives a training script for this file."""
    from datasets import load_dataset

    kind = "parquet" if str(path).endswith(".parquet") else "json"
    return load_dataset(
        kind, data_files=str(path), split="train", cache_dir=str(Path(path).parent / "hf-cache")
    )


def turn(text):
    return [{"role": "assistant", "content": text}]


# ---- export ----------------------------------------------------------------------------

STANDARD_ROWS = [
    {"prompt": SKY[0]["content"], "chosen": "Blue.", "rejected": "Green."},
    {"prompt": SKY[0]["content"], "chosen": "Green.", "rejected": "Blue."},
    # A multi-message prompt is an HH transcript; its answers follow "Assistant:" after a space.
    {"prompt": CHAT_TEXT, "chosen": " Seven.", "rejected": " Eight."},
]
CONVERSATIONAL_ROWS = [
    {"prompt": SKY, "chosen": turn("Blue."), "rejected": turn("Green.")},
    {"prompt": SKY, "chosen": turn("Green."), "rejected": turn("Blue.")},
    {"prompt": CHAT, "chosen": turn("Seven."), "rejected": turn("Eight.")},
]


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
@pytest.mark.parametrize(
    "fmt, expected", [("standard", STANDARD_ROWS), ("conversational", CONVERSATIONAL_ROWS)]
)
def test_an_export_written_in_slices_is_the_same_file_content(store, tmp_path, fmt, expected, ext):
    """The CLI gathers and writes preference rows a slice at a time (one compressed while
    the next is gathered): same rows, same order, whatever the slice size."""
    votes = read_comparisons(store)
    slices, _ties, report = export_preferences(votes, format=fmt, margin=True, slice_rows=2)
    out = write_table(slices, tmp_path / f"sliced.{ext}")
    whole, _ties, _report = export_preferences(votes, format=fmt, margin=True)
    assert report.rows == len(expected) == whole.num_rows
    rows = load(out).to_list()
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == expected
    assert [r["margin"] for r in rows] == whole["margin"].to_pylist()
    if ext == "parquet":
        import pyarrow.parquet as pq

        assert pq.ParquetFile(out).num_row_groups == 2  # 3 rows in slices of 2


@pytest.mark.parametrize("ext", ["parquet", "jsonl", "json"])
@pytest.mark.parametrize(
    "fmt, expected", [("standard", STANDARD_ROWS), ("conversational", CONVERSATIONAL_ROWS)]
)
def test_export_loads_with_datasets(store, tmp_path, fmt, expected, ext):
    pairs, ties, report = export_preferences(read_comparisons(store), format=fmt)
    out = write_table(pairs, tmp_path / f"prefs.{ext}")
    ds = load(out)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    # Oldest vote first; the retracted vote is gone; the tie and the both-bad are no rows.
    assert ds.to_list() == expected
    assert ties is None
    assert (report.votes, report.rows, report.ties, report.both_bad) == (5, 3, 1, 1)


def test_conversational_columns_are_message_lists(store, tmp_path):
    pairs, _, _ = export_preferences(read_comparisons(store), format="conversational")
    ds = load(write_table(pairs, tmp_path / "prefs.parquet"))
    from trl.data_utils import is_conversational

    assert is_conversational(ds[0])
    from datasets import List, Value

    message = List({"role": Value("string"), "content": Value("string")})
    assert ds.features["prompt"] == ds.features["chosen"] == ds.features["rejected"] == message


def test_unknown_output_extension_is_refused(store, tmp_path):
    pairs, _, _ = export_preferences(read_comparisons(store))
    with pytest.raises(ValueError, match=r"\.csv.*\.parquet"):
        write_table(pairs, tmp_path / "prefs.csv")
    assert not (tmp_path / "prefs.csv").exists()


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_ties_are_never_preferences(store, tmp_path, fmt):
    votes = read_comparisons(store)
    excluded, none, r1 = export_preferences(votes, format=fmt, ties="exclude")
    kept, ties, r2 = export_preferences(votes, format=fmt, ties="separate")
    assert none is None and excluded.equals(kept)
    answers = {json.dumps(v) for v in excluded["chosen"].to_pylist() + excluded["rejected"].to_pylist()}
    for text in ("4", "5", "22"):
        assert json.dumps(text if fmt == "standard" else turn(text)) not in answers
    assert r1.ties == r2.ties == 1 and r1.both_bad == r2.both_bad == 1

    out = tmp_path / "prefs.jsonl"
    write_table(ties, ties_path_for(out))
    rows = load(tmp_path / "prefs.ties.jsonl").to_list()
    assert [(r["response_a"], r["response_b"], r["label"]) for r in rows] == (
        [("4", "5", "tie"), ("4", "22", "both_bad")]
        if fmt == "standard"
        else [(turn("4"), turn("5"), "tie"), (turn("4"), turn("22"), "both_bad")]
    )
    assert rows[0]["prompt"] == (SUM[0]["content"] if fmt == "standard" else SUM)


def test_margin_is_the_strength(store):
    pairs, _, _ = export_preferences(read_comparisons(store), margin=True)
    assert pairs.schema.field("margin").type == pa.float64()
    # 2 = clearly, 1 = slightly; a vote without a strength is a plain preference (0).
    assert pairs["margin"].to_pylist() == [2.0, 1.0, 0.0]


def test_majority_aggregation(tmp_path):
    path = tmp_path / "store"
    with DirectoryStore(path) as s:
        s.append(vote(SKY, "Blue.", "Green.", "a", 2, annotator="u1"))
        s.append(vote(SKY, "Blue.", "Green.", "b", 1, annotator="u2"))
        s.append(vote(SKY, "Blue.", "Green.", "a", 1, annotator="u3"))
        s.append(vote(SKY, "Blue.", "Grey.", "tie", annotator="u1"))  # 1 a, 1 b, 1 tie: tie
        s.append(vote(SKY, "Blue.", "Grey.", "a", 2, annotator="u2"))
        s.append(vote(SKY, "Blue.", "Grey.", "b", 2, annotator="u3"))
        s.append(vote(SUM, "4", "5", "both_bad", annotator="u1"))  # only both-bad
        s.append(vote(SUM, "4", "5", "both_bad", annotator="u2"))
        s.append(vote(SUM, "4", "22", "tie", annotator="u1"))  # 1 b beats 2 ties
        s.append(vote(SUM, "4", "22", "tie", annotator="u2"))
        s.append(vote(SUM, "4", "22", "b", None, annotator="u3"))
    pairs, ties, report = export_preferences(
        read_comparisons(path), aggregate="majority", margin=True, ties="separate"
    )
    assert pairs.to_pylist() == [
        {"prompt": SKY[0]["content"], "chosen": "Blue.", "rejected": "Green.", "margin": 1.5},
        {"prompt": "2+2?", "chosen": "22", "rejected": "4", "margin": 0.0},
    ]
    assert ties.select(["response_b", "label"]).to_pylist() == [
        {"response_b": "Grey.", "label": "tie"},
        {"response_b": "5", "label": "both_bad"},
    ]
    assert (report.used, report.rows, report.ties, report.both_bad, report.units) == (11, 2, 1, 1, "pairs")
    # aggregate="none" keeps one row per a/b vote.
    assert export_preferences(read_comparisons(path))[0].num_rows == 6


def test_filters(store):
    votes = read_comparisons(store)
    pairs, _, report = export_preferences(votes, annotators=["bob"])
    assert pairs.to_pylist() == [{"prompt": SKY[0]["content"], "chosen": "Green.", "rejected": "Blue."}]
    assert (report.dropped_by_annotator, report.both_bad, report.ties) == (3, 1, 0)
    pairs, _, report = export_preferences(votes, models=["m3"])  # model_b of the CHAT vote
    assert pairs["chosen"].to_pylist() == [" Seven."] and report.dropped_by_model == 4
    pairs, _, _ = export_preferences(votes, models=["m1"], annotators=["alice", "bob"])
    assert pairs.num_rows == 3
    assert export_preferences(votes, models=["nobody"])[0].num_rows == 0


def test_export_of_an_empty_store(tmp_path):
    with DirectoryStore(tmp_path / "store"):
        pass
    for fmt in ("standard", "conversational"):
        pairs, ties, report = export_preferences(
            read_comparisons(tmp_path / "store"), format=fmt, ties="separate", margin=True
        )
        assert pairs.num_rows == ties.num_rows == report.rows == 0
        assert pairs.column_names == ["prompt", "chosen", "rejected", "margin"]


def test_jsonl_escapes_like_json(tmp_path):
    """The vectorised JSON writer must agree with json.dumps on awkward text."""
    texts = [
        'quote " backslash \\ newline \n tab \t',
        "\x00\x1f control",
        "unicode é ✓ 🙂 \u2028",
        "",
        "ends with backslash \\",
    ]
    messages = [[{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}] for t in texts]
    table = pa.table(
        {
            "text": texts,
            "messages": messages,
            "x": [1.5, 0.0, 2.0, -1.0, 1e-9],
            "turn": [turn(t) for t in texts],  # one-item lists
            "maybe": [None, [], [{"role": "r", "content": None}], None, [{"role": "r", "content": "c"}]],
        }
    )
    out = write_table(table.slice(1), tmp_path / "t.jsonl")  # a sliced table too
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and [json.loads(line) for line in lines[:-1]] == table.slice(1).to_pylist()


# ---- import ----------------------------------------------------------------------------


def votes_of(store_dir):
    return sorted(read_comparisons(store_dir).to_pylist(), key=lambda r: (r["prompt"], r["response_a"]))


def check_vote(v, messages, chosen, rejected, source="src"):
    prompt = messages_to_json(messages)
    assert v["prompt"] == prompt and v["prompt_id"] == prompt_id_for(messages)
    assert (v["response_a"], v["response_b"]) == tuple(sorted((chosen, rejected)))
    assert v[f"response_{v['choice']}"] == chosen
    assert v["pair_id"] == pair_id_for(prompt, v["response_a"], v["response_b"])
    assert v["annotator"] == v["model_a"] == v["model_b"] == f"import:{source}"
    assert v["left"] == "a" and v["kind"] == "vote"


def test_import_standard(tmp_path):
    f = write_jsonl(
        tmp_path / "std.jsonl",
        [
            {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
            {"prompt": "Say hi", "chosen": "bye", "rejected": "hi", "margin": 2.0},
            {"prompt": CHAT_TEXT, "chosen": " Seven.", "rejected": " Eight."},  # an HH transcript prompt
        ],
    )
    report = import_file(f, tmp_path / "store", "src")
    assert (report.style, report.imported, report.bad_count) == ("standard", 3, 0)
    v = votes_of(tmp_path / "store")
    check_vote(v[2], [{"role": "user", "content": "What is 2+2?"}], "4", "5")
    check_vote(v[1], [{"role": "user", "content": "Say hi"}], "bye", "hi")
    check_vote(v[0], CHAT, "Seven.", "Eight.")
    assert v[1]["choice"] == "a" and v[1]["strength"] == 2 and v[2]["strength"] is None


def test_import_conversational_parquet_in_chunks(tmp_path):
    rows = [
        {"prompt": CHAT, "chosen": turn("Seven."), "rejected": turn("Eight.")},
        {"prompt": SKY, "chosen": turn("Green."), "rejected": turn("Blue.")},
        {"prompt": SUM, "chosen": turn("4"), "rejected": turn("5")},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "conv.parquet")
    report = import_file(tmp_path / "conv.parquet", tmp_path / "store", "src", chunk_rows=2)
    assert (report.style, report.imported, report.parts) == ("conversational", 3, 2)
    assert len(list((tmp_path / "store" / "parts").glob("*.parquet"))) == 2
    v = votes_of(tmp_path / "store")  # sorted by prompt JSON: system < user, "2" < "W"
    check_vote(v[0], CHAT, "Seven.", "Eight.")
    check_vote(v[1], SUM, "4", "5")
    check_vote(v[2], SKY, "Green.", "Blue.")
    assert v[2]["choice"] == "b"  # "Blue." < "Green.": the chosen answer is side b


def test_import_implicit_prompt(tmp_path):
    f = write_jsonl(
        tmp_path / "implicit.jsonl",
        [
            {"chosen": CHAT + turn("Seven."), "rejected": CHAT + turn("Eight.")},
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        ],
    )
    assert import_file(f, tmp_path / "store", "src").style == "implicit"
    v = votes_of(tmp_path / "store")
    check_vote(v[0], CHAT, "Seven.", "Eight.")
    # Split like TRL's extract_prompt: the space before the difference goes with the answers.
    check_vote(v[1], [{"role": "user", "content": "The sky is"}], " blue.", " green.")


def test_import_anthropic_hh_multi_turn(tmp_path):
    shared = (
        "\n\nHuman: What should I cook tonight?\n\nAssistant: What do you have?"
        "\n\nHuman: Eggs and rice.\n\nAssistant:"
    )
    f = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {"chosen": shared + " Egg fried rice.", "rejected": shared + " Eat the eggs raw."},
            # Answers that start alike: the split is still at the last shared "Assistant:".
            {
                "chosen": "\n\nHuman: Hi\n\nAssistant: Hello there!",
                "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.",
            },
        ],
    )
    report = import_file(f, tmp_path / "store", "hh")
    assert (report.style, report.imported) == ("hh", 2)
    v = votes_of(tmp_path / "store")
    check_vote(v[0], [{"role": "user", "content": "Hi"}], "Hello there!", "Hello.", source="hh")
    check_vote(
        v[1],
        [
            {"role": "user", "content": "What should I cook tonight?"},
            {"role": "assistant", "content": "What do you have?"},
            {"role": "user", "content": "Eggs and rice."},
        ],
        "Egg fried rice.",
        "Eat the eggs raw.",
        source="hh",
    )


def test_import_json_array_and_forced_style(tmp_path):
    f = tmp_path / "rows.json"
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    f.write_text(json.dumps([hh, {"prompt": "p", "chosen": "x", "rejected": "y"}]))
    report = import_file(f, tmp_path / "a", "src")  # detected from the first row
    assert (report.style, report.imported, report.bad_count) == ("hh", 1, 1)
    assert report.bad == [f"{f}:item 2: chosen and rejected share no '\\n\\nAssistant:' turn"]
    # Forced to the TRL text reading instead, the HH row splits at the first difference.
    report = import_file(f, tmp_path / "b", "src", style="implicit")
    assert (report.style, report.imported, report.bad_count) == ("implicit", 1, 1)
    assert report.bad == [f"{f}:item 2: chosen and rejected share no prompt text"]
    v = votes_of(tmp_path / "b")
    check_vote(v[0], [{"role": "user", "content": "\n\nHuman: Hi\n\nAssistant:"}], " Hello!", " Go away.")


def test_bad_rows_are_reported_and_skipped(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "ok", "chosen": "yes", "rejected": "no"}),
                "{not json",
                json.dumps({"prompt": "same", "chosen": "x", "rejected": "x"}),
                "",
                json.dumps({"prompt": "missing"}),
                json.dumps({"prompt": "typed", "chosen": 3, "rejected": "no"}),
                json.dumps(["not", "an", "object"]),
                json.dumps({"prompt": "fine too", "chosen": "a", "rejected": "b"}),
            ]
        )
        + "\n"
    )
    report = import_file(f, tmp_path / "store", "src")
    assert (report.rows, report.imported, report.bad_count) == (7, 2, 5)
    assert [b.split(": ", 1)[0] for b in report.bad] == [f"{f}:{n}" for n in (2, 3, 5, 6, 7)]
    assert "invalid JSON" in report.bad[0] and "same answer" in report.bad[1]
    assert "'chosen' is missing" in report.bad[2] and "'chosen' must be a string" in report.bad[3]
    assert len(read_comparisons(tmp_path / "store")) == 2


def test_file_without_importable_rows_writes_nothing(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(
        ValueError, match=r"no importable rows.*bad\.jsonl:1: chosen and rejected are the same"
    ):
        import_file(f, tmp_path / "store", "src")
    assert not (tmp_path / "store").exists()
    (tmp_path / "bad.tsv").write_text("prompt\tchosen\trejected\n")
    with pytest.raises(ValueError, match="unknown file type"):
        import_file(tmp_path / "bad.tsv", tmp_path / "store", "src")
    (tmp_path / "header-only.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match="no importable rows"):
        import_file(tmp_path / "header-only.csv", tmp_path / "store", "src")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_round_trip(tmp_path, fmt):
    """import -> export (aggregate none, same format) keeps every triple."""
    if fmt == "standard":
        rows = [
            {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
            {"prompt": "What is 2+2?", "chosen": "5", "rejected": "4"},  # disagreement kept
            {"prompt": " spaced ", "chosen": "", "rejected": " b"},
            {"prompt": CHAT_TEXT, "chosen": " Seven.", "rejected": " Eight."},
            {"prompt": "ünïcode ✓", "chosen": 'q"uote\\', "rejected": "line\nbreak"},
        ]
    else:
        rows = [
            {"prompt": SKY, "chosen": turn("Blue."), "rejected": turn("Green.")},
            {"prompt": CHAT, "chosen": turn("Seven."), "rejected": turn("Eight.")},
            {"prompt": CHAT, "chosen": turn("Eight."), "rejected": turn("Seven.")},
            {
                "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                "chosen": turn(" x"),
                "rejected": turn(""),
            },
        ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    import_file(src, tmp_path / "store", "rt")
    pairs, _, _ = export_preferences(read_comparisons(tmp_path / "store"), format=fmt)
    out = write_table(pairs, tmp_path / "out.parquet")

    def key(r):
        return json.dumps([r["prompt"], r["chosen"], r["rejected"]])

    assert Counter(map(key, load(out).to_list())) == Counter(map(key, rows))


# ---- command line ----------------------------------------------------------------------


def test_cli_export_help():
    r = cli("export", "--help")
    assert r.returncode == 0, r.stderr
    for flag in (
        "--data",
        "--out",
        "--format",
        "--margin",
        "--ties",
        "--aggregate",
        "--annotator",
        "--model",
    ):
        assert flag in r.stdout


def test_cli_import_then_export(tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"prompt": "p1", "chosen": "good", "rejected": "bad", "margin": 1},
            {"prompt": "p2", "chosen": "same", "rejected": "same"},
            {"prompt": "p3", "chosen": "yes", "rejected": "no"},
        ],
    )
    r = cli("import", src, "--data", tmp_path / "store", "--source", "demo")
    assert r.returncode == 0, r.stderr
    assert f"{src}:2: chosen and rejected are the same answer" in r.stderr
    assert "imported  2 votes by import:demo" in r.stdout

    out = tmp_path / "out" / "prefs.jsonl"
    r = cli(
        "export",
        "--data",
        tmp_path / "store",
        "--out",
        out,
        "--margin",
        "--ties",
        "separate",
        "--annotator",
        "import:demo",
        "--model",
        "import:demo",
    )
    assert r.returncode == 0, r.stderr
    assert f"wrote     2 preference rows to {out}" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["prompt"], r["chosen"], r["margin"]) for r in rows) == [
        ("p1", "good", 1.0),
        ("p3", "yes", 0.0),
    ]
    assert (tmp_path / "out" / "prefs.ties.jsonl").read_text() == ""

    r = cli("export", "--data", tmp_path / "store", "--out", tmp_path / "x.csv")
    assert r.returncode == 2 and "unknown output type '.csv'" in r.stderr
    r = cli("export", "--data", tmp_path / "store", "--out", tmp_path / "x.parquet", "--annotator", "nobody")
    assert r.returncode == 1 and "nothing written" in r.stderr and not (tmp_path / "x.parquet").exists()
    r = cli("import", tmp_path / "missing.jsonl", "--data", tmp_path / "store", "--source", "demo")
    assert r.returncode == 1 and "no such file" in r.stderr


# ---- TRL takes the exported files unchanged --------------------------------------------


def trl_store(tmp_path):
    path = tmp_path / "store"
    with DirectoryStore(path) as s:
        for i in range(4):
            s.append(vote(SKY, f"Blue, {i}.", f"Green, {i}.", "a", 2))
            s.append(vote(CHAT, f"Seven ({i}).", f"Eight ({i}).", "b", 1, annotator="bob"))
        s.append(vote(SUM, "4", "5", "tie"))
    return path


def trl_args(config_cls, tmp_path, **extra):
    return config_cls(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        dataloader_num_workers=0,
        seed=0,
        **extra,
    )


@pytest.fixture(scope="module")
def tiny():
    from trainer.models import load_model

    return load_model("tiny")


def reward_trainer(tmp_path, tiny, dataset):
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    lm, tokenizer = tiny
    torch.manual_seed(0)  # the same random reward head every time
    config = lm.config.__class__(**{**lm.config.to_dict(), "num_labels": 1})
    model = AutoModelForSequenceClassification.from_config(config)
    return RewardTrainer(
        model=model,
        args=trl_args(RewardConfig, tmp_path, max_length=256),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("fmt, ext", [("standard", "jsonl"), ("conversational", "parquet")])
def test_trl_reward_trainer_takes_the_export(tmp_path, tiny, fmt, ext):
    votes = read_comparisons(trl_store(tmp_path))
    pairs, _, _ = export_preferences(votes, format=fmt, margin=True)
    dataset = load(write_table(pairs, tmp_path / f"prefs.{ext}"))
    trainer = reward_trainer(tmp_path, tiny, dataset)
    assert len(trainer.train_dataset) == 8  # the tie is no row
    assert "margin" in trainer.train_dataset.column_names  # kept: a signature column
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)

    # The margin reaches the loss, -logsigmoid(r_chosen - r_rejected - margin): with
    # margins of 1 and 2 the first step's loss is higher than without, same model and data.
    plain, _, _ = export_preferences(votes, format=fmt)
    baseline = reward_trainer(tmp_path, tiny, load(write_table(plain, tmp_path / f"plain.{ext}")))
    baseline.train()
    assert trainer.state.log_history[0]["loss"] > baseline.state.log_history[0]["loss"] + 0.5


@pytest.mark.parametrize("fmt, ext", [("standard", "parquet"), ("conversational", "jsonl")])
def test_trl_dpo_trainer_takes_the_export(tmp_path, tiny, fmt, ext):
    import copy

    from trl import DPOConfig, DPOTrainer

    # DPO has no use for a margin column, and must not trip over one either.
    pairs, _, _ = export_preferences(read_comparisons(trl_store(tmp_path)), format=fmt, margin=True)
    dataset = load(write_table(pairs, tmp_path / f"prefs.{ext}"))
    lm, tokenizer = tiny
    model = copy.deepcopy(lm).train()
    trainer = DPOTrainer(
        model=model,
        args=trl_args(DPOConfig, tmp_path, max_length=256),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert len(trainer.train_dataset) == 8
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)


def test_a_trl_trainer_earlier_in_the_process_leaves_our_trainers_in_fp32(tmp_path):
    # A TRL / transformers Trainer (bf16=True, as TRL's configs default to) leaves
    # accelerate's shared state at bf16 mixed precision; every later Accelerator in the
    # process shares it, and its prepare_model would wrap the forward in a CPU bf16
    # autocast. The trainers' supervisor turns that off: a weight of 1 + 2^-10 keeps its
    # last bit (bf16 has 8 bits of mantissa: it would read 1.0).
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from trainer.runs import supervise

    AcceleratorState._reset_state(True)  # whatever an earlier test left: bf16 from here
    Accelerator(cpu=True, mixed_precision="bf16")  # what the Trainer's arguments create
    assert AcceleratorState().mixed_precision == "bf16"
    seen = {}

    def body(run, accelerator, stop):
        layer = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            layer.weight.fill_(1 + 2**-10)
        net = accelerator.prepare_model(layer)
        seen["out"] = float(net(torch.ones(1, 1)))
        return 0

    try:
        assert supervise(tmp_path / "run", "cpu", lambda: None, body, (ValueError,)) == 0
    finally:
        AcceleratorState._reset_state(True)  # the next test starts from a fresh state
    assert seen["out"] == 1 + 2**-10
