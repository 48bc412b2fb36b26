"""What the world pipeline (`world.training.build_world_pipeline`, notebook 05) reports:
the loss curves as a figure and `results/world.json`'s summary of one run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from msif_lite.world.generate import World
from msif_lite.world.lm import answer_accuracy, n_params, relative_drift, tokenizer_hash

if TYPE_CHECKING:  # pragma: no cover
    from msif_lite.world.training import PipelinePreset, TrainResult


def loss_plot(curves: Mapping[str, Sequence[float]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(curves), 3.2))
    axes = fig.subplots(1, len(curves))
    for ax, (name, ys) in zip(list(axes) if len(curves) > 1 else [axes], curves.items()):
        ax.plot(ys, lw=0.8)
        ax.set(title=name, xlabel="step", ylabel="loss", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summary(p: PipelinePreset, preset_name: str, dev, seed: int, world: World, tok, model,
             pretrained, results: tuple[TrainResult, TrainResult], pipeline_s: float,
             pretrained_acc: float) -> dict:  # fmt: skip
    """What `results/world.json` holds: sizes, timings, losses, accuracies, drift, hashes."""
    pt_res, ft_res = results
    return {
        "preset": preset_name,
        "model_preset": p.model,
        "device": dev.type,
        "seed": seed,
        "alpha": p.alpha,
        "n_params": n_params(model),
        "vocab_size": len(tok),
        "n_entities": world.config.n_entities,
        "n_documents": len(world.documents),
        "n_finetune_qa": len(world.finetune_qa),
        "n_queries": len(world.queries),
        "pretrain_steps": p.pretrain.steps,
        "finetune_steps": p.finetune.steps,
        "batch_size": p.pretrain.batch_size,
        "pretrain_s": round(pt_res.seconds, 1),
        "finetune_s": round(ft_res.seconds, 1),
        "pipeline_s": round(pipeline_s, 1),
        "final_pretrain_loss": sum(pt_res.losses[-20:]) / len(pt_res.losses[-20:]),
        "final_finetune_loss": sum(ft_res.losses[-20:]) / len(ft_res.losses[-20:]),
        "chance_accuracy": world.chance_accuracy(),
        "majority_accuracy": world.majority_accuracy(),
        "pretrained_accuracy": pretrained_acc,
        "finetuned_accuracy": answer_accuracy(model, tok, world.queries),
        "finetune_train_accuracy": answer_accuracy(model, tok, world.finetune_qa),
        "relative_drift": relative_drift(model, pretrained),
        "data_hash": world.content_hash,
        "tokenizer_hash": tokenizer_hash(tok),
    }
