"""Capture each tracked layer's inputs ā and output gradients Ds, per token.

Notebook 03 §Per-layer blocks derives why this is all the engine needs: a layer
s = W ā has per-sequence gradient

    DW_n = Σ_t Ds_{n,t} ā_{n,t}ᵀ          (ā with a 1 appended when the layer has a bias)

so K-FAC covariances, EK-FAC eigenvalue corrections, per-sequence gradients and
per-token scores are all built from (ā, Ds). We take `torch.autograd.grad` of the summed
loss with respect to the captured layer *outputs* s, never the weights, so autograd skips
the weight-gradient GEMMs; DW then costs one batched einsum per layer.

Padding positions (task.token_mask False) are set to exactly zero in both ā and Ds, so they
contribute nothing anywhere. 2-D layer inputs (B, in) count as one token per example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from msif_lite.engine.layers import Grads, TrackedModule, check_finite
from msif_lite.engine.tasks import Fisher, Task


@dataclass(frozen=True)
class LayerCapture:
    """(ā, Ds) of one layer for one batch, padding zeroed.

    a:  (B, T, d_in)  layer inputs with the ones column when the layer has a bias
    ds: (B, T, out)   ∂(Σ_n loss_n)/∂s at each token = per-sequence output gradients
    """

    name: str
    a: torch.Tensor
    ds: torch.Tensor

    def per_sequence_grad(self) -> torch.Tensor:
        """DW_n = Σ_t Ds_{n,t} ā_{n,t}ᵀ, shape (B, out, d_in) (one batched GEMM)."""
        return torch.bmm(self.ds.transpose(1, 2), self.a)  # contiguous (B, out, d_in)

    def token_scores(self, preconditioned: torch.Tensor) -> torch.Tensor:
        """I[q, b, t] = Ds_{b,t}ᵀ P_q ā_{b,t}: position t's part of ⟨P_q, DW_b⟩ (DW_b =
        Σ_t Ds_{b,t} ā_{b,t}ᵀ); P (Q, out, d_in)."""
        return (torch.einsum("bto,qoi->qbti", self.ds, preconditioned) * self.a).sum(-1)

    def token_grad_sq_norms(self) -> torch.Tensor:
        """‖Ds_{b,t} ā_{b,t}ᵀ‖² = ‖Ds_{b,t}‖² ‖ā_{b,t}‖²: the squared norm of position t's
        (rank-one) part of DW_b, (B, T)."""
        return self.ds.pow(2).sum(-1) * self.a.pow(2).sum(-1)

    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.ds.numel() * self.ds.element_size()


@dataclass(frozen=True)
class BatchCapture:
    """Everything captured for one batch: per-layer (ā, Ds), the token mask and the losses."""

    layers: tuple[LayerCapture, ...]
    mask: torch.Tensor  # (B, T) bool; T = 1 for 2-D inputs
    losses: torch.Tensor  # (B,) detached per-example losses (or measurements)

    @property
    def n_sequences(self) -> int:
        return self.mask.shape[0]

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    def __getitem__(self, name: str) -> LayerCapture:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no captured layer {name!r}; captured: {[x.name for x in self.layers]}")

    def grads(self) -> Grads:
        """Per-sequence gradients of all captured layers, (B, out, d_in) each."""
        return {layer.name: layer.per_sequence_grad() for layer in self.layers}

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def to(self, dtype: torch.dtype) -> BatchCapture:
        """This batch with every layer's (ā, Ds) in `dtype` (itself when already in it)."""
        if all(x.a.dtype == dtype and x.ds.dtype == dtype for x in self.layers):
            return self
        layers = tuple(LayerCapture(x.name, x.a.to(dtype), x.ds.to(dtype)) for x in self.layers)
        return BatchCapture(layers, self.mask, self.losses)


class LayerRecorder:
    """Context manager: forward hooks that keep each tracked layer's input and output.

    Use as `with LayerRecorder(modules) as rec: out = model(...)`; then `rec.inputs[i]`
    and `rec.outputs[i]` hold the tensors of `modules[i]` (the outputs stay in the graph,
    so autograd can differentiate with respect to them). A layer called more than once per
    forward pass (weight sharing) is refused: its gradient would need summing over calls.
    """

    def __init__(self, modules: Sequence[TrackedModule]):
        self.modules = list(modules)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list = []

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.outputs[i] is not None:
                raise RuntimeError(
                    f"layer {self.modules[i].name!r} ran twice in one forward pass (shared "
                    "weights); exclude it with FactorConfig(exclude=...) or find_modules."
                )
            kind = self.modules[i].layer_kind
            self.inputs[i] = kind.layer_input(args).detach()
            if not output.requires_grad:  # frozen model: make s a leaf we can differentiate to
                output = output.detach().requires_grad_(True)
            self.outputs[i] = kind.layer_output(output)
            return output

        return hook

    def __enter__(self) -> LayerRecorder:
        self._handles = [
            m.module.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def missing(self) -> list[str]:
        return [m.name for m, o in zip(self.modules, self.outputs) if o is None]


def _as_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, ..., f) → (B, T, f); 2-D inputs become one token per example."""
    return x.reshape(n, -1, x.shape[-1])


def capture_batch(
    model: nn.Module,
    task: Task,
    batch,
    modules: Sequence[TrackedModule],
    *,
    fisher: Fisher = "empirical",
    generator: torch.Generator | None = None,
    measurement: bool = False,
    dtype: torch.dtype | None = None,
) -> BatchCapture:
    """One forward pass and one backward pass to the layer outputs; returns (ā, Ds) per layer.

    Ds_{n,t} = ∂(Σ_m ℓ_m)/∂s_{n,t} = ∂ℓ_n/∂s_{n,t} because examples do not interact.
    `measurement=True` differentiates task.measurement (query gradients) instead of task.loss.
    `dtype` casts the captured tensors (default: the layer outputs' dtype).
    """
    with torch.enable_grad(), LayerRecorder(modules) as rec:
        if measurement:
            losses = task.measurement(model, batch)
        else:
            losses = task.loss(model, batch, fisher=fisher, generator=generator)
    missing = rec.missing()
    if missing:
        raise RuntimeError(
            f"tracked layers {missing} did not run in the forward pass; check `include` / "
            "`exclude` against the model, or that `task.output` calls this model."
        )
    if not torch.isfinite(losses).all():
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"the loss is NaN or inf for examples {bad}. Check the inputs and the model "
            "(e.g. fp16 overflow: use bf16 or float32) before computing influence."
        )
    outputs = [o for o in rec.outputs if o is not None]
    ds_all = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
    n = task.batch_size(batch)
    mask = task.token_mask(batch)
    padded = mask is not None and not bool(mask.all())
    layers = []
    for m, x, s, ds in zip(modules, rec.inputs, outputs, ds_all):
        a = _as_tokens(x, n)
        ds = torch.zeros_like(s) if ds is None else ds
        ds = _as_tokens(ds, n)
        if mask is None:
            mask = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
        if mask.shape != a.shape[:2]:
            raise ValueError(
                f"token mask of shape {tuple(mask.shape)} does not match the input of layer "
                f"{m.name!r}, {tuple(a.shape)}; task.token_mask must be (B, T) for (B, T, in)."
            )
        if m.has_bias:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        cast = dtype or s.dtype
        a, ds = a.to(cast), ds.to(cast)
        if padded:  # exact zeros at padding (torch.where: even NaN there → 0)
            keep = mask.unsqueeze(-1).bool()
            a = torch.where(keep, a, torch.zeros((), dtype=cast, device=a.device))
            ds = torch.where(keep, ds, torch.zeros((), dtype=cast, device=ds.device))
        layers.append(LayerCapture(m.name, a, ds))
    if mask is None:
        mask = torch.ones(n, 1, dtype=torch.bool)
    # NaN/inf in ā or Ds propagate into every consumer (A, S, Λ, DW, scores), which check.
    return BatchCapture(tuple(layers), mask.bool(), losses.detach())


def per_sequence_grads(
    model: nn.Module,
    task: Task,
    batch,
    modules: Sequence[TrackedModule],
    *,
    fisher: Fisher = "empirical",
    generator: torch.Generator | None = None,
    measurement: bool = False,
) -> Grads:
    """DW_n = Σ_t Ds_{n,t} ā_{n,t}ᵀ for every example n: (B, out, d_in) per layer.

    Notebook 03 §Per-layer blocks. Equals reading `grad_matrix()` after one `backward()`
    per example, at the cost of a single forward and a weight-GEMM-free backward.
    """
    grads = capture_batch(
        model, task, batch, modules, fisher=fisher, generator=generator, measurement=measurement
    ).grads()
    check_finite(grads, "per-sequence gradients")
    return grads
