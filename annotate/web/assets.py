"""Static assets of the page: its stylesheet and its two scripts (the keyboard
shortcuts; the "more below" cue of an answer that scrolls).

    gr.Blocks(...).launch(css=CSS, head=HEAD_HTML, ...)      # annotate/web/page.py

Shared by every tab: the `.metric` cards of annotate/web/html.py, the cards and the
progress bar of the Annotate tab, the waiting spinner, and the narrow-screen layout
(below 700 px: the answers stacked, a vote bar that stays on screen, tables and plots
that scroll sideways in their own box instead of running past the screen's edge).
"""

# Keyboard shortcuts: 1-4, s, u click the buttons with these element ids (the first one
# shown: the Annotate tab's or the Chat tab's); q/w/e and z/x/c
# pick A/B/tie of the first two pairwise rubric criteria. Keys typed in
# a text field are text (radio buttons are not text fields: pick a strength, then press
# 1). Escape leaves the rationale box, so the keys work again without the mouse.
KEYS_JS = """
<script>
(() => {
  const KEYS = {"1": ["vote-left", "chat-vote-left"], "2": ["vote-right", "chat-vote-right"],
                "3": ["vote-tie", "chat-vote-tie"], "4": ["vote-both-bad", "chat-vote-both-bad"],
                "s": ["skip"], "u": ["undo"]};
  const TEXT_INPUTS = /^(text|search|email|number|password|url|tel|date|time)$/i;
  function typing(el) {
    if (!el) return false;
    if (el.isContentEditable || el.tagName === "TEXTAREA" || el.tagName === "SELECT") return true;
    return el.tagName === "INPUT" && TEXT_INPUTS.test(el.type || "text");
  }
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && typing(e.target)) { e.target.blur(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || typing(e.target)) return;
    const key = e.key.toLowerCase();
    // serve --rubric: the first two pairwise criteria take q/w/e and z/x/c for A/B/tie
    // (annotate/web/rubric_panel.py gives them the class keys-qwe / keys-zxc).
    for (const row of ["qwe", "zxc"]) {
      const at = key.length === 1 ? row.indexOf(key) : -1;
      if (at < 0) continue;
      const radio = document.querySelectorAll(`.keys-${row} input[type=radio]`)[at];
      if (!radio || radio.offsetParent === null) return;
      e.preventDefault();
      radio.click();
      return;
    }
    for (const id of KEYS[key] || []) {
      const el = document.getElementById(id);
      const button = el && (el.tagName === "BUTTON" ? el : el.querySelector("button"));
      // offsetParent is null when the button is hidden (another tab, no pair shown, a
      // chat answer still streaming).
      if (!button || button.disabled || button.offsetParent === null) continue;
      e.preventDefault();
      button.click();
      return;
    }
  });
})();
</script>
"""

# An answer card taller than its max-height scrolls inside itself; nothing showed that
# it does. While text is hidden below its bottom edge the card gets data-more, and the
# CSS shows a fade and the cue (answer_html's MORE_CUE); a tap on the cue shows the
# whole answer (data-expanded). Checked when a card appears (gradio replaces the HTML
# for every pair), scrolls or changes size, and once the fonts are in.
MORE_JS = """
<script>
(() => {
  function check(card) {
    const hidden = card.scrollHeight - card.scrollTop - card.clientHeight;
    card.toggleAttribute("data-more", !card.hasAttribute("data-expanded") && hidden > 4);
  }
  const watched = new WeakSet();
  const resized = new ResizeObserver((entries) => entries.forEach((e) => check(e.target)));
  function scan() {
    for (const card of document.querySelectorAll(".card.answer")) {
      if (!watched.has(card)) {
        watched.add(card);
        card.addEventListener("scroll", () => check(card), { passive: true });
        resized.observe(card);
      }
      check(card);
    }
  }
  new MutationObserver(scan).observe(document.documentElement, { childList: true, subtree: true });
  document.fonts && document.fonts.ready.then(scan);
  document.addEventListener("click", (e) => {
    const cue = e.target.closest && e.target.closest(".more-cue");
    const card = cue && cue.closest(".card.answer");
    if (!card) return;
    card.setAttribute("data-expanded", "");
    check(card);
  });
})();
</script>
"""

# gradio scopes every rule of `css=` inside a media query to its `.contain` box, so a rule
# for the page's outer frame (its 32 px side margins, too wide on a phone) comes here.
SHELL_CSS = """
<style>
@media (max-width: 700px) { .gradio-container > .main.app { padding: 8px 8px 16px !important; } }
</style>
"""

HEAD_HTML = KEYS_JS + MORE_JS + SHELL_CSS

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
.answer[data-expanded] { max-height: none; }
.answer pre, .chat pre { white-space: pre-wrap; background: var(--background-fill-secondary);
  padding: 8px; border-radius: 6px; overflow-x: auto; }
/* Model tables (annotate/web/html.py wraps them): cells keep their words whole, and a
   table wider than the card scrolls sideways in this box. */
.card .table-scroll { overflow-x: auto; margin: 0.5em 0; }
.card .table-scroll table { margin: 0; }
.card .table-scroll th, .card .table-scroll td { overflow-wrap: normal; word-break: normal; }
/* The cue of an answer that scrolls: it sticks to the card's bottom edge over a fade,
   and takes no room of its own (the negative margin), so showing it moves nothing. */
.more-cue { display: none; position: sticky; bottom: -10px; z-index: 1; width: calc(100% + 32px);
  margin: -3.2em -16px -10px; height: 3.2em; padding: 1.4em 0 0.3em; border: 0; cursor: pointer;
  font: inherit; font-size: 0.85em; font-weight: 600; color: var(--color-accent);
  background: linear-gradient(to bottom, transparent, var(--background-fill-primary) 55%); }
.answer[data-more] .more-cue { display: block; }
.chat .turn { margin: 4px 0 8px 0; }
.chat .role { font-size: 0.75em; font-weight: 600; text-transform: uppercase; letter-spacing: 0.06em;
  color: var(--body-text-color-subdued); }
.chat .turn-assistant .text { border-left: 3px solid #d4d4d8; padding-left: 8px; }
.chat .turn-system .text { font-style: italic; }
.cut-note { margin-top: 8px; font-size: 0.85em; color: var(--body-text-color-subdued); font-style: italic; }
.empty { color: var(--body-text-color-subdued); font-style: italic; }
#vote-row button { font-size: 1.05em; min-height: 48px; }
/* serve --rubric: the criteria wrap in one compact row above the vote bar. */
#rubric { flex-wrap: wrap; gap: 6px; }
#rubric .criterion { flex: 1 1 160px; }
/* The vote bar sticks to the bottom of the window when the answers are taller than it
   (a long prompt, a phone): both answers' buttons are always one tap away. */
#vote-row { position: sticky; bottom: 0; z-index: 5; background: var(--body-background-fill);
  padding: 6px 0; }
/* gradio clips its container with overflow: hidden, which makes it the sticky bar's
   scroll box (one that never scrolls); clip cuts the same and leaves the window as it. */
.gradio-container { overflow: clip !important; }
/* The Chat tab (annotate/web/chat_tab.py): each panel grows with its conversation (the
   page scrolls, not the panel: a panel re-rendered for every token would lose its own
   scroll position), the user's turns shaded, the answer still coming marked. */
.chat-panel { min-height: 160px; line-height: 1.5; }
.chat-panel .turn-user .text { background: var(--background-fill-secondary); border-radius: 8px;
  padding: 2px 10px; }
.chat-panel[data-streaming="true"] .turn-assistant:last-child .text::after { content: "▍";
  color: var(--color-accent); animation: blink 1s steps(2, start) infinite; }
@keyframes blink { to { visibility: hidden; } }
.chat-panel .chat-model { color: var(--body-text-color); letter-spacing: normal; }
.chat-error { margin-top: 8px; color: var(--error-text-color, #b91c1c); font-size: 0.9em; }
.chat-stats { min-height: 1.5em; padding: 3px 6px; font-size: 0.85em; font-variant-numeric: tabular-nums;
  color: var(--body-text-color-subdued); }
#chat-vote-row button { font-size: 1.05em; min-height: 48px; }
#chat-vote-row { position: sticky; bottom: 0; z-index: 5; background: var(--body-background-fill);
  padding: 6px 0; }
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
/* ---- narrow screens (phones): one column ---------------------------------------------- */
@media (max-width: 700px) {
  #topbar .keys { display: none; }       /* no keyboard on a phone; the buttons say it all */
  #answers-row, #chat-answers-row { flex-direction: column; gap: 10px; }   /* A above B: the same A and B */
  #answers-row > *, #chat-answers-row > * { min-width: 0 !important; width: 100%; }
  .card { padding: 8px 12px; }
  .more-cue { width: calc(100% + 24px); margin-left: -12px; margin-right: -12px; bottom: -8px;
    margin-bottom: -8px; }
  .answer { max-height: 45vh; min-height: 0; }   /* its foot (and cue) above the vote bar */
  #vote-row { display: grid !important; grid-template-columns: 1fr 1fr; gap: 6px;
    padding: 6px 0 8px; box-shadow: 0 -6px 8px -6px rgba(0, 0, 0, 0.18); }
  #vote-row button { min-width: 0 !important; min-height: 44px; font-size: 1em; padding: 4px 6px; }
  #chat-vote-row { display: grid !important; grid-template-columns: 1fr 1fr; gap: 6px; }
  #chat-vote-row button { min-width: 0 !important; min-height: 44px; font-size: 1em; padding: 4px 6px; }
  #vote-details, #chat-vote-details { flex-direction: column; }
  #vote-details > *, #chat-vote-details > * { min-width: 0 !important; width: 100%; }
  #rubric .criterion { min-width: 0 !important; flex-basis: 100%; }
  /* Plots side by side in a row (Dashboard, Train) take a row each: gradio's 160 px
     minimum (an inline style) would put two 180 px plots with cut titles side by side. */
  .row > .block:has(.vega-embed) { min-width: 100% !important; }
  /* Fields that gradio groups in one box share its width down to nothing (the Dashboard's
     "margin column" checkbox got 26 px); below 160 px they wrap to a line of their own. */
  .form > .block { min-width: min(160px, 100%) !important; }
  /* Tables and SVG plots of the admin tabs scroll sideways in their own box. */
  .html-container .prose { overflow-x: auto; }
  .lb-plot { max-width: none !important; }      /* its own size (text 12 px), not a third */
  .lb-table th, .lb-table td { white-space: nowrap; padding: 4px 8px; }
  /* The runs table: gradio sizes its columns as shares of its box; a wider box scrolls. */
  #runs-table { overflow-x: auto; }
  #runs-table .table-container { min-width: 820px; }
  .review-table { min-width: 620px; }
  .review-table .pair-body { grid-template-columns: 1fr; }
  .review-table .pair-body .prompt-card { grid-column: auto; }
}
"""
