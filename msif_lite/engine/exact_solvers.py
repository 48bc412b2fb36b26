"""Exact inverse-HVP solvers in the flat layout: a dense eigendecomposition, (preconditioned)
conjugate gradient, LiSSA, and precomputed solutions (Notebook 04 §Iterative solvers).

Each takes per-layer Grads through `apply` (the `InverseHVP` protocol of engine.ihvp) and
solves (G + λI) x = b on flat (K, P) right-hand sides; G is a dense matrix or a product
v ↦ G v such as `exact_products.ggn_matvec`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from msif_lite.engine.functional import Matvec, _check_vec
from msif_lite.engine.layers import Grads, TrackedModule, check_finite, flatten, unflatten


def _check_damping(damping: float) -> float:
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    return float(damping)


class _FlatIHVP:
    """Shared plumbing: Grads (…, out, d_in) per layer ↔ flat (K, P)."""

    name = "flat"

    def __init__(self, modules: Sequence[TrackedModule]):
        self.modules = list(modules)

    def apply(self, vectors: Grads) -> Grads:
        check_finite(vectors, "IHVP input vectors")
        flat = flatten(vectors, self.modules)
        lead = flat.shape[:-1]
        out = self.solve(flat.reshape(-1, flat.shape[-1]))
        return unflatten(out.reshape(*lead, -1).to(flat.dtype), self.modules)

    def solve(self, b: Tensor) -> Tensor:  # (K, P) → (K, P)
        raise NotImplementedError


class DenseSolveIHVP(_FlatIHVP):
    """(G + λI)⁻¹ v by a dense eigendecomposition of the symmetric G (Notebook 04)."""

    name = "dense"

    def __init__(self, G: Tensor, modules: Sequence[TrackedModule], damping: float):
        super().__init__(modules)
        self.damping = _check_damping(damping)
        p = sum(m.numel for m in self.modules)
        if G.shape != (p, p):
            raise ValueError(f"G has shape {tuple(G.shape)}, the tracked layers need ({p}, {p})")
        _check_vec(G, "G")
        evals, self.evecs = torch.linalg.eigh((G + G.T) / 2)
        shifted = evals + self.damping
        tiny = p * torch.finfo(G.dtype).eps * max(shifted.abs().max().item(), 1e-300)
        if shifted.abs().min().item() <= tiny:
            raise ValueError(
                f"G+λI is singular: set damping > 0 (smallest |eigenvalue| "
                f"{shifted.abs().min().item():.2e} with damping={self.damping})"
            )
        self.inv_evals = 1.0 / shifted

    def solve(self, b: Tensor) -> Tensor:
        q = self.evecs
        return ((b.to(q.dtype) @ q) * self.inv_evals) @ q.T


def _as_matvec(matvec: Matvec | Tensor) -> Matvec:
    if isinstance(matvec, Tensor):
        g = matvec
        return lambda v: v.to(g.dtype) @ g.T
    return matvec


class ConjugateGradientIHVP(_FlatIHVP):
    """(G + λI)⁻¹ v by (preconditioned) conjugate gradient, batched over queries (Notebook 04
    §Iterative solvers).

    The recurrences run in b's dtype (float64 for a ground truth) whatever precision
    `matvec` computes its products in. Optional:
    - preconditioner: z = M r with M ≈ (G+λI)⁻¹ symmetric positive definite (e.g. EK-FAC):
      the same exact solution in fewer iterations;
    - check_matvec: an exact (e.g. float64) G·v for the true residual at the end and for
      `refine` rounds of iterative refinement, x ← x + CG((G+λI) d = b − (G+λI)x), which
      remove the error of low-precision products;
    - snapshots: iteration counts k at which x_k is kept in `snapshot_solutions[k]` (CG with a
      budget of k iterations, from the first round of the same run; no preconditioner);
    - time_limit_s: stop iterating (and refining) after this many seconds of `solve`; the
      queries not converged by then are reported as such (`stopped_by_time` is True), and
      `late_solution` keeps x at 3/4 of the limit (how settled x is).
    After `apply`, `iterations` (K,) (all rounds), `round_residuals` (the true residuals
    before each refinement round) and `round_solutions` (x before each round that ran),
    `residuals` (K,) = ‖b − (G+λI)x‖/‖b‖
    (recomputed with check_matvec or matvec, not the recursive estimate) and `converged` (K,)
    describe each query's solve.
    """

    name = "cg"

    def __init__(self, matvec: Matvec | Tensor, modules, damping: float, max_iter: int = 500,
                 tol: float = 1e-10, progress: bool = False, *,
                 preconditioner: Matvec | None = None, check_matvec: Matvec | None = None,
                 refine: int = 0, snapshots: Sequence[int] = (),
                 time_limit_s: float | None = None):  # fmt: skip
        super().__init__(modules)
        self.time_limit_s = time_limit_s
        self.matvec, self.damping = _as_matvec(matvec), _check_damping(damping)
        self.max_iter, self.tol, self.progress = max_iter, tol, progress
        self.precond, self.refine = preconditioner, int(refine)
        self.check = _as_matvec(check_matvec) if check_matvec is not None else None
        self.snapshots = sorted(set(int(k) for k in snapshots))
        if self.snapshots and preconditioner is not None:
            raise ValueError("snapshots are plain CG iterates: use them without a "
                             "preconditioner")  # fmt: skip
        if self.refine < 0 or (self.refine and check_matvec is None):
            raise ValueError("refine needs check_matvec (the exact products) and must be >= 0")

    def _A(self, x: Tensor, matvec: Matvec | None = None) -> Tensor:
        y = (matvec or self.matvec)(x) + self.damping * x
        _check_vec(y, "(G+λI)v products")
        return y

    def _M(self, r: Tensor) -> Tensor:
        return r if self.precond is None else self.precond(r).to(r.dtype)

    def _cg(self, b: Tensor, tol: Tensor, record: bool = False) -> tuple[Tensor, Tensor]:
        """x ≈ (G+λI)⁻¹ b, stopping each row when ‖r‖ ≤ tol·‖b‖ (tol per row); record: keep
        the snapshots."""
        bnorm = b.norm(dim=1)
        x, r = torch.zeros_like(b), b.clone()
        z = self._M(r)
        p, rz = z.clone(), (r * z).sum(1)
        active = bnorm > 0
        ray_max = torch.zeros(b.shape[0], dtype=b.dtype, device=b.device)
        bar = tqdm(range(self.max_iter), desc="CG", disable=not self.progress, leave=False)
        for it in bar:
            if not active.any():
                break
            if self._out_of_time():
                self.stopped_by_time = True
                break
            if (record and self.late_solution is None and self.time_limit_s is not None
                    and time.monotonic() - self._t0 > 0.75 * self.time_limit_s):  # fmt: skip
                self.late_solution, self.late_iteration = x.clone(), it
            ap = self._A(p)
            pap, pp = (p * ap).sum(1), (p * p).sum(1)
            ray = pap / pp.clamp_min(1e-300)
            ray_max = torch.maximum(ray_max, torch.where(active, ray, 0))
            if (active & (ray <= 10 * torch.finfo(b.dtype).eps * ray_max)).any():
                raise ValueError("G+λI is singular: set damping > 0 (CG met a direction "
                                 "with pᵀ(G+λI)p ≈ 0)")  # fmt: skip
            alpha = torch.where(active, rz / pap, 0)
            x += alpha[:, None] * p
            r -= alpha[:, None] * ap
            self.iterations += active.long()
            if record and it + 1 in self.snapshots:
                self.snapshot_solutions[it + 1] = x.clone()
            rel = r.norm(dim=1) / bnorm.clamp_min(1e-300)
            active = active & (rel > tol)
            if self.progress and it % 10 == 0:
                bar.set_postfix(worst_residual=f"{float(rel.max()):.1e}", refresh=False)
            z = self._M(r)
            rz_new = (r * z).sum(1)
            p = z + torch.where(active, rz_new / rz.clamp_min(1e-300), 0)[:, None] * p
            rz = rz_new
        return x, active

    def _out_of_time(self) -> bool:
        return self.time_limit_s is not None and time.monotonic() - self._t0 > self.time_limit_s

    def solve(self, b: Tensor) -> Tensor:
        self._t0, self.stopped_by_time = time.monotonic(), False
        self.late_solution: Tensor | None = None  # x at 3/4 of time_limit_s (first round)
        self.late_iteration = 0
        bnorm = b.norm(dim=1).clamp_min(1e-300)
        self.iterations = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        self.snapshot_solutions: dict[int, Tensor] = {}
        x, active = self._cg(b, torch.full_like(bnorm, self.tol), record=True)
        for k in self.snapshots:  # a query that converged before k keeps its final x
            self.snapshot_solutions.setdefault(k, x.clone())
        self.round_residuals: list[list[float]] = []  # true residual before each refinement
        self.round_solutions: list[Tensor] = []  # x before each refinement round
        for _ in range(self.refine):
            r = b - self._A(x, self.check)
            rel = r.norm(dim=1) / bnorm
            self.round_residuals.append(rel.tolist())
            if (rel <= self.tol).all() or self._out_of_time():
                break
            self.round_solutions.append(x.clone())
            # the correction only has to bring the residual to tol·‖b‖, i.e. tol·‖b‖/‖r‖ of ‖r‖
            d, active = self._cg(r, (self.tol / rel.clamp_min(1e-300)).clamp(max=1.0))
            x = x + d
        self.residuals = (b - self._A(x, self.check)).norm(dim=1) / bnorm
        self.converged = self.residuals <= self.tol if self.refine else ~active
        if not self.converged.all():
            warnings.warn(
                f"CG: {int((~self.converged).sum())} of {b.shape[0]} queries did not reach "
                f"tol={self.tol} in max_iter={self.max_iter} (worst relative residual "
                f"{self.residuals.max().item():.2e}); raise max_iter or damping.",
                stacklevel=2,
            )
        return x


class LissaIHVP(_FlatIHVP):
    """LiSSA: v_{j+1} = v + (I − (G+λI)/scale) v_j, v_0 = v; returns v_J / scale.

    Converges when scale > λ_max(G+λI)/2 (Notebook 04 §Iterative solvers); the truncation
    error after J steps decays like (1 − (λ_min+λ)/scale)^J. After `apply`,
    `increments` (K,) = ‖v_J − v_{J−1}‖/‖v_J‖ says how settled each query is, and
    `snapshot_solutions[j]` holds v_j / scale for each j in `snapshots` (depth-j LiSSA from
    the same run).
    """

    name = "lissa"

    def __init__(self, matvec: Matvec | Tensor, modules, damping: float, depth: int = 1000,
                 scale: float = 10.0, progress: bool = False,
                 snapshots: Sequence[int] = ()):  # fmt: skip
        super().__init__(modules)
        self.matvec, self.damping = _as_matvec(matvec), _check_damping(damping)
        if not scale > 0:
            raise ValueError(f"LiSSA scale must be > 0, got {scale!r}")
        self.depth, self.scale, self.progress = depth, float(scale), progress
        self.snapshots = {int(k) for k in snapshots}
        if any(not 0 < k <= depth for k in self.snapshots):
            raise ValueError(f"LiSSA snapshots must lie in 1..depth={depth}, got {snapshots}")

    def solve(self, b: Tensor) -> Tensor:
        cur, d0, prev = b.clone(), None, None
        self.snapshot_solutions: dict[int, Tensor] = {}
        for j in tqdm(range(self.depth), desc="LiSSA", disable=not self.progress, leave=False):
            step = cur - (self.matvec(cur) + self.damping * cur) / self.scale
            _check_vec(step, "LiSSA iterates")
            d = (b + step - cur).norm(dim=1)
            cur = b + step
            d0 = d if d0 is None else d0
            if (d > 2 * d0 + 1e-300).any():
                ratio = (d / prev.clamp_min(1e-300)).max().item()
                top = self.scale * (1 + ratio)
                raise FloatingPointError(
                    f"LiSSA diverged at step {j}: scale={self.scale:g} is below "
                    f"λ_max(G+λI)/2 ≈ {top / 2:.3g} (λ_max(G+λI) ≈ {top:.3g}). Raise `scale` "
                    f"above {top / 2:.3g}; scale = λ_max ≈ {top:.3g} (or more) is safe."
                )
            prev = d
            if j + 1 in self.snapshots:
                self.snapshot_solutions[j + 1] = cur / self.scale
        self.increments = prev / cur.norm(dim=1).clamp_min(1e-300) if prev is not None else None
        return cur / self.scale


class PrecomputedIHVP(_FlatIHVP):
    """Solutions x = (G+λI)⁻¹ b computed beforehand for a fixed set of right-hand sides (e.g.
    a solver's snapshot after k iterations), served through the IHVP protocol."""

    name = "precomputed"

    def __init__(self, x: Tensor, modules: Sequence[TrackedModule]):
        super().__init__(modules)
        self.x = x

    def solve(self, b: Tensor) -> Tensor:
        if b.shape != self.x.shape:
            raise ValueError(f"precomputed solutions have shape {tuple(self.x.shape)}, got "
                             f"right-hand sides {tuple(b.shape)}: solve these queries instead")
        return self.x
