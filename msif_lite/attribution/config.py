"""`AttributionConfig`: the settings every method shares (notebook 07). Each field carries
its help text (`field_help`); the CLI builds its options from it and the memory planner
reads its defaults from it, so each setting is defined here once."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from msif_lite.attribution.checks import context_length
from msif_lite.attribution.settings import ScoreSettings, as_damping
from msif_lite.config import fields_help, help_field
from msif_lite.engine.curvature import curvature as lookup_curvature
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.gradstore import STORAGE
from msif_lite.engine.ihvp import Damping
from msif_lite.engine.multistage import check_alpha
from msif_lite.engine.prompts import DEFAULT_TEMPLATE, PromptTemplate
from msif_lite.engine.tasks import LanguageModelingTask, Normalisation, Task


@dataclass(frozen=True)
class AttributionConfig:
    """Settings shared by every method. `AttributionConfig.help()` prints each field."""

    factors: FactorConfig = help_field(
        "the curvature fit (Fisher type, layers tracked, token budget, autocast, offload): one "
        "FactorConfig for both stages", FactorConfig())
    curvature: str = help_field(
        "which approximation of G, a name in engine.curvature.CURVATURES ('ekfac', 'kfac', "
        "'identity', 'diagonal', …)", "ekfac", cli="--curvature")
    alpha: float | None = help_field(
        "proximity α of the fine-tune; None = read from the fine-tuned checkpoint "
        "(msif_meta.json)", None, cli="--alpha")
    pretrain_damping: Damping = help_field(
        "λ_pt of (H_pt + λ_pt I): a number, or Damping(); default 0.1·mean eigenvalue",
        Damping())
    finetune_damping: Damping = help_field(
        "λ_ft of (H_ft + λ_ft I) in the finetune_only method (the multi-stage method damps "
        "H_ft with exactly α)", Damping())
    include_alpha: bool = help_field("multi_stage reports α·(…) = −dm/dε (True) or (…)", True)
    finetune_loss: Normalisation = help_field(
        "how the fine-tuning loss averaged its pairs: 'token_mean' (the Hugging Face loss; the "
        "kit's fine-tune) makes H_ft = G_ft / T̄, T̄ = mean answer tokens per pair, so that "
        "(H_ft + αI) uses the α of the objective; 'example_mean' uses G_ft as fitted",
        Normalisation.TOKEN_MEAN)
    task: Task = field(default_factory=LanguageModelingTask, metadata={"help": (
        "the objective ℓ(z) and measurement m(q) (engine.tasks): a causal LM's next-token "
        "loss, m = −log p(answer | prompt)")})
    batch_size: int = help_field("sequences per forward/backward", 16, cli="--batch-size")
    batch_order: Literal["given", "length"] = help_field(
        "how a stage's fit data and a candidate set are batched: 'given' in the order given "
        "(the committed benchmarks' setting), 'length' shortest to longest (little padding; "
        "~1/3 fewer positions on the real corpus; the sampled labels follow the order, so the "
        "factors are another draw); a fit with a token or batch budget keeps the given order",
        "given", cli="--batch-order")
    cache_dir: str = help_field("where factors and candidate gradients go", ".cache/msif",
                           cli="--cache-dir")
    progress: bool = help_field("tqdm progress bars (every stage)", True)
    template: PromptTemplate = help_field(
        "how a question becomes a prompt and prompt and answer are joined: prefix + question "
        "+ suffix + joiner + answer + eos, for the fine-tuning pairs (H_ft) and the queries "
        "alike (engine.prompts)", DEFAULT_TEMPLATE)
    context_length: int | None = help_field(
        "longest sequence in tokens; None = the model's position limit (checks."
        "context_length). Longer documents are refused: split them with scale.pairs."
        "chunk_documents", None, cli="--context-length")
    gradient_cache_gb: float = help_field(
        "disk budget of a candidate set's cached gradients; above it they are streamed, "
        "never written", 20.0, cli="--gradient-cache-gb")
    trim_allocator: bool = help_field(
        "make glibc return freed tensors' memory to the system at once (mallopt: mmap "
        "threshold 64 KiB, `msif_lite.config.trim_allocator`) when the Attributor is built, "
        "so memory comes back down between questions and the memory plan "
        "(scale.memory.predict) holds", True)
    gradient_storage: Literal["auto", "dense", "tokens"] = help_field(
        "how candidate gradients are stored: 'dense' (DW, o·d_in numbers per layer), 'tokens' "
        "(the captured (ā, Ds) on the document's T real tokens, T·(o + d_in) per layer: exact, "
        "DW = Dsᵀ ā) or 'auto' (per document, the smaller; GradientStore)", "auto",
        cli="--gradient-storage")
    gradient_chunk_mb: float = help_field(
        "stored candidate gradients held in memory at once while scoring (GradientStore; "
        "lower it to lower the scoring peak, scale.memory's chunk_mb)", 1024.0,
        cli="--gradient-chunk-mb")

    def __post_init__(self) -> None:
        if self.batch_order not in ("given", "length"):
            raise ValueError("AttributionConfig.batch_order must be 'given' or 'length', got "
                             f"{self.batch_order!r}")  # fmt: skip
        if not isinstance(self.factors, FactorConfig):
            raise TypeError("AttributionConfig.factors must be a FactorConfig, e.g. "
                            "FactorConfig(include='mlp')")  # fmt: skip
        object.__setattr__(self, "curvature", lookup_curvature(self.curvature).name)
        if self.alpha is not None:
            object.__setattr__(self, "alpha", check_alpha(self.alpha, "AttributionConfig.alpha"))
        for name in ("pretrain_damping", "finetune_damping"):
            object.__setattr__(self, name, as_damping(getattr(self, name),
                                                      f"AttributionConfig.{name}"))
        object.__setattr__(self, "finetune_loss", Normalisation(self.finetune_loss))
        if not isinstance(self.template, PromptTemplate):
            raise TypeError("AttributionConfig.template must be a PromptTemplate, e.g. "
                            "PromptTemplate(prefix='Question: ', suffix='\\nAnswer:', joiner=' ')")
        if self.context_length is not None:
            context_length(None, None, self.context_length)  # validates it
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:  # fmt: skip
            raise ValueError(f"AttributionConfig.batch_size must be an int >= 1, got "
                             f"{self.batch_size!r}")  # fmt: skip
        if self.gradient_storage not in STORAGE:
            raise ValueError(f"AttributionConfig.gradient_storage must be one of "
                             f"{', '.join(map(repr, STORAGE))}, got {self.gradient_storage!r}")
        if not self.gradient_chunk_mb > 0:
            raise ValueError("AttributionConfig.gradient_chunk_mb must be > 0 (MB of stored "
                             f"gradients held at once), got {self.gradient_chunk_mb!r}")

    @classmethod
    def help(cls) -> str:
        """One line per field: its name and what it does."""
        return fields_help(cls)

    def factor_config(self) -> FactorConfig:
        """The FactorConfig both stages are fitted with (progress follows this config)."""
        return replace(self.factors, progress=self.progress)

    def with_alpha(self, alpha: float | None) -> AttributionConfig:
        """This config with α resolved: `alpha` (e.g. from the checkpoint or an argument)
        fills a config without one; two different values are refused."""
        if self.alpha is not None and alpha is not None and self.alpha != alpha:
            raise ValueError(
                f"two values of α: AttributionConfig(alpha={self.alpha:g}) and "
                f"alpha={alpha:g}. Give α in one place only."
            )
        a = self.alpha if self.alpha is not None else alpha
        if a is None:
            raise ValueError(
                "α is unknown: pass alpha=<the fine-tune's proximity strength> or set "
                "AttributionConfig.alpha (msif-lite checkpoints store it in msif_meta.json)."
            )
        return replace(self, alpha=a)

    def score_settings(self) -> ScoreSettings:
        """The default per-call settings (α must be resolved: `with_alpha`)."""
        return ScoreSettings(self.alpha, self.pretrain_damping, self.finetune_damping,
                             self.include_alpha)  # fmt: skip
