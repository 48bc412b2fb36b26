"""Unrolled metagradients: the exact first-order answer for the training run that happened,
taken through every optimiser step of pre-training *and* fine-tuning (docs: DESIGN §6).

Weights w ∈ R^N on the pre-training documents (w = 1 is the run that happened). With the
kit's batch order fixed (`world.training._train`), stage s is a deterministic map

    (θ_{t+1}, m_{t+1}, v_{t+1}) = U_t(θ_t, m_t, v_t; w, θ_anchor),

the batch loss of step t being the kit's token mean with per-document weights,

    L_t(θ; w) = Σ_{i∈B_t} w_i Σ_k ℓ_{i,k}(θ) / n_t,   n_t = target tokens of batch t (fixed),

then g_t = ∇_θ[L_t + (α/2)‖θ − θ_pt‖²] (the penalty on fine-tuning only), the clip factor
c_t = min(1, C/(‖g_t‖ + 1e-6)), and AdamW exactly as `torch.optim.AdamW` computes it:

    θ ← θ(1 − η_t wd);  m ← m + (1−β₁)(c_t g_t − m);  v ← β₂ v + (1−β₂)(c_t g_t)²
    θ ← θ − (η_t / (1−β₁^{t+1})) · m / (√v / √(1−β₂^{t+1}) + ε).

Fine-tuning starts from θ_pt(w) with fresh moments and minimises L_ft + (α/2)‖θ − θ_pt(w)‖²:
θ_pt(w) enters twice, as the start point and as the anchor. The score (sign as everywhere
in the kit, positive = helps):

    I_unrolled(z_i, q) = −∂m(q; θ_ft(w)) / ∂w_i  at w = 1.

Reverse mode (`metagradient`): λ = ∇_θ m at θ_ft; walk fine-tuning backwards carrying
adjoints of (u = θ − θ_pt, m, v) and accumulating the anchor's μ += (∂U_t/∂θ_pt)ᵀλ_{t+1}
with u held (μ starts at λ, as θ_ft = u + θ_pt); fine-tuning starts at u = 0 whatever
θ_pt is, so μ is dm/dθ_pt, start and anchor moved together (in the variables (θ, θ_pt) it
is λ_0 + μ', a difference of huge numbers where AdamW sees g = 0: see `stage_vjp`); walk
pre-training backwards from λ = μ accumulating ∂m/∂w += (∂U_t/∂w)ᵀλ_{t+1}. Each step's
vector-Jacobian product is one double backward of the batch loss (a Hessian-vector
product) pushed through the clip and AdamW, by `torch.autograd` on that one step's graph.

Memory (P parameters, T steps of a stage, checkpoint interval k, Q queries per block):
the forward pass keeps (θ, m, v) every k steps, ⌈T/k⌉·3P numbers; the reverse pass
recomputes one segment at a time from its checkpoint and holds its k states, k·3P; the
adjoints take Q·(4P + N); plus the graph of one step's double backward (a few times the
activations of one batch). The default k = ⌈√T⌉ gives O(√T·P) instead of O(T·P); the cost
is about two forward steps and Q step VJPs per step. Measured on the `lds` pipeline's
model (ci-fast, 659k parameters, batch 32, float32, one CPU thread): replay 0.04 s/step,
reverse 0.21 s/step for one query and 0.47 s/step for a block of 4, so ≈ 2.5 min per
query (≈ 1.4 min in blocks of 4) for its 700 steps; k = 25 keeps ≈ 0.4 GB of states.

Gradient clipping is differentiated as computed: where ‖g‖ + 1e-6 > C the factor
C/(‖g‖ + 1e-6) depends on θ (and w) and is differentiated; elsewhere c = 1 (torch.clamp's
derivative is 0 there). Exactly at ‖g‖ + 1e-6 = C the update has a kink and the derivative
is one-sided (clamp's convention); a float never lands there in practice. √v is
differentiated as 1/(2√v) for v > 0 and as 0 where v = 0 (a parameter whose gradient has
been exactly zero so far, e.g. the embedding row of a token no batch contained: its v stays
0 for every nearby w, so 0 is the derivative). Where 0 < |g| ≲ ε = 1e-8, AdamW's update
g/(|g| + ε) has slope up to 1/ε: the derivative there is exact but linear only over
perturbations of g below ε (finite differences need ε_fd ≲ 1e-6 even on a tiny model).

The kit's language-model pipeline and full-batch problems are in `eval.unrolled_lm`. The
replay (`replay`, `run_stage`) reproduces `world.training.pretrain` + `finetune`
bit-for-bit at w = 1 on CPU (same batch order, loss, penalty, clip and AdamW arithmetic);
`tests/test_unrolled.py` checks it. The step VJPs use PyTorch's math attention kernel (the
fused CPU kernel has no double backward); the states they are taken at are the replay's.
On CUDA the replay follows training.py's bf16 autocast; the derivatives are then those
of a bf16 computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from msif_lite.world.training import (
    TrainConfig,
    lr_at,
)

Params = list[Tensor]
BatchLoss = Callable[[Params, int, "Tensor | None"], Tensor]
"""(θ, step t, w or None) ↦ the batch loss L_t(θ; w) of step t (a 0-dim tensor)."""
Measure = Callable[[Params], Tensor]
"""θ ↦ m(q; θ) for a block of queries, shape (Q,) (or a scalar for one query)."""


def _math_attention() -> AbstractContextManager:
    """The math SDPA kernel: twice differentiable (the fused CPU kernel is not)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@dataclass
class Stage:
    """One training stage to replay: schedule and optimiser (`cfg`, as `TrainConfig` defines
    them), the batch loss of each step, and whether the proximity term (α/2)‖θ − θ_a‖²
    to an anchor θ_a is added (fine-tuning). optimizer: "adamw" (the kit's) or "gd"
    (θ ← θ(1 − η_t wd) − η_t c_t g_t, for the closed-form checks)."""

    cfg: TrainConfig
    loss: BatchLoss
    anchored: bool = False
    alpha: float = 0.0
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    forward_context: Callable[[], AbstractContextManager] = nullcontext
    vjp_context: Callable[[], AbstractContextManager] = _math_attention

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "gd"):
            raise ValueError(f"Stage.optimizer={self.optimizer!r}: use 'adamw' or 'gd'")
        if self.alpha < 0:
            raise ValueError("set Stage.alpha >= 0")


@dataclass
class TwoStage:
    """Pre-training (its loss takes the weights w ∈ R^N) from θ₀, then the anchored
    fine-tune from θ_pt(w) with anchor θ_pt(w)."""

    theta0: Params
    pretrain: Stage
    finetune: Stage
    n_weights: int
    names: list[str] = field(default_factory=list)

    def ones(self) -> Tensor:
        """w = 1 (the run that happened), float64."""
        return torch.ones(self.n_weights, dtype=torch.float64, device=self.theta0[0].device)


@dataclass
class Trajectory:
    """A replayed stage: the final θ and (θ, m, v) at steps 0, k, 2k, … (`checkpoints[j]`
    is the state before step j·k)."""

    final: Params
    every: int
    checkpoints: list[tuple[Params, tuple[Params, ...]]]


def batch_order(n: int, cfg: TrainConfig) -> list[list[int]]:
    """The example indices of every step, exactly as `training._train` draws them: a
    torch.Generator seeded with cfg.seed, a fresh permutation appended whenever fewer than
    batch_size indices are left (so a batch may straddle two epochs)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    out = []
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        out.append(order[: cfg.batch_size])
        order = order[cfg.batch_size :]
    return out


class _SafeSqrt(torch.autograd.Function):
    """√v with derivative 1/(2√v) for v > 0 and 0 at v = 0 (see the module docstring)."""

    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:
        r = v.sqrt()
        ctx.save_for_backward(r)
        return r

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (r,) = ctx.saved_tensors
        pos = r > 0
        return torch.where(pos, grad / (2 * torch.where(pos, r, torch.ones_like(r))), 0.0)


def _init_state(stage: Stage, theta: Params) -> tuple[Params, ...]:
    if stage.optimizer == "gd":
        return ()
    return ([torch.zeros_like(p) for p in theta], [torch.zeros_like(p) for p in theta])


def stage_step(stage: Stage, t: int, theta: Params, state: tuple[Params, ...], *,
               w: Tensor | None = None, anchor: Params | None = None,
               offset: Params | None = None,
               create_graph: bool = False) -> tuple[Params, tuple[Params, ...]]:  # fmt: skip
    """One step U_t: loss (+ penalty) → gradient → clip → AdamW (or GD), as training.py.

    create_graph=False: θ is detached and the update is a plain forward (the replay);
    True: the whole step is a differentiable function of (θ, state, w, anchor). `offset`
    = u = θ − θ_a given as its own tensors: the penalty's gradient is then αu (the VJP's
    (u, θ_a) parametrisation, see `stage_vjp`)."""
    cfg = stage.cfg
    lr = lr_at(t, cfg)
    if not create_graph:
        theta = [p.detach().requires_grad_() for p in theta]
    with stage.vjp_context() if create_graph else stage.forward_context():
        loss = stage.loss(theta, t, w)
    if stage.anchored and offset is None:  # training.proximity_penalty, same terms, order
        pen = 0.5 * stage.alpha * sum(((p - a) ** 2).sum() for p, a in zip(theta, anchor))
    else:
        pen = torch.zeros((), device=loss.device)
    grads = torch.autograd.grad(loss + pen, theta, create_graph=create_graph, allow_unused=True)
    if any(g is None for g in grads):
        raise ValueError("a parameter gets no gradient from the batch loss; the kit's AdamW "
                         "would skip it, which the replay does not model")  # fmt: skip
    if stage.anchored and offset is not None:
        grads = [g + stage.alpha * u for g, u in zip(grads, offset)]
    with nullcontext() if create_graph else torch.no_grad():
        grads = list(grads)
        if cfg.grad_clip > 0:  # torch.nn.utils.clip_grad_norm_ (foreach norms on CPU/CUDA)
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
            coef = torch.clamp(cfg.grad_clip / (total + 1e-6), max=1.0)
            grads = [g * coef for g in grads]
        if not create_graph:
            theta = [p.detach() for p in theta]
        if cfg.weight_decay != 0:
            theta = [p * (1 - lr * cfg.weight_decay) for p in theta]
        if stage.optimizer == "gd":
            return [p - lr * g for p, g in zip(theta, grads)], ()
        b1, b2 = stage.betas
        step = float(t + 1)
        m = [torch.lerp(m_, g, 1 - b1) for m_, g in zip(state[0], grads)]
        v = [v_.mul(b2).addcmul(g, g, value=1 - b2) for v_, g in zip(state[1], grads)]
        step_size = lr / (1 - b1**step)
        bc2_sqrt = (1 - b2**step) ** 0.5
        new = [p.addcdiv(m_, (_SafeSqrt.apply(v_) / bc2_sqrt).add(stage.eps), value=-step_size)
               for p, m_, v_ in zip(theta, m, v)]  # fmt: skip
        return new, (m, v)


def run_stage(stage: Stage, theta: Params, *, w: Tensor | None = None,
              anchor: Params | None = None, checkpoint_every: int = 0) -> Trajectory:  # fmt: skip
    """Replay a stage from θ (fresh optimiser state); keep (θ, m, v) every k steps."""
    state = _init_state(stage, theta)
    theta = [p.detach() for p in theta]
    ckpts = []
    for t in range(stage.cfg.steps):
        if checkpoint_every and t % checkpoint_every == 0:
            ckpts.append((theta, state))
        theta, state = stage_step(stage, t, theta, state, w=w, anchor=anchor)
    return Trajectory(theta, checkpoint_every, ckpts)


def replay(problem: TwoStage, w: Tensor | None = None) -> tuple[Params, Params]:
    """(θ_pt(w), θ_ft(w)): pre-train with weights w (None: the unweighted kit loss), then
    fine-tune from θ_pt anchored at θ_pt. Bit-for-bit training.py at w = None or 1."""
    theta_pt = run_stage(problem.pretrain, problem.theta0, w=w).final
    theta_ft = run_stage(problem.finetune, theta_pt, anchor=theta_pt).final
    return theta_pt, theta_ft


@dataclass
class StageAdjoint:
    """Result of one stage's reverse pass for Q queries (leading dim Q everywhere):
    `theta` = ∂m/∂θ_start (anchor held), `anchor` = ∂m/∂θ_anchor (start held) and
    `both` = ∂m/∂θ_pt when θ_pt is start and anchor at once (None if not anchored);
    `w` = ∂m/∂w through this stage (None if its loss has no weights)."""

    theta: Params
    anchor: Params | None
    both: Params | None
    w: Tensor | None


def _leaf(xs: Params) -> Params:
    return [x.detach().requires_grad_() for x in xs]


def stage_vjp(stage: Stage, traj: Trajectory, adjoint: Params, *, w: Tensor | None = None,
              anchor: Params | None = None) -> StageAdjoint:  # fmt: skip
    """Walk a replayed stage backwards: given λ_T = ∂m/∂θ_T (Q, *shape) per parameter,
    return ∂m/∂θ_0, the anchor's μ = Σ_t (∂U_t/∂θ_a)ᵀ λ_{t+1} and Σ_t (∂U_t/∂w)ᵀ λ_{t+1}.

    Each segment [j·k, (j+1)·k) is recomputed from its checkpoint (no graph), then its
    steps are differentiated last to first, one step graph at a time, Q VJPs per graph.

    Anchored stages are differentiated in the variables (u = θ − θ_a, θ_a): the penalty's
    gradient αu then depends on u alone, so μ never receives the ±α∂m/∂g pair that the
    (θ, θ_a) variables would add to it and take away again. That pair is huge where the
    fine-tune's gradient is exactly 0 at its start (a token no batch has held yet: g =
    α(θ − θ_a) = 0, where AdamW's g/(|g| + ε) has slope 1/ε, compounding every step);
    in (θ, θ_a) its cancellation in ∂m/∂θ_start + ∂m/∂θ_anchor loses every digit."""
    if not traj.checkpoints:
        raise ValueError("run_stage(..., checkpoint_every=k > 0) first: the reverse pass "
                         "recomputes each segment from its checkpoint")  # fmt: skip
    k, n_steps, q = traj.every, stage.cfg.steps, adjoint[0].shape[0]
    lam = [a.clone() for a in adjoint]  # λ for θ, or for u = θ − θ_a when anchored
    lam_state = tuple([torch.zeros_like(a) for a in lam] for _ in _init_state(stage, lam))
    mu = [a.clone() for a in adjoint] if stage.anchored else None  # θ_T = u_T + θ_a
    gw = None if w is None else torch.zeros(q, *w.shape, dtype=w.dtype, device=w.device)
    anchor_leaf = _leaf(anchor) if stage.anchored else None
    w_leaf = None if w is None else w.detach().requires_grad_()
    for j in reversed(range(len(traj.checkpoints))):
        theta, state = traj.checkpoints[j]
        seg = [(theta, state)]
        for t in range(j * k, min((j + 1) * k, n_steps) - 1):
            theta, state = stage_step(stage, t, theta, state, w=w, anchor=anchor)
            seg.append((theta, state))
        for t in reversed(range(j * k, min((j + 1) * k, n_steps))):
            theta_t, state_t = seg.pop()
            st = tuple(_leaf(s) for s in state_t)
            if stage.anchored:
                u = _leaf([p - a for p, a in zip(theta_t, anchor)])
                th = [x + a for x, a in zip(u, anchor_leaf)]
                new_th, new_st = stage_step(stage, t, th, st, w=w_leaf, anchor=anchor_leaf,
                                            offset=u, create_graph=True)  # fmt: skip
                new_th = [p - a for p, a in zip(new_th, anchor_leaf)]
                leaves = u
            else:
                leaves = _leaf(theta_t)
                new_th, new_st = stage_step(stage, t, leaves, st, w=w_leaf, create_graph=True)
            outs = new_th + [x for s in new_st for x in s]
            ins = leaves + [x for s in st for x in s]
            extra = (anchor_leaf or []) + ([w_leaf] if w_leaf is not None else [])
            n_th, n_in = len(leaves), len(ins)
            cots = lam + [x for s in lam_state for x in s]
            new_lam = [torch.empty_like(a) for a in lam]
            new_state = tuple([torch.empty_like(a) for a in s] for s in lam_state)
            flat_state = [x for s in new_state for x in s]
            for i in range(q):
                got = torch.autograd.grad(outs, ins + extra, [c[i] for c in cots],
                                          retain_graph=i < q - 1, allow_unused=True)
                got = [torch.zeros_like(x) if g is None else g for g, x in zip(got, ins + extra)]
                for a, g in zip(new_lam, got[:n_th]):
                    a[i] = g
                for a, g in zip(flat_state, got[n_th:n_in]):
                    a[i] = g
                rest = got[n_in:]
                if mu is not None:
                    for a, g in zip(mu, rest[: len(mu)]):
                        a[i] += g
                    rest = rest[len(mu) :]
                if gw is not None:
                    gw[i] += rest[0]
            lam, lam_state = new_lam, new_state
    if mu is None:
        return StageAdjoint(lam, None, None, gw)
    # θ_start enters only through u_0 = θ_start − θ_a; θ_a through u_0 and every step
    return StageAdjoint(lam, [b - a for a, b in zip(lam, mu)], mu, gw)


def _adjoint_of(measure: Measure, theta: Params) -> tuple[Tensor, Params]:
    """m(θ) (Q,) and its gradients, one (Q, *shape) tensor per parameter."""
    th = _leaf(theta)
    m = measure(th).reshape(-1)
    rows = [torch.autograd.grad(m[i], th, retain_graph=i < len(m) - 1, allow_unused=True)
            for i in range(len(m))]  # fmt: skip
    grads = [torch.stack([torch.zeros_like(p) if r[j] is None else r[j] for r in rows])
             for j, p in enumerate(th)]  # fmt: skip
    return m.detach(), grads


def default_checkpoint_every(steps: int) -> int:
    """k = ⌈√T⌉: memory (⌈T/k⌉ + k)·3P, about 2√T·3P."""
    return max(1, math.ceil(math.sqrt(steps)))


def finetune_adjoint(
    problem: TwoStage, theta_pt: Params, measure: Measure, *, checkpoint_every: int | None = None
) -> tuple[Tensor, StageAdjoint]:
    """m(θ_ft) and the fine-tune's reverse pass from θ_pt: `.theta` = ∂m/∂θ_start,
    `.anchor` = ∂m/∂θ_anchor, `.both` = dm/dθ_pt (start and anchor moving together, as w
    moves them): the part of the unrolled answer the fine-tune contributes."""
    st = problem.finetune
    k = checkpoint_every or default_checkpoint_every(st.cfg.steps)
    traj = run_stage(st, theta_pt, anchor=theta_pt, checkpoint_every=k)
    m, lam = _adjoint_of(measure, traj.final)
    return m, stage_vjp(st, traj, lam, anchor=theta_pt)


def pretrain_metagradient(problem: TwoStage, adjoint: Params, w: Tensor | None = None, *,
                          checkpoint_every: int | None = None,
                          trajectory: Trajectory | None = None) -> Tensor:  # fmt: skip
    """(Q, N) Σ_t (∂U_t/∂w)ᵀ λ_{t+1} for λ_T = `adjoint` = ∂m/∂θ_pt: the pre-training part."""
    st = problem.pretrain
    w = problem.ones() if w is None else w
    if trajectory is None:
        k = checkpoint_every or default_checkpoint_every(st.cfg.steps)
        trajectory = run_stage(st, problem.theta0, w=w, checkpoint_every=k)
    return stage_vjp(st, trajectory, adjoint, w=w).w


def metagradient(problem: TwoStage, measure: Measure, w: Tensor | None = None, *,
                 checkpoint_every: int | None = None) -> Tensor:  # fmt: skip
    """(Q, N) dm(q; θ_ft(w))/dw_i through both stages, one reverse pass for the block of
    queries `measure` returns: fine-tune backwards (λ_0, μ), θ_pt's adjoint λ_0 + μ,
    pre-training backwards. `checkpoint_every` = k (default ⌈√T⌉ per stage)."""
    w = problem.ones() if w is None else w
    kp = checkpoint_every or default_checkpoint_every(problem.pretrain.cfg.steps)
    traj = run_stage(problem.pretrain, problem.theta0, w=w, checkpoint_every=kp)
    _, ft = finetune_adjoint(problem, traj.final, measure, checkpoint_every=checkpoint_every)
    return pretrain_metagradient(problem, ft.both, w, trajectory=traj)


def unrolled_scores(problem: TwoStage, measure: Measure, w: Tensor | None = None, *,
                    checkpoint_every: int | None = None) -> Tensor:  # fmt: skip
    """(Q, N) I_unrolled(z_i, q) = −∂m(q; θ_ft(w))/∂w_i (positive = z_i helps q)."""
    return -metagradient(problem, measure, w, checkpoint_every=checkpoint_every)
