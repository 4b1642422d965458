"""The policy's model side: causal LM + value head, log-probs of sampled tokens, sampling
rollouts, LoRA, the reward scorer, saving. The training loop is trainer/policy.py.

    lm = add_lora(load_causal_lm(source, torch.float32), r=8, alpha=16)
    net = policy_net(lm, make_value_head(hidden_size, device))   # PPO; policy_net(lm) otherwise
    sampler = Sampler(lm, tokenizer, inner, temperature=0.7, max_new_tokens=64, ...)
    answers = sampler.sample(query, query_mask, prompt_lengths, rows_per_call, autocast)
    (logp, entropy, values), width = forward_rows(net, rows, query, query_mask, response, resp_mask,
                                                  temperature, autocast, with_values=True)
    reward_model = load_reward_scorer(reward_model_dir(cfg.reward), device)
    save_policy(run.path / POLICY_DIR, lm, tokenizer, meta)

torch / transformers are imported inside functions so that `preflab --help` stays instant.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sys
from pathlib import Path

from trainer.checkpoints import swap_in
from trainer.errors import PolicyInputError, requires
from trainer.runs import (
    POLICY_META_FILE,
    STATE_FILE,
    VALUE_HEAD_FILE,
    RunDirError,
    reward_model_path,
    write_json,
)

# --------------------------------------------------------------------------------------
# The model: causal LM + value head; log-probs of the sampled tokens in one forward
# --------------------------------------------------------------------------------------


def head_logits(inner, hidden):
    """The LM head on some hidden states, with the logit scaling / soft-capping that a few
    architectures apply in their own forward (Cohere, Gemma 2)."""
    import torch

    logits = inner.get_output_embeddings()(hidden)
    text = inner.config.get_text_config()
    if getattr(text, "logit_scale", None):
        logits = logits * text.logit_scale
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def policy_net(lm, value_head=None):
    """The module that training runs (and DDP wraps): the causal LM and, for PPO, a value
    head on its last hidden state."""
    import torch

    class PolicyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm  # registered here so DDP and the optimizer see every parameter
            self.value_head = value_head

        @property
        def inner(self):
            # With LoRA the layers are patched in place: call the inner model, not the PeftModel.
            return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

        def forward(
            self,
            input_ids,
            attention_mask,
            position_ids,
            n_prompt: int,
            temperature: float,
            with_values: bool = False,
            with_entropy: bool = False,
            group: int = 1,
            full_dist: bool = False,
        ):
            """Log-probs [rows, R] of the answer tokens input_ids[:, n_prompt:] (R of them)
            at sampling temperature, and optionally the entropy and the values there.
            group > 1: rows come in runs of `group` answers to one prompt (RLOO's k samples).
            full_dist: the whole log-distribution [rows, R, vocab] in place of the log-probs
            (the exact KL of trpo's trust region, trainer/natural_gradient.py)."""
            inner = self.inner
            backbone = inner.base_model
            if group > 1:
                # Shared prompt: run each prompt once, copy its KV cache to its k answers, and
                # run only the answers on top: the prompt's share of the work drops k-fold.
                first = backbone(
                    input_ids=input_ids[::group, :n_prompt],
                    attention_mask=attention_mask[::group, :n_prompt],
                    position_ids=position_ids[::group, :n_prompt],
                    use_cache=True,
                )
                cache = first.past_key_values
                cache.batch_repeat_interleave(group)
                rest = backbone(
                    input_ids=input_ids[:, n_prompt:],
                    attention_mask=attention_mask,
                    position_ids=position_ids[:, n_prompt:],
                    past_key_values=cache,
                    use_cache=True,
                ).last_hidden_state
                last_prompt = first.last_hidden_state[:, -1:].repeat_interleave(group, dim=0)
                h = torch.cat([last_prompt, rest[:, :-1]], dim=1)
            else:
                hidden = backbone(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=False,
                ).last_hidden_state
                # Position n_prompt - 1 + t has seen the prompt and answer[:t]: it predicts token t
                # (and is the state s_t the value head rates).
                h = hidden[:, n_prompt - 1 : -1]
            # Logits only for the answer's positions, in fp32, divided by the sampling temperature.
            logits = head_logits(inner, h).float() / temperature
            lse = torch.logsumexp(logits, dim=-1)
            if full_dist:
                logp = logits - lse[..., None]
            else:
                logp = logits.gather(-1, input_ids[:, n_prompt:, None]).squeeze(-1) - lse
            entropy = values = None
            if with_entropy:
                with torch.no_grad():  # a diagnostic: H = logsumexp - E_p[logit]
                    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
            if with_values:
                values = self.value_head(h).squeeze(-1).float()
            return logp, entropy, values

    return PolicyNet()


def disable_dropout(model) -> None:
    """Dropout off: with it, the log-probs of the rollout, of the reference and of the update
    would come from different random sub-networks, and the ratio would be noise."""
    import torch

    text = model.config.get_text_config()
    for key, value in text.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(text, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_causal_lm(source: str, dtype):
    import transformers
    from transformers import AutoModelForCausalLM

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    finally:
        transformers.logging.set_verbosity(verbosity)
    disable_dropout(lm)
    return lm


def merge_lora_in_fp32(peft_lm, base_source: str):
    """The trained adapters merged into a fresh fp32 copy of the base. With LoRA on CUDA the
    frozen base sits in bf16; merging into it would round every weight of the saved policy
    (the untouched ones too) to bf16."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapters = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(peft_lm).items()}
    fresh = get_peft_model(
        load_causal_lm(base_source, torch.float32), copy.deepcopy(peft_lm.peft_config["default"])
    )
    set_peft_model_state_dict(fresh, adapters)
    return fresh.merge_and_unload()


def add_lora(lm, r: int, alpha: float, resume_from: Path | None = None):
    """LoRA adapters on every linear layer (alpha 0: 2 * r); `resume_from`: a checkpoint's."""
    requires("peft", "train", "--lora-r")  # the config check said so already; a caller may skip it
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_from is not None:
        return PeftModel.from_pretrained(lm, str(resume_from), is_trainable=True)
    return get_peft_model(
        lm,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=r,
            lora_alpha=alpha or 2 * r,
            lora_dropout=0.0,
            target_modules="all-linear",
        ),
    )


def make_value_head(hidden_size: int, device, resume_from: Path | None = None):
    """PPO's value head: one linear layer on the last hidden state, initialised to zero, so
    the first values are 0 and the first advantages are the rewards-to-go."""
    import torch

    value_head = torch.nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    if resume_from is not None:
        value_head.load_state_dict(
            torch.load(resume_from / VALUE_HEAD_FILE, map_location=device, weights_only=True)
        )
    return value_head


def autocast_for(device):
    """A context factory: bf16 autocast on CUDA (matmuls on tensor cores, weights and
    optimizer state in fp32), nothing on a CPU."""
    import torch

    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def unit_rows(units, g: int):
    """Row indices of some units (rows are prompt-major: row = prompt * k + sample)."""
    import torch

    return (units[:, None] * g + torch.arange(g, device=units.device)).reshape(-1)


def forward_rows(model, rows, query, query_mask, response, resp_mask, temperature: float, autocast, **kw):
    """One forward on some rows (whole groups of `group` answers to one prompt, when
    given), trimmed to their own longest prompt and answer. Returns log-probs (and
    entropy / values) of width = their longest answer."""
    import torch

    qm = query_mask[rows]
    start = int((qm.sum(0) > 0).nonzero()[0])  # left padding: drop columns that are all pad
    width = int(resp_mask[rows].sum(1).max())
    ids = torch.cat([query[rows, start:], response[rows, :width]], dim=1)
    mask = torch.cat([qm[:, start:], resp_mask[rows, :width].long()], dim=1)
    # Positions count real tokens only, as in generation (exact for absolute-position models).
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with autocast():
        return model(ids, mask, position_ids, query.shape[1] - start, temperature, **kw), width


# --------------------------------------------------------------------------------------
# Rollouts: sampling answers
# --------------------------------------------------------------------------------------


def eos_token_ids(tokenizer, inner) -> list[int]:
    """The tokenizer's EOS and the generation config's (chat models often have two)."""
    eos_ids = {tokenizer.eos_token_id}
    gen_eos = inner.generation_config.eos_token_id
    eos_ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    eos_ids.discard(None)
    return sorted(eos_ids)


class Sampler:
    """Batched `generate` of the rollouts, with the KV cache.

    Pure sampling at temperature T: no top-k / top-p / repetition penalty, so that the
    sampling distribution is exactly softmax(logits / T), the one the log-probs are of.
    `bf16_copy` (CUDA, full fine-tuning): generate from a bf16 copy of the weights, so that
    each decoding step reads half the bytes and skips autocast's per-step weight casts;
    `sync()` refreshes it after every update. `compile` (default: with the copy): a static
    KV cache lets transformers torch.compile the decoding step (CUDA graphs: one launch per
    token instead of hundreds); every call then has one shape, prompts left-padded to
    `width` (the pool's longest), so it compiles once.
    """

    def __init__(
        self,
        lm,
        tokenizer,
        eos_ids: list[int],
        *,
        temperature: float,
        max_new_tokens: int,
        width: int,
        bf16_copy: bool,
        compile: bool | None = None,
    ):
        import torch
        from transformers import GenerationConfig

        self.lm, self.pad_id, self.max_new_tokens, self.width = (
            lm,
            tokenizer.pad_token_id,
            max_new_tokens,
            width,
        )
        self.gen_lm = copy.deepcopy(lm).to(torch.bfloat16).eval().requires_grad_(False) if bf16_copy else lm
        self.sampling = dict(
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=self.pad_id,
            bos_token_id=tokenizer.bos_token_id,
            use_cache=True,
        )
        self.config = GenerationConfig(**self.sampling)
        self.compiled = compile if compile is not None else self.separate_copy
        if self.compiled:
            from transformers import CompileConfig

            compile_config = CompileConfig()
            compile_config._compile_all_devices = True  # also on CPU, when asked for explicitly
            self.config = GenerationConfig(
                **self.sampling, cache_implementation="static", compile_config=compile_config
            )

    @property
    def separate_copy(self) -> bool:
        return self.gen_lm is not self.lm

    def sync(self) -> None:
        """The next rollout samples from the updated weights."""
        import torch

        if self.separate_copy:
            with torch.no_grad():
                for g, p in zip(self.gen_lm.parameters(), self.lm.parameters()):
                    g.copy_(p)

    def sample(self, query, query_mask, prompt_lengths: list[int], chunk: int, autocast):
        """Token ids [rows, max_new_tokens] (pad after the answer) for left-padded prompts."""
        import torch
        from tqdm.auto import tqdm
        from transformers import GenerationConfig

        n, P = query.shape
        self.gen_lm.eval()
        out = torch.full((n, self.max_new_tokens), self.pad_id, dtype=torch.long, device=query.device)
        # Rows sorted by prompt length, so each generate call pads little (when cut in chunks).
        order = sorted(range(n), key=lambda i: prompt_lengths[i])
        gq, gm, width = query, query_mask, P
        if self.compiled:  # one shape for every call: left-pad to the pool's longest prompt
            gq = torch.nn.functional.pad(query, (self.width - P, 0), value=self.pad_id)
            gm = torch.nn.functional.pad(query_mask, (self.width - P, 0), value=0)
            width = self.width
        with torch.no_grad(), contextlib.nullcontext() if self.separate_copy else autocast():
            for c in range(0, n, chunk):
                rows = torch.tensor(order[c : c + chunk], device=query.device)
                start = 0 if self.compiled else width - max(prompt_lengths[i] for i in order[c : c + chunk])
                try:
                    seq = self.gen_lm.generate(
                        input_ids=gq[rows, start:],
                        attention_mask=gm[rows, start:],
                        generation_config=self.config,
                    )  # KV cache on
                except Exception as e:
                    if not self.compiled:
                        raise
                    # Compiled decoding is an optimisation: never let it cost the run.
                    tqdm.write(
                        f"warning: compiled generation failed ({type(e).__name__}: {str(e)[:200]}); "
                        f"generating without it",
                        file=sys.stderr,
                    )
                    self.compiled, self.config = False, GenerationConfig(**self.sampling)
                    seq = self.gen_lm.generate(
                        input_ids=gq[rows, start:],
                        attention_mask=gm[rows, start:],
                        generation_config=self.config,
                    )
                new = seq[:, width - start :]
                out[rows, : new.shape[1]] = new
        return out


# --------------------------------------------------------------------------------------
# The reward model that scores the rollouts; saving the policy
# --------------------------------------------------------------------------------------


def reward_model_dir(path: str | os.PathLike | None) -> Path:
    """The reward model a policy trains against, checked before any model is loaded:
    trainer.runs.reward_model_path (a reward run's checkpoint, finished or not, or a
    model directory), its refusal as a PolicyInputError."""
    if not path:
        raise PolicyInputError("no reward model: pass --reward RUN_DIR (a run of `preflab train-reward`)")
    try:
        return reward_model_path(path, finished=False)
    except RunDirError as e:
        raise PolicyInputError(f"{e} (no trained reward model here)") from None


def load_reward_scorer(path: Path, device, weights: dict[str, float] | None = None):
    """The reward model's normalised scores of (prompt, answer): trainer.reward_model.RewardModel,
    or with `weights` (--reward-weights) its heads' weighted sum (trainer.reward_blend)."""
    from trainer.reward_blend import scorer_for
    from trainer.reward_model import RewardModel

    return scorer_for(RewardModel.load(path, device=device), weights or {})


def save_policy(
    path: Path, model, tokenizer, meta: dict, value_head=None, training_state: dict | None = None
):
    """A Hugging Face model directory at `path` (with the tokenizer and its chat template:
    the arena renders prompts alike) and preflab_policy.json; for a checkpoint also the
    value head and training_state.pt. Written beside it, then swapped in."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / POLICY_META_FILE, meta)
    if training_state is not None:
        if value_head is not None:
            torch.save(value_head.state_dict(), tmp / VALUE_HEAD_FILE)
        torch.save(training_state, tmp / STATE_FILE)
    swap_in(tmp, path)
