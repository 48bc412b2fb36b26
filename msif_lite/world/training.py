"""Pre-training and proximity-regularised fine-tuning on the kit's world.

Notebook 05 ("The kit's own world") runs `build_world_pipeline`; the fine-tuning
objective is the one multi-stage influence assumes (arXiv 2505.05017, eq. for θ_ft):

    θ_ft = argmin_θ  L_ft(θ) + (α/2)‖θ − θ_pt‖²,   L_ft = answer-only next-token loss.

Run `python -m msif_lite.world.training --preset ci-fast --out DIR` for the whole pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from msif_lite.config import device as default_device
from msif_lite.engine.prompts import encode_document, encode_pairs
from msif_lite.engine.tasks import IGNORE_INDEX, TokenBatch, make_token_batch
from msif_lite.world.generate import WORLD_PRESETS, QAPair, World, make_world
from msif_lite.world.lm import (
    MODEL_PRESETS,
    CheckpointMeta,
    ModelPreset,
    answer_accuracy,
    build_model,
    check_tokenizer,
    config_hash,
    save_checkpoint,
    tokenizer_hash,
    train_tokenizer,
)
from msif_lite.world.pipeline_report import loss_plot as _plot
from msif_lite.world.pipeline_report import summary as _summary


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings for one training stage (AdamW, linear warm-up, cosine decay)."""

    steps: int = field(default=1000, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=32, metadata={"help": "sequences per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    warmup: int = field(default=50, metadata={"help": "linear warm-up steps"})
    min_lr_frac: float = field(default=0.1, metadata={"help": "final lr as a fraction of lr"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm (0 = off)"})
    seed: int = field(default=0, metadata={"help": "seed for batch order"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})
    checkpoint_every: int = field(default=0, metadata={
        "help": "keep a copy of the weights every this many steps and after the last one, "
                "with the step's lr (TracIn over checkpoints, Notebook 11); 0 = off"})

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("set TrainConfig.steps and TrainConfig.batch_size >= 1")
        if not (self.lr > 0 and 0 <= self.min_lr_frac <= 1 and self.warmup >= 0):
            raise ValueError("set TrainConfig.lr > 0, min_lr_frac in [0, 1], warmup >= 0")
        if self.checkpoint_every < 0:
            raise ValueError("set TrainConfig.checkpoint_every >= 0 (0 keeps no checkpoints)")


@dataclass(frozen=True)
class Checkpoint:
    """The weights after `step` optimiser steps and the learning rate η of that step."""

    step: int
    lr: float
    state: dict[str, torch.Tensor]


@dataclass
class TrainResult:
    """Per-step losses (total and, for fine-tuning, the penalty term) and timing."""

    losses: list[float]
    penalties: list[float]
    steps: int
    seconds: float
    device: str
    checkpoints: list[Checkpoint] = field(default_factory=list)  # TrainConfig.checkpoint_every


def lr_at(step: int, cfg: TrainConfig) -> float:
    """lr(t) = lr·t/warmup for t < warmup, then cosine from lr down to min_lr_frac·lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def encode_documents(tokenizer, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per document: text + eos, loss on every token. Notebook 05 §4."""
    return [encode_document(tokenizer, t) for t in texts]


def encode_qa(tokenizer, pairs: Sequence[QAPair]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per QA pair: prompt + ' ' + answer + eos; labels −100 on prompt (NB 05 §5)."""
    return encode_pairs(tokenizer, pairs)


def qa_batch(tokenizer, pairs: Sequence) -> TokenBatch:
    """One right-padded batch of `encode_qa` examples (the measurement batch of Notebook 10)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = encode_qa(tokenizer, pairs)
    return make_token_batch([x for x, _ in enc], pad,
                            target_masks=[[t != IGNORE_INDEX for t in y] for _, y in enc])


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """(ids, mask, labels), right-padded by `tasks.make_token_batch`: −100 on padding and on
    every position whose label is −100 (the first position never carries loss anyway)."""
    batch = make_token_batch([x for x, _ in examples], pad_id,
                             target_masks=[[t != IGNORE_INDEX for t in y] for _, y in examples])
    return batch.input_ids, batch.attention_mask, batch.labels


def snapshot_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter: θ_pt for the proximity penalty. Notebook 05 §5."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def proximity_penalty(
    model: torch.nn.Module, reference_state: Mapping[str, torch.Tensor], alpha: float
) -> torch.Tensor:
    """(α/2)‖θ − θ_pt‖² over all parameters; gradient α(θ − θ_pt). Notebook 05 §5."""
    total = sum(((p - reference_state[n]) ** 2).sum() for n, p in model.named_parameters())
    return 0.5 * alpha * total


def _train(model, data, tokenizer, cfg: TrainConfig, desc: str, penalty=None) -> TrainResult:
    dev = next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    losses, penalties, checkpoints = [], [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not cfg.progress, mininterval=2.0)
    for step in bar:
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(data), generator=gen).tolist()
        batch, order = [data[i] for i in order[: cfg.batch_size]], order[cfg.batch_size :]
        ids, mask, labels = (t.to(dev) for t in collate(batch, tokenizer.pad_token_id))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        pen = penalty(model) if penalty is not None else torch.zeros((), device=dev)
        opt.zero_grad(set_to_none=True)
        (loss + pen).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        penalties.append(pen.item())
        every = cfg.checkpoint_every
        if every and ((step + 1) % every == 0 or step + 1 == cfg.steps):
            state = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
            checkpoints.append(Checkpoint(step + 1, lr_at(step, cfg), state))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return TrainResult(losses, penalties, cfg.steps, time.perf_counter() - t0, dev.type,
                       checkpoints)


def pretrain(
    model, tokenizer, world: World, cfg: TrainConfig, texts: Sequence[str] | None = None
) -> TrainResult:
    """Next-token loss on every pre-training document: L_pt = −Σ_t log p(x_t | x_<t).

    `texts` replaces the world's corpus (a retraining subset, Notebook 10). Notebook 05 §4.
    """
    check_tokenizer(tokenizer, world)
    data = encode_documents(tokenizer, world.pretrain_texts() if texts is None else texts)
    return _train(model, data, tokenizer, cfg, "pre-train")


def finetune(
    model,
    reference_params: Mapping[str, torch.Tensor],
    tokenizer,
    qa_pairs: Sequence[QAPair],
    cfg: TrainConfig,
    alpha: float,
) -> TrainResult:
    """Minimise L_ft(θ) + (α/2)‖θ − θ_pt‖², answer-only loss. Notebook 05, section 5."""
    data = encode_qa(tokenizer, qa_pairs)
    ref = {n: t.to(next(model.parameters()).device) for n, t in reference_params.items()}
    return _train(
        model, data, tokenizer, cfg, "fine-tune", penalty=lambda m: proximity_penalty(m, ref, alpha)
    )


# ---------------------------------------------------------------- the pipeline
@dataclass(frozen=True)
class PipelinePreset:
    """World + model + both training stages (Notebook 05 runs `default`)."""

    world: str = field(metadata={"help": "key of msif_lite.world.generate.WORLD_PRESETS"})
    model: str = field(metadata={"help": "key of msif_lite.world.lm.MODEL_PRESETS"})
    pretrain: TrainConfig = field(metadata={"help": "pre-training stage"})
    finetune: TrainConfig = field(metadata={"help": "fine-tuning stage"})
    alpha: float = field(default=0.01, metadata={"help": "proximity strength α"})

    def __post_init__(self) -> None:
        if self.world not in WORLD_PRESETS:
            raise ValueError(
                f"PipelinePreset.world={self.world!r}: use one of {list(WORLD_PRESETS)}"
            )
        if self.model not in MODEL_PRESETS:
            raise ValueError(
                f"PipelinePreset.model={self.model!r}: use one of {list(MODEL_PRESETS)}"
            )
        if self.alpha < 0:
            raise ValueError("set PipelinePreset.alpha >= 0")


PIPELINE_PRESETS: dict[str, PipelinePreset] = {
    "ci-fast": PipelinePreset(
        "ci-fast", "ci-fast", TrainConfig(steps=600, lr=2e-3), TrainConfig(steps=100, lr=5e-4)
    ),
    "lds": PipelinePreset(
        "lds", "ci-fast", TrainConfig(steps=600, lr=2e-3), TrainConfig(steps=100, lr=5e-4)
    ),  # the retraining ground truth of Notebook 10: one re-pre-train + re-fine-tune ≈ 1 min
    "lds-hard": PipelinePreset(
        "lds-hard", "ci-fast", TrainConfig(steps=600, lr=2e-3), TrainConfig(steps=100, lr=5e-4)
    ),  # the second counterfactual world (aliases, distractors, filler), same model/schedule
    "lds-fast": PipelinePreset(
        "lds", "ci-fast", TrainConfig(steps=40, lr=2e-3, warmup=5),
        TrainConfig(steps=8, lr=5e-4, warmup=2),
    ),  # MSIF_FAST plumbing for `bench lds`: seconds per retrain, not a trained model
    "default": PipelinePreset(
        "default",
        "gpt-neox-mini",
        TrainConfig(steps=2500, lr=2e-3),
        TrainConfig(steps=100, lr=5e-4),
    ),
    "paper-toy": PipelinePreset(
        "default",
        "gpt-neox-toy",
        TrainConfig(steps=2500, lr=1e-3),
        TrainConfig(steps=100, lr=5e-4),
    ),  # the default world on the paper's Exp 1 shape (hidden 256); `bench accuracy` uses it
    "large": PipelinePreset(
        "large",
        "gpt-neox-toy",
        TrainConfig(steps=20000, batch_size=64, lr=1e-3),
        TrainConfig(steps=1000, batch_size=64, lr=3e-4),
    ),  # fmt: skip
}


@dataclass
class PipelineResult:
    """Everything the pipeline measured; `summary` is what `results/world.json` holds."""

    world: World
    tokenizer: object
    pretrained: torch.nn.Module
    finetuned: torch.nn.Module
    pretrain_result: TrainResult
    finetune_result: TrainResult
    summary: dict
    out_dir: Path


def build_world_pipeline(
    preset: str | PipelinePreset = "default",
    out_dir: str | Path = "runs/world",
    seed: int = 0,
    *,
    scratch_baseline: bool = True,
    device: torch.device | None = None,
) -> PipelineResult:
    """generate → tokenize → pre-train → fine-tune (+ scratch baseline) → evaluate.

    Writes `world/` (+ `world/tokenizer/`), `checkpoints/{pretrained,finetuned}/`,
    `losses.json`, `losses.png` and `results.json` under `out_dir`. Notebook 05.
    """
    t0 = time.perf_counter()
    p = PIPELINE_PRESETS[preset] if isinstance(preset, str) else preset
    dev = device or default_device()
    out = Path(out_dir)
    world = make_world(p.world, seed)
    world.save(out / "world")
    tok = train_tokenizer(world, out / "world" / "tokenizer")
    model = build_model(p.model, len(tok), seed, tok).to(dev)
    pt_res = pretrain(model, tok, world, replace(p.pretrain, seed=seed))
    mp: ModelPreset = MODEL_PRESETS[p.model]
    meta = CheckpointMeta(
        p.model,
        seed,
        "pretrained",
        None,
        world.content_hash,
        tokenizer_hash(tok),
        config_hash(model.config),
        world.preset,
    )
    save_checkpoint(model, out / "checkpoints" / "pretrained", meta, tok)
    pretrained_acc = answer_accuracy(model, tok, world.queries)
    reference = snapshot_params(model)
    pretrained = build_model(mp, len(tok), seed, tok).to(dev)
    pretrained.load_state_dict(model.state_dict())
    ft_res = finetune(
        model, reference, tok, world.finetune_qa, replace(p.finetune, seed=seed), p.alpha
    )
    save_checkpoint(
        model,
        out / "checkpoints" / "finetuned",
        replace(meta, stage="finetuned", alpha=p.alpha),
        tok,
    )
    pipeline_s = time.perf_counter() - t0
    summary = _summary(p, "custom" if not isinstance(preset, str) else p.world, dev, seed,
                       world, tok, model, pretrained, (pt_res, ft_res), pipeline_s,
                       pretrained_acc)  # fmt: skip
    curves = {"pre-training": pt_res.losses, "fine-tuning": ft_res.losses}
    if scratch_baseline:
        scratch = build_model(mp, len(tok), seed + 1, tok).to(dev)
        sc_res = finetune(
            scratch,
            snapshot_params(scratch),
            tok,
            world.finetune_qa,
            replace(p.finetune, seed=seed),
            p.alpha,
        )
        summary["scratch_accuracy"] = answer_accuracy(scratch, tok, world.queries)
        curves["fine-tuning from scratch"] = sc_res.losses
    (out / "losses.json").write_text(json.dumps(curves) + "\n")
    _plot(curves, out / "losses.png")
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return PipelineResult(world, tok, pretrained, model, pt_res, ft_res, summary, out)


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI: `python -m msif_lite.world.training --preset ci-fast --out DIR [--seed S]`."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ci-fast", choices=list(PIPELINE_PRESETS))
    ap.add_argument("--out", default="runs/world", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=None, help="override the preset")
    ap.add_argument("--finetune-steps", type=int, default=None, help="override the preset")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on busy CPUs)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    p = PIPELINE_PRESETS[args.preset]
    pt = replace(
        p.pretrain, steps=args.pretrain_steps or p.pretrain.steps, progress=not args.no_progress
    )
    ft = replace(
        p.finetune, steps=args.finetune_steps or p.finetune.steps, progress=not args.no_progress
    )
    res = build_world_pipeline(replace(p, pretrain=pt, finetune=ft), args.out, args.seed)
    res.summary["preset"] = args.preset
    (Path(args.out) / "results.json").write_text(json.dumps(res.summary, indent=2) + "\n")
    print(json.dumps(res.summary, indent=2))
    return res.summary


if __name__ == "__main__":
    main()
