"""Prompts and answers in the shapes people hand us, as chat messages and plain text.

    text_to_messages(prompt) -> (messages, is_transcript)   a string, maybe an HH transcript
    as_messages(prompt)      -> messages                     a string, its JSON, or messages
    as_response(answer)      -> text                         a string or assistant messages
    implicit_sides(chosen, rejected) -> (context, answer) of each side, TRL's implicit-prompt form

Read by trainer/reward_data.py (train-reward, DPO), trainer/reward_eval.py and the reward
model's scoring. `RewardDataError` is the error of all of them.
"""

from __future__ import annotations

import json
from typing import Any

from trainer.errors import PreflabError

# The Anthropic-HH transcript that `preflab export` writes for multi-message prompts in the
# standard (string) format: "\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant:".
HH_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}
HH_CUE = "\n\nAssistant:"


class RewardDataError(PreflabError, ValueError):
    """Input that a reward model cannot be trained on. The message says what to change."""


def text_to_messages(prompt: str) -> tuple[list[dict[str, str]], bool]:
    """A string prompt as chat messages. Returns (messages, is_transcript).

    An HH transcript ("\\n\\nHuman: ... \\n\\nAssistant:") is split back into its turns
    (exactly what `preflab export` writes for multi-turn prompts); any other string is
    one user message, the same rule `trainer.sampling.render_prompt` applies.
    """
    first_label = prompt[2:].partition(":")[0]
    if prompt.startswith("\n\n") and first_label in HH_ROLES and prompt.endswith(HH_CUE):
        body = prompt[: -len(HH_CUE)]
        messages = []
        for chunk in body.split("\n\n")[1:]:
            role, sep, content = chunk.partition(": ")
            if role in HH_ROLES and sep:
                messages.append({"role": HH_ROLES[role], "content": content})
            elif messages:  # a blank line inside a turn: glue it back onto that turn
                messages[-1]["content"] += "\n\n" + chunk
        if messages:
            return messages, True
    return [{"role": "user", "content": prompt}], False


def as_messages(prompt: Any, where: str = "") -> list[dict[str, str]]:
    """Chat messages from a string, a JSON string of messages, or a list of messages."""
    if isinstance(prompt, str):
        stripped = prompt.lstrip()
        if stripped.startswith("[{"):  # maybe the store's canonical JSON spelling
            try:
                return as_messages(json.loads(prompt), where)
            except (json.JSONDecodeError, RewardDataError):
                pass  # text that merely looks like JSON: it is a user message
        return text_to_messages(prompt)[0]
    if (
        isinstance(prompt, (list, tuple))
        and prompt
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        )
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise RewardDataError(
        f"{where}prompt must be a string or a non-empty list of "
        f"{{'role', 'content'}} messages, got {str(prompt)[:80]!r}"
    )


def as_response(value: Any, transcript: bool = False, where: str = "") -> str:
    """An answer as plain text: a string, or (conversational format) a list of assistant messages."""
    if isinstance(value, str):
        # Answers to an HH transcript carry the space that follows "Assistant:".
        return value[1:] if transcript and value.startswith(" ") else value
    if (
        isinstance(value, (list, tuple))
        and value
        and all(
            isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str)
            for m in value
        )
    ):
        return "".join(m["content"] for m in value)
    raise RewardDataError(
        f"{where}an answer must be a string or a list of assistant messages, got {str(value)[:80]!r}"
    )


def implicit_sides(chosen: Any, rejected: Any, where: str = "") -> tuple[tuple[list, str], tuple[list, str]]:
    """A row of TRL's implicit-prompt conversational form (no `prompt`: `chosen` and
    `rejected` are whole conversations, what `preflab export` writes when a chat vote's
    two sides have different histories) -> ((context, answer) of chosen, of rejected):
    each side's conversation less its last assistant message, and that message."""
    sides = []
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, str):
            messages = _hh_conversation(value)
        else:
            messages = as_messages(value, where) if isinstance(value, (list, tuple)) else None
        if not messages or len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise RewardDataError(
                f"{where}without a prompt column, {name} must be a whole conversation (a list of "
                "messages, or an HH transcript) ending with the assistant answer, "
                f"got {str(value)[:80]!r}"
            )
        sides.append((messages[:-1], messages[-1]["content"]))
    return sides[0], sides[1]


def _hh_conversation(text: str) -> list[dict[str, str]] | None:
    """A whole conversation written as an HH transcript ("\\n\\nHuman: q\\n\\nAssistant: a",
    what `preflab export --format standard` writes in the implicit-prompt form) as
    messages, or None if it is not one. The answer is what follows the last assistant
    label (so an answer that itself contains "\\n\\nAssistant: " is cut there: the
    conversational format has no such ambiguity)."""
    cut = text.rfind(HH_CUE + " ")
    if cut < 0:
        return None
    context, is_transcript = text_to_messages(text[:cut] + HH_CUE)
    if not is_transcript:
        return None
    return [*context, {"role": "assistant", "content": text[cut + len(HH_CUE) + 1 :]}]
