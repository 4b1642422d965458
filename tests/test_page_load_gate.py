"""annotate/web/page_load_gate.py: page loads in single file, everything else untouched."""

import asyncio

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

    async def request(path, method="GET"):
        await gate({"type": "http", "method": method, "path": path}, None, None)

    async def storm():
        loads = [request(p) for _ in range(3) for p in ("/", "/config", "/config/", "/gradio_api/info")]
        vote = request("/gradio_api/queue/join", "POST")
        await asyncio.gather(*loads, vote)

    asyncio.run(storm())
    assert most == 1  # never two page loads at once
    # the vote did not queue behind the twelve page loads
    assert order.index("/gradio_api/queue/join") <= 1
    assert len(order) == 13
