"""The Train tab's policy form: its fields (defaults, choices and labels from PolicyConfig)
and its presets, which fill the fields with settings sized for a CPU.

    form = build_policy_form(guard)      # where the form goes, inside the tab's layout
    p_start.click(handler, [*form.inputs, ...], ...)      # the values, in POLICY_FIELDS order

The form opens on the "Quick look" preset, not on the trainer's own defaults (100 steps
of 16 prompts: hours on a CPU); "Trainer defaults" gives those back, for a GPU. The
presets and their measured times are trainer.policy_config.CPU_PRESETS. Choosing one is
a server call like every other (guard.admin first).
"""

from dataclasses import dataclass
from typing import Any

# The form's values, in the order `inputs` lists them (the PolicyConfig field each is).
POLICY_FIELDS = (
    "reward",
    "algo",
    "steps",
    "lr",
    "kl_coef",
    "prompts",
    "model",
    "batch_size",
    "max_new_tokens",
    "eval_prompts",
    "trust_kl",
)
DEFAULTS_CHOICE = "Trainer defaults (sized for a GPU)"


def preset_choices() -> dict[str, dict[str, Any] | None]:
    """{radio label: the settings it fills in (None: the trainer's defaults)}."""
    from trainer.policy_config import CPU_PRESETS

    choices: dict[str, dict[str, Any] | None] = {
        f"{p['name']} ({p['took']})": p["settings"] for p in CPU_PRESETS.values()
    }
    choices[DEFAULTS_CHOICE] = None
    return choices


def preset_values(choice: str | None) -> dict[str, Any]:
    """The field values a preset choice sets: its settings over the trainer's defaults."""
    from trainer.policy_config import PolicyConfig

    defaults = PolicyConfig()
    settings = preset_choices().get(choice or "") or {}
    return {name: settings.get(name, getattr(defaults, name)) for name in PRESET_FIELDS}


# What a preset sets (the rest of the form keeps what the user typed).
PRESET_FIELDS = ("algo", "steps", "batch_size", "max_new_tokens", "eval_prompts")


@dataclass
class PolicyForm:
    preset: Any
    reward: Any
    prompts: Any  # filled on load, for admins only (a server path)
    inputs: list  # the components of POLICY_FIELDS, in order
    start: Any


def build_policy_form(guard) -> PolicyForm:
    import gradio as gr

    from trainer.config import field_meta
    from trainer.policy_config import PolicyConfig

    meta = field_meta(PolicyConfig)
    choices = preset_choices()
    first = next(iter(choices))
    start = preset_values(first)

    gr.Markdown("**Policy** (RL against a finished reward model)")
    preset = gr.Radio(
        list(choices),
        value=first,
        label="Preset",
        info="fills steps, prompts per step, answer length and held-out prompts; the times are "
        "those of one free CPU core (a busy machine takes longer: a running run shows its ETA)",
        elem_id="policy-preset",
    )
    reward = gr.Dropdown(
        [],
        value=None,
        label=f"{meta['reward']['label']} (a finished reward run)",
        elem_id="policy-reward",
        allow_custom_value=False,
    )
    with gr.Row():
        algo = gr.Radio(
            list(meta["algo"]["choices"]),
            value=start["algo"],
            label=meta["algo"]["label"],
            elem_id="policy-algo",
        )
        steps = gr.Number(start["steps"], label=meta["steps"]["label"], precision=0, elem_id="policy-steps")
    with gr.Row():
        defaults = PolicyConfig()
        lr = gr.Number(defaults.lr, label=meta["lr"]["label"], elem_id="policy-lr")
        kl = gr.Number(defaults.kl_coef, label=meta["kl_coef"]["label"], elem_id="policy-kl")
    prompts = gr.Textbox("", label=meta["prompts"]["label"], elem_id="policy-prompts")
    model = gr.Textbox(
        "",
        label=f"{meta['model']['label']} (the starting policy)",
        elem_id="policy-model",
        placeholder="blank: the reward model's base model",
    )
    with gr.Accordion("More settings", open=False):
        with gr.Row():
            batch = gr.Number(
                start["batch_size"], label="Prompts per step", precision=0, elem_id="policy-batch"
            )
            new_tokens = gr.Number(
                start["max_new_tokens"],
                label=meta["max_new_tokens"]["label"],
                precision=0,
                elem_id="policy-max-new-tokens",
            )
            held = gr.Number(
                start["eval_prompts"],
                label="Held-out prompts",
                info="for the evaluation at the end",
                precision=0,
                elem_id="policy-eval-prompts",
            )
        trust = gr.Number(
            defaults.trust_kl,
            label=meta["trust_kl"]["label"],
            info="trpo only: the most KL to the rollout policy one update may reach (nats per token)",
            elem_id="policy-trust-kl",
        )
    button = gr.Button("Train policy", variant="primary", elem_id="start-policy")
    filled = {
        "algo": algo,
        "steps": steps,
        "batch_size": batch,
        "max_new_tokens": new_tokens,
        "eval_prompts": held,
    }

    def on_preset(choice, request: gr.Request):
        guard.admin(request)
        values = preset_values(choice)
        return tuple(values[name] for name in PRESET_FIELDS)

    preset.input(
        on_preset,
        [preset],
        [filled[name] for name in PRESET_FIELDS],
        api_visibility="private",
        show_progress="hidden",
    )
    inputs = [
        reward,
        algo,
        steps,
        lr,
        kl,
        prompts,
        model,
        batch,
        new_tokens,
        held,
        trust,
    ]  # POLICY_FIELDS' order
    return PolicyForm(preset, reward, prompts, inputs, button)
