"""What the kit measured about a method against retraining, printed beside a ranking of the
kit's world (`msif-lite trace`, issue 24 "a main job that tells the truth").

A ranking alone says nothing about whether removing its top documents would change the
answer. The kit measured that by retraining both stages (`msif-lite bench lds`,
`msif-lite bench variants`): the LDS (Spearman correlation of the predicted and the
retrained −log p(answer) over random half-corpora, ± its standard error) and the
leave-top-k-out Δm (the rise of −log p(answer), in nats, after removing each target
question's top-k documents and retraining). This module reads those numbers from
`results/variants.json` (else `results/lds.json`) and writes them as a few lines: the chosen
method, BM25, the best other gradient method, and removing the true sources. Nothing is
hard-coded: missing files or methods are said to be missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[2] / "results"
TEXT_OR_FLOOR = ("bm25", "embedding", "random", "tracin", "true_sources", "none")
"""Not candidates for "the best gradient variant" (text methods, floors, references)."""


@dataclass
class Measured:
    """LDS (mean, s.e.), leave-top-k-out Δm (targets, others) and MRR per method of one
    retraining world, and the fact-tracing MRR per method on the traced world."""

    source: str
    world: str
    settings: dict
    lds: dict[str, tuple[float, float]] = field(default_factory=dict)
    removal: dict[str, tuple[float, float]] = field(default_factory=dict)
    traced_mrr: dict[str, float] = field(default_factory=dict)

    def best_variant(self, besides: str) -> str | None:
        """The gradient method with the highest LDS other than `besides` and BM25/embedding."""
        names = [m for m in self.lds if m != besides
                 and not any(m.startswith(t) for t in TEXT_OR_FLOOR)]  # fmt: skip
        return max(names, key=lambda m: self.lds[m][0], default=None)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_measured(results_dir: str | Path | None = None, world: str = "lds",
                  traced_world: str | None = None) -> Measured | None:  # fmt: skip
    """The numbers of retraining world `world` from results/variants.json and lds.json
    (variants first), or None when neither file has that world."""
    root = Path(results_dir) if results_dir is not None else RESULTS_DIR
    var, lds = _read(root / "variants.json") or {}, _read(root / "lds.json") or {}
    v = (var.get("worlds") or {}).get(world) or {}
    w = (lds.get("worlds") or {}).get(world) or {}
    if not v and not w:
        return None
    sources = [n for n, d in (("variants.json", v), ("lds.json", w)) if d]
    out = Measured(" and ".join(f"{root.name}/{s}" for s in sources), world,
                   v.get("settings") or w.get("settings") or {})  # fmt: skip
    for m, r in (w.get("methods") or {}).items():
        out.lds[m] = (r["lds_mean"], r["lds_sem"])
    for m, r in (v.get("lds") or {}).items():
        out.lds[m] = (r["mean"], r["sem"])
    for part in (w.get("top_k_removal") or {}, v.get("top_k_removal") or {}):
        for m, r in part.items():
            out.removal[m] = (r["dm_targets_mean"], r["dm_others_mean"])
    if traced_world is not None:
        out.traced_mrr = dict((var.get("worlds") or {}).get(traced_world, {}).get("mrr") or {})
    if not out.settings.get("n_documents"):
        out.settings = {**out.settings, "n_documents": w.get("n_documents"),
                        "n_queries": w.get("n_queries"), "n_subsets": w.get("n_subsets")}
    return out


def _row(name: str, note: str, m: Measured, w: int) -> str:
    lds, dm = m.lds.get(name), m.removal.get(name)
    a = f"{lds[0]:.3f} ± {lds[1]:.3f}" if lds else "not measured"
    b = f"{dm[0]:.2f} / {dm[1]:.2f}" if dm else ("not measured" if name in m.lds or not lds
                                                 else "")  # fmt: skip
    return f"  {name:{w}}  {a:>15}  {b:>13}  {note}".rstrip()


def measured_lines(method: str, results_dir: str | Path | None = None, *,
                   world: str = "lds", traced_world: str | None = None,
                   question: str | None = None) -> list[str]:  # fmt: skip
    """A few lines of what the kit measured about `method` against retraining, BM25 and the
    best other gradient method (module docstring); a line saying so when the results are
    missing. `question`: end with the command that shows BM25 or the best variant beside
    this ranking (`msif-lite trace QUESTION --compare …`)."""
    root = Path(results_dir) if results_dir is not None else RESULTS_DIR
    m = load_measured(root, world, traced_world)
    if m is None:
        return [f"what the kit measured: no retraining results for world {world!r} in "
                f"{root}/variants.json or lds.json (run `msif-lite bench variants --pipeline "
                f"{world}`), so nothing is known here about how {method} compares."]
    best = m.best_variant(method)
    k, s = m.settings.get("k", "k"), m.settings
    rows = [(method, "<- this ranking"), ("bm25", "text baseline")]
    if best and best != method:
        rows.append((best, "the best gradient variant"))
    rows = [r for i, r in enumerate(rows) if r[0] not in [x for x, _ in rows[:i]]]
    refs = [(n, label) for n, label in (("true_sources", "(true sources)"),
                                        ("none", "(nothing removed)")) if n in m.removal]
    w = max(len(x) for x, _ in rows + refs)
    lines = [f"what the kit measured against retraining ({m.source}, world {world!r}: "
             f"{s.get('n_documents', '?')} documents, {s.get('n_queries', '?')} questions, "
             f"both stages retrained; a smaller world of the same kind, not this one):",
             f"  {'method':{w}}  {'LDS ± s.e.':>15}  {f'Δm top-{k} out':>13}"]  # fmt: skip
    lines += [_row(name, note, m, w) for name, note in rows]
    lines += [f"  {label:{w}}  {'':>15}  {f'{m.removal[n][0]:.2f} / {m.removal[n][1]:.2f}':>13}"
              for n, label in refs]  # fmt: skip
    lines += [f"  LDS: rank correlation of predicted and retrained −log p(answer) over "
              f"{s.get('n_subsets', '?')} half-corpora.",
              f"  Δm: rise of −log p(answer) (nats), target / other questions, after removing "
              f"each target's top-{k} documents and retraining.",
              "  Higher LDS and target Δm = closer to what retraining shows."]
    mrr = {n: m.traced_mrr[n] for n, _ in rows if n in m.traced_mrr}
    if mrr:
        lines.append(f"  on this world ({traced_world!r}), MRR of the true sources: "
                     + ", ".join(f"{n} {v:.3f}" for n, v in mrr.items()))
    if question is not None:
        others = [n for n, _ in rows if n != method]
        alt = f" (or --compare {others[1]})" if len(others) > 1 else ""
        lines.append(f"  to see {others[0]}'s ranking beside this one: msif-lite trace "
                     f"{json.dumps(question, ensure_ascii=False)} --compare {others[0]}{alt}")
    return lines


def real_lm_lines(method: str, results_dir: str | Path | None = None,
                  preset: str | None = None) -> list[str]:  # fmt: skip
    """What `msif-lite bench real-lm` measured on the real model (results/real_lm.json): per
    method the joint leave-top-k-out Δm (mean ± s.e. over the held-out questions, and as a
    fraction of removing the true sources) and the fact-tracing MRR / recall@10; a line
    saying so when the file is missing. `preset`: the traced pair's, said when it differs."""
    root = Path(results_dir) if results_dir is not None else RESULTS_DIR
    r = _read(root / "real_lm.json")
    if not r or not r.get("removal"):
        return [f"what the kit measured: no {root.name}/real_lm.json (run `msif-lite bench "
                f"real-lm`), so nothing is known here about how {method} compares on this model."]
    s, rem, mth = r.get("settings") or {}, r["removal"], r.get("methods") or {}
    names = [n for n in dict.fromkeys((method, "bm25", "multi_stage_token_positive", "embedding",
                                       "random", "true_sources", "none", "noise")) if n in rem]
    w, k = max(len(n) for n in names), s.get("k", "k")
    lines = [f"what the kit measured against retraining on this model ({root.name}/real_lm.json: "
             f"preset {s.get('preset', '?')!r}, {s.get('n_documents', '?')} documents, "
             f"{s.get('n_questions', '?')} held-out questions, both stages retrained"
             + (f"; not the traced preset {preset!r}" if preset not in (None, s.get("preset"))
                else "") + "):",
             f"  {'method':{w}}  {f'Δm top-{k} out':>16}  {'÷ true sources':>14}  {'MRR':>5}  "
             f"{'recall@10':>9}"]  # fmt: skip

    def num(x: float | None, fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    for n in names:
        d, m = rem[n], mth.get(n) or {}
        row = (f"  {n:{w}}  {d['dm_mean']:>+8.2f} ± {d['dm_sem']:<5.2f}  "
               f"{num(d.get('dm_relative_to_true_sources'), '.2f'):>14}  "
               f"{num(m.get('mrr'), '.3f'):>5}  {num(m.get('recall_at_10'), '.3f'):>9}")
        lines.append((row + ("  <- this ranking" if n == method else "")).rstrip())
    lines.append("  Δm: rise of −log p(answer) (nats) after removing every question's top-k "
                 "documents at once and retraining; noise: another seed, nothing removed.")
    return lines
