"""The Hessian-free update of `train-policy --algo trpo` (trainer/natural_gradient.py):
its Fisher-vector product against Fisher matrices formed explicitly, conjugate gradient,
the line search's trust region, and the hidden-rule learning test (conftest.policy_world)."""

import json
import math

import pytest
import torch
from helpers import TRAIN_DEVICE, banana_rate, metric_records

from trainer import natural_gradient as ng
from trainer.policy import train


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine: one intra-op thread is faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# The Fisher-vector product on a tiny model
# --------------------------------------------------------------------------------------

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tiny_batch():
    """A tiny Llama as the policy (PolicyNet, as trpo runs it) and a batch of k = 2 answers
    to each of 2 prompts: (net, forward arguments, answer mask, n_prompt)."""
    from trainer.models import build_tiny_model
    from trainer.policy_model import load_causal_lm, policy_net

    lm = load_causal_lm(str(build_tiny_model()), torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # not all ones: a generic point
        lm.model.norm.weight.mul_(1 + 0.2 * torch.randn(64, generator=gen))
    net = policy_net(lm).eval()
    k, P, R = 2, 6, 4
    query = torch.randint(10, 1000, (2, P), generator=gen).repeat_interleave(k, 0)
    query_mask = torch.ones_like(query)
    query_mask[:k, :2] = 0  # the first prompt is left-padded
    response = torch.randint(10, 1000, (2 * k, R), generator=gen)
    resp_mask = torch.ones(2 * k, R)
    resp_mask[1, 2:] = 0  # answers of different lengths
    ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, resp_mask.long()], 1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return net, (ids, mask, position_ids, P, TEMPERATURE), resp_mask, k


def _subset(net, names):
    """Train only these parameters (by name); the rest frozen."""
    params = dict(net.lm.named_parameters())
    for p in net.parameters():
        p.requires_grad_(False)
    chosen = [params[n] for n in names]
    for p in chosen:
        p.requires_grad_(True)
    return chosen


def _kl_terms(net, args, resp_mask, group):
    """The mean KL per answer token to the policy at its current weights, as trpo_update
    builds it: one part."""

    def terms():
        log_dist, _, _ = net(*args, group=group, full_dist=True)
        yield (ng.token_kl(log_dist.detach(), log_dist) * resp_mask).sum() / resp_mask.sum()

    return terms


def _flat(vectors):
    return torch.cat([v.reshape(-1) for v in vectors])


def _split(flat, params):
    out, i = [], 0
    for p in params:
        out.append(flat[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


def test_fvp_equals_the_analytic_fisher_of_the_final_norm(tiny_batch):
    """For the final RMSNorm's weight w the Fisher has a closed form: logits = W (w * u) / T,
    so J_t = W diag(u_t) / T and F = mean_t J_t^T (diag p_t - p_t p_t^T) J_t. No double
    backward in forming it; the FVP (double backward of the KL) must give F v."""
    net, args, resp_mask, k = tiny_batch
    (w,) = params = _subset(net, ["model.norm.weight"])
    ids, mask, position_ids, P, T = args
    with torch.no_grad():
        hidden = net.lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
        h = hidden[:, P - 1 : -1]  # the states that predict the answer tokens
        u = h / w  # the normalised state before the weight
        W = net.lm.get_output_embeddings().weight
        p = torch.softmax((h @ W.T).double() / T, dim=-1)
        fisher = torch.zeros(64, 64, dtype=torch.float64)
        for i, t in resp_mask.nonzero().tolist():
            J = (W * u[i, t]).double() / T  # [vocab, 64]
            pt = p[i, t]
            fisher += J.T @ (pt[:, None] * J) - (J.T @ pt)[:, None] * (pt @ J)[None, :]
        fisher /= resp_mask.sum()
    gen = torch.Generator().manual_seed(1)
    for group in (1, k):  # separate rows, and the shared-prompt forward trpo uses with k > 1
        fvp = ng.fisher_vector_product(_kl_terms(net, args, resp_mask, group), params, damping=0.0)
        for _ in range(3):
            v = torch.randn(64, generator=gen)
            (got,) = fvp([v])
            expect = (fisher @ v.double()).float()
            assert torch.allclose(got, expect, rtol=1e-3, atol=1e-6 * expect.abs().max()), (
                (got - expect).abs().max()
            )
    # damping adds d v
    fvp = ng.fisher_vector_product(_kl_terms(net, args, resp_mask, 1), params, damping=0.5)
    (got,) = fvp([v])
    assert torch.allclose(got, (fisher @ v.double()).float() + 0.5 * v, rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def explicit_fisher(tiny_batch):
    """A parameter subset reaching through both layers' attention (so the double backward
    runs through SDPA), and its Fisher as a matrix: the Hessian of the mean KL at the
    current weights, formed by torch.autograd.functional.hessian on a flat vector."""
    net, args, resp_mask, k = tiny_batch
    names = ["model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"]
    params = _subset(net, names)
    with torch.no_grad():
        old, _, _ = net(*args, full_dist=True)
    flat0 = _flat([p.detach() for p in params])

    def mean_kl(flat):
        weights = dict(zip(names, _split(flat, params)))
        log_dist, _, _ = torch.func.functional_call(
            net, {f"lm.{n}": w for n, w in weights.items()}, args, {"full_dist": True}
        )
        return (ng.token_kl(old, log_dist) * resp_mask).sum() / resp_mask.sum()

    with ng.math_attention():
        fisher = torch.autograd.functional.hessian(mean_kl, flat0)
    return net, args, resp_mask, k, params, fisher


def test_fvp_equals_the_autograd_hessian_of_the_kl(explicit_fisher):
    net, args, resp_mask, k, params, fisher = explicit_fisher
    assert fisher.shape == (128, 128)
    assert torch.allclose(fisher, fisher.T, atol=1e-6)
    assert torch.linalg.eigvalsh(fisher.double()).min() > -1e-6  # a Fisher: positive semi-definite
    gen = torch.Generator().manual_seed(2)
    for group in (1, k):
        fvp = ng.fisher_vector_product(_kl_terms(net, args, resp_mask, group), params, damping=0.0)
        for _ in range(3):  # the first product's graph serves the next ones
            v = torch.randn(128, generator=gen)
            got = _flat(fvp(_split(v, params)))
            expect = fisher @ v
            assert torch.allclose(got, expect, rtol=1e-3, atol=1e-5 * expect.abs().max()), (
                (got - expect).abs().max()
            )


def test_the_default_sdpa_kernel_has_no_double_backward_on_cpu(explicit_fisher):
    """Why the FVP forces the math kernel: outside it, a CPU's default SDPA refuses."""
    net, args, resp_mask, k, params, fisher = explicit_fisher
    if net.lm.config._attn_implementation != "sdpa" or TRAIN_DEVICE != "cpu":
        pytest.skip("about the CPU's SDPA kernels")
    (kl,) = _kl_terms(net, args, resp_mask, 1)()
    grads = torch.autograd.grad(kl, params, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(sum(g.sum() for g in grads), params)


# --------------------------------------------------------------------------------------
# Conjugate gradient
# --------------------------------------------------------------------------------------


def test_cg_solves_the_fisher_system_and_its_residuals_fall(explicit_fisher):
    *_, fisher = explicit_fisher
    A = fisher.double() + 0.1 * torch.eye(128, dtype=torch.float64)  # damped, as trpo solves it
    b = torch.randn(128, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = torch.linalg.solve(A, b)
    x, residuals = ng.conjugate_gradient(lambda v: [A @ v[0]], [b], iters=128, tol=1e-24)
    assert torch.allclose(x[0], exact, rtol=1e-6, atol=1e-8)
    assert residuals[-1] < 1e-8 * residuals[0]
    assert residuals[0] == pytest.approx(float(b.norm()))
    # The residuals fall over the iterations (CG's guarantee is the A-norm of the error,
    # which falls at every iteration; the residual's norm falls overall, by orders).
    errors = []
    for iters in range(1, 12):
        xi, res = ng.conjugate_gradient(lambda v: [A @ v[0]], [b], iters=iters)
        e = xi[0] - exact
        errors.append(float(e @ A @ e))
        assert res[-1] == pytest.approx(
            float((b - A @ xi[0]).norm()), rel=1e-6
        )  # it reports the true residual
    converged = 1e-12 * errors[0]  # rounding's floor, once CG has solved it
    assert all(
        later <= earlier * (1 + 1e-9) or later < converged for earlier, later in zip(errors, errors[1:])
    ), errors
    assert errors[-1] < 1e-4 * errors[0], errors
    assert res[-1] < 0.1 * res[0]


def test_cg_on_the_model_fvp_reaches_the_damped_solution(explicit_fisher):
    net, args, resp_mask, k, params, fisher = explicit_fisher
    fvp = ng.fisher_vector_product(_kl_terms(net, args, resp_mask, 1), params, damping=0.1)
    g = torch.randn(128, generator=torch.Generator().manual_seed(4))
    x, residuals = ng.conjugate_gradient(fvp, _split(g, params), iters=40)
    exact = torch.linalg.solve(fisher.double() + 0.1 * torch.eye(128, dtype=torch.float64), g.double())
    assert residuals[-1] < 1e-3 * residuals[0]
    assert torch.allclose(_flat(x).double(), exact, rtol=1e-2, atol=1e-3 * exact.abs().max())


# --------------------------------------------------------------------------------------
# The line search: never a step with a KL above delta
# --------------------------------------------------------------------------------------


def _categorical_problem(step_scale: float):
    """A softmax policy over 6 actions (logits theta), its surrogate sum_a pi(a) A(a) and exact
    KL(old || new); the full step is the gradient times `step_scale`."""
    theta_old = torch.tensor([0.5, -0.2, 0.1, 0.0, 0.3, -0.5], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.5, 0.0], dtype=torch.float64)
    old = torch.log_softmax(theta_old, 0)
    theta = theta_old.clone().requires_grad_(True)
    (torch.softmax(theta, 0) @ adv).backward()
    full_step = step_scale * theta.grad
    params = theta_old.clone()
    kls = []

    def apply(frac):
        params.copy_(theta_old + frac * full_step)

    def evaluate():
        new = torch.log_softmax(params, 0)
        kl = float((old.exp() * (old - new)).sum())
        kls.append(kl)
        return float(new.exp() @ adv - old.exp() @ adv), kl

    return apply, evaluate, params, theta_old, full_step, kls


def test_the_line_search_shrinks_a_step_that_leaves_the_trust_region():
    apply, evaluate, params, theta_old, full_step, kls = _categorical_problem(step_scale=20.0)
    delta = 0.01
    search = ng.line_search(evaluate, apply, delta, steps=10, shrink=0.5)
    assert kls[0] > delta  # the full step violates the trust region...
    assert 0 < search.frac < 1 and search.tries > 1  # ...so a fraction of it is taken
    assert search.kl <= delta and search.gain > 0 and search.kl == kls[-1]
    assert all(kl > delta for kl in kls[:-1])  # every fraction before it was outside
    assert torch.allclose(params, theta_old + search.frac * full_step)  # and it is what is applied


def test_the_line_search_takes_no_step_rather_than_one_outside_delta():
    # The trust region too small for any of the fractions tried: no step, weights restored.
    apply, evaluate, params, theta_old, _, kls = _categorical_problem(step_scale=50.0)
    search = ng.line_search(evaluate, apply, 1e-9, steps=3, shrink=0.5)
    assert search.frac == 0 and search.gain == 0 and search.kl == 0 and search.tries == 3
    assert min(kls) > 1e-9 and search.last_kl == kls[-1]
    assert torch.equal(params, theta_old)
    # A step that makes the surrogate worse (downhill) is refused however small its KL.
    apply, evaluate, params, theta_old, _, _ = _categorical_problem(step_scale=-1e-3)
    search = ng.line_search(evaluate, apply, 0.01, steps=5, shrink=0.5)
    assert search.frac == 0 and torch.equal(params, theta_old)


# --------------------------------------------------------------------------------------
# train-policy --algo trpo
# --------------------------------------------------------------------------------------


def test_trpo_learns_the_hidden_rule_within_its_trust_region(policy_world, tmp_path):
    rm, policy, prompts = policy_world
    run_dir = tmp_path / "trpo"
    settings = {
        "model": str(policy),
        "reward": str(rm),
        "prompts": str(prompts),
        "run_dir": str(run_dir),
        "algo": "trpo",
        "steps": 12,
        "batch_size": 4,
        "max_new_tokens": 12,
        "temperature": 1.0,
        "trust_kl": 0.05,
        "cg_iters": 8,
        "kl_estimator": "k3",
        "device": TRAIN_DEVICE,
        "progress": False,
        "seed": 0,
    }
    assert train(settings) == 0
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["algo"] == "trpo" and config["k"] == 4  # rloo's samples per prompt
    assert (config["trust_kl"], config["cg_iters"], config["cg_damping"]) == (0.05, 8, 0.1)
    assert (config["line_search_steps"], config["line_search_shrink"]) == (10, 0.5)
    records = metric_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        assert 0 <= r["trust_kl"] <= 0.05  # never a step outside the trust region
        assert 0 <= r["step_frac"] <= 1 and 1 <= r["line_search_tries"] <= 10
        assert r["step_frac"] == 0 or r["surrogate_gain"] > 0
        assert 0 <= r["cg_residual"] < 1 and 1 <= r["cg_iters_run"] <= 8
        assert all(math.isfinite(r[key]) for key in ("loss", "grad_norm", "expected_gain", "approx_kl"))
    assert sum(r["step_frac"] > 0 for r in records) >= 9  # it does step
    first = sum(r["reward_mean"] for r in records[:3]) / 3
    last = sum(r["reward_mean"] for r in records[-5:]) / 5
    assert last > first + 0.4, (first, last)
    before, after = banana_rate(policy), banana_rate(run_dir / "policy")
    assert after > before + 0.2, (before, after)
    assert json.loads((run_dir / "policy" / "preflab_policy.json").read_text())["algo"] == "trpo"


def test_trpo_with_lora_steps_the_adapters_only(policy_world, tmp_path):
    rm, policy, prompts = policy_world
    run_dir = tmp_path / "trpo-lora"
    settings = {
        "model": str(policy),
        "reward": str(rm),
        "prompts": str(prompts),
        "run_dir": str(run_dir),
        "algo": "trpo",
        "lora_r": 4,
        "steps": 2,
        "batch_size": 2,
        "max_new_tokens": 6,
        "temperature": 1.0,
        "micro_batch": 4,  # two micro-batches: the KL in two parts
        "eval_prompts": 0,
        "device": TRAIN_DEVICE,
        "progress": False,
    }
    assert train(settings) == 0
    records = metric_records(run_dir)
    assert all(0 <= r["trust_kl"] <= 0.01 and math.isfinite(r["loss"]) for r in records)
    assert any(r["step_frac"] > 0 for r in records)
    from trainer.models import load_model

    base, _ = load_model(str(policy), device="cpu")
    tuned, _ = load_model(str(run_dir / "policy"), device="cpu")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base.state_dict()[q], tuned.state_dict()[q])  # the adapters, merged in
    assert torch.equal(base.state_dict()["lm_head.weight"], tuned.state_dict()["lm_head.weight"])


def test_trpo_settings_are_checked(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"prompt": "hello"}\n')
    for extra, expect in [
        ({"trust_kl": 0.0}, "--trust-kl must be positive"),
        ({"cg_iters": 0}, "--cg-iters must be at least 1"),
        ({"line_search_shrink": 1.0}, "--line-search-shrink must be in (0, 1)"),
        ({"k": 1}, "--k must be at least 2 for trpo"),
    ]:
        run_dir = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
        cfg = {"model": "tiny", "reward": str(tmp_path), "prompts": str(pool), "run_dir": str(run_dir)}
        assert train({**cfg, "algo": "trpo", "progress": False, **extra}) == 2
        assert expect in json.loads((run_dir / "status.json").read_text())["message"]


def test_trpo_stops_on_sigterm_and_resumes_where_it_left_off(policy_world, tmp_path, monkeypatch):
    """The other algorithms' SIGTERM handling and resume (trainer.runs.supervise, the
    checkpoint), with trpo: a SIGTERM during step 2 saves step 2; the same run again
    finishes steps 3-4."""
    import os
    import signal

    from trainer.reward_model import RewardModel

    rm, policy, prompts = policy_world
    run_dir = tmp_path / "trpo-resume"
    settings = {
        "model": str(policy),
        "reward": str(rm),
        "prompts": str(prompts),
        "run_dir": str(run_dir),
        "algo": "trpo",
        "steps": 4,
        "batch_size": 2,
        "k": 2,
        "max_new_tokens": 6,
        "temperature": 1.0,
        "eval_prompts": 0,
        "device": TRAIN_DEVICE,
        "progress": False,
    }
    score, calls = RewardModel.score, []

    def score_then_sigterm(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # during step 2's rollout
            os.kill(os.getpid(), signal.SIGTERM)
        return score(self, *args, **kwargs)

    monkeypatch.setattr(RewardModel, "score", score_then_sigterm)
    assert train(settings) == 128 + signal.SIGTERM
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "cancelled" and status["step"] == 2
    monkeypatch.setattr(RewardModel, "score", score)
    assert train({"run_dir": str(run_dir), "progress": False}) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "resume"] == [2]
    assert all("trust_kl" in r for r in records if r["kind"] == "train")
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
