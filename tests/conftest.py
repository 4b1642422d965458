"""Shared fixtures of the test suite: a real PostgreSQL, a headless Chromium.

    def test_x(pg_url): ...       # a fresh empty database on a throwaway server
    def test_y(browser): ...      # playwright's Chromium; log in with helpers.login
    def test_z(model_server, failing): ...   # endpoints: serve-model tiny; a server of failure modes
    def test_j(judge_server): ...  # a chat-completions server answering judging prompts by rule
    def test_p(policy_world): ...  # (reward run, word policy, prompt pool) of the policy learning tests

Plain helpers (the CLI runner, record builder, store writer, server, ...) are in
tests/helpers.py, imported as a module: `from helpers import ...`.
"""

import os
import uuid

import pytest

# Nothing in the tests may wait on a network that is not there.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---- a real, throwaway PostgreSQL for the store's tests --------------------------------


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL cluster for the session (initdb + pg_ctl from Debian's package, on
    a free port of 127.0.0.1, fsync on), stopped at the end. `.url(dbname)`, `.stop()`
    and `.start()` (restart tests: start it again before you finish)."""
    from trainer.store.pg_testserver import PostgresMissing, ThrowawayPostgres

    try:
        server = ThrowawayPostgres()
    except PostgresMissing as e:
        pytest.fail(str(e), pytrace=False)  # never a silent skip: `make test` installs it
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(postgres_server):
    """A fresh empty database on the session's server, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    if not postgres_server.running:  # a restart test that failed half-way
        postgres_server.start()
    url = postgres_server.create_database(name)
    yield url
    if postgres_server.running:
        postgres_server.drop_database(name)


# ---- a headless Chromium for the browser tests -----------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Chromium (/usr/bin/chromium) driven by playwright, one per test module; the browser
    test modules skip themselves where it is missing."""
    from helpers import CHROMIUM, CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


# ---- servers for the endpoint tests (tests/test_endpoint*.py) ---------------------------


@pytest.fixture(scope="session")
def model_server(tmp_path_factory):
    """`preflab serve-model tiny` (16 new tokens, 2 slots) that wants helpers.EP_KEY,
    read from PREFLAB_EP_KEY; one for the session."""
    from helpers import EP_KEY, EndpointModelServer

    tmp = tmp_path_factory.mktemp("endpoint-server")
    args = ("--max-new-tokens", "16", "--concurrency", "2", "--api-key-env", "PREFLAB_EP_KEY")
    with EndpointModelServer(tmp, *args, env={"PREFLAB_EP_KEY": EP_KEY}) as server:
        yield server


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server on the shipped SmolLM2 GGUF (helpers.LlamaCppServer),
    one for the session."""
    from helpers import LlamaCppServer

    pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server]: scripts/llama-cpp.sh")
    with LlamaCppServer(tmp_path_factory.mktemp("llama-cpp")) as server:
        yield server


@pytest.fixture(scope="session")
def failing():
    """helpers.FailingServer, one for the session: its counters add up across tests, so a
    test compares them with what they were when it began."""
    from helpers import FailingServer

    server = FailingServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def judge_server():
    """helpers.ScriptedJudgeServer: a real OpenAI-compatible server whose judging answers
    follow a rule (the model is the test double, the judge's logic is what is tested)."""
    from helpers import ScriptedJudgeServer

    server = ScriptedJudgeServer()
    yield server
    server.close()


# ---- the world of the policy learning tests ---------------------------------------------


@pytest.fixture(scope="session")
def policy_world(tmp_path_factory):
    """(reward run dir, policy dir, prompt pool), fitted and built once: simulated annotators
    with a hidden rule (they prefer answers that say "banana") and a tiny reward model
    fitted to their votes with trainer.reward; a tiny policy that answers in words
    (helpers.word_policy), which RL has to teach that banana pays."""
    import torch
    from helpers import hidden_rule_world

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return hidden_rule_world(tmp_path_factory.mktemp("policy-world"))
    finally:
        torch.set_num_threads(threads)
