"""Pairs made ahead of time: the shipped demo pairs (trainer/data/demo-pairs.jsonl) are valid and
are the ones `make demo` would sample, and a server serves pregenerated pairs first only
where they match its run (annotate/pregenerated.py)."""

from __future__ import annotations

import argparse
import json
import shlex
import time

from helpers import REPO, Server, child_env, client, preflab, write_jsonl

from annotate import serve
from annotate.pair_generator import CPU_MAX_NEW_TOKENS, Generator, default_max_new_tokens
from annotate.pairs import load_pairs
from annotate.pregenerated import DEMO_PAIRS, head_start, matching_pairs
from annotate.queue import AssignmentQueue
from trainer.models import DEFAULT_MODEL
from trainer.prompts import DEFAULT_PROMPTS, load_prompt_pool
from trainer.store import messages_to_json, read_comparisons


def demo_args() -> argparse.Namespace:
    """The flags of `make demo`'s serve command, read from the Makefile, as serve parses them."""
    (line,) = [x for x in (REPO / "Makefile").read_text().splitlines() if "preflab serve" in x]
    argv = shlex.split(line)
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv[argv.index("serve") + 1 :])


def generator_for(args: argparse.Namespace, prompts, device: str = "cpu") -> Generator:
    """The generator `serve` builds for these flags (not started: nothing is loaded)."""
    from annotate.arena import arena_name

    return Generator(
        [arena_name(m) for m in args.model],
        prompts,
        AssignmentQueue(),
        cache_dir=None,
        rounds=args.rounds,
        max_new_tokens=args.max_new_tokens or default_max_new_tokens(device),
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )


def test_the_shipped_demo_pairs_are_what_make_demo_samples_on_a_cpu():
    assert DEMO_PAIRS.stat().st_size < 400_000  # shipped in the repository: kept small
    pairs, problems = load_pairs(DEMO_PAIRS)
    assert problems == []
    pool = {p.id: p for p in load_prompt_pool(DEFAULT_PROMPTS).prompts}
    assert len({p.prompt_id for p in pairs}) == len(pairs)  # one round: one pair per prompt
    for pair in pairs:
        assert pair.prompt == messages_to_json(pool[pair.prompt_id].messages)
        assert pair.model_a == pair.model_b == DEFAULT_MODEL
        assert pair.response_a != pair.response_b
        params = json.loads(pair.gen_params)
        assert {params["a"]["seed"], params["b"]["seed"]} == {0, 1}
        for side in "ab":
            assert params[side]["pregenerated"] is True
            assert params[side]["max_new_tokens"] == CPU_MAX_NEW_TOKENS
            assert (params[side]["temperature"], params[side]["top_p"]) == (0.8, 0.95)
    # And the demo's own server, as the Makefile starts it on a CPU, takes every one of them.
    args = demo_args()
    assert args.max_new_tokens is None and args.pregenerated is None  # the CPU default, the shipped file
    gen = generator_for(args, list(pool.values()))
    used, note = head_start(args.pregenerated, args.prompts, gen)
    assert len(used) == len(pairs), note
    assert [p.pair_id for p in gen.adopt(used)] and gen.status()["generated"] == len(pairs)
    # On a GPU the default is 256 tokens: the CPU-made pairs are left out, with the reason.
    gpu = generator_for(args, list(pool.values()), device="cuda")
    assert gpu.sampling["max_new_tokens"] == 256
    used, note = head_start(args.pregenerated, args.prompts, gpu)
    assert used == [] and f"{len(pairs)} left out (max_new_tokens 128, this server samples 256)" in note


def test_the_shipped_pairs_stay_out_of_a_run_of_ones_own(tmp_path):
    args = demo_args()
    pool = load_prompt_pool(DEFAULT_PROMPTS).prompts
    # Another pool, even a copy of the shipped one: not offered, and the log says why.
    copy = tmp_path / "prompts.jsonl"
    copy.write_text(DEFAULT_PROMPTS.read_text())
    used, note = head_start(None, copy, generator_for(args, pool))
    assert used == [] and "not used" in note and str(copy) in note
    # Another model, or an arena with SmolLM2 in it: every pair left out, by its models.
    for models in (["tiny"], ["smollm2", "tiny"]):
        gen = generator_for(argparse.Namespace(**{**vars(args), "model": models}), pool)
        used, note = head_start(None, DEFAULT_PROMPTS, gen)
        assert used == [] and "left out (models " in note, note
    # Another seed or temperature: left out; --pregenerated none: not even read.
    for change in ({"seed": 3}, {"temperature": 1.0}):
        gen = generator_for(argparse.Namespace(**{**vars(args), **change}), pool)
        assert head_start(None, DEFAULT_PROMPTS, gen)[0] == []
    assert head_start("none", DEFAULT_PROMPTS, generator_for(args, pool)) == ([], None)


def test_matching_pregenerated_pairs_are_served_first_and_others_ignored(tmp_path):
    """`preflab generate` output for part of the pool is served before any pair the
    server generates; rows made for another run (other settings, another model, a prompt
    not in the pool or with other text) are never served, and one log line says why."""
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"id": f"p{i}", "prompt": f"Say {w}."} for i, w in enumerate(["hello", "goodbye", "thanks", "yes"])],
    )
    pre = tmp_path / "pre.jsonl"
    r = preflab("generate", "--model", "tiny", "--prompts", prompts, "--limit", "2", "--out", pre,
                "--max-new-tokens", "6", "--no-progress", env=child_env(), timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    good = [json.loads(line) for line in pre.read_text().splitlines()]
    assert all(json.loads(row["gen_params"])["a"]["pregenerated"] is True for row in good)

    longer = json.loads(good[0]["gen_params"])
    longer["a"]["max_new_tokens"] = longer["b"]["max_new_tokens"] = 7
    bad = [
        {**good[0], "gen_params": json.dumps(longer), "response_a": "longer one", "pair_id": None},
        {**good[1], "model_a": "other", "model_b": "other", "response_a": "other model", "pair_id": None},
        {**good[0], "prompt_id": "p9", "response_a": "not in the pool", "pair_id": None},
        {**good[1], "prompt": "Say something else.", "response_a": "other text", "pair_id": None},
    ]
    write_jsonl(pre, [*bad, *good])
    used_ids = {row["pair_id"] for row in good}
    server = Server(tmp_path, "--model", "tiny", "--prompts", str(prompts), "--data", str(tmp_path / "store"),
                    "--max-new-tokens", "6", "--batch-size", "2", "--user", "solo",
                    "--pregenerated", str(pre))  # fmt: skip
    with server:
        c = client(server.url)
        view = c.predict(api_name="/next")
        served = []
        for _ in range(600):  # two pregenerated pairs at once, then the generator's
            if view["pair"] is not None:
                served.append(view["pair"]["pair_id"])
                view = c.predict(view["pair"]["pair_id"], "left", "", "", api_name="/vote")
            elif view["waiting"]["state"] == "done":
                break
            else:
                time.sleep(0.2)
                view = c.predict(api_name="/next")
        log = server.output()
    assert set(served[:2]) == used_ids  # the head start first
    assert len(served) == 4 and not set(served[2:]) & used_ids  # then the two prompts it left
    assert f"{pre}: 2 of 6 pregenerated pairs match this server's models and settings" in log
    for reason in (
        "1 left out (max_new_tokens 7, this server samples 6)",
        "1 left out (models other vs other, this server samples tiny)",
        "1 left out (prompt 'p9' is not in the pool)",
        "1 left out (prompt 'p1' has other text in the pool)",
    ):
        assert reason in log
    # Each vote says how its pair was made: ahead of time, or by this server.
    records = read_comparisons(tmp_path / "store").to_pylist()
    made_ahead = {r["pair_id"] for r in records if json.loads(r["gen_params"])["a"].get("pregenerated")}
    assert made_ahead == used_ids and len(records) == 4


def test_a_pregenerated_file_that_cannot_be_read_is_one_line(tmp_path):
    gen = Generator(["tiny"], [], AssignmentQueue(), cache_dir=None)
    used, note = matching_pairs(tmp_path / "missing.jsonl", gen)
    assert used == [] and note.startswith("pregenerated pairs not used: ") and "missing.jsonl" in note


def test_after_a_head_start_the_generator_keeps_working_while_someone_votes():
    """With pairs made ahead of time ready, "enough pairs ready" would idle the generator
    until they run out, and an annotator faster than the model would then wait for every
    pair: instead it goes on generating while anyone is voting."""
    import threading

    from annotate.pairs import pair_from_row

    pool = [type("P", (), {"id": f"p{i}", "messages": [{"role": "user", "content": f"Say {i}."}]})()
            for i in range(4)]  # fmt: skip
    ahead = [
        pair_from_row(
            {
                "prompt": p.messages,
                "prompt_id": p.id,
                "response_a": "x",
                "response_b": "y",
                "model_a": "tiny",
                "model_b": "tiny",
            }
        )  # fmt: skip
        for p in pool[:2]
    ]
    q = AssignmentQueue()
    gen = Generator(["tiny"], pool, q, cache_dir=None, batch_size=2, max_new_tokens=4, per_annotator=1)
    q.add(gen.adopt(ahead))
    assert q.next("ann") is not None  # someone is voting; one more pair is ready for them
    worker = threading.Thread(target=gen.run, daemon=True)
    worker.start()
    worker.join(300)
    assert gen.status()["state"] == "done", gen.status()  # the two other prompts were generated
    assert q.overview()["pairs"] == 4
