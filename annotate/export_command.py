"""`preflab export`: the command line of the preference export (annotate/export.py, which
says what each format holds).

    preflab export --data comparisons --out prefs.parquet --format conversational --margin
    preflab export --data postgresql://me@db:5432/votes --out audit.parquet --format records

The flags become export_preferences / export_records arguments; the table goes to
annotate/table_files.py's write_table (Parquet or JSON Lines by the suffix), and what the
export did is printed, in numbers (ExportReport). No preference rows to write: nothing
is written, exit 1.
"""

from __future__ import annotations

import argparse
import sys
import time

import pyarrow as pa

from annotate.export import (
    AGGREGATES,
    FORMATS,
    TIES_MODES,
    export_preferences,
    export_records,
    records_for_json,
)
from annotate.table_files import (
    COMPRESSIONS,
    EXPORT_COMPRESSION,
    SLICE_ROWS,
    output_kind,
    ties_path_for,
    write_table,
)
from trainer.flags import INCLUDE_FLAGGED_HELP
from trainer.judges import JUDGE_MODES, JUDGES_HELP
from trainer.store import DATA_HELP

RECORDS = "records"  # --format records: the votes as stored, every field


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="STORE", help=DATA_HELP)
    p.add_argument(
        "--out", required=True, metavar="FILE", help="output file: .parquet, or .jsonl / .json for JSON Lines"
    )
    p.add_argument(
        "--format",
        choices=(*FORMATS, RECORDS),
        default="standard",
        help="standard: plain strings; conversational: lists of chat messages (both TRL "
        "preference datasets); records: every standing vote, ties and both-bad included, "
        "with exactly the comparison record's fields, oldest first (for audits and tests; "
        "--margin, --ties separate and --aggregate majority do not apply)",
    )
    p.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default=EXPORT_COMPRESSION,
        help="Parquet codec: snappy (the ecosystem default, fastest to write), zstd (about "
        "1.45x smaller, about 2x slower to write), lz4, gzip, none",
    )
    p.add_argument(
        "--margin",
        action="store_true",
        help="add a float `margin` column from the votes' strength (TRL's RewardTrainer uses it)",
    )
    p.add_argument(
        "--ties",
        choices=TIES_MODES,
        default="exclude",
        help="drop tie / both-bad votes, or write them to <out>.ties.<ext>",
    )
    p.add_argument(
        "--aggregate",
        choices=AGGREGATES,
        default="none",
        help="one row per vote, or one row per pair by majority vote",
    )
    p.add_argument(
        "--annotator",
        action="extend",
        nargs="+",
        metavar="NAME",
        default=None,
        help="keep only these annotators' votes (repeatable)",
    )
    p.add_argument(
        "--model",
        action="extend",
        nargs="+",
        metavar="NAME",
        default=None,
        help="keep only pairs where either side's model is one of these (repeatable)",
    )
    p.add_argument(
        "--criterion",
        metavar="NAME",
        default=None,
        help="a preference dataset for one pairwise rubric criterion (serve --rubric): chosen and "
        "rejected by that criterion's judgment instead of the overall vote; its ties are handled as "
        "--ties says; votes that did not judge it are left out",
    )
    p.add_argument(
        "--include-flagged",
        action="store_true",
        help=INCLUDE_FLAGGED_HELP,
    )
    p.add_argument("--judges", choices=JUDGE_MODES, default="exclude", help=JUDGES_HELP)


def counted_votes(args: argparse.Namespace) -> pa.Table:
    """The standing votes without those of confirmed-flagged annotators (unless
    --include-flagged: trainer/flags.py), judges' votes as --judges says (trainer/judges.py),
    saying on stdout what it did about them."""
    from trainer.flags import read_counted_votes
    from trainer.judges import select_judges

    votes, exclusion = read_counted_votes(args.data, include_flagged=args.include_flagged)
    if exclusion.annotators:
        print(f"flagged   {exclusion.note()}")
    votes, judged = select_judges(votes, args.judges)
    if judged:
        print(f"judges    {judged}")
    return votes


def run_records(args: argparse.Namespace, votes: pa.Table, t0: float) -> int:
    records, report = export_records(votes, annotators=args.annotator, models=args.model)
    table = records if output_kind(args.out) == "parquet" else records_for_json(records)
    path = write_table(table, args.out, args.compression)
    print(f"read      {report.votes} standing votes")
    if report.dropped_by_annotator or report.dropped_by_model:
        print(
            f"filtered  {report.dropped_by_annotator} by annotator, "
            f"{report.dropped_by_model} by model; {report.used} votes left"
        )
    print(f"wrote     {report.rows} records ({len(records.column_names)} fields each) to {path}")
    print(f"done      in {time.perf_counter() - t0:.2f}s")
    return 0


def run(args: argparse.Namespace) -> int:
    from trainer.store import describe

    t0 = time.perf_counter()
    try:
        output_kind(args.out)
        if args.format == RECORDS:
            not_for_records = [
                flag
                for flag, given in (
                    ("--margin", args.margin),
                    ("--ties separate", args.ties == "separate"),
                    ("--aggregate majority", args.aggregate == "majority"),
                    ("--criterion", args.criterion is not None),
                )
                if given
            ]
            if not_for_records:
                raise ValueError(
                    f"--format records writes the votes as stored; "
                    f"{', '.join(not_for_records)} does not apply to it"
                )
        if args.criterion is not None and args.margin:
            raise ValueError("--margin comes from the overall vote's strength; a criterion has none")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # A store problem (missing, unreadable, database down) is a StoreError: annotate/cli.py
    # prints it as one line and exits 2.
    votes = counted_votes(args)
    if args.format == RECORDS:
        return run_records(args, votes, t0)
    if args.criterion is not None:
        from annotate.rubric import by_criterion

        votes, line = by_criterion(votes, args.criterion)  # RubricInputError: exit 2
        print(line)
    pairs, ties_table, report = export_preferences(
        votes,
        format=args.format,
        margin=args.margin,
        ties=args.ties,
        aggregate=args.aggregate,
        annotators=args.annotator,
        models=args.model,
        slice_rows=SLICE_ROWS,
    )
    if report.rows == 0:
        for line in report.lines():
            print(line, file=sys.stderr)
        print(
            f"error: no preference rows to export from {describe(args.data)}; nothing written",
            file=sys.stderr,
        )
        return 1
    report.path = str(write_table(pairs, args.out, args.compression))
    if ties_table is not None:
        report.ties_path = str(write_table(ties_table, ties_path_for(args.out), args.compression))
    for line in report.lines():
        print(line)
    print(f"done      in {time.perf_counter() - t0:.2f}s")
    return 0
