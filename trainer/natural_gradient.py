"""The second-order policy update of `train-policy --algo trpo` (Schulman et al. 2015, TRPO;
Martens 2010 for Hessian-free optimisation): one natural-gradient step per batch, inside a
KL trust region.

    x, residuals = conjugate_gradient(fvp, g, iters=10)        # (F + damping I) x = g
    search = line_search(evaluate, apply, expected_gain, max_kl=0.01, steps=10, shrink=0.5)
    result = trpo_update(parts, params, roll, advantages)      # policy_step.UpdateResult

The same rollouts and advantages as RLOO (trainer/policy_step.py, rloo's leave-one-out
baseline on the KL-penalised reward). The update, on the batch:

1. The surrogate L(theta) = (1 / answers) sum_i A_i sum_t pi_theta(y_t) / pi_old(y_t) over
   the answers' tokens, and its gradient g at the rollout policy (there it is RLOO's
   policy gradient: ratio 1).
2. The Fisher matrix F: the Hessian of the mean KL(pi_old || pi_theta) per answer token,
   over the whole vocabulary at each position, at theta = theta_old (where the KL and its
   gradient are 0, its Hessian is exactly the Fisher information). F is never formed:
   conjugate gradient needs only products F v.
3. x = (F + damping I)^-1 g by `cg_iters` conjugate-gradient iterations; the full step is
   x scaled so that its quadratic KL, 0.5 s^T F s, equals the radius delta (--trust-kl).
4. A backtracking line search over fractions 1, shrink, shrink^2, ... of that step: the
   first that improves the surrogate and whose KL, measured exactly over the vocabulary
   against the rollout policy, is <= delta is taken; if none is, no step (logged as
   step_frac 0).

How F v is computed: double backward (Pearlmutter's trick), F v = grad(grad(KL) . v). The
other two ways were worse here. A Gauss-Newton product J^T H J v needs J v, a forward-mode
(jvp) pass through the transformer, which torch supports for fewer ops than backward
(and again not for the fused attention kernels), or a double backward anyway. A finite
difference of KL gradients, (grad KL(theta + eps v) - grad KL(theta)) / eps, needs only
first-order backward, but its error is O(eps) plus rounding O(1 / eps): in fp32 about
1e-3 relative at best, and with bf16 autocast on a GPU it is noise; CG amplifies such
errors. Double backward is exact to rounding, costs about two backward passes, and works
with LoRA (the vector is then only the adapters) and with gradient checkpointing
(non-reentrant). Its catch is attention: the fused SDPA kernels (flash and
memory-efficient on CUDA, and on a CPU the flash kernel PyTorch picks by default) have no
derivative of their backward ("derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"). So the
passes that differentiate twice run under `sdpa_kernel(SDPBackend.MATH)`, the plain
matmul-softmax-matmul SDPA that autograd differentiates any number of times (a model
loaded with attn_implementation="eager" needs nothing). Only the FVP passes pay for the
slower kernel; the gradient and the line search use the default kernel.

Memory: vectors only, each the size of the trainable parameters (the gradient, CG's x, r,
p and F p, the step, the saved old weights: about 7 of them; for SmolLM2-135M without
LoRA about 3.8 GB in fp32), no n x n matrix. The KL's first-order graph over the batch is
kept while CG runs (each product is then one backward, no forward): about what one
backward over the whole batch holds, twice. The rollout policy's log-distribution over
the vocabulary at each answer token is kept for the line search's exact KL
([answers, tokens, vocab] floats: 32 x 32 x 49k = 200 MB).

DDP: torch.autograd.grad bypasses DDP's gradient hooks, so the unwrapped model runs and
each vector product is summed over the processes here (`reduce`).

torch is imported inside functions so that `preflab --help` stays instant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Vectors are lists of tensors shaped like the trainable parameters: no flat copy of a
# 135M-parameter model is ever concatenated.


def dot(xs, ys) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(xs, ys)))


def axpy(alpha: float, xs, ys):
    """alpha * x + y, a new vector."""
    return [y + alpha * x for x, y in zip(xs, ys)]


def math_attention():
    """The SDPA kernel that supports double backward (see the module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def conjugate_gradient(fvp: Callable, b: list, iters: int, tol: float = 1e-12):
    """x with fvp(x) ~= b for a symmetric positive definite product `fvp`, by at most
    `iters` conjugate-gradient iterations (starting from 0). Returns (x, the residual norms
    ||b - fvp(x)|| after 0, 1, ... iterations)."""
    import torch

    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rr = dot(r, r)
    residuals = [math.sqrt(rr)]
    for _ in range(iters):
        if rr <= tol:
            break
        Ap = fvp(p)
        pAp = dot(p, Ap)
        if not pAp > 0:  # no positive curvature along p (or NaN): stop with what we have
            break
        alpha = rr / pAp
        x = axpy(alpha, p, x)
        r = axpy(-alpha, Ap, r)
        rr_next = dot(r, r)
        residuals.append(math.sqrt(rr_next))
        p = axpy(rr_next / rr, p, r)
        rr = rr_next
    return x, residuals


def fisher_vector_product(kl_terms: Callable[[], Iterable], params: list, damping: float, reduce=None):
    """The function v -> (F + damping I) v, F the Hessian of the KL that `kl_terms()` yields
    in parts (each a scalar with its graph, one per micro-batch; their sum is the mean
    KL), by double backward under the math attention kernel. The first product builds the
    parts' first-order gradients with their graphs once; every product after (CG's
    iterations) is one more backward through them, with no new forward."""
    import torch

    cached: list = []

    def product(v: list) -> list:
        out = [torch.zeros_like(p) for p in params]
        with math_attention():
            if not cached:
                for kl in kl_terms():
                    grads = torch.autograd.grad(kl, params, create_graph=True, allow_unused=True)
                    cached.append(
                        [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
                    )
            for grads in cached:
                gv = sum((g * t).sum() for g, t in zip(grads, v))
                hv = torch.autograd.grad(gv, params, retain_graph=True, allow_unused=True)
                out = [o + h if h is not None else o for o, h in zip(out, hv)]
        if reduce is not None:
            out = [reduce(o) for o in out]
        return axpy(damping, v, out)

    return product


@dataclass
class LineSearch:
    frac: float  # the fraction of the full step taken (0: none)
    gain: float  # the surrogate's improvement at it (0 when none)
    kl: float  # the measured KL at it (0 when none)
    tries: int
    last_kl: float  # the KL of the last fraction tried (what the rejection saw)


def line_search(
    evaluate: Callable[[], tuple[float, float]],
    apply: Callable[[float], None],
    max_kl: float,
    steps: int,
    shrink: float,
) -> LineSearch:
    """Backtracking: apply(frac) sets the parameters to old + frac * full step, evaluate()
    returns (surrogate improvement, KL to the old policy) there. The first fraction of 1,
    shrink, shrink^2, ... (`steps` of them) that improves the surrogate with a KL <= max_kl
    stays applied; when none does, apply(0) restores the old parameters."""
    frac, last_kl = 1.0, float("nan")
    for i in range(steps):
        apply(frac)
        gain, kl = evaluate()
        last_kl = kl
        if kl <= max_kl and gain > 0:  # NaN fails both
            return LineSearch(frac, gain, kl, i + 1, kl)
        frac *= shrink
    apply(0.0)
    return LineSearch(0.0, 0.0, 0.0, steps, last_kl)


# --------------------------------------------------------------------------------------
# The update on a batch of rollouts
# --------------------------------------------------------------------------------------


def token_kl(old_log_dist, log_dist):
    """KL(old || new) at each position, exactly over the vocabulary: [rows, R]."""
    return (old_log_dist.exp() * (old_log_dist - log_dist)).sum(-1)


def trpo_update(parts, params: list, roll, adv):
    """Step 5 for --algo trpo on one batch (policy_step.Rollout): the module docstring's
    steps 1-4. Returns a policy_step.UpdateResult; its `extra` holds the trust region's
    metrics (surrogate_gain, expected_gain, trust_kl, step_frac, line_search_tries,
    cg_residual, cg_iters_run)."""
    import torch

    from trainer.policy_model import forward_rows, unit_rows
    from trainer.policy_run import UpdateSums
    from trainer.policy_step import UpdateResult

    cfg, net, g, n = parts.cfg, parts.net, parts.g_train, roll.n
    world = parts.accelerator.num_processes
    reduce = parts.reduce if world > 1 else None

    def total(x: float) -> float:  # summed over the processes
        return float(parts.reduce(torch.tensor(x, dtype=torch.float64, device=parts.device))) if reduce else x

    keep = (roll.ended | (not cfg.mask_truncated)).float()
    loss_mask = roll.resp_mask * keep[:, None]
    weights = adv * keep  # one advantage per answer; a filtered (cut-off) answer weighs 0
    answers, tokens = max(total(float(keep.sum())), 1.0), max(total(float(loss_mask.sum())), 1.0)
    units, per_micro = torch.arange(n // g, device=parts.device), max(1, cfg.micro_batch // g)
    micro = [unit_rows(units[i : i + per_micro], g) for i in range(0, len(units), per_micro)]

    def dist(rows):
        (log_dist, _, _), w = forward_rows(net, rows, *roll.tensors, group=g, full_dist=True)
        return log_dist, w

    def surrogate(rows, log_dist, w):  # this micro-batch's share of L(theta)
        logp = log_dist.gather(-1, roll.response[rows, :w, None]).squeeze(-1)
        ratio = torch.exp(logp - roll.old_logp[rows, :w])
        return ((ratio * loss_mask[rows, :w]).sum(1) * weights[rows]).sum() / answers

    net.train()
    # 1. The surrogate's gradient at the rollout policy, and its log-distributions there.
    grad = [torch.zeros_like(p) for p in params]
    surr_old, old_dists = 0.0, []
    for rows in micro:
        log_dist, w = dist(rows)
        s = surrogate(rows, log_dist, w)
        gs = torch.autograd.grad(s, params, allow_unused=True)
        grad = [a + b if b is not None else a for a, b in zip(grad, gs)]
        surr_old += float(s.detach())
        old_dists.append(log_dist.detach())
    if reduce:
        grad = [reduce(t) for t in grad]
    surr_old = total(surr_old)
    grad_norm = math.sqrt(dot(grad, grad))
    empty = UpdateSums.zeros(parts.device)
    if not math.isfinite(grad_norm):
        net.eval()
        return UpdateResult(empty, [], bad_grad_norm=grad_norm)

    # 2-3. Conjugate gradient on F x = g, F v by double backward of the mean KL per token.
    def kl_terms():
        for rows in micro:
            log_dist, w = dist(rows)
            yield (token_kl(log_dist.detach(), log_dist) * loss_mask[rows, :w]).sum() / tokens

    fvp = fisher_vector_product(kl_terms, params, cfg.cg_damping, reduce)
    x, residuals = conjugate_gradient(fvp, grad, cfg.cg_iters)
    xFx = dot(x, fvp(x))
    del fvp  # frees the KL's double graph before the line search
    if not (math.isfinite(xFx) and all(math.isfinite(r) for r in residuals)):
        net.eval()
        return UpdateResult(empty, [grad_norm], bad_grad_norm=float("nan"))
    scale = math.sqrt(2 * cfg.trust_kl / xFx) if xFx > 0 else 0.0
    full_step = [scale * t for t in x]
    expected = scale * dot(grad, x)

    # 4. Backtracking line search on the measured KL and the surrogate.
    old = [p.detach().clone() for p in params]

    def apply(frac: float) -> None:
        with torch.no_grad():
            for p, o, s in zip(params, old, full_step):
                p.copy_(o + frac * s)

    def evaluate() -> tuple[float, float]:
        surr, kl = 0.0, 0.0
        with torch.no_grad():
            for rows, old_dist in zip(micro, old_dists):
                log_dist, w = dist(rows)
                surr += float(surrogate(rows, log_dist, w))
                kl += float((token_kl(old_dist, log_dist) * loss_mask[rows, :w]).sum() / tokens)
        return total(surr) - surr_old, total(kl)

    search = line_search(evaluate, apply, cfg.trust_kl, cfg.line_search_steps, cfg.line_search_shrink)
    net.eval()
    # UpdateSums (policy_run): the loss is -L after the step; approx_kl its exact KL per token.
    # This process's share of totals already summed over processes (the caller sums again).
    sums = (
        torch.tensor(
            [-(surr_old + search.gain) * answers, 0.0, 0.0, 0.0, search.kl * tokens, tokens, answers],
            dtype=torch.float64,
            device=parts.device,
        )
        / world
    )
    extra = {
        "surrogate_gain": search.gain,  # L(new) - L(old), of the step taken (0: none)
        "expected_gain": expected,  # g . full step: the linear model's promise for the full step
        "trust_kl": search.kl,  # the measured KL(old || new) per token of the step taken
        "step_frac": search.frac,  # the fraction of the full step taken (0: rejected, no step)
        "line_search_tries": search.tries,
        "line_search_last_kl": search.last_kl,
        "cg_residual": residuals[-1] / residuals[0] if residuals[0] > 0 else 0.0,  # ||g - Fx|| / ||g||
        "cg_iters_run": len(residuals) - 1,
    }
    return UpdateResult(sums, [grad_norm], extra=extra)
