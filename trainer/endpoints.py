"""`--endpoints FILE`: models behind an OpenAI-compatible server (vLLM, SGLang, TGI,
`preflab serve-model`, OpenAI itself), named in FastChat's `api_endpoints.json` format,
so that a Chatbot Arena user's file works unchanged.

    {
      "llama-8b": {                                  the display name: what --model M takes
        "model_name": "meta-llama/Llama-3.1-8B-Instruct",   what the server calls it
        "api_type": "openai",                        the only type: the chat-completions API
        "api_base": "http://gpu-box:8000/v1",
        "api_key": "sk-...",                         a literal key, as FastChat has it; or
        "api_key_env": "VLLM_KEY",                   (preflab) the name of a variable holding it
        "anony_only": false,
        "recommended_config": {"temperature": 0.7, "top_p": 1.0}
      }
    }

    endpoints = load_endpoints("api_endpoints.json")   # {display name: Endpoint}; EndpointsError

Only JSON is read, never executed. The check is strict, so that a typo fails at start and
not as an hour of silently default settings: every error names the file, the entry and the
field. FastChat's own fields that preflab has no use for (`text-arena`, `vision-arena`)
are accepted and ignored; any other unknown field is an error. `anony_only` is accepted
(a boolean): every preflab pair is anonymous anyway. `recommended_config` (temperature,
top_p, max_new_tokens) overrides the command's sampling settings for that model, as in
FastChat; what was used is recorded per side in gen_params.

The key: `api_key` a literal (keep such a file private), or `api_key_env` naming an
environment variable, read once at load; never both. With neither, no key is sent (the
placeholder "EMPTY", as vLLM's docs use): unlike FastChat, preflab does not fall back to
$OPENAI_API_KEY (nor sends $OPENAI_ORG_ID or $OPENAI_PROJECT_ID), so a key is never sent
to a server its file did not name it for. A key, literal or from the variable, must be
printable ASCII without spaces or newlines (nothing is stripped). A key
never appears in a message, a log, a record or a repr.

preflab's own optional fields, per entry: `concurrency` (requests at once to this model,
default 4), `timeout` (seconds without a byte from the server, default 60), `max_retries`
(the openai client's retries of connection errors, 408, 409, 429 and 5xx, default 2).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from trainer.errors import PreflabError, missing_extra
from trainer.rows import text_problem

log = logging.getLogger("preflab.endpoints")

EXTRA = "endpoints"  # pyproject's install extra that brings the openai package
API_TYPES = ("openai",)
USED = (
    "model_name",
    "api_type",
    "api_base",
    "api_key",
    "api_key_env",
    "anony_only",
    "recommended_config",
    "concurrency",
    "timeout",
    "max_retries",
)
FASTCHAT_IGNORED = ("text-arena", "vision-arena")  # which FastChat tab lists the model
RECOMMENDED = ("temperature", "top_p", "max_new_tokens")
NO_KEY = "EMPTY"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
KEY_TEXT = re.compile(r"[!-~]*")  # what an Authorization header carries as it is
KEY_RULE = "printable ASCII without spaces or newlines"
MAX_NAME = 200


class EndpointsError(PreflabError):
    """An endpoints file that cannot be used; the message names the file, entry and field."""


HELP = (
    "a JSON file of models behind OpenAI-compatible servers (vLLM, `preflab serve-model`, ...) in "
    "FastChat's api_endpoints.json format: display name -> {model_name, api_base, api_type 'openai', "
    "api_key or api_key_env, anony_only, recommended_config}. Its display names can then be given "
    "wherever a model is named (--model; eval-policy's --reference); other names load in-process as before"
)


def add_argument(p) -> None:
    p.add_argument("--endpoints", default=None, metavar="FILE", help=HELP + "%(default).0s")


@dataclass(frozen=True)
class Endpoint:
    name: str  # the display name: what --model takes and what votes record
    model_name: str  # what the server calls it (the request's `model`)
    api_base: str
    api_key: str = field(repr=False)  # never printed, logged or stored
    anony_only: bool = False
    recommended: dict = field(default_factory=dict)  # temperature / top_p / max_new_tokens
    concurrency: int = 4
    timeout: float = 60.0
    max_retries: int = 2

    def sampling(self, temperature: float, top_p: float, max_new_tokens: int) -> dict:
        """The settings this model samples with: the command's, recommended_config's over them."""
        return {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens} | dict(
            self.recommended
        )


def require_openai() -> None:
    """EndpointsError naming the install extra when the openai package is missing: the
    wording every missing extra has (trainer/errors.py), as an EndpointsError, the
    family every problem with --endpoints belongs to."""
    why = missing_extra("openai", EXTRA)
    if why:
        raise EndpointsError(f"--endpoints {why}")


class _Object(dict):
    """A JSON object as read; `twice`: its first key given twice, named where the error
    can say which entry and field it is in."""

    twice: str | None = None


def _unique_keys(pairs) -> _Object:
    out = _Object()
    for key, value in pairs:
        if key in out and out.twice is None:
            out.twice = key
        out[key] = value
    return out


def load_endpoints(path: str | os.PathLike | None) -> dict[str, Endpoint]:
    """{display name: Endpoint} from the file; {} for None. EndpointsError for anything wrong."""
    if path is None:
        return {}
    require_openai()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EndpointsError(
            f"{path}: cannot read the endpoints file ({getattr(e, 'strerror', None) or e})"
        ) from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:
        raise EndpointsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise EndpointsError(f"{path}: must be a JSON object of display name -> endpoint, with at least one")
    if data.twice is not None:
        raise EndpointsError(f"{path}: entry {data.twice!r} is given twice")
    endpoints = {name: _entry(path, name, entry) for name, entry in data.items()}
    literal = [name for name, entry in data.items() if isinstance(entry, dict) and entry.get("api_key")]
    if literal and os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "%s holds an api_key (%s) and other users may read it: chmod 600 it, or name an "
            "environment variable with api_key_env instead",
            path,
            ", ".join(literal),
        )
    return endpoints


def _entry(path, name: str, entry) -> Endpoint:
    def fail(where: str, why: str):
        raise EndpointsError(f"{path}: entry {name!r}: {where}: {why}")

    problem = text_problem(name)
    if not name.strip() or name != name.strip() or len(name) > MAX_NAME or problem:
        why = problem or f"a display name is 1 to {MAX_NAME} characters without surrounding spaces"
        raise EndpointsError(f"{path}: entry {name!r}: {why}")
    if not isinstance(entry, dict):
        raise EndpointsError(f"{path}: entry {name!r}: must be a JSON object, got {type(entry).__name__}")
    if getattr(entry, "twice", None) is not None:
        fail(entry.twice, "given twice")
    for key in entry:
        if key not in USED and key not in FASTCHAT_IGNORED:
            fail(key, f"unknown field (known: {', '.join(USED + FASTCHAT_IGNORED)})")
    model_name = entry.get("model_name")
    if not isinstance(model_name, str) or not model_name.strip() or text_problem(model_name):
        fail("model_name", "required: the model's name on the server (a non-empty string)")
    api_type = entry.get("api_type")
    if api_type is None:
        fail("api_type", "required: 'openai' (any OpenAI-compatible server)")
    if api_type not in API_TYPES:
        fail(
            "api_type",
            f"{api_type!r} is not supported; preflab speaks 'openai' (any OpenAI-compatible server)",
        )
    base = entry.get("api_base")
    if not isinstance(base, str) or not base.strip():
        fail("api_base", "required: the server's URL, e.g. http://127.0.0.1:8000/v1")
    try:
        url = urlsplit(base)
        url.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as e:
        fail("api_base", f"not a URL ({e})")
    if url.scheme not in ("http", "https"):
        fail("api_base", f"the scheme must be http or https, got {url.scheme or 'none'!r}")
    if not url.hostname:
        fail("api_base", "no host in the URL")
    if url.username or url.password:
        fail("api_base", "no user or password in the URL: give the key as api_key_env")
    if url.query or url.fragment:
        fail("api_base", "no query or fragment in the URL")
    key, key_env = entry.get("api_key"), entry.get("api_key_env")
    if key is not None and key_env is not None:
        fail("api_key_env", "give api_key or api_key_env, not both")
    if key is not None and (not isinstance(key, str) or not KEY_TEXT.fullmatch(key)):
        fail("api_key", f"must be a string (the key itself): {KEY_RULE}")
    if key_env is not None:
        if not isinstance(key_env, str) or not ENV_NAME.fullmatch(key_env):
            fail("api_key_env", "must be the name of an environment variable")
        key = os.environ.get(key_env)
        if not key:
            fail("api_key_env", f"the environment variable {key_env} is not set or empty")
        if not KEY_TEXT.fullmatch(key):  # nothing is stripped: the key sent is the variable's
            fail(
                "api_key_env",
                f"the environment variable {key_env} does not hold a key: {KEY_RULE} (a trailing newline?)",
            )
    anony = entry.get("anony_only", False)
    if not isinstance(anony, bool):
        fail("anony_only", "must be true or false")
    return Endpoint(
        name=name,
        model_name=model_name,
        api_base=base.rstrip("/"),
        api_key=key or NO_KEY,
        anony_only=anony,
        recommended=_recommended(entry.get("recommended_config"), fail),
        concurrency=_number(entry, "concurrency", 4, 1, 256, fail, integer=True),
        timeout=float(_number(entry, "timeout", 60.0, 0.001, 3600, fail)),
        max_retries=_number(entry, "max_retries", 2, 0, 10, fail, integer=True),
    )


def _number(entry: dict, key: str, default, low, high, fail, integer: bool = False, where: str | None = None):
    value = entry.get(key, default)
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not low <= value <= high:
        what = f"must be {'an integer' if integer else 'a number'} from {low} to {high}"
        fail(where or key, f"{what}, got {value!r}")
    return value


def _recommended(config, fail) -> dict:
    if config is None:
        return {}
    if not isinstance(config, dict):
        fail("recommended_config", "must be an object: temperature, top_p, max_new_tokens")
    if getattr(config, "twice", None) is not None:
        fail(f"recommended_config.{config.twice}", "given twice")
    out = {}
    for key in config:
        where = f"recommended_config.{key}"
        if key not in RECOMMENDED:
            fail(where, f"unknown setting (known: {', '.join(RECOMMENDED)})")
        low, high = {"temperature": (0, 2), "top_p": (0, 1), "max_new_tokens": (1, 1 << 20)}[key]
        out[key] = _number(config, key, None, low, high, fail, integer=key == "max_new_tokens", where=where)
        if key == "top_p" and out[key] == 0:
            fail(where, "must be a number from 0 to 1, above 0, got 0")
    return out
