"""kronfluence's EK-FAC fit and pairwise scores on the kit's token blocks: the peer side of
`msif-lite bench fit-speed`, run by kronfluence's own interpreter (kronfluence is never a
dependency of the kit: it pulls torchvision, which breaks transformers in the kit's env):

    <peer python> msif_lite/bench/peers/kronfluence_fit.py SPEC.json

SPEC (written by `msif_lite.bench.fit_speed`): model (a from_pretrained folder), blocks (the
token-blocks file, `peer_io.read_blocks`), modules (the Linear modules to track, by name),
threads, batch_size, queries, fisher ("sampled" / "empirical"), seed, workdir (kronfluence's
output_dir), result (where this writes its JSON). Same model loader, blocks, batches, warm-up
and memory measurement as the kit's side (`peer_io`); what is kronfluence's own:

- the task: the loss is the sum over target tokens of the cross-entropy (as the kit's
  `LanguageModelingTask`), with `sample=True` drawing each label from the model's softmax
  (`torch.multinomial`, kronfluence's documented way: the sampled-label / true Fisher); the
  measurement is the same loss on the data labels; the attention mask is given
  (`get_attention_mask`), as in kronfluence's language-model examples;
- FactorArguments(strategy="ekfac", sampled labels (`use_empirical_fisher` with
  fisher="empirical"), no AMP, float32 covariances and
  per-sample gradients and Λ, its default float64 eigendecomposition, every example);
- the stage times are wall clock around `fit_covariance_matrices`, `perform_eigendecomposition`
  and `fit_lambda_matrices` (each includes kronfluence writing its factors to `workdir` and
  loading the previous stage's), the fit's memory `peer_io.rss_peak` around all three;
- the scores: `compute_pairwise_scores` of the first `queries` blocks against every block
  with ScoreArguments(damping_factor=None): λ_l = 0.1 · mean(Λ_l) per module, the kit's
  `Damping()` heuristic.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from peer_io import (
    Stopwatch,
    batch_slices,
    load_model,
    process_info,
    read_blocks,
    read_json,
    rss_peak,
    warm_up,
    write_json,
)


def make_dataset(ids: list[list[int]]):
    """The blocks as a torch Dataset of {input_ids, attention_mask, labels} (all ones / the
    ids: every token but the first is a target, as the kit's `make_token_batch`)."""
    import torch

    class Blocks(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = torch.tensor(ids, dtype=torch.long)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            x = self.ids[i]
            return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}

    return Blocks()


def make_task(modules: list[str]):
    """kronfluence Task: summed token cross-entropy, sampled labels for the Fisher."""
    import torch
    import torch.nn.functional as F
    from kronfluence.task import Task

    class CausalLMTask(Task):
        def compute_train_loss(self, batch, model, sample: bool = False):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits.float()
            logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            else:
                labels = batch["labels"][:, 1:].reshape(-1)
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return list(modules)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return CausalLMTask()


def factor_arguments(fisher: str = "sampled"):
    import torch
    from kronfluence.arguments import FactorArguments

    return FactorArguments(strategy="ekfac", use_empirical_fisher=fisher == "empirical",
                           amp_dtype=None,
                           covariance_max_examples=None, lambda_max_examples=None,
                           activation_covariance_dtype=torch.float32,
                           gradient_covariance_dtype=torch.float32,
                           eigendecomposition_dtype=torch.float64,
                           per_sample_gradient_dtype=torch.float32,
                           lambda_dtype=torch.float32)  # fmt: skip


def run(spec: dict) -> dict:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    import kronfluence
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import ScoreArguments
    from kronfluence.module.utils import get_tracked_module_names
    from kronfluence.utils.dataset import DataLoaderKwargs

    blocks = read_blocks(spec["blocks"])
    bs, q = int(spec["batch_size"]), int(spec["queries"])
    model = load_model(spec["model"])
    warm_up(model, blocks.ids[batch_slices(len(blocks.ids), bs)[0]])
    task = make_task(spec["modules"])
    model = prepare_model(model, task)
    tracked = get_tracked_module_names(model)
    if sorted(tracked) != sorted(spec["modules"]):
        odd = sorted(set(tracked) ^ set(spec["modules"]))
        raise RuntimeError(f"kronfluence tracks {len(tracked)} modules, not the "
                           f"{len(spec['modules'])} asked: {odd}")
    analyzer = Analyzer("fit_speed", model, task, cpu=True, disable_tqdm=True,
                        output_dir=str(Path(spec["workdir"])), log_level=logging.WARNING)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    data = make_dataset(blocks.ids)
    fa = factor_arguments(spec.get("fisher", "sampled"))
    torch.manual_seed(int(spec["seed"]))

    def fit() -> dict:
        t = {}
        with Stopwatch() as s:
            analyzer.fit_covariance_matrices("ekfac", data, per_device_batch_size=bs,
                                             factor_args=fa, overwrite_output_dir=True)
        t["covariance_s"] = s.seconds
        with Stopwatch() as s:
            analyzer.perform_eigendecomposition("ekfac", factor_args=fa,
                                                overwrite_output_dir=True)
        t["eigendecomposition_s"] = s.seconds
        with Stopwatch() as s:
            analyzer.fit_lambda_matrices("ekfac", data, per_device_batch_size=bs,
                                         factor_args=fa, overwrite_output_dir=True)
        t["lambda_s"] = s.seconds
        return t

    with Stopwatch() as wall:
        growth, hwm, timings = rss_peak(fit)
    sa = ScoreArguments(damping_factor=None)
    with Stopwatch() as s:
        analyzer.compute_pairwise_scores("scores", "ekfac", query_dataset=data,
                                         train_dataset=data, per_device_query_batch_size=q,
                                         per_device_train_batch_size=bs,
                                         query_indices=list(range(q)), score_args=sa,
                                         overwrite_output_dir=True)  # fmt: skip
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return {"tool": "kronfluence", "status": "ok", "version": kronfluence.__version__,
            "timings": timings, "fit_s": wall.seconds,
            "fit_rss_growth_bytes": growth, "peak_rss_bytes": hwm,
            "score_s": s.seconds, "scores": scores.double().tolist(),
            "modules": len(tracked), "factor_arguments": fa.to_str_dict(),
            "score_arguments": sa.to_str_dict(), "process": process_info()}  # fmt: skip


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__.split("\n\n")[1])
    spec = read_json(argv[0])
    write_json(spec["result"], run(spec))


if __name__ == "__main__":
    main(sys.argv[1:])
