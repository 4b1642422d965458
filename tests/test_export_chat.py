"""Export of chat votes (record schema version 3) to TRL: the explicit-prompt form when
every row's two histories agree, else the implicit-prompt form for the whole file,
loaded back with `datasets` and TRL's data utilities, and read again by train-reward."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import chat_vote_record, preflab, vote_record, write_store

from annotate.export import export_preferences
from annotate.table_files import write_table
from trainer.reward_data import read_pairs
from trainer.store import read_comparisons

U1 = {"role": "user", "content": "Hi."}
U2 = {"role": "user", "content": "And then?"}


def said(text):
    return {"role": "assistant", "content": text}


def load(path):
    from datasets import load_dataset

    kind = "parquet" if str(path).endswith(".parquet") else "json"
    return load_dataset(
        kind, data_files=str(path), split="train", cache_dir=str(Path(path).parent / "hf-cache")
    )


def agreeing_store(path):
    """A first-turn chat vote, a second-turn one whose sides said the same at turn 1,
    and an ordinary pair vote: every row's two contexts are equal."""
    return write_store(
        path,
        [
            chat_vote_record([("Hi.", "Hello!", "Hey.")], "b"),
            chat_vote_record([("Hi.", "Same.", "Same."), ("And then?", "Left.", "Right.")], "a"),
            vote_record("Plain?", "yes", "no", "a"),
        ],
    )


def differing_store(path):
    """A second-turn chat vote whose sides said different things at turn 1, a tie, and a pair vote."""
    return write_store(
        path,
        [
            chat_vote_record([("Hi.", "Hello!", "Hey."), ("And then?", "Bye.", "Ciao.")], "b", 2),
            chat_vote_record([("Hi.", "One.", "Two."), ("And then?", "Three.", "Four.")], "tie"),
            vote_record("Plain?", "yes", "no", "a"),
        ],
    )


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_chat_votes_with_agreeing_histories_export_in_the_explicit_prompt_form(tmp_path, ext):
    from trl.data_utils import is_conversational

    pairs, _, report = export_preferences(
        read_comparisons(agreeing_store(tmp_path / "s")), format="conversational"
    )
    assert report.form == "explicit" and report.rows == 3
    ds = load(write_table(pairs, tmp_path / f"prefs.{ext}"))
    assert ds.column_names == ["prompt", "chosen", "rejected"] and is_conversational(ds[0])
    assert sorted(ds.to_list(), key=lambda r: len(r["prompt"])) == sorted(
        [
            {"prompt": [U1], "chosen": [said("Hey.")], "rejected": [said("Hello!")]},
            # the prompt is the history so far, not only the conversation's opening
            {"prompt": [U1, said("Same."), U2], "chosen": [said("Left.")], "rejected": [said("Right.")]},
            {
                "prompt": [{"role": "user", "content": "Plain?"}],
                "chosen": [said("yes")],
                "rejected": [said("no")],
            },
        ],
        key=lambda r: len(r["prompt"]),
    )


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_differing_histories_make_the_whole_file_implicit_prompt(tmp_path, ext):
    from trl.data_utils import extract_prompt, is_conversational

    votes = read_comparisons(differing_store(tmp_path / "s"))
    pairs, ties, report = export_preferences(votes, format="conversational", margin=True, ties="separate")
    assert report.form == "implicit" and "implicit prompt" in " ".join(report.lines())
    ds = load(write_table(pairs, tmp_path / f"prefs.{ext}"))
    assert ds.column_names == ["chosen", "rejected", "margin"] and is_conversational(ds[0])
    rows = {r["chosen"][-1]["content"]: r for r in ds.to_list()}
    assert rows["Ciao."]["chosen"] == [U1, said("Hey."), U2, said("Ciao.")]  # b's own history
    assert rows["Ciao."]["rejected"] == [U1, said("Hello!"), U2, said("Bye.")]  # a's
    assert rows["Ciao."]["margin"] == 2.0
    assert rows["yes"]["chosen"] == [{"role": "user", "content": "Plain?"}, said("yes")]
    # TRL's own split of the implicit form: the shared opening becomes the prompt.
    split = extract_prompt(rows["Ciao."])
    assert split["prompt"] == [U1] and split["chosen"] == [said("Hey."), U2, said("Ciao.")]
    assert ties.column_names == ["response_a", "response_b", "label"] and ties["label"].to_pylist() == ["tie"]
    assert ties["response_a"].to_pylist()[0][-1] == said("Three.")
    # train-reward reads it back: each side its own context
    back = read_pairs(write_table(pairs, tmp_path / "again.jsonl"))
    i = back.chosen.index("Ciao.")
    assert back.prompts[i] == [U1, said("Hey."), U2] and back.rejected_prompts[i] == [U1, said("Hello!"), U2]


def test_the_standard_format_implicit_form_is_each_sides_transcript(tmp_path):
    pairs, _, report = export_preferences(
        read_comparisons(differing_store(tmp_path / "s")), format="standard"
    )
    assert report.form == "implicit" and pairs.column_names == ["chosen", "rejected"]
    chosen = next(c for c in pairs["chosen"].to_pylist() if c.endswith("Ciao."))
    assert chosen == "\n\nHuman: Hi.\n\nAssistant: Hey.\n\nHuman: And then?\n\nAssistant: Ciao."
    # a one-message context says where its answer starts too (not "Plain?yes")
    assert "\n\nHuman: Plain?\n\nAssistant: yes" in pairs["chosen"].to_pylist()
    # and the file preflab wrote is one preflab reads: each side after its own history
    out = tmp_path / "standard.jsonl"
    write_table(pairs, out)
    back = read_pairs(str(out))
    i = back.chosen.index("Ciao.")
    assert back.prompts[i] == [U1, said("Hey."), U2] and back.rejected_prompts[i] == [U1, said("Hello!"), U2]
    j = back.chosen.index("yes")
    assert back.prompts[j] == [{"role": "user", "content": "Plain?"}] and back.rejected[j] == "no"


def test_cli_export_says_which_form_it_wrote(tmp_path):
    out = tmp_path / "chat.jsonl"
    r = preflab(
        "export", "--data", differing_store(tmp_path / "s"), "--out", out, "--format", "conversational"
    )
    assert r.returncode == 0, r.stderr
    assert "implicit prompt" in r.stdout and len(load(out)) == 2
