"""Static assets of the page: its stylesheet and the keyboard shortcuts' script.

    gr.Blocks(...).launch(css=CSS, head=KEYS_JS, ...)      # annotate/web/page.py

Shared by every tab: the `.metric` cards of annotate/web/html.py, the cards and the
progress bar of the Annotate tab, the waiting spinner.
"""

# Keyboard shortcuts: 1-4, s, u click the buttons with these element ids. Keys typed in
# a text field are text (radio buttons are not text fields: pick a strength, then press
# 1). Escape leaves the rationale box, so the keys work again without the mouse.
KEYS_JS = """
<script>
(() => {
  const KEYS = {"1": "vote-left", "2": "vote-right", "3": "vote-tie", "4": "vote-both-bad",
                "s": "skip", "u": "undo"};
  const TEXT_INPUTS = /^(text|search|email|number|password|url|tel|date|time)$/i;
  function typing(el) {
    if (!el) return false;
    if (el.isContentEditable || el.tagName === "TEXTAREA" || el.tagName === "SELECT") return true;
    return el.tagName === "INPUT" && TEXT_INPUTS.test(el.type || "text");
  }
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && typing(e.target)) { e.target.blur(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || typing(e.target)) return;
    const id = KEYS[e.key.toLowerCase()];
    if (!id) return;
    const el = document.getElementById(id);
    const button = el && (el.tagName === "BUTTON" ? el : el.querySelector("button"));
    // offsetParent is null when the button is hidden (another tab, no pair shown).
    if (!button || button.disabled || button.offsetParent === null) return;
    e.preventDefault();
    button.click();
  });
})();
</script>
"""

CSS = """
.gradio-container { max-width: 1400px !important; }
#topbar { display: flex; flex-wrap: wrap; gap: 6px 18px; align-items: baseline; padding: 2px 4px; }
#topbar .brand { font-weight: 700; font-size: 1.1em; }
#topbar .who { color: var(--body-text-color-subdued); }
#topbar .spacer { flex: 1; }
#topbar a { color: var(--body-text-color-subdued); }
.progress-box { font-variant-numeric: tabular-nums; }
.pool-progress { font-variant-numeric: tabular-nums; color: var(--body-text-color-subdued); font-size: 0.9em; }
.progress-bar { display: inline-block; width: 140px; height: 8px; border-radius: 4px;
  background: #e4e4e7; vertical-align: middle; margin-left: 6px; overflow: hidden; }
.progress-bar > span { display: block; height: 100%; background: #6366f1; }
.keys { color: var(--body-text-color-subdued); font-size: 0.9em; }
kbd { border: 1px solid var(--border-color-primary); border-bottom-width: 2px; border-radius: 4px;
  padding: 0 5px; font-family: var(--font-mono); font-size: 0.85em; background: var(--background-fill-secondary); }
.card { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 10px 16px;
  background: var(--background-fill-primary); overflow-wrap: anywhere; }
.card h4 { margin: 0 0 8px 0; font-size: 0.95em; font-weight: 700; letter-spacing: 0.04em;
  color: var(--color-accent); }
.card.prompt-card { background: var(--background-fill-secondary); }
.card.prompt-card h4 { color: var(--body-text-color-subdued); }
.answer { font-size: 1.02em; line-height: 1.5; }
.answer { min-height: 140px; max-height: 60vh; overflow-y: auto; }
.answer pre, .chat pre { white-space: pre-wrap; background: var(--background-fill-secondary);
  padding: 8px; border-radius: 6px; }
.chat .turn { margin: 4px 0 8px 0; }
.chat .role { font-size: 0.75em; font-weight: 600; text-transform: uppercase; letter-spacing: 0.06em;
  color: var(--body-text-color-subdued); }
.chat .turn-assistant .text { border-left: 3px solid #d4d4d8; padding-left: 8px; }
.chat .turn-system .text { font-style: italic; }
.cut-note { margin-top: 8px; font-size: 0.85em; color: var(--body-text-color-subdued); font-style: italic; }
.empty { color: var(--body-text-color-subdued); font-style: italic; }
#vote-row button { font-size: 1.05em; min-height: 48px; }
.status { min-height: 1.6em; color: var(--body-text-color-subdued); }
.status.error { color: var(--error-text-color, #b91c1c); }
.waiting { padding: 40px; text-align: center; font-size: 1.1em; }
.waiting .spinner { display: inline-block; width: 18px; height: 18px; margin-right: 10px;
  border: 3px solid #d4d4d8; border-top-color: #6366f1; border-radius: 50%;
  animation: spin 0.9s linear infinite; vertical-align: middle; }
@keyframes spin { to { transform: rotate(360deg); } }
.metrics { display: grid; grid-template-columns: repeat(auto-fit, minmax(125px, 1fr)); gap: 8px; }
.metric { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 10px 12px; }
.metric .label { font-size: 0.8em; color: var(--body-text-color-subdued); }
.metric .value { font-size: 1.5em; font-weight: 650; font-variant-numeric: tabular-nums; }
.metric .note { font-size: 0.8em; color: var(--body-text-color-subdued); }
"""
