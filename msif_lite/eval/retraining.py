"""Retraining ground truth across both stages: re-pre-train on a subset of the corpus,
re-fine-tune with the same data and α, measure every query (Notebook 10 §The language
model's retraining ground truth).

For subset S_j (a 0/1 mask over the pre-training documents):

    θ_pt(S_j) = pre-train from the same initialisation and schedule on S_j
    θ_ft(S_j) = argmin L_ft(θ) + (α/2)‖θ − θ_pt(S_j)‖²   (same fine-tuning data)
    m_j(q)    = −log p(answer | prompt; θ_ft(S_j))       (answer tokens + eos)

`run_subsets` writes one JSON line per finished retrain, so an interrupted sweep resumes
where it stopped; `GroundTruth` is the small shipped file (masks, m, settings, hashes) that
refuses to load for another world, tokenizer or model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from msif_lite.engine.tasks import LanguageModelingTask
from msif_lite.world.generate import World
from msif_lite.world.lm import answer_correct, build_model, config_hash, tokenizer_hash
from msif_lite.world.training import (
    PIPELINE_PRESETS,
    Checkpoint,
    PipelinePreset,
    finetune,
    pretrain,
    qa_batch,
    snapshot_params,
)

GROUND_TRUTH_SCHEMA = 1


@dataclass(frozen=True)
class RetrainConfig:
    """One retraining experiment: which pipeline, which subsets, which seeds."""

    pipeline: str = field(default="lds", metadata={"help": "key of PIPELINE_PRESETS"})
    n_subsets: int = field(default=32, metadata={"help": "M random subsets"})
    fraction: float = field(default=0.5, metadata={"help": "fraction of documents kept"})
    subset_seed: int = field(default=0, metadata={"help": "seed of the subset masks"})
    init_seed: int = field(default=0, metadata={"help": "model initialisation (shared by all)"})
    data_seed: int = field(default=0, metadata={"help": "batch order of both stages"})
    noise_seed: int = field(default=1, metadata={"help": "second data-order seed (noise)"})
    n_noise: int = field(default=4, metadata={"help": "subsets retrained with noise_seed"})

    def __post_init__(self) -> None:
        if self.pipeline not in PIPELINE_PRESETS:
            raise ValueError(
                f"RetrainConfig.pipeline={self.pipeline!r}: use one of {list(PIPELINE_PRESETS)}"
            )
        if self.n_subsets < 2:
            raise ValueError("set RetrainConfig.n_subsets >= 2 (a Spearman needs two points)")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError("set RetrainConfig.fraction strictly between 0 and 1")
        if not 0 <= self.n_noise <= self.n_subsets:
            raise ValueError("set RetrainConfig.n_noise between 0 and n_subsets")

    @property
    def preset(self) -> PipelinePreset:
        return PIPELINE_PRESETS[self.pipeline]


def subset_masks(n_docs: int, n_subsets: int, fraction: float, seed: int) -> torch.Tensor:
    """(M, N) bool: each row keeps round(fraction·N) documents drawn without replacement."""
    gen = torch.Generator().manual_seed(seed)
    k = round(fraction * n_docs)
    masks = torch.zeros(n_subsets, n_docs, dtype=torch.bool)
    for j in range(n_subsets):
        masks[j, torch.randperm(n_docs, generator=gen)[:k]] = True
    return masks


@torch.no_grad()
def measure(model, tokenizer, queries: Sequence) -> torch.Tensor:
    """m(q) = −log p(answer | prompt) for each query (answer tokens + eos), float64."""
    task = LanguageModelingTask()
    dev = next(model.parameters()).device
    out = [
        task.measurement(model, qa_batch(tokenizer, queries[i : i + 64]).to(dev)).double().cpu()
        for i in range(0, len(queries), 64)
    ]
    return torch.cat(out)


def retrain(
    world: World, tokenizer, keep: Sequence[bool], cfg: RetrainConfig, data_seed: int,
    device: torch.device | None = None,
):
    """Pre-train on the kept documents, then fine-tune; returns the fine-tuned model."""
    p = cfg.preset
    dev = device or torch.device("cpu")
    texts = [d.text for d, k in zip(world.documents, keep) if k]
    model = build_model(p.model, len(tokenizer), cfg.init_seed, tokenizer).to(dev)
    pretrain(model, tokenizer, world, replace(p.pretrain, seed=data_seed, progress=False),
             texts=texts)  # fmt: skip
    reference = snapshot_params(model)
    finetune(model, reference, tokenizer, world.finetune_qa,
             replace(p.finetune, seed=data_seed, progress=False), p.alpha)  # fmt: skip
    return model


def pretrain_checkpoints(
    world: World, tokenizer, cfg: RetrainConfig, every: int, device: torch.device | None = None,
) -> list[Checkpoint]:
    """Re-run the pipeline's pre-training on the whole corpus (same initialisation, data order
    and schedule as `cfg`), keeping the weights every `every` steps and after the last: the
    checkpoints TracIn sums over (Notebook 11). The last one reproduces θ_pt."""
    p = cfg.preset
    model = build_model(p.model, len(tokenizer), cfg.init_seed, tokenizer).to(device or "cpu")
    res = pretrain(model, tokenizer, world, replace(p.pretrain, seed=cfg.data_seed,
                                                    progress=False, checkpoint_every=every))
    return res.checkpoints


def outcome(model, tokenizer, queries: Sequence) -> dict:
    """The measured outcome of one retrain: m per query and greedy-answer correctness."""
    return {
        "m": measure(model, tokenizer, queries).tolist(),
        "correct": [bool(c) for c in answer_correct(model, tokenizer, queries)],
    }


def fingerprint(world: World, tokenizer, cfg: RetrainConfig) -> dict:
    """Everything a retrain's outcome depends on: the world, tokenizer, model shape and
    initial weights, the pipeline and the subset/seed settings (not how many subsets are
    run: subset j's mask and outcome do not depend on it)."""
    base = build_model(cfg.preset.model, len(tokenizer), cfg.init_seed, tokenizer)
    init = hashlib.sha256()
    for n, t in sorted(base.state_dict().items()):
        init.update(n.encode() + t.detach().cpu().numpy().tobytes())
    return {
        "world_hash": world.content_hash,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "config_hash": config_hash(base.config),
        "init_hash": init.hexdigest(),
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("n_subsets", "n_noise")},
        "pipeline": json.loads(json.dumps(asdict(cfg.preset))),
    }


def run_subsets(
    world: World, tokenizer, cfg: RetrainConfig, partial: str | Path,
    device: torch.device | None = None, progress: bool = True, shard: tuple[int, int] = (0, 1),
) -> list[dict]:
    """Retrain every subset (data_seed) and the first n_noise again (noise_seed).

    Each finished retrain appends one JSON line {"subset", "seed", "m", "correct", "s"} to
    `partial`; lines already there (same fingerprint) are kept, so a rerun resumes.
    `shard=(i, n)`: run only every n-th missing job starting at i (n processes can share one
    partial file; each appends whole lines) and return what is done so far.
    """
    from tqdm.auto import tqdm

    path = Path(partial)
    fp = fingerprint(world, tokenizer, cfg)
    done: dict[tuple[int, int], dict] = {}
    if path.exists():
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        if lines and lines[0].get("fingerprint") != fp:
            raise ValueError(
                f"{path} holds retrains of another world/model/settings: delete it or pass "
                "another partial file"
            )
        done = {(r["subset"], r["seed"]): r for r in lines[1:]}
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fingerprint": fp}) + "\n")
    masks = subset_masks(len(world.documents), cfg.n_subsets, cfg.fraction, cfg.subset_seed)
    jobs = [(j, cfg.data_seed) for j in range(cfg.n_subsets)]
    jobs += [(j, cfg.noise_seed) for j in range(cfg.n_noise)]
    todo = [job for job in jobs if job not in done][shard[0]::shard[1]]
    for j, seed in tqdm(todo, desc="retrain", disable=not progress):
        t0 = time.perf_counter()
        model = retrain(world, tokenizer, masks[j].tolist(), cfg, seed, device)
        row = {"subset": j, "seed": seed, **outcome(model, tokenizer, world.queries),
               "s": round(time.perf_counter() - t0, 1)}  # fmt: skip
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[(j, seed)] = row
    return [done[k] for k in jobs if k in done]


@dataclass
class GroundTruth:
    """The shipped retraining ground truth of one world (Notebook 10).

    masks (M, N) bool over `doc_ids`; m (M, Q) measured at each re-fine-tuned model;
    m_noise (K, Q) for the first K subsets retrained with a second data-order seed.
    """

    doc_ids: list[str]
    query_ids: list[str]
    masks: torch.Tensor
    m: torch.Tensor
    correct: torch.Tensor
    m_noise: torch.Tensor
    m_full: torch.Tensor
    fingerprint: dict
    retrain_s: float

    def save(self, path: str | Path) -> Path:
        """Atomic JSON write (temp file + fsync + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "schema": GROUND_TRUTH_SCHEMA,
            "fingerprint": self.fingerprint,
            "doc_ids": self.doc_ids,
            "query_ids": self.query_ids,
            "masks": ["".join("1" if b else "0" for b in row) for row in self.masks.tolist()],
            "m": [[round(v, 6) for v in row] for row in self.m.tolist()],
            "correct": self.correct.int().tolist(),
            "m_noise": [[round(v, 6) for v in row] for row in self.m_noise.tolist()],
            "m_full": [round(v, 6) for v in self.m_full.tolist()],
            "retrain_s": self.retrain_s,
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, separators=(",", ":"))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, world: World, tokenizer) -> GroundTruth:
        """Read a ground truth; refuse it unless it was made on this world and tokenizer."""
        body = json.loads(Path(path).read_text())
        if body.get("schema") != GROUND_TRUTH_SCHEMA:
            raise ValueError(f"{path}: schema {body.get('schema')}, expected "
                             f"{GROUND_TRUTH_SCHEMA}; regenerate with `msif-lite bench lds`")
        fp = body["fingerprint"]
        for key, have in (("world_hash", world.content_hash),
                          ("tokenizer_hash", tokenizer_hash(tokenizer))):  # fmt: skip
            if fp[key] != have:
                raise ValueError(
                    f"{path} was made for another {key.removesuffix('_hash')} "
                    f"({fp[key][:12]}… vs {have[:12]}…): load the world and tokenizer it was "
                    "made on, or regenerate it with `msif-lite bench lds`"
                )
        if body["query_ids"] != [q.fact_id for q in world.queries]:
            raise ValueError(f"{path}: its queries are not this world's queries")

        def bits(rows):
            return torch.tensor([[c == "1" for c in r] for r in rows], dtype=torch.bool)

        def f64(x):
            return torch.tensor(x, dtype=torch.float64)

        return cls(body["doc_ids"], body["query_ids"], bits(body["masks"]), f64(body["m"]),
                   torch.tensor(body["correct"], dtype=torch.bool), f64(body["m_noise"]),
                   f64(body["m_full"]), fp, body["retrain_s"])  # fmt: skip
