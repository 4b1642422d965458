"""Export of a store that holds chat votes (record schema version 3): TRL's preference
rows where each answer keeps the history it was written after.

    contexts = chat_contexts(votes)           # None when no vote is a chat vote
    pairs, ties_table, implicit = chat_tables(votes, plan, is_pref, contexts, fmt, margin, ties)

Each vote's two contexts are `trainer.store.side_contexts`: a chat vote's own
conversation of each side less the answer voted on; the prompt for any other vote. The
form is decided once for the whole file (TRL reads one form per dataset):

* explicit prompt (`prompt`, `chosen`, `rejected`, the ordinary export) when, in every
  row written, the two contexts are equal: the prompt is that context (the whole history
  so far, not just the conversation's opening), each answer one assistant message;
* implicit prompt (`chosen`, `rejected` only) otherwise: each is that side's whole
  conversation ending with its answer (conversational), or that conversation as an HH
  transcript followed by the answer (standard), which TRL splits itself.

A ties file follows the same form: `prompt`, `response_a`, `response_b`, `label`, or in
the implicit form `response_a` / `response_b` as whole conversations and `label`. A
store of chat votes is small next to a pool's, so this path is plain Python per row;
a store without chat votes never comes here (annotate/export.py's Arrow path).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from annotate.transcript import MESSAGES_TYPE, hh_transcript, render_prompt_text

Messages = list[dict[str, str]]


def chat_contexts(votes: pa.Table) -> tuple[list[Messages], list[Messages]] | None:
    """(context of a, context of b) per vote, or None when none is a chat vote."""
    from trainer.store import side_contexts

    if "conversation_a" not in votes.column_names or votes["conversation_a"].null_count == len(votes):
        return None
    rows = votes.select(["prompt", "conversation_a", "conversation_b"]).to_pylist()
    contexts = [side_contexts(r) for r in rows]
    return [c[0] for c in contexts], [c[1] for c in contexts]


def _turn(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


def _explicit(context: Messages, answers: tuple[str, str], fmt: str) -> tuple[Any, Any, Any]:
    """(prompt, first answer, second answer) of the explicit-prompt form."""
    if fmt == "conversational":
        return context, _turn(answers[0]), _turn(answers[1])
    text, transcript = render_prompt_text(context)
    space = " " if transcript else ""  # an answer to a transcript follows "Assistant:"
    return text, space + answers[0], space + answers[1]


def _whole(context: Messages, answer: str, fmt: str) -> Any:
    """One side of the implicit-prompt form: its conversation ending with its answer."""
    if fmt == "conversational":
        return [*context, *_turn(answer)]
    # Always the transcript, even for one user message: a whole conversation must say
    # where its answer starts (a bare "prompt" + "answer" would read as one text).
    return hh_transcript(context) + " " + answer


def chat_tables(
    votes: pa.Table,
    plan: pa.Table,
    is_pref: pa.Array,
    contexts: tuple[list[Messages], list[Messages]],
    fmt: str,
    margin: bool,
    ties: str,
) -> tuple[pa.Table, pa.Table | None, bool]:
    """The preference rows (and the ties table when ties == "separate") of annotate/export.py's
    plan (`row`: the vote standing for the output row, `outcome`, `margin`), and whether
    they are in the implicit-prompt form."""
    context_a, context_b = contexts
    response_a, response_b = votes["response_a"].to_pylist(), votes["response_b"].to_pylist()
    planned = plan.to_pylist()
    keep = is_pref.to_pylist()
    prefs = [p for p, k in zip(planned, keep) if k]
    tied = [p for p, k in zip(planned, keep) if not k] if ties == "separate" else []
    implicit = any(context_a[p["row"]] != context_b[p["row"]] for p in prefs + tied)
    text = MESSAGES_TYPE if fmt == "conversational" else pa.string()

    columns: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for p in prefs:
        i, b_wins = p["row"], p["outcome"] == "b"
        sides = [(context_a[i], response_a[i]), (context_b[i], response_b[i])]
        (chosen_context, chosen), (rejected_context, rejected) = sides[::-1] if b_wins else sides
        if implicit:
            columns["chosen"].append(_whole(chosen_context, chosen, fmt))
            columns["rejected"].append(_whole(rejected_context, rejected, fmt))
        else:
            prompt, c, r = _explicit(chosen_context, (chosen, rejected), fmt)
            columns["prompt"].append(prompt)
            columns["chosen"].append(c)
            columns["rejected"].append(r)
    if implicit:
        del columns["prompt"]
    table = {name: pa.array(values, text) for name, values in columns.items()}
    if margin:
        table["margin"] = pa.array([p["margin"] for p in prefs], pa.float64())
    pairs = pa.table(table)

    ties_table = None
    if ties == "separate":
        out: dict[str, list] = {"prompt": [], "response_a": [], "response_b": [], "label": []}
        for p in tied:
            i = p["row"]
            if implicit:
                out["response_a"].append(_whole(context_a[i], response_a[i], fmt))
                out["response_b"].append(_whole(context_b[i], response_b[i], fmt))
            else:
                prompt, a, b = _explicit(context_a[i], (response_a[i], response_b[i]), fmt)
                out["prompt"].append(prompt)
                out["response_a"].append(a)
                out["response_b"].append(b)
            out["label"].append(p["outcome"])
        if implicit:
            del out["prompt"]
        ties_table = pa.table(
            {name: pa.array(values, pa.string() if name == "label" else text) for name, values in out.items()}
        )
    return pairs, ties_table, implicit
