"""The cached computations behind the result explorer (Notebook 07 §Exploring results).

Everything expensive is done once and reused: the EK-FAC factors and candidate gradients
are the Attributor's (fitted / computed once, cached on disk); here each query's gradient
∇m(q) is memoised, the preconditioned query P·∇m is memoised per (method, damping, α) (the
fine-tuning stage (H_ft + αI)⁻¹ per α only), and so are the ranked scores and per-token
scores. Moving a damping or α slider therefore only re-preconditions one query (a few
small matrix products per layer) and re-dots it with the cached candidate gradients.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from msif_lite.attribution import scoring
from msif_lite.attribution.attributor import Attributor
from msif_lite.attribution.methods import (
    GradientMethod,
    Normalise,
    ScoreSettings,
    Stage,
    get_method,
)
from msif_lite.engine.ihvp import Damping
from msif_lite.engine.layers import Grads
from msif_lite.engine.prompts import as_prompt, retrieval_text, strip_scaffold
from msif_lite.engine.scores import per_token_scores
from msif_lite.viz.layers import layer_of


def uses_damping(method: str) -> bool:
    m = get_method(method)
    return isinstance(m, GradientMethod) and m.damped_stage is not None


def uses_alpha(method: str) -> bool:
    m = get_method(method)
    return isinstance(m, GradientMethod) and m.uses_alpha


def is_gradient(method: str) -> bool:
    """A gradient method whose score the explorer can split per layer and per token."""
    m = get_method(method)
    return isinstance(m, GradientMethod) and m.dense_dot


@dataclass(frozen=True)
class ExplorerQuery:
    """A question, the answer being attributed, and its true source documents if known."""

    prompt: str
    answer: str
    true_sources: frozenset[str] | None = None

    @property
    def label(self) -> str:
        return f"{strip_scaffold(self.prompt)} → {self.answer}"


@dataclass(frozen=True)
class Settings:
    """What a ranking was computed with; settings a method ignores are None (cache key)."""

    method: str
    damping: float | None = None  # heuristic factor: λ = damping · mean(Λ) per layer
    alpha: float | None = None

    @classmethod
    def make(cls, method: str, damping: float, alpha: float) -> Settings:
        get_method(method)
        if not (damping > 0 and alpha > 0):
            raise ValueError("damping and α must be > 0")
        return cls(method, float(damping) if uses_damping(method) else None,
                   float(alpha) if uses_alpha(method) else None)  # fmt: skip


@dataclass(frozen=True)
class Ranked:
    """The top candidates of one query under one setting (scores: higher = more helpful)."""

    query: ExplorerQuery
    settings: Settings
    doc_ids: list[str]
    scores: list[float]
    by_layer: torch.Tensor | None  # (k, L) per tracked layer (gradient methods only)
    n_candidates: int
    seconds: float

    def is_true(self, doc_id: str) -> bool | None:
        t = self.query.true_sources
        return None if t is None else doc_id in t


class ExplorerData:
    """Cached rankings, per-layer splits and per-token scores for the explorer widget.

    Candidate gradients stay in memory up to `memory_budget_mb` (at least one pool);
    query-gradient-sized results are kept for the `max_gradients` most recent settings.
    `stats` counts the real computations (query gradients, preconditionings, candidate
    scorings, per-token passes) so tests can check that cached views recompute nothing.
    """

    def __init__(
        self,
        attributor: Attributor,
        queries: Sequence[ExplorerQuery],
        *,
        n_candidates: int | None = 50,
        truth: Callable[[str], set[str] | None] | None = None,
        memory_budget_mb: float = 1024,
        max_gradients: int = 32,
    ):
        if not queries:
            raise ValueError("no queries to explore: pass queries=[...] (prompt, answer)")
        self.att, self.queries = attributor, list(queries)
        self.n_candidates, self._truth = n_candidates, truth
        self.alpha0 = attributor.alpha
        self.stats: Counter[str] = Counter()
        self._memo: dict[tuple, object] = {}
        self.memory_budget_mb = memory_budget_mb
        self._docs: OrderedDict[tuple, Grads] = OrderedDict()
        self._pools: OrderedDict[tuple, Grads] = OrderedDict()
        self._grads: OrderedDict[tuple, Grads] = OrderedDict()
        self.max_gradients = max_gradients

    def _cached(self, key: tuple, make: Callable[[], object]):
        """Memoise make(); gradient-sized entries (query gradients, preconditioned ones)
        are kept for the `max_gradients` most recently used keys only."""
        if key[0] in ("qg", "pre"):
            if key in self._grads:
                self._grads.move_to_end(key)
            else:
                self._grads[key] = make()
                while len(self._grads) > self.max_gradients:
                    self._grads.popitem(last=False)
            return self._grads[key]
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    # ------------------------------------------------------------------ queries
    def query_for_text(self, question: str, answer: str | None = None) -> ExplorerQuery:
        """A typed question: the fine-tuned model's greedy answer unless one is given."""
        prompt = as_prompt(question)
        for q in self.queries:
            if q.prompt.strip() == prompt.strip() and (not answer or answer == q.answer):
                return q
        if not answer or not answer.strip():
            from msif_lite.world.lm import greedy_answers

            answer = greedy_answers(self.att.finetuned, self.att.tokenizer, [prompt])[0]
        if not answer.strip():
            raise ValueError("the fine-tuned model gives an empty answer: type an answer")
        truth = self._truth(prompt) if self._truth else None
        return ExplorerQuery(prompt, answer.strip(), None if truth is None else frozenset(truth))

    def candidates(self, q: ExplorerQuery) -> list[str]:
        """All documents, or the `n_candidates` nearest (all-MiniLM-L6-v2) ∪ true sources."""
        def make() -> list[str]:
            ids = self.att.doc_ids
            if self.n_candidates is None or self.n_candidates >= len(ids):
                return list(ids)
            hits = self.att.embedding_index.search([retrieval_text(q.prompt, q.answer)],
                                                   self.n_candidates)[0]  # fmt: skip
            out = [d for d, _ in hits]
            return out + sorted(set(q.true_sources or ()) - set(out))

        return self._cached(("cands", q), make)

    def score_settings(self, s: Settings) -> ScoreSettings:
        """The Attributor's settings with this ranking's damping and α substituted."""
        m, base = get_method(s.method), self.att.settings
        if not isinstance(m, GradientMethod):
            return base
        changes: dict = {}
        if s.damping is not None:
            field = "pretrain_damping" if m.damped_stage is Stage.PRETRAINED else \
                "finetune_damping"
            changes[field] = Damping(heuristic_factor=s.damping)
        if s.alpha is not None:
            changes["alpha"] = s.alpha
        return replace(base, **changes)

    # ------------------------------------------------------------------ preconditioning
    def preconditioned(self, q: ExplorerQuery, s: Settings) -> Grads:
        """P·∇m for a gradient method under settings `s` (memoised)."""

        def make() -> Grads:
            self.stats["precondition"] += 1
            self.stats["query_grads"] += 1
            return get_method(s.method).preconditioned(self.att, [q], self.score_settings(s))

        return self._cached(("pre", q, s), make)

    def _stage(self, method: str) -> Stage:
        return get_method(method).candidates_at

    def _scale(self, q: ExplorerQuery, s: Settings, doc_ids: Sequence[str]):
        """The method's normalisation s(q, z) per document, or None (memoised)."""
        m = get_method(s.method)
        key = s if m.normalise is Normalise.SELF_INFLUENCE else s.method  # damping matters

        def make():
            v = scoring.normalisation(m, self.att, [q], doc_ids, self.score_settings(s))
            return None if v is None else v[0]

        return self._cached(("scale", q, key, tuple(doc_ids)), make)

    # ------------------------------------------------------------------ scores
    def _doc_grads(self, method: str, doc_ids: Sequence[str]) -> list[Grads]:
        """Each document's gradient (per layer), from memory, else from the store (disk
        cache, computed once); up to `memory_budget_mb` of documents stay in memory."""
        stage = self.att.stage(self._stage(method))
        store, modules = stage.store(), stage.modules
        per_doc = sum(m.numel for m in modules) * torch.finfo(store.dtype).bits // 8
        keep = max(len(doc_ids), int(self.memory_budget_mb * 2**20 // max(per_doc, 1)))
        missing = [d for d in dict.fromkeys(doc_ids) if (id(store), d) not in self._docs]
        if missing:
            g = store.grads([self.att.candidate(d) for d in missing])
            for i, d in enumerate(missing):
                self._docs[(id(store), d)] = {k: v[i] for k, v in g.items()}
        out = []
        for d in doc_ids:
            self._docs.move_to_end((id(store), d))
            out.append(self._docs[(id(store), d)])
        while len(self._docs) > keep:
            self._docs.popitem(last=False)
        return out

    def _pool_matrix(self, method: str, cands: Sequence[str]) -> Grads:
        """A pool's gradients as one (N, P_l) matrix per layer (the last 4 pools kept), so
        a new setting costs one matrix-vector product per layer."""
        stage = self.att.stage(self._stage(method))
        store, modules = stage.store(), stage.modules
        key = (id(store), tuple(cands))
        if key in self._pools:
            self._pools.move_to_end(key)
        else:
            docs = self._doc_grads(method, cands)
            self._pools[key] = {m.name: torch.stack([g[m.name].reshape(-1) for g in docs])
                                for m in modules}  # fmt: skip
            while len(self._pools) > 4:
                self._pools.popitem(last=False)
        return self._pools[key]

    def all_scores(self, q: ExplorerQuery, s: Settings) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N,) scores of every candidate and (N, L) per-layer scores (None for text methods)."""

        def make():
            self.stats["scores"] += 1
            cands = self.candidates(q)
            if not is_gradient(s.method):
                return self.att.scores(s.method, [q], cands)[0].double(), None
            method = get_method(s.method)
            modules = self.att.stage(method.candidates_at).modules
            pre = self.preconditioned(q, s)
            mat = self._pool_matrix(s.method, cands)
            raw = torch.stack([mat[m.name] @ pre[m.name].reshape(-1).to(mat[m.name].dtype)
                               for m in modules], -1)[None]  # (1, N, L)  # fmt: skip
            layers = scoring.finish(method, self.att, [q], cands, self.score_settings(s), raw)[0]
            return layers.sum(-1), layers

        return self._cached(("scores", q, s), make)

    def ranked(self, q: ExplorerQuery, s: Settings, k: int = 10) -> Ranked:
        """The top-k candidates of `q` under `s`, best first."""
        t0 = time.perf_counter()
        scores, layers = self.all_scores(q, s)
        cands = self.candidates(q)
        order = scores.argsort(descending=True)[:k].tolist()
        return Ranked(q, s, [cands[i] for i in order], [float(scores[i]) for i in order],
                      None if layers is None else layers[order], len(cands),
                      time.perf_counter() - t0)  # fmt: skip

    def token_scores(
        self, q: ExplorerQuery, s: Settings, doc_ids: Sequence[str]
    ) -> dict[str, tuple[list[str], list[float]]]:
        """doc_id → (tokens, per-token scores summing to the document's score); {} for the
        text-similarity methods, which have no per-token split."""
        if not is_gradient(s.method):
            return {}
        todo = [d for d in doc_ids if ("tok", q, s, d) not in self._memo]
        if todo:
            self.stats["per_token"] += 1
            stage = self.att.stage(self._stage(s.method))
            model, modules = stage.model, stage.modules
            pre = self.preconditioned(q, s)
            mask = get_method(s.method).layer_mask(self.att)
            pre = {m.name: pre[m.name] * float(w) for m, w in zip(modules, mask)}
            cands = [self.att.candidate(d) for d in todo]
            tok = per_token_scores(model, self.att.task, pre, self.att.collate(cands), modules)
            tok = tok[0].double()
            scale = self._scale(q, s, todo)
            if scale is not None:
                tok = tok * scale[:, None]
            tk = self.att.tokenizer
            for b, c in enumerate(cands):
                words = [" ⟨eos⟩" if i == tk.eos_token_id else tk.decode([i]) for i in c.input_ids]
                self._memo[("tok", q, s, c.doc_id)] = (words, tok[b, : len(words)].tolist())
        return {d: self._memo[("tok", q, s, d)] for d in doc_ids}

    def layer_names(self) -> list[tuple[str, str]]:
        """(layer, group) for each tracked module, in score order."""
        return [(layer_of(m.name), m.group) for m in self.att.modules]
