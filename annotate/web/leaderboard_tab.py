"""TEMP adapter (dropped at merge): the Leaderboard tab with the new signature, over
the old builder in annotate/leaderboard.py, until annotate/web/leaderboard_tab.py lands."""

from types import SimpleNamespace


def build_leaderboard_tab(demo, ctx, guard) -> None:
    import gradio as gr

    from annotate.leaderboard import build_leaderboard_tab as old_builder

    service = SimpleNamespace(data=ctx.data, runs_dir=ctx.runs_dir, queue=ctx.queue, generator=ctx.generator,
                              state_dir=ctx.state_dir, is_admin=guard.is_admin, launcher=ctx.launcher)
    with gr.Tab("Leaderboard", id="leaderboard", visible=False) as tab:
        old_builder(demo, service, tab, guard.admin)
