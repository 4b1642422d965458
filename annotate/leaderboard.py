"""`preflab leaderboard`: rank the models of a comparison store by Bradley-Terry ratings
from the human votes, with 95% bootstrap intervals, on an Elo-like scale.

    preflab leaderboard --data comparisons                      # table, centred on 1000
    preflab leaderboard --data comparisons --anchor smollm2     # smollm2 is rated 1000
    preflab leaderboard --data comparisons --json --runs runs   # machine-readable, with policy evals
    preflab leaderboard --data postgresql://me@db:5432/votes    # a PostgreSQL store, the same
    preflab leaderboard --data comparisons --style-control      # length and markdown held equal
    preflab leaderboard --data comparisons --include-flagged    # confirmed-flagged annotators' votes too

The leaderboard of a store, for the command line and for the Leaderboard tab of
`preflab serve` (annotate/web/leaderboard_tab.py renders `standings`, its API returns
`leaderboard_json`): the ratings are annotate/ratings.py's (on annotate/bradley_terry.py's
fit), the style-controlled ones annotate/style_control.py's, the policy evaluations
annotate/policy_evals.py's. The votes are trainer/flags.py's `read_counted_votes`: the
votes of annotators whose flag an admin confirmed are left out of the ratings and of the
policy evaluations' human win rate unless `include_flagged` (`--include-flagged`, the
tab's checkbox, the API's `include_flagged`), and every output says how many were.
Bad settings and votes that cannot rank anything raise LeaderboardError, which
annotate/cli.py prints as `error: ...` (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from annotate.bradley_terry import BOTH_BAD_MODES, VOTE_COLUMNS, battles_from_votes
from annotate.policy_evals import evals_table, policy_evals
from annotate.ratings import LeaderboardError, leaderboard
from annotate.style_control import STYLE_COLUMNS, style_leaderboard
from trainer.flags import INCLUDE_FLAGGED_HELP, PAGE_SWITCH, FlagExclusion, read_counted_votes
from trainer.selection import without_gold
from trainer.store import DATA_HELP


def read_votes(data: str | os.PathLike, style_control: bool, include_flagged: bool):
    """(the votes a board counts, FlagExclusion): only the columns the fit needs, no
    votes on gold items (trainer/selection.py's without_gold says why), and no model
    judge's (trainer/judges.py): the board rates models by what people prefer."""
    from trainer.judges import select_judges

    columns = STYLE_COLUMNS if style_control else VOTE_COLUMNS
    wanted = list(dict.fromkeys([*columns, "gen_params", "annotator"]))
    votes, exclusion = read_counted_votes(data, wanted, include_flagged=include_flagged)
    votes, _ = select_judges(votes, "exclude")
    return without_gold(votes).select(columns), exclusion


def flagged_json(exclusion: FlagExclusion, switch: str) -> dict[str, Any]:
    """What a board's JSON says about confirmed-flagged annotators (FlagExclusion.to_dict
    and its note, "" when nobody is confirmed)."""
    return {**exclusion.to_dict(), "note": exclusion.note(switch)}


def standings(
    data: str | os.PathLike,
    runs_dir: str | os.PathLike,
    *,
    anchor: str | None = None,
    rounds: int = 100,
    seed: int = 0,
    style_control: bool = False,
    include_flagged: bool = False,
) -> dict[str, Any]:
    """The leaderboard of the store `data` as the page shows it: {"ok", "error", "message",
    "models", "board" (a ratings.Leaderboard, or None), "evals" (policy_evals, or None),
    "style" (a style_control.StyleControl, or None), "flagged" (flagged_json; None when
    the store could not be read)}. Confirmed-flagged annotators' votes are left out
    unless include_flagged; `message` starts with how many were. With style_control the board is the
    style-controlled one (the answers are read too), and "style" holds it with the
    plain board and the coefficients.
    A store that cannot be read gives ok False, error True; votes that rank nothing yet
    (none, or one model only: the normal start of an arena) ok False, error False; the
    reason is `message`, never an exception: the tab says it where the table would be,
    in red only for an error. An anchor that is no longer among the models falls back to
    the mean, with a note."""
    from trainer.store import StoreError

    try:
        votes, exclusion = read_votes(data, style_control, include_flagged)
    except StoreError as e:  # e.g. the database is down: said on the tab, like the CLI says it
        return {
            "ok": False,
            "error": True,
            "message": str(e),
            "models": [],
            "board": None,
            "evals": None,
            "style": None,
            "flagged": None,
        }
    flagged = flagged_json(exclusion, PAGE_SWITCH)
    evals = policy_evals(runs_dir, votes)
    battles = battles_from_votes(votes)
    note = flagged["note"] + ". " if flagged["note"] else ""
    if anchor is not None and anchor not in battles.models:
        note += f"The anchor {anchor} has no votes now; the mean of the models is 1000 instead. "
        anchor = None
    style = None
    try:
        if style_control:
            # one thread: a server's cores are the annotators' too (the CLI takes them all)
            style = style_leaderboard(votes, anchor=anchor, rounds=rounds, seed=seed, workers=1)
            board = style.board
        else:
            board = leaderboard(battles, anchor=anchor, rounds=rounds, seed=seed)
    except LeaderboardError as e:
        return {
            "ok": False,
            "error": False,  # not enough votes to rank yet: a state, not a failure
            "message": note + str(e),
            "models": battles.models,
            "board": None,
            "evals": evals,
            "style": None,
            "flagged": flagged,
        }
    notes = [*style.notes(), *board.notes()] if style else board.notes()
    message = note + " · ".join([*notes, board.scale_note()])
    return {
        "ok": True,
        "error": False,
        "message": message,
        "models": battles.models,
        "board": board,
        "evals": evals,
        "style": style,
        "flagged": flagged,
    }


def leaderboard_json(
    data: str | os.PathLike,
    runs_dir: str | os.PathLike,
    anchor: str | None = None,
    style_control: bool = False,
    include_flagged: bool = False,
) -> dict:
    """Ratings, 95% intervals, ranks, win-rate matrix, vote counts and policy evaluations,
    JSON-able (the /leaderboard API); with style_control also "style_control" (the
    style-controlled board and its coefficients, StyleControl.to_dict); "excluded_flagged"
    says whose votes were left out (unless include_flagged) or kept (flagged_json).
    StoreError / LeaderboardError propagate."""
    votes, exclusion = read_votes(data, style_control, include_flagged)
    if style_control:
        style = style_leaderboard(votes, anchor=anchor, workers=1)  # in the server, as standings
        out = style.plain.to_dict()
        out["style_control"] = style.to_dict()
    else:
        out = leaderboard(votes, anchor=anchor).to_dict()
    out["policy_evals"] = policy_evals(runs_dir, votes)
    out["excluded_flagged"] = flagged_json(exclusion, "include_flagged")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Rank the models of a comparison store by Bradley-Terry ratings from the human votes "
        "(a win counts 1, a tie half a win to each side), with 95% bootstrap intervals, on an "
        "Elo-like scale: 1000 is the mean of the models (or the --anchor model), +400 points "
        "means 10:1 odds of winning. A model ranks above another only when its interval is clear "
        "of the other's. Votes comparing a model with itself are left out."
    )
    p.add_argument("--data", required=True, metavar="STORE", help=DATA_HELP)
    p.add_argument(
        "--anchor",
        metavar="MODEL",
        default=None,
        help="the model rated exactly 1000; without it the mean of all models is 1000",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=100,
        metavar="N",
        help="bootstrap rounds for the 95%% intervals (0: no intervals)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument(
        "--both-bad",
        choices=BOTH_BAD_MODES,
        default="tie",
        help="'both bad' votes: a tie (half a win each, as FastChat does) or left out",
    )
    p.add_argument(
        "--style-control",
        action="store_true",
        help="also fit the ratings with the answers' style held equal (LMArena's style control: "
        "Bradley-Terry with the length in tokens, markdown headers, list items and bold text of the "
        "two answers as covariates) and print how much each of those sways the votes; reads the "
        "answers' text as well",
    )
    p.add_argument("--include-flagged", action="store_true", help=INCLUDE_FLAGGED_HELP)
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (ratings, intervals, ranks, win-rate matrix, counts) instead of the table",
    )
    p.add_argument(
        "--runs",
        metavar="DIR",
        default=None,
        help="also list policy evaluations (DIR/<run_id>/eval.json): the reward model's win rate "
        "of a policy over its reference next to the humans' win rate from the votes",
    )


def run(args: argparse.Namespace) -> int:
    from trainer.store import describe

    if args.rounds < 0:
        raise LeaderboardError(f"--rounds must be 0 or more, got {args.rounds}")
    t0 = time.perf_counter()
    # A store problem (missing, unreadable, database down) is a StoreError, and a
    # LeaderboardError the votes' verdict: annotate/cli.py prints either as one line.
    votes, exclusion = read_votes(args.data, args.style_control, args.include_flagged)
    flagged = flagged_json(exclusion, "--include-flagged")
    read_s = time.perf_counter() - t0
    settings = dict(anchor=args.anchor, rounds=args.rounds, seed=args.seed, both_bad=args.both_bad)
    style = None
    try:
        if args.style_control:
            style = style_leaderboard(votes, **settings)
            board = style.plain
        else:
            board = leaderboard(votes, **settings)
    except LeaderboardError as e:
        also = f" ({flagged['note']})" if flagged["note"] else ""
        raise LeaderboardError(f"{describe(args.data)}: {e}{also}") from None
    board.timings = {"read": read_s, **board.timings}
    evals = policy_evals(args.runs, votes) if args.runs else None
    if args.json:
        out = board.to_dict()
        if style is not None:
            out["style_control"] = style.to_dict()
        if evals is not None:
            out["policy_evals"] = evals
        out["excluded_flagged"] = flagged
        print(json.dumps(out, ensure_ascii=False))
        return 0
    if flagged["note"]:
        print(flagged["note"])
    if style is not None:
        # The style-controlled ranking is what was asked for; the plain rating is a column.
        for line in [*style.notes(), *board.notes()]:
            print(line)
        print(board.scale_note())
        print()
        print(style.table())
        print()
        print(style.coefficients_table())
    else:
        for line in board.notes():
            print(line)
        print(board.scale_note())
        print()
        print(board.table())
    if evals is not None:
        print()
        print("reward model vs humans: win rate of each policy over its reference")
        print(evals_table(evals))
    t = board.timings
    print(
        f"\nread {t['read']:.2f}s, counted {t['aggregate']:.2f}s, fit {t['fit']:.3f}s, "
        f"bootstrap {t['bootstrap']:.2f}s",
        file=sys.stderr,
    )
    if style is not None:
        t = style.timings
        print(
            f"style control: features {t['features']:.2f}s, fit {t['fit']:.3f}s, bootstrap {t['bootstrap']:.2f}s",
            file=sys.stderr,
        )
    return 0
