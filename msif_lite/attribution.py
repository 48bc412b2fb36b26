"""Attribute a fine-tuned model's answers to pre-training documents, with every method the
kit compares (Notebook 07 §Fact tracing; `msif-lite trace` and `msif-lite bench`).

- `multi_stage`: query gradient at θ_ft; α (H_pt + λ_pt I)⁻¹ (H_ft + αI)⁻¹ (EK-FAC on both
  stages); candidate gradients at θ_pt.
- `single_stage`: everything at θ_pt; (H_pt + λ_pt I)⁻¹.
- `finetune_only`: everything at θ_ft; (H_ft + λ_ft I)⁻¹ from the fine-tuning data.
- `grad_dot`: ∇m(q, θ_ft) · ∇ℓ(z, θ_pt), no curvature (the same gradients as multi_stage,
  so the comparison isolates what the two preconditioners add).
- `grad_cosine`: the same, both gradients normalised.
- `embedding`: all-MiniLM-L6-v2 cosine between question and document text.
- `bm25`: BM25 (bm25s) of the question against the document text.

All scores are "higher = more helpful to the answer"; the gradient methods use the
sign convention I(z, q) = ∇m(q)ᵀ P ∇ℓ(z), m = −log p(answer | prompt).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn

from msif_lite.factors import EKFACFactors, FactorConfig, fit_ekfac
from msif_lite.gradstore import Candidate, GradientStore
from msif_lite.ihvp import EKFACIHVP, Damping
from msif_lite.modules import DEFAULT_EXCLUDE, Grads, TrackedModule, find_modules
from msif_lite.multistage import MultiStageConfig, MultiStageIHVP
from msif_lite.scores import precondition, query_gradients
from msif_lite.storage import ArtifactError, data_fingerprint
from msif_lite.tasks import IGNORE_INDEX, LanguageModelingTask, TokenBatch, make_token_batch

Method = Literal[
    "multi_stage", "single_stage", "finetune_only", "grad_dot", "grad_cosine", "embedding", "bm25"
]
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]
GRADIENT_METHODS = ("multi_stage", "single_stage", "finetune_only", "grad_dot", "grad_cosine")


class QuestionLike(Protocol):
    prompt: str
    answer: str


@dataclass(frozen=True)
class AttributionConfig:
    """Settings shared by every method (Notebook 07). `help` metadata explains each field."""

    include: str | tuple[str, ...] | None = field(
        default=None, metadata={"help": "layers to track: None = all linear layers, 'mlp' = MLP"}
    )
    exclude: tuple[str, ...] = field(
        default=DEFAULT_EXCLUDE, metadata={"help": "layers never tracked (the unembedding)"}
    )
    fisher: Literal["sampled", "empirical"] = field(
        default="sampled", metadata={"help": "'sampled' = GGN/true Fisher, 'empirical' = data"}
    )
    alpha: float | None = field(
        default=None, metadata={"help": "proximity α; None = read from the fine-tuned checkpoint"}
    )
    pretrain_damping: Damping = field(
        default=Damping(), metadata={"help": "λ_pt for (H_pt + λ_pt I); default 0.1·mean Λ"}
    )
    finetune_only_damping: Damping = field(
        default=Damping(), metadata={"help": "λ_ft of the finetune_only baseline"}
    )
    include_alpha: bool = field(
        default=True, metadata={"help": "multi_stage reports α·(…) = −dm/dε (True) or (…)/1"}
    )
    max_fit_batches: int | None = field(
        default=None, metadata={"help": "cap on batches per factor pass (None = all data)"}
    )
    batch_size: int = field(default=16, metadata={"help": "sequences per forward/backward"})
    cache_dir: str = field(
        default=".cache/msif", metadata={"help": "where factors and candidate gradients go"}
    )
    seed: int = field(default=0, metadata={"help": "seed for sampled Fisher labels"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})

    def __post_init__(self) -> None:
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"AttributionConfig.alpha={self.alpha}: set α > 0 (or None)")
        if self.batch_size < 1:
            raise ValueError("AttributionConfig.batch_size must be >= 1")

    def factor_config(self) -> FactorConfig:
        return FactorConfig(
            fisher=self.fisher, seed=self.seed, include=self.include, exclude=self.exclude,
            max_batches=self.max_fit_batches, progress=self.progress,
        )


def check_same_architecture(a: nn.Module, b: nn.Module) -> None:
    """Refuse a pre-trained / fine-tuned pair that do not share parameter names and shapes."""
    sa = {n: tuple(p.shape) for n, p in a.named_parameters()}
    sb = {n: tuple(p.shape) for n, p in b.named_parameters()}
    if sa != sb:
        diff = sorted(set(sa.items()) ^ set(sb.items()))[:4]
        raise ValueError(
            "the pre-trained and fine-tuned models do not share an architecture (first "
            f"differences: {diff}); multi-stage influence needs θ_ft and θ_pt in one "
            "parameter space. Load the fine-tune of this pre-trained model."
        )


def check_tokenizer_fits(model: nn.Module, tokenizer) -> None:
    """Refuse a tokenizer with more tokens than the model's embedding has rows."""
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab}: "
            "the tokenizer does not match the model. Load the tokenizer saved with the "
            "checkpoint (AutoTokenizer.from_pretrained(<checkpoint dir>))."
        )


class Attributor:
    """Scores pre-training documents for questions answered by a fine-tuned model.

    documents: (doc_id, text) pairs of the pre-training corpus (the candidates and the data
    H_pt is fitted on); finetune_pairs: the fine-tuning (prompt, answer) pairs (H_ft).
    """

    def __init__(
        self,
        pretrained: nn.Module,
        finetuned: nn.Module,
        tokenizer,
        documents: Sequence[tuple[str, str]],
        finetune_pairs: Sequence[tuple[str, str]],
        config: AttributionConfig = AttributionConfig(),
        *,
        alpha: float | None = None,
    ):
        check_same_architecture(pretrained, finetuned)
        check_tokenizer_fits(finetuned, tokenizer)
        if not documents:
            raise ValueError("no pre-training documents given: the candidate set is empty.")
        if not finetune_pairs:
            raise ValueError("no fine-tuning pairs given: H_ft needs fine-tuning data.")
        self.pretrained, self.finetuned = pretrained.eval(), finetuned.eval()
        self.tokenizer, self.config = tokenizer, config
        a = config.alpha if config.alpha is not None else alpha
        if a is None:
            raise ValueError(
                "α is unknown: pass alpha=<the fine-tune's proximity strength> or set "
                "AttributionConfig.alpha (msif-lite checkpoints store it in msif_meta.json)."
            )
        self.ms_config = MultiStageConfig(a, config.pretrain_damping, config.include_alpha)
        self.task = LanguageModelingTask()
        self.doc_ids = [d for d, _ in documents]
        self.texts = dict(documents)
        if len(self.texts) != len(self.doc_ids):
            raise ValueError("document ids must be unique")
        self.finetune_pairs = list(finetune_pairs)
        self.modules: list[TrackedModule] = find_modules(pretrained, config.include,
                                                         config.exclude)  # fmt: skip
        self.ft_modules = find_modules(finetuned, config.include, config.exclude)
        self.cache = Path(config.cache_dir)

    # ------------------------------------------------------------------ tokenisation
    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pid is None else pid

    def candidate(self, doc_id: str) -> Candidate:
        """A document as a training example: text + eos, loss on every next token."""
        if doc_id not in self.texts:
            raise KeyError(f"unknown document id {doc_id!r}")
        ids = self.tokenizer(self.texts[doc_id], add_special_tokens=False)["input_ids"]
        ids = ids + [self.tokenizer.eos_token_id]
        return Candidate(doc_id, tuple(ids), tuple(ids))

    def collate(self, examples: Sequence[Candidate]) -> TokenBatch:
        masks = [[lab != IGNORE_INDEX for lab in c.labels] for c in examples]
        return make_token_batch([c.input_ids for c in examples], self.pad_id, masks)

    def qa_example(self, prompt: str, answer: str) -> Candidate:
        """prompt + ' ' + answer + eos with the loss on the answer tokens only."""
        p = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
        if not answer.strip() or not a:
            raise ValueError(
                f"the answer {answer!r} has no tokens, so there is nothing to attribute: "
                "give each question a non-empty answer."
            )
        a = a + [self.tokenizer.eos_token_id]
        return Candidate(prompt, tuple(p + a), tuple([IGNORE_INDEX] * len(p) + a))

    def _batches(self, examples: Sequence[Candidate]) -> list[TokenBatch]:
        b = self.config.batch_size
        return [self.collate(examples[i : i + b]) for i in range(0, len(examples), b)]

    # ------------------------------------------------------------------ curvature
    def _fit(self, model: nn.Module, examples: Sequence[Candidate], stage: str) -> EKFACFactors:
        cfg = self.config.factor_config()
        modules = find_modules(model, cfg.include, cfg.exclude)
        data_fp = data_fingerprint([[list(c.input_ids), list(c.labels)] for c in examples])
        name = f"{stage}-{data_fp[:16]}-{cfg.settings([m.name for m in modules])[:12]}"
        path = self.cache / "factors" / f"{name}.safetensors"
        try:
            return EKFACFactors.load(path, model, cfg, data_fp, modules)
        except (FileNotFoundError, ArtifactError):
            pass
        factors = fit_ekfac(model, self.task, self._batches(examples), cfg, modules)
        factors.save(path, model, data_fp)
        return factors

    @cached_property
    def pretrain_factors(self) -> EKFACFactors:
        """EK-FAC of G_pt on the pre-training documents at θ_pt (cached on disk)."""
        return self._fit(self.pretrained, [self.candidate(d) for d in self.doc_ids], "pretrain")

    @cached_property
    def finetune_factors(self) -> EKFACFactors:
        """EK-FAC of G_ft on the fine-tuning QA pairs at θ_ft (answer-only loss)."""
        return self._fit(
            self.finetuned, [self.qa_example(p, a) for p, a in self.finetune_pairs], "finetune"
        )

    # ------------------------------------------------------------------ gradients
    @cached_property
    def pretrained_store(self) -> GradientStore:
        return GradientStore(self.pretrained, self.task, self.modules, self.collate,
                             self.cache / "grads", batch_size=self.config.batch_size,
                             progress=self.config.progress)  # fmt: skip

    @cached_property
    def finetuned_store(self) -> GradientStore:
        return GradientStore(self.finetuned, self.task, self.ft_modules, self.collate,
                             self.cache / "grads", batch_size=self.config.batch_size,
                             progress=self.config.progress)  # fmt: skip

    def query_grads(self, questions: Sequence[QuestionLike], at: str = "finetuned") -> Grads:
        """∇m(q) for each question, at θ_ft ("finetuned") or θ_pt ("pretrained")."""
        if not questions:
            raise ValueError("no questions given")
        model = self.finetuned if at == "finetuned" else self.pretrained
        modules = self.ft_modules if at == "finetuned" else self.modules
        batch = self.collate([self.qa_example(q.prompt, q.answer) for q in questions])
        g = query_gradients(model, self.task, batch, modules, self.config.batch_size)
        return {m.name: g[f.name] for m, f in zip(self.modules, modules)}

    def preconditioned(self, method: str, qg_ft: Grads, qg_pt: Grads | None = None) -> Grads:
        """P·∇m for one gradient method (see the module table)."""
        if method == "multi_stage":
            ihvp = MultiStageIHVP.from_factors(
                self.finetune_factors, self.pretrain_factors, self.ms_config
            )
            return precondition(qg_ft, ihvp)
        if method == "single_stage":
            return precondition(qg_pt, EKFACIHVP(self.pretrain_factors,
                                                 self.config.pretrain_damping))  # fmt: skip
        if method == "finetune_only":
            return precondition(qg_ft, EKFACIHVP(self.finetune_factors,
                                                 self.config.finetune_only_damping))  # fmt: skip
        if method in ("grad_dot", "grad_cosine"):
            return qg_ft
        raise ValueError(f"unknown gradient method {method!r}; use one of {GRADIENT_METHODS}")

    def scores(
        self,
        method: str,
        questions: Sequence[QuestionLike],
        doc_ids: Sequence[str],
        *,
        by_module: bool = False,
    ) -> torch.Tensor:
        """(Q, N) scores of `doc_ids` for each question (higher = more helpful)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
        if len(doc_ids) == 0:
            raise ValueError(
                "the candidate set is empty: retrieval returned no documents. Raise k or "
                "check the corpus."
            )
        if method == "embedding":
            index = self.embedding_index
        elif method == "bm25":
            index = self.bm25_index
        if method in ("embedding", "bm25"):
            rows = [index.scores(q.prompt, list(doc_ids)) for q in questions]
            return torch.from_numpy(np.stack(rows).astype(np.float64))
        cands = [self.candidate(d) for d in doc_ids]
        qg_ft = self.query_grads(questions, "finetuned")
        qg_pt = self.query_grads(questions, "pretrained") if method == "single_stage" else None
        pre = self.preconditioned(method, qg_ft, qg_pt)
        store = self.finetuned_store if method == "finetune_only" else self.pretrained_store
        if method == "finetune_only":
            pre = {f.name: pre[m.name] for m, f in zip(self.modules, self.ft_modules)}
        s = store.scores(pre, cands, by_module=by_module)
        if method == "grad_cosine":
            qn = sum(v.double().pow(2).sum((-2, -1)) for v in qg_ft.values()).sqrt()
            s = s / (qn[:, None] * store.norms(cands)[None, :]).to(s.dtype).clamp_min(1e-30)
        return s

    # ------------------------------------------------------------------ text baselines
    @cached_property
    def embedding_index(self):
        from msif_lite.retrieval import EmbeddingIndex

        texts = [self.texts[d] for d in self.doc_ids]
        return EmbeddingIndex.build_or_load(self.cache / "embeddings", self.doc_ids, texts,
                                            progress=self.config.progress)  # fmt: skip

    @cached_property
    def bm25_index(self):
        from msif_lite.retrieval import BM25Index

        return BM25Index(self.doc_ids, [self.texts[d] for d in self.doc_ids])

    def describe(self) -> dict:
        """What a result was computed with (for JSON outputs)."""
        return {
            "fisher": self.config.fisher,
            "alpha": self.ms_config.alpha,
            "alpha_included_in_scores": self.ms_config.include_alpha,
            "layers": [m.name for m in self.modules],
            "pretrain_damping": asdict(self.config.pretrain_damping),
            "corpus_fingerprint": hashlib.sha256("\n".join(self.doc_ids).encode()).hexdigest(),
        }
