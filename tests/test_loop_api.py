"""The whole loop driven by a script through the admin JSON API of a real server
(annotate/web/loop_api.py): votes -> /train_reward -> /train_policy -> /arena_add -> the
new policy in the next pairs. Tiny models, real trainer subprocesses, gradio_client."""

import json
import time

import pytest
from gradio_client.exceptions import AppError
from helpers import Server, add_users, client


def wait_for(admin, run_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = next(r for r in admin.predict(api_name="/runs") if r["run_id"] == run_id)
        if run["state"] in ("done", "failed", "cancelled"):
            return run
        time.sleep(1.0)
    raise AssertionError(f"{run_id} did not finish in {timeout}s: {run}")


def vote_once(who) -> dict:
    """Take the next pair (waiting while it is generated) and vote on it; the acknowledgement."""
    deadline = time.time() + 120
    view = who.predict(api_name="/next")
    while view["pair"] is None and time.time() < deadline:
        time.sleep(0.3)
        view = who.predict(api_name="/next")
    assert view["pair"] is not None, view
    after = who.predict(view["pair"]["pair_id"], "left", "", "", api_name="/vote")
    assert after["ok"], after
    return after["ack"]


def test_a_script_drives_the_whole_loop_through_the_api(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    words = ["apples", "rivers", "clocks", "stones", "birds", "ships", "lamps", "roads"]
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"Tell me about {w}."}) + "\n" for i, w in enumerate(words)
        )
    )
    users = tmp_path / "users.toml"
    add_users(users, boss="admin", ann="annotator")
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
        "4",
        "--rounds",
        "3",
        "--auth",
        str(users),
    )
    with Server(tmp_path, *args) as server:
        admin, ann = client(server.url, "boss"), client(server.url, "ann")
        # Annotators may vote, not train: every loop endpoint refuses them on the server.
        calls = {
            "/runs": (),
            "/train_reward": ({},),
            "/train_policy": ("x", {}),
            "/train_dpo": ({},),
            "/arena_add": ("x",),
        }
        for api, call_args in calls.items():
            with pytest.raises(AppError, match="admins"):
                ann.predict(*call_args, api_name=api)
        for _ in range(16):
            vote_once(admin)

        # A bad setting names its field and starts nothing.
        with pytest.raises(AppError, match="Epochs: must be at least 1"):
            admin.predict({"model": "tiny", "epochs": 0}, api_name="/train_reward")
        # Only config fields: the launcher's own arguments (extra trainer flags) are not settings.
        with pytest.raises(AppError, match="unknown setting 'extra'"):
            admin.predict({"model": "tiny", "extra": ["--run-dir", str(tmp_path)]}, api_name="/train_reward")
        with pytest.raises(AppError, match="Label smoothing: must be in"):
            admin.predict({"model": "tiny", "label_smoothing": 0.5}, api_name="/train_dpo")
        with pytest.raises(AppError, match="unknown setting 'data'"):  # the server's store, not a setting
            admin.predict({"data": str(tmp_path)}, api_name="/train_dpo")
        assert admin.predict(api_name="/runs") == []

        rm = admin.predict(
            {"model": "tiny", "epochs": 2, "batch_size": 4, "max_length": 64}, api_name="/train_reward"
        )
        assert rm["kind"] == "reward" and rm["state"] == "queued"
        rm = wait_for(admin, rm["run_id"])
        assert rm["state"] == "done" and rm["trained_reward"], rm

        policy = admin.predict(
            rm["run_id"],
            {
                "algo": "rloo",
                "steps": 1,
                "model": "tiny",
                "batch_size": 2,
                "max_new_tokens": 4,
                "prompts": str(prompts),
            },
            api_name="/train_policy",
        )
        policy = wait_for(admin, policy["run_id"])
        assert policy["state"] == "done" and policy["servable"], policy

        added = admin.predict(policy["run_id"], api_name="/arena_add")
        assert policy["run_id"] in added["models"] and "joined the arena" in added["message"]
        assert next(r for r in admin.predict(api_name="/runs") if r["run_id"] == policy["run_id"])["in_arena"]
        # The newcomer meets people at once: among the next few pairs, not after the base rounds.
        seen = [vote_once(ann) for _ in range(4)]
        assert any(policy["run_id"] in (a["left_model"], a["right_model"]) for a in seen), seen
