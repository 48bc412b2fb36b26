"""The options a memory plan depends on, and the batches they describe.

The options the runtime also has are not restated here: their defaults and help text are read
from the runtime configs' own fields (`FactorConfig` in engine/factors.py, `AttributionConfig`
in attribution/config.py; `_from` records which field each option is), and
`MemoryOptions.from_configs` fills them from the configs a run will use. What only a plan
needs (queries, candidates, partitions, the corpus's lengths) is defined here.

`lengths` (the token length of each document, in the order the documents are batched) makes
the plan use the batches the fit and the gradient store will actually form: consecutive
chunks of `batch_size` documents in the given order, each padded to its longest document
(`Attributor._batches` / `GradientStore`, collated by `make_token_batch`), the fit stopping
after the batch that brings the real-token count to `fit_tokens` (engine/fit.py `_batches`).
Without `lengths`, the corpus is `n_candidates` documents of `seq_len` tokens each (every
batch as long as the longest document: the plan before lengths, an upper bound).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from msif_lite.attribution.config import AttributionConfig
from msif_lite.config import fields_help, help_field
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.inputs import length_order
from msif_lite.engine.layers import TrackedModule

_CONFIGS = {"factors": FactorConfig, "attribution": AttributionConfig}




def _from(config: str, name: str):
    """An option that is the runtime config's field `name`: its default and help, and where
    `from_configs` reads it."""
    f = {f.name: f for f in dataclasses.fields(_CONFIGS[config])}[name]
    return field(default=f.default, metadata={
        "help": f"{_CONFIGS[config].__name__}.{name}: {f.metadata.get('help', '')}",
        "source": (config, name)})  # fmt: skip


class BatchShape(NamedTuple):
    """One batch the kit forms: B sequences padded to T tokens, `tokens` of them real."""

    b: int
    t: int
    tokens: int

    @property
    def padded(self) -> bool:
        return self.tokens < self.b * self.t


def batch_shapes(lengths: Sequence[int], batch_size: int,
                 max_tokens: int | None = None) -> list[BatchShape]:  # fmt: skip
    """The batches of `lengths` in the given order: chunks of `batch_size`, each padded to its
    longest; with `max_tokens`, none after the batch that brings the real tokens to it."""
    out, seen = [], 0
    for i in range(0, len(lengths), batch_size):
        if max_tokens is not None and seen >= max_tokens:
            break
        chunk = lengths[i : i + batch_size]
        out.append(BatchShape(len(chunk), max(chunk), sum(chunk)))
        seen += sum(chunk)
    return out


@dataclass(frozen=True)
class MemoryOptions:
    """The options a memory plan depends on (frozen, validated; `help()` lists them)."""

    include: str | tuple[str, ...] | None = _from("factors", "include")
    exclude: str | tuple[str, ...] | None = _from("factors", "exclude")
    batch_size: int = _from("attribution", "batch_size")
    batch_order: Literal["given", "length"] = _from("attribution", "batch_order")
    fit_tokens: int | None = _from("factors", "max_tokens")
    autocast_dtype: Literal["bfloat16", "float16"] | None = _from("factors", "autocast_dtype")
    factor_dtype: Literal["float32", "float64", "auto"] = _from("factors", "factor_dtype")
    offload: bool = _from("factors", "offload")
    eigh_dtype: Literal["float64", "float32"] = _from("factors", "eigh_dtype")
    eigh_workers: int | None = _from("factors", "eigh_workers")
    cache_activations_mb: float = _from("factors", "cache_activations_mb")
    cache_dtype: Literal["bfloat16"] | None = _from("factors", "cache_dtype")
    gradient_cache_gb: float = _from("attribution", "gradient_cache_gb")
    chunk_mb: float = _from("attribution", "gradient_chunk_mb")
    gradient_storage: Literal["auto", "dense", "tokens"] = _from("attribution",
                                                                "gradient_storage")
    lengths: tuple[int, ...] | None = help_field(
        "token length of each document in the order they are batched (the fit's corpus, whose "
        "first n_candidates are the candidates); None: n_candidates documents of seq_len", None)
    seq_len: int = help_field("tokens per document when `lengths` is None (the longest)", 512)
    partitions: int = help_field("fit the layers in this many groups, one after another", 1)
    n_queries: int = help_field("queries scored at once", 16)
    query_len: int = help_field("tokens per query", 64)
    query_rank: int | None = help_field(
        "rank r of low-rank preconditioned queries (None: full)", None)
    stages: int = help_field("EK-FACs held while scoring: 2 multi-stage, 1 single-stage", 2)
    padded: bool = help_field(
        "without `lengths`: batches contain padding (Ds copied once more)", False)
    n_candidates: int = help_field("candidate documents scored (cached scoring, disk)", 1000)
    projection: tuple[int, int] | None = help_field(
        "(k_in, k_out) of projected candidate gradients", None)

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "partitions", "n_queries", "query_len",
                     "n_candidates"):  # fmt: skip
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"MemoryOptions.{name} must be an int >= 1")
        if self.fit_tokens is not None and not (isinstance(self.fit_tokens, int)
                                                and self.fit_tokens >= 1):  # fmt: skip
            raise ValueError("MemoryOptions.fit_tokens must be None or an int >= 1")
        if self.lengths is not None:
            lengths = tuple(self.lengths)
            if not lengths or not all(isinstance(n, int) and n >= 1 for n in lengths):
                raise ValueError("MemoryOptions.lengths must be None or token counts >= 1")
            object.__setattr__(self, "lengths", lengths)
        if self.query_rank is not None and self.query_rank < 1:
            raise ValueError("MemoryOptions.query_rank must be None or >= 1")
        if self.stages not in (1, 2):
            raise ValueError("MemoryOptions.stages must be 1 or 2")
        if self.factor_dtype not in ("float32", "float64", "auto"):
            raise ValueError("MemoryOptions.factor_dtype must be 'float32', 'float64' or 'auto'")
        if not (self.gradient_cache_gb >= 0 and self.chunk_mb > 0):
            raise ValueError("MemoryOptions.gradient_cache_gb must be >= 0 and chunk_mb > 0")
        if self.gradient_storage not in ("auto", "dense", "tokens"):
            raise ValueError("MemoryOptions.gradient_storage must be 'auto', 'dense' or 'tokens'")
        if self.projection is not None and not (len(self.projection) == 2
                                                and min(self.projection) >= 1):  # fmt: skip
            raise ValueError("MemoryOptions.projection must be None or (k_in, k_out) >= 1")

    @classmethod
    def help(cls) -> str:
        return fields_help(cls)

    @classmethod
    def from_configs(cls, factors: FactorConfig | None = None,
                     attribution: AttributionConfig | None = None, **plan) -> MemoryOptions:
        """The options of a run with these configs (`attribution.factors` when `factors` is
        None; defaults for a config not given), plus the plan-only options in `plan` (e.g.
        lengths=[len(ids) for ids in docs], n_queries=16)."""
        attribution = attribution or AttributionConfig()
        configs = {"factors": factors or attribution.factors, "attribution": attribution}
        kw = {f.name: getattr(configs[f.metadata["source"][0]], f.metadata["source"][1])
              for f in dataclasses.fields(cls) if "source" in f.metadata}  # fmt: skip
        clash = set(kw) & set(plan)
        if clash:
            raise TypeError(f"{sorted(clash)} come from the configs: set them there")
        return cls(**kw, **plan)

    def factor_dtype_for(self, weight_dtype) -> str:
        """'float32' or 'float64': 'auto' as `FactorConfig.dtype_for` resolves it."""
        if self.factor_dtype != "auto":
            return self.factor_dtype
        return "float64" if str(weight_dtype) == "torch.float64" else "float32"

    # ---------------------------------------------------------------- the batches
    def fit_batches(self) -> list[BatchShape]:
        """The batches of one factor pass as the fit orders them (`attribution.stage.
        fit_order`): the whole corpus shortest to longest (batch_order 'length'), else in the
        given order, and with the token budget `fit_tokens` a prefix in the given order.
        Without `lengths`, with a budget: as many full batches of seq_len as it takes."""
        if self.lengths is None and self.fit_tokens is not None:
            n = max(1, math.ceil(self.fit_tokens / (self.batch_size * self.seq_len)))
            t = self.seq_len
            return [BatchShape(self.batch_size, t, self.batch_size * t)] * n
        lengths = self.lengths or (self.seq_len,) * self.n_candidates
        if self.fit_tokens is None and self.batch_order == "length":
            lengths = [lengths[i] for i in length_order(lengths)]
        return batch_shapes(lengths, self.batch_size, self.fit_tokens)

    def candidate_lengths(self) -> tuple[int, ...]:
        """The candidates' lengths: the first n_candidates documents, in order."""
        return (self.lengths or (self.seq_len,) * self.n_candidates)[: self.n_candidates]

    def candidate_batches(self) -> list[BatchShape]:
        """The candidates' batches (scored streamed, or all computed at once), shortest first
        with batch_order 'length' (as `GradientStore` batches them)."""
        lengths = self.candidate_lengths()
        if self.batch_order == "length":
            lengths = tuple(lengths[i] for i in length_order(lengths))
        return batch_shapes(lengths, self.batch_size)


def _groups(layers: Sequence[tuple[str, int, int]], k: int) -> list[list[tuple[str, int, int]]]:
    """Split layers (in order) into ≤ k contiguous groups of similar factor size."""
    k = min(k, len(layers))
    size = [d * d + o * o for _, d, o in layers]
    target, out, cur, acc = sum(size) / k, [], [], 0.0
    for lay, s in zip(layers, size):
        if cur and acc + s / 2 > target * (len(out) + 1) and len(out) < k - 1:
            out.append(cur)
            cur = []
        cur.append(lay)
        acc += s
    return out + [cur]


def partition(modules: Sequence[TrackedModule], k: int) -> list[list[TrackedModule]]:
    """The groups `MemoryOptions.partitions` = k describes (for `fit_partitioned`)."""
    by = {m.name: m for m in modules}
    return [[by[n] for n, _, _ in g] for g in _groups([(m.name, m.d_in, m.out_features)
                                                       for m in modules], k)]  # fmt: skip
