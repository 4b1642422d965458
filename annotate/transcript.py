"""A chat as export writes it: the HH transcript of a prompt, and the Arrow type of a
message list. Shared by annotate/export.py, annotate/export_chat.py and
annotate/importers.py (which parses the transcript back).
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(MESSAGE_TYPE)

# Labels of the HH transcript used for multi-message prompts in the standard format.
ROLE_LABELS = {"user": "Human", "assistant": "Assistant", "system": "System"}
ASSISTANT_CUE = "\n\nAssistant:"


def render_prompt_text(messages: list[dict[str, str]]) -> tuple[str, bool]:
    """A chat prompt as plain text. Returns (text, is_transcript): a lone user message is
    its content; anything else is an HH transcript ending in the assistant cue, and the
    caller puts one space before each answer."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"], False
    return hh_transcript(messages), True


def hh_transcript(messages: list[dict[str, str]]) -> str:
    """The messages as an HH transcript ending in the assistant cue, whatever their number
    (the caller puts one space before the answer)."""
    turns = "".join(f"\n\n{ROLE_LABELS.get(m['role'], m['role'])}: {m['content']}" for m in messages)
    return turns + ASSISTANT_CUE
