"""Which layers the curvature engine tracks, and how their gradients are laid out.

Notebook 03 ("Per-layer blocks") derives the layout: every tracked layer computes
s = W ā, with ā the layer input with a 1 appended when the layer has a bias, so the
gradient of one layer is a matrix DW of shape (out, in + 1) and the layer's weight
and bias are the matrix [W | b].

Tracked layers are `nn.Linear` and GPT-2's `Conv1D` (which stores W transposed).
Embeddings, the unembedding (`lm_head` / `embed_out`) and layer norms are excluded
by default, as in arXiv 2505.05017.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

try:  # GPT-2's transposed linear layer; optional so the engine also works without it.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the engine usable
    Conv1D = None  # type: ignore[assignment,misc]

Grads = dict[str, torch.Tensor]
"""Gradients (or any vectors in parameter space) per tracked layer.

Keys are module names in `model.named_modules()` order; each value has shape
(..., out, in + bias), e.g. (n_sequences, out, in + 1) for per-sequence gradients.
"""

DEFAULT_EXCLUDE: tuple[str, ...] = (r"(^|\.)lm_head$", r"(^|\.)embed_out$", r"(^|\.)score$")
"""Regexes for layers never tracked unless `include` names them: the unembedding."""

MLP_PATTERN = r"(mlp|feed_forward|ffn|fc\d|dense_h_to_4h|dense_4h_to_h|up_proj|down_proj|gate_proj)"
ATTENTION_PATTERN = r"(attn|attention|q_proj|k_proj|v_proj|o_proj|query_key_value|c_attn)"

Group = Literal["attention", "mlp", "other"]


def layer_group(name: str) -> Group:
    """Classify a layer name as MLP, attention or other (MLP is checked first: GPT-2's
    `mlp.c_proj` must not be taken for attention's `attn.c_proj`)."""
    if re.search(MLP_PATTERN, name):
        return "mlp"
    if re.search(ATTENTION_PATTERN, name):
        return "attention"
    return "other"


@dataclass(frozen=True)
class TrackedModule:
    """One layer s = W ā whose curvature block the engine approximates."""

    name: str
    module: nn.Module = field(compare=False, repr=False)
    kind: Literal["linear", "conv1d"]
    in_features: int
    out_features: int
    has_bias: bool
    group: Group

    @property
    def d_in(self) -> int:
        """Width of ā: the input width, plus one for the appended 1 when there is a bias."""
        return self.in_features + int(self.has_bias)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of this layer's gradient matrix DW: (out, in + bias)."""
        return (self.out_features, self.d_in)

    @property
    def numel(self) -> int:
        return self.out_features * self.d_in

    def weight_matrix(self) -> torch.Tensor:
        """W as (out, in), whatever the storage convention (Conv1D stores (in, out))."""
        w = self.module.weight
        return w.t() if self.kind == "conv1d" else w

    def param_matrix(self) -> torch.Tensor:
        """[W | b]: the layer's parameters as one (out, in + bias) matrix."""
        w = self.weight_matrix()
        if not self.has_bias:
            return w
        return torch.cat([w, self.module.bias.unsqueeze(1)], dim=1)

    def grad_matrix(self) -> torch.Tensor:
        """[∂W | ∂b] from the `.grad` fields filled by an ordinary `backward()`."""
        w = self.module.weight.grad
        if w is None:
            raise RuntimeError(f"{self.name}: no .grad; call loss.backward() first")
        w = w.t() if self.kind == "conv1d" else w
        if not self.has_bias:
            return w
        return torch.cat([w, self.module.bias.grad.unsqueeze(1)], dim=1)

    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The (full name, parameter) pairs this layer owns, as `model.named_parameters()`
        names them: weight, then bias (a model that is itself one layer has name '')."""
        prefix = f"{self.name}." if self.name else ""
        out = [(prefix + "weight", self.module.weight)]
        if self.has_bias:
            out.append((prefix + "bias", self.module.bias))
        return out

    def matrix_to_params(self, mat: torch.Tensor) -> list[torch.Tensor]:
        """Split (..., out, in + bias) into tensors shaped like (weight, bias)."""
        w = mat[..., : self.in_features]
        if self.kind == "conv1d":
            w = w.transpose(-1, -2)
        parts = [w]
        if self.has_bias:
            parts.append(mat[..., self.in_features])
        return parts

    def params_to_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Inverse of `matrix_to_params` (works with leading batch dimensions)."""
        w = weight.transpose(-1, -2) if self.kind == "conv1d" else weight
        if bias is None:
            return w
        return torch.cat([w, bias.unsqueeze(-1)], dim=-1)


def _describe(name: str, module: nn.Module) -> TrackedModule | None:
    if isinstance(module, nn.Linear):
        return TrackedModule(
            name, module, "linear", module.in_features, module.out_features,
            module.bias is not None, layer_group(name),
        )
    if Conv1D is not None and isinstance(module, Conv1D):
        n_in, n_out = module.weight.shape
        return TrackedModule(
            name, module, "conv1d", n_in, n_out, module.bias is not None, layer_group(name)
        )
    return None


def _as_patterns(p: str | Sequence[str] | None) -> tuple[str, ...]:
    if p is None:
        return ()
    return (p,) if isinstance(p, str) else tuple(p)


def find_modules(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
) -> list[TrackedModule]:
    """The layers to track, in `named_modules()` order.

    include: regexes (any must `re.search` the name); `None` tracks every linear layer.
             Shortcuts: "mlp" and "attention" select by `layer_group`.
    exclude: regexes removed afterwards (default: the unembedding).
    """
    inc, exc = _as_patterns(include), _as_patterns(exclude)
    found = []
    for name, module in model.named_modules():
        tm = _describe(name, module)
        if tm is None:
            continue
        if inc and not any(_selects(p, tm) for p in inc):
            continue
        if exc and any(re.search(p, name) for p in exc) and not any(
            p not in ("mlp", "attention") and re.search(p, name) for p in inc
        ):
            continue
        found.append(tm)
    if not found:
        raise ValueError(
            f"No linear layers matched include={inc or None!r}, exclude={exc!r} in "
            f"{type(model).__name__}. Check the `include` patterns against "
            "[n for n, _ in model.named_modules()]."
        )
    return found


def _selects(pattern: str, tm: TrackedModule) -> bool:
    if pattern in ("mlp", "attention"):
        return tm.group == pattern
    return re.search(pattern, tm.name) is not None


def zeros_like_grads(modules: Sequence[TrackedModule], *lead: int, **kw) -> Grads:
    """A Grads of zeros with leading shape `lead` (e.g. the number of queries)."""
    return {m.name: torch.zeros(*lead, *m.shape, **kw) for m in modules}


def flatten(grads: Mapping[str, torch.Tensor], modules: Sequence[TrackedModule]) -> torch.Tensor:
    """Concatenate per-layer matrices into vectors: (..., out, d_in) per layer → (..., P).

    The order is `modules`' order, row-major within each [W | b] matrix; `unflatten`
    inverts it. Exact references (dense GGN, CG, LiSSA) work in this flat space.
    """
    parts = [grads[m.name].reshape(*grads[m.name].shape[:-2], m.numel) for m in modules]
    return torch.cat(parts, dim=-1)


def unflatten(vec: torch.Tensor, modules: Sequence[TrackedModule]) -> Grads:
    """Split (..., P) vectors back into per-layer (..., out, d_in) matrices."""
    total = sum(m.numel for m in modules)
    if vec.shape[-1] != total:
        raise ValueError(f"vector has {vec.shape[-1]} entries, the tracked layers have {total}")
    out, start = {}, 0
    for m in modules:
        out[m.name] = vec[..., start : start + m.numel].reshape(*vec.shape[:-1], *m.shape)
        start += m.numel
    return out


def param_vector(modules: Sequence[TrackedModule]) -> torch.Tensor:
    """θ restricted to the tracked layers, in the `flatten` layout."""
    return flatten({m.name: m.param_matrix().detach() for m in modules}, modules)


def check_finite(grads: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise a clear error if any entry is NaN or inf (never a silently wrong number)."""
    for name, g in grads.items():
        if not torch.isfinite(g).all():
            raise FloatingPointError(
                f"{what} for layer {name!r} contain NaN or inf. Check the model's loss on this "
                "batch (e.g. an overflow under fp16: use bf16 or float32), or the inputs."
            )


def inner(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Σ_layers ⟨a_l, b_l⟩ with broadcasting over leading dims: (Q, o, i)·(N, o, i) → (Q, N)."""
    total = None
    for name, x in a.items():
        y = b[name]
        s = torch.einsum("qoi,noi->qn", x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]))
        total = s if total is None else total + s
    return total


def named_modules_of(modules: Iterable[TrackedModule]) -> list[str]:
    return [m.name for m in modules]


def check_finite_parameters(model: nn.Module, where: str) -> None:
    """Refuse a model with NaN/inf in any parameter or buffer, naming the first one."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: parameter {name!r} contains NaN or inf; the checkpoint "
                             "is damaged or diverged. Re-download or retrain it.")
