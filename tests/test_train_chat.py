"""Chat votes (record schema version 3) train the reward model and DPO: each side's answer
is scored after its OWN history (trainer.store.side_contexts), never the other side's.
Asserted on the pairs, the snapshot a run trained on and the token rows, not on accuracy."""

from __future__ import annotations

import json

import pytest
from helpers import TINY, chat_vote_record, vote_record, write_store

from trainer.pair_snapshot import load_snapshot
from trainer.reward_data import read_pairs, split_by_prompt


def chat_store(path, n: int = 12):
    """n two-turn chat votes (side a's first answer mentions apples, b's pears; the vote
    goes to a on even i, to b on odd) and two ordinary pair votes."""
    votes = [
        chat_vote_record(
            [(f"Pick a fruit {i}.", f"apple {i}", f"pear {i}"), ("Why?", f"a-why {i}", f"b-why {i}")],
            "a" if i % 2 == 0 else "b",
            annotator="tester",
        )
        for i in range(n)
    ]
    votes += [vote_record(f"Plain question {i}?", f"yes {i}", f"no {i}", "a") for i in range(2)]
    return write_store(path, votes)


def test_read_pairs_gives_each_side_its_own_history_and_keeps_a_conversation_on_one_side(tmp_path):
    pairs = read_pairs(chat_store(tmp_path / "s"))
    assert len(pairs) == 14
    for prompt, chosen, rejected_prompt, rejected in zip(
        pairs.prompts, pairs.chosen, pairs.rejected_prompts, pairs.rejected
    ):
        if chosen.startswith(("yes", "no")):  # an ordinary vote: one context for both
            assert prompt == rejected_prompt and len(prompt) == 1
            continue
        i = chosen.split()[-1]
        side, other = ("a", "b") if chosen.startswith("a-why") else ("b", "a")
        fruit = {"a": "apple", "b": "pear"}
        assert rejected == f"{other}-why {i}"
        assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
        assert (
            prompt[1]["content"] == f"{fruit[side]} {i}"
            and rejected_prompt[1]["content"] == f"{fruit[other]} {i}"
        )
        assert prompt[0] == rejected_prompt[0] and prompt[2] == rejected_prompt[2] == {
            "role": "user",
            "content": "Why?",
        }
    # The split keeps each conversation whole, by its opening (the record's `prompt`).
    train_idx, val_idx = split_by_prompt(pairs, 0.3, seed=0)
    openings = [json.dumps(p[:1]) for p in pairs.prompts]
    assert len(val_idx) and not {openings[i] for i in train_idx} & {openings[i] for i in val_idx}


def test_a_store_of_chat_votes_trains_a_reward_model_on_each_sides_history(tmp_path):
    from trainer.models import load_tokenizer
    from trainer.reward import train
    from trainer.reward_batches import encode_pairs
    from trainer.reward_model import choose_pad_token

    data = chat_store(tmp_path / "s")
    run_dir = tmp_path / "runs" / "rm"
    cfg = {
        **TINY,
        "data": str(data),
        "run_dir": str(run_dir),
        "batch_size": 8,
        "epochs": 1,
        "val_fraction": 0.25,
    }
    assert train(cfg) == 0
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    pairs, train_idx, val_idx = load_snapshot(run_dir / "data.parquet")
    assert len(pairs) == 14 and len(train_idx) + len(val_idx) == 14
    chat_pairs = [i for i, c in enumerate(pairs.chosen) if "why" in c]
    assert len(chat_pairs) == 12
    tok = load_tokenizer("tiny")
    choose_pad_token(tok)
    enc = encode_pairs(pairs, tok, max_length=96)
    for i in chat_pairs:
        n = pairs.chosen[i].split()[-1]
        mine, theirs = ("apple", "pear") if pairs.chosen[i].startswith("a-why") else ("pear", "apple")
        chosen_text, rejected_text = tok.decode(enc.chosen[i]), tok.decode(enc.rejected[i])
        # The row the model read for the chosen answer holds its own side's earlier answer,
        # and the rejected row the other side's: never the other way round.
        assert f"{mine} {n}" in chosen_text and f"{theirs} {n}" not in chosen_text
        assert f"{theirs} {n}" in rejected_text and f"{mine} {n}" not in rejected_text
        assert chosen_text.endswith(pairs.chosen[i] + tok.eos_token)
        # Packing shares only the common start: up to where the two histories part.
        assert 0 < enc.shared[i] < min(len(enc.chosen[i]), len(enc.rejected[i]))
        assert enc.chosen[i][: enc.shared[i]] == enc.rejected[i][: enc.shared[i]]


def test_dpo_trains_on_chat_votes_with_each_answers_own_start(tmp_path):
    from trainer.dpo import encode, train
    from trainer.models import load_tokenizer

    data = chat_store(tmp_path / "s")
    run_dir = tmp_path / "runs" / "dpo"
    cfg = {
        **TINY,
        "kl_prompts": 2,
        "kl_tokens": 4,
        "data": str(data),
        "run_dir": str(run_dir),
        "batch_size": 8,
    }
    assert train({**cfg, "epochs": 1, "val_fraction": 0.25}) == 0
    pairs, _, _ = load_snapshot(run_dir / "data.parquet")
    tok = load_tokenizer("tiny")
    chosen, rejected, starts, _ = encode(pairs, tok, 96)
    for i, answer in enumerate(pairs.chosen):
        if "why" not in answer:
            continue
        mine = "apple" if answer.startswith("a-why") else "pear"
        theirs = "pear" if mine == "apple" else "apple"
        assert mine in tok.decode(chosen[i]) and theirs not in tok.decode(chosen[i])
        assert theirs in tok.decode(rejected[i]) and mine not in tok.decode(rejected[i])
        # Where each side's answer begins: after its own context, so exactly its answer tokens.
        for row, start, text in (
            (chosen[i], starts[i, 0], answer),
            (rejected[i], starts[i, 1], pairs.rejected[i]),
        ):
            assert tok.decode(row[start:]) == text + tok.eos_token


# ---- scoring: the Review tab and eval-reward ------------------------------------------------


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    from helpers import train_tiny_reward_run

    return train_tiny_reward_run(tmp_path_factory.mktemp("chat") / "runs")


def test_review_scores_a_chat_vote_after_each_sides_own_history(tmp_path, reward_run):
    from annotate.review import Reviewer
    from annotate.scoring import items_from_votes
    from trainer.reward_model import RewardModel

    run = reward_run
    # Same opening and same final answers; only the histories differ: two pairs to score.
    first = chat_vote_record([("Hi.", "Hello!", "Hey."), ("Again?", "Same.", "Same too.")], "a")
    second = chat_vote_record([("Hi.", "Go away.", "Leave."), ("Again?", "Same.", "Same too.")], "b")
    data = write_store(tmp_path / "s", [first, second])
    assert len(items_from_votes([first, second])) == 2
    reviewer = Reviewer(data, run.parent)
    reviewer.start(run.name)
    job = reviewer.wait(run.name)
    assert job["state"] == "done" and job["new"] == 2, job
    rm = RewardModel.load(run)
    rows = {r["event_id"]: r for r in job["rows"]}
    for v in (first, second):
        context_a, context_b = (json.loads(v[f"conversation_{s}"])[:-1] for s in "ab")
        expected = rm.score([context_a, context_b], [v["response_a"], v["response_b"]])
        assert (rows[v["event_id"]]["score_a"], rows[v["event_id"]]["score_b"]) == pytest.approx(
            expected, abs=1e-4
        )
    assert rows[first["event_id"]]["score_a"] != pytest.approx(rows[second["event_id"]]["score_a"], abs=1e-6)
    # A chat turn is not sent back to the pair queue (it has two histories to show).
    from annotate.queue import AssignmentQueue

    reviewer.queue = AssignmentQueue()
    sent = reviewer.requeue(run.name, [first["pair_id"]])
    assert sent["queued"] == 0 and "1 chat vote left out" in sent["message"]


def test_eval_reward_reads_the_implicit_prompt_form_each_answer_after_its_own_history(tmp_path, reward_run):
    from helpers import write_jsonl

    from trainer.reward_eval import evaluate_rows, read_eval_rows
    from trainer.reward_model import RewardModel

    run = reward_run
    u1, u2 = {"role": "user", "content": "Hi."}, {"role": "user", "content": "More?"}
    chosen = [u1, {"role": "assistant", "content": "Hello!"}, u2, {"role": "assistant", "content": "Yes."}]
    rejected = [u1, {"role": "assistant", "content": "Go."}, u2, {"role": "assistant", "content": "No."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"chosen": chosen, "rejected": rejected}])
    (row,) = read_eval_rows(path)
    assert row["prompt"] == chosen[:-1] and row["rejected_prompts"] == [rejected[:-1]]
    assert (row["chosen"], row["rejected"]) == ("Yes.", ["No."])
    rm = RewardModel.load(run)
    c, r = rm.score([chosen[:-1], rejected[:-1]], ["Yes.", "No."], normalize=False)
    assert evaluate_rows([row], rm)["accuracy"] == (1.0 if c > r else 0.0 if c < r else 0.5)
    # train-reward reads the same file: each side's context, the split key the opening
    pairs = read_pairs(path)
    assert pairs.prompts == [chosen[:-1]] and pairs.rejected_prompts == [rejected[:-1]]
    assert pairs.groups == [json.dumps([u1], separators=(",", ":"))]


def test_two_long_histories_are_each_cut_from_the_left_and_the_answers_kept():
    from trainer.models import load_tokenizer
    from trainer.reward_batches import encode_pairs
    from trainer.reward_data import Pairs
    from trainer.reward_model import choose_pad_token

    tok = load_tokenizer("tiny")
    choose_pad_token(tok)
    u = {"role": "user", "content": "word " * 100}
    pairs = Pairs()
    pairs.add(
        [u, {"role": "assistant", "content": "apple " * 30}, {"role": "user", "content": "Why?"}],
        "mine",
        "theirs",
        rejected_prompt=[
            u,
            {"role": "assistant", "content": "pear " * 30},
            {"role": "user", "content": "Why?"},
        ],
    )
    enc = encode_pairs(pairs, tok, max_length=48)
    assert enc.prompts_cut == 1 and enc.responses_cut == 0
    assert max(len(enc.chosen[0]), len(enc.rejected[0])) <= 48
    for seq, answer, own, other in (
        (enc.chosen[0], "mine", "apple", "pear"),
        (enc.rejected[0], "theirs", "pear", "apple"),
    ):
        text = tok.decode(seq)
        assert text.endswith(answer + tok.eos_token) and own in text and other not in text


def test_the_snapshot_keeps_each_sides_context_and_the_split_group(tmp_path):
    from trainer.pair_snapshot import save_snapshot

    pairs = read_pairs(chat_store(tmp_path / "s"))
    train_idx, val_idx = split_by_prompt(pairs, 0.3, seed=0)
    save_snapshot(pairs, train_idx, val_idx, tmp_path / "data.parquet")
    back, t, v = load_snapshot(tmp_path / "data.parquet")
    assert (back.prompts, back.rejected_prompts, back.groups) == (
        pairs.prompts,
        pairs.rejected_prompts,
        pairs.groups,
    )
    assert t.tolist() == train_idx.tolist() and v.tolist() == val_idx.tolist()
