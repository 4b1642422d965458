"""Per-criterion agreement for the Dashboard (serve --rubric): how far annotators who
judged the same pair agree on each criterion, with the overall vote's own measures.

    rows = criterion_agreement(votes, rubric)    # standing votes; rubric may be None

One row per criterion: {"criterion", "kind", "judged" (votes that judged it),
"shared_pairs" (pairs two or more annotators judged), "agreement" (share of agreeing
annotator pairs on those, weighted by pairs shared: Cohen's observed agreement),
"mean_kappa" (over annotator pairs where it is defined), "alpha" (nominal
Krippendorff's alpha)}; numbers are None where undefined. A pairwise criterion is
compared as a / b / tie; a scale as the preference its two scores imply (a higher,
b higher, equal), votes with one score left out. The numbers are annotate/agreement.py's,
on a copy of the votes whose `choice` is the criterion's (annotate/rubric.py's
`criterion_choices`), so each annotator's latest vote on a pair counts, as for the vote.
The criteria are the rubric's, then any other the votes judged (an older rubric's).
"""

from __future__ import annotations

import json
import math
from typing import Any

from annotate.agreement import cohens_kappa, krippendorff_alpha
from annotate.rubric import criterion_choices
from trainer.store.record import FLAGS_KEY


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def judged_criteria(votes, rubric=None) -> list[tuple[str, str]]:
    """(name, kind) of the rubric's criteria, then of the others the votes judged."""
    out = {c.name: c.kind for c in rubric.criteria} if rubric is not None else {}
    if "criteria" in votes.column_names:
        for text in votes["criteria"].drop_null().to_pylist():
            for name, value in json.loads(text).items():
                if name != FLAGS_KEY and name not in out:
                    out[name] = "pairwise" if isinstance(value, str) else "scale"
    return list(out.items())


def criterion_agreement(votes, rubric=None) -> list[dict[str, Any]]:
    rows = []
    for name, kind in judged_criteria(votes, rubric):
        table = criterion_choices(votes, name, scale_as_preference=kind == "scale")
        kappa = cohens_kappa(table)
        shared = int(kappa["n_shared"].sum()) if len(kappa) else 0
        agreement = float((kappa["agreement"] * kappa["n_shared"]).sum() / shared) if shared else None
        alpha = krippendorff_alpha(table)
        rows.append(
            {
                "criterion": name,
                "kind": kind,
                "judged": table.num_rows,
                "shared_pairs": alpha["n_units"],
                "agreement": _num(agreement),
                "mean_kappa": _num(kappa["kappa"].mean()) if len(kappa) else None,
                "alpha": _num(alpha["alpha"]),
            }
        )
    return rows
