"""HTML that is safe to put on the page: escaping, model text as Markdown, small pieces
several tabs share.

Everything a user, an annotator or a model wrote goes through `escape` or
`render_markdown` before it reaches the page; nothing here trusts its input.
"""

from __future__ import annotations

import html
import math
from typing import Any

SAFE_SCHEMES = ("http:", "https:", "mailto:")
# A vote's choice as the page says it (the Annotate and Chat tabs).
CHOICE_WORDS = {"left": "A is better", "right": "B is better", "tie": "Tie", "both_bad": "Both bad"}
_markdown = None


def escape(text: Any) -> str:
    """Any value as text for HTML content or a quoted attribute."""
    return html.escape(str(text))


def pct(x: float | None, digits: int = 0) -> str:
    """A share as a percentage; a dash where there is no number (None or NaN)."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def metric_card(label: str, value: str, note: str = "") -> str:
    """One number with its label and a note under it (the `.metric` cards of the page CSS)."""
    return (
        f'<div class="metric"><div class="label">{escape(label)}</div>'
        f'<div class="value">{escape(value)}</div><div class="note">{escape(note)}</div></div>'
    )


def _md():
    """markdown-it with raw HTML off: every `<tag>` in model text is shown as text,
    never parsed. Links survive only with http(s)/mailto targets (a `javascript:` link
    stays literal text); images are off (no request leaves the page for model text)."""
    global _markdown
    if _markdown is None:
        from markdown_it import MarkdownIt

        md = MarkdownIt("commonmark", {"html": False, "breaks": True})
        md.enable(["table", "strikethrough"]).disable("image")
        md.validateLink = lambda url: url.strip().lower().startswith(SAFE_SCHEMES)

        def link_open(renderer, tokens, idx, options, env):
            tokens[idx].attrSet("target", "_blank")
            tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
            return renderer.renderToken(tokens, idx, options, env)

        md.add_render_rule("link_open", link_open)
        # A table wider than its card scrolls sideways in its own box (the `.table-scroll`
        # of the page CSS) instead of squeezing its cells to a letter a line, or running
        # past the card's edge on a phone.
        md.add_render_rule("table_open", lambda *a: '<div class="table-scroll"><table>\n')
        md.add_render_rule("table_close", lambda *a: "</table></div>\n")
        _markdown = md
    return _markdown


def render_markdown(text: str) -> str:
    """Model text -> HTML that runs nothing: Markdown, raw HTML escaped."""
    if not text.strip():
        return '<p class="empty">(empty answer)</p>'
    return _md().render(text)


def render_prompt(messages: list[dict[str, str]]) -> str:
    """A chat prompt as HTML: one block per message, the role as a label."""
    parts = []
    single = len(messages) == 1 and messages[0]["role"] == "user"  # no label needed
    for m in messages:
        role = m["role"] if m["role"] in ("system", "user", "assistant") else "other"
        label = "" if single else f'<div class="role">{escape(m["role"])}</div>'
        parts.append(
            f'<div class="turn turn-{role}">{label}'
            f'<div class="text">{render_markdown(m["content"])}</div></div>'
        )
    return '<div class="chat">' + "".join(parts) + "</div>"
