"""The Dashboard tab (admins): how the annotation goes, and the export of the votes.

    build_dashboard_tab(demo, ctx, guard)     # inside the page's gr.Tabs()

Numbers come from `Service.dashboard` (JSON-able records); this module turns them into
the cards, plots and tables of the page. The export writes into this server's private
export folder and hands out download links of `ctx.exports` (annotate/web/downloads.py:
admins only, never through gradio's file cache); it is also the `/export` API
endpoint, which returns (report, [{"name", "url"}]); `/chat_prompts` (include_flagged) the
same for the prompts annotators wrote in chat mode, `chat-prompts.jsonl`
(annotate/chat_prompts.py). The tab is hidden and shown on
load for admins; every handler checks the role again. The numbers and the export leave
out the votes of annotators whose flag an admin confirmed unless the tab's
"Include confirmed-flagged annotators' votes" box is ticked (trainer/flags.py; the
gold-check panel lists everyone, as it decides the flags), and a line under the
Refresh button says how many were left out.
"""

# No `from __future__ import annotations` here: gradio reads the handlers' type hints
# (gr.Request, the API's parameter types) at run time.

import math
from datetime import datetime
from typing import Any

from annotate.web.html import escape, metric_card, pct
from trainer.flags import INCLUDE_FLAGGED_LABEL

# The columns of the dashboard's tables (annotate/stats.py), so that a table without
# rows still has its columns and a number column that came back as None is NaN again.
BY_COLUMNS = ("votes", "ties", "both_bad", "tie_rate", "both_bad_rate", "left_share", "median_decision_ms")
AGREEMENT = ("n_shared", "agreement", "agreement_low", "agreement_high", "kappa", "note")
KAPPA_COLUMNS = ("annotator_1", "annotator_2", *AGREEMENT)
JUDGE_COLUMNS = ("judge", "annotator", *AGREEMENT)  # annotate/judge_agreement.py
CRITERIA_COLUMNS = ("criterion", "kind", "judged", "shared_pairs", "agreement", "mean_kappa", "alpha")
CHOICE_COLUMNS = ("choice", "share", "votes")
FLOAT_COLUMNS = (
    "tie_rate",
    "both_bad_rate",
    "left_share",
    "median_decision_ms",
    "agreement",
    "agreement_low",
    "agreement_high",
    "kappa",
    "share",
    "mean_kappa",
    "alpha",
)
COUNT_COLUMNS = ("votes", "ties", "both_bad", "n_shared")


def frame(records: list[dict[str, Any]], columns: tuple[str, ...]):
    """A table of `Service.dashboard` as a DataFrame again: None -> NaN in number
    columns, counts as integers even without rows."""
    import pandas as pd

    out = pd.DataFrame.from_records(records, columns=list(columns))
    dtypes = {c: "float64" for c in columns if c in FLOAT_COLUMNS}
    return out.astype(dtypes | {c: "int64" for c in columns if c in COUNT_COLUMNS})


def metrics_html(s: dict[str, Any], q: dict[str, Any]) -> str:
    def num(x, fmt="{:.2f}"):
        return "–" if x is None else fmt.format(x)

    bias = "–"
    bias_note = "needs decisive votes"
    if s["left_share"] is not None:
        bias = pct(s["left_share"])
        bias_note = f"95% CI {pct(s['left_low'])}–{pct(s['left_high'])} of {s['decisive_votes']}; "
        bias_note += "no sign of bias" if s["left_low"] <= 0.5 <= s["left_high"] else "biased"
    cards = [
        metric_card("Votes", str(s["votes"]), f"{s['annotators']} annotators · {s['models']} models"),
        metric_card(
            "Pairs complete",
            f"{q['complete']} / {q['planned']}",
            f"overlap {q['overlap']} · {q['in_progress']} in progress",
        ),
        metric_card("Tie rate", pct(s["share_tie"])),
        metric_card("Both-bad rate", pct(s["share_both_bad"])),
        metric_card("Left answer wins", bias, bias_note),
        metric_card(
            "Median decision time",
            num(s["median_decision_ms"] and s["median_decision_ms"] / 1000, "{:.1f} s"),
        ),
        metric_card(
            "Cut answers", str(s["cut_votes"]), "votes on a pair with an answer the token limit stopped"
        ),
        metric_card("Krippendorff's α", num(s["alpha"]), f"{s['alpha_units']} pairs with 2+ votes"),
        metric_card("Mean Cohen's κ", num(s["mean_kappa"]), f"{s['kappa_pairs']} annotator pairs"),
    ]
    return '<div class="metrics">' + "".join(cards) + "</div>"


def annotator_table(by_annotator):
    from trainer.evaluate import wilson_interval

    out = by_annotator.copy()
    # Position bias per annotator with its 95% interval: a narrow interval away from 50%
    # is an annotator who favours one side, worth a word with them.
    decisive = out["votes"] - out["ties"] - out["both_bad"]
    cells = []
    for share, n in zip(out["left_share"], decisive):
        if n <= 0 or math.isnan(share):
            cells.append("–")
            continue
        low, high = wilson_interval(round(share * n), int(n))
        cells.append(f"{pct(share)} ({pct(low)}–{pct(high)})")
    out["left_share"] = cells
    for c in ("tie_rate", "both_bad_rate"):
        out[c] = out[c].map(pct)
    out["median_decision_ms"] = out["median_decision_ms"].map(
        lambda x: "–" if math.isnan(x) else f"{x / 1000:.1f} s"
    )
    return out.rename(
        columns={
            "median_decision_ms": "median time",
            "left_share": "left wins (95% CI)",
            "tie_rate": "tie rate",
            "both_bad_rate": "both-bad rate",
            "both_bad": "both bad",
        }
    )


def kappa_table(kappa):
    """People's agreement, or a judge's with people (JUDGE_COLUMNS): the same columns
    after the names, the agreement with its 95% interval."""
    out = kappa.copy()
    out["agreement"] = [
        "–" if math.isnan(a) else f"{pct(a)} ({pct(low)}–{pct(high)})"
        for a, low, high in zip(out["agreement"], out["agreement_low"], out["agreement_high"])
    ]
    out = out.drop(columns=["agreement_low", "agreement_high"])
    out["kappa"] = out["kappa"].map(lambda x: "–" if math.isnan(x) else f"{x:.2f}")
    return out.rename(
        columns={
            "annotator_1": "annotator",
            "annotator_2": "and annotator",
            "judge": "judge",
            "annotator": "and annotator",
            "n_shared": "shared pairs",
            "agreement": "agreement (95% CI)",
        }
    )


def flagged_html(flagged: dict[str, Any]) -> str:
    """The line that says whose votes the numbers leave out (or keep); empty when no
    annotator's flag is confirmed."""
    if not flagged["note"]:
        return ""
    state = "included" if flagged["included"] else "excluded"
    return f'<p class="flagged-note" id="dash-flagged" data-state="{state}">{escape(flagged["note"])}.</p>'


def links_html(links: list[dict[str, str]] | None) -> str:
    """The download links of one export (annotate/web/downloads.py); the urls are
    relative, so they work under a proxy's path too."""
    if not links:
        return ""
    items = "".join(
        f'<li><a href="{escape(link["url"])}" download="{escape(link["name"])}">{escape(link["name"])}</a></li>'
        for link in links
    )
    return f'<div id="export-links"><b>Download</b> (for an hour, admins only)<ul>{items}</ul></div>'


def build_dashboard_tab(demo, ctx, guard) -> None:
    """The Dashboard tab and its handlers, and the /export API endpoint."""
    import gradio as gr

    from annotate.web.annotator_panel import build_annotator_panel

    service, exports = ctx.service, ctx.exports
    with gr.Tab("Dashboard", id="dashboard", visible=False) as tab:
        counts = dict(y_axis_format="d", height=260)  # y_lim comes with the data
        with gr.Row():
            d_refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100)
            d_updated = gr.Markdown()
        with gr.Row():  # a row of its own: beside Refresh it squeezed "Updated" on a phone
            d_flagged_on = gr.Checkbox(
                label=INCLUDE_FLAGGED_LABEL,
                value=False,
                elem_id="dash-include-flagged",
                scale=0,
                min_width=320,
            )
        d_flagged = gr.HTML(js_on_load=None, elem_id="dash-flagged-box")
        d_metrics = gr.HTML(js_on_load=None)
        with gr.Row():
            p_annotator = gr.BarPlot(
                x="annotator", y="votes", title="Votes by annotator", sort="-y", **counts
            )
            p_model = gr.BarPlot(
                x="model",
                y="votes",
                title="Votes by model (both sides count)",  # short: a phone cuts a long title
                sort="-y",
                **counts,
            )
        with gr.Row():
            p_day = gr.BarPlot(x="day", y="votes", title="Votes by day (UTC)", **counts)
            p_choice = gr.BarPlot(x="choice", y="share", title="Outcomes", y_lim=[0, 1], height=260)
        with gr.Row():
            p_bias = gr.BarPlot(
                x="annotator",
                y="left_share",
                y_lim=[0, 1],
                height=260,
                title="Position bias: A's share of wins (0.5 = none)",
            )
            p_time = gr.BarPlot(
                x="annotator", y="median_s", title="Median decision time (s)", y_lim=[0, None], height=260
            )
        t_annotators = gr.Dataframe(label="Annotators", interactive=False)
        t_kappa = gr.Dataframe(
            label="Agreement: Cohen's kappa per annotator pair (shared pairs only)", interactive=False
        )
        t_judges = gr.Dataframe(
            label="Model judges (preflab judge) against people: Cohen's kappa, agreement (95% CI)",
            interactive=False,
            elem_id="judge-agreement",
            visible=False,  # shown once a store holds judge votes
        )
        t_criteria = gr.Dataframe(
            label="Agreement per rubric criterion (scales as the preference their scores imply)",
            interactive=False,
            elem_id="criteria-agreement",
            visible=getattr(service, "rubric", None) is not None,
        )
        build_annotator_panel(tab, ctx, guard)  # gold checks and flags: annotate/web/annotator_panel.py
        with gr.Accordion("Export a preference dataset (TRL / datasets)", open=True):
            with gr.Row():
                x_format = gr.Radio(["standard", "conversational"], value="standard", label="Format")
                x_ties = gr.Radio(["exclude", "separate"], value="exclude", label="Ties and both-bad")
                x_aggregate = gr.Radio(["none", "majority"], value="none", label="One row per")
                x_filetype = gr.Radio(["parquet", "jsonl"], value="parquet", label="File")
                x_margin = gr.Checkbox(label="margin column (from strength)", value=False)
            with gr.Row():
                x_button = gr.Button("Export", variant="primary", scale=0)
                # The prompts annotators typed in chat mode, as a pool for the next round.
                x_chat_prompts = gr.Button(
                    "Chat prompts (chat-prompts.jsonl)", scale=0, elem_id="chat-prompts"
                )
            x_report = gr.Markdown(elem_id="export-report")
            # What the /export API returns; the page shows it as links (x_links).
            x_files = gr.JSON(visible=False)
            x_links = gr.HTML(js_on_load=None, elem_id="export-links-box")

    def count_plot(table):
        # The axis runs from 0 to at least 5, so small counts get whole-number ticks.
        top = max(5, int(table["votes"].max())) if len(table) else 5
        return gr.BarPlot(value=table, y_lim=[0, top])

    def on_load(request: gr.Request):
        return gr.Tab(visible=guard.is_admin(request))

    def on_dashboard(include_flagged, request: gr.Request):
        name = guard.admin(request)
        with guard.errors():
            d = service.dashboard(name, include_flagged=bool(include_flagged))
        tables = d["tables"]
        by_annotator = frame(tables["by_annotator"], ("annotator", *BY_COLUMNS))
        kappa = frame(tables["kappa"], KAPPA_COLUMNS)
        return (
            f"Updated {datetime.now().strftime('%H:%M:%S')}",
            flagged_html(d["excluded_flagged"]),
            metrics_html(d["summary"], d["queue"]),
            count_plot(by_annotator),
            count_plot(frame(tables["by_model"], ("model", *BY_COLUMNS))),
            count_plot(frame(tables["by_day"], ("day", *BY_COLUMNS))),
            frame(tables["choices"], CHOICE_COLUMNS),
            by_annotator,
            by_annotator.assign(median_s=by_annotator["median_decision_ms"] / 1000),
            annotator_table(by_annotator),
            kappa_table(kappa),
            gr.Dataframe(
                value=kappa_table(frame(tables.get("judges", []), JUDGE_COLUMNS)),
                visible=bool(tables.get("judges")),
            ),
            frame(tables.get("criteria", []), CRITERIA_COLUMNS),
        )

    def on_export(
        format, ties, aggregate, filetype, margin, include_flagged=False, request: gr.Request = None
    ):
        name = guard.admin(request)
        with guard.errors():
            files, report = service.export(
                name,
                exports.folder,
                format,
                bool(margin),
                ties,
                aggregate,
                filetype,
                include_flagged=bool(include_flagged),
            )
        return report, exports.publish(files)

    def on_chat_prompts(include_flagged=False, request: gr.Request = None):
        name = guard.admin(request)
        with guard.errors():
            files, report = service.chat_prompts(name, exports.folder, include_flagged=bool(include_flagged))
        return report, exports.publish(files)

    demo.load(on_load, None, tab, api_visibility="private", show_progress="hidden", concurrency_limit=None)
    dash_outputs = [
        d_updated,
        d_flagged,
        d_metrics,
        p_annotator,
        p_model,
        p_day,
        p_choice,
        p_bias,
        p_time,
        t_annotators,
        t_kappa,
        t_judges,
        t_criteria,
    ]
    admin_kw = dict(api_visibility="private", concurrency_limit=2, concurrency_id="admin")
    tab.select(on_dashboard, [d_flagged_on], dash_outputs, **admin_kw)
    d_refresh.click(on_dashboard, [d_flagged_on], dash_outputs, **admin_kw)
    d_flagged_on.input(on_dashboard, [d_flagged_on], dash_outputs, **admin_kw)
    # API callers get the links as data and download them with their login cookies;
    # the page renders them in a second step.
    x_button.click(
        on_export,
        [x_format, x_ties, x_aggregate, x_filetype, x_margin, d_flagged_on],
        [x_report, x_files],
        api_name="export",
        concurrency_limit=2,
        concurrency_id="admin",
    ).success(links_html, x_files, x_links, api_visibility="private", show_progress="hidden")
    x_chat_prompts.click(
        on_chat_prompts,
        [d_flagged_on],
        [x_report, x_files],
        api_name="chat_prompts",
        concurrency_limit=2,
        concurrency_id="admin",
    ).success(links_html, x_files, x_links, api_visibility="private", show_progress="hidden")
