"""The loop as a JSON API, for scripts (admins only): the Train tab's actions without the page.

    from gradio_client import Client
    c = Client("http://127.0.0.1:7860/", auth=("admin", "..."))
    c.predict(api_name="/runs")                                        # every run, newest first
    run = c.predict({"epochs": 1}, api_name="/train_reward")           # on the server's --data
    c.predict(run["run_id"], {"algo": "rloo", "steps": 20}, api_name="/train_policy")
    c.predict("policy-...", api_name="/arena_add")                     # a finished policy joins

Settings are the trainers' own config fields (trainer/reward_config.py, policy_config.py),
checked by the same config check as the Train tab's form: a bad one comes back as an error
that names the field, and nothing starts. Every endpoint goes through `guard.admin`.
(No `from __future__ import annotations` here: gradio reads `request: gr.Request`.)
"""

from typing import Any

from annotate.arena import add_to_arena, in_arena


def run_json(info, generator=None) -> dict[str, Any]:
    """A run as the API returns it."""
    return {
        "run_id": info.run_id,
        "kind": info.kind,
        "state": info.state,
        "progress": info.progress,
        "message": info.message,
        "step": info.step,
        "total_steps": info.total_steps,
        "trained_reward": info.trained_reward,  # a finished reward model: /train_policy takes it
        "servable": info.servable,  # a finished policy: /arena_add takes it
        "in_arena": bool(generator is not None and in_arena(generator, info.run_id)),
    }


def config_settings(config_class, settings: dict | None) -> dict[str, Any]:
    """The settings a script sent, as config fields only: anything else (the launcher's
    own arguments, such as extra trainer flags or the store) is refused by name."""
    import dataclasses

    from annotate.launcher import LaunchError

    settings = dict(settings or {})
    fields = {f.name for f in dataclasses.fields(config_class)} - {
        "run_dir",
        "runs_dir",
        "run_id",
        "data",
        "reward",
    }
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise LaunchError(
            f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"the settings are {config_class.__name__} fields: {', '.join(sorted(fields))}"
        )
    return settings


def register_loop_api(ctx, guard) -> None:
    """/runs, /train_reward, /train_policy, /train_dpo, /arena_add; call inside the page's gr.Blocks."""
    import gradio as gr

    launcher = ctx.launcher

    def runs(request: gr.Request = None) -> list:
        """Every run under the server's --runs directory, newest first (admins only)."""
        guard.admin(request)
        with guard.errors():
            return [run_json(info, ctx.generator) for info in launcher.runs()]

    def train_reward(settings: dict | None = None, request: gr.Request = None) -> dict:
        """Start a reward run on the server's store; settings: RewardConfig fields
        (model, epochs, lr, ties, both_bad, lora_r, batch_size, max_length, ...)."""
        guard.admin(request)
        with guard.errors():
            from trainer.reward_config import RewardConfig

            fields = config_settings(RewardConfig, settings)
            return run_json(launcher.start_reward(ctx.data, **fields), ctx.generator)

    def train_policy(reward_run: str, settings: dict | None = None, request: gr.Request = None) -> dict:
        """Start a policy run against a finished reward run; settings: PolicyConfig fields
        (algo, steps, lr, kl_coef, prompts, model, batch_size, max_new_tokens, ...)."""
        guard.admin(request)
        with guard.errors():
            from trainer.policy_config import PolicyConfig

            fields = config_settings(PolicyConfig, settings)
            return run_json(launcher.start_policy(reward_run, **fields), ctx.generator)

    def train_dpo(settings: dict | None = None, request: gr.Request = None) -> dict:
        """Start a DPO run (a policy straight from the votes) on the server's store;
        settings: DPOConfig fields (model, loss, beta, label_smoothing, epochs, lr, lora_r, ...)."""
        guard.admin(request)
        with guard.errors():
            from trainer.dpo_config import DPOConfig

            fields = config_settings(DPOConfig, settings)
            return run_json(launcher.start_dpo(ctx.data, **fields), ctx.generator)

    def arena_add(run_id: str, request: gr.Request = None) -> dict:
        """Put a finished policy into the running arena under its run id."""
        guard.admin(request)
        with guard.errors():
            message = add_to_arena(ctx.generator, ctx.state_dir, launcher, run_id)
            models = list(ctx.generator.model_names) if ctx.generator is not None else []
            return {"message": message, "models": models}

    admin = dict(concurrency_limit=4, concurrency_id="train")
    gr.api(runs, api_name="runs", **admin)
    gr.api(train_reward, api_name="train_reward", **admin)
    gr.api(train_policy, api_name="train_policy", **admin)
    gr.api(train_dpo, api_name="train_dpo", **admin)
    gr.api(arena_add, api_name="arena_add", **admin)
