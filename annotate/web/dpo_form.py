"""The Train tab's DPO form: a policy trained straight from the votes (`preflab
train-dpo`, trainer/dpo.py), no reward model between. Its fields, defaults, choices and
labels are trainer.dpo_config.DPOConfig's; the launcher checks the values with the
config's own check (annotate.launcher.Launcher.start_dpo).

    form = build_dpo_form()                  # where the form goes, inside the tab's layout
    form.start.click(handler, [*form.inputs, ...], ...)      # the values, in DPO_FIELDS order
"""

from dataclasses import dataclass
from typing import Any

# The form's values, in the order `inputs` lists them (the DPOConfig field each is).
DPO_FIELDS = (
    "model",
    "loss",
    "beta",
    "label_smoothing",
    "epochs",
    "lr",
    "lora_r",
    "batch_size",
    "max_length",
)


@dataclass
class DPOForm:
    inputs: list  # the components of DPO_FIELDS, in order
    start: Any


def build_dpo_form() -> DPOForm:
    import gradio as gr

    from trainer.config import field_meta
    from trainer.dpo_config import DPOConfig

    meta, defaults = field_meta(DPOConfig), DPOConfig()

    def number(name: str, label: str | None = None, **kw) -> Any:
        return gr.Number(
            getattr(defaults, name),
            label=label or meta[name]["label"],
            elem_id=f"dpo-{name.replace('_', '-')}",
            **kw,
        )

    gr.Markdown("**DPO** (a policy straight from the votes, no reward model)")
    model = gr.Textbox(
        defaults.model,
        label=f"{meta['model']['label']} (the starting policy and the reference)",
        elem_id="dpo-model",
        info="smollm2 (default), tiny, a model directory or a cached HF id",
    )
    loss = gr.Radio(
        list(meta["loss"]["choices"]),
        value=defaults.loss,
        label=meta["loss"]["label"],
        info="sigmoid: DPO (with label smoothing: conservative DPO, for noisy votes); ipo: IPO",
        elem_id="dpo-loss",
    )
    with gr.Row():
        beta = number("beta", info="the pull towards the reference")
        epochs = number("epochs", precision=0)
        lr = number("lr")
    with gr.Accordion("More settings", open=False):
        with gr.Row():
            smoothing = number("label_smoothing", info="the share of votes taken as flipped, below 0.5")
            lora = number("lora_r", f"{meta['lora_r']['label']} (0: all weights)", precision=0)
        with gr.Row():
            batch = number("batch_size", f"{meta['batch_size']['label']} (pairs)", precision=0)
            max_length = number("max_length", f"{meta['max_length']['label']} (tokens)", precision=0)
    gr.Markdown("Ties and both-bad votes are left out: DPO needs a preferred answer.")
    start = gr.Button("Train with DPO", variant="primary", elem_id="start-dpo")
    # DPO_FIELDS' order
    return DPOForm([model, loss, beta, smoothing, epochs, lr, lora, batch, max_length], start)
