"""The Leaderboard tab's HTML: the ranked table, an inline SVG of the ratings with their
intervals, the coloured win-rate matrix, the policy evaluations, the style-control
coefficients, and their CSS.

    from annotate.web.leaderboard_html import table_html, plot_svg, matrix_html
    html = table_html(board) + plot_svg(board) + matrix_html(board)   # board: ratings.Leaderboard
    html = table_html(sc.board, plain=sc.plain) + coefficients_html(sc)   # sc: style_control.StyleControl

Every model name is escaped (annotate.web.html): names come from pairs files.
"""

from __future__ import annotations

import math
from typing import Any

from annotate.policy_evals import human_text, rm_text
from annotate.ratings import CENTER, Leaderboard
from annotate.style_control import StyleControl
from annotate.web.html import escape


def rank_cell(board: Leaderboard, k: int) -> str:
    if board.provisional[k]:
        return f'– <span class="lb-provisional" title="fewer than {board.min_votes} votes">provisional</span>'
    return str(int(board.rank[k]))


def table_html(board: Leaderboard, plain: Leaderboard | None = None) -> str:
    """The ranked table; with `plain` (the board without style control) each model's
    plain rating and how far style control moved it, in two more columns."""
    extra_head = "<th>plain rating</th><th>shift</th>" if plain is not None else ""
    head = (
        "<tr><th>rank</th><th>model</th><th>rating</th><th>95% CI</th>"
        f"{extra_head}<th>votes</th><th>W / L / T</th><th>win rate</th></tr>"
    )
    plain_rating = dict(zip(plain.models, plain.rating)) if plain is not None else {}
    rows = []
    for k, m in enumerate(board.models):
        ci = "–" if math.isnan(board.low[k]) else f"{board.low[k]:.0f} – {board.high[k]:.0f}"
        anchor = ' class="anchor"' if m == board.anchor else ""
        extra = ""
        if plain is not None:
            shift = round(float(board.rating[k] - plain_rating[m]))  # rounded first: never "-0"
            extra = f"<td>{plain_rating[m]:.0f}</td><td>{shift:+d}</td>"
        rows.append(
            f'<tr{anchor} data-model="{escape(m)}"><td>{rank_cell(board, k)}</td><td class="model">{escape(m)}</td>'
            f"<td>{board.rating[k]:.0f}</td><td>{ci}</td>{extra}<td>{int(board.played[k])}</td>"
            f"<td>{int(board.wins[k])} / {int(board.losses[k])} / {int(board.ties[k])}</td>"
            f"<td>{100 * board.win_rate[k]:.1f}%</td></tr>"
        )
    return (
        f'<table class="lb-table" id="lb-ranked"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _nice_step(span: float) -> float:
    """A round tick step giving about 6 ticks over span."""
    raw = max(span, 1e-9) / 6
    power = 10 ** math.floor(math.log10(raw))
    return next(s * power for s in (1, 2, 2.5, 5, 10) if s * power >= raw)


def plot_svg(board: Leaderboard) -> str:
    """Ratings as dots with their 95% intervals as bars, best at the top: an inline SVG
    (gradio's plots have no error bars), sized to the number of models."""
    K = len(board.models)
    label_w, plot_w, right_pad, row_h, top, bottom = 200, 560, 20, 22, 14, 36
    width, height = label_w + plot_w + right_pad, top + K * row_h + bottom
    finite = [v for v in (*board.low, *board.high, *board.rating, CENTER) if not math.isnan(v)]
    lo, hi = min(finite), max(finite)
    step = _nice_step(hi - lo)
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
    if hi == lo:
        lo, hi = lo - step, hi + step

    def x(v: float) -> float:
        return label_w + (v - lo) / (hi - lo) * plot_w

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="lb-plot" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="ratings with 95% intervals" '
        f'font-family="ui-sans-serif, system-ui, sans-serif" font-size="12">'
    ]
    tick = lo
    while tick <= hi + 1e-9:
        parts.append(
            f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top - 4}" y2="{top + K * row_h}" '
            f'stroke="#e4e4e7"/><text x="{x(tick):.1f}" y="{top + K * row_h + 16}" '
            f'text-anchor="middle" fill="#71717a">{tick:g}</text>'
        )
        tick += step
    parts.append(
        f'<line x1="{x(CENTER):.1f}" x2="{x(CENTER):.1f}" y1="{top - 4}" y2="{top + K * row_h}" '
        f'stroke="#a1a1aa" stroke-dasharray="4 3"/>'
    )
    parts.append(
        f'<text x="{label_w + plot_w / 2}" y="{height - 4}" text-anchor="middle" fill="#52525b">'
        f"rating (95% bootstrap interval)</text>"
    )
    for k, m in enumerate(board.models):
        y = top + k * row_h + row_h / 2
        short = m if len(m) <= 28 else m[:27] + "…"
        parts.append(
            f'<g class="lb-row" data-model="{escape(m)}"><title>{escape(m)}: {board.rating[k]:.0f}'
            + ("" if math.isnan(board.low[k]) else f" ({board.low[k]:.0f}–{board.high[k]:.0f})")
            + f'</title><text x="{label_w - 8}" y="{y + 4:.1f}" text-anchor="end" fill="#27272a">'
            f"{escape(short)}</text>"
        )
        if not math.isnan(board.low[k]):
            parts.append(
                f'<line x1="{x(board.low[k]):.1f}" x2="{x(board.high[k]):.1f}" y1="{y:.1f}" '
                f'y2="{y:.1f}" stroke="#6366f1" stroke-width="3" stroke-linecap="round"/>'
            )
        parts.append(f'<circle cx="{x(board.rating[k]):.1f}" cy="{y:.1f}" r="4.5" fill="#312e81"/></g>')
    parts.append("</svg>")
    return '<div class="lb-plot-box">' + "".join(parts) + "</div>"


def _cell_colour(rate: float) -> str:
    """Red (0%) through white (50%) to blue (100%)."""
    t = max(0.0, min(1.0, rate))
    if t < 0.5:
        s = (0.5 - t) * 2
        return f"rgb(255,{255 - 120 * s:.0f},{255 - 120 * s:.0f})"
    s = (t - 0.5) * 2
    return f"rgb({255 - 140 * s:.0f},{255 - 110 * s:.0f},255)"


def matrix_html(board: Leaderboard) -> str:
    """Win rate of the row model against the column model (ties 0.5), coloured, with the
    number of votes of the pair under it; best-rated models first."""
    rates, games = board.win_matrix, board.games
    head = "".join(f'<th title="{escape(m)}"><div class="col">{escape(m)}</div></th>' for m in board.models)
    rows = []
    for i, m in enumerate(board.models):
        cells = []
        for j, other in enumerate(board.models):
            if i == j:
                cells.append('<td class="self"></td>')
            elif games[i, j] == 0:
                cells.append(f'<td class="none" title="{escape(m)} vs {escape(other)}: no votes">–</td>')
            else:
                cells.append(
                    f'<td style="background:{_cell_colour(rates[i, j])}" '
                    f'title="{escape(m)} vs {escape(other)}: {100 * rates[i, j]:.1f}% of {int(games[i, j])} votes">'
                    f"{100 * rates[i, j]:.0f}%<small>{int(games[i, j])}</small></td>"
                )
        rows.append(f'<tr><th class="row">{escape(m)}</th>{"".join(cells)}</tr>')
    return (
        f'<div class="lb-matrix-box"><table class="lb-matrix"><thead><tr><th></th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def evals_html(evals: list[dict[str, Any]]) -> str:
    if not evals:
        return (
            '<p class="lb-note">No policy evaluations yet: a policy run writes '
            "<code>runs/&lt;id&gt;/eval.json</code> with its reward-model win rate over the reference.</p>"
        )
    rows = "".join(
        f"<tr><td>{escape(e['policy'])}</td><td>{escape(e['reference'])}</td><td>{escape(rm_text(e))}</td>"
        f"<td>{escape(human_text(e['human']))}</td></tr>"
        for e in evals
    )
    return (
        '<table class="lb-table lb-evals"><thead><tr><th>policy</th><th>reference</th>'
        "<th>reward model win rate (held-out prompts)</th><th>human win rate (arena votes)</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def reward_evals_html(results: list[dict[str, Any]]) -> str:
    """The saved `preflab eval-reward` results (trainer.reward_eval.saved_evaluations),
    one row each: accuracy with its interval, best-of-N, RewardBench score, length bias,
    calibration. Every value came from a file in a run directory: escaped, numbers only."""
    if not results:
        return (
            '<p class="lb-note">No reward-model evaluations yet: <code>preflab eval-reward runs/&lt;id&gt; '
            "--data FILE</code> saves one in <code>runs/&lt;id&gt;/reward-evals/</code>.</p>"
        )

    def share(x: Any) -> str:
        return f"{100 * x:.1f}%" if isinstance(x, (int, float)) and math.isfinite(x) else "–"

    rows = []
    for r in results:  # trainer.reward_eval.evaluations_of checked each one's shape
        ci = r.get("accuracy_ci") or [None, None]
        interval = f"{share(ci[0])} – {share(ci[1])}"
        best = (r.get("best_of_n") or {}).get("accuracy")
        length = r.get("length") or {}
        bias = (
            f"{share(length.get('longer_scored_higher'))} (chosen longer: {share(length.get('chosen_longer'))})"
            if length.get("pairs")
            else "–"
        )
        ece = r.get("ece")
        head = f" (head {r['criterion']})" if r.get("criterion") else ""  # eval-reward --criterion
        rows.append(
            f'<tr data-run="{escape(str(r["run_id"]))}"><td class="model">{escape(str(r["run_id"]))}</td>'
            f"<td>{escape(str(r.get('data', '')).rsplit('/', 1)[-1] + head)}</td><td>{int(r['pairs'])}</td>"
            f"<td>{share(r['accuracy'])}</td><td>{interval}</td><td>{share(best)}</td>"
            f"<td>{share(r.get('rewardbench_score'))}</td><td>{bias}</td>"
            f"<td>{f'{ece:.3f}' if isinstance(ece, (int, float)) else '–'}</td></tr>"
        )
    return (
        '<table class="lb-table lb-reward-evals"><thead><tr><th>reward run</th><th>file</th><th>pairs</th>'
        "<th>accuracy</th><th>95% interval</th><th>best-of-N</th><th>RewardBench</th>"
        "<th>longer answer scored higher</th><th>ECE</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def coefficients_html(style: StyleControl) -> str:
    """The style coefficients: per feature its coefficient with the 95% interval, in
    log-odds and in rating points, and what one spread of the feature difference is."""
    # The status line above the table says what style control did; here only what is
    # missing from this table (the features left out), or everything when nothing was fitted.
    lines = style.notes() if not style.features else style.notes()[-1:] if style.left_out else []
    notes = "".join(f'<p class="lb-note">{escape(line)}</p>' for line in lines)
    if not style.features:
        return f'<div id="lb-style-coefs">{notes}</div>'
    rows = []
    for row in style.coefficients():
        lo, hi = row["ci"]
        plo, phi = row["points_ci"]
        ci = "–" if lo is None else f"{lo:+.3f} – {hi:+.3f}"
        pci = "–" if plo is None else f"{plo:+.0f} – {phi:+.0f}"
        spread = f"{row['spread']:.3f}"
        if row.get("length_ratio"):
            spread += f" ({row['length_ratio']}x as long)"
        rows.append(
            f'<tr data-feature="{escape(row["feature"])}"><td class="model">{escape(row["feature"])}</td>'
            f"<td>{row['coefficient']:+.3f}</td><td>{ci}</td><td>{row['points']:+.0f}</td><td>{pci}</td>"
            f'<td>{escape(spread)}</td><td class="what">{escape(row["what"])}</td></tr>'
        )
    return (
        f'<div id="lb-style-coefs">{notes}<table class="lb-table lb-coefs"><thead><tr><th>feature</th>'
        "<th>coefficient (log-odds per spread)</th><th>95% CI</th><th>rating points</th><th>95% CI</th>"
        "<th>spread of (a - b) / (a + b + 1)</th><th>what is counted</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        '<p class="lb-note">+ means annotators favour the answer with more of it, whatever the model; '
        "the ratings above are with it held equal.</p></div>"
    )


LEADERBOARD_CSS = """
.lb-table { border-collapse: collapse; font-variant-numeric: tabular-nums; width: auto; min-width: 60%; }
.lb-table th, .lb-table td { padding: 4px 10px; border-bottom: 1px solid var(--border-color-primary);
  text-align: right; }
.lb-table th:nth-child(2), .lb-table td.model, .lb-evals td, .lb-evals th { text-align: left; }
.lb-coefs th:first-child, .lb-coefs th:last-child, .lb-coefs td.what { text-align: left; }
.lb-table tr.anchor td { font-weight: 650; }
.lb-provisional { font-size: 0.8em; color: var(--body-text-color-subdued); font-style: italic; }
.lb-plot-box, .lb-matrix-box { overflow-x: auto; }
.lb-plot { max-width: 100%; height: auto; }
.lb-matrix { border-collapse: collapse; font-size: 0.8em; font-variant-numeric: tabular-nums; }
.lb-matrix td { width: 46px; min-width: 46px; text-align: center; padding: 3px 2px; border: 1px solid #fff;
  color: #18181b; }
.lb-matrix td small { display: block; font-size: 0.8em; color: #52525b; }
.lb-matrix td.self { background: #f4f4f5; }
.lb-matrix td.none { color: #a1a1aa; }
.lb-matrix th.row { text-align: right; padding-right: 6px; white-space: nowrap; }
.lb-matrix th .col { writing-mode: vertical-rl; transform: rotate(180deg); white-space: nowrap; max-height: 160px;
  overflow: hidden; text-overflow: ellipsis; }
.lb-note { color: var(--body-text-color-subdued); }
.lb-error { color: var(--error-text-color, #b91c1c); }
"""
