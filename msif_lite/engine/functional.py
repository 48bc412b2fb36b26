"""`torch.func` plumbing shared by the exact references and the convex refits: a model's
output as a module whose parameters `functional_call` can swap, and the tracked layers'
parameters as {name: tensor} dicts ↔ the flat (..., P) layout of `engine.layers.flatten`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import Tensor, nn

from msif_lite.engine.layers import TrackedModule, flatten, unflatten
from msif_lite.engine.tasks import Task

Matvec = Callable[[Tensor], Tensor]


class OutputOf(nn.Module):
    """Wraps `task.output(model, batch)` so `functional_call` can swap the parameters."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch):
        return self.task.output(self.model, batch)


def _as_list(batches) -> list:
    """A list is a list of batches; anything else (a tuple (x, y), a TokenBatch) is one batch."""
    return list(batches) if isinstance(batches, list) else [batches]


def math_sdpa():
    """Forward-mode AD needs the composite SDPA kernel (the fused CPU one has no jvp)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - very old torch
        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def param_key(name: str) -> str:
    """The name of `model`'s parameter `name` inside `OutputOf(model, task)`, as
    `functional_call` wants it (a bare nn.Linear model has layer name '')."""
    return "model." + name


def _check_eval(model: nn.Module) -> None:
    """Active dropout makes every forward pass a different function: refuse it."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in model.modules()):
        raise RuntimeError("exact references need a deterministic model: call model.eval() "
                           "(dropout is active)")  # fmt: skip


def tracked_params(modules: Sequence[TrackedModule]) -> dict[str, Tensor]:
    return {param_key(n): p.detach() for m in modules for n, p in m.parameters()}


def to_params(vec: Tensor, modules: Sequence[TrackedModule]) -> dict[str, Tensor]:
    """Flat (..., P) → {'model.<layer>.weight': ..., ...} (Conv1D weights transposed back)."""
    mats, out = unflatten(vec, modules), {}
    for m in modules:
        for (n, _), t in zip(m.parameters(), m.matrix_to_params(mats[m.name])):
            out[param_key(n)] = t
    return out


def to_flat(params: dict[str, Tensor], modules: Sequence[TrackedModule]) -> Tensor:
    mats = {}
    for m in modules:
        ws = [params[param_key(n)] for n, _ in m.parameters()]
        mats[m.name] = m.params_to_matrix(ws[0], ws[1] if m.has_bias else None)
    return flatten(mats, modules)


def _n_examples(task: Task, batches: list) -> int:
    return sum(task.batch_size(b) for b in batches)


def _check_vec(v: Tensor, what: str) -> None:
    if not torch.isfinite(v).all():
        raise FloatingPointError(f"{what} contain NaN or inf; check the inputs and the model.")



def _floats_to(batch, dtype: torch.dtype):
    """A (x, y) batch with its floating-point inputs in `dtype` (token batches pass as they are)."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
                           for t in batch)  # fmt: skip
    return batch


def modules_of(model: nn.Module, modules: Sequence[TrackedModule]) -> list[TrackedModule]:
    """The same tracked layers (by name) inside `model`, e.g. a dtype-converted copy."""
    named = dict(model.named_modules())
    if all(m.module is named.get(m.name) for m in modules):
        return list(modules)
    missing = [m.name for m in modules if m.name not in named]
    if missing:
        raise ValueError(f"layers {missing} are not in the model; pass that model's modules")
    return [replace(m, module=named[m.name]) for m in modules]

