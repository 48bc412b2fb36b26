"""An interactive result explorer for JupyterLab (Notebook 07 §Exploring results).

    from msif_lite.viz.explorer import open_explorer
    open_explorer(load_shipped())          # the last line of a cell shows it

Pick a query (or type a question), choose the method, damping and α; the ranked candidates
show their scores, ✓ on true sources, and each token coloured by its share of the score
(red = helps the answer, blue = hurts). A bar splits a document's score over the layers,
attention versus MLP. Computation is cached (`msif_lite.viz.explorer_data`): sliders never
refit factors or recompute candidate gradients. Without a live widget frontend (nbconvert,
nbval, GitHub) the output keeps a static HTML snapshot of the current view.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import ipywidgets as widgets

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.methods import METHODS, available
from msif_lite.viz.explorer_data import (
    ExplorerData,
    ExplorerQuery,
    Ranked,
    Settings,
    uses_alpha,
    uses_damping,
)
from msif_lite.viz.layers import GROUP_COLOURS

HELPS, HURTS = (214, 39, 40), (31, 119, 180)  # red / blue, as in msif_lite.viz.plots
CSS = """<style>
.msif-x {font-size: 13px; line-height: 1.45; max-width: 100%; box-sizing: border-box;}
.msif-x .msif-hit {border-bottom: 1px solid #e0e0e0; padding: 4px 2px;}
.msif-x .msif-doc {white-space: pre-wrap; overflow-wrap: anywhere; margin-top: 2px;}
.msif-x .msif-true {color: #1a7f37; font-weight: bold;}
.msif-x .msif-tok {border-radius: 2px;}
.msif-x .msif-grid {display: grid; grid-template-columns: max-content minmax(0, 1fr)
  max-content; gap: 2px 8px; align-items: center; margin: 4px 0;}
</style>"""


def _fmt(x: float) -> str:
    return f"{x:+.3g}"


def tokens_html(tokens: Sequence[str], scores: Sequence[float]) -> str:
    """Tokens as <span class="msif-tok"> coloured by score (scaled to this document's max)."""
    peak = max((abs(s) for s in scores), default=0.0) or 1.0
    out = []
    for t, s in zip(tokens, scores):
        r, g, b = HELPS if s > 0 else HURTS
        a = 0.85 * abs(s) / peak
        out.append(f'<span class="msif-tok" style="background: rgba({r},{g},{b},{a:.2f})" '
                   f'title="{_fmt(s)}">{html.escape(t)}</span>')  # fmt: skip
    return "".join(out)


def legend_html() -> str:
    sw = '<span style="background: rgba({},{},{},0.7); padding: 0 6px">{}</span>'
    return (f'<div class="msif-legend">per-token influence: {sw.format(*HELPS, "helps")} '
            f'{sw.format(*HURTS, "hurts")} (shade ∝ |score| / the document\'s largest; '
            "hover a token for its value) · <span class='msif-true'>✓</span> = true source"
            "</div>")  # fmt: skip


def ranked_html(r: Ranked, texts: dict[str, str], tokens: dict) -> str:
    """The ranked list: rank, doc id, score, ✓ for true sources, highlighted text."""
    rows = []
    for i, (d, s) in enumerate(zip(r.doc_ids, r.scores)):
        mark = ' <span class="msif-true">✓ true source</span>' if r.is_true(d) else ""
        body = tokens_html(*tokens[d]) if d in tokens else html.escape(texts[d])
        rows.append(f'<div class="msif-hit" data-doc="{html.escape(d)}"><b>#{i + 1}</b> '
                    f"<code>{html.escape(d)}</code> score <b>{_fmt(s)}</b>{mark}"
                    f'<div class="msif-doc">{body}</div></div>')  # fmt: skip
    truth = r.query.true_sources
    if truth:
        found = [i + 1 for i, d in enumerate(r.doc_ids) if d in truth]
        first = f", first at rank {found[0]}" if found else ""
        rows.insert(0, f"<div>true sources in the top {len(r.doc_ids)}: "
                       f"{len(found)}/{len(truth)}{first}</div>")  # fmt: skip
    return f'<div class="msif-x msif-ranked">{CSS}{"".join(rows)}</div>'


def layers_html(r: Ranked, row: int, layers: Sequence[tuple[str, str]]) -> str:
    """Diverging bars of one document's score per layer, attention vs MLP coloured."""
    if r.by_layer is None or not r.doc_ids:
        return ('<div class="msif-x msif-layers"><i>no per-layer split: text-similarity '
                "methods do not use the model's gradients</i></div>")  # fmt: skip
    sums: dict[tuple[str, str], float] = {}
    for key, x in zip(layers, r.by_layer[row].tolist()):
        sums[key] = sums.get(key, 0.0) + x  # modules of one layer and group together
    peak = max(abs(x) for x in sums.values()) or 1.0
    total = sum(sums.values())
    groups: dict[str, float] = {}
    rows = []
    for (layer, group), x in sums.items():
        groups[group] = groups.get(group, 0.0) + x
        w = 50 * abs(x) / peak
        left = 50 if x >= 0 else 50 - w
        bar = (f'<div style="position: relative; height: 11px; background: #f2f2f2">'
               f'<div style="position: absolute; left: 50%; width: 1px; height: 11px; '
               f'background: #999"></div><div style="position: absolute; left: {left:.1f}%; '
               f'width: {w:.1f}%; height: 11px; background: {GROUP_COLOURS[group]}"></div></div>')
        rows.append(f"<span>{layer} · {group}</span>{bar}<span>{x:+.3g}</span>")
    share = " · ".join(
        f'<span style="color: {GROUP_COLOURS[g]}">■</span> {g} {_fmt(x)}'
        + (f" ({100 * x / total:.0f}%)" if abs(total) > 1e-300 else "")
        for g, x in groups.items()
    )
    return (f'<div class="msif-x msif-layers">{CSS}<div>score {_fmt(total)} of '
            f"<code>{html.escape(r.doc_ids[row])}</code> by layer (bars to the right help)"
            f'</div><div class="msif-grid"><b>layer · part</b><b>contribution</b><b>score</b>'
            f"{''.join(rows)}</div><div>{share}</div></div>")  # fmt: skip


def _describe(r: Ranked, alpha0: float) -> str:
    s = r.settings
    parts = [f"<b>{METHODS[s.method].label}</b> over {r.n_candidates} candidates"]
    if s.damping is not None:
        parts.append(f"λ = {s.damping:.3g}·mean Λ")
    if s.alpha is not None:
        parts.append(f"α = {s.alpha:.3g} (fine-tune trained with {alpha0:.3g})")
    return " · ".join(parts)


class Explorer(widgets.VBox):
    """The explorer widget (build it with `open_explorer`)."""

    def __init__(self, data: ExplorerData, k: int = 10):
        self.data, self.k, self.view = data, k, None
        a0 = data.alpha0
        wide = widgets.Layout(flex="1 1 300px", min_width="0", width="auto")
        style = {"description_width": "initial"}
        self.query = widgets.Dropdown(options=self._options(), value=0, description="query",
                                      layout=widgets.Layout(flex="1 1 auto", min_width="0",
                                                            width="auto"), style=style)
        self.question = widgets.Text(placeholder="…or type a question, press Enter",
                                     continuous_update=False, layout=wide)  # fmt: skip
        self.answer = widgets.Text(placeholder="answer (blank: the model's)",
                                   continuous_update=False,
                                   layout=widgets.Layout(flex="0 1 200px", min_width="0"))
        self.method = widgets.Dropdown(
            options=[(METHODS[k].label, k) for k in available(data.att)], value="multi_stage",
            description="method", layout=widgets.Layout(max_width="100%"),
        )
        slider = dict(base=10, step=0.25, continuous_update=False, readout_format=".2g",
                      style=style, layout=widgets.Layout(flex="1 1 280px", min_width="0"))
        self.damping = widgets.FloatLogSlider(value=0.1, min=-4, max=1,
                                              description="damping λ / mean Λ", **slider)
        lg = math.log10(a0)
        self.alpha = widgets.FloatLogSlider(value=a0, min=lg - 2, max=lg + 4,
                                            description="α (multi-stage)", **slider)
        self.status = widgets.HTML()
        self.ranked_view = widgets.HTML(layout=widgets.Layout(flex="3 1 420px", min_width="0"))
        self.detail = widgets.Dropdown(description="layers of", style=style,
                                       layout=widgets.Layout(width="auto", min_width="0"))
        self.layers_view = widgets.HTML()
        right = widgets.VBox([self.detail, self.layers_view],
                             layout=widgets.Layout(flex="2 1 300px", min_width="0"))
        row = widgets.Layout(flex_flow="row wrap", width="100%", align_items="center")
        super().__init__(
            [
                widgets.HBox([self.query], layout=row),
                widgets.HBox([self.question, self.answer], layout=row),
                self.method,
                widgets.HBox([self.damping, self.alpha], layout=row),
                self.status,
                widgets.HTML(legend_html()),
                widgets.HBox([self.ranked_view, right], layout=widgets.Layout(
                    flex_flow="row wrap", width="100%", align_items="flex-start")),
            ],
            layout=widgets.Layout(width="100%", max_width="100%", overflow="hidden"),
        )
        self.add_class("msif-explorer")
        for w in (self.query, self.method, self.damping, self.alpha):
            w.observe(self.refresh, names="value")
        self.question.observe(self._typed, names="value")
        self.detail.observe(self._show_layers, names="value")
        self.refresh()

    def _options(self) -> list[tuple[str, int]]:
        return [(q.label, i) for i, q in enumerate(self.data.queries)]

    def _typed(self, change=None) -> None:
        text = self.question.value.strip()
        if not text:
            return
        try:
            q = self.data.query_for_text(text, self.answer.value.strip() or None)
        except ValueError as e:
            self.status.value = f'<span style="color: #b00">{html.escape(str(e))}</span>'
            return
        if q not in self.data.queries:
            self.data.queries.append(q)
            self.query.options = self._options()
        self.query.value = self.data.queries.index(q)

    @property
    def settings(self) -> Settings:
        return Settings.make(self.method.value, self.damping.value, self.alpha.value)

    def refresh(self, change=None) -> None:
        """Recompute (from the caches) and redraw for the current widget values."""
        s = self.settings
        self.damping.disabled = not uses_damping(s.method)
        self.alpha.disabled = not uses_alpha(s.method)
        q = self.data.queries[self.query.value]
        self.status.value = "<i>computing…</i>"
        before = sum(self.data.stats.values())
        try:
            r = self.data.ranked(q, s, self.k)
            tokens = self.data.token_scores(q, s, r.doc_ids)
        except (ValueError, FloatingPointError) as e:
            self.status.value = f'<span style="color: #b00">{html.escape(str(e))}</span>'
            return
        self.view, self.tokens = r, tokens
        cached = "cached" if sum(self.data.stats.values()) == before else "computed"
        self.status.value = f"{_describe(r, self.data.alpha0)} · {cached}"
        self.ranked_view.value = ranked_html(r, self.data.att.texts, tokens)
        self.detail.options = [(f"#{i + 1} {d}", i) for i, d in enumerate(r.doc_ids)]
        self.detail.value = 0 if r.doc_ids else None
        self._show_layers()

    def _show_layers(self, change=None) -> None:
        if self.view is not None and self.detail.value is not None:
            self.layers_view.value = layers_html(self.view, self.detail.value,
                                                 self.data.layer_names())  # fmt: skip

    def snapshot_html(self) -> str:
        """A static HTML rendering of the current view (what nbconvert/nbval keep)."""
        q = self.data.queries[self.query.value]
        return (f'<div class="msif-x msif-snapshot" style="max-width: 100%">'
                f"<div><b>{html.escape(q.label)}</b></div><div>{self.status.value}</div>"
                f"{legend_html()}{self.ranked_view.value}{self.layers_view.value}</div>")

    def _repr_mimebundle_(self, **kwargs) -> dict:
        data = super()._repr_mimebundle_(**kwargs)
        data["text/html"] = self.snapshot_html()
        return data

    def __repr__(self) -> str:
        return f"<msif_lite explorer: {self.query.label}>"


def open_explorer(
    source,
    queries: Sequence | None = None,
    *,
    candidates_k: int = 10,
    n_candidates: int | None = 50,
    config: AttributionConfig | None = None,
) -> Explorer:
    """The explorer on a `Shipped` (world + checkpoints) or an `Attributor`, in one call.

    queries: objects with .prompt and .answer (and .source_doc_ids when known); default:
    the world's held-out queries. candidates_k: how many ranked candidates to show;
    n_candidates: candidate pool per query (nearest documents ∪ true sources; None = all).
    """
    from msif_lite.attribution.trace import true_sources

    if isinstance(source, Attributor):
        att, truth_fn = source, None
        if queries is None:
            raise ValueError("open_explorer(attributor) needs queries=[...] (.prompt, .answer)")
    else:
        shipped = source
        docs = [(d.doc_id, d.text) for d in shipped.world.documents]
        pairs = [(p.prompt, p.answer) for p in shipped.world.finetune_qa]
        att = Attributor(shipped.pretrained, shipped.finetuned, shipped.tokenizer, docs, pairs,
                         config or AttributionConfig(progress=False), alpha=shipped.alpha)
        queries = shipped.world.queries if queries is None else queries

        def truth_fn(prompt: str) -> set[str] | None:
            return true_sources(shipped, prompt)

    items = []
    for q in queries:
        src = getattr(q, "source_doc_ids", None) or getattr(q, "true_sources", None)
        if src is None and truth_fn is not None:
            src = truth_fn(q.prompt)
        items.append(ExplorerQuery(q.prompt, q.answer, None if src is None else frozenset(src)))
    data = ExplorerData(att, items, n_candidates=n_candidates, truth=truth_fn)
    return Explorer(data, candidates_k)
