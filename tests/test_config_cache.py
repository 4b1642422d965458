"""annotate/web/config_cache.py: gradio's /config built once per address, then served from
memory with each caller's username, the same JSON gradio itself would answer."""

import httpx
import orjson
from helpers import Server, add_users, write_pairs

from annotate.web.config_cache import ConfigCache


def _cache_of(app) -> ConfigCache:
    layer = app.middleware_stack
    while not isinstance(layer, ConfigCache):
        layer = layer.app
    return layer


def test_later_answers_come_from_memory_and_equal_gradios_own():
    import gradio as gr
    from starlette.middleware import Middleware

    with gr.Blocks() as demo:
        gr.Textbox("hello")
        gr.Button("go")
    demo.queue()
    app, url, _ = demo.launch(
        server_name="127.0.0.1",
        prevent_thread_lock=True,
        quiet=True,
        app_kwargs={"middleware": [Middleware(ConfigCache, accounts=False)]},
    )
    try:
        first, second = (httpx.get(url + "config", timeout=20) for _ in range(2))
        own = httpx.get(url + "config?_=1", timeout=20)  # a query string: gradio answers itself
        other_name = httpx.get(url.replace("127.0.0.1", "localhost") + "config", timeout=20)
        assert first.status_code == second.status_code == own.status_code == 200
        assert second.headers["content-type"].startswith("application/json")
        assert orjson.loads(second.content) == orjson.loads(own.content) == orjson.loads(first.content)
        # Another address is another root URL: its own entry, its own URLs.
        assert orjson.loads(other_name.content)["root"].startswith("http://localhost:")
        assert orjson.loads(second.content)["root"].startswith("http://127.0.0.1:")
        assert _cache_of(app).served == 1  # the second one; the first of each address was gradio's
    finally:
        demo.close()


def test_with_accounts_each_caller_gets_their_own_username_and_nobody_gets_in(tmp_path):
    passwords = add_users(tmp_path / "users.toml", ann="annotator", ben="admin")
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    args = ("--pairs", pairs, "--data", tmp_path / "store", "--auth", tmp_path / "users.toml")
    with Server(tmp_path, *map(str, args)) as server:
        assert httpx.get(server.url + "config", timeout=20).status_code == 401  # no session
        answers = {}
        for name in ("ann", "ben", "ann"):
            with httpx.Client(base_url=server.url, timeout=30) as http:
                login = http.post("login", data={"username": name, "password": passwords[name]})
                assert login.status_code == 200
                cached = http.get("config")
                own = http.get("config?_=1")
                assert orjson.loads(cached.content) == orjson.loads(own.content)
                answers[name] = orjson.loads(cached.content)
        assert answers["ann"]["username"] == "ann" and answers["ben"]["username"] == "ben"
