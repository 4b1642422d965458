"""Export standing votes as a preference dataset that TRL and `datasets` read unchanged.

    pairs, ties_table, report = export_preferences(votes, format="conversational", margin=True)
    records, report = export_records(votes)      # votes: trainer.store.read_comparisons(...)

The tables are written by annotate/table_files.py; the command line, `preflab export`,
is annotate/export_command.py.

Two row formats (TRL's "preference" type with an explicit prompt):

    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"prompt": [{"role", "content"}, ...],
                     "chosen": [{"role": "assistant", "content": str}],
                     "rejected": [{"role": "assistant", "content": str}]}

and one for audits and tests, not for training:

    records         every standing vote (ties and both-bad included) with exactly the
                    record's fields (trainer/store/record.py SCHEMA), oldest first; in
                    Parquet with the record's types, in JSON Lines with created_at as an
                    ISO 8601 UTC string. The same votes give the same file whichever
                    backend holds them. --annotator / --model filter it; --margin,
                    --ties separate and --aggregate majority do not apply.

How a chat prompt becomes plain text in the standard format:

* a prompt that is one user message is that message's content, and chosen/rejected
  are the two answers verbatim;
* any other prompt (a system message, several turns) is written as an Anthropic-HH
  transcript, "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:",
  and each answer gets one leading space, so that prompt + chosen reads as one
  transcript, the way TRL's `extract_prompt` splits HH data. Roles are labelled
  user -> Human, assistant -> Assistant, system -> System, anything else by its name.
  `preflab import` parses this form back (see annotate/importers.py).

Chat votes (record version 3) are exported by annotate/export_chat.py: each answer after
its own side's history, in the explicit-prompt form when every row's two histories are
equal, else (for the whole file) TRL's implicit-prompt form, whole conversations in
chosen and rejected and no prompt column.

Ties and both-bad votes are never turned into preferences: they are dropped and counted
(`ties="exclude"`) or written to a sibling file `<out>.ties.<ext>` with the columns
prompt, response_a, response_b, label (`ties="separate"`).

`margin=True` adds a float `margin` column. TRL 1.16's RewardTrainer keeps it (it is a
signature column of its collator) and uses it in the loss,
`-logsigmoid(r_chosen - r_rejected - margin)`, so a larger margin asks the reward model
for a wider gap. It is the vote's strength: 1.0 slightly, 2.0 clearly better, 0.0 when
the vote has no strength (plain Bradley-Terry). With majority aggregation it is the
mean strength of the winning side's votes. DPOTrainer ignores the column.

Everything is Arrow compute over whole columns: no Python loop runs per vote, only per
distinct prompt (to parse its JSON once), so a million votes export in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from annotate.export_chat import chat_contexts, chat_tables

# How a chat prompt is written as text, and the Arrow type of a message list: shared with
# export_chat.py and importers.py (which parses the transcript back).
from annotate.transcript import (  # noqa: F401
    ASSISTANT_CUE,
    MESSAGE_TYPE,
    MESSAGES_TYPE,
    ROLE_LABELS,
    render_prompt_text,
)

FORMATS = ("standard", "conversational")
TIES_MODES = ("exclude", "separate")
AGGREGATES = ("none", "majority")


# --------------------------------------------------------------------------------------
# Prompt rendering
# --------------------------------------------------------------------------------------


def _render_prompts(prompts: pa.ChunkedArray, fmt: str) -> tuple[pa.Array, pa.Array, pa.Array | None]:
    """Parse and render each distinct prompt once.

    Returns (code, rendered, is_transcript): code[i] is vote i's index into the
    distinct prompts; rendered / is_transcript are per distinct prompt (is_transcript
    is None for the conversational format, where the answers are never touched).
    """
    unique = pc.unique(prompts)
    code = pc.index_in(prompts, value_set=unique)
    # The stored prompts are canonical JSON lists; joining them into one JSON array
    # lets a single C-level json.loads parse them all.
    parsed = json.loads("[" + ",".join(unique.to_pylist()) + "]")
    if fmt == "conversational":
        return code, pa.array(parsed, MESSAGES_TYPE), None
    texts, transcript = zip(*map(render_prompt_text, parsed)) if parsed else ((), ())
    return code, pa.array(texts, pa.string()), pa.array(transcript, pa.bool_())


def _assistant_turns(texts: pa.Array) -> pa.Array:
    """Each answer as a one-message conversation: [{"role": "assistant", "content": text}]."""
    n = len(texts)
    turns = pa.StructArray.from_arrays([pa.repeat("assistant", n), texts], fields=list(MESSAGE_TYPE))
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), turns, type=MESSAGES_TYPE)


def _answers(texts: pa.Array, fmt: str, transcript: pa.Array | None) -> pa.Array:
    if fmt == "conversational":
        return _assistant_turns(texts)
    if len(texts) and pc.any(transcript).as_py():
        # Answers to a transcript prompt get the space that follows "Assistant:".
        texts = pc.binary_join_element_wise(pc.if_else(transcript, " ", ""), texts, "")
    return texts


def _column(values: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One contiguous array (a filtered or empty column may hold any number of chunks)."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    return values


# --------------------------------------------------------------------------------------
# From votes to rows
# --------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What an export did, in numbers (printed by the CLI)."""

    votes: int = 0  # standing votes given
    dropped_by_annotator: int = 0
    dropped_by_model: int = 0
    used: int = 0  # votes left after the filters
    aggregate: str = "none"
    units: str = "votes"  # what rows/ties count: votes, or pairs when aggregated
    rows: int = 0  # preference rows
    ties: int = 0  # tie rows (never preferences)
    both_bad: int = 0  # both-bad rows (never preferences)
    ties_mode: str = "exclude"
    form: str = "explicit"  # TRL's prompt form: "implicit" when chat histories differ
    path: str | None = None
    ties_path: str | None = None

    def lines(self) -> list[str]:
        out = [f"read      {self.votes} standing votes"]
        if self.dropped_by_annotator or self.dropped_by_model:
            out.append(
                f"filtered  {self.dropped_by_annotator} by annotator, "
                f"{self.dropped_by_model} by model; {self.used} votes left"
            )
        if self.aggregate == "majority":
            out.append(f"majority  {self.used} votes -> {self.rows + self.ties + self.both_bad} pairs")
        where = "excluded"
        if self.ties_mode == "separate":
            where = f"written to {self.ties_path}" if self.ties_path else "kept apart"
        out.append(
            f"ties      {self.ties} tie and {self.both_bad} both-bad {self.units} {where} "
            "(never turned into preferences)"
        )
        if self.form == "implicit":
            out.append(
                "form      implicit prompt (chosen/rejected are whole conversations: "
                "chat votes whose two sides' histories differ)"
            )
        out.append(f"wrote     {self.rows} preference rows" + (f" to {self.path}" if self.path else ""))
        return out


# Both steps below return a small "plan": one row per output row, in output order, with
# `row` (the index of a vote that carries the pair's prompt and answers), `outcome`
# (a, b, tie, both_bad) and `margin`. The big text columns are gathered once, at the end.


def _per_vote(votes: pa.Table) -> pa.Table:
    """One row per vote, oldest first: outcome is the vote's choice, margin its strength."""
    order = pc.sort_indices(votes, [("created_at", "ascending"), ("event_id", "ascending")])
    return pa.table(
        {
            "row": order,
            "outcome": votes["choice"].take(order),
            "margin": pc.fill_null(pc.cast(votes["strength"], pa.float64()), 0.0).take(order),
        }
    )


def _majority(votes: pa.Table) -> pa.Table:
    """One row per pair_id, in order of each pair's first vote: the side with more votes
    wins; equal counts are a tie, or both-bad when both-bad votes outnumber all the
    others together. margin = mean strength of the winning side's votes."""
    choice = votes["choice"]
    strength = pc.cast(votes["strength"], pa.float64())
    null = pa.scalar(None, pa.float64())

    def count(value):
        return pc.cast(pc.equal(choice, value), pa.int64())

    t = pa.table(
        {
            "pair_id": votes["pair_id"],
            "a": count("a"),
            "b": count("b"),
            "tie": count("tie"),
            "both_bad": count("both_bad"),
            # Each side's vote strengths (null elsewhere); the mean skips the nulls.
            "strength_a": pc.if_else(pc.equal(choice, "a"), strength, null),
            "strength_b": pc.if_else(pc.equal(choice, "b"), strength, null),
            "row": pa.array(np.arange(len(votes), dtype=np.int64)),
            "created_at": votes["created_at"],
        }
    )
    g = t.group_by("pair_id").aggregate(
        [
            ("a", "sum"),
            ("b", "sum"),
            ("tie", "sum"),
            ("both_bad", "sum"),
            ("strength_a", "mean"),
            ("strength_b", "mean"),
            ("row", "min"),
            ("created_at", "min"),
        ]
    )
    g = g.sort_by([("created_at_min", "ascending"), ("pair_id", "ascending")])
    a, b = g["a_sum"], g["b_sum"]
    others = pc.add(pc.add(a, b), g["tie_sum"])
    outcome = pc.if_else(
        pc.greater(a, b),
        "a",
        pc.if_else(
            pc.greater(b, a), "b", pc.if_else(pc.greater(g["both_bad_sum"], others), "both_bad", "tie")
        ),
    )
    margin = pc.if_else(pc.equal(outcome, "a"), g["strength_a_mean"], g["strength_b_mean"])
    # Every vote of a pair carries the same prompt and answers (pair_id is their hash),
    # so the pair's first row stands for it.
    return pa.table({"row": g["row_min"], "outcome": outcome, "margin": pc.fill_null(margin, 0.0)})


def _filter_votes(
    votes: pa.Table, annotators: list[str] | None, models: list[str] | None, report: ExportReport
) -> pa.Table:
    """The votes kept by the --annotator / --model filters, counted in `report`."""
    report.votes = len(votes)
    if annotators:
        kept = votes.filter(pc.is_in(votes["annotator"], value_set=pa.array(annotators, pa.string())))
        report.dropped_by_annotator, votes = len(votes) - len(kept), kept
    if models:
        wanted = pa.array(models, pa.string())
        kept = votes.filter(
            pc.or_(pc.is_in(votes["model_a"], value_set=wanted), pc.is_in(votes["model_b"], value_set=wanted))
        )
        report.dropped_by_model, votes = len(votes) - len(kept), kept
    report.used = len(votes)
    return votes


def export_records(
    votes: pa.Table, *, annotators: list[str] | None = None, models: list[str] | None = None
) -> tuple[pa.Table, ExportReport]:
    """Standing votes -> the same votes with exactly the record's fields (SCHEMA, in its
    order and types), oldest first (ties broken by event_id), so that the same votes give
    the same table whichever backend they were read from. Returns (records, report)."""
    from trainer.store import SCHEMA

    report = ExportReport(units="votes")
    is_vote = pc.equal(votes["kind"], "vote")
    if not pc.all(is_vote).as_py():
        votes = votes.filter(is_vote)
    votes = _filter_votes(votes, annotators, models, report)
    order = pc.sort_indices(votes, [("created_at", "ascending"), ("event_id", "ascending")])
    records = votes.select(SCHEMA.names).take(order).cast(SCHEMA)
    report.rows = records.num_rows
    return records, report


def records_for_json(records: pa.Table) -> pa.Table:
    """The records as JSON Lines holds them: created_at as an ISO 8601 UTC string
    (2024-05-01T12:00:00.123456Z); every other field as it is."""
    i = records.schema.get_field_index("created_at")
    stamps = pc.strftime(records["created_at"], format="%Y-%m-%dT%H:%M:%SZ")
    return records.set_column(i, pa.field("created_at", pa.string(), nullable=False), stamps)


def export_preferences(
    votes: pa.Table,
    *,
    format: str = "standard",
    margin: bool = False,
    ties: str = "exclude",
    aggregate: str = "none",
    annotators: list[str] | None = None,
    models: list[str] | None = None,
    slice_rows: int = 0,
) -> tuple[pa.Table | Iterator[pa.Table], pa.Table | None, ExportReport]:
    """Standing votes (`trainer.store.read_comparisons`) -> preference rows.

    Returns (pairs, ties_table, report). `pairs` has prompt/chosen/rejected (+ margin);
    `ties_table` is None unless ties="separate", when it holds prompt, response_a,
    response_b and label ("tie" or "both_bad") in the same format.
    `annotators` keeps the votes of those annotators; `models` keeps the pairs where
    either side's model is one of them. Filters apply before aggregation.
    `slice_rows` > 0: `pairs` comes as an iterator of tables of that many rows (for
    write_table, which then compresses one slice while the next is gathered).
    """
    for name, value, allowed in (
        ("format", format, FORMATS),
        ("ties", ties, TIES_MODES),
        ("aggregate", aggregate, AGGREGATES),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    report = ExportReport(
        aggregate=aggregate, ties_mode=ties, units="pairs" if aggregate == "majority" else "votes"
    )
    # read_comparisons returns votes only; a raw event table is accepted too. (A filter
    # copies every column, so skip it when there is nothing to drop.)
    is_vote = pc.equal(votes["kind"], "vote")
    if not pc.all(is_vote).as_py():
        votes = votes.filter(is_vote)
    votes = _filter_votes(votes, annotators, models, report)

    plan = _majority(votes) if aggregate == "majority" else _per_vote(votes)
    report.ties = pc.sum(pc.equal(plan["outcome"], "tie")).as_py() or 0
    report.both_bad = pc.sum(pc.equal(plan["outcome"], "both_bad")).as_py() or 0
    is_pref = pc.is_in(plan["outcome"], value_set=pa.array(["a", "b"]))

    code, rendered, transcript = _render_prompts(votes["prompt"], format)
    # response_a and response_b end to end as one column: index `row` is vote row's
    # response_a, `row + n` its response_b, so each output column is one take. A take
    # from one contiguous array is several times faster than from many chunks; past
    # 2 GiB of text (int32 offsets) the chunks stay as they are.
    n = len(votes)
    answers = pa.chunked_array(votes["response_a"].chunks + votes["response_b"].chunks, pa.string())
    if answers.nbytes < 2**31 - 2**20:
        answers = _column(answers)

    def gather(rows: pa.Array, take_b: bool | pa.Array) -> pa.Array:
        """Per row, response_b where take_b holds, else response_a."""
        shift = n * take_b if isinstance(take_b, bool) else pc.multiply(pc.cast(take_b, pa.int64()), n)
        return _column(answers.take(pc.add(rows, shift)))

    def prompts_of(rows: pa.Array) -> tuple[pa.Array, pa.Array | None]:
        codes = _column(code.take(rows))
        return rendered.take(codes), (transcript.take(codes) if transcript is not None else None)

    prefs = plan.filter(is_pref)
    report.rows = prefs.num_rows
    contexts = chat_contexts(votes)
    if contexts is not None:  # chat votes: each answer keeps its own history (export_chat.py)
        pairs, ties_table, implicit = chat_tables(votes, plan, is_pref, contexts, format, margin, ties)
        report.form = "implicit" if implicit else "explicit"
        return (iter([pairs]) if slice_rows else pairs), ties_table, report

    def pair_slices(size: int) -> Iterator[pa.Table]:
        """The preference rows, `size` at a time: gathering the answer text of one slice
        can run while the previous one is being compressed (write_table)."""
        for start in range(0, max(prefs.num_rows, 1), size):
            part = prefs.slice(start, size)
            rows, b_wins = _column(part["row"]), _column(pc.equal(part["outcome"], "b"))
            prompt, tr = prompts_of(rows)
            columns = {
                "prompt": prompt,
                "chosen": _answers(gather(rows, b_wins), format, tr),
                "rejected": _answers(gather(rows, pc.invert(b_wins)), format, tr),
            }
            if margin:
                columns["margin"] = _column(part["margin"])
            yield pa.table(columns)

    pairs = pair_slices(slice_rows) if slice_rows else pa.concat_tables(pair_slices(max(prefs.num_rows, 1)))

    ties_table = None
    if ties == "separate":
        tied = plan.filter(pc.invert(is_pref))
        rows = _column(tied["row"])
        prompt, tr = prompts_of(rows)
        ties_table = pa.table(
            {
                "prompt": prompt,
                "response_a": _answers(gather(rows, False), format, tr),
                "response_b": _answers(gather(rows, True), format, tr),
                "label": _column(tied["outcome"]),
            }
        )
    return pairs, ties_table, report
