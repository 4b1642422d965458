"""Model loading, the GGUF -> safetensors conversion, generation, and `preflab generate`.

Every test uses one fresh cache directory per session, so the real conversion of the
shipped SmolLM2 GGUF is exercised on every run (about half a minute on a 2-core CPU).
"""

import argparse
import json
import shutil

import pytest
import torch
from helpers import child_env, fake_run, preflab, vote_record

from annotate import generate as gen_cli
from trainer import models, sampling
from trainer.store import messages_to_json, pair_id_for

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("preflab-cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)  # the converted SmolLM2 is half a gigabyte


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return models.load_model("tiny", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def gguf(cache_dir):
    """The real SmolLM2 as transformers loads it from the GGUF, and the cache converted
    from it. Conversion is handed this same loaded model, so the GGUF is parsed once."""
    gguf_model, gguf_tok = models.load_gguf_model()
    mp = pytest.MonkeyPatch()
    mp.setattr(models, "load_gguf_model", lambda dtype=None: (gguf_model, gguf_tok))
    try:
        converted = models.convert_default_model(cache_dir)
    finally:
        mp.undo()
    return gguf_model, gguf_tok, converted


# --------------------------------------------------------------------------------------
# The tiny model
# --------------------------------------------------------------------------------------


def test_tiny_model_has_the_real_tokenizer(tiny):
    model, tok = tiny
    assert len(tok) == 49152 == model.config.vocab_size
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # SmolLM2's chat markers are single special tokens, which a stand-in tokenizer lacks.
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert not model.training and model.dtype == torch.float32


def test_tiny_model_init_is_deterministic(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    # A second build, from scratch elsewhere (handed the tokenizer: parsing it from the
    # GGUF again would only cost time).
    monkeypatch.setattr(models, "smollm2_tokenizer", lambda *a: tok)
    again = models.build_tiny_model(tmp_path)
    other, _ = models.load_model(str(again))
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


def test_tiny_model_is_cached(tiny, cache_dir, monkeypatch):
    # A second load must read the cache, not rebuild (which would need the tokenizer source).
    monkeypatch.setattr(models, "smollm2_tokenizer", lambda *a: pytest.fail("rebuilt the tiny model"))
    model, tok = models.load_model("tiny", cache_dir=cache_dir)
    assert model.config.vocab_size == len(tok)


# --------------------------------------------------------------------------------------
# Prompts and generation
# --------------------------------------------------------------------------------------


def test_chat_template_is_applied(tiny):
    _, tok = tiny
    text = sampling.render_prompt(tok, HELLO)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert "<|im_start|>user\nHello there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")  # the generation prompt
    # A bare string is one user message.
    assert "<|im_start|>user\nHi<|im_end|>" in sampling.render_prompt(tok, "Hi")


def test_plain_transcript_without_chat_template(tiny):
    model, tok = tiny
    saved = tok.chat_template
    tok.chat_template = None
    try:
        text = sampling.render_prompt(tok, HELLO)
        out = sampling.generate(model, tok, [HELLO], n=1, max_new_tokens=3, progress=False)
    finally:
        tok.chat_template = saved
    assert text == "System: Be brief.\n\nUser: Hello there\n\nAssistant:"
    assert len(out) == 1 and len(out[0]) == 1


CONVERSATIONS = [
    HELLO,
    "Tell me about zebras.",
    [
        {
            "role": "user",
            "content": "A much longer question, so that the batch needs left padding: "
            "what is the tallest mountain in each of the seven continents?",
        }
    ],
]


def test_generate_shapes_and_seeds(tiny):
    model, tok = tiny
    rng_before = torch.random.get_rng_state()
    kw = dict(n=2, max_new_tokens=8, temperature=1.0, top_p=1.0, batch_size=4, progress=False)
    out = sampling.generate(model, tok, CONVERSATIONS, seed=0, **kw)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    assert len(out) == 3 and all(len(samples) == 2 for samples in out)
    assert all(isinstance(s, str) and s for samples in out for s in samples)
    # Sampling: the two samples of one prompt differ, the same seed repeats, another seed differs.
    assert all(a != b for a, b in out)
    assert sampling.generate(model, tok, CONVERSATIONS, seed=0, **kw) == out
    assert sampling.generate(model, tok, CONVERSATIONS, seed=1, **kw) != out


def test_generate_returns_new_text_only(tiny):
    model, tok = tiny
    out = sampling.generate(model, tok, CONVERSATIONS, n=1, max_new_tokens=4, progress=False)
    for (text,) in out:
        assert "zebras" not in text and "tallest mountain" not in text and "Hello there" not in text
        assert "<|im_start|>" not in text and "<|im_end|>" not in text  # special tokens stripped
        assert len(tok(text, add_special_tokens=False).input_ids) <= 4 + 2


def test_greedy_ignores_seed_and_padding(tiny):
    model, tok = tiny
    kw = dict(n=2, max_new_tokens=6, temperature=0, progress=False)
    batched = sampling.generate(model, tok, CONVERSATIONS, seed=0, batch_size=8, **kw)
    assert all(a == b for a, b in batched)
    assert sampling.generate(model, tok, CONVERSATIONS, seed=5, batch_size=8, **kw) == batched
    # One row per batch means no padding at all: left padding with an attention mask
    # must give the same greedy tokens.
    assert sampling.generate(model, tok, CONVERSATIONS, seed=0, batch_size=1, **kw) == batched


def test_generate_nothing(tiny):
    assert sampling.generate(*tiny, [], progress=False) == []


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_unknown_model_offline_is_a_clear_error(cache_dir):
    with pytest.raises(models.ModelLoadError) as info:
        models.load_model("no-such-org/no-such-model-xyz", cache_dir=cache_dir)
    message = str(info.value)
    assert "no-such-org/no-such-model-xyz" in message
    assert "offline" in message and "--model /path/to/model_dir" in message
    assert models.DEFAULT_MODEL in message and "Traceback" not in message


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(models.ModelLoadError, match="config.json"):
        models.load_model(str(tmp_path))


def test_a_policy_run_directory_serves_its_finished_policy(tiny, cache_dir, tmp_path):
    # `serve --model runs/<id>`: the run's policy/, not the run's own config.json (a run
    # record, which transformers would misread as a model config).
    run = fake_run(tmp_path / "ppo-run", reward=False)
    (run / "config.json").write_text(json.dumps({"kind": "policy", "config": {"algo": "ppo"}}))
    shutil.copytree(models.build_tiny_model(cache_dir), run / "policy")
    assert models.resolve_model(str(run)) == str(run / "policy")
    model, tok = models.load_model(str(run), cache_dir=cache_dir)
    assert model.config.vocab_size == len(tok) == 49152
    # Still running: no policy yet; the message says what to pass instead.
    running = fake_run(tmp_path / "running", state="running", reward=False)
    with pytest.raises(
        models.ModelLoadError, match="is running .training: step 4 of 10.* pass .*checkpoint to serve"
    ):
        models.load_model(str(running), cache_dir=cache_dir)
    queued = tmp_path / "queued"  # nothing saved yet: no directory to suggest
    queued.mkdir()
    (queued / "status.json").write_text(json.dumps({"state": "queued"}))
    with pytest.raises(
        models.ModelLoadError, match="is queued, without a finished policy/.*nothing servable yet"
    ):
        models.resolve_model(str(queued))
    # A model directory that happens to hold a status.json is still a model.
    odd = tmp_path / "odd-model"
    shutil.copytree(models.build_tiny_model(cache_dir), odd)
    (odd / "status.json").write_text("{}")
    assert models.resolve_model(str(odd)) == str(odd)
    # A reward run scores answers; it cannot be a contestant.
    with pytest.raises(models.ModelLoadError, match="a reward model run, not a policy"):
        models.resolve_model(str(fake_run(tmp_path / "rm")))
    with pytest.raises(models.ModelLoadError, match="a reward model run, not a policy"):  # unfinished too
        models.resolve_model(str(fake_run(tmp_path / "rm-running", state="running")))


def test_aliases_name_the_default():
    for alias in ["smollm2", "SmolLM2-135M-Instruct", "SMOLLM2", models.DEFAULT_MODEL, None]:
        assert models.canonical_name(alias) == models.DEFAULT_MODEL
    assert models.canonical_name("tiny") == "tiny"
    assert models.canonical_name("/some/dir") == "/some/dir"


# --------------------------------------------------------------------------------------
# The conversion cache (fast: the tiny model stands in for the GGUF-loaded one)
# --------------------------------------------------------------------------------------


def test_failed_conversion_leaves_no_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_gguf_model", lambda dtype=None: tiny)
    monkeypatch.setattr(models, "max_logit_diff", lambda *a: 1.0)  # the check fails
    with pytest.raises(models.ModelLoadError, match="differ"):
        models.convert_default_model(tmp_path)
    assert not models.default_model_dir(tmp_path).exists()
    assert list((tmp_path / "models").iterdir()) == []  # no temp dir left either


def test_killed_conversion_leftovers_are_removed(tiny, tmp_path, monkeypatch):
    # A temp dir from a dead process (pid far above any live one) is cleaned up;
    # the conversion then publishes its own copy.
    stale = tmp_path / "models" / f".tmp-{models.default_model_dir(tmp_path).name}-999999999-1"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a file")
    monkeypatch.setattr(models, "load_gguf_model", lambda dtype=None: tiny)
    final = models.convert_default_model(tmp_path)
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [final.name]


# --------------------------------------------------------------------------------------
# The real SmolLM2: GGUF -> safetensors cache
# --------------------------------------------------------------------------------------


def test_gguf_loaded_model_is_flagged_quantized(gguf, tmp_path):
    # The reason for the conversion: this is what transformers refuses to save.
    gguf_model, _, _ = gguf
    assert getattr(gguf_model, "hf_quantizer", None) is not None
    with pytest.raises(ValueError, match="quantized"):
        gguf_model.save_pretrained(tmp_path)


def test_converted_cache_is_a_plain_model(gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, gguf_tok, converted = gguf
    assert converted == models.default_model_dir(converted.parents[1])
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".tmp-")]
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert (converted / "generation_config.json").is_file()

    plain = AutoModelForCausalLM.from_pretrained(converted)  # plain from_pretrained, no gguf_file
    assert getattr(plain, "hf_quantizer", None) is None
    assert models.max_logit_diff(gguf_model, plain, gguf_tok) < 1e-5
    plain.save_pretrained(tmp_path / "resaved")  # what Trainer needs
    assert (tmp_path / "resaved" / "config.json").is_file()
    shutil.rmtree(tmp_path / "resaved")  # half a gigabyte that pytest would keep around

    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.chat_template == gguf_tok.chat_template
    text = sampling.render_prompt(tok, HELLO)
    assert tok(text).input_ids == gguf_tok(text).input_ids


def test_default_model_loads_from_cache_and_answers(gguf, cache_dir, monkeypatch):
    # With the cache there, the GGUF is never read again.
    monkeypatch.setattr(models, "load_gguf_model", lambda *a, **k: pytest.fail("re-converted"))
    model, tok = models.load_model("smollm2", cache_dir=cache_dir)
    assert models.count_parameters(model) == 134_515_008
    ((answer,),) = sampling.generate(
        model, tok, ["What is the capital of France?"], n=1, max_new_tokens=24, temperature=0, progress=False
    )
    assert "Paris" in answer


# --------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool.jsonl"
    rows = [
        {"id": "p1", "prompt": "Name a colour."},
        {"id": "p2", "messages": HELLO, "tags": ["chat"]},
        {"id": "p3", "prompt": "Count to three."},
        {"id": "p4", "prompt": "Not used: past --limit."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_pairs(rows, prompt_ids):
    assert [r["prompt_id"] for r in rows] == prompt_ids
    for r in rows:
        assert set(r) == {
            "prompt",
            "response_a",
            "response_b",
            "model_a",
            "model_b",
            "pair_id",
            "prompt_id",
            "gen_params",
        }
        assert (r["model_a"], r["response_a"]) <= (r["model_b"], r["response_b"])  # canonical order
        assert r["pair_id"] == pair_id_for(messages_to_json(r["prompt"]), r["response_a"], r["response_b"])
        params = json.loads(r["gen_params"])
        assert set(params) == {"a", "b"}
        # Everything a vote record needs from the pair is valid there.
        vote_record(
            r["prompt"],
            r["response_a"],
            r["response_b"],
            pair_id=r["pair_id"],
            prompt_id=r["prompt_id"],
            model_a=r["model_a"],
            model_b=r["model_b"],
            gen_params=r["gen_params"],
        )


def test_cli_generate_writes_pairs(tiny, cache_dir, pool, tmp_path):
    out = tmp_path / "pairs.jsonl"
    proc = preflab(
        "generate",
        "--model",
        "tiny",
        "--prompts",
        pool,
        "--limit",
        "3",
        "--out",
        out,
        "--max-new-tokens",
        "6",
        "--no-progress",
        env=child_env(PREFLAB_CACHE=str(cache_dir)),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    check_pairs(rows, ["p1", "p2", "p3"])
    assert rows[1]["prompt"] == HELLO
    for r in rows:  # one model: two samples with seeds 0 and 1
        assert r["model_a"] == r["model_b"] == "tiny"
        params = json.loads(r["gen_params"])
        assert {params["a"]["seed"], params["b"]["seed"]} == {0, 1}
        assert params["a"]["max_new_tokens"] == 6 and params["a"]["temperature"] == 0.8
        assert r["response_a"] != r["response_b"]
    assert "wrote 3 pairs" in proc.stderr


def _generate_args(*argv):
    p = argparse.ArgumentParser()
    gen_cli.add_generate_arguments(p)
    return p.parse_args(list(argv))


def test_generate_pairs_different_models(tiny, cache_dir, pool, tmp_path):
    # The tiny model's cache directory, given as a local path, is a second "model".
    local = str(models.tiny_model_dir(cache_dir))
    out = tmp_path / "pairs.jsonl"
    args = _generate_args(
        "--model",
        "tiny",
        "--model",
        local,
        "--model",
        "tiny",
        "--prompts",
        str(pool),
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
    )
    assert gen_cli.run_generate(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    check_pairs(rows, ["p1", "p2", "p3", "p4"])
    for r in rows:  # the repeated "tiny" counts once, so every pair is tiny vs the local dir
        assert {r["model_a"], r["model_b"]} == {"tiny", local}
    # Same seed, same file.
    assert gen_cli.run_generate(args) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


def test_generate_prints_pairs_without_out(tiny, cache_dir, pool, capsys):
    args = _generate_args(
        "--model",
        "tiny",
        "--prompts",
        str(pool),
        "--limit",
        "2",
        "--max-new-tokens",
        "3",
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
    )
    assert gen_cli.run_generate(args) == 0
    printed = capsys.readouterr().out
    assert "pair 1/2" in printed and "pair 2/2" in printed and "pair 3/" not in printed
    assert "USER: Name a colour." in printed and "[A] tiny" in printed and "[B] tiny" in printed


def test_generate_bad_inputs_fail_cleanly(cache_dir, pool, tmp_path, capsys):
    args = _generate_args(
        "--model", "no-such-org/no-such-model", "--prompts", str(pool), "--cache-dir", str(cache_dir)
    )
    assert gen_cli.run_generate(args) == 1
    assert "--model /path/to/model_dir" in capsys.readouterr().err
    args = _generate_args("--prompts", str(tmp_path / "missing.jsonl"), "--cache-dir", str(cache_dir))
    assert gen_cli.run_generate(args) == 1
    assert "missing.jsonl" in capsys.readouterr().err


def test_cli_model_reports_load_times(tiny, cache_dir, capsys):
    p = argparse.ArgumentParser()
    gen_cli.add_model_arguments(p)
    args = p.parse_args(["tiny", "--cache-dir", str(cache_dir), "--max-new-tokens", "4"])
    assert gen_cli.run_model(args) == 0
    printed = capsys.readouterr().out
    for label in [
        "first load:",
        "cached load:",
        "parameters:   3,219,776",
        "dtype:        float32",
        "device:       cpu",
        "answer:",
    ]:
        assert label in printed


@pytest.mark.parametrize("command,option", [("generate", "--temperature"), ("model", "--cache-dir")])
def test_cli_help(command, option):
    proc = preflab(command, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert option in proc.stdout and "--device" in proc.stdout


def test_an_answer_the_token_limit_stopped_is_marked_cut(tiny):
    model, tok = tiny
    greedy = dict(n=1, max_new_tokens=3, temperature=0, progress=False)
    [[answer]] = sampling.generate_answers(model, tok, [HELLO], **greedy)
    # The oracle: the same greedy continuation, straight from transformers.
    ids = tok(sampling.render_prompt(tok, HELLO), add_special_tokens=False, return_tensors="pt").input_ids
    eos = {
        tok.eos_token_id,
        *(
            [model.generation_config.eos_token_id]
            if isinstance(model.generation_config.eos_token_id, int)
            else model.generation_config.eos_token_id or []
        ),
    }
    out = model.generate(
        input_ids=ids,
        attention_mask=ids.ne(-1).long(),
        max_new_tokens=3,
        do_sample=False,
        eos_token_id=sorted(e for e in eos if e is not None),
        pad_token_id=tok.pad_token_id,
    )
    assert answer.cut == (not any(t in eos for t in out[0, ids.shape[1] :].tolist()))
    # Every token an end of sequence: every answer ends on its own, none is cut.
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = list(range(model.config.vocab_size))
    try:
        [[ended]] = sampling.generate_answers(model, tok, [HELLO], **greedy)
    finally:
        model.generation_config.eos_token_id = saved
    assert ended.cut is False
    assert sampling.generate(model, tok, [HELLO], **greedy) == [[answer.text]]
