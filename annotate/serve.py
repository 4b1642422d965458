"""`preflab serve`: the annotation app, where people rank pairs of model answers; and
the one place that builds what a running server is made of (the composition root).

    preflab serve --pairs pairs.jsonl                     # pre-generated candidates
    preflab serve --model smollm2                         # two samples of one model
    preflab serve --model smollm2 --model ./my-sft        # arena: random pair of models
    preflab serve --pairs pairs.jsonl --auth users.toml --overlap 2 --host 0.0.0.0
    preflab serve --chat --model smollm2 --model ep-big --endpoints api_endpoints.json   # chat mode

`run` checks the flags, then builds the store, the assignment queue, the generator
(with --model), the chat (with --chat: annotate/chat.py), the accounts (with --auth),
the sampler (--sampling uncertain), the Review tab's reviewer and the Train tab's launcher into one
`annotate.context.ServeContext`, builds the page from it (annotate/web/page.py) and
serves until SIGTERM or Ctrl-C. Nothing else constructs these objects. Problems the
user can fix are raised as `ServeError` (a PreflabError: `error: ...`, exit 2, from
annotate/cli.py); what the server has to say goes through `logging`, except the
`open URL` line on stdout.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import logging
import os
import signal
import threading
from pathlib import Path

from annotate import gold, rubric
from annotate.serve_args import add_arguments  # noqa: F401 (the command's flags, for annotate/cli.py)
from trainer import endpoints
from trainer.errors import PreflabError

log = logging.getLogger("preflab.serve")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServeError(PreflabError):
    """`preflab serve` cannot start: a flag, a file or the port; the message says which."""


def check_flags(args: argparse.Namespace) -> None:
    """The flags that are wrong on their own, before anything is opened."""
    if args.chat:
        if len(set(args.model or ())) < 2:
            raise ServeError(
                "--chat needs two or more different models: --model A --model B "
                "(in-process models or names from --endpoints)"
            )
    elif bool(args.pairs) == bool(args.model):
        raise ServeError("give either --pairs FILE or --model M (repeat --model for an arena)")
    if not args.auth and args.host not in LOCAL_HOSTS:
        raise ServeError(
            f"refusing to listen on {args.host} without --auth: anyone who can reach this "
            f"machine could vote, read the votes and export them. Create accounts with "
            f"`preflab user add NAME --role annotator --auth users.toml` and pass --auth users.toml, "
            f"or listen on 127.0.0.1 (the default)."
        )
    from annotate.web.server_guards import trusted_proxies

    trusted_proxies(args.trusted_proxy)  # a bad address is refused before anything starts
    if not args.session_idle > 0:
        raise ServeError(f"--session-idle must be a positive number of minutes, got {args.session_idle}")
    for flag, value in (
        ("--overlap", args.overlap),
        ("--rounds", args.rounds),
        ("--batch-size", args.batch_size),
        ("--max-new-tokens", args.max_new_tokens),
        ("--chat-max-chars", args.chat_max_chars),
        ("--chat-max-turns", args.chat_max_turns),
        ("--chat-concurrency", args.chat_concurrency),
    ):
        if value is not None and value < 1:
            raise ServeError(f"{flag} must be at least 1, got {value}")
    if not args.chat_idle > 0:
        raise ServeError(f"--chat-idle must be a positive number of minutes, got {args.chat_idle}")
    if not 0.0 <= args.newcomer_share <= 1.0:
        raise ServeError(f"--newcomer-share must be between 0 and 1, got {args.newcomer_share}")
    gold.check_arguments(args)  # GoldError, a PreflabError like ServeError
    if args.suggest is not None:
        from annotate.suggestions import check_judge

        check_judge(args.suggest)  # SuggestError: before anything is opened


def check_port(host: str, port: int) -> None:
    """ServeError now, before the store is opened or a model loaded, when another
    process already listens on host:port."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn picks it
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as e:
            # Only "in use" is certain to stop gradio too; anything else (a privileged port,
            # an odd address) is left for the launch to report, after the store's own checks.
            if e.errno == errno.EADDRINUSE:
                raise ServeError(f"cannot listen on {host}:{port} (in use); try another --port") from None


def _accounts_and_guidelines(args: argparse.Namespace):
    from annotate.accounts import Accounts

    accounts = None
    if args.auth:
        try:
            accounts = Accounts(args.auth)
        except (OSError, ValueError) as e:
            raise ServeError(str(e)) from None
    guidelines = ""
    if args.guidelines:
        try:
            guidelines = Path(args.guidelines).read_text(encoding="utf-8")
        except OSError as e:
            raise ServeError(f"{args.guidelines}: cannot read the guidelines ({e.strerror or e})") from None
    return accounts, guidelines


class _Opened:
    """What `run` has to close again: the endpoints' clients, the store, then the serve lock."""

    def __init__(self):
        self.store = None
        self.serve_lock = None
        self.private_dir = None
        self.endpoints = {}  # {name: EndpointModel}
        self.engines = []  # --chat's in-process models (annotate.model_engine.Engine)

    def close(self) -> None:
        from trainer.endpoint_client import close_all

        for engine in self.engines:
            engine.closing.set()  # an answer still being written ends at its next token
        close_all(self.endpoints)
        if self.store is not None:
            self.store.close()
        if self.serve_lock is not None:
            self.serve_lock.release()
        if self.private_dir is not None:
            import shutil

            shutil.rmtree(self.private_dir, ignore_errors=True)


def _open_store(args: argparse.Namespace, opened: _Opened):
    """(state_dir, standing votes or None, sync cursor). One store, one assignment: a
    directory store's assignment lives in this process, so a second server on it
    refuses to start (ServeLock); a database shares it."""
    from trainer.store import is_database, open_store, read_comparisons, store_exists, target_key

    # A StoreError here (a second server, a database away) is a PreflabError: the CLI reports it.
    if is_database(args.data):
        opened.store = open_store(args.data)
        state_dir = Path(args.runs) / "serve-state" / target_key(args.data)
        votes, cursor = opened.store.snapshot()  # one instant: sync goes on exactly from here
    else:
        from trainer.store.directory_writer import ServeLock

        opened.serve_lock = ServeLock(args.data, f"preflab serve on {args.host}:{args.port}")
        state_dir = Path(args.data)
        votes, cursor = read_comparisons(args.data) if store_exists(args.data) else None, None
    return state_dir, votes, cursor


def _fill_from_pairs_file(args: argparse.Namespace, queue) -> None:
    from annotate.pairs import PairsFileError, load_pairs

    try:
        pairs, problems = load_pairs(args.pairs)
    except PairsFileError as e:
        raise ServeError(str(e)) from None
    for problem in problems:
        log.warning("skipped %s", problem)
    queue.add(pairs)
    log.info("%s: %d pairs loaded, %d rows skipped", args.pairs, len(pairs), len(problems))


def _generator(args: argparse.Namespace, queue, state_dir: Path, votes, remote: dict):
    """The background generator of --model, with the arena restored and its cached
    pairs in the queue; `remote`: the --endpoints models by display name."""
    from annotate.arena import arena_name, restore_arena  # policies added from the Train tab earlier
    from annotate.pair_generator import Generator, default_max_new_tokens
    from annotate.pregenerated import head_start
    from trainer.models import ModelLoadError, check_model
    from trainer.prompts import PromptPoolError, load_prompt_pool

    try:
        pool = load_prompt_pool(args.prompts)
        # name votes record -> what loads it (runs/<id>/policy is recorded as <id>); an
        # endpoint's display name is recorded as it is
        sources = {}
        for m in args.model:
            sources.setdefault(m if m in remote else arena_name(m), m)
        names = list(sources)
        for name in set(names) - set(remote):  # a bad name fails now, not in the background thread
            check_model(sources[name], args.cache_dir)
    except (PromptPoolError, ModelLoadError) as e:
        raise ServeError(str(e)) from None
    log.info("%s", pool.report.summary())
    voted_prompts: dict[str, int] = {}
    if votes is not None and votes.num_rows:
        for row in votes.group_by("prompt_id").aggregate([("prompt_id", "count")]).to_pylist():
            voted_prompts[row["prompt_id"]] = row["prompt_id_count"]
    if args.max_new_tokens is None:
        args.max_new_tokens = default_max_new_tokens(args.device)
        log.info(
            "answers up to %d tokens (the default here; --max-new-tokens to change)", args.max_new_tokens
        )
    generator = Generator(
        names,
        pool.prompts,
        queue,
        cache_dir=state_dir / "pairs",
        voted_prompts=voted_prompts,
        rounds=args.rounds,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
        model_cache_dir=args.cache_dir,
        newcomer_share=args.newcomer_share,
        sources=sources,
        endpoints={name: remote[name] for name in names if name in remote},
    )
    for note in restore_arena(generator, state_dir):
        log.info("%s", note)
    queue.add(generator.load_cache())
    pairs, note = head_start(args.pregenerated, args.prompts, generator)  # rounds the cache left open
    if note:
        log.info("%s", note)
    queue.add(generator.adopt(pairs))
    queue.planned = generator.planned
    # Leave a core to the web server: generation would otherwise take every core
    # and make each click wait for a matrix multiply.
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    return generator


def _chat_models(args: argparse.Namespace, remote: dict, opened: _Opened) -> dict:
    """--chat's models by the name votes record: an endpoint as it is, an in-process
    model loaded here (as the generator loads one) behind its own Engine."""
    from annotate.arena import arena_name
    from annotate.chat_models import EndpointChat, InProcessChat
    from annotate.model_engine import Engine
    from trainer.models import ModelLoadError, check_model, load_model

    sources: dict[str, str] = {}
    for m in args.model:
        sources.setdefault(m if m in remote else arena_name(m), m)
    if len(sources) < 2:
        raise ServeError(f"--chat needs two different models; {', '.join(args.model)} are one model")
    try:
        for name, source in sources.items():  # a bad name fails before anything is loaded
            if name not in remote:
                check_model(source, args.cache_dir)
        models = {}
        for name, source in sources.items():
            if name in remote:
                models[name] = EndpointChat(remote[name])
                continue
            log.info("chat: loading %s", name)
            model, tokenizer = load_model(source, device=args.device, cache_dir=args.cache_dir)
            engine = Engine(
                model, tokenizer, max_new_tokens=args.max_new_tokens, concurrency=args.chat_concurrency
            )
            opened.engines.append(engine)
            models[name] = InProcessChat(engine)
    except ModelLoadError as e:
        raise ServeError(str(e)) from None
    if opened.engines:  # leave a core to the web server, as the generator does
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    return models


def _chat(args: argparse.Namespace, store, models: dict):
    """The ChatService of --chat: its models, limits and the prompt pool's texts."""
    from annotate.chat import ChatError, ChatService
    from annotate.chat_filter import BlocklistError, PromptFilter, load_blocklist
    from trainer.prompts import PromptPoolError, load_prompt_pool

    try:
        blocklist = load_blocklist(args.chat_blocklist) if args.chat_blocklist else []
        prompt_filter = PromptFilter(max_chars=args.chat_max_chars, blocklist=blocklist)
        pool = load_prompt_pool(args.prompts)
    except (BlocklistError, PromptPoolError) as e:
        raise ServeError(str(e)) from None
    # "Random prompt" fills the message box: a pool prompt that is one user message (a
    # system message aside) is that message's text
    texts = []
    for prompt in pool.prompts:
        users = [m["content"] for m in prompt.messages if m["role"] == "user"]
        if len(users) == 1 and len(users[0]) <= args.chat_max_chars:
            texts.append(users[0])
    try:
        return ChatService(
            store,
            models,
            prompts=texts,
            prompt_filter=prompt_filter,
            sampling={
                "temperature": args.temperature,
                "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens,
            },
            max_turns=args.chat_max_turns,
            idle_s=args.chat_idle * 60,
        )
    except ChatError as e:
        raise ServeError(str(e)) from None


def build_context(args: argparse.Namespace, opened: _Opened):
    """Every object of a running server, built once, in one ServeContext."""
    from annotate.annotator_review import AnnotatorReview
    from annotate.context import ServeContext
    from annotate.launcher import Launcher
    from annotate.queue import AssignmentQueue
    from annotate.review import Reviewer
    from annotate.sampling import make_sampler
    from annotate.service import Service
    from annotate.user_admin import UserAdmin
    from trainer.endpoint_client import connect
    from trainer.store import is_database, open_store

    # --sampling uncertain: checks the reward run now (SamplingError), loads no model yet.
    sampler = make_sampler(
        args.sampling, reward_run=args.reward_model, mix=args.uncertain_mix, device=args.device
    )
    accounts, guidelines = _accounts_and_guidelines(args)
    gold_items = gold.gold_items(args)  # a bad gold file stops us before the store is opened or created
    criteria = rubric.rubric_from_args(args)  # so does a bad rubric (RubricError)
    remote = opened.endpoints = connect(endpoints.load_endpoints(args.endpoints))  # and a bad endpoints file
    chat_models = None
    if args.chat:
        from annotate.pair_generator import default_max_new_tokens

        if args.max_new_tokens is None:
            args.max_new_tokens = default_max_new_tokens(args.device)
        chat_models = _chat_models(args, remote, opened)
    state_dir, votes, cursor = _open_store(args, opened)
    shared = is_database(args.data)
    queue = AssignmentQueue(overlap=args.overlap, shared=opened.store if shared else None)
    queue.gold = gold_items  # before any pair is added: gold items stay out of the pool
    generator = None
    if args.pairs:
        _fill_from_pairs_file(args, queue)
    elif not args.chat:  # chat mode's models chat; they make no pairs
        generator = _generator(args, queue, state_dir, votes, remote)
    if sampler is not None:  # scores the pool in the background; a generator's batches before they join it
        sampler.attach(queue, generator)
    if opened.store is None:
        opened.store = open_store(args.data)
    chat = _chat(args, opened.store, chat_models) if args.chat else None
    if votes is not None:
        queue.restore(votes, cursor=cursor)
        # Confirmed-flagged annotators' votes fill no K (annotate/queue_flags.py); a decision
        # after the snapshot comes again with sync, and the highest seq wins (a database's).
        from trainer.flags import read_flag_events

        queue.learn_flags(opened.store.flag_events() if shared else read_flag_events(args.data))
    suggestions = None
    if args.suggest:  # the judge's votes are read from the store now, and again as they come
        from annotate.suggestions import JudgeSuggestions

        suggestions = JudgeSuggestions(args.data, args.suggest)
        log.info("--suggest %s: its votes on %d pairs", args.suggest, suggestions.reload())
    service = Service(
        opened.store,
        queue,
        data=args.data,
        accounts=accounts,
        local_user=args.user or _login_name(),
        generator=generator,
        rubric=criteria,
        suggestions=suggestions,
    )
    scorer = getattr(sampler, "scorer", None)  # serve --reward-model may lie outside --runs
    reviewer = Reviewer(
        service.data,
        args.runs,
        queue,
        extra_runs=[scorer.run_dir] if scorer is not None else (),
        suggestions=suggestions,
    )
    launcher = Launcher(args.runs, store=service.data)
    review = AnnotatorReview(opened.store, service, args.flag_min_failed_gold, args.flag_below)
    return ServeContext(
        service=service,
        data=service.data,
        state_dir=state_dir,
        runs_dir=Path(args.runs),
        queue=queue,
        generator=generator,
        launcher=launcher,
        reviewer=reviewer,
        user_admin=UserAdmin(accounts) if accounts is not None else None,
        annotator_review=review,
        guidelines=guidelines,
        chat=chat,
    )


def run(args: argparse.Namespace) -> int:
    from annotate.web.page import build_app
    from annotate.web.server_guards import LOGIN_MESSAGE, private_files, request_guards
    from trainer.store import describe, is_database

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3"):  # a line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    check_flags(args)
    check_port(args.host, args.port)  # before anything is opened or created
    opened = _Opened()
    try:
        ctx = build_context(args, opened)
        private_app_kwargs = private_files(ctx, opened)
        demo, launch_kwargs = build_app(ctx)
    except BaseException:
        opened.close()
        raise
    accounts = ctx.service.accounts
    if ctx.generator is not None:
        ctx.generator.start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if is_database(args.data):  # fold in the other servers' votes every second or two
        from annotate.queue_shared import sync_forever

        threading.Thread(
            target=sync_forever, args=(ctx.queue, stop), daemon=True, name="preflab-sync"
        ).start()
    auth, app_kwargs, logins = request_guards(args, accounts, ctx.service.local_user)
    try:
        try:
            demo.launch(
                server_name=args.host,
                server_port=args.port,
                prevent_thread_lock=True,
                quiet=True,
                auth=auth,
                auth_message="preflab: " + LOGIN_MESSAGE.lower(),  # gradio's own form, if ever shown
                app_kwargs=app_kwargs | private_app_kwargs,
                **launch_kwargs,
            )
        except OSError:  # taken between check_port and now; gradio's own text is for developers
            raise ServeError(
                f"cannot listen on {args.host}:{args.port} (in use); try another --port"
            ) from None
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/"
        mode = (
            ("pairs from " + args.pairs)
            if args.pairs
            else ("arena of " + ", ".join(args.model) if len(args.model) > 1 else "model " + args.model[0])
        )
        if args.chat:
            mode = "chat between " + ", ".join(ctx.chat.models) + ("; " + mode if args.pairs else "")
        log.info(
            "preflab serve: %s; votes go to %s; %s",
            mode,
            describe(args.data),
            "accounts from " + args.auth if args.auth else "single local user " + ctx.service.local_user,
        )
        print(f"open {url}", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if ctx.generator is not None:
            ctx.generator.stop(wait_s=20)  # generation ends at its next token
        demo.close()
        if logins is not None:
            logins.close()
        opened.close()
    return 0


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "local"
