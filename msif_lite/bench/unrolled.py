"""Unrolled metagradients against retraining: `msif-lite bench unrolled` (issue 25, DESIGN §6).

Per world (`lds`, `lds-hard`): the unrolled methods (`attribution.unrolled_methods`: both
stages; exact fine-tune + influence for pre-training) on a subset of the questions — bench
lds's removal targets, one question per entity — next to multi_stage, multi_stage_token_
positive and bm25 on the same questions, against the world's retraining ground truth
(bench lds's loading and metrics: the shipped half-corpus subsets, or with --keep 0.9 a
small-fraction ground truth retrained into the cache). Reports LDS ± s.e. over the
questions, the noise ceiling on the same questions (and bench lds's over all of them),
leave-top-k-out Δm (one retrain per method; rows of results/lds.json reused), the linear
prediction of each removal against what retraining measured (the finite-removal gap), the
cost of each pass (s/query, peak memory) and the decomposition multi_stage → exact
fine-tune → exact both stages.

Scores are cached per question under --cache-dir, so an interrupted run resumes; each world
is merged into results/unrolled.json as soon as it is done. MSIF_FAST=1: the `lds-fast`
pipeline, 3 questions, bench lds's fast ground truth — plumbing, not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.bench import lds as lds_bench
from msif_lite.bench.common import Benchmark, BenchResult, PeakMemory, display_path, finish
from msif_lite.bench.lds import plot  # the same figure: LDS per method, Δm of removal
from msif_lite.bench.unrolled_report import markdown
from msif_lite.config import fast_mode
from msif_lite.eval.metrics import lds, sem, spearman
from msif_lite.eval.retraining import RetrainConfig
from msif_lite.eval.training_run import TrainingRun
from msif_lite.world.shipped import data_dir, load_shipped, trained_pipeline

UNROLLED = ("unrolled", "unrolled_finetune_only")
ABLATIONS = ("source", "if_checkpoints")  # attribution.source_methods: also --methods
BASELINES = ("multi_stage", "multi_stage_token_positive", "bm25")


@dataclass(frozen=True)
class UnrolledBenchConfig:
    """What the benchmark scores and retrains (the defaults are the committed run)."""

    retrain: RetrainConfig = RetrainConfig("lds", n_subsets=32, n_noise=8)
    n_queries: int = 13  # bench lds's removal targets (one question per entity)
    block: int = 4  # questions per reverse pass
    removal: bool = True  # leave-top-k-out: one retrain per method not in results/lds.json
    removal_methods: tuple[str, ...] | None = None  # None: every scored method
    methods: tuple[str, ...] = UNROLLED
    baselines: tuple[str, ...] = BASELINES
    fixed_order: int = 0  # M subsets also replayed in the run's own batch order (w = mask)


FAST = UnrolledBenchConfig(lds_bench.FAST.retrain, n_queries=2, block=2,
                           baselines=("multi_stage", "bm25"),
                           removal_methods=("unrolled",), fixed_order=3)  # fmt: skip


def _per_query(scores: torch.Tensor, gt, targets: list[int]) -> list[float]:
    return lds(scores, gt.masks, gt.m[:, targets]).tolist()


def _paired(per_q: dict[str, list[float]], base: str) -> dict:
    """Mean ± s.e. over questions of LDS(method) − LDS(base), per method."""
    if base not in per_q:
        return {}
    out = {}
    for n, v in per_q.items():
        d = np.subtract(v, per_q[base]).tolist()
        out[n] = {"mean": float(np.mean(d)), "sem": sem(d)}
    return out


def cross_query(scores: torch.Tensor) -> float:
    """Mean over pairs of questions of the Spearman between their score rows: near 1 when
    one query-independent component dominates a method's scores."""
    q = scores.shape[0]
    pairs = [spearman(scores[a], scores[b]) for a in range(q) for b in range(a + 1, q)]
    return float(np.mean(pairs)) if pairs else float("nan")


def _cached_scores(att: Attributor, name: str, queries, targets: list[int], block: int,
                   path: Path, timings: dict) -> torch.Tensor:  # fmt: skip
    """(len(targets), N) scores of `name`, computed `block` questions at a time and cached
    per question in `path` (JSON {method: {query index: scores}})."""
    cache = json.loads(path.read_text()) if path.exists() else {}
    have = cache.setdefault(name, {})
    todo = [i for i in targets if str(i) not in have]
    for j in range(0, len(todo), block):
        blk = todo[j : j + block]
        t0 = time.perf_counter()
        s = att.scores(name, [queries[i] for i in blk], att.doc_ids)
        timings.setdefault(name, []).append((len(blk), time.perf_counter() - t0))
        have.update({str(i): row.tolist() for i, row in zip(blk, s)})
        _write_merged(path, name, have)
        print(f"  {name}: {len(have)}/{len(targets)} questions "
              f"({time.perf_counter() - t0:.0f} s for {len(blk)})", flush=True)  # fmt: skip
    return torch.tensor([have[str(i)] for i in targets], dtype=torch.float64)


def _write_merged(path: Path, name: str, rows: dict) -> None:
    """Add `name`'s rows to the JSON cache as it is on disk now (another run may have added
    other methods since this one read it), written to a temporary file then renamed."""
    cache = json.loads(path.read_text()) if path.exists() else {}
    cache.setdefault(name, {}).update(rows)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache))
    tmp.replace(path)


def _ground_truth(shipped, cfg: UnrolledBenchConfig, cache: Path, gt_path: Path | None):
    rc = cfg.retrain
    if gt_path is None and rc.fraction == 0.5 and not fast_mode():
        gt_path = data_dir() / "lds" / f"{rc.pipeline}.json"  # the shipped ground truth
    if gt_path is None:
        tag = "fast" if fast_mode() else f"keep{rc.fraction:g}"
        gt_path = cache / f"ground-truth-{rc.pipeline}-{tag}.json"
    partial = cache / f"partial-{rc.pipeline}-keep{rc.fraction:g}.jsonl"
    return lds_bench.ground_truth(shipped, rc, gt_path, partial), gt_path


def linear_check(scores: torch.Tensor, gt, targets: list[int]) -> dict:
    """The first-order prediction of each retrained subset, m_j ≈ m_full + Σ_{z∉S_j} I(z, q)
    (w_z: 1 → 0), against the measured m_j: Pearson r and the ratio of spreads (std of
    the prediction / std of the measurement), mean over questions."""
    removed = (~gt.masks).double()  # (M, N)
    pred = removed @ scores.T  # (M, Q) predicted m_j − m_full
    meas = gt.m[:, targets] - gt.m_full[targets]
    r = [float(np.corrcoef(pred[:, q], meas[:, q])[0, 1]) for q in range(len(targets))]
    ratio = (pred.std(0) / meas.std(0)).tolist()
    return {"pearson_mean": float(np.mean(r)), "pearson_sem": sem(r),
            "spread_ratio_median": float(np.median(ratio)),
            "pred_dm_mean": float(pred.mean()), "measured_dm_mean": float(meas.mean())}


def removal(shipped, cfg: UnrolledBenchConfig, scores: dict, targets: list[int], cache: Path,
            previous: Path) -> dict:  # fmt: skip
    """Leave-top-k-out (bench lds's sets and retrains) plus unrolled's linear prediction of
    the rise of m on the targets, Σ_{removed z} I(z, q) (its scores are −dm/dw in nats)."""
    world, k = shipped.world, shipped.world.config.docs_per_fact
    full = {}
    names = cfg.removal_methods or list(scores)
    for n, s in ((n, scores[n]) for n in names if n in scores):
        f = torch.zeros(len(world.queries), s.shape[1], dtype=torch.float64)
        f[targets] = s
        full[n] = f
    sets = lds_bench.removal_sets(world, full, targets, k)
    rows = lds_bench.run_removals(
        shipped, cfg.retrain, sets, targets, cache / f"removal-{cfg.retrain.pipeline}.jsonl",
        lds_bench.previous_removals(world.preset, len(targets), previous))  # fmt: skip
    col = {d.doc_id: j for j, d in enumerate(world.documents)}
    if "unrolled" in full:  # −dm/dw in nats: its first-order prediction of the rise
        rows["unrolled"]["dm_targets_linear"] = float(
            scores["unrolled"][:, [col[d] for d in sets["unrolled"]]].sum(1).mean())
    return rows


def fixed_order_truth(run: TrainingRun, gt, queries, m: int, path: Path) -> torch.Tensor:
    """(m + 1, Q) m(q) after replaying both stages with w = mask_j in the run's own batch
    order, for the ground truth's first m subsets, then w = 1 (last row); one JSON line per
    replay in `path` (resumable). The counterfactual the unrolled derivative linearises: a
    retrain on the subset (the ground truth) reshuffles the batches instead."""
    done = {}
    if path.exists():
        done = {r["subset"]: r["m"] for r in map(json.loads, path.read_text().splitlines())}
    for j in [*range(m), -1]:
        if j not in done:
            w = torch.ones(gt.masks.shape[1], dtype=torch.float64) if j < 0 else gt.masks[j]
            done[j] = run.measure_at(w.double(), queries).tolist()
            with path.open("a") as f:
                f.write(json.dumps({"subset": j, "m": done[j]}) + "\n")
            print(f"  fixed-order replay {j}", flush=True)
    return torch.tensor([done[j] for j in [*range(m), -1]], dtype=torch.float64)


def fixed_order_lds(scores: dict, gt, fixed: torch.Tensor, targets: list[int]) -> dict:
    """LDS of each method on the first M subsets against the fixed-order replays and against
    the reshuffled retrains of the same subsets, and Spearman between the two truths."""
    k = fixed.shape[0] - 1
    masks, mf, mr = gt.masks[:k], fixed[:k, targets], gt.m[:k, targets]
    out = {"n_subsets": k, "truths_spearman": [spearman(mf[:, q], mr[:, q])
                                               for q in range(len(targets))]}  # fmt: skip
    for n, s in scores.items():
        a, b = lds(s, masks, mf).tolist(), lds(s, masks, mr).tolist()
        out[n] = {"fixed_order": {"mean": float(np.mean(a)), "sem": sem(a)},
                  "reshuffled": {"mean": float(np.mean(b)), "sem": sem(b)}}  # fmt: skip
    if "unrolled" in scores:
        out["unrolled_linear"] = linear_check(scores["unrolled"], replace(
            gt, masks=masks, m=fixed[:k], m_full=fixed[k]), targets)  # fmt: skip
    return out


def cost(run: TrainingRun, timings: dict, n: int, peak_mb: float) -> dict:
    """Seconds per question of each method and of each pass, and peak memory."""
    sec = dict(run.seconds)
    per = {k: v / n for k, v in sec.items() if k != "pretrain_replay"}
    total = {m: sum(t for _, t in timings.get(m, [])) / n for m in timings}
    return {"pass_s_per_query": per, "pretrain_replay_s": sec.get("pretrain_replay", 0.0),
            "method_s_per_query": total, "peak_mb": peak_mb, "block": run.block,
            "note": "unrolled runs first and includes the replay and the fine-tune pass; "
                    "unrolled_finetune_only then reuses the fine-tune pass (its own cost: "
                    "finetune_pass + its method time + the replay)"}  # fmt: skip


def run_world(cfg: UnrolledBenchConfig, cache: Path, gt_path: Path | None,
              previous: Path) -> dict:  # fmt: skip
    """Everything the benchmark measures on one world."""
    t0 = time.perf_counter()
    wdir, cdir = trained_pipeline(cfg.retrain.pipeline)
    shipped = load_shipped(world_dir=wdir, checkpoint_dir=cdir)
    world = shipped.world
    cache.mkdir(parents=True, exist_ok=True)
    gt, gt_path = _ground_truth(shipped, cfg, cache, gt_path)
    run = TrainingRun.from_pipeline(cfg.retrain.preset, world, shipped.tokenizer,
                                    cfg.retrain.init_seed, block=cfg.block)  # fmt: skip
    if cfg.retrain.init_seed != cfg.retrain.data_seed:
        raise ValueError("the shipped run used one seed for initialisation and data order")
    att = Attributor(shipped.pretrained, shipped.finetuned, shipped.tokenizer,
                     [(d.doc_id, d.text) for d in world.documents],
                     [(p.prompt, p.answer) for p in world.finetune_qa],
                     AttributionConfig(cache_dir=str(cache / "msif"), progress=False),
                     alpha=shipped.alpha, mentions=world.document_mentions(),
                     training_run=run)  # fmt: skip
    targets = lds_bench.removal_targets(world, cfg.n_queries)
    spath = cache / f"scores-{cfg.retrain.pipeline}.json"  # keyed by question index
    timings: dict = {}
    scores = {}
    with PeakMemory() as mem:
        for n in cfg.methods:
            scores[n] = _cached_scores(att, n, world.queries, targets, cfg.block, spath, timings)
    for n in cfg.baselines:
        scores[n] = _cached_scores(att, n, world.queries, targets, 64, spath, timings)
    per_q = {n: _per_query(s, gt, targets) for n, s in scores.items()}
    k = gt.m_noise.shape[0]
    ceil = [spearman(gt.m_noise[:, q], gt.m[:k, q]) for q in targets]
    out = {
        "methods": {n: {"lds_mean": float(np.mean(v)), "lds_sem": sem(v), "lds_per_query": v,
                        "cross_query_spearman": cross_query(scores[n])}
                    for n, v in per_q.items()},
        "paired_vs_multi_stage": _paired(per_q, "multi_stage"),
        "noise_ceiling": {"mean": float(np.mean(ceil)), "sem": sem(ceil)},
        "noise_ceiling_all_queries": dict(zip(("mean", "sem"), lds_bench.noise_ceiling(gt))),
        "linear_prediction": {n: linear_check(scores[n], gt, targets) for n in cfg.methods
                              if n == "unrolled"},
        "queries": [world.queries[i].fact_id for i in targets],
        "n_subsets": int(gt.masks.shape[0]), "n_noise": k, "n_documents": len(world.documents),
        "fraction_kept": cfg.retrain.fraction,
        "cost": cost(run, timings, len(targets), mem.peak_mb) if run.seconds else None,
        "settings": {**asdict(cfg.retrain), "n_queries": len(targets), "block": cfg.block,
                     "ground_truth": display_path(gt_path), "fast": fast_mode(),
                     "sign": "prediction_j = −Σ_{z∈S_j} I(z,q): positive I helps"},
    }  # fmt: skip
    if cfg.fixed_order:
        fixed = fixed_order_truth(run, gt, world.queries, cfg.fixed_order,
                                  cache / f"fixed-order-{cfg.retrain.pipeline}.jsonl")
        out["fixed_order"] = fixed_order_lds(scores, gt, fixed, targets)
    if cfg.removal:
        out["top_k_removal"] = removal(shipped, cfg, scores, targets, cache, previous)
    out["timings_s"] = {"total": time.perf_counter() - t0}
    return out


def merged(out_dir: Path, payload: dict) -> dict:
    """`payload`'s worlds added to those already in out_dir/unrolled.json (a world whose
    scores all came from the cache keeps the cost its earlier entry measured)."""
    old = out_dir / "unrolled.json"
    worlds = json.loads(old.read_text()).get("worlds", {}) if old.exists() else {}
    for name, w in payload["worlds"].items():  # scores all cached: keep the earlier cost
        before = worlds.get(name, {})
        if w.get("cost") is None and before.get("cost"):
            w["cost"] = {**before["cost"], "measured_by": before["settings"].get("command")}
    return {**payload, "worlds": {**worlds, **payload["worlds"]}}


def main(argv: Sequence[str] | None = None) -> BenchResult:
    ap = argparse.ArgumentParser(prog="msif-lite bench unrolled", description=__doc__)
    ap.add_argument("--out", default="results", help="where unrolled.* go")
    ap.add_argument("--cache-dir", default=".cache/unrolled", help="scores, retrains, factors")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--pipelines", default=None, help="comma-separated (default lds,lds-hard)")
    ap.add_argument("--queries", type=int, default=None, help="questions per world (≤ 26)")
    ap.add_argument("--keep", type=float, default=None,
                    help="fraction of documents each retrained subset keeps (default 0.5, the "
                         "shipped ground truth; e.g. 0.9 retrains a small-fraction one)")
    ap.add_argument("--subsets", type=int, default=None, help="M subsets (with --keep)")
    ap.add_argument("--no-removal", action="store_true", help="skip leave-top-k-out")
    ap.add_argument("--removal-methods", default=None,
                    help="comma-separated methods whose top-k are removed (default: all scored)")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated methods needing the run (default "
                         f"{','.join(UNROLLED)}; also {','.join(ABLATIONS)})")
    ap.add_argument("--fixed-order", type=int, default=0,
                    help="also replay the first M subsets in the run's own batch order (w = "
                         "mask): the counterfactual the derivative linearises")  # fmt: skip
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = FAST if fast_mode() else UnrolledBenchConfig()
    rc = cfg.retrain
    if a.keep is not None or a.subsets is not None:
        rc = replace(rc, fraction=a.keep or rc.fraction, n_subsets=a.subsets or rc.n_subsets)
    cfg = replace(cfg, retrain=rc, n_queries=a.queries or cfg.n_queries,
                  removal=cfg.removal and not a.no_removal,
                  fixed_order=a.fixed_order or cfg.fixed_order,
                  methods=tuple(a.methods.split(",")) if a.methods else cfg.methods,
                  removal_methods=tuple(a.removal_methods.split(","))
                  if a.removal_methods else cfg.removal_methods)  # fmt: skip
    pipelines = a.pipelines.split(",") if a.pipelines else (
        [rc.pipeline] if fast_mode() else ["lds", "lds-hard"])  # fmt: skip
    out, args = Path(a.out), sys.argv[1:] if argv is None else list(argv)
    result = None
    for p in pipelines:
        wcfg = replace(cfg, retrain=replace(cfg.retrain, pipeline=p))
        w = run_world(wcfg, Path(a.cache_dir), None, out / "lds.json")
        w["settings"]["command"] = " ".join(["msif-lite bench unrolled", *args])
        name = p if wcfg.retrain.fraction == 0.5 else f"{p}@keep{wcfg.retrain.fraction:g}"
        payload = merged(out, {"worlds": {name: w}, "lds_json": _lds_context(out)})
        result = finish("unrolled", payload, markdown(payload), out)
        plot(payload, result.json_path.with_suffix(".png"))
    return result


def _lds_context(out: Path) -> dict:
    """bench lds's all-question LDS of the baselines per world (results/lds.json)."""
    path = out / "lds.json"
    if not path.exists():
        return {}
    worlds = json.loads(path.read_text()).get("worlds", {})
    return {w: {"noise_ceiling": v["noise_ceiling"],
                "methods": {n: v["methods"][n] for n in BASELINES if n in v["methods"]}}
            for w, v in worlds.items()}  # fmt: skip


BENCH = Benchmark("unrolled", "unrolled metagradients through both stages against "
                  "retraining: LDS, leave-top-k-out, linear prediction, cost", main)
