"""The Leaderboard tab of `preflab serve` (admins only) and its /leaderboard API.

    from annotate.web.leaderboard_tab import build_leaderboard_tab, page
    with gr.Tabs():
        build_leaderboard_tab(demo, ctx, guard)   # the tab, and gr.api /leaderboard
    view = page(data, runs_dir, anchor="smollm2")  # what the tab shows, without gradio

Admins only, like the Dashboard: annotators are blind judges and must not see which
model is winning. The tab is hidden and shown by its own load event, and every handler
(the API too) checks `guard.admin(request)`, so hiding it is not the only defence.
(No `from __future__ import annotations` here: gradio reads the handlers'
`request: gr.Request` annotations as objects.)
"""

import os
import time
from typing import Any

from annotate.bradley_terry import VOTE_COLUMNS, battles_from_votes
from annotate.policy_evals import policy_evals
from annotate.ratings import LeaderboardError, leaderboard
from annotate.web.html import escape
from annotate.web.leaderboard_html import LEADERBOARD_CSS, evals_html, matrix_html, plot_svg, table_html

MEAN_ANCHOR = "(mean of all models)"


def page(
    data: str | os.PathLike,
    runs_dir: str | os.PathLike,
    anchor: str | None = None,
    rounds: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the Leaderboard tab shows for the store `data` (a directory, or a
    postgresql:// URL): HTML strings, the model names (for the anchor dropdown) and the
    anchor in use. A LeaderboardError becomes `message` (ok False) with
    the other parts empty; an anchor that is no longer among the models falls back to the
    mean, with a note."""
    from trainer.store import StoreError, read_comparisons

    try:
        votes = read_comparisons(data, columns=VOTE_COLUMNS)
    except StoreError as e:  # e.g. the database is down: said on the tab, like the CLI says it
        return {
            "ok": False,
            "message": str(e),
            "models": [],
            "anchor": None,
            "table": "",
            "plot": "",
            "matrix": "",
            "evals": "",
            "board": None,
        }
    evals = evals_html(policy_evals(runs_dir, votes))
    anchor = None if anchor in (None, "", MEAN_ANCHOR) else anchor
    battles = battles_from_votes(votes)
    note = ""
    if anchor is not None and anchor not in battles.models:
        note = f"The anchor {anchor} has no votes now; the mean of the models is 1000 instead. "
        anchor = None
    try:
        board = leaderboard(battles, anchor=anchor, rounds=rounds, seed=seed)
    except LeaderboardError as e:
        return {
            "ok": False,
            "message": str(e),
            "models": battles.models,
            "anchor": None,
            "table": "",
            "plot": "",
            "matrix": "",
            "evals": evals,
            "board": None,
        }
    message = note + " · ".join([*board.notes(), board.scale_note()])
    return {
        "ok": True,
        "message": message,
        "models": sorted(board.models),
        "anchor": board.anchor,
        "table": table_html(board),
        "plot": plot_svg(board),
        "matrix": matrix_html(board),
        "evals": evals,
        "board": board,
    }


def build_leaderboard_tab(demo, ctx, guard) -> None:
    """The Leaderboard tab: a hidden `gr.Tab` shown on load to admins; call inside the
    page's `gr.Tabs()`. Also an API endpoint, /leaderboard, with the numbers as JSON."""
    import gradio as gr

    def leaderboard_api(anchor: str = "", request: gr.Request = None) -> dict:
        """Ratings, 95% intervals, ranks, win-rate matrix and vote counts (admins only).
        anchor: the model rated 1000; empty for the mean of the models."""
        from trainer.store import read_comparisons

        guard.admin(request)
        with guard.errors():
            votes = read_comparisons(ctx.data, columns=VOTE_COLUMNS)
            out = leaderboard(votes, anchor=anchor or None).to_dict()
            out["policy_evals"] = policy_evals(ctx.runs_dir, votes)
        return out

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
            refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100, elem_id="lb-refresh")
        css = dict(js_on_load=None, css_template=LEADERBOARD_CSS)
        status = gr.HTML(elem_id="lb-status", **css)
        table = gr.HTML(elem_id="lb-table", **css)
        plot = gr.HTML(elem_id="lb-plot", **css)
        with gr.Accordion(
            "Win rates: row model against column model (ties 0.5), votes under each", open=True
        ):
            matrix = gr.HTML(elem_id="lb-matrix", **css)
        with gr.Accordion("Reward model vs humans: each policy against its reference", open=True):
            evals = gr.HTML(elem_id="lb-evals", **css)
        # inside the tab: gr.api adds a (hidden) component, and gr.Tabs() holds only tabs
        gr.api(leaderboard_api, api_name="leaderboard", concurrency_limit=2, concurrency_id="leaderboard")

    def on_load(request: gr.Request):
        return gr.Tab(visible=guard.is_admin(request))

    def on_open(current, request: gr.Request):
        guard.admin(request)
        with guard.errors():
            view = page(ctx.data, ctx.runs_dir, current)
        cls = "lb-note" if view["ok"] else "lb-note lb-error"
        stamp = time.strftime("%H:%M:%S")
        return (
            gr.Dropdown(choices=[MEAN_ANCHOR, *view["models"]], value=view["anchor"] or MEAN_ANCHOR),
            f'<p class="{cls}" id="lb-message">{escape(view["message"])} (updated {stamp})</p>',
            view["table"],
            view["plot"],
            view["matrix"],
            view["evals"],
        )

    outputs = [anchor, status, table, plot, matrix, evals]
    kw = dict(api_visibility="private", concurrency_limit=2, concurrency_id="leaderboard")
    demo.load(on_load, None, tab, api_visibility="private", show_progress="hidden", concurrency_limit=None)
    tab.select(on_open, [anchor], outputs, **kw)
    refresh.click(on_open, [anchor], outputs, **kw)
    anchor.input(on_open, [anchor], outputs, **kw)
