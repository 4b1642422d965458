"""The judge's prompt and how its answer is read (`preflab judge`, annotate/judge.py).

    template = load_template(None)                  # the shipped one: trainer/data/judge.md
    template = load_template("my-judge.txt")        # JudgeTemplateError naming the file
    text = template.fill(pair.messages, "first answer", "second answer")
    verdict, rationale = parse_verdict(model_output)   # ("a" | "b" | "tie" | None, text)

A template is plain text with str.format-style fields, read and filled, never executed:
`{prompt}` (the conversation, one "role: content" block a message), `{answer_a}` and
`{answer_b}` (the two answers, in the order of that request); `{{` and `}}` are literal
braces. Only these names are allowed, without attribute or index access, conversion or
format spec (str.format would otherwise reach into objects): anything else is refused
when the file is read, naming the file and the field. Both answers must appear.

The verdict is the output's last non-empty line, which must be `Verdict: A`, `Verdict: B`
or `Verdict: tie` (the shipped template says so; a template of one's own should too):
case and surrounding spaces do not matter, a final full stop and Markdown bold are
allowed, nothing else is. Everything before that line is the rationale. An output
without such a line is unparseable: no vote is made from it.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import PreflabError

FIELDS = ("prompt", "answer_a", "answer_b")
FIELDS_HELP = "{prompt}, {answer_a}, {answer_b} ({{ and }} for literal braces)"
MAX_TEMPLATE_CHARS = 20_000
# The last line, whole: "Verdict: A", also "**Verdict:** b." or "verdict: TIE".
_VERDICT = re.compile(r"\**\s*verdict\s*:\s*\**\s*(a|b|tie)\s*\**\s*\.?\s*\**", re.IGNORECASE)


class JudgeTemplateError(PreflabError, ValueError):
    """A --template file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Template:
    text: str
    source: str  # the file it came from, for messages and gen_params

    def fill(self, messages, answer_a: str, answer_b: str) -> str:
        return self.text.format(prompt=render_conversation(messages), answer_a=answer_a, answer_b=answer_b)


def render_conversation(messages) -> str:
    """The conversation as the judge reads it: a one-message prompt as it is, several as
    "role: content" blocks."""
    messages = list(messages)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def check_template(text: str, source: str) -> Template:
    """The template, or JudgeTemplateError naming `source` and what is wrong."""
    if len(text) > MAX_TEMPLATE_CHARS:
        raise JudgeTemplateError(
            f"{source}: {len(text):,} characters; a judge template may have {MAX_TEMPLATE_CHARS:,}"
        )
    seen = set()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:  # a lone "{" or "}"
        raise JudgeTemplateError(f"{source}: {e} (write {{{{ and }}}} for literal braces)") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in FIELDS:
            raise JudgeTemplateError(f"{source}: unknown field {{{name}}}; the fields are {FIELDS_HELP}")
        if spec or conversion:
            raise JudgeTemplateError(
                f"{source}: field {{{name}}} may carry no conversion or format spec; write it as {{{name}}}"
            )
        seen.add(name)
    missing = [f"{{{f}}}" for f in ("answer_a", "answer_b") if f not in seen]
    if missing:
        raise JudgeTemplateError(f"{source}: the template never shows {' and '.join(missing)} to the judge")
    return Template(text, source)


def load_template(path: str | os.PathLike | None) -> Template:
    """The template in `path` (UTF-8 text), or the shipped one for None."""
    from trainer.data import JUDGE_TEMPLATE

    path = Path(path) if path is not None else JUDGE_TEMPLATE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JudgeTemplateError(
            f"{path}: cannot read the judge template ({getattr(e, 'strerror', None) or e})"
        ) from None
    return check_template(text, str(path))


def parse_verdict(output: str) -> tuple[str | None, str]:
    """(verdict in the request's terms, "a" | "b" | "tie", or None when the last line is
    not a verdict; the rationale: the text before that line, stripped)."""
    lines = output.rstrip().splitlines()
    if not lines:
        return None, ""
    match = _VERDICT.fullmatch(lines[-1].strip())
    if match is None:
        return None, output.strip()
    return match.group(1).lower(), "\n".join(lines[:-1]).strip()
