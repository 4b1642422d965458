"""The Train tab (admins): start reward, policy and DPO trainings, watch them, cancel
them, and put a finished policy into the arena.

    build_train_tab(demo, ctx, guard)     # inside the page's gr.Tabs(); ctx.launcher runs the trainers

Built inside the page's `gr.Tabs()`; every handler checks the caller's role on the server
(hiding the tab is cosmetic). The form's defaults, choices and the names its errors use
come from the trainers' config dataclasses (trainer.reward_config.RewardConfig,
trainer.policy_config.PolicyConfig), and its values go through their check (annotate.launcher);
the policy form and its CPU presets are annotate/web/policy_form.py, the DPO form
annotate/web/dpo_form.py, the plots
annotate/web/metric_plots.py.
All it shows is read from the run directories, so a reload, a second browser or a
restarted server shows the same runs, progress and plots; a gr.Timer polls while a run is
queued or running.

No `from __future__ import annotations` here: gradio reads the handlers' `gr.Request`
annotations at runtime.
"""

import time
from typing import Any

from annotate.arena import add_to_arena, in_arena
from annotate.launcher import REPO, LaunchError
from annotate.run_reader import ROW_HEADERS, RunInfo
from annotate.web.dpo_form import DPO_FIELDS, build_dpo_form
from annotate.web.html import escape as _e
from annotate.web.metric_plots import empty_plot, run_plots
from annotate.web.policy_form import build_policy_form
from trainer.runs import LOG_FILE, POLICY_DIR, RunDir
from trainer.store import describe

POLL_S = 2.0


def message_html(text: str, error: bool = False) -> str:
    cls = "status error" if error else "status"
    return f'<div class="{cls}" id="train-message">{_e(text)}</div>'


def progress_html(info: RunInfo | None, arena_note: str = "") -> str:
    if info is None:
        return '<div id="run-progress" class="run-progress" data-state="none">No run selected.</div>'
    pct = 100 * info.progress
    colour = {"done": "#16a34a", "failed": "#dc2626", "cancelled": "#a1a1aa"}.get(info.state, "#6366f1")
    steps = f" · step {info.step} of {info.total_steps}" if info.total_steps else ""
    note = f'<div class="run-note">{_e(arena_note)}</div>' if arena_note else ""
    ev = RunDir(info.path).eval() if info.kind == "policy" else {}
    if ev.get("rm_win_rate") is not None:  # trainer/evaluate.py, at the end of a policy run
        lo, hi = ev.get("rm_win_rate_ci", [0, 1])
        note += (
            f'<div class="run-eval">Reward-model win rate over {_e(ev.get("reference"))} on '
            f"{_e(ev.get('prompts'))} held-out prompts: <b>{100 * ev['rm_win_rate']:.0f}%</b> "
            f"(95% CI {100 * lo:.0f}–{100 * hi:.0f}%); the human one is on the Leaderboard tab.</div>"
        )
    return (
        f'<div id="run-progress" class="run-progress" data-state="{_e(info.state)}" '
        f'data-run="{_e(info.run_id)}">'
        f'<div><b>{_e(info.run_id)}</b> · {_e(info.kind)} · <span class="run-state">{_e(info.state)}</span>'
        f"{_e(steps)}</div>"
        f'<div style="display:flex;align-items:center;gap:10px;margin:6px 0">'
        f'<div style="flex:1;height:14px;border-radius:7px;background:#e4e4e7;overflow:hidden">'
        f'<div class="run-bar" style="height:100%;width:{pct:.1f}%;background:{colour}"></div></div>'
        f'<span class="run-pct" style="font-variant-numeric:tabular-nums;min-width:3.5em">{pct:.0f}%</span>'
        f'</div><div class="run-message">{_e(info.message)}</div>{note}</div>'
    )


def build_train_tab(demo, ctx, guard) -> None:
    """The tab and its events. `ctx.launcher` starts the runs; `guard.admin(request)`
    raises gr.Error unless the caller is an admin."""
    import gradio as gr
    import pandas as pd

    from trainer.config import field_meta
    from trainer.policy_config import DEFAULT_PROMPTS
    from trainer.reward_config import RewardConfig

    launcher = ctx.launcher
    r_defaults, r_meta = RewardConfig(), field_meta(RewardConfig)  # the form's defaults are the trainer's
    try:
        prompts_default = str(DEFAULT_PROMPTS.relative_to(REPO))
    except ValueError:
        prompts_default = str(DEFAULT_PROMPTS)

    # Server paths (the runs folder, the store, the prompts file) reach the page on load,
    # for admins only: a component's initial value is in /config, which every logged-in
    # annotator can read.
    intro = (
        f"Trainings run as separate processes and write to `{launcher.runs_dir}`; they keep "
        f"running when this page or the server goes away. Reward models train on the votes in "
        f"`{describe(ctx.data)}`."
    )
    with gr.Tab("Train", id="train", visible=False) as tab:
        t_intro = gr.Markdown("", elem_id="train-intro")
        with gr.Row(equal_height=False):
            with gr.Column(variant="panel"):
                gr.Markdown("**Reward model** (Bradley-Terry, on the votes)")
                r_model = gr.Textbox(
                    r_defaults.model,
                    label=r_meta["model"]["label"],
                    elem_id="reward-model",
                    info="smollm2 (default), tiny, a model directory or a cached HF id",
                )
                with gr.Row():
                    r_epochs = gr.Number(
                        r_defaults.epochs,
                        label=r_meta["epochs"]["label"],
                        precision=0,
                        elem_id="reward-epochs",
                    )
                    r_lr = gr.Number(r_defaults.lr, label=r_meta["lr"]["label"], elem_id="reward-lr")
                    r_lora = gr.Number(
                        r_defaults.lora_r,
                        label=f"{r_meta['lora_r']['label']} (0: all weights)",
                        precision=0,
                        elem_id="reward-lora",
                    )
                with gr.Row():
                    r_ties = gr.Radio(
                        list(r_meta["ties"]["choices"]),
                        value=r_defaults.ties,
                        label=r_meta["ties"]["label"],
                        info="include: a soft label 0.5 (equal rewards)",
                        elem_id="reward-ties",
                    )
                    r_both_bad = gr.Radio(
                        list(r_meta["both_bad"]["choices"]),
                        value=r_defaults.both_bad,
                        label=r_meta["both_bad"]["label"],
                        info="include: a soft label 0.5",
                        elem_id="reward-both-bad",
                    )
                r_weights = gr.Radio(
                    list(r_meta["weights"]["choices"]),
                    value=r_defaults.weights,
                    label=r_meta["weights"]["label"],
                    info="competence: Dawid-Skene from overlapping votes; gold: gold-item accuracy "
                    "(random and adversarial annotators weigh ~0; `preflab annotators` shows them)",
                    elem_id="reward-weights",
                )
                with gr.Accordion("More settings", open=False):
                    with gr.Row():
                        r_batch = gr.Number(
                            r_defaults.batch_size,
                            label=f"{r_meta['batch_size']['label']} (pairs)",
                            precision=0,
                            elem_id="reward-batch",
                        )
                        r_maxlen = gr.Number(
                            r_defaults.max_length,
                            label=f"{r_meta['max_length']['label']} (tokens)",
                            precision=0,
                            elem_id="reward-max-length",
                        )
                r_start = gr.Button("Train reward model", variant="primary", elem_id="start-reward")
            with gr.Column(variant="panel"):
                p_form = build_policy_form(guard)  # its fields, and the presets that fill them
                p_reward, p_prompts, p_start = p_form.reward, p_form.prompts, p_form.start
            with gr.Column(variant="panel"):
                d_form = build_dpo_form()
        t_message = gr.HTML(message_html(""), js_on_load=None)
        with gr.Row():
            gr.Markdown("**Runs**")
            t_refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100, elem_id="runs-refresh")
        t_table = gr.Dataframe(
            headers=ROW_HEADERS,
            interactive=False,
            wrap=True,
            elem_id="runs-table",
            label="Runs (newest first; click a row to show it)",
            max_height=320,
            column_widths=["22%", "8%", "9%", "8%", "38%", "15%"],
        )
        t_run = gr.Dropdown([], value=None, label="Run", elem_id="run-select", allow_custom_value=False)
        t_progress = gr.HTML(progress_html(None), js_on_load=None, elem_id="run-progress-box")
        with gr.Row(equal_height=False):
            # Drawn on the server (annotate.web.metric_plots): one point shows, a new run
            # replaces the last one's curves at once, the last values are numbers beside them.
            t_plot_a = gr.HTML(empty_plot(), elem_id="run-plot-a", js_on_load=None)
            t_plot_b = gr.HTML(empty_plot(), elem_id="run-plot-b", js_on_load=None)
        t_log = gr.Textbox(
            "",
            label=f"Log (last lines of {LOG_FILE})",
            lines=10,
            max_lines=10,
            interactive=False,
            elem_id="run-log",
            autoscroll=True,
        )
        with gr.Row():
            t_cancel = gr.Button(
                "Cancel run", variant="stop", interactive=False, scale=0, min_width=140, elem_id="run-cancel"
            )
            t_resume = gr.Button(
                "Resume run", interactive=False, scale=0, min_width=140, elem_id="run-resume"
            )
            t_arena = gr.Button(
                "Add to arena", interactive=False, scale=0, min_width=140, elem_id="run-arena"
            )
        t_timer = gr.Timer(POLL_S, active=False)
        t_seen = gr.State(None)  # what the plots and log show now: skip re-sending the same

    # ---- one refresh for every event ------------------------------------------------
    refresh_outputs = [
        t_table,
        t_run,
        p_reward,
        t_progress,
        t_plot_a,
        t_plot_b,
        t_log,
        t_cancel,
        t_resume,
        t_arena,
        t_timer,
        t_seen,
    ]

    def arena_note(info: RunInfo) -> str:
        if info.kind != "policy" or info.state != "done":
            return ""
        if not info.servable:
            return "This run has no policy directory to serve."
        if ctx.generator is None:
            return (
                "This server shows pairs from a file (--pairs): there is no arena to add the policy to; "
                f"serve it with `preflab serve --model {info.path / POLICY_DIR}`."
            )
        if in_arena(ctx.generator, info.run_id):
            return f"In the arena: votes on its answers are recorded as model {info.run_id}."
        return "Add to arena: its answers are then paired with the other models'."

    def refresh(selected: str | None, seen, reward_choice: str | None = None):
        runs = launcher.runs()
        ids = [r.run_id for r in runs]
        if selected not in ids:
            selected = ids[0] if ids else None
        info = next((r for r in runs if r.run_id == selected), None)
        rows = [r.row() for r in runs]
        rewards = [r.run_id for r in runs if r.trained_reward]
        reward_value = reward_choice if reward_choice in rewards else (rewards[0] if rewards else None)
        plots = (gr.skip(), gr.skip())
        log = gr.skip()
        if info is None:
            new_seen = None
            if seen is not None:
                plots = (empty_plot(), empty_plot())
                log = ""
        else:
            reader = launcher.metrics(info.run_id)
            tail = launcher.log_tail(info.run_id)
            new_seen = {"run": info.run_id, "records": reader.records, "offset": reader.offset, "log": tail}
            if not seen or seen.get("run") != info.run_id or seen.get("offset") != reader.offset:
                plots = run_plots(info, reader)
            if not seen or seen.get("run") != info.run_id or seen.get("log") != tail:
                log = tail
        servable = info is not None and info.servable and not in_arena(ctx.generator, info.run_id)
        # The dropdowns only when they change: an update closes one the user has open.
        lists = [ids, selected, rewards, reward_value]
        if new_seen is not None:
            new_seen.update(lists=lists, rows=rows)
        same = bool(seen) and seen.get("lists") == lists
        same_rows = bool(seen) and seen.get("rows") == rows
        return (
            gr.skip() if same_rows else pd.DataFrame(rows, columns=ROW_HEADERS),
            gr.skip() if same else gr.Dropdown(choices=ids, value=selected),
            gr.skip() if same else gr.Dropdown(choices=rewards, value=reward_value),
            progress_html(info, arena_note(info) if info else ""),
            *plots,
            log,
            gr.Button(interactive=info is not None and info.active),
            gr.Button(interactive=info is not None and info.resumable),
            gr.Button(interactive=servable),
            gr.Timer(active=any(r.active for r in runs)),
            new_seen,
        )

    # ---- handlers (each checks the role) ------------------------------------------------
    def outcome(action, *args) -> tuple[Any, str | None]:
        """(result, None), or (None, the message) when the launcher refuses: a launch
        problem is reported in the tab's message line under the form, where the user
        fixes the field it names (anything else goes through guard.errors())."""
        try:
            return action(*args), None
        except LaunchError as e:
            return None, str(e)

    def on_load(request: gr.Request):
        if not guard.is_admin(request):
            return (gr.Tab(visible=False), gr.skip(), gr.skip(), *[gr.skip()] * len(refresh_outputs))
        with guard.errors():
            return (gr.Tab(visible=True), intro, prompts_default, *refresh(None, None))

    def on_refresh(selected, seen, reward_choice, request: gr.Request):
        guard.admin(request)
        with guard.errors():
            return refresh(selected, seen, reward_choice)

    def on_select(selected, reward_choice, request: gr.Request):
        guard.admin(request)
        with guard.errors():
            return refresh(selected, None, reward_choice)

    def on_row(seen, reward_choice, evt: gr.SelectData, request: gr.Request):
        guard.admin(request)
        row = evt.row_value or []
        with guard.errors():
            return refresh(row[0] if row else None, None, reward_choice)

    def on_start_reward(
        model,
        epochs,
        lr,
        ties,
        both_bad,
        weights,
        lora,
        batch,
        maxlen,
        selected,
        reward_choice,
        request: gr.Request,
    ):
        guard.admin(request)
        with guard.errors():
            info, problem = outcome(
                lambda: launcher.start_reward(
                    ctx.data,
                    model=model,
                    epochs=epochs,
                    lr=lr,
                    ties=ties,
                    both_bad=both_bad,
                    weights=weights,
                    lora_r=lora,
                    batch_size=batch,
                    max_length=maxlen,
                )
            )
            if problem:
                return (message_html(problem, error=True), *refresh(selected, None, reward_choice))
            return (
                message_html(f"Started reward run {info.run_id} at {time.strftime('%H:%M:%S')}."),
                *refresh(info.run_id, None, reward_choice),
            )

    def on_start_policy(
        reward,
        algo,
        steps,
        lr,
        kl_coef,
        prompts,
        model,
        batch_size,
        max_new_tokens,
        eval_prompts,
        trust_kl,
        selected,
        request: gr.Request,
    ):  # the form's values in POLICY_FIELDS order, then the selected run
        guard.admin(request)
        form = dict(
            algo=algo,
            steps=steps,
            lr=lr,
            kl_coef=kl_coef,
            prompts=prompts,
            model=model,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            eval_prompts=eval_prompts,
            trust_kl=trust_kl,
        )
        with guard.errors():
            info, problem = outcome(lambda: launcher.start_policy(reward, **form))
            if problem:
                return (message_html(problem, error=True), *refresh(selected, None, reward))
            return (
                message_html(f"Started policy run {info.run_id} at {time.strftime('%H:%M:%S')}."),
                *refresh(info.run_id, None, reward),
            )

    def on_start_dpo(
        model,
        loss,
        beta,
        label_smoothing,
        epochs,
        lr,
        lora_r,
        batch_size,
        max_length,
        selected,
        reward_choice,
        request: gr.Request,
    ):  # the form's values in DPO_FIELDS order, then the selected run and reward model
        guard.admin(request)
        values = (model, loss, beta, label_smoothing, epochs, lr, lora_r, batch_size, max_length)
        with guard.errors():
            info, problem = outcome(lambda: launcher.start_dpo(ctx.data, **dict(zip(DPO_FIELDS, values))))
            if problem:
                return (message_html(problem, error=True), *refresh(selected, None, reward_choice))
            return (
                message_html(f"Started DPO run {info.run_id} at {time.strftime('%H:%M:%S')}."),
                *refresh(info.run_id, None, reward_choice),
            )

    def on_cancel(selected, seen, reward_choice, request: gr.Request):
        guard.admin(request)
        with guard.errors():
            text, problem = outcome(launcher.cancel, selected)
            return (message_html(problem or text, bool(problem)), *refresh(selected, seen, reward_choice))

    def on_resume(selected, seen, reward_choice, request: gr.Request):
        guard.admin(request)
        with guard.errors():
            info, problem = outcome(launcher.resume, selected)
            text = problem or f"Resumed {info.run_id} at {time.strftime('%H:%M:%S')}."
            return (message_html(text, bool(problem)), *refresh(selected, None, reward_choice))

    def on_arena(selected, seen, reward_choice, request: gr.Request):
        guard.admin(request)
        with guard.errors():
            text, problem = outcome(add_to_arena, ctx.generator, ctx.state_dir, launcher, selected)
            return (message_html(problem or text, bool(problem)), *refresh(selected, seen, reward_choice))

    kw = dict(api_visibility="private", concurrency_limit=4, concurrency_id="train")
    quiet = dict(kw, show_progress="hidden")
    demo.load(
        on_load,
        None,
        [tab, t_intro, p_prompts, *refresh_outputs],
        show_progress="hidden",
        api_visibility="private",
        concurrency_limit=None,
    )
    t_refresh.click(on_refresh, [t_run, t_seen, p_reward], refresh_outputs, **kw)
    t_timer.tick(on_refresh, [t_run, t_seen, p_reward], refresh_outputs, **quiet)
    t_run.input(on_select, [t_run, p_reward], refresh_outputs, **quiet)
    t_table.select(on_row, [t_seen, p_reward], refresh_outputs, **quiet)
    r_start.click(
        on_start_reward,
        [r_model, r_epochs, r_lr, r_ties, r_both_bad, r_weights, r_lora, r_batch, r_maxlen, t_run, p_reward],
        [t_message, *refresh_outputs],
        **kw,
    )
    p_start.click(
        on_start_policy,
        [*p_form.inputs, t_run],
        [t_message, *refresh_outputs],
        **kw,
    )
    d_form.start.click(on_start_dpo, [*d_form.inputs, t_run, p_reward], [t_message, *refresh_outputs], **kw)
    t_cancel.click(on_cancel, [t_run, t_seen, p_reward], [t_message, *refresh_outputs], **kw)
    t_resume.click(on_resume, [t_run, t_seen, p_reward], [t_message, *refresh_outputs], **kw)
    t_arena.click(on_arena, [t_run, t_seen, p_reward], [t_message, *refresh_outputs], **kw)
