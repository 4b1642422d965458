"""Preference pairs for the reward model: from votes (or a TRL-format file) to `Pairs`.

    read_pairs(path, ties=, both_bad=, margin=, weights=)  -> Pairs   no tokenizer, no model
    split_by_prompt(pairs, val_fraction, seed)    -> (train, val) index arrays
    save_snapshot / load_snapshot                 the run's own copy of its pairs and split

Tokens and batches (encode_pairs, pack, collate, length_grouped_batches) are in
trainer/reward_batches.py.

A pair is oriented so that `chosen` is the answer the annotator preferred and `label` is
the probability that chosen beats rejected: 1.0 for a vote, 0.5 for a tie or a both-bad
vote (when those are included; by default they are left out, as in `preflab export`).
`margin` is the vote's strength (1 slightly, 2 clearly) times `margin_scale`, or 0.
`weight` is the vote's weight in the loss (`--weights`: trainer/annotator_quality.py's
vote_weights over all the store's standing votes), 1 with `--weights none` and for a file.

Everything here runs before any model is loaded, so bad input fails in seconds with a
RewardDataError that says what is wrong. This module never imports `annotate`.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.criteria import judged_names, judgments
from trainer.errors import PreflabError
from trainer.store import describe, is_database, messages_to_json

TIE_MODES = ("exclude", "include")
NEEDED_COLUMNS = ("prompt", "chosen", "rejected")
# The Anthropic-HH transcript that `preflab export` writes for multi-message prompts in the
# standard (string) format: "\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant:".
HH_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}
HH_CUE = "\n\nAssistant:"


class RewardDataError(PreflabError, ValueError):
    """Input that a reward model cannot be trained on. The message says what to change."""


@dataclass
class Pairs:
    """Preference pairs as parallel lists (one entry per pair)."""

    prompts: list[list[dict[str, str]]] = field(default_factory=list)  # chat messages
    chosen: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    label: list[float] = field(default_factory=list)  # P(chosen beats rejected): 1.0 or 0.5
    margin: list[float] = field(default_factory=list)  # asked-for reward gap (0 = plain BT)
    weight: list[float] = field(default_factory=list)  # the vote's weight in the loss (--weights)
    head: list[int] = field(default_factory=list)  # the reward head it trains (0: overall; --criteria)
    summary: dict[str, Any] = field(default_factory=dict)  # what was read, used, dropped

    def __len__(self) -> int:
        return len(self.chosen)

    def add(self, prompt, chosen, rejected, label=1.0, margin=0.0, weight=1.0, head=0):
        self.head.append(int(head))
        self.prompts.append(prompt)
        self.chosen.append(chosen)
        self.rejected.append(rejected)
        self.label.append(float(label))
        self.margin.append(float(margin))
        self.weight.append(float(weight))

    def subset(self, idx) -> Pairs:
        out = Pairs(summary=dict(self.summary))
        for i in idx:
            out.add(
                self.prompts[i],
                self.chosen[i],
                self.rejected[i],
                self.label[i],
                self.margin[i],
                self.weight[i],
                self.head[i],
            )
        return out

    def prompt_keys(self) -> list[str]:
        # The canonical JSON of the prompt: one spelling per distinct prompt, whatever its source.
        return [messages_to_json(p) for p in self.prompts]


# --------------------------------------------------------------------------------------
# Prompts and answers in the shapes people hand us
# --------------------------------------------------------------------------------------


def text_to_messages(prompt: str) -> tuple[list[dict[str, str]], bool]:
    """A string prompt as chat messages. Returns (messages, is_transcript).

    An HH transcript ("\\n\\nHuman: ... \\n\\nAssistant:") is split back into its turns
    (exactly what `preflab export` writes for multi-turn prompts); any other string is
    one user message, the same rule `trainer.models.render_prompt` applies.
    """
    first_label = prompt[2:].partition(":")[0]
    if prompt.startswith("\n\n") and first_label in HH_ROLES and prompt.endswith(HH_CUE):
        body = prompt[: -len(HH_CUE)]
        messages = []
        for chunk in body.split("\n\n")[1:]:
            role, sep, content = chunk.partition(": ")
            if role in HH_ROLES and sep:
                messages.append({"role": HH_ROLES[role], "content": content})
            elif messages:  # a blank line inside a turn: glue it back onto that turn
                messages[-1]["content"] += "\n\n" + chunk
        if messages:
            return messages, True
    return [{"role": "user", "content": prompt}], False


def as_messages(prompt: Any, where: str = "") -> list[dict[str, str]]:
    """Chat messages from a string, a JSON string of messages, or a list of messages."""
    if isinstance(prompt, str):
        stripped = prompt.lstrip()
        if stripped.startswith("[{"):  # maybe the store's canonical JSON spelling
            try:
                return as_messages(json.loads(prompt), where)
            except (json.JSONDecodeError, RewardDataError):
                pass  # text that merely looks like JSON: it is a user message
        return text_to_messages(prompt)[0]
    if (
        isinstance(prompt, (list, tuple))
        and prompt
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        )
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise RewardDataError(
        f"{where}prompt must be a string or a non-empty list of "
        f"{{'role', 'content'}} messages, got {str(prompt)[:80]!r}"
    )


def as_response(value: Any, transcript: bool = False, where: str = "") -> str:
    """An answer as plain text: a string, or (conversational format) a list of assistant messages."""
    if isinstance(value, str):
        # Answers to an HH transcript carry the space that follows "Assistant:".
        return value[1:] if transcript and value.startswith(" ") else value
    if (
        isinstance(value, (list, tuple))
        and value
        and all(
            isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str)
            for m in value
        )
    ):
        return "".join(m["content"] for m in value)
    raise RewardDataError(
        f"{where}an answer must be a string or a list of assistant messages, got {str(value)[:80]!r}"
    )


# --------------------------------------------------------------------------------------
# Reading: a comparison store or a file
# --------------------------------------------------------------------------------------


def pairs_from_votes(
    votes,
    *,
    ties: str = "exclude",
    both_bad: str = "exclude",
    margin: bool = False,
    margin_scale: float = 1.0,
    source: str = "",
    weights: str = "none",
    criteria: list[str] = (),
) -> Pairs:
    """Standing votes (an Arrow table with the comparison schema) -> oriented pairs.

    One pair per vote: several votes on one pair count several times, which is what the
    Bradley-Terry likelihood of all the votes asks for. `weights` (none, gold, competence:
    trainer.annotator_quality.vote_weights) gives each pair its vote's weight, computed
    from ALL these votes, ties and both-bad included, before any of them is left out
    or split off: competence is estimated from the overlaps, which a split would cut.
    `criteria` (train-reward --criteria): besides each vote's overall pair (head 0), a pair
    for each criterion it judged (head 1, 2, ...: trainer.criteria.judgments, a scale as
    the preference its scores imply), with the vote's weight, no margin (a judgment has no
    strength), its ties as `ties` says.
    """
    from trainer.annotator_quality import AnnotatorQualityError, annotator_weights, vote_weights

    try:
        w = vote_weights(votes, weights)
        per_annotator = annotator_weights(votes, weights) if weights != "none" else {}
    except AnnotatorQualityError as e:
        raise RewardDataError(f"{source}: {e}") from None
    cols = votes.select(["prompt", "response_a", "response_b", "choice", "strength"]).to_pydict()
    parsed: dict[str, list[dict[str, str]]] = {}  # parse each distinct prompt's JSON once
    pairs = Pairs()

    def add_votes(choices, strengths, head: int) -> dict[str, int]:
        counts = {"a": 0, "b": 0, "tie": 0, "both_bad": 0}
        for prompt, a, b, choice, strength, wt in zip(
            cols["prompt"], cols["response_a"], cols["response_b"], choices, strengths, w
        ):
            if choice is None:  # a criterion this vote did not judge
                continue
            counts[choice] = counts.get(choice, 0) + 1
            if prompt not in parsed:
                parsed[prompt] = as_messages(json.loads(prompt))
            m = margin_scale * float(strength or 0) if margin else 0.0
            if choice == "a":
                pairs.add(parsed[prompt], a, b, 1.0, m, wt, head)
            elif choice == "b":
                pairs.add(parsed[prompt], b, a, 1.0, m, wt, head)
            elif (choice == "tie" and ties == "include") or (choice == "both_bad" and both_bad == "include"):
                # No preference: a soft label of 0.5 pulls the two rewards together.
                pairs.add(parsed[prompt], a, b, 0.5, 0.0, wt, head)
        return counts

    counts = add_votes(cols["choice"], cols["strength"], 0)
    votes_n = sum(counts.values())
    if votes_n == 0:
        raise RewardDataError(
            f"{source}: the comparison store holds no standing votes yet; "
            f"collect some votes (or `preflab import` a preference file) first"
        )
    if counts["a"] + counts["b"] == 0:
        raise RewardDataError(
            f"{source}: none of the {votes_n} votes prefers one answer ({counts['tie']} ties, "
            f"{counts['both_bad']} both-bad); a reward model needs votes for 'a' or 'b'"
        )
    per_head = {}
    for head, name in enumerate(criteria, start=1):
        before = len(pairs)
        c = add_votes(judgments(votes, name, scale_as_preference=True), [None] * votes.num_rows, head)
        if sum(c.values()) == 0:
            judged = judged_names(votes)
            raise RewardDataError(
                f"{source}: --criteria {name}: no standing vote judged it (the votes here judge: "
                f"{', '.join(judged) or 'no criteria at all; serve --rubric collects them'})"
            )
        if c["a"] + c["b"] == 0:
            raise RewardDataError(
                f"{source}: --criteria {name}: none of its {c['tie']} judgments prefers one answer"
            )
        per_head[name] = {"judged": sum(c.values()), "ties": c["tie"], "pairs": len(pairs) - before}
    pairs.summary = {
        "source": source,
        "kind": "store",
        "votes": votes_n,
        "preferences": counts["a"] + counts["b"],
        "ties": counts["tie"],
        "both_bad": counts["both_bad"],
        "ties_mode": ties,
        "both_bad_mode": both_bad,
        "pairs": len(pairs),
    }
    if criteria:  # only then: a single-head run's summary stays what it was
        pairs.summary["criteria"] = per_head
    if weights != "none":  # what the weighting did, in config.json's "data" for all to see
        kept = np.asarray(pairs.weight)
        pairs.summary["weights"] = {
            "mode": weights,
            "per_annotator": {name: round(x, 4) for name, x in per_annotator.items()},
            "zero_weight_pairs": int((kept == 0).sum()),
            "mean_weight": round(float(kept.mean()), 4) if len(kept) else None,
        }
    return pairs


def read_rows(path: Path, keep=(*NEEDED_COLUMNS, "margin")) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows) of a Parquet or JSON-lines file; of a Parquet file only the
    columns in `keep` are read (trainer/reward_eval.py also wants `subset`)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise RewardDataError(f"{path}: not a readable Parquet file ({e})") from None
        names = table.column_names
        return names, table.select([c for c in keep if c in names]).to_pylist()
    if suffix in (".jsonl", ".json"):
        from trainer.rows import BadRow, check_values, load_json

        rows = []
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
        # The rows' checks (trainer/rows.py): JSON that parses, nests sanely, holds valid text.
        if suffix == ".json" and text.lstrip().startswith("["):  # a JSON array of rows
            try:
                rows = load_json(text)
            except BadRow as e:
                raise RewardDataError(f"{path}: {e}") from None
            for i, row in enumerate(rows, start=1):
                try:
                    check_values(row)
                except BadRow as e:
                    raise RewardDataError(f"{path}:item {i}: {e}") from None
        else:
            for lineno, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(load_json(line))
                        check_values(rows[-1])
                    except BadRow as e:
                        raise RewardDataError(f"{path}:{lineno}: {e}") from None
        names = sorted({k for r in rows if isinstance(r, dict) for k in r})
        return names, rows
    raise RewardDataError(
        f"{path}: unknown file type {suffix!r}; give a comparison store "
        f"(a directory or a postgresql:// URL), a .parquet, or a .jsonl file"
    )


def pairs_from_file(path, *, margin: bool = False, margin_scale: float = 1.0) -> Pairs:
    """A TRL preference file (standard strings or conversational messages, explicit prompt,
    optional `margin` column) -> pairs. Every row is a preference (label 1)."""
    path = Path(path)
    names, rows = read_rows(path)
    missing = [c for c in NEEDED_COLUMNS if c not in names]
    if missing:
        raise RewardDataError(
            f"{path}: needs the columns {', '.join(NEEDED_COLUMNS)} (TRL's preference format with an "
            f"explicit prompt); missing {', '.join(missing)}; found {', '.join(names) or 'no columns'}"
        )
    if not rows:
        raise RewardDataError(f"{path}: has the right columns but no rows")
    pairs = Pairs()
    has_margin = margin and "margin" in names
    for i, row in enumerate(rows):
        where = f"{path} row {i}: "
        prompt = row.get("prompt")
        transcript = isinstance(prompt, str) and text_to_messages(prompt)[1]
        m = margin_scale * float(row.get("margin") or 0.0) if has_margin else 0.0
        if not math.isfinite(m):
            raise RewardDataError(f"{where}margin must be a finite number, got {row.get('margin')!r}")
        pairs.add(
            as_messages(prompt, where),
            as_response(row.get("chosen"), transcript, where),
            as_response(row.get("rejected"), transcript, where),
            1.0,
            m,
        )
    pairs.summary = {
        "source": str(path),
        "kind": "file",
        "rows": len(rows),
        "preferences": len(rows),
        "ties": 0,
        "both_bad": 0,
        "pairs": len(pairs),
        "margin_column": "margin" in names,
    }
    return pairs


VOTE_COLUMNS = ["prompt", "response_a", "response_b", "choice", "strength"]
# What vote weights are computed from (trainer.annotator_quality): who voted on which
# pair, and when (their latest vote on a pair counts), and which pairs are gold.
WEIGHT_COLUMNS = ["pair_id", "annotator", "created_at", "gen_params"]


def _store_votes(target, columns: list[str], exclude_flagged: bool) -> tuple[Any, list[str], int]:
    """(standing votes, the confirmed-flagged annotators left out, their votes dropped)."""
    from trainer.flags import read_counted_votes

    votes, exclusion = read_counted_votes(str(target), columns, include_flagged=not exclude_flagged)
    if not exclude_flagged:
        return votes, [], 0
    return votes, list(exclusion.annotators), exclusion.dropped


def read_pairs(
    path,
    *,
    ties: str = "exclude",
    both_bad: str = "exclude",
    margin: bool = False,
    margin_scale: float = 1.0,
    weights: str = "none",
    exclude_flagged: bool = True,
    criteria: list[str] = (),
) -> Pairs:
    """Pairs from a comparison store (a directory, or a postgresql:// URL) or a
    TRL-format file. A database that cannot be reached raises trainer.store.StoreError.
    `weights`: per-vote weights (pairs_from_votes); a file has no annotators, so only none.
    From a store, the votes of annotators whose flag an admin confirmed are left out
    (before any weights are computed) unless `exclude_flagged` is False (trainer/flags.py)."""
    if ties not in TIE_MODES or both_bad not in TIE_MODES:
        raise RewardDataError(f"ties / both-bad must be one of {TIE_MODES}")
    columns = (
        VOTE_COLUMNS + (WEIGHT_COLUMNS if weights != "none" else []) + (["criteria"] if criteria else [])
    )
    options = dict(ties=ties, both_bad=both_bad, margin=margin, margin_scale=margin_scale, weights=weights)
    p = None if is_database(path) else Path(path)  # a URL is a store, never a file (Path would fold its "//")
    if p is None or p.is_dir():
        try:
            votes, excluded, dropped = _store_votes(path, columns, exclude_flagged)
        except FileNotFoundError as e:
            raise RewardDataError(str(e)) from None
        source = describe(path) if p is None else str(p)
        pairs = pairs_from_votes(votes, source=source, criteria=list(criteria), **options)
        pairs.summary["excluded_flagged"] = {"annotators": excluded, "votes": dropped}
        return pairs
    if p.is_file():
        if criteria:
            raise RewardDataError(
                f"--criteria needs a comparison store (votes with their rubric judgments); {p} is a "
                f"preference file: train on the store, or `preflab export --criterion NAME` one criterion"
            )
        if weights != "none":
            raise RewardDataError(
                f"--weights {weights} needs a comparison store (votes with their annotators); "
                f"{p} is a preference file: use --weights none, or import it and vote on it"
            )
        return pairs_from_file(p, margin=margin, margin_scale=margin_scale)
    raise RewardDataError(f"{path}: no such comparison store or preference file")


# --------------------------------------------------------------------------------------
# Train / validation split by prompt
# --------------------------------------------------------------------------------------


def split_by_prompt(pairs: Pairs, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, val). All pairs of one prompt land on the same side, so the
    validation accuracy measures generalisation to unseen prompts, not memorised ones."""
    keys = pairs.prompt_keys()
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    # Sorted before shuffling: the split depends only on the data and the seed, never
    # on the order rows came out of the store.
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    target = round(val_fraction * len(pairs))
    val: list[int] = []
    for k in order[:-1]:  # the last group always stays in train, so train is never empty
        if len(val) >= target:
            break
        val.extend(groups[k])
    val_set = set(val)
    train = [i for i in range(len(pairs)) if i not in val_set]
    return np.array(train, dtype=np.int64), np.array(sorted(val), dtype=np.int64)


# --------------------------------------------------------------------------------------
# The run's own copy of its data
# --------------------------------------------------------------------------------------


def save_snapshot(pairs: Pairs, train_idx, val_idx, path) -> None:
    """The exact pairs and split a run trains on, written once into its run directory:
    a resumed run reads this, not the store (which may have new votes by then), so it
    continues the very same optimisation; and one can always tell what a model saw."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    split = np.array(["train"] * len(pairs), dtype=object)
    split[np.asarray(val_idx, dtype=np.int64)] = "val"
    table = pa.table(
        {
            "prompt": pairs.prompt_keys(),
            "chosen": pairs.chosen,
            "rejected": pairs.rejected,
            "label": pa.array(pairs.label, pa.float32()),
            "margin": pa.array(pairs.margin, pa.float32()),
            "weight": pa.array(pairs.weight, pa.float32()),
            "split": split.tolist(),
            # the head each pair trains; only in a multi-head run's snapshot (--criteria)
            **({"head": pa.array(pairs.head, pa.int16())} if any(pairs.head) else {}),
        }
    )
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    # 0600: the snapshot is the votes themselves, as private as the store they came from
    with open(tmp, "wb", opener=lambda name, flags: os.open(name, flags, 0o600)) as f:
        pq.write_table(table, f, compression="zstd")
    os.replace(tmp, path)


def load_snapshot(path, summary: dict | None = None) -> tuple[Pairs, np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    cols = pq.read_table(path).to_pydict()
    pairs = Pairs(summary=dict(summary or {}))
    parsed: dict[str, list[dict[str, str]]] = {}
    # A snapshot from before --weights has no weight column: every vote weighed 1 then.
    weight = cols.get("weight") or [1.0] * len(cols["chosen"])
    head = cols.get("head") or [0] * len(cols["chosen"])  # a single-head snapshot has no column
    for p, c, r, label, m, w, h in zip(
        cols["prompt"], cols["chosen"], cols["rejected"], cols["label"], cols["margin"], weight, head
    ):
        if p not in parsed:
            parsed[p] = json.loads(p)
        pairs.add(parsed[p], c, r, label, m, w, h)
    split = np.array(cols["split"])
    return pairs, np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
