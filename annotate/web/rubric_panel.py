"""The Annotate tab's rubric (serve --rubric): one compact row of the criteria and the
per-answer flags, above the vote bar, so that the overall vote is the last click.

    panel = RubricPanel(ctx.service.rubric)     # inside the Annotate tab's Column
    inputs = panel.components                   # sent with every vote (a set input: a dict)
    panel.judgments(values)                     # {component: value} -> the service's shown terms
    panel.values(shown) / panel.cleared()       # what render() puts back (undo) or clears

A pairwise criterion is a radio A / B / Tie (values "left", "right", "tie": the terms of
the screen, as for the overall choice), the first two with keys q/w/e and z/x/c (shown in
their labels; annotate/web/assets.py); a scale is a 1-5 radio for each answer; the flags
are a checkbox group for each answer. Required ones say so in their label; the service
enforces them (annotate/service.py), the page only shows. Labels and help are plain text
checked at load (annotate/rubric.py) and gradio renders them as text, not HTML.
"""

from __future__ import annotations

from typing import Any

SCORES = ["1", "2", "3", "4", "5"]
KEY_ROWS = ("qwe", "zxc")  # A / B / tie of the first two pairwise criteria


class RubricPanel:
    def __init__(self, rubric):
        import gradio as gr

        self.rubric = rubric
        self.slots: list[tuple[str, str | None, Any]] = []  # (criterion or "flags", side, component)
        self.components: list[Any] = []
        if rubric is None:
            return
        keys = iter(KEY_ROWS)
        with gr.Row(elem_id="rubric", equal_height=False):
            for c in rubric.criteria:
                label = c.label + (" (required)" if c.required else "")
                if c.kind == "pairwise":
                    row = next(keys, None)  # the first two get keys (annotate/web/assets.py)
                    if row:
                        label += f" [{' / '.join(row)}]"
                    self._add(
                        c.name,
                        None,
                        gr.Radio(
                            [("A", "left"), ("B", "right"), ("Tie", "tie")],
                            value=None,
                            label=label,
                            info=c.help or None,
                            elem_id=f"criterion-{c.name}",
                            elem_classes=["criterion", *([f"keys-{row}"] if row else [])],
                            min_width=160,
                        ),
                    )
                else:
                    for side, word in (("left", "A"), ("right", "B")):
                        self._add(
                            c.name,
                            side,
                            gr.Radio(
                                SCORES,
                                value=None,
                                label=f"{label}: {word}",
                                info=(c.help or None) if side == "left" else None,
                                elem_id=f"criterion-{c.name}-{side}",
                                elem_classes=["criterion"],
                                min_width=160,
                            ),
                        )
            if rubric.flags:
                choices = [(f.label, f.name) for f in rubric.flags]
                for side, word in (("left", "A"), ("right", "B")):
                    self._add(
                        "flags",
                        side,
                        gr.CheckboxGroup(
                            choices,
                            value=[],
                            label=f"Flags on {word}",
                            elem_id=f"flags-{side}",
                            elem_classes=["criterion"],
                            min_width=160,
                        ),
                    )

    def _add(self, name: str, side: str | None, component) -> None:
        self.slots.append((name, side, component))
        self.components.append(component)

    def judgments(self, values: dict[Any, Any]) -> dict[str, Any] | None:
        """The components' values (a set input's dict) as the service takes them."""
        if self.rubric is None:
            return None
        out: dict[str, Any] = {}
        for name, side, component in self.slots:
            value = values.get(component)
            if value in (None, "", []):
                continue
            if side is None:
                out[name] = value
            else:
                out.setdefault(name, {})[side] = value if name == "flags" else int(value)
        return out

    def cleared(self) -> list[Any]:
        return [[] if name == "flags" else None for name, _, _ in self.slots]

    def values(self, shown: dict[str, Any] | None) -> list[Any]:
        """Component values for judgments in shown terms (an undone vote's)."""
        shown = shown or {}
        out = []
        for name, side, _ in self.slots:
            value = shown.get(name)
            if name == "flags":
                out.append(list((value or {}).get(side, [])))
            elif side is None:
                out.append(value)
            else:
                score = (value or {}).get(side)
                out.append(None if score is None else str(score))
        return out
