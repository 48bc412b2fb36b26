"""Is θ a stationary point of the objective it was trained on? (Notebook 05, "How close to a
stationary point?"; the premise of notebook 01 §7.)

Influence functions linearise around an optimum: they assume ∇J(θ) = 0 for the training
objective J. For a model trained by a few thousand noisy AdamW steps that holds at best
approximately, so we measure it. With per-example losses ℓ_n (token sums, `Task.loss`),
weights t_n (target tokens for a per-token mean objective, 1 for a per-example mean) and a
penalty R (e.g. the proximity term (α/2)‖θ − θ_pt‖² of the fine-tune),

    J(θ) = Σ_n ℓ_n(θ) / Σ_n t_n + R(θ),     g_n = ∇ℓ_n / t_n  (example n's own mean loss),

    ∇J = Σ_n w_n g_n + ∇R,   w_n = t_n / Σ_m t_m,

    relative = ‖∇J‖ / Σ_n w_n ‖g_n‖.

Without a penalty the triangle inequality puts `relative` in [0, 1]: 0 at a stationary
point, 1 when every example's gradient points the same way (far from one, e.g. at a random
initialisation). The Hugging Face loss the kit trains with is the token mean over a batch,
whose expectation over batches is J with `Normalisation.TOKEN_MEAN` (up to the ratio of
sums within a batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from msif_lite.engine.tasks import IGNORE_INDEX, Normalisation, Task, TokenBatch


@dataclass(frozen=True)
class Stationarity:
    """Gradient norms of J = Σ_n w_n ℓ̄_n + R at one θ, over one group of parameters."""

    gradient_norm: float  # ‖∇J‖
    data_gradient_norm: float  # ‖Σ_n w_n g_n‖
    penalty_gradient_norm: float  # ‖∇R‖ (0 without a penalty)
    example_gradient_norm: float  # Σ_n w_n ‖g_n‖, the typical per-example gradient
    n_examples: int

    @property
    def relative(self) -> float:
        """‖∇J‖ / Σ_n w_n ‖g_n‖: 0 at a stationary point; ≤ 1 without a penalty."""
        return self.gradient_norm / self.example_gradient_norm

    def __str__(self) -> str:
        pen = (f", penalty gradient {self.penalty_gradient_norm:.3g}"
               if self.penalty_gradient_norm else "")
        return (f"‖∇J‖ = {self.gradient_norm:.3g} (data term {self.data_gradient_norm:.3g}{pen}); "
                f"typical per-example ‖g_n‖ = {self.example_gradient_norm:.3g}; "
                f"relative {self.relative:.3g} over {self.n_examples} examples")


def example_weights(batch, normalisation: Normalisation) -> torch.Tensor:
    """t_n per example of a batch: target tokens (TokenBatch, token mean) or ones."""
    if normalisation is Normalisation.TOKEN_MEAN and isinstance(batch, TokenBatch):
        return (batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1).double()
    if normalisation is Normalisation.TOKEN_MEAN:
        raise ValueError("Normalisation.TOKEN_MEAN needs TokenBatch batches (target tokens); "
                         "use Normalisation.EXAMPLE_MEAN for one-label examples")
    n = batch.input_ids.shape[0] if isinstance(batch, TokenBatch) else len(batch[0])
    return torch.ones(n, dtype=torch.float64)


def _one_example_batches(batch) -> list:
    """Split a batch into batches of one (one backward pass per example, on its own graph)."""
    if isinstance(batch, TokenBatch):
        return [batch.select(slice(i, i + 1)) for i in range(len(batch))]
    return [tuple(part[i:i + 1] for part in batch) for i in range(len(batch[0]))]


def _flat(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double()
                      for g, p in zip(grads, params)])


def measure_stationarity(
    model: nn.Module,
    task: Task,
    batches: Iterable,
    *,
    groups: Mapping[str, Sequence[nn.Parameter]] | None = None,
    normalisation: Normalisation = Normalisation.TOKEN_MEAN,
    penalty: Callable[[], torch.Tensor] | None = None,
    progress: bool = False,
) -> dict[str, Stationarity]:
    """`Stationarity` of J (module docstring) at the model's current θ for each parameter
    group (default: {"all": every parameter that requires grad}), from one pass over
    `batches` with one forward and backward pass per example (per-example gradients g_n)."""
    normalisation = Normalisation(normalisation)
    if groups is None:
        groups = {"all": [p for p in model.parameters() if p.requires_grad]}
    params = list({id(p): p for ps in groups.values() for p in ps}.values())
    if not params or any(not p.requires_grad for p in params):
        raise ValueError("every parameter group needs parameters that require grad "
                         "(call p.requires_grad_(True), or leave groups=None)")
    where = {name: [next(i for i, q in enumerate(params) if q is p) for p in ps]
             for name, ps in groups.items()}
    sizes = [p.numel() for p in params]
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    index = {name: torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in ids])
             for name, ids in where.items()}
    total = torch.zeros(offsets[-1], dtype=torch.float64)
    norms = {name: 0.0 for name in groups}
    weight_sum, n = 0.0, 0
    for batch in tqdm(batches, desc="stationarity", disable=not progress):
        t = example_weights(batch, normalisation)
        if (t <= 0).any():
            raise ValueError("an example has no target tokens (all labels are -100): drop it "
                             "or mark its targets")
        for one in _one_example_batches(batch):
            loss = task.loss(model, one).sum()
            g = _flat(torch.autograd.grad(loss, params, allow_unused=True), params)
            total += g
            for name, ix in index.items():
                norms[name] += float(g[ix].norm())  # t_n · ‖g_n‖ = ‖∇ℓ_n‖
        weight_sum += float(t.sum())
        n += len(t)
    if n == 0:
        raise ValueError("no examples: pass at least one batch")
    data = total / weight_sum
    pen = torch.zeros_like(data)
    if penalty is not None:
        pen = _flat(torch.autograd.grad(penalty(), params, allow_unused=True), params)
    out = {}
    for name, ix in index.items():
        grad = data[ix] + pen[ix]
        out[name] = Stationarity(float(grad.norm()), float(data[ix].norm()),
                                 float(pen[ix].norm()), norms[name] / weight_sum, n)
        if not math.isfinite(out[name].gradient_norm):
            raise FloatingPointError(f"the gradient of J over {name!r} is not finite")
    return out
