"""`preflab judge`: a model votes on pairs as judge:<name>, each pair in both orders.

The model is a real OpenAI-compatible HTTP server whose answers follow a rule
(conftest's judge_server, helpers.ScriptedJudgeServer): what is under test is the judge's
logic (the two orders, the verdict line, the store, the rerun), so its model's output must
be known. One test runs an in-process tiny model through the same path.
"""

import json

import pyarrow.parquet as pq
import pytest
from helpers import (
    Server,
    add_users,
    chat_vote_record,
    client,
    ep_entry,
    login,
    preflab,
    vote_record,
    write_jsonl,
    write_store,
)

from annotate.judge_template import check_template, parse_verdict
from annotate.queue import AssignmentQueue
from trainer.reward_data import read_pairs
from trainer.store import read_comparisons

JUDGE = "judge:scripted"


def human_votes():
    """Five pairs and people's votes on them; each prompt's first word names it for the
    server's request counter."""
    alice = [
        ("alpha: which is better?", "plain answer", "GOOD answer", "b"),
        ("beta: which is better?", "GOOD answer", "meh answer", "a"),
        ("BIASED gamma: which is better?", "one answer", "another answer", "a"),
        ("GARBLE delta: which is better?", "some answer", "other answer", "a"),
        ("epsilon: which is better?", "same-ish", "similar", "tie"),
    ]
    records = [vote_record(p, a, b, c, annotator="alice") for p, a, b, c in alice]
    records += [vote_record(p, a, b, "b", annotator="bob") for p, a, b, _ in alice[:2]]
    return records


def endpoints(tmp_path, judge_server):
    path = tmp_path / "eps.json"
    path.write_text(json.dumps({"scripted": ep_entry(judge_server.base, "judge-model", max_retries=0)}))
    return path


def judge(store, eps, *more):
    return preflab(
        "judge", "--data", store, "--model", "scripted", "--endpoints", eps, "--no-progress", *more
    )


def judge_votes(store) -> dict[str, dict]:
    votes = read_comparisons(store).to_pylist()
    return {json.loads(v["prompt"])[0]["content"].split()[0]: v for v in votes if v["annotator"] == JUDGE}


@pytest.fixture
def judged(tmp_path, judge_server):
    store = write_store(tmp_path / "store", human_votes())
    eps = endpoints(tmp_path, judge_server)
    r = judge(store, eps)
    assert r.returncode == 0, r.stderr
    return store, eps, r


def test_both_orders_agree_vote_disagree_tie_unparseable_none(judged):
    store, _, r = judged
    assert "pool      5 pairs; 0 judged by judge:scripted before" in r.stdout
    assert (
        "votes     4 stored as judge:scripted: 3 where both orders agreed, 1 ties where they disagreed"
        in r.stdout
    )
    assert "no vote   1 unparseable" in r.stdout and "0 failed requests" in r.stdout
    votes = judge_votes(store)
    assert sorted(votes) == ["BIASED", "alpha:", "beta:", "epsilon:"]  # GARBLE: no vote
    assert votes["alpha:"]["choice"] == "b" and votes["beta:"]["choice"] == "a"
    assert votes["epsilon:"]["choice"] == "tie"  # both orders said tie: agreed
    assert votes["BIASED"]["choice"] == "tie"  # "A" both times: a, then b; cancelled out
    params = {k: json.loads(v["gen_params"])["judge"] for k, v in votes.items()}
    assert params["alpha:"]["verdicts"] == ["b", "b"] and params["alpha:"]["agreed"] is True
    assert params["BIASED"]["verdicts"] == ["a", "b"] and params["BIASED"]["agreed"] is False
    assert params["alpha:"]["model"] == "scripted" and params["alpha:"]["template"] == "shipped"
    assert params["alpha:"]["sampling"]["model_name"] == "judge-model"
    # both rationales kept, each with the verdict of its order; no decision time, no strength
    assert "[a shown first: b] Answer B is the good one." in votes["alpha:"]["rationale"]
    assert "[b shown first: b] Answer A is the good one." in votes["alpha:"]["rationale"]
    assert all(v["decision_ms"] is None and v["strength"] is None for v in votes.values())
    # the pair is the people's pair: same id and answers, in the same canonical order
    alice = {v["pair_id"]: v for v in read_comparisons(store).to_pylist() if v["annotator"] == "alice"}
    for v in votes.values():
        assert (v["response_a"], v["response_b"]) == (
            alice[v["pair_id"]]["response_a"],
            alice[v["pair_id"]]["response_b"],
        )


def test_a_rerun_skips_the_pairs_already_judged(judged, judge_server):
    store, eps, _ = judged
    before = dict(judge_server.requests)
    n = read_comparisons(store).num_rows
    r = judge(store, eps)
    assert r.returncode == 1, r.stdout  # work left (the unparseable pair), and no vote came of it
    assert "pool      5 pairs; 4 judged by judge:scripted before (skipped)" in r.stdout
    asked = {k: judge_server.requests.get(k, 0) - before.get(k, 0) for k in judge_server.requests}
    assert {k: v for k, v in asked.items() if v} == {"GARBLE": 2}  # only the pair without a vote, both orders
    assert read_comparisons(store).num_rows == n


def test_a_failed_request_is_counted_and_nothing_is_stored(tmp_path, judge_server):
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "BROKEN zeta: which?", "response_a": "x", "response_b": "GOOD y"},
            {"prompt": "eta: which?", "response_a": "GOOD x", "response_b": "y"},
        ],
    )
    store = tmp_path / "store"
    r = judge(store, endpoints(tmp_path, judge_server), "--pairs", pairs)
    assert r.returncode == 0, r.stderr
    assert "0 unparseable" in r.stdout and "1 failed requests" in r.stdout
    assert "HTTP 500" in r.stderr
    assert [v["choice"] for v in judge_votes(store).values()] == ["a"]


def test_the_template_is_read_as_text_and_unknown_fields_are_refused(tmp_path, judge_server):
    store = write_store(tmp_path / "store", human_votes())
    eps = endpoints(tmp_path, judge_server)
    for text, why in (
        ("{prompt}\n[Answer A]\n{answer_a}\n[Answer B]\n{answer_c}", "unknown field {answer_c}"),
        ("[Answer A]\n{answer_a.__class__}\n[Answer B]\n{answer_b}", "unknown field {answer_a.__class__}"),
        ("[Answer A]\n{answer_a!r}\n[Answer B]\n{answer_b}", "no conversion or format spec"),
        ("[Answer A]\n{answer_a}", "never shows {answer_b}"),
        ("[Answer A] {answer_a} [Answer B] {answer_b} {", "literal braces"),
    ):
        path = tmp_path / "t.txt"
        path.write_text(text)
        r = judge(store, eps, "--template", path)
        assert r.returncode == 2 and f"{path}: " in r.stderr and why in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not judge_votes(store)
    own = tmp_path / "mine.txt"
    own.write_text(
        "{{Judge}} this.\n[The conversation]\n{prompt}\n[Answer A]\n{answer_a}\n[Answer B]\n{answer_b}\n"
    )
    r = judge(store, eps, "--template", own, "--limit", "1")
    assert r.returncode == 0, r.stderr
    (vote,) = judge_votes(store).values()
    assert vote["choice"] == "b" and json.loads(vote["gen_params"])["judge"]["template"] == "mine.txt"


def test_the_verdict_is_the_strict_last_line():
    assert parse_verdict("Because.\nVerdict: A") == ("a", "Because.")
    assert parse_verdict("Because.\n\n  verdict: TIE  \n") == ("tie", "Because.")
    assert parse_verdict("**Verdict:** B.") == ("b", "")
    for output in ("Verdict: A\nThanks!", "The verdict: A", "Verdict: A or B", "Verdict: C", "", "A"):
        assert parse_verdict(output)[0] is None, output
    filled = check_template("x {prompt} [Answer A] {answer_a} [Answer B] {answer_b} {{y}}", "t").fill(
        [{"role": "user", "content": "Hi {answer_a}"}], "one {prompt}", "two"
    )
    assert filled == "x Hi {answer_a} [Answer A] one {prompt} [Answer B] two {y}"  # values are not re-read


def test_an_in_process_model_judges_through_the_same_path(tmp_path):
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": "Hi?", "response_a": "Hello", "response_b": "Hey"}]
    )
    r = preflab(
        "judge", "--data", tmp_path / "store", "--pairs", pairs, "--model", "tiny",
        "--max-new-tokens", "4", "--device", "cpu", "--no-progress",
    )  # fmt: skip
    # a random tiny model writes no verdict line: counted, no vote, exit 1
    assert r.returncode == 1, r.stderr
    assert "pool      1 pairs; 0 judged by judge:tiny before" in r.stdout
    assert "no vote   1 unparseable" in r.stdout


def test_export_and_training_leave_judges_out_unless_asked(judged, tmp_path):
    store, _, _ = judged
    # people: 7 votes, 1 tie -> 6 preferences; the judge: 4 votes, 2 ties -> 2
    for mode, rows in (("exclude", 6), ("include", 8), ("only", 2)):
        out = tmp_path / f"{mode}.parquet"
        r = preflab("export", "--data", store, "--out", out, "--judges", mode)
        assert r.returncode == 0, r.stderr
        assert pq.read_table(out).num_rows == rows
        assert len(read_pairs(store, judges=mode)) == rows  # what train-reward and train-dpo read
    r = preflab("export", "--data", store, "--out", tmp_path / "x.parquet")
    assert "judges    4 judge votes left out (--judges include keeps them)" in r.stdout
    r = preflab(
        "train-reward", "--data", store, "--model", "tiny", "--judges", "only", "--max-steps", "1",
        "--val-fraction", "0", "--runs-dir", tmp_path / "runs", "--no-progress", "--device", "cpu",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "data: 2 pairs" in r.stderr and "judges: only the 4 judge votes kept (--judges only)" in r.stderr
    (config,) = (tmp_path / "runs").glob("*/config.json")
    assert json.loads(config.read_text())["data"]["judges"]["mode"] == "only"
    r = preflab("train-dpo", "--data", store, "--judges", "sometimes")
    assert r.returncode == 2 and "--judges" in r.stderr


def test_judge_votes_fill_no_overlap_k(judged):
    store, _, _ = judged
    from annotate.pairs import pair_from_row

    votes = read_comparisons(store)
    judged_only = [v for v in votes.to_pylist() if v["annotator"] == JUDGE][:1]
    pair = pair_from_row({**{k: judged_only[0][k] for k in ("pair_id", "response_a", "response_b")},
                          "prompt": json.loads(judged_only[0]["prompt"])})  # fmt: skip
    queue = AssignmentQueue(overlap=1)
    queue.add([pair])
    queue.restore([v for v in votes.to_pylist() if v["annotator"] == JUDGE])
    a = queue.next("carol")  # the judge's vote did not complete the pair
    assert a is not None and a.pair.pair_id == pair.pair_id
    assert queue.begin_undo(JUDGE) is None  # nobody's work here: nothing to undo as the judge


def test_the_database_counts_no_judge_vote_towards_k(pg_url):
    from trainer.store import open_store

    with open_store(pg_url) as store:
        store.append(vote_record("q?", annotator=JUDGE))
        pair_id = vote_record("q?")["pair_id"]
        ok, voters = store.claim(pair_id, "carol", want=1, lease_s=60)
        assert ok and JUDGE not in voters


def test_the_dashboard_api_shows_judge_human_agreement(judged, tmp_path):
    store, _, _ = judged
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi?", "response_a": "A", "response_b": "B"}])
    with Server(tmp_path, "--pairs", str(pairs), "--data", str(store)) as server:
        board = client(server.url).predict(api_name="/dashboard")
    rows = {(r["judge"], r["annotator"]): r for r in board["tables"]["judges"]}
    assert set(rows) == {(JUDGE, "alice"), (JUDGE, "bob"), (JUDGE, "(all people)")}
    # alice vs the judge on 4 shared pairs (GARBLE has no judge vote): b=b, a=a, a/tie, tie=tie
    alice = rows[JUDGE, "alice"]
    assert alice["n_shared"] == 4 and alice["agreement"] == pytest.approx(0.75)
    assert alice["agreement_low"] < 0.75 < alice["agreement_high"]
    # kappa from the 4x4 table: p_o = 3/4; alice b,a,a,tie / judge b,a,tie,tie -> p_e = (1+2*1+1*2)/16
    assert alice["kappa"] == pytest.approx((0.75 - 5 / 16) / (1 - 5 / 16))
    bob = rows[JUDGE, "bob"]  # b, b against the judge's b, a
    assert bob["n_shared"] == 2 and bob["agreement"] == pytest.approx(0.5)
    everyone = rows[JUDGE, "(all people)"]
    assert everyone["n_shared"] == 6 and everyone["agreement"] == pytest.approx(4 / 6)
    # people's own numbers leave the judge out, and their table has the same interval columns
    assert board["summary"]["votes"] == 7 and board["summary"]["judge_votes"] == 4
    (people,) = board["tables"]["kappa"]
    assert {people["annotator_1"], people["annotator_2"]} == {"alice", "bob"}
    assert people["agreement_low"] <= people["agreement"] <= people["agreement_high"]


def test_the_leaderboard_rates_models_by_people_only(judged):
    store, _, _ = judged
    r = preflab("leaderboard", "--data", store, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["votes"] == 7  # alice's 5 and bob's 2, not the judge's 4


def test_the_dashboard_tab_shows_the_judges_table(judged, tmp_path, browser):
    store, _, _ = judged
    add_users(tmp_path / "users.toml", boss="admin")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi?", "response_a": "A", "response_b": "B"}])
    args = ("--pairs", str(pairs), "--data", str(store), "--auth", str(tmp_path / "users.toml"))
    with Server(tmp_path, *args) as server:
        page = login(browser, server.url, "boss")
        page.get_by_role("tab", name="Dashboard").click()
        page.wait_for_function(
            "() => (document.querySelector('#judge-agreement') || {}).innerText?.includes('(all people)')",
            timeout=30_000,
        )
        text = page.inner_text("#judge-agreement")
        assert "judge:scripted" in text and "alice" in text and "75% (" in text
        page.context.close()


def test_the_review_tab_lists_and_sends_back_the_judges_disagreements(judged, tmp_path, browser):
    store, _, _ = judged
    add_users(tmp_path / "users.toml", boss="admin")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi?", "response_a": "A", "response_b": "B"}])
    args = (
        "--pairs",
        str(pairs),
        "--data",
        str(store),
        "--auth",
        str(tmp_path / "users.toml"),
        "--suggest",
        JUDGE,
    )
    with Server(tmp_path, *args) as server:
        page = login(browser, server.url, "boss")
        page.get_by_role("tab", name="Review").click()
        page.locator("#judge-refresh").click()
        page.wait_for_selector("#judge-disagreements-table", timeout=30_000)
        # alice: a (left) on BIASED, the judge a tie; bob: b (right) on beta, the judge a (left)
        rows = page.evaluate(
            "() => [...document.querySelectorAll('#judge-disagreements-table tr.disagree')]"
            ".map(tr => tr.children[1].innerText + ' ' + tr.children[2].innerText + ' / ' + tr.children[3].innerText)"
        )
        assert sorted(rows) == ["alice left better / tie", "bob right better / left better"]
        page.locator("#judge-send").click()
        page.wait_for_function(
            "() => (document.querySelector('#judge-report') || {}).innerText?.includes('Queued 2 pairs')",
            timeout=30_000,
        )
        page.context.close()


def test_the_store_pool_leaves_chat_turns_out(tmp_path):
    # A chat turn's answers follow each side's own history, which a judged Pair cannot
    # carry: a verdict on them after the opening alone would judge what nobody judged.
    from annotate.judge import store_pool

    store = write_store(
        tmp_path / "store",
        [
            vote_record("Plain?", "yes", "no", "a", annotator="alice"),
            chat_vote_record([("Hi.", "One.", "Two."), ("More?", "Three.", "Four.")], "a", annotator="alice"),
        ],
    )
    pool = store_pool(str(store))
    assert len(pool) == 1 and {pool[0].response_a, pool[0].response_b} == {"yes", "no"}
