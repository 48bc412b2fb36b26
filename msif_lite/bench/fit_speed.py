"""The kit's EK-FAC fit vs kronfluence's, side by side: `msif-lite bench fit-speed`.

On the real pretrained model (SmolLM2-135M-Instruct: by default the θ_pt of the "cpu" pair
of `world.real_pipeline` if it was trained, else the converted base model; `--model` takes
any from_pretrained folder), float32, eval mode, the same data for both tools: the
real-English corpus (`data/real_lm`, ~30-token documents) tokenised, each document followed
by eos, concatenated and cut into `--sequences` blocks of `--tokens` tokens (every token but
the first a target), written once as token ids (`peers.peer_io.write_blocks`) that every
process reads (`read_blocks`). Both fit EK-FAC on the same Linear modules (the MLP layers,
`FactorConfig(include="mlp")`: 90 on SmolLM2; `--layers REGEX` keeps those whose name
matches), sampled labels (the true Fisher), the loss summed over tokens, float32 covariances,
batches of `--batch-size` blocks in the same order, `--threads` torch threads
(OMP_NUM_THREADS too), one untimed warm-up forward pass, no AMP.

- the kit: each `--kit-variant NAME:key=value,...` (FactorConfig fields over
  `FactorConfig(include="mlp", progress=False)`; `NAME:` alone: the defaults) in a fresh
  subprocess (peaks and allocator state do not leak between variants): `engine.fit.fit_ekfac`,
  its `FitTimings` (covariance / eigendecomposition / Λ seconds) and wall time;
- kronfluence (`--peer-python`: an interpreter with kronfluence, never the kit's;
  `msif_lite/bench/peers/kronfluence_fit.py`): FactorArguments(strategy="ekfac"), its default
  float64 eigendecomposition, stage times by the wall clock around `fit_covariance_matrices`,
  `perform_eigendecomposition` and `fit_lambda_matrices` (these include its factor writes);
  without `--peer-python` its row says "not run".

Peak memory: `peer_io.rss_peak` around the fit in every process (the process's resident
high-water mark, and its growth above the resident memory at entry: model and data loaded).
Agreement: the pairwise scores of the first `--queries` blocks against every block
(m = the block's summed token cross-entropy, data labels), λ_l = 0.1 · mean(Λ_l) on both
sides (kit `Damping()`, kronfluence `damping_factor=None`), Spearman per query. Writes
results/fit_speed.{json,md} (`--out`). Goal of the project: the kit's fit ≤ ½ of
kronfluence's, measured side by side. The full measurement (~10 min on 2 cores):

    msif-lite bench fit-speed --peer-python /tmp/kfvenv/bin/python

(`msif_lite/bench/peers/__init__.py` says how that interpreter is built); `--fisher empirical`
checks that the two agree to round-off (no label sampling on either side).

This module: the options, each kit variant's fit (`--row`, in its own process) and the run;
`fit_speed_inputs`: the variants, the model, the token blocks and the tracked modules;
`fit_speed_report`: the table rows, the score agreement and the markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from msif_lite.bench.common import Benchmark, BenchResult, display_path, finish
from msif_lite.bench.fit_speed_inputs import (
    Variant,
    default_model,
    parse_variant,
    tracked_modules,
    variant_config,
    write_inputs,
)
from msif_lite.bench.fit_speed_report import agreement, markdown, table_row
from msif_lite.bench.peers import peer_io
from msif_lite.bench.peers.peer_io import (
    Stopwatch,
    batch_slices,
    load_model,
    process_info,
    read_blocks,
    rss_peak,
    warm_up,
)

NAME = "fit_speed"
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "kronfluence_fit.py"
DEFAULT_VARIANTS = ("before:eigh_dtype=float64,eigh_workers=1", "after:",
                    "fast:eigh_dtype=float32,cache_dtype=bfloat16,cache_activations_mb=3072")
GOAL = 0.5  # the kit's fit ≤ GOAL × kronfluence's


# ------------------------------------------------------------------ one kit variant (subprocess)
def fit_variant(spec: dict) -> dict:
    """Fit the kit's EK-FAC for one variant (in a fresh process), then its scores."""
    torch.set_num_threads(int(spec["threads"]))
    from msif_lite.engine.fit import fit_ekfac
    from msif_lite.engine.ihvp import EKFACIHVP, Damping
    from msif_lite.engine.layers import find_modules
    from msif_lite.engine.scores import pairwise_scores
    from msif_lite.engine.tasks import LanguageModelingTask, make_token_batch

    config = dataclasses.replace(variant_config(spec["overrides"]), fisher=spec["fisher"])
    blocks = read_blocks(spec["blocks"])
    bs, q = int(spec["batch_size"]), int(spec["queries"])
    model = load_model(spec["model"])
    slices = batch_slices(len(blocks.ids), bs)
    batches = [make_token_batch(blocks.ids[s], blocks.pad_id) for s in slices]
    by_name = {m.name: m for m in find_modules(model, None, None)}
    modules = [by_name[n] for n in spec["modules"]]
    task = LanguageModelingTask()
    warm_up(model, blocks.ids[slices[0]])
    with Stopwatch() as wall:
        growth, hwm, factors = rss_peak(lambda: fit_ekfac(model, task, batches, config, modules))
    ihvp = EKFACIHVP(factors, Damping())
    queries = make_token_batch(blocks.ids[:q], blocks.pad_id)
    with Stopwatch() as s:
        scores = pairwise_scores(model, task, queries, batches, ihvp, modules, progress=False)
    return {"tool": "kit", "variant": spec["variant"], "status": "ok",
            "timings": dataclasses.asdict(factors.timings), "fit_s": wall.seconds,
            "fit_rss_growth_bytes": growth, "peak_rss_bytes": hwm, "score_s": s.seconds,
            "scores": scores.double().tolist(), "modules": len(modules),
            "factor_config": {k: v if isinstance(v, (int, float, str, bool, type(None)))
                              else str(v) for k, v in dataclasses.asdict(config).items()},
            "damping": "Damping() heuristic: 0.1 · mean(Λ_l) per layer",
            "process": process_info()}  # fmt: skip


# ------------------------------------------------------------------ the benchmark
def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run_process(command: Sequence[str], spec: dict, threads: int) -> dict:
    """Write `spec` to spec["result"] + '.spec.json', run `command SPEC` in a fresh process
    with `threads` threads, return the JSON it wrote to spec["result"] (RuntimeError with its
    stderr if it failed)."""
    spec_path = Path(spec["result"] + ".spec.json")
    peer_io.write_json(spec_path, spec)
    out = subprocess.run([*command, str(spec_path)], capture_output=True, text=True,
                         env=_env(threads), check=False)  # fmt: skip
    if out.returncode != 0 or not Path(spec["result"]).is_file():
        raise RuntimeError(f"{' '.join(command)} failed (exit {out.returncode}):\n"
                           f"{out.stderr[-3000:]}")  # fmt: skip
    return peer_io.read_json(spec["result"])


def run(model: Path, world_dir: Path, variants: Sequence[Variant], *, sequences: int,
        tokens: int, batch_size: int, threads: int, queries: int, layers: str | None,
        peer_python: str | None, fisher: str = "sampled", seed: int = 0,
        progress: bool = True) -> dict:  # fmt: skip
    """Every kit variant, then kronfluence, each in a fresh process on the same blocks."""
    t0 = time.perf_counter()
    load_start = list(os.getloadavg())
    names, desc = tracked_modules(model, layers)
    rows: list[dict] = []
    raw: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="msif-fit-speed-") as tmp:
        blocks = Path(tmp) / "blocks.json"
        source = write_inputs(model, world_dir, sequences, tokens, blocks)
        base = {"model": str(model.resolve()), "blocks": str(blocks), "modules": names,
                "threads": threads, "batch_size": batch_size, "queries": queries,
                "fisher": fisher, "seed": seed}  # fmt: skip
        for v in variants:
            spec = {**base, "variant": v.name, "overrides": v.overrides,
                    "result": str(Path(tmp) / f"kit-{len(raw)}.json")}  # fmt: skip
            r = run_process([sys.executable, "-m", "msif_lite.bench.fit_speed", "--row"], spec,
                            threads)  # fmt: skip
            raw[v.name] = {**r, "settings": v.describe()}
            rows.append(table_row(raw[v.name]))
            _say(progress, rows[-1])
        raw["kronfluence"] = run_peer(peer_python, base, Path(tmp), threads)
        rows.insert(0, table_row(raw["kronfluence"]))
        _say(progress, rows[0])
    peer = rows[0]
    for r in rows[1:]:
        if peer["status"] == "ok":
            r["ratio_to_kronfluence"] = r["fit_s"] / peer["fit_s"]
    agreement(rows, raw)
    kit_info = next((raw[v.name]["process"] for v in variants), {})
    settings = {"model": display_path(model), "model_desc": desc, "sequences": sequences,
                "tokens": tokens, "batch_size": batch_size, "threads": threads,
                "queries": queries, "layers": layers or "every MLP layer (include='mlp')",
                "modules": names, "data": source, "fisher": fisher, "seed": seed,
                "variants": {v.name: v.overrides for v in variants},
                "peer_python": peer_python, "peer": raw["kronfluence"].get("process"),
                "kit": kit_info, "cpu": peer_io.cpu_model(), "cores": os.cpu_count(),
                "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()),
                "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}  # fmt: skip
    scores = {k: v["scores"] for k, v in raw.items() if v.get("status") == "ok"}
    return {"rows": rows, "settings": settings, "goal": GOAL, "scores": scores,
            "factor_configs": {v.name: raw[v.name]["factor_config"] for v in variants},
            "peer_arguments": {k: raw["kronfluence"].get(k)
                               for k in ("factor_arguments", "score_arguments")},
            "total_s": time.perf_counter() - t0}  # fmt: skip


def run_peer(peer_python: str | None, base: dict, tmp: Path, threads: int) -> dict:
    """kronfluence's fit in `peer_python` (a row that says why when it is not run / fails)."""
    row = {"tool": "kronfluence", "settings": "FactorArguments(strategy='ekfac'), "
           "float64 eigendecomposition"}  # fmt: skip
    if not peer_python:
        return {**row, "status": "not run", "why": "no --peer-python given (an interpreter "
                "with kronfluence; never the kit's)"}  # fmt: skip
    if not Path(peer_python).is_file():
        return {**row, "status": "not run", "why": f"--peer-python {peer_python}: no such file"}
    spec = {**base, "workdir": str(tmp / "kronfluence"), "result": str(tmp / "peer.json")}
    try:
        return {**run_process([peer_python, str(PEER_SCRIPT)], spec, threads), **row}
    except RuntimeError as e:
        return {**row, "status": "failed", "why": str(e)[-1500:]}


def _say(progress: bool, r: dict) -> None:
    if not progress:
        return
    if r["status"] != "ok":
        print(f"{r['tool']:11s} {r['status']}: {r.get('why', '')[:300]}", flush=True)
        return
    print(f"{r['tool']:11s} {r['variant']:10s} cov {r['covariance_s']:.1f} s, eigh "
          f"{r['eigendecomposition_s']:.1f} s, Λ {r['lambda_s']:.1f} s, fit {r['fit_s']:.1f} s, "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)


def main(argv: Sequence[str] | None = None) -> BenchResult | None:
    from msif_lite.world.shipped import data_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: one kit variant, a spec file
    p.add_argument("--model", default=None, help="a from_pretrained folder (default: the cpu "
                   "pair's θ_pt if trained, else the converted SmolLM2-135M-Instruct)")
    p.add_argument("--world-dir", default=None, help="the real corpus (default data/real_lm)")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (both tools)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every fit")
    p.add_argument("--queries", type=int, default=4, help="blocks scored against all blocks")
    p.add_argument("--layers", default=None, help="regex: only the MLP layers it matches "
                   r"(e.g. 'layers\.(2[89])\.'); default every MLP layer")
    p.add_argument("--kit-variant", action="append", default=None, metavar="NAME:k=v,...",
                   help="a kit fit with these FactorConfig fields (repeatable; 'NAME:' = the "
                   f"defaults). Default: {' and '.join(DEFAULT_VARIANTS)}")
    p.add_argument("--fisher", default="sampled", choices=("sampled", "empirical"),
                   help="labels of the Fisher on both sides: sampled from the model (the true "
                   "Fisher, default) or the data's (empirical: no sampling noise between the "
                   "tools, so their scores should agree to round-off)")
    p.add_argument("--peer-python", default=None,
                   help="an interpreter with kronfluence (e.g. /tmp/kfvenv/bin/python)")
    p.add_argument("--out", default="results", help="where fit_speed.{json,md} go")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.row:
        spec = peer_io.read_json(a.row)
        peer_io.write_json(spec["result"], fit_variant(spec))
        return None
    try:
        variants = [parse_variant(v) for v in (a.kit_variant or DEFAULT_VARIANTS)]
    except ValueError as e:
        p.error(str(e))
    names = [v.name for v in variants]
    if len(set(names)) != len(names) or "kronfluence" in names:
        p.error(f"kit variant names must be distinct and not 'kronfluence': {names}")
    for n, v in (("sequences", a.sequences), ("batch-size", a.batch_size),
                 ("threads", a.threads), ("queries", a.queries)):  # fmt: skip
        if v < 1:
            p.error(f"--{n} must be >= 1")
    if a.queries > a.sequences:
        p.error("--queries must be <= --sequences")
    world = Path(a.world_dir) if a.world_dir else data_dir() / "real_lm"
    try:
        model = Path(a.model) if a.model else default_model(world)
    except ModuleNotFoundError as e:  # the real model's package is not installed
        p.error(f"{e} (or pass --model FOLDER)")
    if not (model / "config.json").is_file():
        p.error(f"--model {model}: not a from_pretrained folder (no config.json)")
    torch.set_num_threads(a.threads)
    res = run(model, world, variants, sequences=a.sequences, tokens=a.tokens,
              batch_size=a.batch_size, threads=a.threads, queries=a.queries, layers=a.layers,
              peer_python=a.peer_python, fisher=a.fisher, progress=not a.quiet)  # fmt: skip
    return finish(NAME, res, markdown(res), a.out, quiet=a.quiet)


BENCH = Benchmark("fit-speed", "the kit's EK-FAC fit vs kronfluence's, side by side on the real "
                  "135M model (stage times, peak RSS, score agreement; kit variants in fresh "
                  "processes, kronfluence in its own interpreter)", main)  # fmt: skip

if __name__ == "__main__":
    main(sys.argv[1:])
