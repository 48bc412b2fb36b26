"""Unrolled metagradients for the kit's language-model pipeline and for full-batch (convex)
problems: the `eval.unrolled` replay and reverse pass fed with the batch losses that
`world.training` minimises (its batch order, token-mean loss, proximity term) or with a
full-batch objective that `eval.convex.fit_convex` minimises."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn
from torch.func import functional_call

from msif_lite.engine.tasks import IGNORE_INDEX, LanguageModelingTask, Task, TokenBatch
from msif_lite.eval.unrolled import (
    Measure,
    Params,
    Stage,
    TwoStage,
    _math_attention,
    batch_order,
)
from msif_lite.world.training import (
    TrainConfig,
    collate,
    encode_documents,
    encode_qa,
)


# ---------------------------------------------------------------- the kit's language model
def causal_lm_loss_exact(logits: Tensor, labels: Tensor, vocab_size: int, **_) -> Tensor:
    """Hugging Face's causal-LM loss (labels shifted left, −100 ignored, mean over targets)
    without its upcast of the logits to float32, so a float64 model's loss stays float64.
    Set `model.loss_function = causal_lm_loss_exact` for the float64 checks."""
    shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return nn.functional.cross_entropy(logits.reshape(-1, vocab_size), shifted.reshape(-1),
                                       ignore_index=IGNORE_INDEX)  # fmt: skip


def _param_dict(names: Sequence[str], theta: Params) -> dict[str, Tensor]:
    return dict(zip(names, theta))


def lm_stage(model: nn.Module, data: Sequence[tuple[list[int], list[int]]], pad_id: int,
             cfg: TrainConfig, *, weighted: bool, alpha: float | None = None) -> Stage:  # fmt: skip
    """A stage of `training._train` on encoded examples: the batches of `batch_order`,
    collated as training.py collates them, and the model's own `.loss` (the token mean).

    weighted: L_t(θ; w) = loss_t(θ) + Σ_{r∈B_t} (w_{i_r} − 1) s_r(θ) / n_t, s_r the token
    sum of row r and n_t the batch's target count: the weighted token mean, equal to the
    model's loss bit-for-bit at w = 1 (the correction is exactly 0), with ∂L_t/∂w_i the
    token sums of document i's rows over n_t."""
    names = [n for n, _ in model.named_parameters()]
    dev = next(model.parameters()).device
    batches = []
    for idx in batch_order(len(data), cfg):
        ids, mask, labels = (x.to(dev) for x in collate([data[i] for i in idx], pad_id))
        batches.append((ids, mask, labels, torch.tensor(idx, device=dev)))

    def loss(theta: Params, t: int, w: Tensor | None) -> Tensor:
        ids, mask, labels, rows = batches[t]
        out = functional_call(model, _param_dict(names, theta), (),
                              {"input_ids": ids, "attention_mask": mask, "labels": labels})
        if not weighted or w is None:
            return out.loss
        logits, target = out.logits[:, :-1], labels[:, 1:]
        tok = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          target.reshape(-1), ignore_index=IGNORE_INDEX,
                                          reduction="none").reshape(target.shape)  # fmt: skip
        count = (target != IGNORE_INDEX).sum()
        corr = ((w[rows].to(tok.dtype) - 1) * tok.sum(dim=1)).sum() / count
        return out.loss + corr

    cuda = dev.type == "cuda"

    def forward_ctx() -> AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    def vjp_ctx() -> AbstractContextManager:
        from contextlib import ExitStack

        stack = ExitStack()
        stack.enter_context(forward_ctx())
        stack.enter_context(_math_attention())
        return stack

    return Stage(cfg, loss, anchored=alpha is not None, alpha=alpha or 0.0,
                 forward_context=forward_ctx, vjp_context=vjp_ctx)  # fmt: skip


def lm_two_stage(model: nn.Module, tokenizer, texts: Sequence[str], qa_pairs: Sequence,
                 pretrain_cfg: TrainConfig, finetune_cfg: TrainConfig,
                 alpha: float) -> TwoStage:  # fmt: skip
    """The kit's pipeline as a function of w: `training.pretrain(model, tok, world, pretrain_cfg,
    texts=texts)` then `training.finetune(model, θ_pt, tok, qa_pairs, finetune_cfg, alpha)`,
    starting from `model`'s current weights (its initialisation). w_i weighs `texts[i]`.
    The model's dropout must be off (it is in every kit preset); it is put in train mode."""
    model.train()
    pad = tokenizer.pad_token_id
    pt = lm_stage(model, encode_documents(tokenizer, texts), pad, pretrain_cfg, weighted=True)
    ft = lm_stage(model, encode_qa(tokenizer, qa_pairs), pad, finetune_cfg, weighted=False,
                  alpha=alpha)  # fmt: skip
    names = [n for n, _ in model.named_parameters()]
    theta0 = [p.detach().clone() for _, p in model.named_parameters()]
    return TwoStage(theta0, pt, ft, len(texts), names)


class _TaskOutput(nn.Module):
    """`task.output(model, batch)` as a module, so `functional_call` can swap parameters."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch):
        return self.task.output(self.model, batch)


def task_measure(model: nn.Module, task: Task, batch, names: Sequence[str] | None = None
                 ) -> Measure:  # fmt: skip
    """θ ↦ task.measurement at θ for every row of `batch` (for the LM: m(q) = −log p(answer |
    prompt), answer tokens + eos, the measurement of `eval.retraining.measure`)."""
    names = list(names) if names is not None else [n for n, _ in model.named_parameters()]
    wrapped = _TaskOutput(model, task)
    if isinstance(task, LanguageModelingTask) and not isinstance(batch, TokenBatch):
        raise TypeError("pass a TokenBatch (training.qa_batch) for a language model")

    def measure(theta: Params) -> Tensor:
        params = {"model." + n: p for n, p in zip(names, theta)}
        out = functional_call(wrapped, params, (batch,))
        return task.loss_from_output(out, batch)

    return measure


# ---------------------------------------------------------------- full-batch (convex) problems
def full_batch_stage(model: nn.Module, task: Task, batch, cfg: TrainConfig, *, l2: float = 0.0,
                     alpha: float | None = None, optimizer: str = "gd") -> Stage:  # fmt: skip
    """A full-batch stage on the objective `eval.convex.fit_convex` minimises:

        L(θ; w) = (1/N) Σ_n w_n ℓ(z_n, θ) + (l2/2)‖θ‖²  (+ (α/2)‖θ − θ_anchor‖² if alpha),

    every step on the whole batch (cfg.batch_size is ignored), optimiser `optimizer`."""
    names = [n for n, _ in model.named_parameters()]
    wrapped = _TaskOutput(model, task)
    n = task.batch_size(batch)

    def loss(theta: Params, t: int, w: Tensor | None) -> Tensor:
        out = functional_call(wrapped, {"model." + k: p for k, p in zip(names, theta)}, (batch,))
        per = task.loss_from_output(out, batch)
        total = (per if w is None else w.to(per.dtype) * per).sum() / n
        if l2:
            total = total + 0.5 * l2 * sum((p * p).sum() for p in theta)
        return total

    return Stage(cfg, loss, anchored=alpha is not None, alpha=alpha or 0.0, optimizer=optimizer,
                 vjp_context=nullcontext)  # fmt: skip
