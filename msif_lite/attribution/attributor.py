"""Attribute a fine-tuned model's answers to pre-training documents with any registered
method (`attribution.methods`; notebook 07 §Fact tracing, `msif-lite trace`, the benches).

The `Attributor` owns what methods share and computes each piece once: the tokenised
documents and fine-tuning pairs, each stage's curvature (fitted once, cached on disk),
query gradients at θ_pt / θ_ft, candidate gradients (cached on disk), gradient norms and
the text indexes. A method only says how to combine them.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from msif_lite.attribution.checks import (
    check_checkpoint_tokenizer,
    check_fits_context,
    check_same_architecture,
    check_tokenizer_fits,
    context_length,
)
from msif_lite.attribution.methods import (
    Method,
    ScoreSettings,
    Stage,
    finetune_preconditioner,
    get_method,
    pretrain_preconditioner,
)
from msif_lite.engine.curvature import CurvatureKind, curvature
from msif_lite.engine.factors import EKFACFactors, FactorConfig
from msif_lite.engine.gradstore import Candidate, GradientStore
from msif_lite.engine.ihvp import Damping, InverseHVP
from msif_lite.engine.layers import Grads, TrackedModule, find_modules
from msif_lite.engine.lowrank import LowRankGrads
from msif_lite.engine.prompts import DEFAULT_TEMPLATE, PromptTemplate, encode_document
from msif_lite.engine.scores import (
    grad_sq_norms,
    preconditioned_queries,
    query_gradient_norms,
    query_gradients,
    self_influence,
)
from msif_lite.engine.storage import ArtifactError, CorruptArtifactError, data_fingerprint
from msif_lite.engine.tasks import (
    IGNORE_INDEX,
    LanguageModelingTask,
    Normalisation,
    TokenBatch,
    make_token_batch,
)

if TYPE_CHECKING:  # pragma: no cover
    from msif_lite.world.training import Checkpoint

INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff \t\r\n"  # zero-width and white space


class QuestionLike(Protocol):
    prompt: str
    answer: str


@dataclass(frozen=True)
class AttributionConfig:
    """Settings shared by every method (notebook 07). `help` metadata explains each field."""

    factors: FactorConfig = field(
        default=FactorConfig(),
        metadata={"help": "the curvature fit (Fisher type, layers tracked, token budget, "
                          "autocast, offload): one FactorConfig for both stages"})  # fmt: skip
    curvature: CurvatureKind = field(
        default=CurvatureKind.EKFAC,
        metadata={"help": "which approximation of G: 'ekfac', 'kfac' or 'identity'"})
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
    finetune_loss: Normalisation = field(
        default=Normalisation.TOKEN_MEAN,
        metadata={"help": "how the fine-tuning loss the model was trained with averages its "
                          "pairs: 'token_mean' (the Hugging Face loss; the kit's fine-tune) "
                          "makes H_ft = G_ft / T̄, T̄ = mean answer tokens per pair, so that "
                          "(H_ft + αI) uses the α of the objective; 'example_mean' uses G_ft "
                          "as fitted (per-pair token sums averaged over pairs)"})  # fmt: skip
    batch_size: int = field(default=16, metadata={"help": "sequences per forward/backward"})
    cache_dir: str = field(
        default=".cache/msif", metadata={"help": "where factors and candidate gradients go"}
    )
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars (every stage)"})
    template: PromptTemplate = field(
        default=DEFAULT_TEMPLATE,
        metadata={"help": "how a question becomes a prompt and prompt and answer are joined: "
                          "prefix + question + suffix + joiner + answer + eos, for the "
                          "fine-tuning pairs (H_ft) and the queries alike (engine.prompts)"})
    context_length: int | None = field(
        default=None,
        metadata={"help": "longest sequence in tokens; None = the model's position limit "
                          "(checks.context_length). Longer documents are refused: split them "
                          "with scale.pairs.chunk_documents"})  # fmt: skip
    gradient_cache_gb: float = field(
        default=20.0, metadata={"help": "disk budget of a candidate set's cached gradients; "
                                        "above it they are streamed, never written"})
    gradient_chunk_mb: float = field(
        default=1024.0, metadata={"help": "stored candidate gradients held in memory at once "
                                          "while scoring (GradientStore; lower it to lower "
                                          "the scoring peak, scale.memory's chunk_mb)"})

    def __post_init__(self) -> None:
        if not isinstance(self.factors, FactorConfig):
            raise TypeError("AttributionConfig.factors must be a FactorConfig, e.g. "
                            "FactorConfig(include='mlp')")  # fmt: skip
        object.__setattr__(self, "curvature", CurvatureKind(curvature(self.curvature).name))
        if self.alpha is not None:
            ScoreSettings(alpha=self.alpha)  # validates α (number, finite, > 0)
        for name in ("pretrain_damping", "finetune_only_damping"):
            value = getattr(self, name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                object.__setattr__(self, name, Damping(absolute=float(value)))  # λ itself
            elif not isinstance(value, Damping):
                raise TypeError(f"AttributionConfig.{name} must be a number (λ) or a Damping, "
                                "e.g. 1e-4, Damping(absolute=1e-4) or Damping(heuristic_factor="
                                f"0.1); got {value!r}")
        object.__setattr__(self, "finetune_loss", Normalisation(self.finetune_loss))
        if not isinstance(self.template, PromptTemplate):
            raise TypeError("AttributionConfig.template must be a PromptTemplate, e.g. "
                            "PromptTemplate(prefix='Question: ', suffix='\\nAnswer:', joiner=' ')")
        if self.context_length is not None:
            context_length(None, None, self.context_length)  # validates it
        if self.batch_size < 1:
            raise ValueError("AttributionConfig.batch_size must be >= 1")
        if not self.gradient_chunk_mb > 0:
            raise ValueError("AttributionConfig.gradient_chunk_mb must be > 0 (MB of stored "
                             f"gradients held at once), got {self.gradient_chunk_mb!r}")

    def factor_config(self) -> FactorConfig:
        """The FactorConfig both stages are fitted with (progress follows this config)."""
        return replace(self.factors, progress=self.progress)


def _resolve_alpha(config_alpha: float | None, given: float | None) -> float:
    if config_alpha is not None and given is not None and config_alpha != given:
        raise ValueError(
            f"two values of α: AttributionConfig(alpha={config_alpha:g}) and "
            f"Attributor(..., alpha={given:g}). Give α in one place only."
        )
    a = config_alpha if config_alpha is not None else given
    if a is None:
        raise ValueError(
            "α is unknown: pass alpha=<the fine-tune's proximity strength> or set "
            "AttributionConfig.alpha (msif-lite checkpoints store it in msif_meta.json)."
        )
    return ScoreSettings(alpha=a).alpha


def _drop_empty(documents: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    kept = [(d, t) for d, t in documents if t.strip()]
    if len(kept) < len(documents):
        warnings.warn(f"dropped {len(documents) - len(kept)} empty or whitespace-only "
                      "documents (they have no tokens to attribute)", stacklevel=3)  # fmt: skip
    return kept


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
        checkpoints: Sequence[Checkpoint] = (),
        mentions: Mapping[str, str] | None = None,
    ):
        check_same_architecture(pretrained, finetuned)
        check_tokenizer_fits(finetuned, tokenizer)
        check_checkpoint_tokenizer(finetuned, tokenizer)
        documents = _drop_empty(documents)
        if not documents:
            raise ValueError("no pre-training documents given: the candidate set is empty.")
        if not finetune_pairs:
            raise ValueError("no fine-tuning pairs given: H_ft needs fine-tuning data.")
        self.pretrained, self.finetuned = pretrained.eval(), finetuned.eval()
        self.tokenizer, self.config = tokenizer, config
        self.settings = ScoreSettings(
            _resolve_alpha(config.alpha, alpha), config.pretrain_damping,
            config.finetune_only_damping, config.include_alpha)  # fmt: skip
        self.task = LanguageModelingTask()
        self.doc_ids = [d for d, _ in documents]
        self.texts = dict(documents)
        if len(self.texts) != len(self.doc_ids):
            raise ValueError("document ids must be unique")
        self.finetune_pairs = list(finetune_pairs)
        fc = config.factors
        self.modules: list[TrackedModule] = find_modules(pretrained, fc.include, fc.exclude)
        self.ft_modules = find_modules(finetuned, fc.include, fc.exclude)
        self.cache = Path(config.cache_dir)
        self.context, self.context_source = context_length(pretrained, tokenizer,
                                                           config.context_length)  # fmt: skip
        self._norms: dict[tuple[Stage, str], float] = {}
        self._query_norms: dict[tuple[Stage, str, str], float] = {}  # (stage, prompt, answer)
        self._self_inf: dict[tuple, float] = {}
        # pre-training checkpoints (TracIn) and the entity each document is about (the
        # post-mention variant); only the methods of Notebook 11 read them
        self.checkpoints = tuple(checkpoints)
        self.mentions = dict(mentions or {})

    @property
    def provides(self) -> frozenset[str]:
        """The optional inputs this Attributor holds (`Method.requires`)."""
        return frozenset({"checkpoints"} if self.checkpoints else ()) | \
            frozenset({"mentions"} if self.mentions else ())  # fmt: skip

    @property
    def alpha(self) -> float:
        return self.settings.alpha

    # ------------------------------------------------------------------ tokenisation
    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pid is None else pid

    def candidate(self, doc_id: str) -> Candidate:
        """A document as a training example: text + eos, loss on every next token."""
        if doc_id not in self.texts:
            raise KeyError(f"unknown document id {doc_id!r}")
        ids, labels = encode_document(self.tokenizer, self.texts[doc_id])
        check_fits_context(len(ids), self.context, f"document {doc_id!r}",
                           "split long documents into context-length chunks first with "
                           "msif_lite.scale.pairs.chunk_documents(documents, tokenizer, "
                           f"{self.context}) (ids doc#1, doc#2, …), or pass "
                           "AttributionConfig(context_length=…) for a model without a "
                           f"position limit (now from {self.context_source})")  # fmt: skip
        return Candidate(doc_id, tuple(ids), tuple(labels))

    def candidates(self, doc_ids: Sequence[str]) -> list[Candidate]:
        if len(doc_ids) == 0:
            raise ValueError("the candidate set is empty: retrieval returned no documents. "
                             "Raise k or check the corpus.")  # fmt: skip
        return [self.candidate(d) for d in doc_ids]

    def collate(self, examples: Sequence[Candidate]) -> TokenBatch:
        masks = [[lab != IGNORE_INDEX for lab in c.labels] for c in examples]
        return make_token_batch([c.input_ids for c in examples], self.pad_id, masks)

    def qa_example(self, prompt: str, answer: str) -> Candidate:
        """template.as_prompt(prompt) + joiner + answer + eos with the loss on the answer
        tokens only (`AttributionConfig.template`: the same for H_ft's pairs and queries)."""
        if not prompt.strip():
            raise ValueError("a question is empty: pass a question such as 'Where was X born?'")
        template = self.config.template
        prompt = template.as_prompt(prompt)
        ids, labels = template.encode(self.tokenizer, prompt, answer)
        check_fits_context(len(ids), self.context, f"the question/answer {prompt!r}",
                           "shorten the question or the answer")
        answer_ids = [t for t in labels if t != IGNORE_INDEX][:-1]  # without the final eos
        special = set(self.tokenizer.all_special_ids)
        content = [t for t in answer_ids
                   if t not in special and self.tokenizer.decode([t]).strip(INVISIBLE)]
        if not answer.strip(INVISIBLE) or not content:
            raise ValueError(f"the answer {answer!r} is only special tokens or invisible "
                             "characters: give each question a real answer.")  # fmt: skip
        return Candidate(prompt, tuple(ids), tuple(labels))

    def _batches(self, examples: Sequence[Candidate]) -> list[TokenBatch]:
        b = self.config.batch_size
        return [self.collate(examples[i : i + b]) for i in range(0, len(examples), b)]

    # ------------------------------------------------------------------ curvature
    def _fit(self, model: nn.Module, examples: Sequence[Candidate], stage: Stage):
        cfg, curv = self.config.factor_config(), curvature(self.config.curvature)
        if not curv.needs_factors:
            return None
        modules = find_modules(model, cfg.include, cfg.exclude)
        data_fp = data_fingerprint([[list(c.input_ids), list(c.labels)] for c in examples]
                                   + [self.config.batch_size])  # label draws depend on it
        settings = cfg.settings([m.name for m in modules])[:12]
        path = self.cache / "factors" / f"{stage.value}-{curv.name}-{data_fp[:16]}-{settings}"
        path = path.with_suffix(".safetensors")
        try:
            return EKFACFactors.load(path, model, cfg, data_fp, modules)
        except FileNotFoundError:
            pass
        except CorruptArtifactError as e:
            warnings.warn(f"{path} was corrupt ({e}); refitting it", stacklevel=3)
        except ArtifactError:
            pass  # another model / data / settings: refit and overwrite
        factors = curv.fit(model, self.task, self._batches(examples), cfg, modules)
        factors.save(path, model, data_fp)
        return factors

    @cached_property
    def pretrain_factors(self) -> EKFACFactors | None:
        """Factors of G_pt on the pre-training documents at θ_pt (cached on disk)."""
        return self._fit(self.pretrained, self.candidates(self.doc_ids), Stage.PRETRAINED)

    @cached_property
    def finetune_factors(self) -> EKFACFactors | None:
        """Factors of G_ft on the fine-tuning QA pairs at θ_ft (answer-only loss)."""
        return self._fit(self.finetuned, self.finetune_examples(), Stage.FINETUNED)

    def finetune_examples(self) -> list[Candidate]:
        """The fine-tuning pairs as training examples (the loss on the answer only)."""
        return [self.qa_example(p, a) for p, a in self.finetune_pairs]

    def inverse(self, stage: Stage, damping: Damping, float64: bool = False) -> InverseHVP:
        """(H_stage + λI)⁻¹ with the configured curvature (`AttributionConfig.curvature`);
        H_ft = c·G_ft with c = `finetune_objective_scale` (the fine-tune's loss normalisation)."""
        factors = self.pretrain_factors if stage is Stage.PRETRAINED else self.finetune_factors
        if stage is Stage.FINETUNED and factors is not None:
            factors = factors.scaled(self.finetune_objective_scale)
        if float64 and factors is not None:
            factors = factors.to(torch.float64)
        return curvature(self.config.curvature).inverse(factors, damping)

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

    # ------------------------------------------------------------------ gradients
    def gradient_store(self, model, modules, dtype: torch.dtype | None = None) -> GradientStore:
        """A candidate-gradient store for any model with this Attributor's settings."""
        return self._store(model, modules, dtype)

    def _store(self, model, modules, dtype: torch.dtype | None = None) -> GradientStore:
        return GradientStore(model, self.task, modules, self.collate, self.cache / "grads",
                             batch_size=self.config.batch_size, dtype=dtype,
                             progress=self.config.progress,
                             disk_budget_bytes=self.config.gradient_cache_gb * 1e9,
                             chunk_bytes=self.config.gradient_chunk_mb * 2**20)  # fmt: skip

    @cached_property
    def pretrained_store(self) -> GradientStore:
        return self._store(self.pretrained, self.modules)

    @cached_property
    def finetuned_store(self) -> GradientStore:
        return self._store(self.finetuned, self.ft_modules)

    def store(self, stage: Stage, dtype: torch.dtype | None = None) -> GradientStore:
        """The candidate-gradient store of a stage (a new one keeping `dtype`, if given)."""
        if dtype is not None:
            return self._store(self.stage_model(stage), self.stage_modules(stage), dtype)
        return self.pretrained_store if stage is Stage.PRETRAINED else self.finetuned_store

    def stage_modules(self, stage: Stage) -> list[TrackedModule]:
        return self.modules if stage is Stage.PRETRAINED else self.ft_modules

    def stage_model(self, stage: Stage) -> nn.Module:
        return self.pretrained if stage is Stage.PRETRAINED else self.finetuned

    def rename(self, grads: Grads | LowRankGrads, to: Stage) -> Grads | LowRankGrads:
        """Per-layer tensors keyed by the layer names of stage `to` (same layer order); a
        `LowRankGrads` keeps its rank, both factors renamed."""
        if isinstance(grads, LowRankGrads):
            return LowRankGrads(self.rename(grads.left, to), self.rename(grads.right, to),
                                grads.rank)  # fmt: skip
        src = {m.name for m in self.modules}
        names = zip(self.modules if set(grads) <= src else self.ft_modules,
                    self.stage_modules(to))  # fmt: skip
        return {b.name: grads[a.name] for a, b in names}

    def query_grads(self, questions: Sequence[QuestionLike],
                    at: Stage | str = Stage.FINETUNED) -> Grads:  # fmt: skip
        """∇m(q) per question at θ_ft or θ_pt, keyed by the pre-trained model's layer names."""
        if not questions:
            raise ValueError("no questions given")
        stage = Stage(at)
        g = self.query_grads_of(self.stage_model(stage), self.stage_modules(stage), questions)
        return self.rename(g, Stage.PRETRAINED)

    def query_grads_of(self, model: nn.Module, modules: Sequence[TrackedModule],
                       questions: Sequence[QuestionLike]) -> Grads:  # fmt: skip
        """∇m(q) per question for any model (keyed by `modules`' names)."""
        return query_gradients(model, self.task, self.query_batch(questions), modules,
                               self.config.batch_size)  # fmt: skip

    def query_batch(self, questions: Sequence[QuestionLike]) -> TokenBatch:
        """The questions as one TokenBatch (template, loss on the answer tokens)."""
        return self.collate([self.qa_example(q.prompt, q.answer) for q in questions])

    def preconditioned_queries(self, questions: Sequence[QuestionLike], at: Stage | str,
                               ihvp: InverseHVP | None, rank: int | None = None
                               ) -> Grads | LowRankGrads:  # fmt: skip
        """P_l = (H + λI)_l⁻¹ ∇m_l(q) at θ_ft or θ_pt, one layer at a time
        (`engine.scores.preconditioned_queries`: captured once, each layer's gradient formed,
        preconditioned, truncated to rank r if asked and its dense copy dropped before the
        next layer), keyed by the pre-trained model's layer names. `ihvp=None`: P = I. The
        norms ‖∇m(q)‖ seen on the way are kept for `query_norms`."""
        if not questions:
            raise ValueError("no questions given")
        from msif_lite.engine.ihvp import IdentityIHVP

        stage = Stage(at)
        layer_sq: dict[str, torch.Tensor] = {}  # ‖∇m_l‖² per layer, seen on the way

        def keep(name: str, g: torch.Tensor) -> None:
            layer_sq[name] = grad_sq_norms(g)

        pre = preconditioned_queries(
            self.stage_model(stage), self.task, self.query_batch(questions),
            self.stage_modules(stage), ihvp if ihvp is not None else IdentityIHVP(), rank=rank,
            batch_size=self.config.batch_size, on_gradient=keep)  # fmt: skip
        for q, v in zip(questions, sum(layer_sq.values()).sqrt().tolist()):
            self._query_norms[(stage, q.prompt, q.answer)] = v
        return self.rename(pre, Stage.PRETRAINED)

    def checkpoint_model(self, checkpoint: Checkpoint) -> nn.Module:
        """The pre-trained model's architecture with a checkpoint's weights."""
        model = copy.deepcopy(self.pretrained)
        model.load_state_dict(checkpoint.state)
        return model.eval()

    def query_norms(self, questions: Sequence[QuestionLike], at: Stage) -> torch.Tensor:
        """‖∇m(q)‖ over the tracked layers, (Q,) float64: those `preconditioned_queries` saw
        (memoised per question), the others one layer at a time."""
        stage = Stage(at)
        keys = [(stage, q.prompt, q.answer) for q in questions]
        todo = [q for q, k in zip(questions, keys) if k not in self._query_norms]
        if todo:
            n = query_gradient_norms(self.stage_model(stage), self.task, self.query_batch(todo),
                                     self.stage_modules(stage), self.config.batch_size)
            for q, v in zip(todo, n.tolist()):
                self._query_norms[(stage, q.prompt, q.answer)] = v
        return torch.tensor([self._query_norms[k] for k in keys], dtype=torch.float64)

    def candidate_norms(self, doc_ids: Sequence[str], at: Stage) -> torch.Tensor:
        """‖∇ℓ(z)‖ over the tracked layers, (N,) float64 (memoised per document)."""
        todo = [d for d in dict.fromkeys(doc_ids) if (at, d) not in self._norms]
        if todo:
            for d, n in zip(todo, self.store(at).norms(self.candidates(todo)).tolist()):
                self._norms[(at, d)] = n
        return torch.tensor([self._norms[(at, d)] for d in doc_ids], dtype=torch.float64)

    def self_influence(self, doc_ids: Sequence[str], at: Stage,
                       settings: ScoreSettings) -> torch.Tensor:  # fmt: skip
        """I(z, z) = ∇ℓ(z)ᵀ (H + λI)⁻¹ ∇ℓ(z) at stage `at` with that stage's damping of
        `settings` (RelatIF's normaliser), (N,) float64, memoised per document."""
        pt = at is Stage.PRETRAINED
        tag = (at, settings.pretrain_damping if pt else settings.finetune_damping,
               settings.float64)  # fmt: skip
        todo = [d for d in dict.fromkeys(doc_ids) if (tag, d) not in self._self_inf]
        if todo:
            inv = (pretrain_preconditioner if pt else finetune_preconditioner)(self, settings)
            vals = self_influence(self.stage_model(at), self.task,
                                  self._batches(self.candidates(todo)), inv,
                                  self.stage_modules(at), progress=False)  # fmt: skip
            self._self_inf.update({(tag, d): float(v) for d, v in zip(todo, vals.tolist())})
        return torch.tensor([self._self_inf[(tag, d)] for d in doc_ids], dtype=torch.float64)

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
            kw = {} if query_rank is None else {"rank": query_rank}
            layers = m.layer_scores(self, questions, doc_ids, s, **kw)
            if by_module:
                return layers * m.layer_mask(self)
            return m.finish(layers, None, m.layer_mask(self))
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

        texts = [self.texts[d] for d in self.doc_ids]
        return EmbeddingIndex.build_or_load(self.cache / "embeddings", self.doc_ids, texts,
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
            "curvature": self.config.curvature.value,
            "alpha": self.settings.alpha,
            "alpha_included_in_scores": self.settings.include_alpha,
            "layers": [m.name for m in self.modules],
            "pretrain_damping": asdict(self.settings.pretrain_damping),
            "corpus_fingerprint": hashlib.sha256("\n".join(self.doc_ids).encode()).hexdigest(),
        }
