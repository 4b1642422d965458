"""The Train tab in a real Chromium: an admin launches a tiny reward run from the page,
sees its progress reach 100% and its loss drawn, the run directory is on disk with state
done, and a reloaded page shows the same run; bad form input starts nothing; an
annotator gets no Train tab; a finished policy joins a running arena with one click;
the plots draw a run of one point, show only the selected run's curves (at once, on a
switch) and its last values as numbers; the presets fill the policy form.
"""

import json
import time
from pathlib import Path

import pytest
from helpers import CHROMIUM, Server, add_users, banana_store, login, write_pairs

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs {CHROMIUM}")

PROGRESS_IS = "t => (document.querySelector('#run-progress .run-pct') || {}).innerText === t"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-browser")
    add_users(tmp / "users.toml", ann="annotator", boss="admin")
    store = banana_store(tmp / "store")
    pairs = write_pairs(tmp / "pairs.jsonl", 2)
    with Server(
        tmp,
        "--pairs",
        str(pairs),
        "--data",
        str(store),
        "--runs",
        str(tmp / "runs"),
        "--auth",
        str(tmp / "users.toml"),
    ) as server:
        yield server, tmp / "runs"


def open_train_tab(page) -> None:
    page.get_by_role("tab", name="Train").click()
    page.locator("#start-reward").wait_for(state="visible", timeout=15_000)


def test_launch_a_tiny_reward_run_and_watch_it_finish(app, browser):
    server, runs = app
    page = login(browser, server.url, "boss")
    open_train_tab(page)
    page.locator("#reward-model input, #reward-model textarea").first.fill("tiny")
    page.locator("#reward-epochs input").fill("2")
    page.get_by_text("More settings").first.click()
    page.locator("#reward-max-length input").fill("96")
    page.locator("#reward-max-length input").press(
        "Tab"
    )  # leave the field, as a person does: the value is taken
    page.locator("#start-reward").click()
    page.wait_for_function(
        "() => (document.querySelector('#train-message') || {}).innerText?.startsWith('Started reward run')",
        timeout=15_000,
    )
    run_id = page.get_attribute("#run-progress", "data-run")
    assert run_id and run_id.startswith("reward-")

    # The timer polls the run directory until the trainer says done.
    page.wait_for_function(PROGRESS_IS, arg="100%", timeout=180_000)
    page.wait_for_selector("#run-progress[data-state=done]", timeout=15_000)
    assert "validation accuracy" in page.inner_text("#run-progress")

    # The loss is drawn: a line through the points of every step, its last value beside it.
    line = page.locator(f'#run-plot-a .metric-plot[data-run="{run_id}"] .series[data-series=train] path')
    line.wait_for(timeout=15_000)
    assert "L" in (line.get_attribute("d") or "")  # more than one point
    assert "Loss" in page.inner_text("#run-plot-a")
    assert "done:" in page.locator("#run-log textarea").input_value()

    # On disk: the run directory, done, with its checkpoint and metrics.
    status = json.loads((runs / run_id / "status.json").read_text())
    assert status["state"] == "done" and status["progress"] == 1.0
    assert (runs / run_id / "checkpoint" / "config.json").is_file()
    config = json.loads((runs / run_id / "config.json").read_text())["config"]
    assert (config["model"], config["epochs"], config["max_length"]) == ("tiny", 2, 96)
    train_steps = [json.loads(line) for line in (runs / run_id / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in train_steps) == status["total_steps"] >= 2
    last_loss = [r["loss"] for r in train_steps if r["kind"] == "train"][-1]
    assert float(latest(page, "a", "train")) == pytest.approx(last_loss, rel=1e-3)

    # The reward model is offered to the policy form.
    assert page.locator("#policy-reward input").input_value() == run_id

    # A reloaded page shows the same run, read back from its directory.
    page.reload()
    page.wait_for_selector("#progress", timeout=30_000)
    open_train_tab(page)
    page.wait_for_function(PROGRESS_IS, arg="100%", timeout=15_000)
    assert page.get_attribute("#run-progress", "data-run") == run_id
    table = page.inner_text("#runs-table")
    assert run_id in table and "done" in table and "100%" in table
    page.locator("#run-plot-a .series-line").first.wait_for(timeout=15_000)
    page.context.close()


def latest(page, plot: str, series: str) -> str:
    """The last value the plot shows beside itself for `series`, as text."""
    return page.inner_text(f'#run-plot-{plot} .latest[data-series="{series}"] .latest-value')


def policy_run(runs: Path, run_id: str, rewards: list[float], created: float) -> None:
    """A finished policy run as the trainer leaves it, as far as the tab reads it: one
    train record a step (reward, objective, KL), made `created` seconds after the epoch
    (long before any run a test starts, so it is never the newest)."""
    path = runs / run_id
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps(
            {"kind": "policy", "created_at": created, "config": {"model": "tiny", "kl_estimator": "k1"}}
        )
    )
    (path / "status.json").write_text(
        json.dumps({"state": "done", "progress": 1.0, "message": "done", "step": len(rewards)})
    )
    records = [
        {
            "kind": "train",
            "step": i + 1,
            "reward_mean": r,
            "objective": r - 0.5,
            "kl": 0.001 * (i + 1),
            "kl_k1": -0.002,
            "score_mean": r - 0.5,
            "kl_coef": 0.05,
            "kl_penalty": 0.0,
            "eos_rate": 0.5,
        }
        for i, r in enumerate(rewards)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def show_run(page, run_id: str) -> None:
    """Click the run's row in the runs table, as a person does."""
    page.locator("#runs-table").get_by_text(run_id, exact=True).locator("visible=true").first.click()
    page.wait_for_selector(f'#run-progress[data-run="{run_id}"]', timeout=15_000)


def test_plots_draw_one_point_reset_on_a_switch_and_show_the_last_values(app, browser):
    server, runs = app
    policy_run(runs, "policy-one-step", [0.25], created=1000.0)
    policy_run(runs, "policy-three-steps", [0.1, 0.3, 0.7], created=1001.0)
    page = login(browser, server.url, "boss")
    open_train_tab(page)
    page.locator("#runs-refresh").click()

    # One point a series: a marker for each, not empty axes; the values beside the plot.
    show_run(page, "policy-one-step")
    plot_a = '#run-plot-a .metric-plot[data-run="policy-one-step"]'
    page.wait_for_selector(plot_a, timeout=15_000)
    for series in ("reward (mean)", "objective"):
        assert page.locator(f'{plot_a} .series[data-series="{series}"] circle.point').count() == 1
    assert latest(page, "a", "reward (mean)") == "0.25" and latest(page, "a", "objective") == "-0.25"
    assert latest(page, "b", "KL per answer") == "0.001"
    assert page.locator("#run-plot-b circle.point").count() == 1
    # The objective is explained under its plot, with this run's numbers.
    caption = page.inner_text("#run-plot-a .plot-caption")
    assert "missing-EOS penalty" in caption and "50% of answers cut off" in caption
    assert "k3" in page.inner_text("#run-plot-b .plot-caption")

    # Another run: its curves replace the first run's in the same update, nothing of the
    # first is left in either plot.
    show_run(page, "policy-three-steps")
    assert page.locator('#run-plot-a .metric-plot[data-run="policy-three-steps"]').count() == 1
    assert page.locator('.metric-plot[data-run="policy-one-step"]').count() == 0
    line = page.locator('#run-plot-a .series[data-series="reward (mean)"]')
    assert line.get_attribute("data-points") == "3" and line.locator("path.series-line").count() == 1
    assert latest(page, "a", "reward (mean)") == "0.7" and latest(page, "b", "KL per answer") == "0.003"

    # A run with no steps yet: empty plots at once, not the last run's curves.
    (runs / "policy-queued").mkdir()
    (runs / "policy-queued" / "status.json").write_text(json.dumps({"state": "cancelled", "progress": 0}))
    (runs / "policy-queued" / "config.json").write_text(json.dumps({"kind": "policy", "created_at": 999.0}))
    page.locator("#runs-refresh").click()
    show_run(page, "policy-queued")
    assert page.locator('#run-plot-a .metric-plot[data-run="policy-queued"]').count() == 1
    assert page.locator("#run-plot-a .series, #run-plot-b .series").count() == 0
    assert "no points yet" in page.inner_text("#run-plot-a")
    page.context.close()


def test_presets_fill_the_policy_form(app, browser):
    from trainer.policy_config import CPU_PRESETS, PolicyConfig

    server, _ = app
    page = login(browser, server.url, "boss")
    open_train_tab(page)
    fields = {
        "steps": "#policy-steps input",
        "batch_size": "#policy-batch input",
        "max_new_tokens": "#policy-max-new-tokens input",
        "eval_prompts": "#policy-eval-prompts input",
    }

    def form() -> dict:
        return {name: int(page.locator(sel).input_value()) for name, sel in fields.items()}

    page.get_by_text("More settings").nth(1).click()
    quick, real = CPU_PRESETS["quick"]["settings"], CPU_PRESETS["real"]["settings"]
    # The form opens on the quick look (the trainer's defaults mean hours on a CPU).
    assert form() == {name: quick[name] for name in fields}
    page.locator("#policy-preset").get_by_text("Real run").click()
    page.wait_for_function(
        "v => document.querySelector('#policy-steps input').value === v",
        arg=str(real["steps"]),
        timeout=15_000,
    )
    assert form() == {name: real[name] for name in fields}
    page.locator("#policy-preset").get_by_text("Trainer defaults").click()
    defaults = PolicyConfig()
    page.wait_for_function(
        "v => document.querySelector('#policy-steps input').value === v",
        arg=str(defaults.steps),
        timeout=15_000,
    )
    assert form() == {name: getattr(defaults, name) for name in fields}
    # Each preset's label says what it took here.
    for preset in CPU_PRESETS.values():
        assert preset["took"] in page.inner_text("#policy-preset")
    page.context.close()


def test_a_dpo_run_from_the_form_finishes_with_its_own_plots(app, browser):
    server, runs = app
    page = login(browser, server.url, "boss")
    open_train_tab(page)
    page.locator("#dpo-model input, #dpo-model textarea").first.fill("tiny")
    page.locator("#dpo-lr input").fill("0.001")
    page.get_by_text("More settings").nth(2).click()  # the DPO form's (after the reward's and the policy's)
    page.locator("#dpo-max-length input").fill("64")
    page.locator("#dpo-max-length input").press("Tab")
    page.get_by_label("ipo").check()
    page.locator("#start-dpo").click()
    page.wait_for_function(
        "() => (document.querySelector('#train-message') || {}).innerText?.startsWith('Started DPO run')",
        timeout=15_000,
    )
    run_id = page.get_attribute("#run-progress", "data-run")
    assert run_id and run_id.startswith("dpo-")
    page.wait_for_function(PROGRESS_IS, arg="100%", timeout=180_000)
    page.wait_for_selector("#run-progress[data-state=done]", timeout=15_000)
    line = page.locator(f'#run-plot-a .metric-plot[data-run="{run_id}"] .series[data-series=train] path')
    line.wait_for(timeout=15_000)
    assert "DPO loss" in page.inner_text("#run-plot-a")
    assert "Implicit-reward accuracy" in page.inner_text("#run-plot-b")
    config = json.loads((runs / run_id / "config.json").read_text())
    assert config["algo"] == "dpo" and (config["config"]["loss"], config["config"]["max_length"]) == (
        "ipo",
        64,
    )
    assert config["config"]["lr"] == 0.001 and config["config"]["model"] == "tiny"
    assert (runs / run_id / "policy" / "config.json").is_file()  # a policy, for the arena
    page.context.close()


def test_bad_form_input_is_reported_and_starts_nothing(app, browser):
    server, runs = app
    before = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
    page = login(browser, server.url, "boss")
    open_train_tab(page)
    page.locator("#reward-model input, #reward-model textarea").first.fill("no-such-model")
    page.locator("#start-reward").click()
    page.wait_for_function(
        "() => (document.querySelector('#train-message') || {}).innerText?.includes('Base model')",
        timeout=15_000,
    )
    assert "no-such-model" in page.inner_text("#train-message")
    page.locator("#policy-steps input").fill("0")
    page.locator("#start-policy").click()
    page.wait_for_function(
        "() => (document.querySelector('#train-message') || {}).innerText"
        "?.includes('Steps: must be at least 1')",
        timeout=15_000,
    )
    page.locator("#policy-steps input").fill("2")
    page.get_by_text("More settings").nth(1).click()  # the policy form's
    page.locator("#policy-trust-kl input").fill("0")
    page.locator("#policy-trust-kl input").press("Tab")
    page.locator("#start-policy").click()
    page.wait_for_function(
        "() => (document.querySelector('#train-message') || {}).innerText"
        "?.includes('Trust region (trpo): must be positive')",
        timeout=15_000,
    )
    page.locator("#dpo-beta input").fill("0")
    page.locator("#dpo-beta input").press("Tab")
    page.locator("#start-dpo").click()
    page.wait_for_function(
        "() => (document.querySelector('#train-message') || {}).innerText?.includes('Beta: must be')",
        timeout=15_000,
    )
    after = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
    assert after == before
    page.context.close()


def test_annotators_get_no_train_tab(app, browser):
    server, _ = app
    page = login(browser, server.url, "ann")
    page.get_by_role("tab", name="Guidelines").wait_for(timeout=15_000)
    assert not page.get_by_role("tab", name="Train").is_visible()
    page.context.close()


def test_add_a_finished_policy_to_the_running_arena(tmp_path, browser):
    """One click puts a finished policy into the arena of a running server (one model
    before: two after); votes on its answers carry its run id; a restarted server with
    the same --data keeps it."""
    import shutil

    from helpers import client

    from trainer.models import build_tiny_model
    from trainer.store import read_comparisons

    run = tmp_path / "runs" / "policy-demo"  # what a finished `trainer.policy` run leaves
    shutil.copytree(build_tiny_model(), run / "policy")
    (run / "status.json").write_text(
        json.dumps({"state": "done", "progress": 1.0, "message": "done: 2 steps"})
    )
    (run / "config.json").write_text(
        json.dumps({"config": {"reward": "runs/rm", "algo": "ppo", "model": "tiny"}})
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"Say {w}."}) + "\n"
            for i, w in enumerate(["hello", "goodbye"])
        )
    )
    args = (
        "--model",
        "tiny",
        "--prompts",
        str(prompts),
        "--data",
        str(tmp_path / "store"),
        "--runs",
        str(tmp_path / "runs"),
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--user",
        "solo",
    )
    with Server(tmp_path, *args) as server:
        page = browser.new_context(viewport={"width": 1300, "height": 900}).new_page()
        page.goto(server.url)
        page.wait_for_selector("#progress", timeout=30_000)
        open_train_tab(page)
        page.wait_for_selector("#run-progress[data-run=policy-demo]", timeout=15_000)
        page.locator("#run-arena").click()
        page.wait_for_function(
            "() => (document.querySelector('#train-message') || {}).innerText?.includes('joined the arena')",
            timeout=15_000,
        )
        assert "2 models: tiny, policy-demo" in page.inner_text("#train-message")
        page.wait_for_function(
            "() => document.querySelector('#run-progress')?.innerText.includes('In the arena')",
            timeout=15_000,
        )
        page.context.close()

        c = client(server.url)
        seen = set()
        view = c.predict(api_name="/next")
        for _ in range(600):  # vote on everything, while the new pairs are generated
            if view["pair"] is not None:
                view = c.predict(view["pair"]["pair_id"], "left", "", "", api_name="/vote")
                seen |= {view["ack"]["left_model"], view["ack"]["right_model"]}
                continue
            if view["waiting"]["state"] == "done":
                break
            time.sleep(0.2)
            view = c.predict(api_name="/next")
        assert seen == {"tiny", "policy-demo"}
        assert view["progress"] == {
            "done": 4,
            "assigned": 4,
            "pool_done": 4,
            "pool_total": 4,
        }  # 2 prompts x (1 round + 1 for the new model)
    votes = read_comparisons(tmp_path / "store").to_pylist()
    with_policy = [v for v in votes if "policy-demo" in (v["model_a"], v["model_b"])]
    assert len(with_policy) == 2 and all(
        {v["model_a"], v["model_b"]} == {"tiny", "policy-demo"} for v in with_policy
    )
    assert (
        json.loads((tmp_path / "store" / "arena.json").read_text())["models"][0]["model_id"] == "policy-demo"
    )

    with Server(tmp_path, *args) as again:  # the same --data: the same arena
        assert "arena: policy-demo" in again.output()
        view = client(again.url).predict(api_name="/next")
        assert view["progress"]["done"] == 4 and view["pair"] is None
