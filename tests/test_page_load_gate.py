"""annotate/web/page_load_gate.py: page loads in single file, everything else untouched."""

import asyncio
import json

from annotate.web.page_load_gate import PageLoadGate


def test_page_loads_run_at_most_at_once_and_votes_pass_by():
    loading, most, order = 0, 0, []

    async def app(scope, receive, send):  # stands in for gradio: each request takes a while
        nonlocal loading, most
        page_load = scope["method"] == "GET"
        loading += page_load
        most = max(most, loading)
        order.append(scope["path"])
        await asyncio.sleep(0.05)
        loading -= page_load

    gate = PageLoadGate(app, at_once=1)

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def request(path, method="GET"):
        await gate({"type": "http", "method": method, "path": path}, receive, None)

    async def storm():
        loads = [request(p) for _ in range(3) for p in ("/", "/config", "/config/", "/gradio_api/info")]
        vote = request("/gradio_api/queue/join", "POST")
        await asyncio.gather(*loads, vote)

    asyncio.run(storm())
    assert most == 1  # never two page loads at once
    # the vote did not queue behind the twelve page loads
    assert order.index("/gradio_api/queue/join") <= 1
    assert len(order) == 13


def _gate_of(app) -> PageLoadGate:
    layer = app.middleware_stack
    while not isinstance(layer, PageLoadGate):
        layer = layer.app
    return layer


def _join(url: str, fn_index: int, session: str) -> list:
    """One event as the page sends it: queue/join, then its result from the event stream."""
    import httpx

    with httpx.Client(base_url=url, timeout=20) as http:
        body = {"data": [None], "fn_index": fn_index, "session_hash": session}  # the gr.State input
        r = http.post("/gradio_api/queue/join", json=body)
        assert r.status_code == 200, r.text
        with http.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as stream:
            for line in stream.iter_lines():
                msg = json.loads(line[5:]) if line.startswith("data:") else {}
                if msg.get("msg") == "process_completed":
                    assert msg["success"], msg
                    return msg["output"]["data"]
    raise AssertionError("no result")


def test_a_new_session_is_built_by_the_gate_and_never_replaced_later():
    """With real gradio: the first event of a new session finds the session the gate
    built off the event loop; a session's state (a click counter in gr.State) survives
    its later events, so the gate never swaps in a fresh session."""
    import gradio as gr
    from starlette.middleware import Middleware

    with gr.Blocks() as demo:
        count = gr.State(0)
        shown = gr.Number()
        button = gr.Button()
        button.click(lambda n: (n + 1, n + 1), count, [count, shown], api_name="click")
    demo.queue()
    app, url, _ = demo.launch(
        server_name="127.0.0.1",
        prevent_thread_lock=True,
        quiet=True,
        app_kwargs={"middleware": [Middleware(PageLoadGate, at_once=1)]},
    )
    try:
        fn = next(d["id"] for d in demo.config["dependencies"] if d.get("api_name") == "click")
        assert [_join(url, fn, "s1")[1] for _ in range(3)] == [1, 2, 3]
        assert _join(url, fn, "s2")[1] == 1  # another page: its own session
        gate = _gate_of(app)
        assert gate.sessions_built == 2
        assert {"s1", "s2"} <= set(app.state_holder.session_data)
    finally:
        demo.close()


def test_a_copied_session_is_what_gradios_constructor_builds_and_is_its_own():
    import gradio as gr
    from gradio.state_holder import SessionState

    from annotate.web.page_load_gate import SessionMaker

    with gr.Blocks() as demo:
        with gr.Tab("one"):
            text = gr.Textbox("hello", label="a")
            gr.Number(3)
            gr.Dataframe([[1, 2]], headers=["x", "y"])
        with gr.Tab("two"):
            gr.HTML("<b>hi</b>")
            gr.State({"k": [1]})
    maker = SessionMaker(demo)
    assert maker.copying  # this gradio's sessions hold what SessionMaker was written for
    made, built = maker.new(), SessionState(demo)
    assert set(vars(made)) == set(vars(built))
    assert made.config_values == built.config_values and made.state_data == built.state_data == {}
    assert made.blocks_config.blocks.keys() == built.blocks_config.blocks.keys()
    other = maker.new()
    other.config_values[text._id]["props"]["value"] = "changed in one session"
    assert made.config_values[text._id]["props"]["value"] == "hello"  # each session has its own
    assert maker.new().config_values[text._id]["props"]["value"] == "hello"
