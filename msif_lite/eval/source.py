"""SOURCE: approximate unrolled differentiation in K segments (Bae et al. 2024, "Training
Data Attribution via Approximate Unrolled Differentiation"), on the kit's two stages and
its EK-FAC factors (issue 25; the exact unrolling it approximates is `eval.unrolled`).

Within segment k of a stage (steps [a_k, b_k), learning rates η_t, "time" T_k = Σ η_t)
the training dynamics are linearised about a stationary Hessian H_k and stationary
per-document gradients, both taken at the segment's end θ_{b_k} (so one segment over a
whole stage is the influence function at the stage's final weights). A perturbation
δθ then obeys, per step,

    δθ_{t+1} = (1 − η_t R_k) δθ_t − η_t p f,      R_k = p (H_k + a I) + wd I,

with f the perturbation of the step's gradient, p the optimiser's preconditioner (1 for
plain GD), a = α on the anchored fine-tune (its penalty's Hessian) and wd AdamW's decoupled
weight decay. In the eigenbasis of H_k (EK-FAC: Q_S ⊗ Q_A, eigenvalues D = c·Λ, c the
stage's objective scale) every factor is elementwise in the rates r = p (d + a) + wd:

    transport  E = e^{−T_k r}                     ("exp": SOURCE's continuous time)
    response   R = p (1 − e^{−T_k r}) / r         (→ p T_k as r → 0)

or, mode "steps", the exact discrete products E = Π_t (1 − η_t r), R = Σ_t η_t p Π_{s>t}
(1 − η_s r) (exact for GD on a quadratic whose Hessian is constant per segment; "exp" is
their η → 0 limit). Upweighting document z by ε adds, in expectation per unit of time,
f = ε (c_{k,z}/T_k) ∇s_z(θ_{b_k}) with c_{k,z} = Σ_{t ∈ seg k} η_t [z ∈ B_t] / n_t
(s_z the document's token-sum loss, n_t the batch's target tokens: the kit's token mean),
so the segment moves θ_{b_k} by −(c_{k,z}/T_k) R ∇s_z, and later segments carry it by E.

Two stages (`finetune_adjoint`, `pretrain_scores`): the query gradient λ = ∇m(q, θ_ft)
walks the fine-tuning segments backwards; θ_pt is the fine-tune's start *and* anchor, so
each fine-tuning segment also passes μ += α R λ (its anchor coupling) while λ ← E λ;
dm/dθ_pt = λ + μ (a single fine-tuning segment with T → ∞ gives μ = α (H_ft + αI)⁻¹ ∇m,
multi_stage's fine-tuning factor). Then the pre-training segments, last to first:

    I_source(z, q) = −dm/dw_z = Σ_k (c_{k,z}/T_k) ⟨R_k E_{k+1}ᵀ ⋯ E_Kᵀ (dm/dθ_pt), ∇s_z(θ_{b_k})⟩.

With one pre-training segment and T → ∞, R → (c (G + λ_d I))⁻¹: the influence function
(the kit's damping λ_d on the pre-training segments; fine-tuning segments damp with α
only), scaled per document by c_{1,z}/T_1 · τ̄ (τ̄ = 1/c, the mean tokens per document).

AdamW (the kit's optimiser) is not GD. The approximation made: the update is
η_t m̂/(√v̂ + ε) ≈ η_t p_l g with one scalar per tracked layer and segment,
p_l = Σ_t η_t/(√mean_l(v̂_t) + ε) / Σ_t η_t (v̂ the bias-corrected second moment, its
mean over the layer's weight and bias, sampled at the replay's checkpoints in (a_k, b_k]
and at b_k); momentum is taken as converged (m̂ ≈ g) and the gradient clip is ignored
(it rescales m and √v alike). A per-layer scalar keeps R_k symmetric and block-diagonal,
so the EK-FAC eigenbasis still diagonalises it; Adam's per-coordinate preconditioner
would not. Only the tracked layers are propagated (as in every influence method here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from msif_lite.engine.ihvp import Damping
from msif_lite.engine.layers import Grads
from msif_lite.eval.unrolled import Params, Stage, Trajectory, stage_step
from msif_lite.world.training import lr_at

Mode = Literal["exp", "steps"]


def segment_bounds(steps: int, k: int) -> list[tuple[int, int]]:
    """K near-equal segments [a, b) of `steps` optimiser steps (b_K = steps)."""
    if not 1 <= k <= steps:
        raise ValueError(f"segments must be in [1, {steps}] (the stage's steps), got {k}")
    ends = [round(steps * (j + 1) / k) for j in range(k)]
    return list(zip([0, *ends[:-1]], ends))


@dataclass(frozen=True)
class Segment:
    """Steps [start, end) of a stage: their learning rates, the per-layer preconditioner
    p_l (1 for GD) and the stage's weight decay."""

    start: int
    end: int
    lrs: tuple[float, ...]
    precond: Mapping[str, float]
    weight_decay: float = 0.0

    @property
    def time(self) -> float:
        """T = Σ η_t over the segment."""
        return float(sum(self.lrs))


@dataclass
class SegmentStates:
    """A replayed stage cut into segments: θ at each segment's end, and the segments."""

    ends: list[Params]
    segments: list[Segment]


def _adam_precond(stage: Stage, state, step: int, layers: Mapping[str, Sequence[int]]
                  ) -> dict[str, float]:  # fmt: skip
    """1/(√mean_l(v̂) + ε) per layer after `step` optimiser steps (1 for GD or step 0)."""
    if stage.optimizer == "gd" or step == 0:
        return {name: 1.0 for name in layers}
    v, bc = state[1], 1 - stage.betas[1] ** step
    out = {}
    for name, idx in layers.items():
        total = sum(float(v[i].double().sum()) for i in idx)
        count = sum(v[i].numel() for i in idx)
        out[name] = 1.0 / (math.sqrt(total / count / bc) + stage.eps)
    return out


def segments_from_trajectory(stage: Stage, traj: Trajectory, k: int,
                             layers: Mapping[str, Sequence[int]], *, w: Tensor | None = None,
                             anchor: Params | None = None) -> SegmentStates:  # fmt: skip
    """Cut a replayed stage (`eval.unrolled.run_stage(..., checkpoint_every=...)`) into k
    segments: θ at each end (replayed forward from the nearest checkpoint, at most
    `traj.every` steps) and each segment's p_l, sampled at the checkpoints inside it and at
    its end, weighted by the learning rate of the step that produced the state."""
    if not traj.checkpoints:
        raise ValueError("run_stage(..., checkpoint_every=k > 0) first")
    cfg, every = stage.cfg, traj.every
    ends, segs = [], []
    for a, b in segment_bounds(cfg.steps, k):
        j = min(b // every, len(traj.checkpoints) - 1)
        theta, state = traj.checkpoints[j]
        for t in range(j * every, b):
            theta, state = stage_step(stage, t, theta, state, w=w, anchor=anchor)
        samples = [(s, traj.checkpoints[s // every][1]) for s in range(0, b, every) if a < s]
        samples.append((b, state))
        weights = [lr_at(s - 1, cfg) for s, _ in samples]
        acc = {name: 0.0 for name in layers}
        for (s, st), eta in zip(samples, weights):
            for name, p in _adam_precond(stage, st, s, layers).items():
                acc[name] += eta * p
        acc = {name: v / sum(weights) for name, v in acc.items()}
        lrs = tuple(lr_at(t, cfg) for t in range(a, b))
        ends.append([p.detach() for p in theta])
        segs.append(Segment(a, b, lrs, acc, cfg.weight_decay))
    return SegmentStates(ends, segs)


def _propagators(r: Tensor, p: float, lrs: Sequence[float], mode: Mode
                 ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(E, R) elementwise in the rates r (see the module docstring)."""
    if mode == "steps":
        e, resp = torch.ones_like(r), torch.zeros_like(r)
        for eta in lrs:
            resp = (1 - eta * r) * resp + eta * p
            e = (1 - eta * r) * e
        return e, resp
    t = float(sum(lrs))
    x = t * r
    small = x.abs() < 1e-8
    phi = torch.where(small, 1 - x / 2, -torch.expm1(-x) / torch.where(small, 1.0, x))
    return torch.exp(-x), p * t * phi


class SegmentOperator:
    """One segment's transport E and response R as operators on per-layer vectors, in the
    eigenbasis of its curvature factors (EK-FAC: D = Λ; K-FAC factors: D = d_S d_Aᵀ).

    scale: c with H = c·G (the stage's objective scale); damping: λ_d added to G's
    eigenvalues (Damping.value of each layer's D, as the kit's inverses take it); shift:
    a added to H (α on the fine-tune); time_scale multiplies every η (the T → ∞ checks)."""

    def __init__(self, factors, segment: Segment, *, scale: float = 1.0,
                 damping: Damping = Damping(absolute=0.0), shift: float = 0.0,  # noqa: B008
                 mode: Mode = "exp", time_scale: float = 1.0):  # fmt: skip
        if mode not in ("exp", "steps"):
            raise ValueError(f"mode must be 'exp' or 'steps', got {mode!r}")
        self.segment = segment
        self._layers: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        lrs = [eta * time_scale for eta in segment.lrs]
        for f in factors.layers:
            d = f.lam if getattr(f, "lam", None) is not None else torch.outer(f.eig_s, f.eig_a)
            d = d.double()
            p = float(segment.precond[f.name])
            r = p * (scale * (d + damping.value(d)) + shift) + segment.weight_decay
            e, resp = _propagators(r, p, lrs, mode)
            self._layers[f.name] = (f.q_s.double(), f.q_a.double(), e, resp)

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(self._layers)

    def _apply(self, v: Grads, which: int) -> Grads:
        out = {}
        for name, (qs, qa, *diag) in self._layers.items():
            x = v[name].double()
            out[name] = qs @ ((qs.T @ x @ qa) * diag[which]) @ qa.T
        return out

    def transport(self, v: Grads) -> Grads:
        """E v: a perturbation at the segment's start, carried to its end (Eᵀ = E)."""
        return self._apply(v, 0)

    def response(self, v: Grads) -> Grads:
        """R v: the end's response to a unit constant forcing per unit time (Rᵀ = R)."""
        return self._apply(v, 1)


def _axpy(a: Grads, b: Grads, c: float = 1.0) -> Grads:
    return {k: a[k] + c * b[k] for k in a}


def finetune_adjoint(ops: Sequence[SegmentOperator], grad_m: Grads, alpha: float) -> Grads:
    """dm/dθ_pt from ∇m(q, θ_ft) through the fine-tuning segments (forward order `ops`):
    λ ← E λ and μ += α R λ per segment, last to first; dm/dθ_pt = λ + μ."""
    lam = {k: v.double() for k, v in grad_m.items()}
    mu = {k: torch.zeros_like(v) for k, v in lam.items()}
    for op in reversed(ops):
        mu = _axpy(mu, op.response(lam), alpha)
        lam = op.transport(lam)
    return _axpy(lam, mu)


def pretrain_scores(ops: Sequence[SegmentOperator], adjoint: Grads,
                    score: Callable[[int, Grads], Tensor]) -> Tensor:  # fmt: skip
    """Σ_k score(k, R_k E_{k+1}ᵀ⋯E_Kᵀ adjoint), the pre-training segments last to first;
    `score(k, v)` = (Q, N) (c_{k,z}/T_k) ⟨v, ∇s_z(θ_{b_k})⟩."""
    lam, total = adjoint, None
    for k in reversed(range(len(ops))):
        s = score(k, ops[k].response(lam)).double()
        total = s if total is None else total + s
        lam = ops[k].transport(lam)
    return total


def document_weights(order: Sequence[Sequence[int]], tokens: Sequence[int],
                     lrs: Sequence[float], bounds: Sequence[tuple[int, int]]
                     ) -> Tensor:  # fmt: skip
    """(K, N) c_{k,z}/T_k: Σ_{t ∈ seg k} η_t·(times z is in B_t)/n_t over T_k = Σ η_t, with
    n_t = Σ_{i ∈ B_t} tokens[i] the batch's target tokens (Σ_z c_{k,z} tokens[z] = T_k)."""
    out = torch.zeros(len(bounds), len(tokens), dtype=torch.float64)
    for k, (a, b) in enumerate(bounds):
        for t in range(a, b):
            n_t = sum(tokens[i] for i in order[t])
            for i in order[t]:
                out[k, i] += lrs[t] / n_t
        out[k] /= sum(lrs[a:b])
    return out
