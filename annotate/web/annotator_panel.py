"""The Dashboard's annotator review (admins): the quality table, the gold-accuracy plot,
and confirm / clear of flagged annotators.

    build_annotator_panel(tab, ctx, guard)    # inside build_dashboard_tab, after its plots

Numbers and flag states come from `AnnotatorReview` (annotate/annotator_review.py:
JSON-able records, the flag events in the store); this module renders them. The plot is
SVG drawn here (like the Train tab's, annotate/web/metric_plots.py): each annotator with
gold votes is a point at (votes, gold accuracy) with its 95% Wilson interval as an error
bar, the flag threshold as a dashed line. Every handler checks the admin role first;
confirm and clear write events, the page only asks.
"""

# No `from __future__ import annotations` here: gradio reads the handlers' type hints.

import math
from typing import Any

from annotate.web.html import escape, pct
from annotate.web.metric_plots import _domain, _tick_label, _ticks

W, H = 560, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 14, 10, 36
STATE_COLOURS = {"": "#6366f1", "cleared": "#6366f1", "flagged": "#d97706", "confirmed": "#dc2626"}
COLUMNS = (
    "annotator",
    "votes",
    "gold",
    "gold accuracy (95% CI)",
    "agreement",
    "agreement w/o ties",
    "competence",
    "votes / hour",
    "median time",
    "time ~ length",
    "flag",
)


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def gold_plot_html(rows: list[dict[str, Any]], flag_below: float) -> str:
    """Gold accuracy against votes, one point per annotator with gold votes, with its
    Wilson interval; data-* attributes carry the numbers (what the tests read)."""
    pts = [r for r in rows if (r.get("gold_n") or 0) > 0 and _num(r.get("gold_accuracy")) is not None]
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    x0, x1 = _domain([float(r["votes"]) for r in pts], 0.08) if pts else (0.0, 1.0)
    x0 = max(0.0, x0)

    def px(v: float) -> float:
        return LEFT + (v - x0) / (x1 - x0) * pw

    def py(v: float) -> float:
        return TOP + (1 - v) * ph  # accuracy: 0..1

    svg = [
        f'<svg viewBox="0 0 {W} {H}" width="100%" role="img" aria-label="Gold accuracy by annotator" '
        'style="display:block;font-size:11px;overflow:visible" fill="currentColor">',
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="currentColor" '
        'stroke-opacity="0.25"/>',
    ]
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        svg.append(
            f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="currentColor" '
            f'stroke-opacity="0.12"/><text x="{LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{pct(t)}</text>'
        )
    y = py(flag_below)
    svg.append(
        f'<line class="flag-threshold" x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" '
        f'stroke="#dc2626" stroke-dasharray="4 3" stroke-opacity="0.7"/>'
    )
    if pts:
        for t in _ticks(x0, x1, 6, whole=True):
            svg.append(
                f'<text x="{px(t):.1f}" y="{TOP + ph + 16}" text-anchor="middle">{_tick_label(t)}</text>'
            )
    else:
        svg.append(
            f'<text class="no-points" x="{LEFT + pw / 2}" y="{TOP + ph / 2}" text-anchor="middle" '
            'fill-opacity="0.6">no gold votes yet</text>'
        )
    svg.append(f'<text x="{LEFT + pw / 2}" y="{H - 2}" text-anchor="middle" fill-opacity="0.7">votes</text>')
    for r in pts:
        acc = _num(r["gold_accuracy"])
        low, high = _num(r.get("gold_low")), _num(r.get("gold_high"))
        low = acc if low is None else low
        high = acc if high is None else high
        x, colour = px(float(r["votes"])), STATE_COLOURS.get(r.get("flag_state") or "", "#6366f1")
        svg.append(
            f'<g class="annotator-point" data-annotator="{escape(r["annotator"])}" data-votes="{r["votes"]}" '
            f'data-accuracy="{acc:.4f}" data-low="{low:.4f}" data-high="{high:.4f}" '
            f'data-state="{escape(r.get("flag_state") or "")}">'
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{py(low):.1f}" y2="{py(high):.1f}" '
            f'stroke="{colour}" stroke-width="2"/>'
            f'<line x1="{x - 4:.1f}" x2="{x + 4:.1f}" y1="{py(low):.1f}" y2="{py(low):.1f}" stroke="{colour}"/>'
            f'<line x1="{x - 4:.1f}" x2="{x + 4:.1f}" y1="{py(high):.1f}" y2="{py(high):.1f}" stroke="{colour}"/>'
            f'<circle cx="{x:.1f}" cy="{py(acc):.1f}" r="4" fill="{colour}"><title>{escape(r["annotator"])}: '
            f"{r['gold_correct']}/{r['gold_n']} gold ({pct(low)}–{pct(high)}), {r['votes']} votes</title></circle></g>"
        )
    svg.append("</svg>")
    return (
        '<div class="metric-plot" id="gold-plot" style="max-width:720px">'
        '<div class="plot-title" style="font-weight:600;margin-bottom:4px">Gold accuracy by annotator '
        "(95% Wilson interval)</div>" + "".join(svg) + '<div class="plot-caption" style="font-size:0.85em;'
        f'opacity:0.8">Dashed: the flag threshold ({pct(flag_below)}); orange: flagged, red: confirmed.</div></div>'
    )


def review_frame(rows: list[dict[str, Any]]):
    """The annotator table as the page shows it (numbers as text, – where none)."""
    import pandas as pd

    def num(x, fmt="{:.2f}"):
        x = _num(x)
        return "–" if x is None else fmt.format(x)

    out = []
    for r in rows:
        gold_n = r.get("gold_n") or 0
        acc = _num(r.get("gold_accuracy"))
        ci = "–" if not gold_n or acc is None else f"{pct(acc)} ({pct(r['gold_low'])}–{pct(r['gold_high'])})"
        flag = r.get("flag_state") or ("rule met" if r.get("flag_rule") else "")
        out.append(
            [
                r["annotator"],
                r["votes"],
                f"{r.get('gold_correct') or 0}/{gold_n}",
                ci,
                num(r.get("agreement")),
                num(r.get("agreement_no_ties")),
                num(r.get("competence")),
                num(r.get("votes_per_hour"), "{:.1f}"),
                num(
                    _num(r.get("median_decision_ms")) and _num(r.get("median_decision_ms")) / 1000, "{:.1f} s"
                ),
                num(r.get("decision_length_corr")),
                flag,
            ]
        )
    return pd.DataFrame(out, columns=list(COLUMNS))


def build_annotator_panel(tab, ctx, guard) -> None:
    """The panel and its handlers (see the module docstring); nothing without a reviewer."""
    import gradio as gr
    import pandas as pd

    review = ctx.annotator_review
    if review is None:
        return
    with gr.Accordion("Annotators: gold checks and flags", open=True):
        a_refresh = gr.Button("Refresh annotators", size="sm", scale=0, min_width=160)
        a_plot = gr.HTML(js_on_load=None, elem_id="gold-plot-box")
        a_table = gr.Dataframe(label="Annotator quality", interactive=False, elem_id="annotator-quality")
        with gr.Row():
            a_who = gr.Dropdown(
                choices=[], value=None, label="Flagged annotator", allow_custom_value=False, scale=1
            )
            a_note = gr.Textbox(label="Note (kept with the decision)", max_length=2000, scale=2)
        with gr.Row():
            a_confirm = gr.Button("Confirm flag (exclude their votes)", variant="stop", scale=0)
            a_clear = gr.Button("Clear flag", scale=0)
        a_status = gr.Markdown(elem_id="flag-status")
        a_history = gr.Dataframe(label="Flag events (newest first)", interactive=False)

    def render(view: dict[str, Any], message: str = ""):
        who = view["flagged"] + view["confirmed"]
        history = pd.DataFrame(view["history"], columns=["at", "kind", "annotator", "by", "note"])
        return (
            gold_plot_html(view["rows"], view["thresholds"]["flag_below"]),
            review_frame(view["rows"]),
            gr.Dropdown(choices=who, value=who[0] if who else None),
            message,
            history,
        )

    def on_review(request: gr.Request):
        name = guard.admin(request)
        with guard.errors():
            view = review.table(name)
        return render(view)

    def on_decide(action: str):
        def handler(subject, note, request: gr.Request):
            name = guard.admin(request)
            with guard.errors():
                view = review.decide(name, subject, action, note)
            done = "confirmed: their votes are left out downstream" if action == "confirm" else "cleared"
            return render(view, f"{escape(subject)}: flag {done}.")

        return handler

    outputs = [a_plot, a_table, a_who, a_status, a_history]
    admin_kw = dict(api_visibility="private", concurrency_limit=2, concurrency_id="admin")
    tab.select(on_review, None, outputs, **admin_kw)
    a_refresh.click(on_review, None, outputs, **admin_kw)
    a_confirm.click(on_decide("confirm"), [a_who, a_note], outputs, **admin_kw)
    a_clear.click(on_decide("clear"), [a_who, a_note], outputs, **admin_kw)
