"""The Review tab of `preflab serve` (admins): every voted pair scored by a reward model
beside the human vote, the disagreements, sending pairs back for one more vote, and the
chosen reward model's saved `preflab eval-reward` results.

    from annotate.web.review_tab import build_review_tab
    with gr.Tabs():
        build_review_tab(demo, ctx, guard)   # ctx.reviewer: annotate.review.Reviewer

The HTML here escapes everything that comes from a vote, a pairs file or a model
(annotate.web.html); the work (scoring jobs, the ranking, the requeue) is the
Reviewer's. The votes of annotators whose flag an admin confirmed are left out unless the
"Include confirmed-flagged annotators' votes" box is ticked (trainer/flags.py); the
state line says how many were. (No `from __future__ import annotations` here: gradio reads the handlers'
`request: gr.Request` annotations as objects.)
"""

import json
from typing import Any

from annotate.review import DECISIVE, ReviewError, disagreements, summary, top_pairs
from annotate.web.html import escape, metric_card, pct, render_markdown, render_prompt
from annotate.web.leaderboard_html import LEADERBOARD_CSS, reward_evals_html
from trainer.flags import INCLUDE_FLAGGED_LABEL
from trainer.reward_eval import evaluations_of

SHOW_VOTES = 200  # latest votes listed on the page
SHOW_DISAGREEMENTS = 25  # disagreements listed (and offered for sending back)

REVIEW_CSS = """
.review-table { width: 100%; border-collapse: collapse; font-size: 0.92em; }
.review-table th, .review-table td { border-bottom: 1px solid var(--border-color-primary);
  padding: 4px 6px; text-align: left; vertical-align: top; }
.review-table td.num { font-variant-numeric: tabular-nums; white-space: nowrap; width: 1%; }
.review-table th { white-space: nowrap; }
.review-table td:last-child { width: 55%; }
.review-table tr.disagree td.p { color: var(--error-text-color, #b91c1c); font-weight: 600; }
.review-table details summary { cursor: pointer; }
.review-table .pair-body { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; margin: 6px 0; }
.review-table .pair-body .card { max-height: 40vh; overflow-y: auto; }
.review-table .pair-body .prompt-card { grid-column: 1 / span 2; }
.review-note { color: var(--body-text-color-subdued); font-size: 0.9em; margin: 4px 0; }
"""


def _vote_words(row: dict[str, Any]) -> str:
    """The vote as the annotator cast it: by the side they saw ("left better (slightly)"),
    with the stored answer it was in brackets, for reading the scores beside it."""
    choice = row.get("choice")
    if choice in DECISIVE:
        strength = {1: " (slightly)", 2: " (clearly)"}.get(row.get("strength"), "")
        return f"{row['side']} better{strength} · answer {choice.upper()}"
    return {"tie": "tie", "both_bad": "both bad"}.get(choice, str(choice))


def _excerpt(prompt_json: str, width: int = 90) -> str:
    try:
        messages = json.loads(prompt_json)
        text = " ".join(str(m.get("content", "")) for m in messages if m.get("role") == "user") or " ".join(
            str(m.get("content", "")) for m in messages
        )
    except (ValueError, AttributeError, TypeError):
        text = prompt_json
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _pair_details(row: dict[str, Any]) -> str:
    """The pair in full, folded, as the annotator saw it: the prompt, then the left and
    the right answer, each rendered safely and named by its stored letter and model."""
    try:
        prompt = render_prompt(json.loads(row["prompt"]))
    except (ValueError, KeyError, TypeError):
        prompt = f"<pre>{escape(row['prompt'])}</pre>"
    order = ("b", "a") if row.get("left") == "b" else ("a", "b")
    cards = "".join(
        f'<div class="card answer"><h4>{side} · {letter.upper()} · {escape(row["model_" + letter])}</h4>'
        f"{render_markdown(row['response_' + letter])}</div>"
        for side, letter in zip(("Left", "Right"), order)
    )
    return (
        f'<details><summary>{escape(_excerpt(row["prompt"]))}</summary><div class="pair-body">'
        f'<div class="card prompt-card"><h4>Prompt</h4>{prompt}</div>{cards}</div></details>'
    )


def votes_html(rows: list[dict[str, Any]], limit: int = SHOW_VOTES) -> str:
    """Each vote with the model's scores beside it, newest first."""
    if not rows:
        return '<p class="review-note">No votes yet.</p>'
    body = []
    for r in rows[:limit]:
        cls = "disagree" if r["agree"] is False else ""
        when = r["created_at"].strftime("%Y-%m-%d %H:%M") if hasattr(r["created_at"], "strftime") else ""
        agree = "–" if r["agree"] is None else ("yes" if r["agree"] else "no")
        body.append(
            f'<tr class="{cls}" data-pair-id="{escape(r["pair_id"])}" data-event-id="{escape(r["event_id"])}" '
            f'data-choice="{escape(r["choice"])}" data-left="{escape(r["left"])}" data-p-left="{r["p_left"]:.4f}">'
            f'<td class="num">{escape(when)}</td><td>{escape(r["annotator"])}</td>'
            f'<td class="vote">{escape(_vote_words(r))}</td>'
            f'<td class="num score-left">{r["score_left"]:+.2f}</td>'
            f'<td class="num score-right">{r["score_right"]:+.2f}</td>'
            f'<td class="num p p-left">{r["p_left"]:.2f}</td><td class="agree">{agree}</td>'
            f"<td>{_pair_details(r)}</td></tr>"
        )
    more = (
        f'<p class="review-note">Showing the latest {limit} of {len(rows)} votes.</p>'
        if len(rows) > limit
        else ""
    )
    return (
        f'{more}<table class="review-table" id="review-votes-table"><thead><tr><th>when (UTC)</th>'
        f"<th>annotator</th><th>human vote</th><th>score left</th><th>score right</th><th>P(left beats right)</th>"
        f"<th>model agrees</th><th>pair</th></tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def disagreements_html(rows: list[dict[str, Any]], limit: int = SHOW_DISAGREEMENTS) -> str:
    worst = disagreements(rows, limit)
    decisive = sum(1 for r in rows if r["p_human"] is not None)
    if not decisive:
        return '<p class="review-note">No decisive votes (left or right better) to compare with.</p>'
    if not worst:
        return f'<p class="review-note">The reward model agrees with all {decisive} decisive votes.</p>'
    body = []
    for k, r in enumerate(worst, start=1):
        body.append(
            f'<tr class="disagree" data-pair-id="{escape(r["pair_id"])}" data-event-id="{escape(r["event_id"])}" '
            f'data-p-human="{r["p_human"]:.4f}"><td class="num">{k}</td>'
            f'<td class="num p">{r["p_human"]:.2f}</td><td class="vote">{escape(_vote_words(r))}</td>'
            f'<td>{escape(r["annotator"])}</td><td class="num">{r["score_left"]:+.2f}</td>'
            f'<td class="num">{r["score_right"]:+.2f}</td><td>{_pair_details(r)}</td></tr>'
        )
    return (
        f'<p class="review-note">The {len(disagreements(rows))} of {decisive} decisive votes the reward '
        "model disagrees with, the most confident first: P(human's side) is the probability it gives the "
        "answer the annotator chose (below 0.5: it would have chosen the other).</p>"
        '<table class="review-table" id="review-disagreements-table"><thead><tr><th>#</th>'
        "<th>P(human's side)</th><th>human vote</th><th>annotator</th><th>score left</th><th>score right</th>"
        f"<th>pair</th></tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def summary_html(job: dict[str, Any]) -> str:
    s = summary(job["rows"] or [])

    mean = "–" if s["mean_p_human"] is None else f"{s['mean_p_human']:.2f}"
    return (
        '<div class="metrics" id="review-metrics">'
        + "".join(
            [
                metric_card("Votes scored", str(s["votes"]), f"{s['pairs']} pairs"),
                metric_card("Decisive votes", str(s["decisive"]), "left or right better"),
                metric_card(
                    "Model agrees",
                    pct(s["agreement"]) if s["agreement"] is not None else "–",
                    f"{s['agree']} of {s['decisive']} decisive votes",
                ),
                metric_card("Mean P(human's side)", mean),
                metric_card("Newly scored", str(job["new"]), f"pairs, in {job['seconds']:.1f} s"),
            ]
        )
        + "</div>"
    )


def progress_html(job: dict[str, Any] | None) -> str:
    if job is None:
        return (
            '<div class="review-note" id="review-state" data-state="idle">Pick a finished reward run.</div>'
        )
    state = job["state"]
    if state == "failed":
        return (
            f'<div class="status error" id="review-state" data-state="failed">Scoring failed: '
            f"{escape(job['message'])}</div>"
        )
    if state == "done":
        return (
            f'<div class="review-note" id="review-state" data-state="done">{escape(job["run_id"])}: '
            f"{escape(job['message'])}.</div>"
        )
    width = 100 * job["done"] / job["total"] if job["total"] else 0
    return (
        f'<div class="progress-box review-note" id="review-state" data-state="{escape(state)}">'
        f"{escape(job['run_id'])}: {escape(job['message'])} "
        f'<span class="progress-bar"><span style="width:{width:.1f}%"></span></span></div>'
    )


JUDGE_WORDS = {"left": "left better", "right": "right better", "tie": "tie", "both_bad": "both bad"}


def judge_disagreements_html(rows: list[dict[str, Any]], judge: str) -> str:
    """serve --suggest: people's votes the judge voted otherwise on, as each person saw the pair."""
    if not rows:
        return f'<div class="review-note" id="judge-disagreements-none">No vote differs from {escape(judge)}\'s.</div>'
    body = "".join(
        f'<tr class="disagree" data-pair="{escape(r["pair_id"])}"><td class="num">{escape(r["created_at"])}</td>'
        f"<td>{escape(r['annotator'])}</td><td>{escape(JUDGE_WORDS.get(r['choice'], r['choice']))}</td>"
        f"<td>{escape(JUDGE_WORDS.get(r['judge_choice'], r['judge_choice']))}</td>"
        f"<td>{escape(_excerpt(r['prompt']))}</td></tr>"
        for r in rows
    )
    return (
        '<table class="review-table" id="judge-disagreements-table"><tr><th>when</th><th>annotator</th>'
        f"<th>their vote</th><th>{escape(judge)}</th><th>prompt</th></tr>{body}</table>"
    )


def build_review_tab(demo, ctx, guard) -> None:
    """The Review tab: a hidden `gr.Tab` shown on load to admins; call inside the page's
    `gr.Tabs()`. Uses `ctx.reviewer` (built by annotate/serve.py); every handler checks
    `guard.admin(request)` first, so hiding the tab is not the only defence."""
    import gradio as gr

    reviewer = ctx.reviewer
    with gr.Tab("Review", id="review", visible=False) as tab:
        gr.Markdown(
            "Every voted pair scored by a reward model, beside the human vote: "
            "**P(left beats right)** = sigmoid(score left − score right), left and right as the "
            "annotator saw them. Scores are kept with the reward run, so only votes new since "
            "the last look are scored."
        )
        with gr.Row():
            r_run = gr.Dropdown(
                label="Reward run (finished)",
                choices=[],
                value=None,
                elem_id="review-run",
                scale=3,
                interactive=True,
            )
            r_flagged = gr.Checkbox(
                label=INCLUDE_FLAGGED_LABEL,
                value=False,
                elem_id="review-include-flagged",
                scale=2,
                interactive=True,
            )
            r_score = gr.Button(
                "Score votes", variant="primary", elem_id="review-score", scale=0, min_width=140
            )
        r_progress = gr.HTML(progress_html(None), elem_id="review-progress", js_on_load=None)
        r_summary = gr.HTML(elem_id="review-summary", js_on_load=None)
        with gr.Accordion("This reward model on preference files (preflab eval-reward)", open=False):
            r_evals = gr.HTML(elem_id="review-reward-evals", js_on_load=None, css_template=LEADERBOARD_CSS)
        with gr.Accordion("Disagreements: votes to relabel", open=True):
            r_disagree = gr.HTML(elem_id="review-disagreements", js_on_load=None, css_template=REVIEW_CSS)
            r_pick = gr.CheckboxGroup(
                label="Pairs to send back (by rank)", choices=[], value=[], elem_id="review-pick"
            )
            with gr.Row():
                r_topn = gr.Number(
                    value=5, precision=0, minimum=1, label="N", scale=0, min_width=90, elem_id="review-topn"
                )
                r_send_top = gr.Button("Send the top N back for one more vote", elem_id="review-send-top")
                r_send_sel = gr.Button("Send the selected back", elem_id="review-send-selected")
            r_report = gr.Markdown(elem_id="review-report")
        judge = reviewer.suggestions.judge if getattr(reviewer, "suggestions", None) is not None else None
        with gr.Accordion(
            f"Disagreements with the model judge {judge or ''} (serve --suggest)",
            open=True,
            visible=judge is not None,
        ):
            j_refresh = gr.Button(
                "Show the votes the judge voted otherwise on", elem_id="judge-refresh", scale=0
            )
            j_table = gr.HTML(elem_id="judge-disagreements", js_on_load=None, css_template=REVIEW_CSS)
            j_send = gr.Button("Send these pairs back for one more vote", elem_id="judge-send", scale=0)
            j_report = gr.Markdown(elem_id="judge-report")
        with gr.Accordion("Voted pairs, newest first", open=True):
            r_votes = gr.HTML(elem_id="review-votes", js_on_load=None, css_template=REVIEW_CSS)
        r_timer = gr.Timer(1.0, active=False)

    def show(job: dict[str, Any] | None):
        """(progress, summary, disagreements, pick, votes, timer) for a job's state."""
        running = job is not None and job["state"] not in ("done", "failed")
        if job is None or job["rows"] is None:
            tables = ("", "", gr.CheckboxGroup(choices=[], value=[]), "")
        elif running:  # the previous result stays on screen until the new one is ready
            tables = (gr.skip(), gr.skip(), gr.skip(), gr.skip())
        else:
            rows = job["rows"]
            picks = []
            for r in disagreements(rows, SHOW_DISAGREEMENTS):
                if r["pair_id"] not in [v for _, v in picks]:
                    picks.append(
                        (f"#{len(picks) + 1} · P={r['p_human']:.2f} · {r['pair_id'][:18]}", r["pair_id"])
                    )
            tables = (
                summary_html(job),
                disagreements_html(rows),
                gr.CheckboxGroup(choices=picks, value=[]),
                votes_html(rows),
            )
        return (progress_html(job), tables[0], tables[1], tables[2], tables[3], gr.Timer(active=running))

    outputs = [r_progress, r_summary, r_disagree, r_pick, r_votes, r_timer]
    kw = dict(api_visibility="private", concurrency_limit=4, concurrency_id="review", show_progress="hidden")

    def on_load(request: gr.Request):
        return gr.Tab(visible=guard.is_admin(request))

    def on_open(current, include_flagged, request: gr.Request):
        guard.admin(request)
        with guard.errors():
            runs = reviewer.runs()
            ids = [r["id"] for r in runs]
            run_id = current if current in ids else (ids[0] if ids else None)
            dropdown = gr.Dropdown(choices=[(r["id"], r["id"]) for r in runs], value=run_id)
            if run_id is None:
                return (
                    dropdown,
                    '<div class="review-note" id="review-state" data-state="none">No finished '
                    "reward run yet: train one in the Train tab (or with `preflab train-reward`) "
                    "first.</div>",
                    "",
                    "",
                    gr.CheckboxGroup(choices=[], value=[]),
                    "",
                    gr.Timer(active=False),
                )
            return (dropdown, *show(reviewer.start(run_id, bool(include_flagged))))

    def on_score(run_id, include_flagged, request: gr.Request):
        guard.admin(request)
        with guard.errors():
            if not run_id:
                raise ReviewError("pick a reward run first")
            return show(reviewer.start(run_id, bool(include_flagged)))

    def on_flagged(run_id, include_flagged, request: gr.Request):
        guard.admin(request)
        # the box before any run is picked: nothing to score yet, and nothing wrong
        return on_score(run_id, include_flagged, request) if run_id else show(None)

    def on_tick(run_id, request: gr.Request):
        guard.admin(request)
        return show(reviewer.status(run_id) if run_id else None)

    def send(run_id, pair_ids) -> str:
        with guard.errors():
            if not run_id:
                raise ReviewError("pick a reward run first")
            if not pair_ids:
                return "Nothing selected."
            return reviewer.requeue(run_id, pair_ids)["message"]

    def on_send_top(run_id, n, request: gr.Request):
        guard.admin(request)
        job = reviewer.status(run_id) if run_id else None
        with guard.errors():
            if job is None or job["rows"] is None:
                raise ReviewError("score the votes first")
        return send(run_id, top_pairs(job["rows"], max(1, int(n or 1))))

    def on_send_selected(run_id, picked, request: gr.Request):
        guard.admin(request)
        return send(run_id, picked or [])

    def on_judge(include_flagged, request: gr.Request):
        guard.admin(request)
        with guard.errors():
            return judge_disagreements_html(reviewer.judge_disagreements(bool(include_flagged)), judge or "")

    def on_judge_send(include_flagged, request: gr.Request):
        guard.admin(request)
        with guard.errors():
            rows = reviewer.judge_disagreements(bool(include_flagged))
            if not rows:
                return "Nothing to send back."
            return reviewer.requeue_judged([r["pair_id"] for r in rows], bool(include_flagged))["message"]

    def on_run(run_id, request: gr.Request):
        guard.admin(request)
        with guard.errors():
            path = next((r["path"] for r in reviewer.runs() if r["id"] == run_id), None)
            return reward_evals_html(evaluations_of(path)) if path else ""

    if judge is not None:
        j_refresh.click(on_judge, [r_flagged], [j_table], **kw)
        j_send.click(on_judge_send, [r_flagged], [j_report], **kw)
    demo.load(on_load, None, tab, api_visibility="private", show_progress="hidden", concurrency_limit=None)
    tab.select(on_open, [r_run, r_flagged], [r_run, *outputs], **kw)
    r_run.input(on_score, [r_run, r_flagged], outputs, **kw)
    r_run.change(on_run, [r_run], [r_evals], **kw)
    r_score.click(on_score, [r_run, r_flagged], outputs, **kw)
    r_flagged.input(on_flagged, [r_run, r_flagged], outputs, **kw)
    r_timer.tick(on_tick, [r_run], outputs, **kw)
    r_send_top.click(on_send_top, [r_run, r_topn], [r_report], **kw)
    r_send_sel.click(on_send_selected, [r_run, r_pick], [r_report], **kw)
