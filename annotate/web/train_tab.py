"""TEMP adapter (dropped at merge): the Train tab with the new signature, over the old
builder in annotate/train_tab.py, until annotate/web/train_tab.py lands."""

from types import SimpleNamespace


def build_train_tab(demo, ctx, guard) -> None:
    from annotate.train_tab import build_train_tab as old_builder

    service = SimpleNamespace(data=ctx.data, runs_dir=ctx.runs_dir, queue=ctx.queue, generator=ctx.generator,
                              state_dir=ctx.state_dir, is_admin=guard.is_admin, launcher=ctx.launcher)
    old_builder(demo, service, guard.admin)
