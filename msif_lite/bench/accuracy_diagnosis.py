"""Why is EK-FAC close to the gradient dot product in Exp 1? Four smaller runs of the bench.

    msif-lite bench accuracy-diagnosis [--runs runs/diag] [--reuse] [--out results]

Each run is `msif-lite bench accuracy` on 3 queries × 200 candidates with G on 16 documents
(small enough for the exact block-diagonal solve, 8× the cost of the full one):

- block_<model>: mini and paper-toy with `--block-truth --label-draws 4 32`, which splits
  EK-FAC's error into the dropped cross-layer blocks (block_exact vs the full truth), the
  Monte-Carlo noise of one sampled label per token (draws 1 → 32) and the Kronecker
  eigenbasis (what is left of EK-FAC vs block_exact);
- damping_<rel>: mini at λ = 0.5, 5, 50 × trace(G)/P, asking whether the damping makes the
  identity (gradient dot product) unusually strong.

About 40 min on 2 CPU cores. `--reuse` composes existing <runs>/<name>/accuracy.json files
without rerunning them. Writes <out>/accuracy_diagnosis.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from msif_lite.bench import accuracy, common

SMALL = ["--queries", "3", "--candidates", "200", "--fit", "16", "--cg", "10", "30",
         "--lissa", "5", "10", "--power-iters", "10", "--probes", "10", "--threads", "1",
         "--quiet"]  # fmt: skip
RUNS = {
    "block_mini": ["--preset", "default", "--block-truth", "--label-draws", "4", "32"],
    "block_paper-toy": ["--preset", "paper-toy", "--block-truth", "--label-draws", "4", "32"],
    "damping_0.5": ["--preset", "default", "--damping-rel", "0.5", "--label-draws", "32"],
    "damping_5": ["--preset", "default", "--damping-rel", "5", "--label-draws", "32"],
    "damping_50": ["--preset", "default", "--damping-rel", "50", "--label-draws", "32"],
}  # damping_5 is block_mini's setting: reused from it when present


def _result(p: dict, name: str, block: bool) -> dict:
    """A method's correlations against the exact block-diagonal solve (block) or the truth."""
    r = p["methods"][name]
    return r["vs_block_exact"] if block else r


def spearman(p: dict, name: str, block: bool = False) -> str:
    """'mean ± std' Spearman of a method ('—' if that run did not include it)."""
    return common.format_mean_std(_result(p, name, block), "spearman") \
        if name in p["methods"] else "—"


def _rho(p: dict, name: str, block: bool = False) -> float:
    return _result(p, name, block)["spearman_mean"]


def block_table(runs: dict) -> str:
    rows = []
    steps = [("exact block-diagonal vs exact full GGN (cost of the cross-layer blocks)",
              "block_exact", False),
             ("EK-FAC, 1 sampled label per token, vs exact block-diagonal", "ekfac", True),
             ("EK-FAC, 4 label draws, vs exact block-diagonal", "ekfac_draws4", True),
             ("EK-FAC, 32 label draws, vs exact block-diagonal", "ekfac_draws32", True),
             ("gradient dot product vs exact block-diagonal", "grad_dot", True),
             ("EK-FAC (1 draw) vs exact full GGN", "ekfac", False),
             ("gradient dot product vs exact full GGN", "grad_dot", False)]  # fmt: skip
    names = [n for n in ("block_mini", "block_paper-toy") if n in runs]
    for text, method, block in steps:
        rows.append({"comparison": text, **{n: spearman(runs[n], method, block) for n in names}})
    return common.markdown_table(rows, ["comparison", *names])


def damping_table(runs: dict) -> str:
    rows = []
    for n in sorted((n for n in runs if n.startswith("damping_")), key=lambda n: float(n[8:])):
        p = runs[n]
        rows.append({"λ / (trace(G)/P)": n[8:], "κ": f"{p['setup']['condition_number']:.3g}",
                     **{m: spearman(p, m) for m in ("ekfac", "ekfac_draws32", "kfac_draws32",
                                                    "grad_dot", "cg_10", "cg_30")}})  # fmt: skip
    cols = ["λ / (trace(G)/P)", "κ", "ekfac", "ekfac_draws32", "kfac_draws32", "grad_dot",
            "cg_10", "cg_30"]  # fmt: skip
    return common.markdown_table(rows, cols)


def cross(p: dict) -> float:  # what dropping the cross-layer blocks costs
    return 1 - _rho(p, "block_exact")


def draws(p: dict) -> float:  # what 32 label draws recover, against the exact blocks
    return _rho(p, "ekfac_draws32", True) - _rho(p, "ekfac", True)


def kron(p: dict) -> float:  # what is left between EK-FAC (32 draws) and its exact blocks
    return 1 - _rho(p, "ekfac_draws32", True)


def span(runs: dict, fn) -> str:
    """'0.14' or '0.12–0.15': the value over the block_* runs."""
    vals = sorted(fn(p) for n, p in runs.items() if n.startswith("block_"))
    lo, hi = f"{vals[0]:.2f}", f"{vals[-1]:.2f}"
    return lo if lo == hi else f"{lo}–{hi}"


def markdown(runs: dict) -> str:
    return (
        "# Why EK-FAC is close to the gradient dot product in Exp 1 (diagnosis)\n\n"
        "Made by `msif-lite bench accuracy-diagnosis`: `msif-lite bench accuracy` on "
        "3 queries × 200 candidates with G = the exact GGN on 16 documents, so that the exact "
        "block-diagonal solve (`--block-truth`, one G·v per layer per CG iteration) is "
        "affordable. Every ground truth (full and block-diagonal) is CG to relative residual "
        "< 1e-7. Spearman, mean ± std over the 3 queries.\n\n"
        "## Where EK-FAC's error comes from (λ = 5 · trace(G)/P)\n\n"
        + block_table(runs)
        + "\n## Does the damping make the identity strong? (gpt-neox-mini)\n\n"
        + damping_table(runs)
        + f"\nReading: dropping the cross-layer blocks costs {span(runs, cross)} of Spearman; one "
        "sampled label per token on a few hundred tokens adds Monte-Carlo noise (32 draws "
        f"recover {span(runs, draws)}); the rest of EK-FAC's gap to its own exact blocks "
        f"({span(runs, kron)}) is the Kronecker eigenbasis. Smaller damping hurts the gradient "
        "dot product and EK-FAC alike, so on "
        "this small, near-memorising model EK-FAC's per-layer eigenbasis adds little over the "
        "identity at any λ, while Krylov methods on the exact G (CG, LiSSA) do not share "
        "that limitation.\n"
    )


def plot(runs: dict, path: Path) -> None:
    """Spearman against the exact block-diagonal solve, per model (and block vs full)."""
    from matplotlib.figure import Figure

    rows = [("grad_dot", True), ("ekfac", True), ("ekfac_draws4", True),
            ("ekfac_draws32", True), ("block_exact", False)]  # fmt: skip
    labels = ["gradient dot vs blocks", "EK-FAC (1 draw) vs blocks", "EK-FAC (4 draws) vs blocks",
              "EK-FAC (32 draws) vs blocks", "exact blocks vs full G"]  # fmt: skip
    names = [n for n in runs if n.startswith("block_")]
    fig = Figure(figsize=(7, 3.4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        vals = [_rho(runs[n], m, block) for m, block in rows]
        ax.barh([k + i * width for k in range(len(rows))], vals, height=width, label=n[6:])
    ax.set_yticks([k + width * (len(names) - 1) / 2 for k in range(len(rows))], labels)
    ax.set(xlabel="Spearman ρ (mean over queries)", xlim=(0, 1))
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> common.BenchResult:
    ap = argparse.ArgumentParser(prog="msif-lite bench accuracy-diagnosis",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/diag", help="where each run's results go")
    ap.add_argument("--reuse", action="store_true", help="compose existing runs only")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    runs = {}
    for name, extra in RUNS.items():
        path = Path(args.runs) / name / "accuracy.json"
        if name == "damping_5" and not path.exists():
            path = Path(args.runs) / "block_mini" / "accuracy.json"
        if not path.exists() and not args.reuse:
            accuracy.main([*SMALL, *extra, "--out", str(path.parent)])
        if path.exists():
            runs[name] = json.loads(path.read_text())
    payload = {"runs": runs, "commands": {n: [*SMALL, *e] for n, e in RUNS.items()}}
    result = common.finish("accuracy_diagnosis", payload, markdown(runs), args.out)
    plot(runs, result.json_path.with_suffix(".png"))
    return result


BENCH = common.Benchmark("accuracy-diagnosis", "why EK-FAC is close to the gradient dot "
                         "product in Exp 1: block-diagonal truth, label draws, damping", main)
