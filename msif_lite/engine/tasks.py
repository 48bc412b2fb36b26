"""What is being differentiated: the per-example training loss ℓ(z, θ) and the query
measurement m(q, θ).

Conventions (docs/design.md §Conventions, derived in notebooks 01 and 06):
- a per-example loss is a **sum** over its target tokens, so a per-sequence gradient is
  the token sum of per-token gradients;
- m(q, θ) = −log p(answer | prompt) = the loss on the answer tokens only;
- Fisher type (one vocabulary everywhere, `Fisher`): fisher="empirical" uses the data
  labels (the empirical Fisher), fisher="sampled" draws each
  target token from the model's own softmax (seeded) and gives the true Fisher, which
  equals the Gauss–Newton matrix for softmax cross-entropy.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
Fisher = Literal["sampled", "empirical"]
"""'sampled': labels drawn from the model (true Fisher = GGN for softmax CE);
'empirical': the data labels (empirical Fisher)."""


class Normalisation(str, enum.Enum):
    """How a training objective averages its per-example losses ℓ_n (token sums)."""

    TOKEN_MEAN = "token_mean"  # Σ_n ℓ_n / Σ_n t_n, t_n = target tokens (the HF LM loss)
    EXAMPLE_MEAN = "example_mean"  # Σ_n ℓ_n / N


class Task(Protocol):
    """How to compute the quantities the engine differentiates, for one kind of batch.

    The split loss = loss_from_output(output(model, batch)) is what the Gauss–Newton
    matrix needs: G = E_n[J_nᵀ ∇²_f ℓ_n J_n] with f = output, J = ∂f/∂θ (notebook 02).
    """

    def output(self, model: nn.Module, batch) -> torch.Tensor:
        """The network output f(θ) the loss is convex in (the logits)."""
        ...

    def loss_from_output(
        self,
        output: torch.Tensor,
        batch,
        *,
        fisher: Fisher = "empirical",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-example losses (B,) from the output; fisher="sampled" draws the labels."""
        ...

    def loss(
        self,
        model: nn.Module,
        batch,
        *,
        fisher: Fisher = "empirical",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-example training losses ℓ(z_n, θ), shape (B,), each summed over its tokens."""
        ...

    def measurement(self, model: nn.Module, batch) -> torch.Tensor:
        """Per-query measurements m(q_n, θ), shape (B,)."""
        ...

    def token_mask(self, batch) -> torch.Tensor | None:
        """(B, T) bool: which positions are real tokens (not padding); None if one token each."""
        ...

    def batch_size(self, batch) -> int: ...


def sample_labels(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw y ~ softmax(logits) per row (the 'true Fisher' labels), without gradient.

    Inverse-CDF sampling: one uniform u per row, y = first index whose cumulative
    probability exceeds u (~10x faster than torch.multinomial for a 4k vocabulary). The
    uniforms come from `generator` (a CPU generator) so draws are reproducible per seed.
    """
    x = logits.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    cdf = torch.softmax(x, dim=-1).reshape(-1, x.shape[-1]).cumsum_(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype).to(cdf.device)
    draw = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=x.shape[-1] - 1)
    return draw.squeeze(-1).reshape(logits.shape[:-1])


def softmax_ce_hessian_product(logits: torch.Tensor, weight: torch.Tensor):
    """u ↦ w ⊙ (p ⊙ u − p (pᵀu)) over the last axis, p = softmax(logits): the Hessian of
    Σ_i w_i CE(logits_i, y) in the logits, diag(p) − ppᵀ per row (it does not depend on y).

    weight (logits.shape[:-1]) is 1 where a row counts in the loss and 0 where it does not
    (padding, labels = IGNORE_INDEX). The returned function accepts u of logits' shape,
    with any leading dimensions (e.g. K right-hand sides stacked in front, or under vmap).
    """
    x = logits.detach()
    p = torch.softmax(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=-1)
    p = p.to(x.dtype)
    pw = p * weight.to(x.dtype).unsqueeze(-1)

    def product(u: torch.Tensor) -> torch.Tensor:
        return pw * (u - (p * u).sum(-1, keepdim=True))

    return product


# --------------------------------------------------------------------------- classification
@dataclass
class ClassificationTask:
    """Batches are (x, y): x (B, ...) inputs, y (B,) class indices; model(x) → (B, C) logits.

    ℓ(z) = −log softmax(f(x))_y. Used by the small exact problems of notebooks 01–04.
    """

    def output(self, model, batch):
        return model(batch[0])

    def loss_from_output(self, output, batch, *, fisher: Fisher = "empirical", generator=None):
        y = sample_labels(output, generator) if fisher == "sampled" else batch[1]
        return F.cross_entropy(output, y, reduction="none")

    def loss(self, model, batch, *, fisher: Fisher = "empirical", generator=None):
        return self.loss_from_output(
            self.output(model, batch), batch, fisher=fisher, generator=generator
        )

    def measurement(self, model, batch):
        return self.loss(model, batch)

    def output_hessian_product(self, output, batch):
        """u ↦ ∇²_f Σ_n ℓ_n · u = (diag(p) − ppᵀ) u per example (softmax_ce_hessian_product)."""
        return softmax_ce_hessian_product(output, output.new_ones(output.shape[:-1]))

    def token_mask(self, batch):
        return None

    def batch_size(self, batch) -> int:
        return batch[0].shape[0]


# --------------------------------------------------------------------------- language modelling
@dataclass
class TokenBatch:
    """A padded batch for a causal LM. `labels[n, t]` is the target for position t (the
    model's logits at t−1 predict it); IGNORE_INDEX marks prompt and padding tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device)
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: slice | torch.Tensor) -> TokenBatch:
        return TokenBatch(self.input_ids[index], self.attention_mask[index], self.labels[index])


def make_token_batch(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    target_masks: Sequence[Sequence[bool]] | None = None,
    padding_side: Literal["right", "left"] = "right",
) -> TokenBatch:
    """Pad token-id lists into a TokenBatch.

    target_masks[n][t] says whether token t of sequence n is a target (e.g. answer
    tokens only for a question); None makes every token after the first a target.
    """
    if len(sequences) == 0:
        raise ValueError("make_token_batch got no sequences; pass at least one.")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for n, seq in enumerate(sequences):
        if len(seq) == 0:
            raise ValueError(f"sequence {n} is empty; every example needs at least one token.")
        tgt = [t > 0 for t in range(len(seq))] if target_masks is None else list(target_masks[n])
        if len(tgt) != len(seq):
            raise ValueError(f"target mask {n} has {len(tgt)} entries for {len(seq)} tokens")
        pos = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
        ids[n, pos] = torch.as_tensor(seq, dtype=torch.long)
        mask[n, pos] = 1
        lab = torch.as_tensor(seq, dtype=torch.long).clone()
        lab[~torch.as_tensor(tgt, dtype=torch.bool)] = IGNORE_INDEX
        labels[n, pos] = lab
    return TokenBatch(ids, mask, labels)


@dataclass
class LanguageModelingTask:
    """Causal LM (any Hugging Face `*ForCausalLM`): ℓ(z) = Σ_t −log p(x_t | x_<t) over the
    target tokens of z; m(q) = the same sum over the answer tokens of the query."""

    def output(self, model: nn.Module, batch: TokenBatch) -> torch.Tensor:
        check_token_ids(model, batch)
        kw = {}
        if _accepts_position_ids(type(model)):  # left padding must not shift the positions
            kw["position_ids"] = (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kw).logits

    def loss(self, model, batch: TokenBatch, *, fisher: Fisher = "empirical", generator=None):
        return self.loss_from_output(
            self.output(model, batch), batch, fisher=fisher, generator=generator
        )

    def loss_from_output(
        self, output, batch: TokenBatch, *, fisher: Fisher = "empirical", generator=None
    ):
        logits = output[:, :-1]
        target = batch.labels[:, 1:]
        if fisher == "sampled":
            drawn = sample_labels(logits, generator)
            target = torch.where(target == IGNORE_INDEX, target, drawn)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the softmax of half-precision logits loses too much
        tok = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        return tok.reshape(target.shape).sum(dim=1)

    def output_hessian_product(self, output, batch: TokenBatch):
        """u ↦ ∇²_f Σ_n ℓ_n · u for u of the logits' shape (B, T, V): (diag(p) − ppᵀ) u at
        each position t whose next token batch.labels[:, t+1] is a target, 0 elsewhere (the
        last position and the positions before prompt or padding labels), as in
        `loss_from_output`."""
        weight = torch.zeros(output.shape[:-1], device=output.device)
        weight[:, :-1] = (batch.labels[:, 1:] != IGNORE_INDEX).float()
        return softmax_ce_hessian_product(output, weight)

    def measurement(self, model, batch: TokenBatch):
        empty = (batch.labels[:, 1:] == IGNORE_INDEX).all(dim=1)
        if empty.any():
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(
                f"query rows {rows} have no answer tokens (all labels are {IGNORE_INDEX}), so "
                "m(q) = −log p(answer | prompt) is undefined. Give each query a non-empty "
                "answer, e.g. make_token_batch(..., target_masks=...) marking the answer tokens."
            )
        return self.loss(model, batch)

    def token_mask(self, batch: TokenBatch) -> torch.Tensor:
        return batch.attention_mask.bool()

    def batch_size(self, batch: TokenBatch) -> int:
        return batch.input_ids.shape[0]


@functools.cache
def _accepts_position_ids(model_class: type) -> bool:
    """Whether `model_class.forward` takes `position_ids` (GPT-2, GPT-NeoX: yes; BLOOM's ALiBi
    derives positions from the attention mask itself)."""
    return "position_ids" in inspect.signature(model_class.forward).parameters


def check_token_ids(model: nn.Module, batch: TokenBatch) -> None:
    """Refuse token ids the model's embedding cannot hold: the tokenizer does not match."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return
    vocab = emb.num_embeddings
    top = int(batch.input_ids.max())
    if top >= vocab or int(batch.input_ids.min()) < 0:
        raise ValueError(
            f"token id {top} is outside the model's vocabulary of {vocab}: the tokenizer does "
            "not match the model. Load the tokenizer saved with this checkpoint "
            "(AutoTokenizer.from_pretrained(<checkpoint dir>))."
        )
