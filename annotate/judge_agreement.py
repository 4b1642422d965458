"""How far a model judge (`preflab judge`, annotators judge:<name>) agrees with people,
measured as people are measured against each other (annotate/agreement.py).

    rows = judge_agreement(votes)   # standing votes, people's and judges'
    kappa = with_interval(cohens_kappa(people_votes))   # the humans' table, same columns

One row per judge and person who share pairs: {"judge", "annotator", "n_shared",
"agreement" (share of shared pairs with the same choice), "agreement_low",
"agreement_high" (its 95% Wilson interval), "kappa" (Cohen's), "note"}; then, per judge,
a row with annotator "(all people)": the shared pairs summed over people, the agreement
over all of them with its interval, and the mean of the defined kappas (Light's kappa,
as the Dashboard's "Mean Cohen's κ" between people). The kappa and agreement are
`cohens_kappa`'s on the same votes, so a judge's numbers and a person's mean the same
(each annotator's latest vote on a pair; a judge's tie where its two orders disagreed is
a tie like anyone's). Judges are not compared with each other here.
"""

from __future__ import annotations

import math
from typing import Any

from annotate.agreement import cohens_kappa
from trainer.intervals import wilson_interval
from trainer.judges import is_judge

ALL_PEOPLE = "(all people)"


def with_interval(kappa):
    """cohens_kappa's table with agreement_low / agreement_high (95% Wilson) beside
    agreement."""
    out = kappa.copy()
    bounds = [
        wilson_interval(round(a * n), int(n)) if n else (math.nan, math.nan)
        for a, n in zip(out["agreement"], out["n_shared"])
    ]
    at = list(out.columns).index("agreement") + 1
    out.insert(at, "agreement_low", [b[0] for b in bounds])
    out.insert(at + 1, "agreement_high", [b[1] for b in bounds])
    return out


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def judge_agreement(votes) -> list[dict[str, Any]]:
    if votes.num_rows == 0:
        return []
    kappa = with_interval(cohens_kappa(votes))
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in kappa.to_dict(orient="records"):
        first, second = is_judge(r["annotator_1"]), is_judge(r["annotator_2"])
        if first == second:  # two people (the humans' own table), or two judges
            continue
        judge, person = (
            (r["annotator_1"], r["annotator_2"]) if first else (r["annotator_2"], r["annotator_1"])
        )
        rows.setdefault(judge, []).append(
            {
                "judge": judge,
                "annotator": person,
                "n_shared": int(r["n_shared"]),
                "agreement": _num(r["agreement"]),
                "agreement_low": _num(r["agreement_low"]),
                "agreement_high": _num(r["agreement_high"]),
                "kappa": _num(r["kappa"]),
                "note": r["note"],
            }
        )
    out = []
    for judge in sorted(rows):
        people = sorted(rows[judge], key=lambda r: r["annotator"])
        n = sum(r["n_shared"] for r in people)
        agreeing = sum(round(r["agreement"] * r["n_shared"]) for r in people if r["agreement"] is not None)
        low, high = wilson_interval(agreeing, n) if n else (None, None)
        kappas = [r["kappa"] for r in people if r["kappa"] is not None]
        out.extend(people)
        out.append(
            {
                "judge": judge,
                "annotator": ALL_PEOPLE,
                "n_shared": n,
                "agreement": agreeing / n if n else None,
                "agreement_low": _num(low),
                "agreement_high": _num(high),
                "kappa": sum(kappas) / len(kappas) if kappas else None,
                "note": f"mean kappa over {len(kappas)} of {len(people)} people" if people else "",
            }
        )
    return out
