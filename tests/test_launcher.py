"""The run launcher of the Train tab (annotate/launcher.py) and the arena's added models
(Generator.add_model, arena.json): real trainer subprocesses on a small real store, with
the tiny model, so each run takes seconds.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import banana_store

from annotate.arena import add_to_arena, read_arena, restore_arena
from annotate.launcher import Launcher, LaunchError
from annotate.processes import trainer_identity
from annotate.run_metrics import MetricsReader
from annotate.run_reader import DEAD_MESSAGE
from trainer.runs import LAUNCH_CONFIG_FILE
from trainer.store.directory_writer import DirectoryStore

TINY_REWARD = dict(model="tiny", epochs=1, batch_size=8, max_length=96, lr=1e-3)


@pytest.fixture(scope="module")
def done_reward(tmp_path_factory):
    """One finished reward run, started through the launcher: (launcher, store, run_id)."""
    tmp = tmp_path_factory.mktemp("launch")
    store = banana_store(tmp / "store")
    launcher = Launcher(tmp / "runs")
    info = launcher.start_reward(store, ties="include", **TINY_REWARD)
    assert info.state == "queued" and info.kind == "reward"  # listed at once, before torch loads
    final = launcher.wait(info.run_id, timeout=240)
    assert final.state == "done", launcher.log_tail(info.run_id)
    return launcher, store, info.run_id


def test_a_reward_run_started_from_the_launcher_finishes(done_reward):
    launcher, store, run_id = done_reward
    (info,) = launcher.runs()
    assert info.run_id == run_id and info.kind == "reward" and info.state == "done"
    assert info.progress == 1.0 and "validation accuracy" in info.message
    assert info.trained_reward and launcher.reward_models() == [run_id]
    launch = json.loads((info.path / "launch.json").read_text())
    # The form's settings went to the trainer as a config file the launcher checked.
    assert launch["argv"][1:3] == ["-m", "trainer.reward"] and "--config" in launch["argv"]
    assert launch["argv"][launch["argv"].index("--config") + 1] == str(info.path / "launch-config.json")
    assert json.loads((info.path / "launch-config.json").read_text())["ties"] == "include"
    config = json.loads((info.path / "config.json").read_text())["config"]
    assert (
        config["ties"] == "include" and config["model"] == "tiny" and config["data"] == str(store.resolve())
    )
    assert "done:" in launcher.log_tail(run_id)  # the trainer's output went to log.txt
    reader = launcher.metrics(run_id)
    loss = reader.series("train", "loss")
    assert [s for s, _ in loss] == list(range(1, len(loss) + 1)) and len(loss) >= 2
    assert reader.series("eval", "val_acc")
    rows = reader.rows([("train", "loss", "train"), ("eval", "val_loss", "validation")])
    assert {r["series"] for r in rows} == {"train", "validation"}
    # The pid of a finished run is gone, reaped: no zombie is left behind.
    assert trainer_identity(info.pid, info.path, info.updated_at) == "dead"
    assert not Path(f"/proc/{info.pid}").exists()


def test_a_policy_run_on_the_finished_reward_model(done_reward):
    launcher, store, reward_id = done_reward
    # No base model given: the policy starts from the reward model's (tiny), same tokenizer.
    info = launcher.start_policy(
        reward_id, algo="rloo", steps=2, lr=1e-5, kl_coef=0.1, model="", batch_size=2, max_new_tokens=4
    )
    assert info.kind == "policy"
    final = launcher.wait(info.run_id, timeout=240)
    assert final.state == "done", launcher.log_tail(info.run_id)
    assert final.servable and final.progress == 1.0
    config = json.loads((info.path / "config.json").read_text())["config"]
    assert (config["algo"], config["steps"], config["kl_coef"], config["model"]) == ("rloo", 2, 0.1, "tiny")
    assert config["reward"] == str(launcher.runs_dir / reward_id)
    assert config["prompts"].endswith("trainer/data/prompts.jsonl")
    reader = launcher.metrics(info.run_id)
    assert [s for s, _ in reader.series("train", "reward_mean")] == [1.0, 2.0]
    assert len(reader.series("train", "kl")) == 2
    # The log pane shows progress: one line a step, with the time left.
    tail = launcher.log_tail(info.run_id)
    assert "step 1/2 | reward" in tail and "step 2/2 | reward" in tail and "s/step | ETA" in tail, tail
    assert [r.run_id for r in launcher.runs()] == [info.run_id, reward_id]  # newest first
    # The policy met its reference on the held-out prompts; the tab says how it went.
    from annotate.web.train_tab import progress_html

    ev = json.loads((info.path / "eval.json").read_text())
    assert ev["policy"] == info.run_id and ev["reference"] == "tiny" and ev["prompts"] == 32
    assert "held-out prompts" in progress_html(final) and f"{100 * ev['rm_win_rate']:.0f}%" in progress_html(
        final
    )


def test_a_dpo_run_is_cancelled_resumed_and_served_like_a_policy(tmp_path):
    from annotate.web.metric_plots import run_plots

    store = banana_store(tmp_path / "store", n=200)
    launcher = Launcher(tmp_path / "runs")
    settings = dict(model="tiny", epochs=50, batch_size=2, max_length=64, lr=1e-3, kl_prompts=2, kl_tokens=8)
    info = launcher.start_dpo(store, **settings)
    assert info.state == "queued" and info.kind == "policy" and info.run_id.startswith("dpo-")
    launch = json.loads((info.path / "launch.json").read_text())
    assert launch["argv"][1:3] == ["-m", "trainer.dpo"] and launch["trainer"] == "dpo"
    run_id = info.run_id
    deadline = time.time() + 180
    while len(launcher.metrics(run_id).series("train", "loss")) < 2:  # training: SIGTERM saves and stops
        assert time.time() < deadline and launcher.info(run_id).active, launcher.log_tail(run_id)
        time.sleep(0.2)
    # Cancel signals this run's DPO trainer (a trainer.dpo command line of a policy run)
    assert "cancel requested" in launcher.cancel(run_id)
    cancelled = launcher.wait(run_id, timeout=120)
    assert cancelled.state == "cancelled" and cancelled.resumable, launcher.log_tail(run_id)
    saved = json.loads((cancelled.path / "checkpoint" / "preflab_policy.json").read_text())["step"]

    # Resume runs trainer.dpo again, never trainer.policy (the run's kind): two more steps
    launcher.resume(run_id, extra=["--max-steps", str(saved + 2)])
    done = launcher.wait(run_id, timeout=180)
    assert done.state == "done" and done.servable, launcher.log_tail(run_id)
    assert json.loads((done.path / "launch.json").read_text())["argv"][1:3] == ["-m", "trainer.dpo"]
    config = json.loads((done.path / "config.json").read_text())
    assert config["algo"] == "dpo" and config["config"]["data"] == str(store.resolve())
    assert config["config"]["lr"] == 1e-3 and config["config"]["model"] == "tiny"
    records = [json.loads(line) for line in (done.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"][-2:] == [saved + 1, saved + 2]
    # the Train tab plots what a DPO run logs, not a policy run's reward and KL
    loss_plot, acc_plot = run_plots(done, launcher.metrics(run_id))
    assert "DPO loss" in loss_plot and "Implicit-reward accuracy" in acc_plot and "validation" in acc_plot

    # launch.json is the run directory's, which others may write: a trainer it names that
    # does not make this kind of run is refused, nothing started
    (done.path / "status.json").write_text(json.dumps({"state": "cancelled", "progress": 0.5}))
    forged = json.loads((done.path / "launch.json").read_text())
    forged["trainer"] = "reward"
    (done.path / "launch.json").write_text(json.dumps(forged))
    with pytest.raises(LaunchError, match="does not hold this run's trainer command"):
        launcher.resume(run_id)


def test_a_dpo_form_value_out_of_range_names_the_field_and_starts_nothing(tmp_path):
    store = banana_store(tmp_path / "store")
    launcher = Launcher(tmp_path / "runs")
    with pytest.raises(LaunchError, match="Label smoothing"):
        launcher.start_dpo(store, model="tiny", label_smoothing="0.7")
    with pytest.raises(LaunchError, match="Loss"):
        launcher.start_dpo(store, model="tiny", loss="hinge")
    with pytest.raises(LaunchError, match="Data: .* does not exist"):
        launcher.start_dpo(tmp_path / "nowhere", model="tiny")
    assert (
        launcher.runs() == [] and not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    )


def test_the_cpu_presets_are_settings_the_trainer_takes():
    """What the Train tab's presets fill in: PolicyConfig fields and values its check
    accepts, each labelled with the time it took; the rest of the form keeps the
    trainer's defaults."""
    from annotate.web.policy_form import DEFAULTS_CHOICE, POLICY_FIELDS, preset_choices, preset_values
    from trainer.policy_config import CPU_PRESETS, PolicyConfig

    fields = set(PolicyConfig.__dataclass_fields__)
    assert set(POLICY_FIELDS) <= fields
    for preset in CPU_PRESETS.values():
        assert set(preset["settings"]) <= fields and preset["took"]
        PolicyConfig(reward="runs/rm", **preset["settings"]).check()
    labels = list(preset_choices())
    assert labels[0].startswith("Quick look") and labels[-1] == DEFAULTS_CHOICE
    assert CPU_PRESETS["real"]["took"] in labels[1]
    quick = CPU_PRESETS["quick"]["settings"]
    assert preset_values(labels[0]) == quick
    defaults = PolicyConfig()
    assert preset_values(DEFAULTS_CHOICE) == {name: getattr(defaults, name) for name in quick}
    # Smaller than the trainer's defaults, which mean hours on a CPU.
    for preset in CPU_PRESETS.values():
        s = preset["settings"]
        assert s["steps"] * s["batch_size"] * s["max_new_tokens"] < defaults.steps * defaults.batch_size * 64


def test_cancel_sends_sigterm_and_the_run_ends_cancelled(tmp_path):
    store = banana_store(tmp_path / "store")
    launcher = Launcher(tmp_path / "runs")
    info = launcher.start_reward(store, **{**TINY_REWARD, "epochs": 400, "batch_size": 2})
    run_id = info.run_id
    deadline = time.time() + 180
    while time.time() < deadline:  # until it trains (SIGTERM then means save and stop)
        if len(launcher.metrics(run_id).series("train", "loss")) >= 2:
            break
        assert launcher.info(run_id).active, launcher.log_tail(run_id)
        time.sleep(0.2)
    running = launcher.info(run_id)
    assert running.state == "running" and running.progress < 1  # status.json is throttled: maybe still 0
    assert trainer_identity(running.pid, running.path, running.updated_at) == "trainer"
    assert "cancel requested" in launcher.cancel(run_id)
    final = launcher.wait(run_id, timeout=120)
    assert final.state == "cancelled", (final, launcher.log_tail(run_id))
    assert "resume" in final.message and (final.path / "checkpoint").is_dir()
    assert not Path(f"/proc/{running.pid}").exists()  # reaped
    assert "already cancelled" in launcher.cancel(run_id)  # nothing left to signal

    # Resume: the same command again; the trainer goes on from its checkpoint (here told to
    # stop two steps later, so that the test ends).
    saved = json.loads((final.path / "checkpoint" / "preflab_reward.json").read_text())["step"]
    assert final.resumable
    again = launcher.resume(run_id, extra=["--max-steps", str(saved + 2)])
    assert again.state == "queued" and again.progress == final.progress
    done = launcher.wait(run_id, timeout=180)
    assert done.state == "done", launcher.log_tail(run_id)
    records = [json.loads(line) for line in (final.path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "resume" and r["step"] == saved for r in records)
    assert [r["step"] for r in records if r["kind"] == "train"][-2:] == [saved + 1, saved + 2]
    with pytest.raises(LaunchError, match="only a cancelled or failed run"):
        launcher.resume(run_id)


def test_a_killed_trainer_shows_as_failed(tmp_path):
    """Killed (-9) before it could write a final state: the launcher that started it
    says so; a run whose pid is gone (started by another server, or the CLI) too."""
    store = banana_store(tmp_path / "store", n=8)
    launcher = Launcher(tmp_path / "runs")
    info = launcher.start_reward(store, **TINY_REWARD)
    os.kill(info.pid, signal.SIGKILL)
    final = launcher.wait(info.run_id, timeout=60)
    assert final.state == "failed" and "exited with code -9 without a final status" in final.message

    # A run directory from elsewhere: status "running", but the pid has exited.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = launcher.runs_dir / "reward-orphan"
    orphan.mkdir()
    (orphan / "status.json").write_text(
        json.dumps(
            {
                "state": "running",
                "progress": 0.4,
                "message": "step 4",
                "pid": dead.pid,
                "updated_at": time.time(),
            }
        )
    )
    (orphan / "config.json").write_text(
        json.dumps({"config": {"model": "tiny", "ties": "exclude"}, "created_at": time.time()})
    )
    shown = launcher.info("reward-orphan")
    assert shown.kind == "reward" and shown.state == "failed" and shown.message == DEAD_MESSAGE
    assert "already failed" in launcher.cancel("reward-orphan")
    # A live pid that is some other program (a reused pid) is not that run's trainer either.
    (orphan / "status.json").write_text(
        json.dumps(
            {
                "state": "running",
                "progress": 0.4,
                "message": "step 4",
                "pid": os.getpid(),
                "updated_at": time.time() - 3600,
            }
        )
    )
    assert launcher.info("reward-orphan").state == "failed"
    assert trainer_identity(os.getpid(), orphan, time.time()) == "dead"


def test_bad_form_input_names_the_field_and_starts_nothing(done_reward, tmp_path):
    store = banana_store(tmp_path / "store", n=4)
    launcher = Launcher(tmp_path / "runs")
    bad_reward = [
        (dict(epochs=0), "Epochs: must be at least 1"),
        (dict(epochs="two"), "Epochs: 'two' is not a number"),
        (dict(epochs=1.5), "Epochs: 1.5 is not a whole number"),
        (dict(lr=0), "Learning rate: must be positive"),
        (dict(lr=None), "Learning rate: give a number"),
        (dict(ties="sometimes"), "Ties: must be one of exclude, include"),
        (dict(lora_r=-1), "LoRA rank: must be at least 0"),
        (dict(model=""), "Base model: give a model"),
        (dict(model="no-such-model"), "Base model: 'no-such-model' is not smollm2, tiny"),
        (dict(model=str(tmp_path)), "is a directory but not a model"),
    ]
    for change, expected in bad_reward:
        with pytest.raises(LaunchError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            launcher.start_reward(store, **{**TINY_REWARD, **change})
    with pytest.raises(LaunchError, match="Data: .* does not exist"):
        launcher.start_reward(tmp_path / "nothing-here", **TINY_REWARD)
    with pytest.raises(LaunchError, match="Reward model: choose a finished reward run"):
        launcher.start_policy("")
    with pytest.raises(LaunchError, match="Reward model: there is no run 'nope'"):
        launcher.start_policy("nope")
    other, _, reward_id = done_reward
    good = dict(algo="ppo", steps=2, model="tiny")
    for change, expected in [
        (dict(algo="dpo"), "Algorithm: must be one of ppo, rloo"),
        (dict(steps=0), "Steps: must be at least 1"),
        (dict(kl_coef=-0.1), "KL coefficient: must be at least 0"),
        (dict(prompts="no/such/prompts.jsonl"), "Prompts file: no/such/prompts.jsonl does not"),
        (dict(lr="fast"), "Learning rate: 'fast' is not a number"),
    ]:
        with pytest.raises(LaunchError, match=expected):
            other.start_policy(reward_id, **{**good, **change})
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert len(other.runs()) == len({r.run_id for r in other.runs()})
    # A run that is not a finished reward model cannot be a policy's reward.
    unfinished = other.runs_dir / "reward-unfinished"
    unfinished.mkdir()
    (unfinished / "status.json").write_text(json.dumps({"state": "failed", "progress": 0, "message": "x"}))
    (unfinished / "launch.json").write_text(json.dumps({"kind": "reward", "created_at": 0}))
    with pytest.raises(LaunchError, match="reward-unfinished is not a finished reward run"):
        other.start_policy("reward-unfinished", **good)
    shutil.rmtree(unfinished)


def test_metrics_reader_reads_increments_and_waits_for_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    reader = MetricsReader(path)
    assert reader.update() == 0 and reader.series("train", "loss") == []
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s, "acc": None}) for s in (1, 2, 3)]
    with open(path, "w") as f:
        f.write(lines[0] + "\n" + lines[1] + "\n" + lines[2][:17])  # the last line half-written
    assert reader.update() == 2
    assert reader.series("train", "loss") == [(1.0, 1.0), (2.0, 0.5)]
    assert reader.series("train", "acc") == []  # None is not a point
    offset = reader.offset
    assert reader.update() == 0 and reader.offset == offset  # still half a line
    with open(path, "a") as f:
        f.write(
            lines[2][17:]
            + "\n"
            + "{not json\n"
            + json.dumps({"kind": "eval", "step": 3, "val_acc": 0.75})
            + "\n"
        )
    assert reader.update() == 2 and reader.bad == 1
    assert reader.series("train", "loss")[-1] == (3.0, 1.0 / 3)
    assert reader.series("eval", "val_acc") == [(3.0, 0.75)]
    # A resumed run rewrites the file (steps after its checkpoint forgotten): read again.
    path.write_text(
        lines[0]
        + "\n"
        + json.dumps({"kind": "resume", "step": 1})
        + "\n"
        + json.dumps({"kind": "train", "step": 2, "loss": 0.9})
        + "\n"
    )
    reader.update()
    assert reader.series("train", "loss") == [(1.0, 1.0), (2.0, 0.9)]
    assert reader.series("eval", "val_acc") == []


# --------------------------------------------------------------------------------------
# The arena: Generator.add_model, arena.json
# --------------------------------------------------------------------------------------


def _pool(tmp_path: Path, n: int = 3):
    from trainer.prompts import load_prompt_pool

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"Count to {i}."}) + "\n" for i in range(n))
    )
    return load_prompt_pool(prompts).prompts


def _wait_done(gen, generated: int, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = gen.status()
        if status["state"] == "failed":
            raise AssertionError(status)
        if status["state"] == "done" and status["generated"] >= generated:
            return status
        time.sleep(0.1)
    raise AssertionError(gen.status())


def test_add_model_turns_one_model_into_a_two_model_arena(tmp_path):
    from annotate.pair_generator import Generator
    from annotate.queue import AssignmentQueue
    from trainer.models import build_tiny_model

    pool = _pool(tmp_path)
    q = AssignmentQueue()
    gen = Generator(
        ["tiny"], pool, q, cache_dir=tmp_path / "pairs", batch_size=3, max_new_tokens=4, per_annotator=100
    )
    gen.run()  # one model: two seeds of it per prompt, then done
    assert gen.status()["state"] == "done"
    first = list(q._pairs.values())
    assert len(first) == 3 and all(p.model_a == p.model_b == "tiny" for p in first)

    policy_dir = build_tiny_model()  # stands in for runs/<id>/policy
    assert gen.add_model(policy_dir, "policy-run-1") is True
    assert gen.add_model(policy_dir, "policy-run-1") is False  # already there
    with pytest.raises(ValueError, match="not a model directory"):
        gen.add_model(tmp_path, "policy-run-2")
    assert gen.model_names == ["tiny", "policy-run-1"] and q.planned == gen.planned == 6
    _wait_done(gen, 6)  # the finished generator started again
    new = [p for p in q._pairs.values() if p not in first]
    assert len(new) == 3 and {p.prompt_id for p in new} == {"p0", "p1", "p2"}
    assert all({p.model_a, p.model_b} == {"tiny", "policy-run-1"} for p in new)
    # A vote on such a pair carries the run id as its model.
    from annotate.service import Service

    with DirectoryStore(tmp_path / "store") as store:
        service = Service(store, q, data=tmp_path / "store", local_user="me", generator=gen)
        models = set()
        view = service.next("me")
        while view["pair"] is not None:
            view = service.vote("me", view["pair"]["pair_id"], "left")
            models |= {view["ack"]["left_model"], view["ack"]["right_model"]}
    assert models == {"tiny", "policy-run-1"}
    from trainer.store import read_comparisons

    votes = read_comparisons(tmp_path / "store").to_pylist()
    assert sum("policy-run-1" in (v["model_a"], v["model_b"]) for v in votes) == 3


def test_add_to_arena_is_remembered_for_the_next_server(tmp_path):
    from annotate.pair_generator import Generator
    from annotate.queue import AssignmentQueue
    from trainer.models import build_tiny_model

    launcher = Launcher(tmp_path / "runs")
    run = launcher.runs_dir / "policy-1"
    shutil.copytree(build_tiny_model(), run / "policy")
    (run / "status.json").write_text(json.dumps({"state": "done", "progress": 1.0, "message": "done"}))
    (run / "config.json").write_text(
        json.dumps({"config": {"reward": "runs/rm", "algo": "ppo", "model": "tiny"}})
    )
    data = tmp_path / "store"
    pool = _pool(tmp_path)

    with pytest.raises(LaunchError, match="pairs from a file"):  # serve --pairs: no arena
        add_to_arena(None, data, launcher, "policy-1")
    with pytest.raises(LaunchError, match="no run 'nope'"):
        add_to_arena(None, data, launcher, "nope")

    gen = Generator(["tiny"], pool, AssignmentQueue(), cache_dir=data / "pairs", max_new_tokens=4)
    assert "joined the arena" in add_to_arena(gen, data, launcher, "policy-1")
    assert "already in the arena" in add_to_arena(gen, data, launcher, "policy-1")
    assert [m["model_id"] for m in read_arena(data)] == ["policy-1"]

    # The next server with the same --data: the same arena, before any pair is generated.
    again = Generator(["tiny"], pool, AssignmentQueue(), cache_dir=data / "pairs", max_new_tokens=4)
    notes = restore_arena(again, data)
    assert again.model_names == ["tiny", "policy-1"] and again.sources["policy-1"] == str(run / "policy")
    assert again.planned == 2 * len(pool) and "policy-1" in notes[0]
    shutil.rmtree(run / "policy")  # a policy deleted since: left out, with a note
    third = Generator(["tiny"], pool, AssignmentQueue(), cache_dir=data / "pairs", max_new_tokens=4)
    assert "left out" in restore_arena(third, data)[0] and third.model_names == ["tiny"]


def test_a_database_password_in_the_prompts_field_stays_out_of_the_run_directory(done_reward, tmp_path):
    """Prompts from a PostgreSQL store: the URL goes into the run's files without its
    password, which the trainer gets in its environment (PGPASSWORD) only."""
    seen = tmp_path / "trainer-env.txt"
    fake_python = tmp_path / "python"  # stands in for the trainer: records what it was given
    fake_python.write_text(f'#!/bin/sh\nprintf "%s" "$PGPASSWORD" > {seen}\n')
    fake_python.chmod(0o755)
    other, _, reward_id = done_reward
    launcher = Launcher(other.runs_dir, python=str(fake_python))
    info = launcher.start_policy(
        reward_id,
        run_id="policy-db-prompts",
        algo="rloo",
        steps=1,
        model="tiny",
        prompts="postgresql://ann:s3cret@127.0.0.1:9/votes",
    )
    launcher.wait(info.run_id, timeout=60)
    files = [p for p in info.path.rglob("*") if p.is_file()]
    assert files and not [p for p in files if b"s3cret" in p.read_bytes()]
    config = json.loads((info.path / LAUNCH_CONFIG_FILE).read_text())
    assert config["prompts"] == "postgresql://ann@127.0.0.1:9/votes"
    assert seen.read_text() == "s3cret"
    shutil.rmtree(info.path)


def test_a_policy_that_joins_the_arena_meets_people_in_the_next_pairs(tmp_path):
    """The last step of the loop: a model added while the base rounds still have most of
    their pairs to go gets its pairs generated at once and handed out first."""
    from annotate.pair_generator import Generator
    from annotate.queue import AssignmentQueue
    from trainer.models import build_tiny_model

    pool = _pool(tmp_path, n=12)
    q = AssignmentQueue()
    gen = Generator(["tiny"], pool, q, cache_dir=None, batch_size=2, max_new_tokens=4, per_annotator=2)
    gen.start()
    try:
        q.next("early")  # an annotator is active: the generator keeps pairs ready
        deadline = time.time() + 120
        while len(q._pairs) < 3 and time.time() < deadline:
            time.sleep(0.1)
        waiting = list(q._pairs)  # base pairs already in the queue when the newcomer arrives
        assert 3 <= len(waiting) < len(pool)
        assert gen.add_model(build_tiny_model(), "policy-run-1")
        shown = []
        for _ in range(6):  # one annotator votes (here: takes and skips) pair after pair
            deadline = time.time() + 120
            a = q.next("ann")
            while a is None and time.time() < deadline:
                time.sleep(0.1)
                a = q.next("ann")
            assert a is not None, gen.status()
            shown.append({a.pair.model_a, a.pair.model_b})
            q.skip("ann", a.pair.pair_id)
    finally:
        gen.stop()
    # Within a few handouts the newcomer is on screen, ahead of the base pairs that waited.
    first = next(i for i, models in enumerate(shown) if "policy-run-1" in models)
    assert first <= 3, shown
    assert sum("policy-run-1" in models for models in shown) >= 2, shown


def test_serve_model_names_a_policy_by_its_run_as_add_to_arena_does(tmp_path):
    from annotate.arena import arena_name
    from trainer.models import DEFAULT_MODEL, build_tiny_model

    run = tmp_path / "runs" / "policy-7"
    shutil.copytree(build_tiny_model(), run / "policy")
    (run / "config.json").write_text(json.dumps({"kind": "policy", "config": {"algo": "rloo"}}))
    (run / "status.json").write_text(json.dumps({"state": "done"}))  # a finished run, as serve needs
    assert arena_name(str(run / "policy")) == "policy-7"
    for given in (run, f"{run}/", run / "." / "policy"):  # the run directory too, however typed
        assert arena_name(str(given)) == "policy-7", given
    assert arena_name("smollm2") == DEFAULT_MODEL
    loose = tmp_path / "my-model"  # a model directory that is not a run's policy keeps its path
    shutil.copytree(build_tiny_model(), loose)
    assert arena_name(str(loose)) == str(loose)


def test_prompts_go_out_in_a_seeded_shuffle_not_file_order(tmp_path):
    from annotate.pair_generator import Generator
    from annotate.queue import AssignmentQueue

    pool = _pool(tmp_path, n=30)

    def order(seed):
        gen = Generator(["tiny"], pool, AssignmentQueue(), cache_dir=None, seed=seed)
        return [p.id for p in gen._todo(None)]

    file_order = [p.id for p in pool]
    assert sorted(order(0)) == sorted(file_order)  # every prompt, once
    assert order(0) != file_order
    assert order(0) == order(0) and order(0) != order(1)  # the same seed, the same order


def test_resume_runs_the_launchers_own_command_not_what_launch_json_says(tmp_path):
    """launch.json lives in the run directory, so it is data, not a command: an extra flag
    in it is not passed on, a second --run-dir is refused."""
    seen = tmp_path / "argv.txt"
    fake_python = tmp_path / "python"  # stands in for the trainer: records its command line
    fake_python.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {seen}\n')
    fake_python.chmod(0o755)
    launcher = Launcher(tmp_path / "runs", python=str(fake_python))
    run = launcher.runs_dir / "reward-planted"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "cancelled", "progress": 0.5, "message": "x"}))
    planted = [
        "python",
        "-m",
        "trainer.reward",
        "--run-dir",
        str(run),
        "--no-progress",
        "--lr",
        "99",
        "--data",
        str(tmp_path / "store"),
    ]
    (run / "launch.json").write_text(json.dumps({"kind": "reward", "created_at": 0, "argv": planted}))
    launcher.wait(launcher.resume("reward-planted").run_id, timeout=60)
    argv = seen.read_text().split("\n")[:-1]
    assert argv == [
        "-m",
        "trainer.reward",
        "--run-dir",
        str(run),
        "--no-progress",
        "--data",
        str(tmp_path / "store"),
    ]
    (run / "status.json").write_text(json.dumps({"state": "cancelled", "progress": 0.5, "message": "x"}))
    escape = [*planted, "--run-dir", str(tmp_path / "elsewhere")]
    (run / "launch.json").write_text(json.dumps({"kind": "reward", "created_at": 0, "argv": escape}))
    with pytest.raises(LaunchError, match="does not hold this run's trainer command"):
        launcher.resume("reward-planted")
    # (the launch.json above is one from before the launcher wrote "trainer": the run's kind's
    # trainer.) A "trainer" that is no trainer of TRAINER_KINDS for this kind is refused.
    for trainer in ("policy", "dpo", "os", ["reward"]):
        launch = {"kind": "reward", "trainer": trainer, "created_at": 0, "argv": planted}
        (run / "launch.json").write_text(json.dumps(launch))
        with pytest.raises(LaunchError, match="does not hold this run's trainer command"):
            launcher.resume("reward-planted")


def test_a_restart_reads_every_newcomer_pair_back_on_its_own_rounds(tmp_path):
    """A newcomer's opponent may be a later newcomer; its pairs still belong to its own
    rounds after a restart (the round is written into gen_params), so none is dropped."""
    from annotate.pair_generator import Generator
    from annotate.queue import AssignmentQueue
    from trainer.models import build_tiny_model

    pool = _pool(tmp_path, n=3)
    policy = build_tiny_model()

    def generator(q):
        gen = Generator(
            ["tiny"], pool, q, cache_dir=tmp_path / "pairs", batch_size=3, max_new_tokens=4, per_annotator=100
        )
        gen.add_model(policy, "pol-1")
        gen.add_model(policy, "pol-2")
        return gen

    first = AssignmentQueue()
    gen = generator(first)
    gen.run()
    made = list(first._pairs)
    assert len(made) == 9 and gen.status()["state"] == "done"
    again = generator(AssignmentQueue())
    assert sorted(p.pair_id for p in again.load_cache()) == sorted(made)  # all nine, none over quota
    assert not again._has_work()


def test_resume_gives_the_password_only_where_the_runs_own_settings_point(tmp_path):
    """On a resume the run's config.json decides which store the trainer opens: a planted
    one that is not the server's store gets no password."""
    seen = tmp_path / "trainer-env.txt"
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/sh\nprintf "%s" "$PGPASSWORD" > {seen}\n')
    fake_python.chmod(0o755)
    server_store = "postgresql://ann:s3cret@127.0.0.1:9/votes"
    launcher = Launcher(tmp_path / "runs", python=str(fake_python), store=server_store)
    run = launcher.runs_dir / "reward-1"
    run.mkdir(parents=True)
    argv = [
        "python",
        "-m",
        "trainer.reward",
        "--run-dir",
        str(run),
        "--no-progress",
        "--data",
        "postgresql://ann@127.0.0.1:9/votes",
    ]
    for planted, expected in (
        ("postgresql://ann@127.0.0.1:9/votes", "s3cret"),
        ("postgresql://ann@evil:5432/x", ""),
    ):
        (run / "status.json").write_text(json.dumps({"state": "cancelled", "progress": 0.5, "message": "x"}))
        (run / "launch.json").write_text(json.dumps({"kind": "reward", "created_at": 0, "argv": argv}))
        (run / "config.json").write_text(json.dumps({"kind": "reward", "config": {"data": planted}}))
        launcher.wait(launcher.resume("reward-1").run_id, timeout=60)
        assert seen.read_text() == expected, planted
