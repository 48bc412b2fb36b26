"""Attribute a fine-tuned model's answers to pre-training documents with any registered
method (`attribution.methods`; notebook 07 §Fact tracing, `msif-lite trace`, the benches).

The `Attributor` is the `ScoringContext` the methods read: an `Encoder` (text → tokens),
one `StageState` per stage (model, tracked layers, curvature fitted once and cached on
disk, candidate-gradient stores, memos of gradient norms and self-influence), the corpus
and its text indexes. A method only says how to combine them; `attribution.scoring.finish`
turns per-layer dot products into scores.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from msif_lite.attribution.checks import (
    check_checkpoint_tokenizer,
    check_same_architecture,
    check_tokenizer_fits,
)
from msif_lite.attribution.config import AttributionConfig
from msif_lite.attribution.encoder import INVISIBLE, Encoder, QuestionLike
from msif_lite.attribution.methods import Method, get_method
from msif_lite.attribution.settings import ScoreSettings, Stage
from msif_lite.attribution.stage import StageState
from msif_lite.config import trim_allocator
from msif_lite.engine.curvature import curvature
from msif_lite.engine.gradstore import Candidate
from msif_lite.engine.inputs import as_pairs, prepare_documents, unknown_document
from msif_lite.engine.layers import Grads, TrackedModule, check_finite_parameters
from msif_lite.engine.tasks import IGNORE_INDEX, Normalisation

if TYPE_CHECKING:  # pragma: no cover
    from msif_lite.world.training import Checkpoint

__all__ = ["INVISIBLE", "AttributionConfig", "Attributor", "QuestionLike"]


class Attributor:
    """Scores pre-training documents for questions answered by a fine-tuned model.

    documents: (doc_id, text) pairs of the pre-training corpus (the candidates and the data
    H_pt is fitted on); finetune_pairs: the fine-tuning (prompt, answer) pairs (H_ft);
    alpha: the fine-tune's proximity α when `config.alpha` is None (one value only).
    """

    def __init__(
        self,
        pretrained: nn.Module,
        finetuned: nn.Module,
        tokenizer,
        documents: Sequence[tuple[str, str]],
        finetune_pairs: Sequence[tuple[str, str]],
        config: AttributionConfig = AttributionConfig(),  # noqa: B008 (frozen)
        *,
        alpha: float | None = None,
        checkpoints: Sequence[Checkpoint] = (),
        mentions: Mapping[str, str] | None = None,
        training_run=None,
    ):
        check_same_architecture(pretrained, finetuned)
        check_tokenizer_fits(finetuned, tokenizer)
        check_checkpoint_tokenizer(finetuned, tokenizer)
        check_finite_parameters(pretrained, "the pre-trained model")
        check_finite_parameters(finetuned, "the fine-tuned model")
        documents, self.dropped_ids = prepare_documents(documents)
        if not documents:
            raise ValueError("no pre-training documents given: the candidate set is empty.")
        self.config = config = config.with_alpha(alpha)
        if config.trim_allocator:
            trim_allocator()
        self.settings: ScoreSettings = config.score_settings()
        self.encoder = Encoder.for_model(pretrained, tokenizer, config.template,
                                         config.context_length, config.batch_size)
        self.doc_ids = [d for d, _ in documents]
        self.texts = dict(documents)
        if len(self.texts) != len(self.doc_ids):
            raise ValueError("document ids must be unique")
        self.finetune_pairs = as_pairs(finetune_pairs, config.template)
        if not self.finetune_pairs:
            raise ValueError("no fine-tuning pairs given: H_ft needs fine-tuning data.")
        self.stages = {
            Stage.PRETRAINED: StageState(Stage.PRETRAINED, pretrained.eval(), self.encoder,
                                         config, lambda: self.candidates(self.doc_ids)),
            Stage.FINETUNED: StageState(Stage.FINETUNED, finetuned.eval(), self.encoder,
                                        config, self.finetune_examples,
                                        lambda: self.finetune_objective_scale),
        }  # fmt: skip
        # pre-training checkpoints (TracIn) and the entity each document is about (the
        # post-mention variant); only the methods of Notebook 11 read them
        self.checkpoints = tuple(checkpoints)
        self.mentions = dict(mentions or {})
        # the run that produced the two models (eval.training_run.TrainingRun): the
        # unrolled methods replay and differentiate it (attribution.unrolled_methods)
        self.training_run = training_run

    # ------------------------------------------------------------------ the context
    def stage(self, stage: Stage | str) -> StageState:
        """The StageState of θ_pt or θ_ft."""
        return self.stages[Stage(stage)]

    def checkpoint_stage(self, checkpoint: Checkpoint) -> StageState:
        """A stage (no curvature) at a pre-training checkpoint's weights (TracIn)."""
        model = copy.deepcopy(self.pretrained)
        model.load_state_dict(checkpoint.state)
        return StageState(Stage.PRETRAINED, model.eval(), self.encoder, self.config)

    @property
    def provides(self) -> frozenset[str]:
        """The optional inputs this Attributor holds (`Method.requires`)."""
        have = {"checkpoints": bool(self.checkpoints), "mentions": bool(self.mentions),
                "whitening": curvature(self.config.curvature).whitening,
                "training_run": self.training_run is not None}  # fmt: skip
        return frozenset(k for k, v in have.items() if v)

    @property
    def alpha(self) -> float:
        return self.settings.alpha

    @property
    def pretrained(self) -> nn.Module:
        return self.stages[Stage.PRETRAINED].model

    @property
    def finetuned(self) -> nn.Module:
        return self.stages[Stage.FINETUNED].model

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def task(self):
        return self.config.task

    @property
    def modules(self) -> list[TrackedModule]:
        """The tracked layers (the same names at both stages)."""
        return self.stages[Stage.PRETRAINED].modules

    @property
    def context(self) -> int:
        return self.encoder.context

    # ------------------------------------------------------------------ documents and pairs
    def candidate(self, doc_id: str) -> Candidate:
        """A document as a training example: text + eos, loss on every next token."""
        if doc_id not in self.texts:
            raise unknown_document(doc_id, self.dropped_ids, len(self.doc_ids))
        return self.encoder.document(doc_id, self.texts[doc_id])

    def candidates(self, doc_ids: Sequence[str]) -> list[Candidate]:
        if len(doc_ids) == 0:
            raise ValueError("the candidate set is empty: retrieval returned no documents. "
                             "Raise k or check the corpus.")  # fmt: skip
        return [self.candidate(d) for d in doc_ids]

    def qa_example(self, prompt: str, answer: str) -> Candidate:
        """`Encoder.qa_example`: the template's prompt + answer, loss on the answer."""
        return self.encoder.qa_example(prompt, answer)

    def collate(self, examples: Sequence[Candidate]):
        return self.encoder.collate(examples)

    def finetune_examples(self) -> list[Candidate]:
        """The fine-tuning pairs as training examples (the loss on the answer only)."""
        return [self.qa_example(p, a) for p, a in self.finetune_pairs]

    @cached_property
    def finetune_objective_scale(self) -> float:
        """c with H_ft = c·G_ft. G_ft is fitted from per-pair gradients (token sums), averaged
        over pairs; the fine-tune minimised J = Σ_n ℓ_n / Σ_n t_n + (α/2)‖θ − θ_pt‖² (token
        mean, `finetune_loss="token_mean"`), whose Hessian is G_ft / T̄, T̄ = Σ_n t_n / N the
        mean number of answer tokens (+ eos) per pair: c = 1/T̄. With "example_mean", c = 1."""
        if self.config.finetune_loss is Normalisation.EXAMPLE_MEAN:
            return 1.0
        t = [sum(lab != IGNORE_INDEX for lab in c.labels[1:]) for c in self.finetune_examples()]
        return len(t) / sum(t)

    # ------------------------------------------------------------------ stage shortcuts
    @property
    def pretrain_factors(self):
        """Factors of G_pt on the pre-training documents at θ_pt (cached on disk)."""
        return self.stages[Stage.PRETRAINED].factors

    @property
    def finetune_factors(self):
        """Factors of G_ft on the fine-tuning QA pairs at θ_ft (answer-only loss)."""
        return self.stages[Stage.FINETUNED].factors

    def inverse(self, stage: Stage, damping, float64: bool = False):
        """(H_stage + λI)⁻¹ (`StageState.inverse`)."""
        return self.stage(stage).inverse(damping, float64)

    def store(self, stage: Stage, dtype: torch.dtype | None = None):
        """The candidate-gradient store of a stage (`StageState.store`)."""
        return self.stage(stage).store(dtype)

    def query_grads(self, questions: Sequence[QuestionLike],
                    at: Stage | str = Stage.FINETUNED) -> Grads:  # fmt: skip
        """∇m(q) per question at θ_ft or θ_pt (the same layer names at both stages)."""
        return self.stage(at).query_grads(questions)

    def query_norms(self, questions: Sequence[QuestionLike], at: Stage) -> torch.Tensor:
        return self.stage(at).query_norms(questions)

    def candidate_norms(self, doc_ids: Sequence[str], at: Stage) -> torch.Tensor:
        return self.stage(at).candidate_norms(self.candidates(doc_ids))

    def self_influence(self, doc_ids: Sequence[str], at: Stage,
                       settings: ScoreSettings | None = None) -> torch.Tensor:  # fmt: skip
        """I(z, z) at stage `at` with that stage's damping of `settings` (RelatIF)."""
        s = settings or self.settings
        return self.stage(at).self_influence(self.candidates(doc_ids), s.damping(Stage(at)),
                                             s.float64)  # fmt: skip

    # ------------------------------------------------------------------ scores
    def scores(
        self,
        method: str | Method,
        questions: Sequence[QuestionLike],
        doc_ids: Sequence[str],
        *,
        settings: ScoreSettings | None = None,
        by_module: bool = False,
        query_rank: int | None = None,
    ) -> torch.Tensor:
        """(Q, N) scores of `doc_ids` for each question (higher = more helpful); with
        `by_module`, (Q, N, L) per tracked layer (gradient methods only). `query_rank`: score
        with rank-r preconditioned queries (gradient methods only; engine.lowrank, Notebook 09
        §Low-rank query gradients): each layer's P_l is truncated to its top r singular
        triples as soon as it is preconditioned, so the kept queries take Q·r·Σ_l(o + d_in)
        numbers instead of Q·P (the normalisations use the full ‖∇m‖)."""
        m = get_method(method) if isinstance(method, str) else method
        if len(doc_ids) == 0:
            raise ValueError("the candidate set is empty: retrieval returned no documents. "
                             "Raise k or check the corpus.")  # fmt: skip
        if not questions:
            raise ValueError("no questions given")
        for q in questions:
            self.qa_example(q.prompt, q.answer)  # refuses empty questions and answers early
        s = settings or self.settings
        if by_module or query_rank is not None:
            if not hasattr(m, "layer_scores"):
                what = "per-layer scores" if by_module else "low-rank queries (query_rank)"
                raise ValueError(f"{m.name!r} has no {what} (not a gradient method)")
            layers = m.layer_scores(self, questions, doc_ids, s, query_rank)
            return layers if by_module else layers.sum(-1)
        return m.scores(self, questions, doc_ids, s)

    def top_k(self, method: str | Method, questions: Sequence, k: int = 10,
              doc_ids: Sequence[str] | None = None, *, n_candidates: int | None = None):
        """The k best documents per question as rows (rank, doc_id, score, text): see
        `msif_lite.attribution.trace.top_k` (questions may be plain prompts, (prompt,
        answer) pairs or objects with .prompt/.answer)."""
        from msif_lite.attribution.trace import top_k

        return top_k(self, method, questions, k, doc_ids, n_candidates=n_candidates)

    # ------------------------------------------------------------------ text baselines
    @cached_property
    def embedding_index(self):
        from msif_lite.attribution.retrieval import EmbeddingIndex

        texts = [self.texts[d] for d in self.doc_ids]  # one folder per corpus: no eviction
        corpus = hashlib.sha256(json.dumps([self.doc_ids, texts]).encode()).hexdigest()[:16]
        root = Path(self.config.cache_dir) / "embeddings" / corpus
        return EmbeddingIndex.build_or_load(root, self.doc_ids, texts,
                                            progress=self.config.progress)  # fmt: skip

    @cached_property
    def bm25_index(self):
        from msif_lite.attribution.retrieval import BM25Index

        return BM25Index(self.doc_ids, [self.texts[d] for d in self.doc_ids])

    def text_index(self, kind: str):
        if kind == "bm25":
            return self.bm25_index
        if kind == "embedding":
            return self.embedding_index
        raise ValueError(f"unknown text index {kind!r}: use 'bm25' or 'embedding'")

    def describe(self) -> dict:
        """What a result was computed with (for JSON outputs)."""
        return {
            "fisher": self.config.factors.fisher,
            "curvature": self.config.curvature,
            "alpha": self.settings.alpha,
            "alpha_included_in_scores": self.settings.include_alpha,
            "layers": [m.name for m in self.modules],
            "pretrain_damping": asdict(self.settings.pretrain_damping),
            "corpus_fingerprint": hashlib.sha256("\n".join(self.doc_ids).encode()).hexdigest(),
        }
