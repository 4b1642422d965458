"""TEMP adapter (dropped at merge): the Review tab with the new signature, over the old
builder in annotate/review.py, until annotate/web/review_tab.py lands."""

from types import SimpleNamespace


def build_review_tab(demo, ctx, guard) -> None:
    import gradio as gr

    from annotate.review import build_review_tab as old_builder

    service = SimpleNamespace(data=ctx.data, runs_dir=ctx.runs_dir, queue=ctx.queue, generator=ctx.generator,
                              state_dir=ctx.state_dir, is_admin=guard.is_admin, launcher=ctx.launcher)
    with gr.Tab("Review", id="review", visible=False) as tab:
        old_builder(service, demo, tab, guard.admin)
