"""`preflab serve-model MODEL`: an OpenAI-compatible chat-completions server over one
in-process model, to chat with a trained policy from any OpenAI client, or to give
preflab's own endpoint code a real server to talk to.

    preflab serve-model runs/<id>/policy --name policy --port 8000
    # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(
    #           model="policy", messages=[{"role": "user", "content": "Hi"}])

The subset of the protocol that clients use: `GET /v1/models`, `GET /v1/models/{id}`,
`POST /v1/chat/completions` (model, messages, max_tokens / max_completion_tokens,
temperature, top_p, seed, stop, n=1, stream with stream_options.include_usage), answers
with usage and finish_reason `stop` / `length`, and errors in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`. Generation runs in one decode thread
that batches the answers in progress (annotate/model_engine.py, annotate/batch_decode.py),
never on the event loop; a streaming client that goes away ends its generation at the
next token.

Concurrency: at most --concurrency answers in the batch at once (a new request joins it
at the next token); one more is answered at once with 503 and `Retry-After`, not queued.
The official clients retry a 503 by themselves (honouring Retry-After, with backoff), and
a queue in here would only hold connections past their clients' timeouts while hiding the
overload from them.

Security: loopback only unless --api-key-env names a key (then every request needs
`Authorization: Bearer KEY`); without a key the Host header must name this machine (a
DNS-rebinding page gets 400) and a request must be `Content-Type: application/json` (a
cross-site form cannot send that without a CORS preflight, which this server never
allows). Nothing from the model directory is executed beyond what transformers loads
without trust_remote_code.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import random
import sys
import time
import uuid

from annotate.generate import add_load_arguments
from trainer.errors import PreflabError
from trainer.models import DEFAULT_MODEL, canonical_name
from trainer.rows import text_problem

log = logging.getLogger("preflab.serve_model")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 1 << 20  # bytes of one request
MAX_MESSAGES = 256
MAX_CONTENT = 64_000  # characters of one message
MAX_STOP = 4  # stop sequences, as OpenAI allows
ROLES = {"system", "developer", "user", "assistant"}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help=f"the model to serve, as --model takes it elsewhere: a model directory "
        f"(runs/<id>/policy), a Hugging Face id in the local cache, 'smollm2' (the built-in "
        f"{DEFAULT_MODEL}) or 'tiny' (random, for tests)",
    )
    p.add_argument(
        "--name",
        default=None,
        help="the model id clients ask for (the `model` field; /v1/models lists it). Default: MODEL as given",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; anything but loopback needs --api-key-env",
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="the name of an environment variable holding the API key every request must send "
        "as `Authorization: Bearer KEY` (the key itself never goes on the command line). "
        "Without it: no key is asked for and the server listens on loopback only",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=512,
        metavar="N",
        help="the most tokens one answer may have; a request's max_tokens above it is lowered "
        "to it (the answer then ends with finish_reason 'length'), and it is the default",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=8,
        metavar="N",
        help="answers generated at once, batched (the largest batch; default: %(default)s); one more request gets 503 "
        "with Retry-After (clients retry). Each request samples from its own seeded generator, "
        "so a seed repeats an answer whatever else is batched (up to the batch's float rounding)",
    )
    add_load_arguments(p)  # --device, --cache-dir: as `preflab generate` takes them


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers or {}

    def response(self):
        from starlette.responses import JSONResponse

        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind} from {low} to {high}, got {value!r}", param=name)
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content"
                )
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
    problem = text_problem(content)
    if problem:
        raise ApiError(400, f"messages[{i}].content: {problem}", param=f"messages[{i}].content")
    if len(content) > MAX_CONTENT:
        raise ApiError(
            400, f"messages[{i}].content is longer than {MAX_CONTENT} characters", f"messages[{i}].content"
        )
    return content


def _top_p(body: dict) -> float:
    value = _number(body, "top_p", 1.0, 0, 1)
    if value == 0:
        raise ApiError(
            400, "'top_p' must be above 0 (for the likeliest token alone, use temperature 0)", "top_p"
        )
    return value


def parse_request(body, max_new_tokens: int) -> dict:
    """The checked settings of one chat-completions request; ApiError(400) naming the
    field at fault. Unknown fields are ignored, as OpenAI-compatible servers do."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise ApiError(400, "'model' is required (a string)", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' may hold at most {MAX_MESSAGES} messages", param="messages")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(
                400, f"messages[{i}].role must be one of {sorted(ROLES)}", param=f"messages[{i}].role"
            )
        role = "system" if m["role"] == "developer" else m["role"]
        chat.append({"role": role, "content": _content(m, i)})
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise ApiError(
            400, f"'n' must be 1: this server writes one answer per request, got {body['n']!r}", "n"
        )
    given = body.get("max_completion_tokens") is not None
    param = "max_completion_tokens" if given else "max_tokens"
    asked = body.get(param)
    limit = _number({param: asked}, param, max_new_tokens, 1, 2**31 - 1, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP
        or not all(isinstance(s, str) and s and not text_problem(s) for s in stop)
    ):
        raise ApiError(
            400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings", "stop"
        )
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return dict(
        model=body["model"],
        messages=chat,
        n=1,
        max_tokens=min(limit, max_new_tokens),
        max_tokens_given=asked is not None,
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_top_p(body),
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        stop=stop,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


async def _read_body(request) -> object:
    size = request.headers.get("content-length", "0")
    if size.isdigit() and int(size) > MAX_BODY:
        raise ApiError(413, f"request body larger than {MAX_BODY} bytes", code="request_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise ApiError(413, f"request body larger than {MAX_BODY} bytes", code="request_too_large")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None


def build_app(engine, name: str, api_key: str | None):
    """The Starlette app: routes, the key check, and (without a key) the Host check."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from annotate.model_engine import Busy

    created = int(time.time())
    card = {"id": name, "object": "model", "created": created, "owned_by": "preflab"}

    def check(request) -> None:
        if api_key is None:
            host = request.headers.get("host", "")
            host = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
            if host.lower() not in LOOPBACK:
                raise ApiError(400, "this server answers only requests addressed to 127.0.0.1 or localhost")
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "invalid or missing API key", code="invalid_api_key")

    def handled(handler):
        async def endpoint(request):
            try:
                check(request)
                return await handler(request)
            except ApiError as e:
                return e.response()
            except Exception as e:  # a bug or a model that fails: still OpenAI's shape, logged
                log.exception("request failed")
                return ApiError(500, f"internal error: {type(e).__name__}", kind="server_error").response()

        return endpoint

    async def models(request):
        return JSONResponse({"object": "list", "data": [card]})

    async def model(request):
        if request.path_params["model"] != name:
            raise ApiError(
                404, f"the model {request.path_params['model']!r} does not exist", "model", "model_not_found"
            )
        return JSONResponse(card)

    async def chat(request):
        if (
            api_key is None
            and request.headers.get("content-type", "").split(";")[0].strip() != "application/json"
        ):
            raise ApiError(400, "Content-Type must be application/json")
        req = parse_request(await _read_body(request), engine.max_new_tokens)
        if req["model"] != name:
            raise ApiError(
                404,
                f"the model {req['model']!r} does not exist; this server has {name!r}",
                "model",
                "model_not_found",
            )
        ids = await asyncio.to_thread(engine.prompt_ids, req["messages"])
        if engine.context and not req["max_tokens_given"]:  # the default: whatever room is left
            req["max_tokens"] = max(1, min(req["max_tokens"], engine.context - len(ids)))
        if engine.context and len(ids) + req["max_tokens"] > engine.context:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens; with max_tokens {req['max_tokens']} that is "
                f"more than the model's {engine.context}",
                "messages",
                "context_length_exceeded",
            )
        seed = req["seed"] % 2**63 if req["seed"] is not None else random.getrandbits(63)
        try:
            job = engine.start(
                ids,
                max_tokens=req["max_tokens"],
                temperature=req["temperature"],
                top_p=req["top_p"],
                seed=seed,
                stop=req["stop"],
            )
        except Busy:
            raise ApiError(
                503,
                "the server is busy: every generation slot is taken; retry",
                kind="server_error",
                code="busy",
                headers={"Retry-After": "1"},
            ) from None
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": name,
            "system_fingerprint": "preflab",
        }
        pieces = job.pieces()
        if not req["stream"]:
            try:
                text = await _whole_answer(request, job, pieces)
            except Exception as e:
                log.exception("generation failed")
                raise ApiError(500, f"generation failed: {type(e).__name__}", kind="server_error") from None
            finally:
                job.cancel()
            return JSONResponse(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": None,
                            "finish_reason": job.finish_reason,
                        }
                    ],
                    "usage": _usage(job),
                }
            )
        return StreamingResponse(
            _events(job, pieces, base, req["include_usage"]),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def no_route(request, exc):  # unknown paths and methods, in OpenAI's shape too
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()

    return Starlette(
        exception_handlers={404: no_route, 405: no_route},
        routes=[
            Route("/v1/models", handled(models), methods=["GET"]),
            Route("/v1/models/{model:path}", handled(model), methods=["GET"]),
            Route("/v1/chat/completions", handled(chat), methods=["POST"]),
        ],
    )


async def _whole_answer(request, job, pieces) -> str:
    """The whole answer, joined in a worker thread; a client that hangs up meanwhile (its
    timeout) ends the generation, so it does not hold a slot for nobody."""
    task = asyncio.ensure_future(asyncio.to_thread(lambda: "".join(pieces)))
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            job.cancel()


def _usage(job) -> dict:
    total = job.prompt_tokens + job.completion_tokens
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "total_tokens": total,
    }


_END = object()


async def _events(job, pieces, base: dict, include_usage: bool):
    """SSE lines: the role, one chunk per piece of text, the finish reason, usage if asked
    for, then [DONE]. However it ends (the client gone: the task is cancelled here), the
    generation is told to stop."""

    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {
            **base,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (piece := await asyncio.to_thread(next, pieces, _END)) is not _END:
            yield chunk({"content": piece})
        yield chunk({}, job.finish_reason)
        if include_usage:
            last = {**base, "object": "chat.completion.chunk", "choices": [], "usage": _usage(job)}
            yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:  # the stream has begun: the status is sent, say it in the stream
        log.exception("generation failed")
        error = {
            "error": {
                "message": f"generation failed: {type(e).__name__}",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
        yield f"data: {json.dumps(error)}\n\n"
    finally:
        job.cancel()


def run(args: argparse.Namespace) -> int:
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise PreflabError(
                f"--api-key-env {args.api_key_env}: that environment variable is not set or empty"
            )
    elif args.host not in LOOPBACK:
        raise PreflabError(
            f"refusing to listen on {args.host} without an API key: anyone who can reach it could use "
            f"the model. Put a key in an environment variable and pass --api-key-env VAR, or listen "
            f"on 127.0.0.1 (the default)."
        )
    import uvicorn

    from annotate.model_engine import Engine
    from annotate.model_loading import announce_conversion, load_announced, quiet_transformers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_transformers()
    announce_conversion(args.model, args.cache_dir)
    model, tokenizer = load_announced(args.model, device=args.device, cache_dir=args.cache_dir)
    engine = Engine(model, tokenizer, max_new_tokens=args.max_new_tokens, concurrency=args.concurrency)
    name = args.name or canonical_name(args.model)
    app = build_app(engine, name, api_key)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"serving {name} at http://{shown}:{args.port}/v1", flush=True)
    try:
        server.run()
    finally:
        engine.closing.set()  # any generation still running ends at its next token
    sys.stdout.flush()
    return 0
