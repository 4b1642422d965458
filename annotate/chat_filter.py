"""What an annotator may send to the chat's models (`serve --chat`): at most
`--chat-max-chars` characters, valid text, and none of the words or phrases of the
optional `--chat-blocklist FILE`.

    f = PromptFilter(max_chars=4000, blocklist=load_blocklist("blocked.txt"))
    f.problem("some text")        # None, or why it is refused (one line, for the page)

The blocklist file: one word or phrase per line; blank lines and lines starting with #
are ignored. A match is case-insensitive and on whole words ("ass" does not refuse
"class"); the spaces inside a phrase match any run of whitespace.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from trainer.errors import PreflabError
from trainer.rows import text_problem

DEFAULT_MAX_CHARS = 4000
# The chat's other limits (annotate/chat.py applies them), here so that the flags
# (annotate/serve_args.py) need nothing heavier than this module.
DEFAULT_MAX_TURNS = 8
DEFAULT_IDLE_S = 30 * 60.0
MAX_BLOCKLIST_ENTRIES = 100_000  # a word list, not a corpus


class BlocklistError(PreflabError):
    """The blocklist file cannot be used; the message names it."""


def load_blocklist(path: str | os.PathLike) -> list[str]:
    """The phrases of a blocklist file (BlocklistError naming the file and line if bad)."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise BlocklistError(f"--chat-blocklist {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise BlocklistError(f"--chat-blocklist {path}: not UTF-8 text") from None
    phrases = []
    for n, line in enumerate(text.splitlines(), start=1):
        phrase = " ".join(line.split())
        if not phrase or phrase.startswith("#"):
            continue
        if problem := text_problem(phrase):
            raise BlocklistError(f"--chat-blocklist {path}, line {n}: {problem}")
        phrases.append(phrase)
    if len(phrases) > MAX_BLOCKLIST_ENTRIES:
        raise BlocklistError(
            f"--chat-blocklist {path}: {len(phrases):,} entries; at most {MAX_BLOCKLIST_ENTRIES:,}"
        )
    return phrases


class PromptFilter:
    def __init__(self, *, max_chars: int = DEFAULT_MAX_CHARS, blocklist: Iterable[str] = ()):
        if max_chars < 1:
            raise BlocklistError(f"--chat-max-chars must be at least 1, got {max_chars}")
        self.max_chars = max_chars
        # Phrases as tuples of tokens, looked up in a set at each token of a message: the
        # time is the message's length x the number of distinct phrase lengths, whatever
        # the list's size (one regular expression of 100,000 alternatives took seconds
        # per message, holding the GIL).
        self._blocked: set[tuple[str, ...]] = {tuple(_tokens(p)) for p in blocklist} - {()}
        self._lengths = sorted({len(p) for p in self._blocked})

    def problem(self, text: str) -> str | None:
        """Why `text` may not be sent (nothing is generated for it), None if it may."""
        if not text.strip():
            return "the message is empty: write something first"
        if len(text) > self.max_chars:
            return (
                f"the message is {len(text):,} characters; at most {self.max_chars:,} may be sent: "
                "shorten it (nothing was sent)"
            )
        if problem := text_problem(text):
            return f"the message is {problem}: remove that character (nothing was sent)"
        if hit := self._blocked_span(text):
            return (
                f"the message contains {hit[:60]!r}, which this server does not accept: "
                "rephrase it (nothing was sent)"
            )
        return None

    def _blocked_span(self, text: str) -> str | None:
        """The first stretch of `text` that is a blocked phrase, as written, or None."""
        if not self._blocked:
            return None
        spans = list(_TOKEN.finditer(text))
        words = [m.group().lower() for m in spans]
        for i in range(len(words)):
            for n in self._lengths:
                if i + n <= len(words) and tuple(words[i : i + n]) in self._blocked:
                    return text[spans[i].start() : spans[i + n - 1].end()]
        return None


# A token: a run of word characters, or one other non-space character. A phrase matches
# whole tokens ("ass" does not refuse "class"; "c++" refuses "c++" but not "c"), whatever
# whitespace lies between them.
_TOKEN = re.compile(r"\w+|[^\w\s]")


def _tokens(text: str) -> list[str]:
    return [m.group().lower() for m in _TOKEN.finditer(text)]
