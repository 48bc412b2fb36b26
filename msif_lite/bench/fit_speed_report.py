"""The report of `msif-lite bench fit-speed` (msif_lite/bench/fit_speed.py): a table row per
process (kit variant or kronfluence), the score agreement (Spearman per query, via
`engine.correlation.spearman`), and the markdown. No `BENCH`: `discover` skips this module."""

from __future__ import annotations

import torch

from msif_lite.bench.common import markdown_table

STAGES = ("covariance_s", "eigendecomposition_s", "lambda_s")
MiB = 2**20


def _spearmans(a: list, b: list) -> list[float]:
    from msif_lite.engine.correlation import spearman

    return [spearman(torch.tensor(x), torch.tensor(y)) for x, y in zip(a, b)]


def _mib(b) -> float | None:
    return None if b is None else b / MiB


def table_row(r: dict) -> dict:
    """A results row from one process' JSON (or a not-run / failed peer)."""
    row = {"tool": r["tool"], "variant": r.get("variant", r.get("version", "")),
           "status": r["status"], "settings": r.get("settings", "")}  # fmt: skip
    if r["status"] != "ok":
        return {**row, "why": r.get("why", "")}
    t = r["timings"]
    return {**row, **{k: t.get(k) for k in STAGES}, "fit_s": r["fit_s"],
            "peak_rss_mib": _mib(r["peak_rss_bytes"]),
            "fit_rss_growth_mib": _mib(r["fit_rss_growth_bytes"]),
            "score_s": r["score_s"], "modules": r["modules"], "pid": r["process"]["pid"],
            "torch_threads": r["process"]["torch_threads"],
            "loadavg_1m_after": r["process"]["loadavg"][0] if r["process"]["loadavg"] else None}


def agreement(rows: list[dict], raw: dict[str, dict]) -> None:
    """Spearman per query of each kit variant vs kronfluence and vs the first variant, and
    max |kit − kronfluence| / max |kronfluence| over all scores (in place:
    `spearman_vs_kronfluence`, `spearman_min_vs_kronfluence`, `spearman_min_vs_first`,
    `score_rel_diff_vs_kronfluence`)."""
    kit = [r for r in rows if r["tool"] == "kit"]
    peer = raw.get("kronfluence")
    first = raw[kit[0]["variant"]] if kit else None
    for r in kit:
        mine = raw[r["variant"]]["scores"]
        if peer is not None and peer["status"] == "ok":
            rho = _spearmans(mine, peer["scores"])
            r["spearman_vs_kronfluence"], r["spearman_min_vs_kronfluence"] = rho, min(rho)
            a, b = torch.tensor(mine), torch.tensor(peer["scores"])
            r["score_rel_diff_vs_kronfluence"] = float((a - b).abs().max() / b.abs().max())
        if first is not None and r is not kit[0]:
            r["spearman_min_vs_first"] = min(_spearmans(mine, first["scores"]))

def _fmt(x, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    s, rows = res["settings"], res["rows"]
    d = s["model_desc"]
    shapes = ", ".join(f"{k} ×{n}" for k, n in d["tracked_shapes"].items())
    table = []
    for r in rows:
        ok = r["status"] == "ok"
        rho = r.get("spearman_min_vs_kronfluence")
        table.append({
            "tool": r["tool"], "variant": r["variant"] if ok else "", "settings": r["settings"],
            "covariance s": _fmt(r.get("covariance_s"), ".1f"),
            "eigh s": _fmt(r.get("eigendecomposition_s"), ".1f"),
            "Λ s": _fmt(r.get("lambda_s"), ".1f"),
            "total fit s": _fmt(r.get("fit_s"), ".1f") if ok else r["status"],
            "× kronfluence": ("1" if r["tool"] == "kronfluence" and ok
                              else _fmt(r.get("ratio_to_kronfluence"), ".2f")),
            "peak RSS MiB": _fmt(r.get("peak_rss_mib"), ".0f"),
            "fit RSS growth MiB": _fmt(r.get("fit_rss_growth_mib"), ".0f"),
            "Spearman vs kronfluence (min)": _fmt(rho, ".4f"),
        })  # fmt: skip
    lines = [
        "# EK-FAC fit: the kit vs kronfluence, side by side (CPU)",
        "",
        f"{d['class']} `{s['model']}` ({d['blocks']} blocks, {d['parameters'] / 1e6:.3g} M "
        f"parameters, float32), {d['tracked']} tracked Linear layers ({shapes}); "
        f"{s['sequences']} sequences × {s['tokens']} tokens of the real-English corpus "
        f"(`{s['data']['corpus']}`: {s['data']['documents']} documents joined with eos, "
        f"{s['data']['corpus_tokens']} tokens, {s['data']['corpus_passes']} pass(es)), "
        f"batches of {s['batch_size']}, {s['threads']} torch threads, each fit in a fresh "
        f"process. Goal: the kit's fit ≤ {res['goal']:g} × kronfluence's.",
        "",
        markdown_table(table, list(table[0])),
    ]
    for r in rows:
        if r["status"] != "ok":
            lines += [f"{r['tool']} {r['status']}: {r.get('why', '')}", ""]
    kit = [r for r in rows if r["tool"] == "kit"]
    rho = [f"{r['variant']}: " + ", ".join(f"{x:.4f}" for x in r["spearman_vs_kronfluence"])
           + f" (max |Δscore| / max |score| {r['score_rel_diff_vs_kronfluence']:.2g})"
           for r in kit if "spearman_vs_kronfluence" in r]
    lines += ["**Agreement.** Pairwise scores of the first "
              f"{s['queries']} blocks against all {s['sequences']} (m and ℓ = the summed token "
              "cross-entropy on the data labels), λ_l = 0.1 · mean(Λ_l) per layer on both sides "
              "(kit `Damping()`, kronfluence `damping_factor=None`); "
              + ("the Fisher's labels are sampled on each side (kit: inverse-CDF draws from its "
                 "seeded generator, the Λ pass reusing the covariance pass's labels; "
                 "kronfluence: torch.multinomial, fresh labels in the Λ pass), so the factors "
                 "differ by more than sampling noise when a layer's output width exceeds the "
                 "tokens (Λ = 0 on S's null space in the kit); `--fisher empirical` removes "
                 "both." if s["fisher"] == "sampled" else
                 "the empirical Fisher (data labels) on both sides.")
              + (" Spearman per query vs kronfluence — " + "; ".join(rho) + "." if rho else
                 " kronfluence was not run: no comparison.")]  # fmt: skip
    firsts = [f"{r['variant']} {r['spearman_min_vs_first']:.4f}" for r in kit
              if "spearman_min_vs_first" in r]
    if firsts:
        lines[-1] += f" Kit variants vs `{kit[0]['variant']}` (min Spearman): " + \
            ", ".join(firsts) + "."
    peer = s.get("peer") or {}
    kitp = s.get("kit") or {}
    lines += [
        "",
        "**How measured.** Kit: `fit_ekfac`'s `FitTimings` per stage, total = wall clock "
        "around `fit_ekfac`. kronfluence: wall clock around `fit_covariance_matrices`, "
        "`perform_eigendecomposition`, `fit_lambda_matrices` (each includes writing its factors "
        "to disk). Peak RSS: the process's resident high-water mark after the fit (model "
        "loaded); growth: above the resident memory at the fit's start "
        "(`peers.peer_io.rss_peak`). Scores are not timed in the fit.",
        "",
        f"**Settings.** CPU: {s['cpu']} ({s['cores']} cores), load average at start "
        f"{', '.join(f'{x:.2f}' for x in s['loadavg_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in s['loadavg_end'])}; kit: torch "
        f"{kitp.get('torch', '?')}, transformers {kitp.get('transformers', '?')}; "
        f"kronfluence side: torch {peer.get('torch', '—')}, transformers "
        f"{peer.get('transformers', '—')}; layers: {s['layers']}; seed {s['seed']}. "
        f"Wall time of the benchmark {res['total_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"
