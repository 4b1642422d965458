"""Sampling answers from an in-process causal language model (trainer/models.py loads
it): the prompt a model continues, and batched, seeded, stoppable generation.

    text = render_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    answers = generate_answers(model, tokenizer, conversations, n=2, max_new_tokens=128)
    answers[i][j].text, answers[i][j].cut          # answer j to conversation i; cut by the limit

torch / transformers are imported inside functions so that importing this module stays
cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.models import setup_tokenizer

# A transcript's speaker names, for tokenizers without a chat template.
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_prompt(tokenizer, messages: list[dict[str, str]] | str) -> str:
    """The text the model continues: the chat template with the assistant turn opened,
    or a plain transcript for tokenizers that have no template."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [f"{ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    return "\n\n".join(turns + ["Assistant:"])


@dataclass(frozen=True)
class Answer:
    text: str  # the new text only, special tokens stripped
    cut: bool  # stopped by max_new_tokens, not by the model: it may end mid-sentence


def generate(model, tokenizer, conversations, **settings) -> list[list[str]]:
    """`generate_answers`, the texts only: result[i][j] is answer j to conversation i."""
    return [
        [a.text for a in answers] for answers in generate_answers(model, tokenizer, conversations, **settings)
    ]


def _stop_criteria(event):
    """transformers' StoppingCriteria: every row done as soon as `event` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full(
                (input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return StoppingCriteriaList([StopWhenSet()])


def generate_answers(
    model,
    tokenizer,
    conversations,
    *,
    n: int = 2,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    stop=None,
) -> list[list[Answer]]:
    """`n` sampled answers for each conversation (a list of chat messages, or a string
    taken as one user message): result[i][j] is answer j to conversation i, with whether
    the token limit cut it off (no end-of-sequence token). `temperature=0` is greedy.
    `stop` (a threading.Event): once set, generation ends at the next token and the
    answers so far come back (a server shutting down need not wait for a whole batch).

    Rows (each conversation repeated n times) are sorted by prompt length and cut into
    batches of `batch_size`, so a batch pads little. The same inputs, seed and batch size
    give the same answers; the global torch RNG is left as it was.
    """
    import torch
    from tqdm.auto import tqdm

    setup_tokenizer(tokenizer)
    texts = [render_prompt(tokenizer, c) for c in conversations]
    # The chat template already spells out BOS/role tokens; a transcript needs them added.
    add_special = not getattr(tokenizer, "chat_template", None)
    prompt_ids = tokenizer(texts, add_special_tokens=add_special).input_ids if texts else []
    rows = sorted(((i, j) for i in range(len(texts)) for j in range(n)), key=lambda r: len(prompt_ids[r[0]]))
    results: list[list[Answer]] = [[Answer("", False)] * n for _ in texts]

    eos = {tokenizer.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    eos.discard(None)
    settings = dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(eos),
        use_cache=True,
    )
    if temperature > 0:
        # top_k=0: no top-k cut on top of top-p (transformers would otherwise apply 50).
        settings.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        settings.update(do_sample=False)

    if stop is not None:
        settings["stopping_criteria"] = _stop_criteria(stop)

    device = model.device
    forked = [device.index or 0] if device.type == "cuda" else []
    batches = range(0, len(rows), batch_size)
    with torch.random.fork_rng(devices=forked), torch.inference_mode():
        torch.manual_seed(seed)
        for start in tqdm(batches, desc="generating", unit="batch", disable=not progress):
            batch = rows[start : start + batch_size]
            padded = tokenizer.pad(
                {"input_ids": [prompt_ids[i] for i, _ in batch]}, padding=True, return_tensors="pt"
            )
            out = model.generate(
                input_ids=padded["input_ids"].to(device),
                attention_mask=padded["attention_mask"].to(device),
                **settings,
            )
            new = out[:, padded["input_ids"].shape[1] :]  # left padding: prompts end together
            ended = torch.isin(new, torch.tensor(sorted(eos), device=new.device)).any(dim=1).tolist()
            for (i, j), text, stopped in zip(
                batch, tokenizer.batch_decode(new, skip_special_tokens=True), ended
            ):
                results[i][j] = Answer(text.strip(), cut=not stopped)
    return results
