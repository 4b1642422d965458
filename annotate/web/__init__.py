"""The web layer: the gradio page and the JSON API over `annotate.service.Service`.

* `html.py`   escaping, safe Markdown for model text, small shared HTML pieces;
* `guard.py`  the one place that resolves the caller, checks the role and turns the
              project's errors into `gr.Error`;
* one module per tab, each with the same entry point `build_x_tab(demo, ctx, guard)`,
  where `ctx` is the `annotate.context.ServeContext` that `annotate/serve.py` builds.

Nothing here stores, trains or samples: handlers call the service layer and render.
"""
