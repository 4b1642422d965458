"""Preference pairs -> token ids -> one forward's tensors, for the reward model.

    encode_pairs(pairs, tokenizer, max_length)    -> Encoded      token ids, prompt cut from the left
    length_grouped_batches(lengths, bs, seed, epoch) -> batches of pair indices
    pack(encoded, batch, pad_id)                  -> one forward's tensors: shared-prompt packing
    collate(encoded, batch, pad_id)               -> one forward's tensors: plain right padding

Truncation keeps the answers whole and cuts the oldest prompt tokens, so a long
conversation still ends where the answers begin. Packing puts [prompt | chosen |
rejected] in one segment with a mask that hides chosen from rejected: the prompt runs
once, and no answer is padded to the other's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.reward_data import Pairs
from trainer.store import messages_to_json
from trainer.style_features import markdown_counts, style_differences

# --------------------------------------------------------------------------------------
# Tokenization with left truncation of the prompt
# --------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids of both sides of every pair: prompt + answer + EOS, at most max_length."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    chosen_len: np.ndarray  # answer length in tokens before any cut (for length bias)
    rejected_len: np.ndarray
    label: np.ndarray
    margin: np.ndarray
    shared: np.ndarray = None  # tokens both sides begin with (the prompt, at least), < both lengths
    prompts_cut: int = 0  # pairs whose prompt lost tokens on the left
    responses_cut: int = 0  # answers that alone were too long (cut at their end)
    weight: np.ndarray = None  # each vote's weight in the loss (--weights); None: all 1
    # (pairs, 3): headers, list items, bold spans of each answer (trainer.style_features),
    # for the markdown bias next to the length bias
    chosen_markdown: np.ndarray = None
    rejected_markdown: np.ndarray = None
    head: np.ndarray = None  # the reward head each pair trains (--criteria); all 0 with one head

    def __len__(self) -> int:
        return len(self.chosen)

    def style_differences(self, idx) -> np.ndarray:
        """(len(idx), 4) float32: per pair (chosen - rejected) / (chosen + rejected + 1) of
        the answers' length in tokens, headers, list items and bold (trainer.style_features's
        FEATURES order), what --style-penalty decorrelates the reward gap from."""
        idx = np.asarray(idx, dtype=np.int64)
        chosen = np.column_stack([self.chosen_len[idx], self.chosen_markdown[idx]])
        rejected = np.column_stack([self.rejected_len[idx], self.rejected_markdown[idx]])
        return style_differences(chosen, rejected).astype(np.float32)

    def lengths(self, packed: bool = True) -> np.ndarray:
        """A pair's cost in tokens. Packed: shared prefix once + both answers. Padded: twice
        the longer side (both sides are padded to one length in one forward)."""
        c = np.array([len(x) for x in self.chosen], dtype=np.int64)
        r = np.array([len(x) for x in self.rejected], dtype=np.int64)
        return c + r - self.shared if packed else np.maximum(c, r)


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share, leaving at least the last token
    (the EOS the reward is read at) to each side."""
    n, limit = 0, min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def render_prompts(tokenizer, prompts: list[list[dict[str, str]]]) -> tuple[list[str], bool]:
    """Prompt texts (the chat template with the assistant turn opened) and whether the
    tokenizer must add special tokens itself (only when there is no chat template)."""
    from trainer.sampling import render_prompt

    has_template = bool(getattr(tokenizer, "chat_template", None))
    return [render_prompt(tokenizer, p) for p in prompts], not has_template


def fit(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> tuple[list[int], int]:
    """prompt + answer in at most max_length tokens. Returns (ids, cut): cut 0 = whole,
    1 = the prompt lost its oldest tokens (the answer is what is judged, so it is kept),
    2 = the answer alone was too long: its head and its final (EOS) token are kept, so
    the reward is still read at the end-of-answer token."""
    if len(prompt_ids) + len(answer_ids) <= max_length:
        return prompt_ids + answer_ids, 0
    if len(answer_ids) <= max_length:
        keep = max_length - len(answer_ids)
        return prompt_ids[len(prompt_ids) - keep :] + answer_ids, 1
    return answer_ids[: max_length - 1] + answer_ids[-1:], 2


def encode_texts(
    tokenizer, prompts: list[list[dict[str, str]]], answers: list[str], max_length: int
) -> tuple[list[list[int]], np.ndarray, list[int]]:
    """(ids, answer token lengths, cut codes) for prompt/answer pairs, as the reward model
    reads them in training and in `RewardModel.score` alike."""
    keys = [messages_to_json(p) for p in prompts]
    distinct = list(dict.fromkeys(keys))  # tokenize each distinct prompt once
    by_key = dict(zip(keys, prompts))
    texts, add_special = render_prompts(tokenizer, [by_key[k] for k in distinct])
    prompt_ids = (
        dict(zip(distinct, tokenizer(texts, add_special_tokens=add_special).input_ids)) if distinct else {}
    )
    # The answer closes with EOS, the token the reward is read at: it has seen the whole answer.
    eos = tokenizer.eos_token or ""
    answer_ids = tokenizer([a + eos for a in answers], add_special_tokens=False).input_ids if answers else []
    out, cuts = [], []
    for k, a in zip(keys, answer_ids):
        ids, cut = fit(prompt_ids[k], a, max_length)
        out.append(ids)
        cuts.append(cut)
    lengths = np.array([len(a) - (1 if eos else 0) for a in answer_ids], dtype=np.int64)
    return out, lengths, cuts


def fit_pair(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int
) -> tuple[list[int], list[int], bool, int]:
    """Both sides of a pair in at most max_length tokens each, with ONE prompt tail: the
    prompt is cut (from the left) to fit the longer answer, so both answers are judged
    against the same visible context (the one the annotator compared them in), and the
    packed layout can run that prompt once. Returns (chosen ids, rejected ids, whether the
    prompt was cut, how many answers were themselves too long and cut at their end)."""
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids + chosen_ids, prompt_ids + rejected_ids, False, 0
    keep = max(0, max_length - longest)
    tail = prompt_ids[len(prompt_ids) - keep :] if keep else []
    (c, cut_c), (r, cut_r) = fit(tail, chosen_ids, max_length), fit(tail, rejected_ids, max_length)
    return c, r, True, (cut_c == 2) + (cut_r == 2)


def prompt_ids_by_key(tokenizer, pairs: Pairs) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """(chosen's context keys, rejected's, token ids of each distinct context): every
    distinct context (both sides' of a chat vote) tokenized once, in one call."""
    keys, rejected_keys = pairs.prompt_keys(), pairs.rejected_prompt_keys()
    by_key = dict(zip(keys, pairs.prompts)) | dict(zip(rejected_keys, pairs.rejected_prompts))
    distinct = list(dict.fromkeys(keys + rejected_keys))
    texts, add_special = render_prompts(tokenizer, [by_key[k] for k in distinct])
    ids = dict(zip(distinct, tokenizer(texts, add_special_tokens=add_special).input_ids)) if distinct else {}
    return keys, rejected_keys, ids


def fit_sides(
    chosen_prompt: list[int],
    rejected_prompt: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    max_length: int,
) -> tuple[list[int], list[int], bool, int]:
    """fit_pair when both answers share one context; a chat vote's two sides, each with
    its own history, are each fitted to their own (the oldest tokens cut, answers kept)."""
    if chosen_prompt is rejected_prompt or chosen_prompt == rejected_prompt:
        return fit_pair(chosen_prompt, chosen_ids, rejected_ids, max_length)
    c, cut_c = fit(chosen_prompt, chosen_ids, max_length)
    r, cut_r = fit(rejected_prompt, rejected_ids, max_length)
    # A context lost tokens when it was cut (1), or dropped whole for an answer too long (2).
    prompt_cut = any(
        cut == 1 or (cut == 2 and bool(p)) for cut, p in ((cut_c, chosen_prompt), (cut_r, rejected_prompt))
    )
    return c, r, prompt_cut, (cut_c == 2) + (cut_r == 2)


def encode_pairs(pairs: Pairs, tokenizer, max_length: int) -> Encoded:
    keys, rejected_keys, prompt_ids = prompt_ids_by_key(tokenizer, pairs)
    # All answers in one batched tokenizer call; each closes with EOS, where the reward is read.
    eos = tokenizer.eos_token or ""
    answers = (
        tokenizer([a + eos for a in pairs.chosen + pairs.rejected], add_special_tokens=False).input_ids
        if len(pairs)
        else []
    )
    n = len(pairs)
    chosen, rejected, prompts_cut, answers_cut = [], [], 0, 0
    for k, rk, a_c, a_r in zip(keys, rejected_keys, answers[:n], answers[n:]):
        c, r, prompt_cut, answer_cuts = fit_sides(prompt_ids[k], prompt_ids[rk], a_c, a_r, max_length)
        chosen.append(c)
        rejected.append(r)
        prompts_cut += bool(prompt_cut)
        answers_cut += answer_cuts
    lengths = np.array([len(a) - (1 if eos else 0) for a in answers], dtype=np.int64)
    return Encoded(
        chosen=chosen,
        rejected=rejected,
        chosen_len=lengths[:n],
        rejected_len=lengths[n:],
        label=np.asarray(pairs.label, dtype=np.float32),
        margin=np.asarray(pairs.margin, dtype=np.float32),
        weight=np.asarray(pairs.weight, dtype=np.float32),
        shared=np.array([shared_prefix(c, r) for c, r in zip(chosen, rejected)], dtype=np.int64),
        prompts_cut=prompts_cut,
        responses_cut=answers_cut,
        chosen_markdown=markdown_counts(pairs.chosen),
        rejected_markdown=markdown_counts(pairs.rejected),
        head=np.asarray(pairs.head, dtype=np.int64),
    )


# --------------------------------------------------------------------------------------
# Batches grouped by length, and padding
# --------------------------------------------------------------------------------------


def length_grouped_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, megabatch: int = 64
) -> list[np.ndarray]:
    """The epoch's batches of pair indices, each holding pairs of similar length.

    Length grouping: shuffle, cut into megabatches of `megabatch` batches, sort each
    megabatch by length and cut it into batches, then shuffle the batch order. Padding
    shrinks to almost nothing while every epoch still sees a fresh random order. The
    longest batch goes first, so an out-of-memory shows up in the first step, not hours in.
    Seeded by (seed, epoch), so a resumed run rebuilds exactly the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    size = batch_size * megabatch
    batches = []
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    perm = rng.permutation(len(batches))
    batches = [batches[i] for i in perm]
    if batches:
        longest = max(range(len(batches)), key=lambda i: lengths[batches[i]].max())
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def collate(enc: Encoded, batch, pad_id: int) -> dict[str, Any]:
    """Plain layout: one right-padded row per sequence; rows 0..B-1 are the chosen sides,
    B..2B-1 the rejected ones (both sides in ONE forward: one pass over the weights).
    `read_row`/`read_col` say where each reward is read: the last real token of its row."""
    seqs = [enc.chosen[i] for i in batch] + [enc.rejected[i] for i in batch]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    lengths = mask.sum(1)
    return _tensors(
        enc,
        batch,
        input_ids=ids,
        attention_mask=mask,
        read_row=np.arange(len(seqs)),
        read_col=lengths - 1,
        tokens=int(lengths.sum()),
        slots=ids.size,
    )


def pack(enc: Encoded, batch, pad_id: int) -> dict[str, Any]:
    """Shared-prompt packing: each pair is laid out ONCE as [prompt | chosen | rejected].

        tokens     p0 p1 p2 | c0 c1 c2 c3 | r0 r1
        positions   0  1  2 |  3  4  5  6 |  3  4      the rejected answer restarts after the prompt
        branch      0  0  0 |  1  1  1  1 |  2  2      rejected tokens may not attend to branch 1

    With that attention mask (built by the model from `segment` and `branch`: same pair,
    causal, and rejected never sees chosen) every token computes exactly what it would in
    its own sequence [prompt + answer], but the prompt is run once instead of twice and
    the shorter answer is never padded to the longer one. Pairs are then packed into rows
    as wide as the widest pair, first-fit-decreasing, so short pairs share a row.
    """
    batch = np.asarray(batch)
    P = enc.shared[batch]
    sizes = enc.lengths(packed=True)[batch]
    width = int(sizes.max())
    rows: list[list[int]] = []  # positions k (into batch) of the pairs in each row
    room: list[int] = []
    for k in np.argsort(-sizes, kind="stable"):
        row = next((j for j, free in enumerate(room) if free >= sizes[k]), None)
        if row is None:  # no row has room: open a new one
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(int(k))
        room[row] -= int(sizes[k])
    shape = (len(rows), width)
    ids = np.full(shape, pad_id, dtype=np.int64)
    pos = np.zeros(shape, dtype=np.int64)
    segment = np.full(shape, -1, dtype=np.int64)  # pads: their own segment, never attended to
    branch = np.zeros(shape, dtype=np.int64)
    read_row = np.zeros(2 * len(batch), dtype=np.int64)
    read_col = np.zeros(2 * len(batch), dtype=np.int64)
    for row, members in enumerate(rows):
        start = 0
        for k in members:
            i, p = batch[k], int(P[k])
            c, r = enc.chosen[i], enc.rejected[i][p:]
            n_c, end = len(c), start + len(c) + len(r)
            ids[row, start:end] = c + r
            pos[row, start : start + n_c] = np.arange(n_c)
            pos[row, start + n_c : end] = np.arange(p, p + len(r))
            segment[row, start:end] = k
            branch[row, start + p : start + n_c] = 1
            branch[row, start + n_c : end] = 2
            read_row[k], read_col[k] = row, start + n_c - 1  # chosen's EOS
            read_row[len(batch) + k], read_col[len(batch) + k] = row, end - 1  # rejected's EOS
            start = end
    return _tensors(
        enc,
        batch,
        input_ids=ids,
        position_ids=pos,
        segment=segment,
        branch=branch,
        read_row=read_row,
        read_col=read_col,
        tokens=int(sizes.sum()),
        slots=ids.size,
    )


def _tensors(enc: Encoded, batch, *, tokens: int, slots: int, **arrays) -> dict[str, Any]:
    import torch

    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    out.update(
        label=torch.from_numpy(enc.label[batch]),
        margin=torch.from_numpy(enc.margin[batch]),
        weight=torch.from_numpy(
            enc.weight[batch] if enc.weight is not None else np.ones(len(batch), dtype=np.float32)
        ),
        tokens=tokens,
        slots=slots,
    )
    if enc.head is not None:
        out["head"] = torch.from_numpy(enc.head[batch])
    return out
