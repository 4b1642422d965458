"""The Train tab's metric plots, drawn here as SVG: one chart per plot, every series as a
line with its points marked, and the last value of each series as a number beside it.

    html_a, html_b = run_plots(info, reader)     # a RunInfo and its MetricsReader
    empty_plot("run-plot-a")                      # no run selected

Why not gr.LinePlot: in gradio 6 it draws nothing for a series of one point (a Vega line
mark needs two), and when its value and title change in one update it draws the previous
value (the chart lags one update behind), so a newly selected run showed the last run's
curves until its next step. Here a chart is a string the server renders whole on every
change: a new run replaces the old one at once, one point is a marker, and what the
browser shows is exactly what the tests read (data-* attributes on each series).

Everything a person or a model wrote (run ids, labels) goes through annotate.web.html.escape.
"""

from __future__ import annotations

import math

from annotate.web.html import escape as _e
from trainer.runs import LAUNCH_FILE, read_json

# What the tab plots, per kind: [(title, y axis, [(record kind, key, series label), ...]), ...].
PLOTS = {
    "reward": [
        ("Loss", "loss", [("train", "loss", "train"), ("eval", "val_loss", "validation")]),
        ("Accuracy", "accuracy", [("train", "acc", "train"), ("eval", "val_acc", "validation")]),
    ],
    "policy": [
        (
            "Reward",
            "reward",
            [("train", "reward_mean", "reward (mean)"), ("train", "objective", "objective")],
        ),
        ("KL to the reference", "nats", [("train", "kl", "KL per answer")]),
    ],
    "dpo": [  # a policy run of train-dpo: no reward model, its implicit reward instead
        ("DPO loss", "loss", [("train", "loss", "train"), ("eval", "val_loss", "validation")]),
        (
            "Implicit-reward accuracy",
            "accuracy",
            [("train", "reward_acc", "train"), ("eval", "val_acc", "validation")],
        ),
    ],
}
COLOURS = ("#6366f1", "#d97706", "#059669", "#dc2626")
W, H = 560, 230  # the SVG's coordinate box; it scales to the column's width
LEFT, RIGHT, TOP, BOTTOM = 56, 14, 10, 36
MARK_ALL = 60  # series with at most this many points get a marker on each; longer ones on the last
MAX_DRAWN = 400  # longer series are thinned to each bucket's lowest and highest point


def number(value: float) -> str:
    """4 significant digits: 0.001234, -0.4512, 1234, 1.235e-05."""
    return "0" if value == 0 else f"{value:.4g}"


def _ticks(lo: float, hi: float, count: int = 5, whole: bool = False) -> list[float]:
    """Round numbers (1, 2 or 5 times a power of ten apart) between lo and hi; whole
    numbers only with `whole` (steps)."""
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if whole:
        step = max(step, 1)
    first = math.ceil(lo / step - 1e-9)
    ticks = [i * step for i in range(first, math.floor(hi / step + 1e-9) + 1)]
    decimals = max(0, -math.floor(math.log10(step)))
    return [round(t, decimals) for t in ticks]


def _tick_label(t: float) -> str:
    return f"{t:.6g}"


def _domain(values: list[float], pad_share: float) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:  # one value: centre it
        pad = max(abs(lo) * 0.1, 1e-3) if pad_share else 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * pad_share
    return lo - pad, hi + pad


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """At most ~MAX_DRAWN points, keeping each bucket's lowest and highest (spikes stay
    visible) and the last point (its value is the one shown)."""
    if len(points) <= MAX_DRAWN:
        return points
    buckets = MAX_DRAWN // 2
    size = math.ceil(len(points) / buckets)
    kept = []
    for i in range(0, len(points), size):
        chunk = points[i : i + size]
        lo, hi = min(chunk, key=lambda p: p[1]), max(chunk, key=lambda p: p[1])
        kept.extend(sorted({lo, hi}))
    if kept[-1] != points[-1]:
        kept.append(points[-1])
    return kept


def plot_html(
    title: str,
    series: list[tuple[str, list[tuple[float, float]]]],
    *,
    run_id: str = "",
    y_title: str = "",
    caption: str = "",
) -> str:
    """One chart: `series` is [(label, [(step, value), ...]), ...]; with the last value of
    each series beside it, and `caption` (plain text) under it."""
    total = sum(len(pts) for _, pts in series)
    drawn = [(label, pts) for label, pts in series if pts]
    xs = [s for _, pts in drawn for s, _ in pts]
    ys = [v for _, pts in drawn for _, v in pts]
    x0, x1 = _domain(xs, 0.0) if xs else (0.0, 1.0)
    y0, y1 = _domain(ys, 0.05) if ys else (0.0, 1.0)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(s: float) -> float:
        return LEFT + (s - x0) / (x1 - x0) * pw

    def py(v: float) -> float:
        return TOP + (1 - (v - y0) / (y1 - y0)) * ph

    svg = [
        f'<svg viewBox="0 0 {W} {H}" width="100%" role="img" aria-label="{_e(title)}" '
        'style="display:block;font-size:11px;overflow:visible" fill="currentColor">',
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="currentColor" '
        'stroke-opacity="0.25"/>',
    ]
    if drawn:
        for t in _ticks(y0, y1):
            y = py(t)
            svg.append(
                f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="currentColor" '
                f'stroke-opacity="0.12"/><text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                f"{_tick_label(t)}</text>"
            )
        for t in _ticks(x0, x1, 6, whole=True):
            x = px(t)
            svg.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP + ph}" y2="{TOP + ph + 4}" stroke="currentColor" '
                f'stroke-opacity="0.5"/><text x="{x:.1f}" y="{TOP + ph + 16}" text-anchor="middle">'
                f"{_tick_label(t)}</text>"
            )
    else:
        svg.append(
            f'<text class="no-points" x="{LEFT + pw / 2}" y="{TOP + ph / 2}" text-anchor="middle" '
            'fill-opacity="0.6">no points yet</text>'
        )
    svg.append(f'<text x="{LEFT + pw / 2}" y="{H - 2}" text-anchor="middle" fill-opacity="0.7">step</text>')
    if y_title:
        svg.append(
            f'<text transform="translate(12 {TOP + ph / 2}) rotate(-90)" text-anchor="middle" '
            f'fill-opacity="0.7">{_e(y_title)}</text>'
        )
    latest = []
    for i, (label, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        if pts:
            shown = _thin(pts)
            g = [f'<g class="series" data-series="{_e(label)}" data-points="{len(pts)}">']
            if len(shown) > 1:
                d = "M" + "L".join(f"{px(s):.1f},{py(v):.1f}" for s, v in shown)
                g.append(
                    f'<path class="series-line" d="{d}" fill="none" stroke="{colour}" stroke-width="2"/>'
                )
            marked = shown if len(pts) <= MARK_ALL else shown[-1:]
            for s, v in marked:
                g.append(
                    f'<circle class="point" cx="{px(s):.1f}" cy="{py(v):.1f}" r="3.5" fill="{colour}">'
                    f"<title>{_e(label)} · step {_tick_label(s)}: {number(v)}</title></circle>"
                )
            g.append("</g>")
            svg.extend(g)
            step, value = pts[-1]
            shown_value, at = number(value), f"step {_tick_label(step)}"
        else:
            shown_value, at = "–", "no points yet"
        latest.append(
            f'<div class="latest" data-series="{_e(label)}" style="margin-bottom:8px">'
            f'<div><span style="display:inline-block;width:10px;height:10px;border-radius:2px;'
            f'background:{colour};margin-right:6px"></span><span class="latest-label">{_e(label)}</span></div>'
            f'<div class="latest-value" style="font-size:1.25em;font-weight:600;'
            f'font-variant-numeric:tabular-nums">{shown_value}</div>'
            f'<div class="latest-step" style="opacity:0.7;font-size:0.85em">{at}</div></div>'
        )
    svg.append("</svg>")
    head = f"{title} · {run_id}" if run_id else title
    note = (
        f'<div class="plot-caption" style="font-size:0.85em;opacity:0.8">{_e(caption)}</div>'
        if caption
        else ""
    )
    return (
        f'<div class="metric-plot" data-run="{_e(run_id)}" data-points="{total}">'
        f'<div class="plot-title" style="font-weight:600;margin-bottom:4px">{_e(head)}</div>'
        '<div style="display:flex;gap:12px;align-items:flex-start">'
        f'<div style="flex:1;min-width:0">{"".join(svg)}</div>'
        f'<div class="plot-latest" style="min-width:8.5em;max-width:11em">'
        f'<div style="opacity:0.7;font-size:0.85em;margin-bottom:4px">last values</div>{"".join(latest)}</div>'
        f"</div>{note}</div>"
    )


def empty_plot() -> str:
    return plot_html("Metrics", [])


def _last(reader, key: str) -> float | None:
    pts = reader.series("train", key)
    return pts[-1][1] if pts else None


def policy_captions(info, reader) -> tuple[str, str]:
    """What the policy plots mean, with this run's numbers: the objective taken apart
    (it sits below the reward by the missing-EOS penalty, which can be most of it), and
    which KL estimate is shown and which one the reward's penalty uses."""
    settings = (info.config or {}).get("config") or {}
    estimator = settings.get("kl_estimator", "k1")
    parts = [_last(reader, k) for k in ("reward_mean", "score_mean", "kl_coef", "kl_penalty", "objective")]
    reward_caption = (
        "objective = reward − missing-EOS penalty − β·KL (the KL the penalty uses): what the "
        "update maximises; the penalty is charged on each answer cut off at Max new tokens."
    )
    if all(p is not None for p in parts):
        reward, score, beta, kl_pen, objective = parts
        eos = _last(reader, "eos_rate")
        cut = f" ({100 * (1 - eos):.0f}% of answers cut off)" if eos is not None else ""
        reward_caption += (
            f" Last step: {number(reward)} − {number(reward - score)}{cut} − {number(beta * kl_pen)} "
            f"= {number(objective)}."
        )
    k3 = bool(reader.series("train", "kl_k1"))  # runs before the k3 display logged k1 as "kl"
    kl_caption = (
        "KL(policy ‖ reference) per answer, in nats, estimated with k3 = (r − 1) − log r, "
        "r = p_ref / p (Schulman): unbiased and never negative."
        if k3
        else "KL(policy ‖ reference) per answer, in nats, estimated with k1 = log p − log p_ref "
        "(this run predates the k3 display: k1 can be slightly negative)."
    )
    kl_caption += f" The reward's penalty uses {estimator}"
    kl_caption += (
        ", summed per token: it can be negative per answer, its expectation is the KL."
        if estimator == "k1"
        else "."
    )
    return reward_caption, kl_caption


def run_plots(info, reader) -> tuple[str, str]:
    """The two charts of a run (RunInfo, MetricsReader)."""
    # train-dpo's policy runs: by its config.json, or before it exists (queued, loading) by
    # the trainer the launcher recorded
    dpo = info.kind == "policy" and (
        (info.config or {}).get("algo") == "dpo" or read_json(info.path / LAUNCH_FILE).get("trainer") == "dpo"
    )
    specs = PLOTS["dpo"] if dpo else PLOTS.get(info.kind, PLOTS["reward"])
    captions = policy_captions(info, reader) if info.kind == "policy" and not dpo else ("", "")
    out = []
    for (title, y_title, series), caption in zip(specs, captions):
        out.append(
            plot_html(
                title,
                [(label, reader.series(kind, key)) for kind, key, label in series],
                run_id=info.run_id,
                y_title=y_title,
                caption=caption,
            )
        )
    return out[0], out[1]
