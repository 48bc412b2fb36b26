"""The checks that refuse a model pair, a tokenizer or a config the kit cannot attribute
with correctly (docs/design.md §Methods; the README's "What the kit refuses" table)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

PROBE = "Where was Ada Lovelace born? London, 1815 — naïve café, 東京."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")

FUNCTION_KEYS = re.compile(r"(hidden|head|layer|rope|rotary|intermediate|vocab|position|norm|"
                           r"eps|act|alibi|attention|attn|window|partial|scale|bias|embd|dim|"
                           r"^n_|num_|theta|parallel|tie_word)")  # fmt: skip
"""Config fields that change the function a checkpoint computes (dropout aside: eval mode)."""


def function_config(model: nn.Module) -> dict:
    """The config fields of `model` that change its function (FUNCTION_KEYS)."""
    cfg = getattr(model, "config", None)
    d = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    return {k: v for k, v in d.items() if FUNCTION_KEYS.search(k) and "dropout" not in k
            and not k.startswith("output_")}  # fmt: skip


def check_same_architecture(a: nn.Module, b: nn.Module) -> None:
    """Refuse a pre-trained / fine-tuned pair that do not share parameter names and shapes,
    or whose configs differ in a field that changes the function (heads, RoPE θ, …)."""
    sa = {n: tuple(p.shape) for n, p in a.named_parameters()}
    sb = {n: tuple(p.shape) for n, p in b.named_parameters()}
    if sa != sb:
        diff = sorted(set(sa.items()) ^ set(sb.items()))[:4]
        raise ValueError(
            "the pre-trained and fine-tuned models do not share an architecture (first "
            f"differences: {diff}); multi-stage influence needs θ_ft and θ_pt in one "
            "parameter space. Load the fine-tune of this pre-trained model."
        )
    ca, cb = function_config(a), function_config(b)
    diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
    if diff:
        raise ValueError(
            "the pre-trained and fine-tuned configs differ in "
            + ", ".join(f"{k} ({ca.get(k)!r} vs {cb.get(k)!r})" for k in diff[:4])
            + ": the two checkpoints compute different functions. Load the fine-tune of this "
            "pre-trained model (or fix its config.json)."
        )


def _tokenizer_model(tok) -> str | None:
    """The serialised vocabulary + merges of a fast tokenizer, None for a slow one."""
    backend = getattr(tok, "backend_tokenizer", None)
    return None if backend is None else json.dumps(json.loads(backend.to_str())["model"],
                                                   sort_keys=True)


def check_same_tokenizer(tok_a, tok_b, probe: str = PROBE, what: str = "the two checkpoints' "
                         "tokenizers") -> None:  # fmt: skip
    """Refuse two tokenizers that differ in size, in vocabulary/merges (fast tokenizers) or
    in the ids they give `probe`."""
    if len(tok_a) != len(tok_b):
        raise ValueError(f"{what} differ: {len(tok_a)} vs {len(tok_b)} tokens. Use the "
                         "tokenizer saved with the checkpoint (one for both models).")
    ma, mb = _tokenizer_model(tok_a), _tokenizer_model(tok_b)
    ia = tok_a(probe, add_special_tokens=False)["input_ids"]
    ib = tok_b(probe, add_special_tokens=False)["input_ids"]
    if (ma is not None and mb is not None and ma != mb) or ia != ib:
        raise ValueError(f"{what} differ in their vocabulary or merges (ids for {probe!r}: "
                         f"{ia[:8]}… vs {ib[:8]}…): use the tokenizer saved with the checkpoint "
                         "(AutoTokenizer.from_pretrained(<checkpoint dir>)).")


def check_checkpoint_tokenizer(model: nn.Module, tokenizer) -> None:
    """When `model` was loaded from a local directory that holds a tokenizer, refuse a
    different one (the way `load_model_pair` compares the two checkpoints' tokenizers)."""
    path = Path(str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""))
    if not (path.is_dir() and any((path / f).exists() for f in TOKENIZER_FILES)):
        return
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(path))
    check_same_tokenizer(saved, tokenizer, what=f"the tokenizer given and the one saved in {path}")


def check_tokenizer_fits(model: nn.Module, tokenizer) -> None:
    """Refuse a tokenizer with more tokens than the model's embedding has rows."""
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab}: "
            "the tokenizer does not match the model. Load the tokenizer saved with the "
            "checkpoint (AutoTokenizer.from_pretrained(<checkpoint dir>))."
        )


CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                  "seq_length")  # fmt: skip
"""Config fields that bound the positions a model can embed (learned or rotary tables)."""
ALIBI_DEFAULT_CONTEXT = 2048
"""Context used for a model without a position limit (BLOOM's ALiBi) when the tokenizer
names none either: the sequence length BLOOM was pre-trained with."""
_UNSET_MAX_LENGTH = 10**9  # transformers' model_max_length when a tokenizer names none (1e30)


def context_length(model_or_config, tokenizer=None, override: int | None = None
                   ) -> tuple[int, str]:  # fmt: skip
    """(positions, where they come from) of the longest sequence the model can read.

    Order: `override` (AttributionConfig.context_length); the config's position limit
    (CONTEXT_FIELDS: max_position_embeddings for Llama / GPT-NeoX, n_positions for GPT-2);
    for models without one (BLOOM's ALiBi) the tokenizer's model_max_length when it sets one,
    else ALIBI_DEFAULT_CONTEXT."""
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int) or override < 2:
            raise ValueError(f"context_length must be an integer >= 2, got {override!r}")
        return override, "context_length setting"
    cfg = getattr(model_or_config, "config", model_or_config)
    for name in CONTEXT_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, f"config.{name}"
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _UNSET_MAX_LENGTH:
        return limit, "tokenizer.model_max_length (the model has no position limit)"
    return ALIBI_DEFAULT_CONTEXT, "default for models without a position limit"


def check_fits_context(n_tokens: int, context: int, what: str, fix: str) -> None:
    """Refuse a sequence longer than the model's context (GPT-2 would raise an IndexError,
    RoPE/ALiBi models would silently read positions they were never trained on)."""
    if n_tokens > context:
        raise ValueError(f"{what} is {n_tokens} tokens (with eos) but the model's context is "
                         f"{context} positions: {fix}")
