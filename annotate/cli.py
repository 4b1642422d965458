"""`preflab` command line: one subcommand per module.

Each module named in COMMANDS exposes `add_arguments(parser)` and `run(args) -> int`
(or `add_<command>_arguments` / `run_<command>` where one module serves several),
raises `trainer.errors.PreflabError` for what the user can fix (reported here, once:
`error: <message>`, exit 2), and keeps heavy imports (torch, transformers, gradio)
inside its functions so that `preflab --help` answers instantly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from trainer.config import HelpFormatter  # light: dataclasses and argparse

# subcommand -> (module, one-line help). Order is the order `--help` lists them in.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("annotate.generate", "sample candidate answer pairs from a model for a prompt pool"),
    "model": (
        "annotate.generate",
        "load a model once (converting the default GGUF to a cache) and report load times",
    ),
    "prompts": ("trainer.prompts", "check a prompt pool file and report what would be loaded"),
    "import": ("annotate.importers", "import TRL / Anthropic-HH preference data as votes"),
    "serve": ("annotate.serve", "open the annotation app: rank pairs of answers in the browser"),
    "serve-model": (
        "annotate.serve_model",
        "serve one model over the OpenAI chat-completions API (streaming), e.g. to chat with a trained policy",
    ),
    "export": ("annotate.export_command", "export votes as a TRL / datasets preference dataset"),
    "train-reward": (
        "trainer.reward",
        "fit a Bradley-Terry reward model to the votes (or a TRL preference file)",
    ),
    "train-policy": (
        "trainer.policy",
        "fine-tune the policy against a reward model (PPO, RLOO, REINFORCE, GRPO, Dr. GRPO, REINFORCE++)",
    ),
    "train-dpo": (
        "trainer.dpo",
        "fine-tune the policy on the votes directly with DPO / IPO (no reward model), against a frozen reference",
    ),
    "eval-reward": (
        "trainer.reward_eval",
        "a reward model's accuracy on a preference file: per subset, RewardBench sections, best-of-N, "
        "length bias, calibration",
    ),
    "eval-policy": (
        "trainer.evaluate",
        "reward-model win rate of a trained policy over its reference, on held-out prompts",
    ),
    "compact": ("annotate.store_commands", "merge small part files of a comparison store"),
    "info": ("annotate.store_commands", "summarise a comparison store: events, votes, files"),
    "copy": (
        "trainer.store.copy",
        "copy every event between two stores (directory or PostgreSQL), exactly; reruns skip what is there",
    ),
    "leaderboard": (
        "annotate.leaderboard",
        "rank models by Bradley-Terry ratings from the votes, with bootstrap confidence intervals",
    ),
    "annotators": (
        "annotate.annotators_command",
        "which votes to trust: per-annotator gold accuracy, agreement, Dawid-Skene competence, pace, flags",
    ),
    "judge": (
        "annotate.judge",
        "a model votes on pairs as annotator judge:<name> (AI feedback), each pair in both orders",
    ),
    "user": ("annotate.users", "manage annotator and admin accounts in a users.toml"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preflab",
        description="preflab: rank model answers, fit a reward model, fine-tune the policy.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        add = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
        run = getattr(module, f"run_{name}", None) or module.run
        doc = COMMANDS[name][1]
        p = sub.add_parser(name, help=doc, description=doc, formatter_class=HelpFormatter)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Never let a library wait on a network that is not there.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    from trainer.errors import exit_code

    try:
        # The one place a problem the user can fix (a flag, a file, a run; a store that
        # is missing, unreadable, full, a database down, a second server) becomes what
        # they read: one line, no traceback, exit code 2.
        code = exit_code(args._run, args)
        sys.stdout.flush()  # inside the try: a reader that went away is handled below
        return code
    except BrokenPipeError:
        # `preflab info | head`: the reader has what it wanted. Quietly, like any Unix tool
        # killed by SIGPIPE (128 + 13), and with stdout on /dev/null so that Python's own
        # flush at exit does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
