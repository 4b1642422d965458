"""Prompt pools: loading every format, reporting bad rows by line, the shipped pool, the CLI."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, preflab

from trainer.prompts import Prompt, PromptPoolError, load_prompt_pool
from trainer.store import prompt_id_for

SHIPPED = REPO / "trainer" / "data" / "prompts.jsonl"
CATEGORIES = ("advice", "coding", "writing", "facts", "reasoning", "maths", "refusal")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(**fields) -> str:
    return json.dumps(fields)


def problem_lines(report) -> dict[int, str]:
    """{line number: reason} from the `file:line: reason` strings."""
    out = {}
    for p in report.problems:
        assert p.startswith(report.path + ":"), p
        line, reason = p[len(report.path) + 1 :].split(": ", 1)
        out[int(line)] = reason
    return out


# --------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------


def test_jsonl_prompt_and_messages_rows(tmp_path):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    path = write_lines(
        tmp_path / "pool.jsonl",
        [
            row(id="q1", prompt="Why is the sea salty?", tags=["facts"]),
            row(messages=chat, tags="maths, multi-turn"),
            row(prompt="No id and no tags", note="extra columns are ignored"),
        ],
    )
    pool = load_prompt_pool(path)

    assert len(pool) == 3 and pool.report.loaded == 3 and pool.report.problems == []
    first, second, third = pool.prompts
    assert first == Prompt("q1", [{"role": "user", "content": "Why is the sea salty?"}], ["facts"])
    assert second.messages == chat
    assert second.id == prompt_id_for(chat)
    assert second.tags == ["maths", "multi-turn"]
    assert third.id == prompt_id_for(third.messages) and third.tags == []
    assert pool.report.summary() == (
        f"{path}: 3 prompts loaded; skipped 0 bad lines, 0 duplicates, 0 empty, 0 oversize"
    )


def test_json_extension_is_read_as_json_lines(tmp_path):
    path = write_lines(tmp_path / "pool.json", [row(prompt="one"), row(prompt="two")])
    assert [p.messages[0]["content"] for p in load_prompt_pool(path).prompts] == ["one", "two"]


def test_bad_jsonl_lines_are_reported_with_their_line_and_skipped(tmp_path, caplog):
    user = {"role": "user", "content": "ok?"}
    lines = [
        row(id="good-1", prompt="first good"),  # 1
        '{"id": "broken", "prompt": "missing brace"',  # 2
        row(id="good-2", prompt="right after a bad line"),  # 3
        "",  # 4 blank: ignored
        row(id="nothing", tags=["x"]),  # 5
        row(messages="not a list at all"),  # 6
        row(messages={"role": "user", "content": "a dict"}),  # 7
        row(messages=[{"role": "robot", "content": "beep"}]),  # 8
        row(messages=[{"role": "user", "content": 42}]),  # 9
        row(messages=[user, {"role": "assistant", "content": "yes"}]),  # 10
        row(id=17, prompt="numeric id"),  # 11
        row(prompt="tags wrong", tags=3),  # 12
        row(prompt="both", messages=[user]),  # 13
        row(prompt=["a", "list"]),  # 14
        "[1, 2, 3]",  # 15
        row(messages=[user, {"role": "system", "content": "late"}, user]),  # 16
        row(messages=[]),  # 17
        row(id="good-3", prompt="last line"),  # 18
    ]
    path = write_lines(tmp_path / "pool.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="preflab.prompts"):
        pool = load_prompt_pool(path)

    assert [p.id for p in pool.prompts] == ["good-1", "good-2", "good-3"]
    problems = problem_lines(pool.report)
    assert sorted(problems) == [2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    assert pool.report.bad == 14 and pool.report.loaded == 3
    assert "invalid JSON" in problems[2]
    assert "'prompt' string or a 'messages' list" in problems[5]
    assert "'messages' is not valid JSON" in problems[6]
    assert "list of chat messages" in problems[7]
    assert "'robot'" in problems[8]
    assert "content must be a string" in problems[9]
    assert "last message must be from the user" in problems[10]
    assert "'id' must be a string" in problems[11]
    assert "'tags'" in problems[12]
    assert "both 'prompt' and 'messages'" in problems[13]
    assert "'prompt' must be a string" in problems[14]
    assert "expected a JSON object" in problems[15]
    assert "system message" in problems[16]
    assert "empty list" in problems[17]
    # Every problem also went to the log.
    logged = [r.getMessage() for r in caplog.records]
    assert all(p in logged for p in pool.report.problems)
    assert "skipped 14 bad lines" in pool.report.summary()


def test_a_line_that_is_not_utf8_costs_only_that_line(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n{"prompt": "also fine"}\n')
    pool = load_prompt_pool(path)
    assert [p.messages[0]["content"] for p in pool.prompts] == ["fine", "also fine"]
    assert "UTF-8" in problem_lines(pool.report)[2]


def test_crlf_line_endings_and_a_bom_are_accepted(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "one"}\r\n{"prompt": "two"}\r\nnot json\r\n')
    pool = load_prompt_pool(path)
    assert [p.messages[0]["content"] for p in pool.prompts] == ["one", "two"]
    assert list(problem_lines(pool.report)) == [3]


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------


def test_csv_rows_tags_and_messages_column(tmp_path):
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    cell = json.dumps(chat).replace('"', '""')
    path = tmp_path / "pool.csv"
    path.write_text(
        f'id,prompt,messages,tags\nc1,What is a noun?,,"writing, grammar"\n,,"{cell}",chat\n',
        encoding="utf-8",
    )
    pool = load_prompt_pool(path)
    assert pool.report.problems == []
    assert pool.prompts[0] == Prompt(
        "c1", [{"role": "user", "content": "What is a noun?"}], ["writing", "grammar"]
    )
    assert pool.prompts[1].messages == chat
    assert pool.prompts[1].id == prompt_id_for(chat)  # an empty id cell means no id
    assert pool.prompts[1].tags == ["chat"]


def test_csv_line_numbers_count_lines_inside_quoted_fields(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_text(
        "id,prompt,tags\n"  # 1
        'a,"first line\nsecond line\nthird line",x\n'  # 2-4
        "b,too,many,fields\n"  # 5
        'c,"two\n\nparagraphs",y\n'  # 6-8
        "\n"  # 9 blank
        'd,"bad json does not matter in csv",\n'  # 10
        "e,only two\n"  # 11
        'f,"spans\nlines",z\n',  # 12-13
        encoding="utf-8",
    )
    pool = load_prompt_pool(path)
    assert [p.id for p in pool.prompts] == ["a", "c", "d", "f"]
    assert pool.prompts[0].messages[0]["content"] == "first line\nsecond line\nthird line"
    problems = problem_lines(pool.report)
    assert sorted(problems) == [5, 11]
    assert "expected 3 fields, got 4" in problems[5]
    assert "expected 3 fields, got 2" in problems[11]


def test_csv_bad_messages_cell_is_reported_on_the_row_start_line(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_text(
        "id,messages\n"  # 1
        'm1,"[{""role"": ""user"",\n  ""content"": ""hi""}]"\n'  # 2-3
        'm2,"[{""role"": ""user"", ""content"":\n  ""unclosed"""\n'  # 4-5
        'm3,"[{""role"": ""user"", ""content"": ""bye""}]"\n',  # 6
        encoding="utf-8",
    )
    pool = load_prompt_pool(path)
    assert [p.id for p in pool.prompts] == ["m1", "m3"]
    problems = problem_lines(pool.report)
    assert list(problems) == [4]
    assert "'messages' is not valid JSON" in problems[4]


def test_csv_stray_and_unclosed_quotes_are_bad_rows_not_glued_text(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_text(
        "id,prompt\n"  # 1
        "a,fine\n"  # 2
        'b,"stray"quote\n'  # 3
        "c,after the stray quote\n"  # 4
        'd,"opened and never closed\n'  # 5
        "e,swallowed by the open quote\n",  # 6
        encoding="utf-8",
    )
    pool = load_prompt_pool(path)
    assert [p.id for p in pool.prompts] == ["a", "c"]
    problems = problem_lines(pool.report)
    assert sorted(problems) == [3, 5]
    assert all("unreadable CSV" in reason for reason in problems.values())


def test_csv_blank_prompt_cell_counts_as_empty(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_text("id,prompt\nx,hello\ny,\nz,   \n", encoding="utf-8")
    pool = load_prompt_pool(path)
    assert [p.id for p in pool.prompts] == ["x"]
    assert pool.report.empty == 2 and pool.report.bad == 0


def test_csv_without_a_prompt_column_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_text("question,answer\nwhy,because\n", encoding="utf-8")
    with pytest.raises(PromptPoolError, match=r"pool\.csv.*'prompt' or 'messages'"):
        load_prompt_pool(path)


# --------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------


def test_parquet_rows_and_row_numbers(tmp_path):
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "How are you?"},
    ]
    table = pa.table(
        {
            "id": ["p1", "p2", None, "p4"],
            "messages": [
                chat,
                [{"role": "user", "content": "Two"}],
                [{"role": "assistant", "content": "no user turn"}],
                [{"role": "user", "content": "Four"}],
            ],
            "tags": [["chat"], [], None, ["a", "b"]],
        }
    )
    path = tmp_path / "pool.parquet"
    pq.write_table(table, path)
    pool = load_prompt_pool(path)
    assert [p.id for p in pool.prompts] == ["p1", "p2", "p4"]
    assert pool.prompts[0].messages == chat and pool.prompts[0].tags == ["chat"]
    assert pool.prompts[2].tags == ["a", "b"]
    assert len(pool.report.problems) == 1
    assert pool.report.problems[0].startswith(f"{path}:row 3: ")
    assert "last message must be from the user" in pool.report.problems[0]


def test_parquet_prompt_column_with_string_tags(tmp_path):
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"prompt": ["one", "two", "one"], "tags": ["x,y", "", "z"]}), path)
    pool = load_prompt_pool(path)
    assert [(p.messages[0]["content"], p.tags) for p in pool.prompts] == [("one", ["x", "y"]), ("two", [])]
    assert pool.report.duplicate == 1
    assert pool.report.problems == [f"{path}:row 3: duplicate of row 1 (same messages)"]


def test_damaged_parquet_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "pool.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(PromptPoolError, match=r"pool\.parquet"):
        load_prompt_pool(path)


# --------------------------------------------------------------------------------------
# Dropped rows: empty, oversize, duplicates
# --------------------------------------------------------------------------------------


def test_empty_oversize_and_duplicates_are_dropped_with_counts(tmp_path):
    lines = [
        row(id="a", prompt="Keep me"),  # 1
        row(id="b", prompt="   \n\t"),  # 2 empty
        row(
            id="c",
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": " "},
            ],
        ),  # 3 empty last turn
        row(id="d", prompt="x" * 101),  # 4 oversize
        row(
            id="e", messages=[{"role": "system", "content": "y" * 60}, {"role": "user", "content": "z" * 50}]
        ),  # 5 oversize in all
        row(id="f", prompt="Keep me"),  # 6 same messages as 1
        row(id="a", prompt="A different prompt"),  # 7 id clash with 1
        row(id="g", prompt="x" * 100),  # 8 exactly the limit
        row(prompt="Keep me"),  # 9 same messages, no id
    ]
    path = write_lines(tmp_path / "pool.jsonl", lines)
    pool = load_prompt_pool(path, max_chars=100)
    r = pool.report

    assert [p.id for p in pool.prompts] == ["a", "g"]
    assert (r.loaded, r.bad, r.empty, r.oversize, r.duplicate, r.duplicate_id) == (2, 0, 2, 2, 2, 1)
    problems = problem_lines(r)
    assert problems[2] == problems[3] == "empty prompt"
    assert "101 characters" in problems[4] and "110 characters" in problems[5]
    assert problems[6] == problems[9] == "duplicate of line 1 (same messages)"
    assert "id 'a' already used on line 1" in problems[7]
    assert r.summary() == (
        f"{path}: 2 prompts loaded; skipped 0 bad lines, 2 duplicates, 1 id clash, 2 empty, 2 oversize"
    )


def test_tags_are_parsed_trimmed_and_deduplicated(tmp_path):
    path = write_lines(
        tmp_path / "pool.jsonl",
        [
            row(prompt="1", tags=" coding , short,,coding "),
            row(prompt="2", tags=["maths", " maths ", ""]),
            row(prompt="3", tags=""),
            row(prompt="4", tags=None),
            row(prompt="5", tags=["ok", 7]),
        ],
    )
    pool = load_prompt_pool(path)
    assert [p.tags for p in pool.prompts] == [["coding", "short"], ["maths"], [], []]
    assert list(problem_lines(pool.report)) == [5]


# --------------------------------------------------------------------------------------
# Files that cannot be used at all
# --------------------------------------------------------------------------------------


def test_missing_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(PromptPoolError, match="nowhere.jsonl: no such prompt pool file"):
        load_prompt_pool(path)


def test_unknown_extension_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("What is 2+2?\n")
    with pytest.raises(PromptPoolError, match=r"prompts\.txt: unknown prompt pool format '\.txt'"):
        load_prompt_pool(path)


def test_a_file_with_no_usable_prompt_is_an_error_that_keeps_the_report(tmp_path):
    path = write_lines(tmp_path / "pool.jsonl", ["not json", row(prompt="  ")])
    with pytest.raises(PromptPoolError, match="pool.jsonl: no usable prompts") as info:
        load_prompt_pool(path)
    report = info.value.report
    assert (report.loaded, report.bad, report.empty) == (0, 1, 1)
    assert sorted(problem_lines(report)) == [1, 2]
    assert isinstance(info.value, ValueError)


def test_an_empty_file_is_an_error(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_text("")
    with pytest.raises(PromptPoolError, match="pool.csv: no usable prompts"):
        load_prompt_pool(path)


# --------------------------------------------------------------------------------------
# The shipped pool
# --------------------------------------------------------------------------------------


def test_shipped_prompt_pool_loads_cleanly_with_every_category():
    pool = load_prompt_pool(SHIPPED)
    assert pool.report.problems == []
    assert len(pool) >= 150
    per_category = Counter(p.tags[0] for p in pool.prompts)
    assert set(per_category) == set(CATEGORIES)
    # Roughly balanced: no category is less than half the size of the largest.
    assert min(per_category.values()) * 2 >= max(per_category.values())
    multi_turn = [p for p in pool.prompts if len(p.messages) > 1]
    assert len(multi_turn) >= 8
    assert all("multi-turn" in p.tags for p in multi_turn)
    for p in pool.prompts:
        category, number = p.id.rsplit("-", 1)
        assert category == p.tags[0] and number.isdigit(), p.id


# --------------------------------------------------------------------------------------
# `preflab prompts`
# --------------------------------------------------------------------------------------


def test_cli_reports_the_shipped_pool():
    result = preflab("prompts", "trainer/data/prompts.jsonl", "--show", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith("trainer/data/prompts.jsonl: ")
    assert "prompts loaded; skipped 0 bad lines, 0 duplicates, 0 empty, 0 oversize" in out[0]
    for category in CATEGORIES:
        assert any(line.split()[:1] == [category] for line in out), category  # tag counts
    assert "first 3 of" in result.stdout
    assert sum(1 for line in out if line.startswith("  advice-")) == 3


def test_cli_lists_problems_and_fails_on_an_unusable_file(tmp_path):
    mixed = write_lines(tmp_path / "mixed.jsonl", [row(id="ok", prompt="fine"), "{oops"])
    result = preflab("prompts", str(mixed))
    assert result.returncode == 0, result.stderr
    assert f"{mixed}:2: invalid JSON" in result.stdout
    assert "1 prompt loaded; skipped 1 bad line" in result.stdout

    bad = write_lines(tmp_path / "bad.jsonl", ["{oops"])
    result = preflab("prompts", str(bad))
    assert result.returncode == 1
    assert f"{bad}: no usable prompts" in result.stderr
    assert "Traceback" not in result.stderr

    result = preflab("prompts", str(tmp_path / "missing.csv"))
    assert result.returncode == 1
    assert "missing.csv: no such prompt pool file" in result.stderr
    assert "Traceback" not in result.stderr
