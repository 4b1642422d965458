"""The bookkeeping of a policy run around its loop (trainer/policy.py): config.json,
which prompts a step draws, the statistics of a step, the samples it logs, checkpoints
and the final policy, its held-out evaluation, finishing, failing and cancelling cleanly.

    write_start_config(run, cfg, prompts_path, len(conversations), heldout, rm_path)
    add_to_config(run, prompts_cut, device=str(device), ...)            # once the models are loaded
    rows = prompt_rows(step, rank, world, batch_size, n_prompts, seed)   # a function of the step
    roll = RolloutSums.gather(reduce, reward=raw.sum(), ...)             # one all-reduce, named sums
    save_checkpoint(run, accelerator, net, tokenizer, policy_meta(...), state)
    return fail(run, "the KL exploded ...", step, steps)                 # state failed, exit code 1
    evaluate_heldout(run, cfg, heldout, base_source, reward_model, step, device)   # eval.json
    return finish_done(run, step, steps, totals, device, t_start)        # state done, exit code 0
    clock = StepClock(rows_per_step, len(heldout)); clock.add(record)    # the measured step time
    tqdm.write(step_line(step, steps, record, clock.step_s, clock.eta(steps - step)))   # a line a step

torch is imported inside functions.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.evaluate import evaluate_policy, write_eval, write_heldout
from trainer.policy_model import merge_lora_in_fp32, save_policy
from trainer.runs import CHECKPOINT, CONFIG_FILE, POLICY_DIR, Run, peak_memory_mb, read_json, write_json


def _reward_weights(cfg) -> dict:
    """{"reward_weights": {head: weight}} where --reward-weights was given (else nothing:
    a run without it records what it always did)."""
    from trainer.reward_blend import parse_reward_weights

    weights = parse_reward_weights(cfg.reward_weights)
    return {"reward_weights": weights} if weights else {}


def write_start_config(
    run: Run, cfg, prompts_path: str, n_prompts: int, heldout: list, rm_path: Path
) -> None:
    """config.json of a new run (`cfg`: its PolicyConfig; the prompts it trains on and holds
    out; the reward model), and heldout.jsonl."""
    write_json(
        run.path / CONFIG_FILE,
        {
            "kind": "policy",
            "config": dataclasses.asdict(cfg),
            "created_at": time.time(),
            "prompts": {
                "source": str(prompts_path),
                "count": n_prompts,
                "heldout": len(heldout),
            },
            "reward_model": str(rm_path),
            **_reward_weights(cfg),
        },
    )
    write_heldout(run.path, heldout)


def add_to_config(run: Run, prompts_cut: int, **facts) -> None:
    """config.json with what the run knows once its models are loaded (the schedule, the
    device, how it generates), and how many prompts were cut, if any."""
    record = read_json(run.path / CONFIG_FILE)
    record.update(facts)
    if prompts_cut:
        record["prompts_cut"] = prompts_cut
    write_json(run.path / CONFIG_FILE, record)


def seed_for(seed: int, step: int, rank: int) -> int:
    """Each step (and each process) samples from its own seed: a resumed run draws what an
    uninterrupted one would have, and DDP processes never draw the same answers."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63)


def prompt_rows(step: int, rank: int, world: int, batch_size: int, n_prompts: int, seed: int) -> list[int]:
    """The prompts of one step on one process: consecutive slices of a seeded permutation of
    the pool, a fresh permutation each pass. A function of the step alone, so resume needs
    no sampler state."""
    import numpy as np

    out, perms = [], {}
    first = (step * world + rank) * batch_size
    for g in range(first, first + batch_size):
        epoch, i = divmod(g, n_prompts)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        out.append(int(perms[epoch][i]))
    return out


def policy_meta(cfg, base_source: str, rm_path: Path, step: int, kl_coef: float) -> dict:
    """preflab_policy.json: where the policy came from (`cfg`: the run's PolicyConfig)."""
    return {
        "format": 1,
        "algo": cfg.algo,
        "base_model": cfg.model,
        "base_source": base_source,
        "reward_model": str(rm_path),
        **_reward_weights(cfg),
        "step": step,
        "lora": cfg.lora_r > 0,
        "kl_coef": kl_coef,
    }


def save_checkpoint(run: Run, accelerator, net, tokenizer, meta: dict, state: dict) -> None:
    """The resumable checkpoint: the model (or LoRA adapter), the value head, training_state.pt."""
    if run.main:
        save_policy(run.path / CHECKPOINT, net.lm, tokenizer, meta, net.value_head, state)
    accelerator.wait_for_everyone()


def save_final(run: Run, accelerator, net, tokenizer, meta: dict, weight_dtype, base_source: str) -> None:
    """The result: a plain HF model directory (LoRA merged in); the resumable state goes."""
    import torch

    if run.main:
        model = net.lm
        if meta["lora"]:  # a plain model: loadable without peft
            model = (
                model.merge_and_unload()
                if weight_dtype == torch.float32
                else merge_lora_in_fp32(model, base_source)
            )
        save_policy(run.path / POLICY_DIR, model, tokenizer, meta)
        shutil.rmtree(run.path / CHECKPOINT, ignore_errors=True)
        shutil.rmtree(run.path / (CHECKPOINT + ".old"), ignore_errors=True)
    accelerator.wait_for_everyone()


def samples_record(
    step: int, conversations: list, row_prompt: list, answers: list, raw, ended, samples: int
) -> dict:
    """{"kind": "samples"}: `samples` of the step's answers, spread over its rows, with their
    prompt, raw reward-model score and whether they ended with EOS."""
    n = len(row_prompt)
    return {
        "kind": "samples",
        "step": step,
        "samples": [
            {
                "prompt": conversations[row_prompt[i]],
                "response": answers[i],
                "reward": float(raw[i]),
                "eos": bool(ended[i]),
            }
            for i in range(0, n, max(1, n // samples))[:samples]
        ],
    }


def evaluate_heldout(run: Run, cfg, heldout: list, base_source: str, reward_model, step: int, device) -> None:
    """The finished policy (policy/) against the reference on the held-out prompts, scored
    by the reward model: eval.json, an {"kind": "eval"} record, one line on stderr."""
    from tqdm.auto import tqdm

    from trainer.models import canonical_name

    run.status(
        "running",
        1.0,
        f"evaluating: policy against the reference on {len(heldout)} held-out prompts",
        step=step,
        total_steps=cfg.steps,
    )
    result = evaluate_policy(
        run.path / POLICY_DIR,
        base_source,
        reward_model,
        heldout,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
        device=device,
    )
    record = write_eval(
        run.path, reference_id=canonical_name(cfg.model), reward_run=str(cfg.reward), result=result
    )
    run.log(
        {
            "kind": "eval",
            "step": step,
            **{
                k: record[k]
                for k in (
                    "prompts",
                    "rm_win_rate",
                    "rm_win_rate_ci",
                    "policy_reward_mean",
                    "reference_reward_mean",
                )
            },
        }
    )
    tqdm.write(
        f"reward-model win rate over {record['reference']} on {record['prompts']} held-out prompts: "
        f"{record['rm_win_rate']:.3f} (95% CI {record['rm_win_rate_ci'][0]:.3f}-"
        f"{record['rm_win_rate_ci'][1]:.3f})",
        file=sys.stderr,
    )


def finish_done(run: Run, step: int, steps: int, totals: dict, device, t_start: float) -> int:
    """After the final save: the {"kind": "summary"} record, state `done`, exit code 0."""
    summary = {
        "kind": "summary",
        "step": step,
        "prompts": totals["prompts"],
        "gen_tokens": totals["tokens"],
        "train_seconds": round(totals["seconds"], 3),
        "prompts_per_s": round(totals["prompts"] / totals["seconds"], 4) if totals["seconds"] else None,
        "tokens_per_s": round(totals["tokens"] / totals["seconds"], 2) if totals["seconds"] else None,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "wall_s": round(time.time() - t_start, 2),
    }
    run.log(summary)
    msg = f"done: {step} steps; policy in {run.path / POLICY_DIR}"
    run.status("done", 1.0, msg, step=step, total_steps=steps)
    if run.main:
        print(msg, file=sys.stderr)
    return 0


def fail(run: Run, message: str, step: int, steps: int) -> int:
    from tqdm.auto import tqdm

    kept = run.checkpoint()
    message = f"{message}. Last good checkpoint: {kept or 'none (no checkpoint was saved yet)'}"
    run.status("failed", step / steps, message, step=step, total_steps=steps)
    if run.main:
        tqdm.write(f"error: {message}", file=sys.stderr)
    return 1


def finish_cancelled(run: Run, signum: int, step: int, steps: int) -> int:
    """After the checkpoint of `step` is saved: state `cancelled`, exit code 128 + signal."""
    from tqdm.auto import tqdm

    msg = f"cancelled at step {step} of {steps}; run the same command again to resume"
    run.status("cancelled", step / steps, msg, step=step, total_steps=steps)
    if run.main:
        tqdm.write(msg, file=sys.stderr)
    return 128 + signum


def reduce_sum(accelerator, t):
    """Sum over the processes (DDP); the tensor itself on one process."""
    return accelerator.reduce(t, reduction="sum") if accelerator.num_processes > 1 else t


# --------------------------------------------------------------------------------------
# The statistics of a step (summed over answers and over processes, then logged)
# --------------------------------------------------------------------------------------


@dataclass
class RolloutSums:
    """Steps 1-3 of one step, summed over its answers (all processes)."""

    reward: float  # the reward model's normalised score
    reward_sq: float  # its square (for the std)
    score: float  # after the missing-EOS penalty
    kl: float  # the KL shown and checked against --max-kl: k3 summed per answer (rl_math.kl_per_answer)
    kl_k1: float  # sum_t log pi/ref per answer (k1): the adaptive controller's, as in Ziegler et al.
    kl_penalty: float  # the same with the estimator the reward uses (--kl-estimator)
    entropy: float  # summed over tokens
    tokens: float  # answer tokens
    eos: float  # answers that ended with EOS
    answers: float

    @classmethod
    def gather(cls, reduce, **sums) -> RolloutSums:
        """From one tensor per field (this process's sums): one all-reduce for all of them."""
        import torch

        stacked = torch.stack([sums[f.name] for f in dataclasses.fields(cls)]).double()
        return cls(*reduce(stacked).tolist())


@dataclass
class UpdateSums:
    """Step 5, summed over its micro-batches (all processes)."""

    pg_loss: float
    value_loss: float
    clipped: float  # tokens (PPO) or answers whose ratio was clipped
    value_clipped: float  # tokens whose value was clipped (PPO)
    approx_kl: float  # 0.5 (log pi/pi_old)^2, summed over tokens
    tokens: float  # tokens updated on
    answers: float  # answers updated on

    @staticmethod
    def zeros(device):
        """The accumulator: a float64 tensor, one entry per field, in field order."""
        import torch

        return torch.zeros(len(dataclasses.fields(UpdateSums)), dtype=torch.float64, device=device)


def train_record(
    cfg,
    step: int,
    roll: RolloutSums,
    upd: UpdateSums,
    *,
    beta: float,
    explained_var: float | None,
    lr: float,
    grad_norms: list[float],
    seconds: dict,
    extra: dict,
) -> dict:
    """The {"kind": "train"} record of one step (`cfg`: the PolicyConfig; `seconds`: step_s,
    cpu_s, gen_s, score_s, train_s, elapsed_s; `extra`: metrics of the algorithm's own)."""
    import math

    from trainer.policy_config import TOKEN_ALGOS

    ppo = cfg.algo == "ppo"
    token_ratio = ppo or cfg.algo in TOKEN_ALGOS  # a ratio per token, not per answer
    per_token = ppo or cfg.loss_agg == "token"  # the loss is a mean over tokens
    count, tokens, dt = roll.answers, roll.tokens, seconds["step_s"]
    tok_updates, seq_updates = max(upd.tokens, 1.0), max(upd.answers, 1.0)
    reward_mean = roll.reward / count
    return {
        "kind": "train",
        "step": step,
        "reward_mean": reward_mean,
        "reward_std": math.sqrt(max(roll.reward_sq / count - reward_mean**2, 0.0)),  # normalised score
        "score_mean": roll.score / count,  # after the missing-EOS penalty
        "objective": roll.score / count
        - beta * roll.kl_penalty / count,  # what is maximised: score - beta * KL
        "kl": roll.kl / count,  # per answer, k3 (>= 0; rl_math.kl_per_answer)
        "kl_k1": roll.kl_k1 / count,  # per answer, sum_t log pi/ref (can be < 0)
        "kl_penalty": roll.kl_penalty / count,  # the estimator the reward uses, per answer
        "kl_coef": beta,
        "entropy": roll.entropy / max(tokens, 1.0),  # per token, at temperature T
        "clip_frac": upd.clipped / (tok_updates if token_ratio else seq_updates),
        "approx_kl": upd.approx_kl / tok_updates,  # 0.5 E[(log pi/pi_old)^2] over updates
        "pg_loss": upd.pg_loss / (tok_updates if per_token else seq_updates),
        "value_loss": upd.value_loss / tok_updates if ppo else None,
        # What the update minimised: per token (PPO, with the value loss; --loss-agg token)
        # or per answer.
        "loss": (upd.pg_loss + cfg.vf_coef * upd.value_loss) / tok_updates
        if ppo
        else upd.pg_loss / (tok_updates if per_token else seq_updates),
        "value_clip_frac": upd.value_clipped / tok_updates if ppo else None,
        # PPO: 1 - Var(returns - values) / Var(returns) of the rollout; None without a value
        # head, or when the returns did not vary (it is undefined then).
        "explained_variance": explained_var
        if explained_var is not None and math.isfinite(explained_var)
        else None,
        "response_len": tokens / count,
        "eos_rate": roll.eos / count,
        "gen_tokens": int(tokens),
        "prompts": int(count) // cfg.k,
        "rows": int(count),
        "tokens_per_s": round(tokens / dt, 2),
        "prompts_per_s": round(count / cfg.k / dt, 4),
        "step_s": round(dt, 4),
        "cpu_s": round(seconds["cpu_s"], 4),
        "gen_s": round(seconds["gen_s"], 4),
        "score_s": round(seconds["score_s"], 4),
        "train_s": round(seconds["train_s"], 4),
        "lr": lr,
        "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else None,
        "elapsed_s": round(seconds["elapsed_s"], 2),
        **extra,
    }


# --------------------------------------------------------------------------------------
# Progress a person reads: the measured step time, the time left, one line a step
# --------------------------------------------------------------------------------------


class StepClock:
    """Seconds a step, measured in this process, and the time left from them.

    The step time is the mean of the last `window` steps: recent enough to follow a
    machine whose load changes (a shared CPU), long enough not to jump with one slow
    step. The time left includes the held-out evaluation at the end, estimated from the
    same steps: it generates one answer per held-out prompt with the policy and again with
    the reference, and scores both, so it costs about 2 * heldout / rows_per_step steps'
    generation and scoring (`gen_s`, `score_s` of the metrics)."""

    def __init__(self, rows_per_step: int, heldout: int, window: int = 10):
        self.rows_per_step, self.heldout, self.window = max(rows_per_step, 1), heldout, window
        self.steps: list[tuple[float, float]] = []  # (step_s, gen_s + score_s)

    def add(self, record: dict) -> None:
        self.steps = [*self.steps, (record["step_s"], record["gen_s"] + record["score_s"])][-self.window :]

    @property
    def step_s(self) -> float | None:
        return sum(s for s, _ in self.steps) / len(self.steps) if self.steps else None

    def eta(self, steps_left: int) -> float | None:
        """Seconds until the run is done, or None before the first step."""
        if not self.steps:
            return None
        rollout_s = sum(r for _, r in self.steps) / len(self.steps)
        return steps_left * self.step_s + 2 * self.heldout / self.rows_per_step * rollout_s


def format_duration(seconds: float | None) -> str:
    """45 s, 4 min 50 s, 1 h 12 min: how long, to the precision that matters."""
    if seconds is None:
        return "unknown"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s < 600 else f"{round(s / 60)} min"
    return f"{s // 3600} h {round(s % 3600 / 60)} min"


def step_line(step: int, steps: int, record: dict, step_s: float | None, eta_s: float | None) -> str:
    """The one line a step that the log shows (the Train tab's log pane, the CLI):
    step 3/10 | reward +0.123 | KL 0.00123 | loss -0.0345 | 41.2 s/step | ETA 4 min 50 s
    (`record`: the step's metrics record; its `loss` is what the update minimised)."""
    parts = [
        f"step {step}/{steps}",
        f"reward {record['reward_mean']:+.3f}",
        f"KL {record['kl']:.3g}",
        f"loss {record['loss']:+.4g}",
        f"{step_s:.1f} s/step" if step_s is not None else "",
        f"ETA {format_duration(eta_s)}",  # after the last step: the held-out evaluation's
    ]
    return " | ".join(p for p in parts if p)
