"""The style-controlled leaderboard: on simulated battles with a planted preference for
longer answers, the style-controlled ratings recover the true strengths and the plain
ones do not; its numbers against an independent scipy fit of the same penalised
likelihood; the features on hand-written markdown; the CLI and the tab's view.
"""

import json
import math

import numpy as np
import pyarrow as pa
import pytest
from helpers import preflab, vote_record, write_store
from scipy.optimize import minimize
from scipy.stats import spearmanr

from annotate.bradley_terry import RIDGE
from annotate.ratings import CENTER, SCALE, LeaderboardError
from annotate.style_control import STYLE_COLUMNS, style_leaderboard
from annotate.style_fit import fit_style_bt, style_data
from annotate.web.leaderboard_tab import page
from trainer.style_features import FEATURES, style_counts, style_differences, token_counts

# True strengths, best first. The weaker a model, the longer it writes (the confound).
THETA = np.array([0.9, 0.5, 0.1, -0.3, -0.6, -1.0])
LENGTH = np.array([30, 50, 90, 150, 250, 400])  # median answer length, in words
GAMMA = 4.0  # planted: log-odds per unit of (len_a - len_b) / (len_a + len_b + 1)


def name(k: int) -> str:
    return f"model-{k}"


def simulate(battles: int, seed: int, self_share: float = 0.2):
    """Votes where annotators prefer the longer answer: P(a's score) =
    sigmoid(theta_a - theta_b + GAMMA * d_length), d_length the length feature of the two
    answers. Bold spans (0-3 per answer) are there and sway nobody. A share of votes
    compares two answers of one model (they inform the style coefficient only).

    Ties keep a's expected score exactly p (as tests/test_leaderboard.py's simulate):
    tie with probability q, else a wins with probability (p - q/2) / (1 - q).

    Returns (votes table, the lengths in tokens (n, 2), bold counts (n, 2), the model
    indices (n, 2), the scores of a)."""
    rng = np.random.default_rng(seed)
    K = len(THETA)
    a = rng.integers(0, K, battles)
    b = np.where(rng.random(battles) < self_share, a, (a + rng.integers(1, K, battles)) % K)
    words = np.stack([LENGTH[a], LENGTH[b]], axis=1) * rng.lognormal(0.0, 0.35, (battles, 2))
    words = np.maximum(words.round().astype(int), 1)
    bold = rng.integers(0, 4, (battles, 2))
    # "**b**" is 5 tokens (two asterisks twice, the letter): the answer's length in tokens
    tokens = words + 5 * bold
    d = style_differences(tokens[:, 0], tokens[:, 1])
    p = 1 / (1 + np.exp(-(THETA[a] - THETA[b] + GAMMA * d)))
    q = 0.3 * 2 * np.minimum(p, 1 - p)
    tie = rng.random(battles) < q
    a_wins = rng.random(battles) < (p - q / 2) / (1 - q)
    choice = np.where(tie, "tie", np.where(a_wins, "a", "b"))
    score = np.where(tie, 0.5, a_wins.astype(float))

    def text(n_words, n_bold):
        return " ".join(["w"] * n_words + ["**b**"] * n_bold)

    votes = pa.table(
        {
            "model_a": [name(k) for k in a],
            "model_b": [name(k) for k in b],
            "choice": choice,
            "response_a": [text(w, nb) for w, nb in zip(words[:, 0], bold[:, 0])],
            "response_b": [text(w, nb) for w, nb in zip(words[:, 1], bold[:, 1])],
        }
    )
    return votes, tokens, bold, np.stack([a, b], axis=1), score


def true_ratings() -> np.ndarray:
    return CENTER + SCALE * (THETA - THETA.mean())


def ratings_by_index(board) -> np.ndarray:
    return np.array([board.rating[board.models.index(name(k))] for k in range(len(THETA))])


@pytest.fixture(scope="module")
def planted():
    votes, tokens, bold, models, score = simulate(30_000, seed=3)
    return votes, tokens, bold, models, score, style_leaderboard(votes, rounds=60, seed=1)


def test_style_control_recovers_the_true_strengths_and_the_plain_fit_does_not(planted):
    votes, tokens, _, _, _, sc = planted
    truth = true_ratings()
    styled, plain = ratings_by_index(sc.board), ratings_by_index(sc.plain)
    # ~24,000 battles between models, ~8,000 per model: a rating's standard error is about
    # 173.7 / sqrt(8000 * 0.2) ~ 4.3 points; 25 points is ~6 of them, while the length
    # confound moves the plain ratings by hundreds.
    assert np.abs(styled - truth).max() < 25
    assert spearmanr(styled, truth).statistic == 1.0
    assert np.abs(plain - truth).max() > 150
    assert spearmanr(plain, truth).statistic < 0  # the long-winded weak models come out on top
    # The intervals of the style-controlled board cover the truth (each is ~4 se wide).
    low = np.array([sc.board.low[sc.board.models.index(name(k))] for k in range(len(THETA))])
    high = np.array([sc.board.high[sc.board.models.index(name(k))] for k in range(len(THETA))])
    assert ((low - 10 <= truth) & (truth <= high + 10)).all()

    # The planted coefficient, in the fit's units: GAMMA per unit of d, d over its RMS.
    d = style_differences(tokens[:, 0], tokens[:, 1])
    spread = math.sqrt(np.mean(d * d))
    assert sc.features == ["length", "bold"] and sc.left_out == ["headers", "lists"]
    length, bold = sc.coefficients()
    assert length["feature"] == "length" and length["spread"] == pytest.approx(spread, abs=1e-4)
    # se of the coefficient ~ 1 / sqrt(n * 0.2) ~ 0.013; 0.06 is over 4 of them
    assert length["coefficient"] == pytest.approx(GAMMA * spread, abs=0.06)
    assert length["ci"][0] < GAMMA * spread < length["ci"][1]
    assert abs(bold["coefficient"]) < 0.06 and bold["ci"][0] < 0 < bold["ci"][1]  # sways nobody
    assert length["points"] == pytest.approx(SCALE * length["coefficient"], abs=0.1)
    n_self = int(
        (
            votes["model_a"].to_numpy(zero_copy_only=False) == votes["model_b"].to_numpy(zero_copy_only=False)
        ).sum()
    )
    assert sc.style_only == n_self > 0


def scipy_fit(models: np.ndarray, score: np.ndarray, z: np.ndarray, K: int, ridge: float) -> np.ndarray:
    """The same penalised likelihood written out directly (np.add.at, no sorting or
    per-pair sums), maximised by scipy's L-BFGS-B."""
    a, b = models[:, 0], models[:, 1]

    def loss(x):
        theta, beta = x[:K], x[K:]
        eta = theta[a] - theta[b] + z @ beta
        ll = score * -np.logaddexp(0, -eta) + (1 - score) * -np.logaddexp(0, eta)
        p = 1 / (1 + np.exp(-eta))
        g = np.zeros_like(x)
        np.add.at(g, a, score - p)
        np.add.at(g, b, -(score - p))
        g[K:] = z.T @ (score - p)
        return -ll.sum() + 0.5 * ridge * x @ x, -g + ridge * x

    result = minimize(
        loss,
        np.zeros(K + z.shape[1]),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-9, "ftol": 1e-15, "maxiter": 5000},
    )
    assert result.success, result.message
    return result.x


def test_the_fit_equals_an_independent_scipy_fit(planted):
    votes, tokens, bold, models, score, sc = planted
    # The test's own features: the lengths and bold counts it wrote, standardised by RMS.
    d = np.stack(
        [style_differences(tokens[:, 0], tokens[:, 1]), style_differences(bold[:, 0], bold[:, 1])], 1
    )
    z = d / np.sqrt(np.mean(d * d, axis=0))
    x = scipy_fit(models, score, z, len(THETA), RIDGE)
    order = [int(m.split("-")[1]) for m in sc.board.models]
    theirs = CENTER + SCALE * (x[: len(THETA)] - x[: len(THETA)].mean())
    assert np.abs(sc.board.rating - theirs[order]).max() < 1e-3  # rating points
    assert np.abs(sc.coef - x[len(THETA) :]).max() < 1e-5  # log-odds
    # and a weighted fit (a bootstrap round is one) against scipy on the votes repeated
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 3, len(score))
    rows = np.repeat(np.arange(len(score)), counts)
    data = style_data(models[:, 0], models[:, 1], score, z, len(THETA))
    ours = fit_style_bt(data, counts.astype(float), start=np.concatenate([x[: len(THETA)], x[len(THETA) :]]))
    x_w = scipy_fit(models[rows], score[rows], z[rows], len(THETA), RIDGE)
    assert np.abs(ours - x_w).max() < 1e-5


def test_relabelling_a_and_b_in_every_vote_changes_nothing(planted):
    """Why the features are scaled by their root mean square and not centred: the record's
    a/b order is arbitrary, and the ratings must not depend on it."""
    votes, *_, sc = planted
    swapped = pa.table(
        {
            "model_a": votes["model_b"],
            "model_b": votes["model_a"],
            "choice": pa.array(
                [{"a": "b", "b": "a"}.get(c, c) for c in votes["choice"].to_pylist()], pa.string()
            ),
            "response_a": votes["response_b"],
            "response_b": votes["response_a"],
        }
    )
    other = style_leaderboard(swapped, rounds=0)
    assert other.board.models == sc.board.models
    assert np.abs(other.board.rating - sc.board.rating).max() < 1e-6
    assert np.abs(other.coef - sc.coef).max() < 1e-8


def test_features_of_hand_written_markdown():
    md = (
        "# Title\n\nSome **bold** and __also bold__ text.\n\n## Steps\n1. first\n2. second\n"
        "   - nested\n* star\n+ plus\n\n```python\n# a comment, not a header\n- not a list\n"
        "**not bold**\n```\n-no space, not a list\n#no space, not a header\n**across\nlines** is not bold\n"
        "###### six\n####### seven is not a header\n"
    )
    counts = style_counts([md, "", "plain words only.", None])
    assert list(FEATURES) == ["length", "headers", "lists", "bold"]
    assert counts[0, 1:].tolist() == [3, 5, 2]  # headers, list items, bold spans
    assert counts[1:].tolist() == [[0, 0, 0, 0], [4, 0, 0, 0], [0, 0, 0, 0]]
    # tokens: words, each punctuation mark, each CJK character; accents inside words
    assert token_counts(["Hello, world!", "naïve café", "東京です", "x_y 3.14", "don't — stop"]).tolist() == [
        4,
        2,
        4,
        4,
        5,
    ]
    # (a - b) / (a + b + 1): scale-free and 0 for two answers alike
    assert style_differences([[300, 0]], [[100, 0]])[0].tolist() == pytest.approx([200 / 401, 0.0])


def test_no_variation_and_no_models_are_clear():
    rows = [vote_record("q", "same", "same", c, model_a="m1", model_b="m2") for c in "ab" * 5]
    votes = pa.Table.from_pylist(rows).select(STYLE_COLUMNS)
    sc = style_leaderboard(votes, rounds=10)
    assert sc.features == [] and sc.left_out == list(FEATURES) and sc.coefficients() == []
    assert sc.board.rating == pytest.approx(sc.plain.rating, abs=1e-6)  # nothing to control for
    with pytest.raises(LeaderboardError, match="no votes"):
        style_leaderboard(votes.slice(0, 0), rounds=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    votes, *_ = simulate(2_000, seed=5)
    path = tmp_path_factory.mktemp("style") / "store"
    write_store(
        path,
        (
            vote_record(
                f"Q{i % 9}",
                r["response_a"],
                r["response_b"],
                r["choice"],
                model_a=r["model_a"],
                model_b=r["model_b"],
            )
            for i, r in enumerate(votes.to_pylist())
        ),
    )
    return path


def test_cli_style_control_table_and_json(store):
    env = {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PATH": "/usr/bin:/bin"}
    r = preflab("leaderboard", "--data", store, "--style-control", "--rounds", "30", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(
        line.startswith("style-controlled: ratings with the answers' length, bold held equal")
        for line in lines
    )
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    assert lines[header].split() == ["rank", "model", "rating", "95%", "CI", "plain", "shift"]
    table = [line.split() for line in lines[header + 1 : header + 1 + len(THETA)]]
    assert [row[1] for row in table] == [name(k) for k in range(len(THETA))]  # the true order
    coef = next(i for i, line in enumerate(lines) if line.startswith("feature"))
    length = lines[coef + 1].split()
    assert length[0] == "length" and float(length[1]) > 0.3  # the planted preference, clearly
    assert "left out of the fit, no pair differs in them: headers, lists" in r.stdout

    r = preflab(
        "leaderboard", "--data", store, "--style-control", "--rounds", "30", "--json", env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    styled = out["style_control"]
    assert [row["model"] for row in styled["models"]] == [name(k) for k in range(len(THETA))]
    assert [c["feature"] for c in styled["coefficients"]] == ["length", "bold"]
    lo, hi = styled["coefficients"][0]["ci"]
    assert 0 < lo < styled["coefficients"][0]["coefficient"] < hi
    by_model = {row["model"]: row for row in out["models"]}
    for row in styled["models"]:  # the plain board is still the top level, beside it
        assert row["plain_rating"] == by_model[row["model"]]["rating"]
    assert out["models"][0]["model"] != name(0)  # plain: the length confound wins


def test_the_tab_view_shows_style_control_on_request(store, tmp_path):
    plain = page(store, tmp_path / "runs", rounds=10)
    assert plain["style"] == "" and plain["board"] is not None
    view = page(store, tmp_path / "runs", rounds=10, style_control=True)
    assert view["ok"] and "style-controlled" in view["message"]
    assert 'id="lb-style-coefs"' in view["style"] and "length" in view["style"]
    assert view["table"].index(name(0)) < view["table"].index(name(5))  # the controlled order
    assert "plain" in view["table"]


def test_reward_model_markdown_bias_next_to_the_length_bias():
    from trainer.models import load_tokenizer
    from trainer.reward_batches import encode_pairs
    from trainer.reward_data import Pairs
    from trainer.reward_metrics import markdown_bias
    from trainer.reward_model import choose_pad_token

    tok = load_tokenizer("tiny")
    choose_pad_token(tok)
    pairs = Pairs()
    pairs.add([{"role": "user", "content": "hi"}], "# Plan\n- one\n- two\n**done**", "plain")
    pairs.add([{"role": "user", "content": "hi"}], "ok", "## A\n## B\n1. x")
    enc = encode_pairs(pairs, tok, max_length=64)
    assert enc.chosen_markdown.tolist() == [[1, 2, 1], [0, 0, 0]]
    assert enc.rejected_markdown.tolist() == [[0, 0, 0], [2, 1, 0]]

    # rewards that follow the headers exactly, and ignore everything else
    counts = np.concatenate([enc.chosen_markdown, enc.rejected_markdown])  # as evaluate() stacks them
    rewards = 0.7 * counts[:, 0] - 0.1
    bias = markdown_bias(rewards, counts)
    assert bias["headers_corr"] == pytest.approx(1.0)
    assert bias["lists_corr"] == pytest.approx(np.corrcoef(rewards, counts[:, 1])[0, 1])
    assert set(bias) == {"headers_corr", "lists_corr", "bold_corr"}
    assert markdown_bias(rewards, np.zeros_like(counts)) == {
        "headers_corr": 0.0,
        "lists_corr": 0.0,
        "bold_corr": 0.0,
    }


def test_self_pair_only_models_and_dropped_both_bad_votes_are_the_plain_boards():
    """A model seen only against itself has no rating on either board, but its votes still
    tell the fit about style; with --both-bad drop both boards leave the same votes out."""
    votes, *_ = simulate(4_000, seed=9)
    rows = votes.to_pylist()
    extra = [
        {
            "model_a": "loner",
            "model_b": "loner",
            "choice": c,
            "response_a": "w " * la,
            "response_b": "w " * lb,
        }
        for c, la, lb in [("a", 90, 10), ("b", 5, 70), ("both_bad", 20, 20)] * 20
    ]
    rows += extra + [{**rows[0], "choice": "both_bad"}] * 7
    table = pa.Table.from_pylist(rows)
    for both_bad in ("tie", "drop"):
        sc = style_leaderboard(table, rounds=20, both_bad=both_bad)
        assert "loner" not in sc.board.models and sc.board.unrated == sc.plain.unrated == ["loner"]
        assert sc.board.models == sorted(sc.plain.models, key=sc.board.models.index)
        assert sc.board.used == sc.plain.used and sc.board.both_bad_dropped == sc.plain.both_bad_dropped
        n_self = sum(r["model_a"] == r["model_b"] for r in rows)
        dropped_self = 20 if both_bad == "drop" else 0  # the loner's both-bad votes
        assert sc.style_only == n_self - dropped_self
    assert sc.plain.both_bad_dropped == 7  # a self-pair counts as a self-pair, whatever its choice


def test_style_penalty_is_the_squared_correlation_and_its_gradient_removes_it():
    import torch

    from trainer.reward_metrics import style_penalty

    rng = np.random.default_rng(0)
    s = rng.normal(size=(64, 4)).astype(np.float32)
    s[:, 3] = 0.0  # a feature no pair differs in adds nothing
    gap = 2.0 * s[:, 0] - 0.5 * s[:, 1] + rng.normal(size=64)
    r_r = torch.zeros(64, requires_grad=True)
    r_c = torch.tensor(gap, dtype=torch.float32, requires_grad=True)
    value = style_penalty(r_c, r_r, torch.from_numpy(s))
    expected = sum(np.corrcoef(gap, s[:, f])[0, 1] ** 2 for f in range(3))
    assert float(value.detach()) == pytest.approx(expected, rel=1e-4) and expected > 0.5
    assert float(style_penalty(r_c[:2], r_r[:2], torch.from_numpy(s[:2])).detach()) == 0.0  # too few pairs
    # Descending the penalty alone takes the style out of the gap and keeps the rest of it.
    optimizer = torch.optim.SGD([r_c], lr=5.0)
    for _ in range(200):
        optimizer.zero_grad()
        style_penalty(r_c, r_r, torch.from_numpy(s)).backward()
        optimizer.step()
    assert float(style_penalty(r_c, r_r, torch.from_numpy(s)).detach()) < 1e-3
    noise = gap - 2.0 * s[:, 0] + 0.5 * s[:, 1]
    assert np.corrcoef(r_c.detach().numpy(), noise)[0, 1] > 0.5


def test_train_reward_style_penalty_takes_length_out_of_the_reward_gap(tmp_path):
    """The hidden rule (a banana in the chosen answer) with a confound: the chosen answer
    is also the longer one in ~90% of pairs. Unpenalised, the reward gap follows the
    length difference; with --style-penalty 1 it mostly does not, and the rule is still
    learned. (Measured: gap-length correlation 0.48 -> 0.14 on the validation pairs.)"""
    import random

    from helpers import TINY, WORDS, write_jsonl

    from trainer.reward import train

    rng = random.Random(0)
    rows = []
    for i in range(320):
        n_c, n_r = rng.randint(3, 40), rng.randint(3, 40)
        if rng.random() < 0.8 and n_c < n_r:
            n_c, n_r = n_r, n_c
        chosen = [rng.choice(WORDS) for _ in range(n_c)]
        chosen.insert(rng.randrange(len(chosen) + 1), "banana")
        rejected = [rng.choice(WORDS) for _ in range(n_r)]
        rows.append(
            {
                "prompt": f"Question {i % 40}: what should I do?",
                "chosen": " ".join(chosen),
                "rejected": " ".join(rejected),
            }
        )
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    final = {}
    for penalty in (0.0, 1.0):
        run = tmp_path / f"rm-{penalty}"
        settings = dict(epochs=2, lr=3e-3, batch_size=16, val_fraction=0.25, style_penalty=penalty)
        assert train({**TINY, "data": str(data), "run_dir": str(run), **settings}) == 0
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        final[penalty] = [r for r in records if r["kind"] == "eval"][-1]
        assert json.loads((run / "config.json").read_text())["config"]["style_penalty"] == penalty
    plain, penalised = final[0.0], final[1.0]
    assert plain["length_gap_corr"] > 0.3
    assert penalised["length_gap_corr"] < 0.5 * plain["length_gap_corr"]
    assert penalised["val_acc"] >= 0.9 and plain["val_acc"] >= 0.9
    assert {"headers_gap_corr", "lists_gap_corr", "bold_gap_corr", "headers_corr"} <= set(penalised)
