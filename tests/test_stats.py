"""Dashboard statistics, checked against values worked out by hand (in the comments)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pandas as pd
import pyarrow as pa
import pytest
from helpers import vote_record

from annotate import agreement, stats
from trainer.evaluate import wilson_interval
from trainer.store import records_to_table

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def votes_table(rows, start=T0) -> pa.Table:
    """rows: (pair_id, annotator, choice, left[, model_a, model_b[, minutes, decision_ms]]).

    Only the columns the statistics read; `minutes` is the offset of created_at from
    `start` (default: the row number, so later rows are later votes)."""
    columns = {
        k: []
        for k in ("pair_id", "annotator", "choice", "left", "model_a", "model_b", "created_at", "decision_ms")
    }
    for i, row in enumerate(rows):
        pair, annotator, choice, left, *rest = row
        model_a, model_b = rest[:2] if len(rest) >= 2 else ("m1", "m2")
        minutes = rest[2] if len(rest) >= 3 else i
        decision_ms = rest[3] if len(rest) >= 4 else 1000
        for k, value in zip(
            columns,
            (
                pair,
                annotator,
                choice,
                left,
                model_a,
                model_b,
                start + timedelta(minutes=minutes),
                decision_ms,
            ),
        ):
            columns[k].append(value)
    return pa.table(
        {
            **{
                k: pa.array(v, pa.string())
                for k, v in columns.items()
                if k not in ("created_at", "decision_ms")
            },
            "created_at": pa.array(columns["created_at"], pa.timestamp("us", tz="UTC")),
            "decision_ms": pa.array(columns["decision_ms"], pa.int32()),
        }
    )


# ---- shares and intervals ------------------------------------------------------------


def test_choice_rates_are_shares_of_all_votes():
    t = votes_table(
        [
            ("p1", "x", "a", "a"),
            ("p2", "x", "a", "b"),
            ("p3", "x", "b", "a"),
            ("p4", "x", "tie", "a"),
            ("p5", "x", "both_bad", "a"),
        ]
    )
    assert stats.choice_rates(t) == {"a": 0.4, "b": 0.2, "tie": 0.2, "both_bad": 0.2}


def test_choice_rates_of_no_votes_are_nan_not_an_error():
    rates = stats.choice_rates(votes_table([]))
    assert set(rates) == {"a", "b", "tie", "both_bad"}
    assert all(math.isnan(x) for x in rates.values())


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        # 8/10: center (0.8 + 1.9208/10) / 1.38415 = 0.71674, half-width
        # 1.95996 / 1.38415 * sqrt(0.016 + 0.0096037) = 0.22658.
        (8, 10, 0.49016, 0.94332),
        # 0/10: low is exactly 0, high = (z^2/n) / (1 + z^2/n) = 0.38415 / 1.38415.
        (0, 10, 0.0, 0.27753),
        # Symmetric to the case above.
        (10, 10, 0.72247, 1.0),
        # 50/100: 0.5 -+ 1.95996/1.038415 * sqrt(0.0025 + 0.000096) = 0.5 -+ 0.09617
        (50, 100, 0.40383, 0.59617),
    ],
)
def test_wilson_interval_matches_hand_computed_values(k, n, low, high):
    got_low, got_high = wilson_interval(k, n)
    assert got_low == pytest.approx(low, abs=1e-5)
    assert got_high == pytest.approx(high, abs=1e-5)


def test_wilson_interval_of_nothing_is_nan():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_position_bias_counts_the_chosen_side_against_the_left_side():
    t = votes_table(
        [
            ("p1", "x", "a", "a"),  # chose the left one
            ("p2", "x", "b", "b"),  # b was shown on the left and won: left
            ("p3", "x", "a", "b"),  # a was on the right: right
            ("p4", "x", "b", "a"),  # right
            ("p5", "x", "b", "b"),  # left
            ("p6", "x", "tie", "a"),  # not decisive: ignored
            ("p7", "x", "both_bad", "b"),  # ignored
        ]
    )
    bias = stats.position_bias(t)
    assert bias["n"] == 5
    assert bias["share_left"] == pytest.approx(3 / 5)
    low, high = wilson_interval(3, 5)
    assert (bias["low"], bias["high"]) == (pytest.approx(low), pytest.approx(high))
    # 3/5 with n = 5 is far from significant: the interval must contain 0.5.
    assert bias["low"] < 0.5 < bias["high"]


def test_median_decision_ms_ignores_missing_times():
    t = votes_table(
        [
            ("p1", "x", "a", "a", "m1", "m2", 0, 100),
            ("p2", "x", "a", "a", "m1", "m2", 1, None),
            ("p3", "x", "a", "a", "m1", "m2", 2, 300),
            ("p4", "x", "a", "a", "m1", "m2", 3, 4000),
            ("p5", "x", "a", "a", "m1", "m2", 4, None),
        ]
    )
    # Of 100, 300, 4000 the median is 300 (with the nulls as 0 it would be 100).
    assert stats.median_decision_ms(t) == 300
    only_nulls = votes_table([("p1", "x", "a", "a", "m1", "m2", 0, None)])
    assert math.isnan(stats.median_decision_ms(only_nulls))


# ---- per annotator, model, day -------------------------------------------------------


def test_votes_by_annotator():
    t = votes_table(
        [
            ("p1", "bob", "a", "a", "m1", "m2", 0, 1000),
            ("p2", "bob", "tie", "a", "m1", "m2", 1, 3000),
            ("p3", "bob", "both_bad", "a", "m1", "m2", 2, None),
            ("p4", "bob", "b", "a", "m1", "m2", 3, 2000),
            ("p1", "amy", "a", "a", "m1", "m2", 4, 500),
            ("p2", "amy", "a", "a", "m1", "m2", 5, 700),
        ]
    )
    by = stats.votes_by(t, "annotator")
    assert list(by.columns) == [
        "annotator",
        "votes",
        "ties",
        "both_bad",
        "tie_rate",
        "both_bad_rate",
        "left_share",
        "median_decision_ms",
    ]
    assert list(by["annotator"]) == ["bob", "amy"]  # most votes first
    bob, amy = by.iloc[0], by.iloc[1]
    assert (bob["votes"], bob["ties"], bob["both_bad"]) == (4, 1, 1)
    assert (bob["tie_rate"], bob["both_bad_rate"]) == (0.25, 0.25)
    # Bob's decisive votes: a on the left (left), b with a on the left (right).
    assert bob["left_share"] == 0.5
    # Median of 1000, 3000, 2000, the null skipped.
    assert bob["median_decision_ms"] == 2000
    assert (amy["votes"], amy["tie_rate"], amy["left_share"], amy["median_decision_ms"]) == (2, 0.0, 1.0, 600)


def test_votes_by_model_counts_a_vote_for_each_side_and_a_self_pair_once():
    t = votes_table(
        [
            ("p1", "x", "a", "a", "base", "tuned"),
            ("p2", "x", "tie", "a", "tuned", "base"),
            ("p3", "x", "b", "a", "tuned", "tuned"),  # a model against itself
            ("p4", "x", "both_bad", "a", "base", "other"),
        ]
    )
    by = stats.votes_by(t, "model").set_index("model")
    assert by["votes"].to_dict() == {"tuned": 3, "base": 3, "other": 1}
    assert list(by.index) == ["base", "tuned", "other"]  # ties in count: by name
    assert by.loc["base", "ties"] == 1 and by.loc["base", "both_bad"] == 1
    assert by.loc["tuned", "tie_rate"] == pytest.approx(1 / 3)
    assert by.loc["other", "both_bad_rate"] == 1.0


def test_votes_by_day_uses_the_utc_date():
    midnight = datetime(2025, 3, 2, tzinfo=UTC)
    t = votes_table(
        [
            ("p1", "x", "a", "a", "m1", "m2", -30),  # 2025-03-01 23:30 UTC
            ("p2", "x", "tie", "a", "m1", "m2", 30),  # 2025-03-02 00:30 UTC
            ("p3", "x", "a", "a", "m1", "m2", 60 * 23),  # 2025-03-02 23:00 UTC
            ("p4", "x", "a", "a", "m1", "m2", 60 * 24 * 3),  # 2025-03-05
        ],
        start=midnight,
    )
    by = stats.votes_by(t, "day")
    assert list(by["day"]) == ["2025-03-01", "2025-03-02", "2025-03-05"]
    assert list(by["votes"]) == [1, 2, 1]
    assert list(by["tie_rate"]) == [0.0, 0.5, 0.0]

    # The same instants shown in Berlin time (UTC+1): 00:30 local on the 2nd is still
    # the 1st in UTC, so the grouping must not change.
    df = t.to_pandas()
    df["created_at"] = df["created_at"].dt.tz_convert("Europe/Berlin")
    assert df["created_at"].iloc[0].day == 2
    pd.testing.assert_frame_equal(stats.votes_by(df, "day"), by)


def test_votes_by_refuses_an_unknown_grouping():
    with pytest.raises(ValueError, match="annotator, model, day"):
        stats.votes_by(votes_table([]), "prompt")


def test_a_missing_column_is_named():
    t = votes_table([("p1", "x", "a", "a")]).drop_columns(["left"])
    with pytest.raises(ValueError, match="'left'"):
        stats.position_bias(t)


# ---- Cohen's kappa -------------------------------------------------------------------

# Alice and Bob on ten pairs. Table rows alternate who comes first, so that a bug
# pairing one annotator's label with the other's marginals would show.
#
#   pair   p1 p2 p3 p4  p5 p6 p7 p8  p9 p10
#   alice  a  a  a  a   b  b  b  tie bb a
#   bob    a  a  b  tie b  b  a  tie bb a
#
# agree on p1 p2 p5 p6 p8 p9 p10: p_o = 7/10.
# alice: a 5, b 3, tie 1, both_bad 1;  bob: a 4, b 3, tie 2, both_bad 1
# p_e = (5*4 + 3*3 + 1*2 + 1*1) / 100 = 0.32
# kappa = (0.70 - 0.32) / (1 - 0.32) = 0.38 / 0.68 = 19/34
KAPPA_ROWS = [
    ("p1", "alice", "a", "a"),
    ("p1", "bob", "a", "b"),
    ("p2", "bob", "a", "a"),
    ("p2", "alice", "a", "a"),
    ("p3", "alice", "a", "b"),
    ("p3", "bob", "b", "a"),
    ("p4", "bob", "tie", "a"),
    ("p4", "alice", "a", "b"),
    ("p5", "alice", "b", "a"),
    ("p5", "bob", "b", "a"),
    ("p6", "bob", "b", "b"),
    ("p6", "alice", "b", "a"),
    ("p7", "alice", "b", "a"),
    ("p7", "bob", "a", "a"),
    ("p8", "bob", "tie", "b"),
    ("p8", "alice", "tie", "a"),
    ("p9", "alice", "both_bad", "a"),
    ("p9", "bob", "both_bad", "a"),
    ("p10", "bob", "a", "a"),
    ("p10", "alice", "a", "b"),
]


def test_cohens_kappa_matches_the_hand_computed_value():
    k = agreement.cohens_kappa(votes_table(KAPPA_ROWS))
    assert list(k.columns) == ["annotator_1", "annotator_2", "n_shared", "agreement", "kappa", "note"]
    assert len(k) == 1
    row = k.iloc[0]
    assert (row["annotator_1"], row["annotator_2"], row["n_shared"]) == ("alice", "bob", 10)
    assert row["agreement"] == pytest.approx(0.7)
    assert row["kappa"] == pytest.approx(19 / 34)
    assert row["note"] == ""


def test_cohens_kappa_takes_each_annotators_latest_vote_on_a_pair():
    # An older vote of Alice on p3 that agrees with Bob, and an older vote of Bob on
    # p7 placed AFTER his later one in the table: only time decides, not row order.
    # Counting the old votes would lift agreement to 9/10.
    rows = KAPPA_ROWS + [("p3", "alice", "b", "a", "m1", "m2", -10), ("p7", "bob", "b", "a", "m1", "m2", -10)]
    row = agreement.cohens_kappa(votes_table(rows)).iloc[0]
    assert (row["n_shared"], row["agreement"]) == (10, pytest.approx(0.7))
    assert row["kappa"] == pytest.approx(19 / 34)


def test_cohens_kappa_degenerate_pairs_are_nan_with_a_note():
    rows = KAPPA_ROWS + [
        # Carol shares p1 and p2 with both, and says "a" like them: with only one
        # category in use, chance agreement is 1 and kappa 0/0.
        ("p1", "carol", "a", "a"),
        ("p2", "carol", "a", "a"),
        # Dave labels a pair nobody else did: he appears in no row.
        ("p99", "dave", "a", "a"),
    ]
    k = agreement.cohens_kappa(votes_table(rows))
    pairs = list(zip(k["annotator_1"], k["annotator_2"]))
    assert pairs == [("alice", "bob"), ("alice", "carol"), ("bob", "carol")]
    for _, row in k.iloc[1:].iterrows():
        assert row["n_shared"] == 2 and row["agreement"] == 1.0
        assert math.isnan(row["kappa"])
        assert "chance agreement is 1" in row["note"]


def test_cohens_kappa_of_constant_but_opposite_annotators_is_zero_not_nan():
    # Each uses one category, but different ones: p_o = 0, p_e = 0, kappa = 0.
    t = votes_table(
        [("p1", "x", "a", "a"), ("p1", "y", "b", "a"), ("p2", "x", "a", "a"), ("p2", "y", "b", "a")]
    )
    row = agreement.cohens_kappa(t).iloc[0]
    assert (row["agreement"], row["kappa"], row["note"]) == (0.0, 0.0, "")


def test_cohens_kappa_without_shared_pairs_is_an_empty_table():
    k = agreement.cohens_kappa(votes_table([("p1", "x", "a", "a"), ("p2", "y", "a", "a")]))
    assert k.empty and "kappa" in k.columns


# ---- Krippendorff's alpha ------------------------------------------------------------


def test_nominal_alpha_reproduces_krippendorffs_worked_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the nominal
    # example with missing data: 4 observers, 12 units, values 1..5; alpha = 0.743.
    # Unit 12 has a single value and is not pairable, leaving 11 units, 40 values.
    data = {
        "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    }
    units, values = [], []
    for observed in data.values():
        for unit, value in enumerate(observed):
            if value is not None:
                units.append(unit)
                values.append(value)
    result = agreement.nominal_alpha(units, values)
    assert result["alpha"] == pytest.approx(0.743, abs=5e-4)
    assert (result["n_units"], result["n_values"]) == (11, 40)


def test_krippendorff_alpha_from_votes_matches_the_hand_computed_value():
    # p1: a, a, b (three annotators); p2: tie, tie; p3: one label, not pairable;
    # p4: one annotator who voted twice, still one label, not pairable.
    # Coincidences: p1 gives o_aa = 2*1/2 = 1, o_ab = o_ba = 2*1/2 = 1; p2 gives
    # o_tt = 2*1/1 = 2. n_a = 2, n_b = 1, n_tie = 2, n = 5.
    # D_o = (o_ab + o_ba) / n = 2/5;  D_e = (25 - 4 - 1 - 4) / (5 * 4) = 16/20
    # alpha = 1 - 0.4 / 0.8 = 0.5
    t = votes_table(
        [
            ("p1", "x", "a", "a"),
            ("p1", "y", "a", "b"),
            ("p1", "z", "b", "a"),
            ("p2", "x", "tie", "a"),
            ("p2", "y", "tie", "a"),
            ("p3", "x", "b", "a"),
            ("p4", "y", "a", "a"),
            ("p4", "y", "b", "a"),
        ]
    )
    assert agreement.krippendorff_alpha(t) == {"alpha": pytest.approx(0.5), "n_units": 2, "n_values": 5}


def test_krippendorff_alpha_takes_each_annotators_latest_vote():
    # As above, but y also labelled p3, twice: the later vote (a) counts, so p3 is a
    # unit (x: b, y: a). Units: p1 (a, a, b), p2 (tie, tie), p3 (b, a).
    # o_aa = 1, o_ab = o_ba = 1 (p1) + 1*1/1 (p3) = 2, o_tt = 2.
    # n_a = 3, n_b = 2, n_tie = 2, n = 7.
    # D_o = 4/7;  D_e = (49 - 9 - 4 - 4) / (7 * 6) = 32/42;  alpha = 1 - (4/7)/(32/42) = 0.25
    # (Taking y's older vote, b, instead would give p3 (b, b) and alpha = 0.625.)
    t = votes_table(
        [
            ("p1", "x", "a", "a"),
            ("p1", "y", "a", "b"),
            ("p1", "z", "b", "a"),
            ("p2", "x", "tie", "a"),
            ("p2", "y", "tie", "a"),
            ("p3", "x", "b", "a"),
            ("p3", "y", "a", "a", "m1", "m2", 40),  # the later vote, listed first
            ("p3", "y", "b", "a", "m1", "m2", 30),
        ]
    )
    assert agreement.krippendorff_alpha(t) == {"alpha": pytest.approx(0.25), "n_units": 3, "n_values": 7}


def test_krippendorff_alpha_perfect_and_undefined():
    perfect = votes_table(
        [("p1", "x", "a", "a"), ("p1", "y", "a", "a"), ("p2", "x", "tie", "a"), ("p2", "y", "tie", "a")]
    )
    assert agreement.krippendorff_alpha(perfect)["alpha"] == pytest.approx(1.0)
    # One value everywhere: no variation, expected disagreement 0, alpha undefined.
    constant = votes_table([("p1", "x", "a", "a"), ("p1", "y", "a", "a")])
    assert math.isnan(agreement.krippendorff_alpha(constant)["alpha"])
    assert math.isnan(agreement.krippendorff_alpha(votes_table([]))["alpha"])


# ---- the header, and the real record schema ------------------------------------------


def full_record(pair_id, annotator, choice, left, minutes, decision_ms=800):
    return vote_record(
        "hi",
        "x",
        "y",
        choice,
        None if choice in ("tie", "both_bad") else 1,
        event_id=f"e-{pair_id}-{annotator}-{minutes}",
        pair_id=pair_id,
        prompt_id="prompt-" + pair_id,
        model_a="base",
        model_b="tuned",
        left=left,
        annotator=annotator,
        created_at=T0 + timedelta(minutes=minutes),
        decision_ms=decision_ms,
    )


def test_summary_over_a_table_with_the_record_schema():
    records = [full_record(p, a, c, left, i) for i, (p, a, c, left) in enumerate(KAPPA_ROWS)]
    t = records_to_table(records)
    s = stats.summary(t)
    assert (s["votes"], s["pairs"], s["annotators"], s["models"]) == (20, 10, 2, 2)
    assert s["prompts"] == 10
    assert s["first_vote"] == T0 and s["last_vote"] == T0 + timedelta(minutes=19)
    # alice: a 5 b 3 tie 1 bb 1; bob: a 4 b 3 tie 2 bb 1 -> 9, 6, 3, 2 of 20
    assert (s["share_a"], s["share_b"], s["share_tie"], s["share_both_bad"]) == (0.45, 0.3, 0.15, 0.1)
    assert s["decisive_votes"] == 15
    assert s["median_decision_ms"] == 800
    assert s["mean_kappa"] == pytest.approx(19 / 34) and s["kappa_pairs"] == 1
    assert s["alpha_units"] == 10 and s["alpha_values"] == 20
    assert s["alpha"] == pytest.approx(agreement.krippendorff_alpha(t)["alpha"])


def test_a_pandas_frame_gives_the_same_numbers_as_the_arrow_table():
    t = votes_table(KAPPA_ROWS + [("p1", "carol", "tie", "b", "m2", "m3", 30, None)])
    df = t.to_pandas()
    df["choice"] = df["choice"].astype("category")  # dashboards often hold categoricals
    for by in stats.BY:
        pd.testing.assert_frame_equal(stats.votes_by(df, by), stats.votes_by(t, by))
    pd.testing.assert_frame_equal(agreement.cohens_kappa(df), agreement.cohens_kappa(t))
    a, b = stats.summary(df), stats.summary(t)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key] or (
            isinstance(a[key], float) and math.isnan(a[key]) and math.isnan(b[key])
        ), key


def test_votes_on_cut_answers_are_counted():
    records = [full_record(p, a, c, left, i) for i, (p, a, c, left) in enumerate(KAPPA_ROWS[:4])]
    records[0]["gen_params"] = json.dumps({"a": {"seed": 0, "cut": True}, "b": {"seed": 1}})
    records[1]["gen_params"] = '{"a":{"seed":0},"b":{"seed":1,"cut":true}}'  # compact JSON counts too
    records[2]["gen_params"] = json.dumps({"a": {"cut": False}, "b": {}})
    t = records_to_table(records)
    assert stats.cut_votes(t) == 2 == stats.summary(t)["cut_votes"]
    assert stats.cut_votes(t.drop_columns(["gen_params"])) == 0  # imported data has none
    frame = t.to_pandas().assign(gen_params=None)  # a column of nothing but nulls
    assert stats.cut_votes(frame) == 0 and stats.summary(frame)["cut_votes"] == 0
