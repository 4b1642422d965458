"""`preflab annotators`: which annotators' votes to trust, one row per annotator.

    preflab annotators --data comparisons                      # an aligned table
    preflab annotators --data postgresql://me@db:5432/votes --json
    preflab annotators --data comparisons --min-failed-gold 3 --flag-below 0.5

The numbers are trainer/annotator_quality.py's (`annotator_table`, which says how each
is computed), over the store's standing votes; the flag rule's settings are flags here.
`preflab train-reward --weights competence|gold` weighs the votes by the same numbers.
A store that cannot be read, or bad flags, is an `error: ...` line (exit 2).
"""

from __future__ import annotations

import argparse
import json

from trainer.store import DATA_HELP

# What the table is computed from: the rest of the record (prompts, models) is not read.
COLUMNS = [
    "pair_id",
    "annotator",
    "choice",
    "created_at",
    "decision_ms",
    "response_a",
    "response_b",
    "gen_params",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Per annotator, from the standing votes: gold accuracy with its 95% Wilson interval "
        "(votes on gold items), agreement with the others on shared pairs (with and without "
        "ties; both-bad counts as a tie), Dawid-Skene competence (the probability that their "
        "vote is the true answer, estimated by EM from all pairs two or more annotators voted "
        "on; weight: the same, chance-corrected, as train-reward --weights competence uses it), "
        "votes per hour of work (gaps over 30 minutes are breaks), median decision time, and "
        "the rank correlation of decision time with answer length (near 0: not reading). "
        "An annotator is flagged when at least --min-failed-gold gold checks failed and the "
        "upper end of their gold-accuracy interval is below --flag-below."
    )
    p.add_argument("--data", required=True, metavar="STORE", help=DATA_HELP)
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: {store, votes, min_failed_gold, flag_below, annotators: "
        "[one object per annotator: the table's numbers, null where undefined]}",
    )
    p.add_argument(
        "--min-failed-gold",
        type=int,
        default=2,
        metavar="N",
        help="flag only annotators with at least N failed gold checks (2, as Prolific asks: never on one slip)",
    )
    p.add_argument(
        "--flag-below",
        type=float,
        default=0.6,
        metavar="X",
        help="flag only when the upper end of the 95%% interval of gold accuracy is below X (0-1]",
    )


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table_text(rows: list[dict]) -> str:
    """The rows as an aligned text table (names left, numbers right), then one line per
    flagged annotator with the rule's reason."""
    header = [
        "annotator",
        "votes",
        "gold",
        "gold acc [95% CI]",
        "agree",
        "agree no ties",
        "competence",
        "weight",
        "votes/h",
        "median ms",
        "time~length",
        "flag",
    ]
    lines = []
    for r in rows:
        interval = (
            f"{r['gold_accuracy']:.2f} [{r['gold_low']:.2f}-{r['gold_high']:.2f}]" if r["gold_n"] else "-"
        )
        lines.append(
            [
                r["annotator"],
                str(r["votes"]),
                f"{r['gold_correct']}/{r['gold_n']}" if r["gold_n"] else "-",
                interval,
                _fmt(r["agreement"], ".2f"),
                _fmt(r["agreement_no_ties"], ".2f"),
                _fmt(r["competence"], ".2f"),
                _fmt(r["competence_weight"], ".2f"),
                _fmt(r["votes_per_hour"], ".0f"),
                _fmt(r["median_decision_ms"], ".0f"),
                _fmt(r["decision_length_corr"], "+.2f"),
                "FLAG" if r["flag_rule"] else "",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def join(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [join(header), *(join(row) for row in lines)]
    flagged = [r for r in rows if r["flag_rule"]]
    if flagged:
        out.append("")
        out.extend(f"{r['annotator']}: {r['flag_reason']}" for r in flagged)
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from trainer.annotator_quality import annotator_table, check_flag_settings
    from trainer.store import describe, read_comparisons

    check_flag_settings(args.min_failed_gold, args.flag_below)  # before reading a big store
    # A store that is missing, unreadable or down is a StoreError: annotate/cli.py prints it.
    votes = read_comparisons(args.data, columns=COLUMNS)
    rows = annotator_table(votes, min_failed_gold=args.min_failed_gold, flag_below=args.flag_below)
    if args.json:
        out = {
            "store": describe(args.data),
            "votes": votes.num_rows,
            "min_failed_gold": args.min_failed_gold,
            "flag_below": args.flag_below,
            "annotators": rows,
        }
        print(json.dumps(out, ensure_ascii=False))
        return 0
    if not rows:
        print(f"{describe(args.data)}: no standing votes yet")
        return 0
    print(table_text(rows))
    print(
        f"\n{votes.num_rows} standing votes of {len(rows)} annotators in {describe(args.data)}; "
        f"flag rule: at least {args.min_failed_gold} failed gold checks and the upper end of the "
        f"95% interval of gold accuracy below {args.flag_below}"
    )
    return 0
