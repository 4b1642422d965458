"""Style features of answers: how long they are and how much markdown they use. The
covariates of the style-controlled leaderboard (annotate/style_control.py) and a
diagnostic of a reward model (trainer/reward_metrics.py: does the reward follow length,
headers, lists or bold text?).

    from trainer.style_features import FEATURES, style_counts, style_differences
    counts = style_counts(["# Title\\n\\n- one\\n- two", "plain text"])  # (2, 4): length, headers, lists, bold
    z = style_differences(counts_a, counts_b)                          # (a - b) / (a + b + 1), per feature

The four features are LMArena's (its style-control blog post, FastChat's
`rating_systems.py`): answer length in tokens, markdown headers, list items and bold
spans. Their definitions here:

* length: tokens as a tokenizer's pre-tokenizer splits text, without any model's
  vocabulary: a run of letters and digits is one token, every other visible character
  (punctuation, symbols) one token, and every CJK character (U+3000-U+9FFF, written
  without spaces) one token. LMArena counts tiktoken tokens; a store here holds answers of
  whatever models the arena ran, and the leaderboard must not need a tokenizer download
  or depend on one model's vocabulary. Only the ratio (a - b) / (a + b + 1) enters the
  fit, and that ratio barely moves between two counts that are roughly proportional
  (BPE tokens are ~1.3 of these on English prose). Counted with numpy over the Arrow
  buffer: ~20 ns a byte, where a regex engine counting every match took ~35.
* headers: ATX headers, `#` to `######` then a space, at the start of a line.
* lists: list items, `-`, `*`, `+` or `1.` then a space, at the start of a line (indented
  items too).
* bold: `**text**` or `__text__` on one line.

Headers, lists and bold are counted with fenced code blocks (``` ... ```) removed, as
LMArena does: a `# comment` in Python is not a header. Length counts the whole answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FEATURES = ("length", "headers", "lists", "bold")
FEATURE_HELP = {
    "length": "answer length in tokens (words, punctuation marks, CJK characters)",
    "headers": "markdown headers (# ... ######)",
    "lists": "markdown list items (-, *, +, 1.)",
    "bold": "bold spans (**...** or __...__)",
}

# RE2 patterns (pyarrow.compute): (?m) makes ^ match at every line start; (?s) lets . span lines.
CODE_BLOCK = r"(?s)```.*?```"
MARKDOWN_PATTERNS = {
    "headers": r"(?m)^#{1,6}[ \t]",
    "lists": r"(?m)^[ \t]*(?:[-*+]|\d+\.)[ \t]",
    "bold": r"\*\*[^*\n]+\*\*|__[^_\n]+__",
}

# Byte classes for the token count. Only the first byte of a UTF-8 character is classed
# (continuation bytes, 0x80-0xBF, are dropped first), so a character is one entry.
_SPACE, _WORD, _SINGLE = 0, 1, 2
_CLASS = np.full(256, _SINGLE, np.uint8)  # ASCII punctuation and symbols: a token each
_CLASS[list(b"\t\n\v\f\r ")] = _SPACE
_CLASS[list(b"0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")] = _WORD
# Lead bytes: 0xC3-0xE1 start U+00C0-U+1FFF (Latin-1 letters, Greek, Cyrillic, Arabic,
# Hebrew, Devanagari, ...: letters inside words), 0xEA-0xF4 start U+A000 up (Hangul,
# which is written with spaces, and the rest). 0xC2 (U+0080-U+00BF: NBSP, quotes, signs),
# 0xE2 (U+2000-U+2FFF: dashes, curly quotes, arrows) and 0xE3-0xE9 (U+3000-U+9FFF: CJK
# punctuation, kana, ideographs) stay _SINGLE: one token per character.
_CLASS[0xC3:0xE2] = _WORD
_CLASS[0xEA:0xF5] = _WORD
_CHUNK_BYTES = 1 << 26  # the token count's temporaries stay a few hundred MB on any store


def as_text_array(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """One Arrow array of (large) strings; a null is the empty string."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks else pa.array([], pa.string())
    elif not isinstance(texts, pa.Array):
        texts = pa.array(list(texts), pa.string())
    return pc.fill_null(texts.cast(pa.large_string()), "")


def _token_counts_chunk(arr: pa.Array) -> np.ndarray:
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + n + 1]
    buffer = arr.buffers()[2]
    if n == 0 or buffer is None or offsets[-1] == offsets[0]:
        return np.zeros(n, np.int64)
    data = np.frombuffer(buffer, np.uint8)[offsets[0] : offsets[-1]]
    lead = data[(data & 0xC0) != 0x80]  # one entry per character
    chars = pc.utf8_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(chars, out=starts[1:])  # each string's first character in `lead`
    cls = _CLASS[lead]
    prev = np.empty_like(cls)
    prev[0] = _SPACE
    prev[1:] = cls[:-1]
    first = starts[:-1][chars > 0]
    prev[first] = _SPACE  # a string's first character never continues the string before it
    token_start = (cls == _SINGLE) | ((cls == _WORD) & (prev != _WORD))
    at = np.flatnonzero(token_start)
    return np.diff(np.searchsorted(at, starts))


def token_counts(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Tokens per text (see the module docstring), int64, one per text."""
    arr = as_text_array(texts)
    n = len(arr)
    out = np.zeros(n, np.int64)
    if n == 0:
        return out
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + n + 1]
    # Chunks of about _CHUNK_BYTES of text: a long store never needs gigabytes of masks.
    bounds = np.searchsorted(offsets, np.arange(offsets[0], offsets[-1], _CHUNK_BYTES), side="right") - 1
    bounds = np.unique(np.concatenate([bounds, [n]]).clip(0, n))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out[lo:hi] = _token_counts_chunk(arr.slice(lo, hi - lo))
    return out


MARKDOWN_FEATURES = FEATURES[1:]


def markdown_counts(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n, 3) int64: per text its markdown headers, list items and bold spans
    (MARKDOWN_FEATURES), fenced code blocks left out."""
    arr = as_text_array(texts)
    out = np.zeros((len(arr), len(MARKDOWN_FEATURES)), np.int64)
    if len(arr) == 0:
        return out
    prose = pc.replace_substring_regex(arr, CODE_BLOCK, "")
    for k, name in enumerate(MARKDOWN_FEATURES):
        out[:, k] = pc.count_substring_regex(prose, MARKDOWN_PATTERNS[name]).to_numpy(zero_copy_only=False)
    return out


def style_counts(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n, len(FEATURES)) int64: per text its length in tokens and its markdown headers,
    list items and bold spans (in that order, FEATURES)."""
    arr = as_text_array(texts)
    return np.column_stack([token_counts(arr), markdown_counts(arr)]).astype(np.int64)


def style_differences(counts_a: np.ndarray, counts_b: np.ndarray) -> np.ndarray:
    """(a - b) / (a + b + 1) per feature: in (-1, 1), 0 when the two answers are alike,
    and scale-free (600 vs 300 tokens weighs as 200 vs 100). The +1 keeps two answers
    without any bold text at 0 rather than 0 / 0."""
    a = np.asarray(counts_a, np.float64)
    b = np.asarray(counts_b, np.float64)
    return (a - b) / (a + b + 1.0)
