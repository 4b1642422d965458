"""The flags of `preflab serve` (annotate/serve.py, which annotate/cli.py asks for them):
where pairs come from, the generator, accounts and sessions, sampling, gold, rubric, chat.
Only argparse here; what the flags mean together is checked by serve.check_flags."""

from __future__ import annotations

import argparse

from annotate import chat_filter, gold, rubric
from annotate.sessions import DEFAULT_IDLE_S
from trainer import endpoints
from trainer.data import GUIDELINES
from trainer.prompts import DEFAULT_PROMPTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("where pairs come from (one of)")
    src.add_argument(
        "--pairs",
        metavar="FILE",
        help="pre-generated pairs (.jsonl or .parquet): "
        "prompt, response_a, response_b [, model_a, model_b, pair_id]; no model is loaded",
    )
    src.add_argument(
        "--model",
        action="append",
        metavar="M",
        default=None,
        help="sample pairs from this model in the background (once: two samples per "
        "prompt; repeated: arena, a random pair of different models per prompt)",
    )
    endpoints.add_argument(src)
    p.add_argument(
        "--prompts",
        default=str(DEFAULT_PROMPTS),
        metavar="FILE",
        help="prompt pool for --model; with --chat, where 'Random prompt' draws from",
    )
    p.add_argument(
        "--suggest",
        default=None,
        metavar="JUDGE",
        help="judge:<name> (votes from `preflab judge` in --data): after each vote the annotator sees "
        "that judge's choice on the pair (never before: no anchoring), and the Review tab lists the "
        "votes where people and the judge disagree",
    )
    p.add_argument(
        "--data",
        default="comparisons",
        metavar="STORE",
        help="the comparison store votes go to: a directory (one server), or "
        "postgresql://user@host:port/db (any number of servers share assignment and overlap K)",
    )
    p.add_argument(
        "--runs",
        default="runs",
        metavar="DIR",
        help="run directories: trainings started from the Train tab, policies for the arena",
    )
    p.add_argument(
        "--auth",
        metavar="USERS.toml",
        help="accounts file (preflab user add); without it there is one local user "
        "and the app only listens on 127.0.0.1",
    )
    p.add_argument(
        "--session-idle",
        type=float,
        default=DEFAULT_IDLE_S / 60,
        metavar="MINUTES",
        help="with --auth: a session unused this long ends, and the next request asks to log in "
        "again (default: %(default)g)",
    )
    p.add_argument(
        "--user",
        default=None,
        help="without --auth: the name votes are recorded under; None means your login name",
    )
    p.add_argument(
        "--overlap", type=int, default=1, metavar="K", help="each pair goes to K different annotators"
    )
    p.add_argument(
        "--guidelines",
        default=str(GUIDELINES),
        metavar="FILE",
        help="annotator guidelines (Markdown), one click away on the page",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="ADDR",
        help="a reverse proxy (address or network, e.g. 10.0.0.7 or 10.0.0.0/24) whose "
        "X-Forwarded-For names the real client: logins are throttled per client address, and "
        "behind an untrusted proxy every client shares the proxy's. Repeat for several; "
        "'none' trusts no one. Default: 127.0.0.1 and ::1 (a proxy on this machine)",
    )
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    gen = p.add_argument_group("generation (with --model)")
    gen.add_argument("--rounds", type=int, default=1, help="pairs per prompt (each round samples anew)")
    gen.add_argument("--batch-size", type=int, default=4, help="prompts generated per batch")
    gen.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest answer, in tokens; cut answers are marked as such (default: "
        "128 where the model runs on the CPU, so that answers come about as fast as people read them, "
        "else 256)",
    )
    gen.add_argument(
        "--pregenerated",
        metavar="FILE",
        default=None,
        help="pairs made by `preflab generate` to serve first, as if generated here; only those with "
        "this server's models, prompts and sampling settings are used. Default: the shipped "
        "trainer/data/demo-pairs.jsonl with the shipped prompt pool; 'none': no head start",
    )
    gen.add_argument(
        "--newcomer-share",
        type=float,
        default=0.5,
        metavar="F",
        help="share of the pairs generated for a model that joins the arena (Add to arena, or restored "
        "at start) while the base rounds are still going; its pairs are handed out first",
    )
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    gen.add_argument(
        "--seed", type=int, default=0, help="seeds of the samples and of the arena's model draws"
    )
    gen.add_argument("--device", default="auto", help="cpu, cuda, ...; auto = cuda if available")
    gen.add_argument("--cache-dir", default=None, help="where converted models are kept")
    smp = p.add_argument_group("which pair goes out next (annotate/sampling.py)")
    smp.add_argument(
        "--sampling",
        choices=("random", "uncertain"),
        default="random",
        help="random: no reward model, pairs go out as they come; uncertain: prefer pairs whose "
        "reward-model score gap is smallest, mixed with uniformly random ones",
    )
    smp.add_argument(
        "--reward-model",
        metavar="RUN",
        default=None,
        help="a finished reward run (runs/<id>) that scores the pairs for --sampling uncertain",
    )
    smp.add_argument(
        "--uncertain-mix",
        type=float,
        default=None,
        metavar="F",
        help="share of handouts drawn uniformly at random with --sampling uncertain (0.5 if not given); "
        "each vote records how its pair was chosen in gen_params['selection']",
    )
    gold.add_arguments(p)
    rubric.add_arguments(p)
    add_chat_arguments(p)


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    """`serve --chat` (annotate/chat.py): annotators chat with two anonymous models."""
    chat = p.add_argument_group("chat mode (--chat)")
    chat.add_argument(
        "--chat",
        action="store_true",
        help="chat mode: annotators write their own messages (or take one from --prompts), two anonymous "
        "models of the --model list (two or more: in-process names or --endpoints names) answer side by "
        "side as they stream, follow-ups go to both, and a vote at any turn stores both conversations. "
        "--pairs may be given too, for the Annotate tab; no pairs are generated from the models",
    )
    chat.add_argument(
        "--chat-max-chars",
        type=int,
        default=chat_filter.DEFAULT_MAX_CHARS,
        metavar="N",
        help="longest message an annotator may send, in characters; a longer one is refused and nothing "
        "is generated (default: %(default)s)",
    )
    chat.add_argument(
        "--chat-blocklist",
        metavar="FILE",
        default=None,
        help="words or phrases (one a line, # comments) a message may not contain: matched on whole "
        "words, case-insensitive; such a message is refused and nothing is generated",
    )
    chat.add_argument(
        "--chat-max-turns",
        type=int,
        default=chat_filter.DEFAULT_MAX_TURNS,
        metavar="N",
        help="user messages per conversation at most; then the annotator votes (default: %(default)s)",
    )
    chat.add_argument(
        "--chat-idle",
        type=float,
        default=chat_filter.DEFAULT_IDLE_S / 60,
        metavar="MINUTES",
        help="a conversation untouched this long is forgotten (so memory stays bounded); "
        "the annotator starts a new one (default: %(default)g)",
    )
    chat.add_argument(
        "--chat-concurrency",
        type=int,
        default=4,
        metavar="N",
        help="answers an in-process model writes at once; more wait for a free slot "
        "(an endpoint's limit is its `concurrency` in --endpoints; default: %(default)s)",
    )
