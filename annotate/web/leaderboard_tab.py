"""The Leaderboard tab of `preflab serve` (admins only) and its /leaderboard API.

    from annotate.web.leaderboard_tab import build_leaderboard_tab, page
    with gr.Tabs():
        build_leaderboard_tab(demo, ctx, guard)   # the tab, and gr.api /leaderboard
    view = page(data, runs_dir, anchor="smollm2")  # what the tab shows, as HTML, without gradio
    view = page(data, runs_dir, style_control=True)  # the style-controlled board and its coefficients
    view = page(data, runs_dir, include_flagged=True)  # confirmed-flagged annotators' votes too

The numbers come from `annotate.leaderboard` (read the store, fit, policy evaluations);
this module only renders them and guards the handlers. The votes of annotators whose
flag an admin confirmed are left out unless the "Include confirmed-flagged annotators'
votes" box is ticked (the API's include_flagged; trainer/flags.py), and the status line
says how many were.

Admins only, like the Dashboard: annotators are blind judges and must not see which
model is winning. The tab is hidden and shown by its own load event, and every handler
(the API too) checks `guard.admin(request)`, so hiding it is not the only defence.
(No `from __future__ import annotations` here: gradio reads the handlers'
`request: gr.Request` annotations as objects.)
"""

import os
import time
from typing import Any

from annotate.leaderboard import leaderboard_json, standings
from annotate.web.html import escape
from annotate.web.leaderboard_html import (
    LEADERBOARD_CSS,
    coefficients_html,
    evals_html,
    matrix_html,
    plot_svg,
    reward_evals_html,
    table_html,
)
from trainer.flags import INCLUDE_FLAGGED_LABEL
from trainer.reward_eval import saved_evaluations

MEAN_ANCHOR = "(mean of all models)"


def page(
    data: str | os.PathLike,
    runs_dir: str | os.PathLike,
    anchor: str | None = None,
    rounds: int = 100,
    seed: int = 0,
    style_control: bool = False,
    include_flagged: bool = False,
) -> dict[str, Any]:
    """Everything the Leaderboard tab shows for the store `data` (a directory, or a
    postgresql:// URL): `annotate.leaderboard.standings` as HTML strings, the model names
    (for the anchor dropdown) and the anchor in use. With style_control the table and the
    plot are the style-controlled ratings (the table with the plain ones beside them) and
    `style` the coefficients; without, `style` is empty. `flagged`: standings' "flagged"
    (whose votes were left out or kept), also said at the start of `message`."""
    view = standings(
        data,
        runs_dir,
        anchor=None if anchor in (None, "", MEAN_ANCHOR) else anchor,
        rounds=rounds,
        seed=seed,
        style_control=style_control,
        include_flagged=include_flagged,
    )
    board, style = view["board"], view["style"]
    return {
        "ok": view["ok"],
        "error": view["error"],
        "message": view["message"],
        "models": sorted(board.models) if board is not None else view["models"],
        "anchor": board.anchor if board is not None else None,
        "table": table_html(board, style.plain if style else None) if board is not None else "",
        "plot": plot_svg(board) if board is not None else "",
        "matrix": matrix_html(board) if board is not None else "",
        "evals": evals_html(view["evals"]) if view["evals"] is not None else "",
        "reward_evals": reward_evals_html(saved_evaluations(runs_dir)),
        "style": coefficients_html(style) if style is not None else "",
        "board": board,
        "flagged": view["flagged"],
    }


def build_leaderboard_tab(demo, ctx, guard) -> None:
    """The Leaderboard tab: a hidden `gr.Tab` shown on load to admins; call inside the
    page's `gr.Tabs()`. Also an API endpoint, /leaderboard, with the numbers as JSON."""
    import gradio as gr

    def leaderboard_api(
        anchor: str = "",
        style_control: bool = False,
        include_flagged: bool = False,
        request: gr.Request = None,
    ) -> dict:
        """Ratings, 95% intervals, ranks, win-rate matrix and vote counts (admins only).
        anchor: the model rated 1000; empty for the mean of the models. style_control:
        also the style-controlled ratings and the style coefficients. include_flagged:
        count the votes of annotators whose flag an admin confirmed (left out by default;
        "excluded_flagged" says how many)."""
        guard.admin(request)
        with guard.errors():
            return leaderboard_json(
                ctx.data,
                ctx.runs_dir,
                anchor=anchor or None,
                style_control=style_control,
                include_flagged=include_flagged,
            )

    with gr.Tab("Leaderboard", id="leaderboard", visible=False) as tab:
        gr.Markdown(
            "Bradley-Terry ratings of every model from the human votes (a win counts 1, a tie or "
            "both-bad half a win to each side), with 95% bootstrap intervals. A model ranks above "
            "another only when its interval is clear of the other's."
        )
        with gr.Row():
            anchor = gr.Dropdown(
                label="Anchor: the model rated 1000",
                choices=[MEAN_ANCHOR],
                value=MEAN_ANCHOR,
                elem_id="lb-anchor",
                scale=3,
                interactive=True,
            )
            style_on = gr.Checkbox(
                label="Style control: length and markdown held equal",
                value=False,
                elem_id="lb-style",
                scale=2,
                interactive=True,
            )
            flagged_on = gr.Checkbox(
                label=INCLUDE_FLAGGED_LABEL,
                value=False,
                elem_id="lb-include-flagged",
                scale=2,
                interactive=True,
            )
            refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100, elem_id="lb-refresh")
        css = dict(js_on_load=None, css_template=LEADERBOARD_CSS)
        status = gr.HTML(elem_id="lb-status", **css)
        table = gr.HTML(elem_id="lb-table", **css)
        coefs = gr.HTML(elem_id="lb-style-box", **css)  # empty unless style control is on
        plot = gr.HTML(elem_id="lb-plot", **css)
        with gr.Accordion(
            "Win rates: row model against column model (ties 0.5), votes under each", open=True
        ):
            matrix = gr.HTML(elem_id="lb-matrix", **css)
        with gr.Accordion("Reward model vs humans: each policy against its reference", open=True):
            evals = gr.HTML(elem_id="lb-evals", **css)
        with gr.Accordion("Reward models on preference files (preflab eval-reward)", open=True):
            reward_evals = gr.HTML(elem_id="lb-reward-evals", **css)
        # inside the tab: gr.api adds a (hidden) component, and gr.Tabs() holds only tabs
        gr.api(leaderboard_api, api_name="leaderboard", concurrency_limit=2, concurrency_id="leaderboard")

    def on_load(request: gr.Request):
        return gr.Tab(visible=guard.is_admin(request))

    def on_open(current, style_control, include_flagged, request: gr.Request):
        guard.admin(request)
        with guard.errors():
            view = page(
                ctx.data,
                ctx.runs_dir,
                current,
                style_control=bool(style_control),
                include_flagged=bool(include_flagged),
            )
        cls = "lb-note lb-error" if view["error"] else "lb-note"  # red for failures only
        stamp = time.strftime("%H:%M:%S")
        return (
            gr.Dropdown(choices=[MEAN_ANCHOR, *view["models"]], value=view["anchor"] or MEAN_ANCHOR),
            f'<p class="{cls}" id="lb-message">{escape(view["message"])} (updated {stamp})</p>',
            view["table"],
            view["style"],
            view["plot"],
            view["matrix"],
            view["evals"],
            view["reward_evals"],
        )

    outputs = [anchor, status, table, coefs, plot, matrix, evals, reward_evals]
    inputs = [anchor, style_on, flagged_on]
    kw = dict(api_visibility="private", concurrency_limit=2, concurrency_id="leaderboard")
    demo.load(on_load, None, tab, api_visibility="private", show_progress="hidden", concurrency_limit=None)
    tab.select(on_open, inputs, outputs, **kw)
    refresh.click(on_open, inputs, outputs, **kw)
    anchor.input(on_open, inputs, outputs, **kw)
    style_on.input(on_open, inputs, outputs, **kw)
    flagged_on.input(on_open, inputs, outputs, **kw)
