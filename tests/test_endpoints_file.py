"""An endpoints file (`--endpoints FILE`, trainer/endpoints.py): FastChat's
api_endpoints.json format, checked strictly at start. Each error names the file, the
entry and the field; a key from the environment is checked as a literal one is; what an
Arena user's file has is accepted; the commands report a bad file, and a missing openai
package, in one line; a literal key in a file others may read is warned about."""

from __future__ import annotations

import json

import helpers
import pytest
from helpers import EP_GOOD as GOOD
from helpers import EP_KEY as KEY
from helpers import (
    preflab,
    write_jsonl,
)

openai = pytest.importorskip("openai")


@pytest.mark.parametrize(
    "change, where, why",
    [
        ({"api_type": "anthropic"}, "api_type", "'anthropic' is not supported"),
        ({"api_type": None}, "api_type", "required"),
        ({"api_base": None}, "api_base", "required"),
        ({"api_base": "ftp://host/v1"}, "api_base", "scheme must be http or https"),
        ({"api_base": "http:///v1"}, "api_base", "no host"),
        ({"api_base": "http://user:pw@host/v1"}, "api_base", "no user or password"),
        ({"api_base": "http://host:port/v1"}, "api_base", "not a URL"),
        ({"model_name": ""}, "model_name", "required"),
        ({"api_bsae": "http://x"}, "api_bsae", "unknown field"),
        ({"api_key": "k", "api_key_env": "K"}, "api_key_env", "not both"),
        ({"api_key_env": "not a name"}, "api_key_env", "name of an environment variable"),
        ({"api_key_env": "PREFLAB_SURELY_UNSET_VAR"}, "api_key_env", "PREFLAB_SURELY_UNSET_VAR is not set"),
        ({"api_key": "sk-1 2"}, "api_key", "printable ASCII without spaces"),
        ({"api_key": "sk-ké"}, "api_key", "printable ASCII without spaces"),
        ({"anony_only": "no"}, "anony_only", "true or false"),
        ({"recommended_config": {"temperature": 9}}, "recommended_config.temperature", "from 0 to 2"),
        ({"recommended_config": {"top_p": 0}}, "recommended_config.top_p", "from 0 to 1"),
        ({"recommended_config": {"temprature": 1}}, "recommended_config.temprature", "unknown setting"),
        (
            {"recommended_config": {"max_new_tokens": 1.5}},
            "recommended_config.max_new_tokens",
            "an integer from 1",
        ),
        ({"recommended_config": {"top_p": True}}, "recommended_config.top_p", "a number from 0 to 1"),
        ({"concurrency": 0}, "concurrency", "from 1 to 256"),
        ({"timeout": True}, "timeout", "a number"),
    ],
)
def test_each_error_names_the_file_the_entry_and_the_field(tmp_path, change, where, why):
    from trainer.endpoints import EndpointsError, load_endpoints

    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = tmp_path / "api_endpoints.json"
    path.write_text(json.dumps({"good": GOOD, "my-model": bad}))
    with pytest.raises(EndpointsError) as e:
        load_endpoints(path)
    assert str(e.value).startswith(f"{path}: entry 'my-model': {where}: "), e.value
    assert why in str(e.value)


@pytest.mark.parametrize("value", [KEY + "\n", " " + KEY, KEY[:6] + "é" + KEY[6:], KEY[:6] + "\t" + KEY[6:]])
def test_a_key_from_the_environment_is_checked_as_a_literal_one(tmp_path, monkeypatch, value):
    """A trailing newline (`export K=$(cat key)` keeps none, a .env file may) or a
    character no header carries: an error naming the entry, the field and the variable,
    never the value; nothing is stripped behind the user's back."""
    from trainer.endpoints import EndpointsError, load_endpoints

    monkeypatch.setenv("PREFLAB_EP_BAD_KEY", value)
    path = tmp_path / "api_endpoints.json"
    path.write_text(json.dumps({"my-model": {**GOOD, "api_key_env": "PREFLAB_EP_BAD_KEY"}}))
    with pytest.raises(EndpointsError) as e:
        load_endpoints(path)
    said = str(e.value)
    assert said.startswith(
        f"{path}: entry 'my-model': api_key_env: the environment variable PREFLAB_EP_BAD_KEY"
    ), said
    assert "printable ASCII" in said and KEY[6:] not in said and KEY[:6] not in said


def test_whole_file_errors_and_what_is_accepted(tmp_path, monkeypatch):
    from trainer.endpoints import EndpointsError, load_endpoints

    path = tmp_path / "e.json"
    for text, why in [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ("{}", "at least one"),
        ('{"a": {}, "a": {}}', "entry 'a' is given twice"),
        ('{"m": {"api_base": "http://a/v1", "api_base": "http://b/v1"}}', "entry 'm': api_base: given twice"),
        (
            json.dumps({"m": {**GOOD, "recommended_config": {}}}).replace("{}", '{"top_p": 1, "top_p": 0.5}'),
            "entry 'm': recommended_config.top_p: given twice",
        ),
        ('{"a": 3}', "entry 'a': must be a JSON object"),
        ('{" a": {}}', "entry ' a': a display name"),
    ]:
        path.write_text(text)
        with pytest.raises(EndpointsError) as e:
            load_endpoints(path)
        assert str(e.value).startswith(f"{path}: ") and why in str(e.value), (text, e.value)
    with pytest.raises(EndpointsError) as e:
        load_endpoints(tmp_path / "missing.json")
    assert "missing.json: cannot read" in str(e.value)

    # An Arena user's file as FastChat documents it: its tab flags are accepted and ignored.
    monkeypatch.setenv("PREFLAB_EP_KEY", KEY)
    path.write_text(json.dumps({
        "gpt-4o": {**GOOD, "api_key": "sk-literal", "anony_only": True, "text-arena": True, "vision-arena": False,
                   "recommended_config": {"temperature": 0.7, "top_p": 1.0}},
        "local": {**GOOD, "api_base": "https://example.com/v1/", "api_key_env": "PREFLAB_EP_KEY"},
        "open": {**GOOD, "api_key": None},
    }))  # fmt: skip
    eps = load_endpoints(path)
    assert eps["gpt-4o"].api_key == "sk-literal" and eps["gpt-4o"].anony_only is True
    assert eps["gpt-4o"].sampling(0.8, 0.95, 64) == {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 64}
    assert eps["local"].api_key == KEY and eps["local"].api_base == "https://example.com/v1"
    assert eps["open"].api_key == "EMPTY"  # no key: never $OPENAI_API_KEY sent to a server not named for it
    assert "sk-literal" not in repr(eps) and KEY not in repr(eps)

    # The README's example file is one that loads.
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    example = load_endpoints(helpers.REPO / "examples" / "api_endpoints.json")
    assert example["llama-3.1-8b"].concurrency == 8 and example["policy-1"].api_key == "EMPTY"


def test_commands_report_a_bad_file_and_a_missing_extra(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "p0", "prompt": "Hi."}])
    bad = tmp_path / "eps.json"
    bad.write_text(json.dumps({"m": {**GOOD, "api_base": "file:///etc/passwd"}}))
    for command in (
        ["generate", "--prompts", prompts, "--model", "m"],
        ["serve", "--prompts", prompts, "--data", tmp_path / "store", "--model", "m"],
        ["eval-policy", "--policy", tmp_path / "no-run", "--reference", "m"],
    ):
        r = preflab(*command, "--endpoints", bad, timeout=120)
        assert r.returncode == 2, (command, r.stderr)
        assert f"{bad}: entry 'm': api_base: the scheme must be http or https" in r.stderr, r.stderr
    assert not (tmp_path / "store").exists()  # serve refused before it opened or created the store

    # Without the openai package: one line naming the extra.
    code = (
        "import sys; sys.modules['openai'] = None; from annotate.cli import main; "
        f"sys.exit(main(['generate', '--prompts', {str(prompts)!r}, '--endpoints', {str(bad)!r}]))"
    )
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, env=helpers.child_env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "pip install 'preflab[endpoints]'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_literal_key_in_a_file_others_can_read_is_warned_about(tmp_path, caplog):
    from trainer.endpoints import load_endpoints

    path = tmp_path / "e.json"
    path.write_text(json.dumps({"m": {**GOOD, "api_key": KEY}}))
    for mode, warned in ((0o600, False), (0o644, True)):
        path.chmod(mode)
        caplog.clear()
        with caplog.at_level("WARNING", logger="preflab.endpoints"):
            load_endpoints(path)
        text = caplog.text
        assert ("other users may read it" in text) is warned, (oct(mode), text)
        assert KEY not in text
