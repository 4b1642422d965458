"""`preflab leaderboard`: rank the models of a comparison store by Bradley-Terry ratings
from the human votes, with 95% bootstrap intervals, on an Elo-like scale.

    preflab leaderboard --data comparisons                      # table, centred on 1000
    preflab leaderboard --data comparisons --anchor smollm2     # smollm2 is rated 1000
    preflab leaderboard --data comparisons --json --runs runs   # machine-readable, with policy evals
    preflab leaderboard --data postgresql://me@db:5432/votes    # a PostgreSQL store, the same

Only the command line: the ratings are annotate/ratings.py's (on annotate/bradley_terry.py's
fit), the policy evaluations annotate/policy_evals.py's (the Leaderboard tab of
`preflab serve` shows the same numbers: annotate/web/leaderboard_tab.py). Bad settings
and votes that cannot rank anything raise LeaderboardError, which annotate/cli.py prints
as `error: ...` (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from annotate.bradley_terry import BOTH_BAD_MODES, VOTE_COLUMNS
from annotate.policy_evals import evals_table, policy_evals
from annotate.ratings import LeaderboardError, leaderboard
from trainer.store import DATA_HELP


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
    from trainer.store import describe, read_comparisons

    if args.rounds < 0:
        raise LeaderboardError(f"--rounds must be 0 or more, got {args.rounds}")
    t0 = time.perf_counter()
    # A store problem (missing, unreadable, database down) is a StoreError, and a
    # LeaderboardError the votes' verdict: annotate/cli.py prints either as one line.
    votes = read_comparisons(args.data, columns=VOTE_COLUMNS)
    read_s = time.perf_counter() - t0
    try:
        board = leaderboard(
            votes, anchor=args.anchor, rounds=args.rounds, seed=args.seed, both_bad=args.both_bad
        )
    except LeaderboardError as e:
        raise LeaderboardError(f"{describe(args.data)}: {e}") from None
    board.timings = {"read": read_s, **board.timings}
    evals = policy_evals(args.runs, votes) if args.runs else None
    if args.json:
        out = board.to_dict()
        if evals is not None:
            out["policy_evals"] = evals
        print(json.dumps(out, ensure_ascii=False))
        return 0
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
    return 0
