"""Which layers the curvature engine tracks, and how their gradients are laid out.

Notebook 03 ("Per-layer blocks") derives the layout: every tracked layer computes
s = W ā, with ā the layer input with a 1 appended when the layer has a bias, so the
gradient of one layer is a matrix DW of shape (out, in + 1) and the layer's weight
and bias are the matrix [W | b].

Tracked layers are the module types registered in `LAYER_KINDS`: `nn.Linear` and GPT-2's
`Conv1D` (which stores W transposed); a new kind is one `LAYER_KINDS.register(LayerKind(...))`.
Embeddings, the unembedding (`lm_head` / `embed_out`) and layer norms are excluded
by default, as in arXiv 2505.05017.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from msif_lite.registry import Registry

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
class LayerKind:
    """How the engine reads one module type as a layer s = W ā (Notebook 03 §Per-layer blocks).

    The default reads the parameter `module.weight` as W (out, in) (or as Wᵀ with
    `transposed`, GPT-2's Conv1D), `module.bias` (None: no bias) as b, the forward hook's
    first argument as the input and the module's output as s, both with the features last.
    A module type that differs overrides these in a subclass; `LAYER_KINDS.register(kind)`
    is then all a new kind needs (find_modules, capture, the exact references and the
    factors all read layers through it).
    """

    name: str  # TrackedModule.kind, e.g. "linear"
    module_type: type[nn.Module]  # tracked: modules of this type or a subclass of it
    transposed: bool = False  # the weight is stored (in, out)
    weight_attr: str = "weight"  # the parameters' attribute (and `named_parameters`) names
    bias_attr: str = "bias"

    def weight(self, module: nn.Module) -> nn.Parameter:
        return getattr(module, self.weight_attr)

    def bias(self, module: nn.Module) -> nn.Parameter | None:
        return getattr(module, self.bias_attr, None)

    def weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored weight (or its .grad, or a batch of either) as (..., out, in)."""
        return weight.transpose(-1, -2) if self.transposed else weight

    def matrix_to_weight(self, mat: torch.Tensor) -> torch.Tensor:
        """Inverse of `weight_to_matrix`: (..., out, in) in the storage layout."""
        return mat.transpose(-1, -2) if self.transposed else mat

    def features(self, module: nn.Module) -> tuple[int, int]:
        """(in, out) of s = W ā, the bias column not counted."""
        n_out, n_in = self.weight_to_matrix(self.weight(module)).shape
        return n_in, n_out

    def layer_input(self, args: tuple) -> torch.Tensor:
        """ā without the ones column, (..., in), from the forward hook's positional args."""
        return args[0]

    def layer_output(self, output) -> torch.Tensor:
        """s, (..., out), from the module's output (it must stay in the autograd graph)."""
        return output


class LayerKinds(Registry[LayerKind]):
    """name → `LayerKind`, and each module type at most once; `of(module)` finds the kind of
    a module by its type (the nearest registered class in its MRO, so subclasses count)."""

    def register(self, entry: LayerKind) -> LayerKind:
        taken = [k.name for k in self.values() if k.module_type is entry.module_type]
        if taken:
            raise ValueError(f"{entry.module_type.__name__} is already the layer kind {taken[0]!r}")
        return super().register(entry)

    def of(self, module: nn.Module) -> LayerKind | None:
        by_type = {k.module_type: k for k in self.values()}
        return next((by_type[t] for t in type(module).__mro__ if t in by_type), None)


LAYER_KINDS: LayerKinds = LayerKinds("layer kind", "LAYER_KINDS.register(LayerKind(...))")
"""The module types `find_modules` tracks: `nn.Linear` and GPT-2's `Conv1D`."""

LAYER_KINDS.register(LayerKind("linear", nn.Linear))
if Conv1D is not None:
    LAYER_KINDS.register(LayerKind("conv1d", Conv1D, transposed=True))


@dataclass(frozen=True)
class TrackedModule:
    """One layer s = W ā whose curvature block the engine approximates."""

    name: str
    module: nn.Module = field(compare=False, repr=False)
    kind: str  # a name in LAYER_KINDS: "linear", "conv1d", ...
    in_features: int
    out_features: int
    has_bias: bool
    group: Group

    @property
    def layer_kind(self) -> LayerKind:
        return LAYER_KINDS.lookup(self.kind)

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
        return self.layer_kind.weight_to_matrix(self._weight())

    def _weight(self) -> nn.Parameter:
        return self.layer_kind.weight(self.module)

    def _bias(self) -> nn.Parameter:
        return self.layer_kind.bias(self.module)

    def param_matrix(self) -> torch.Tensor:
        """[W | b]: the layer's parameters as one (out, in + bias) matrix."""
        w = self.weight_matrix()
        if not self.has_bias:
            return w
        return torch.cat([w, self._bias().unsqueeze(1)], dim=1)

    def grad_matrix(self) -> torch.Tensor:
        """[∂W | ∂b] from the `.grad` fields filled by an ordinary `backward()`."""
        w = self._weight().grad
        if w is None:
            raise RuntimeError(f"{self.name}: no .grad; call loss.backward() first")
        w = self.layer_kind.weight_to_matrix(w)
        if not self.has_bias:
            return w
        return torch.cat([w, self._bias().grad.unsqueeze(1)], dim=1)

    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The (full name, parameter) pairs this layer owns, as `model.named_parameters()`
        names them: weight, then bias (a model that is itself one layer has name '')."""
        prefix, kind = (f"{self.name}." if self.name else ""), self.layer_kind
        out = [(prefix + kind.weight_attr, self._weight())]
        if self.has_bias:
            out.append((prefix + kind.bias_attr, self._bias()))
        return out

    def matrix_to_params(self, mat: torch.Tensor) -> list[torch.Tensor]:
        """Split (..., out, in + bias) into tensors shaped like (weight, bias)."""
        parts = [self.layer_kind.matrix_to_weight(mat[..., : self.in_features])]
        if self.has_bias:
            parts.append(mat[..., self.in_features])
        return parts

    def params_to_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Inverse of `matrix_to_params` (works with leading batch dimensions)."""
        w = self.layer_kind.weight_to_matrix(weight)
        if bias is None:
            return w
        return torch.cat([w, bias.unsqueeze(-1)], dim=-1)


def track(name: str, module: nn.Module) -> TrackedModule | None:
    """`module` as a TrackedModule if its type is a registered layer kind, else None."""
    kind = LAYER_KINDS.of(module)
    if kind is None:
        return None
    n_in, n_out = kind.features(module)
    return TrackedModule(name, module, kind.name, n_in, n_out, kind.bias(module) is not None,
                         layer_group(name))  # fmt: skip


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
        tm = track(name, module)
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


def check_finite_parameters(model: nn.Module, where: str) -> None:
    """Refuse a model with NaN/inf in any parameter or buffer, naming the first one."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: parameter {name!r} contains NaN or inf; the checkpoint "
                             "is damaged or diverged. Re-download or retrain it.")
