"""The checks that refuse a model pair, a tokenizer or a config the kit cannot attribute
with correctly (docs/design.md §Methods; the README's "What the kit refuses" table)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from torch import nn

PROBE = "Where was Ada Lovelace born? London, 1815 — naïve café, 東京."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "vocab.txt", "spiece.model")  # fmt: skip

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
    different one (the way `load_model_pair` compares the two checkpoints' tokenizers).
    When that directory holds no tokenizer files the tokenizer cannot be compared: a warning
    says so and names the fix (save the tokenizer beside the weights). Either way, the
    tokenizer's eos token must be the model's (`check_special_tokens`)."""
    check_special_tokens(model, tokenizer)
    path = Path(str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""))
    if not path.is_dir():
        return
    if not has_tokenizer_files(path):
        warnings.warn(
            f"{path} holds no tokenizer files, so the tokenizer given cannot be checked against "
            "the one the model was trained with (one of the same size with other merges gives "
            "other scores without any error): save the training tokenizer beside the weights "
            f"(tokenizer.save_pretrained({str(path)!r})) and the kit compares them.",
            UserWarning, stacklevel=3)  # fmt: skip
        return
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(path))
    check_same_tokenizer(saved, tokenizer, what=f"the tokenizer given and the one saved in {path}")


def has_tokenizer_files(path: str | Path) -> bool:
    """Whether a checkpoint directory holds a saved tokenizer (TOKENIZER_FILES)."""
    p = Path(path)
    return p.is_dir() and any((p / f).exists() for f in TOKENIZER_FILES)


def _ids(value) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list | tuple):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def check_special_tokens(model: nn.Module, tokenizer) -> None:
    """Warn when the tokenizer's eos token is not one of the model config's eos ids (the kit
    ends every document and answer with the tokenizer's eos, so another id measures another
    token): the two may come from different checkpoints. A warning, not an error: configs
    built with defaults often carry an eos id the model never saw."""
    cfg = getattr(model, "config", None)
    want = _ids(getattr(cfg, "eos_token_id", None))
    got = getattr(tokenizer, "eos_token_id", None)
    if want and got is not None and got not in want:
        warnings.warn(
            f"the tokenizer's eos token {getattr(tokenizer, 'eos_token', None)!r} has id {got}, "
            f"but the model's config says eos_token_id {sorted(want)}: is the tokenizer the one "
            "the model was trained with? Load the tokenizer saved with the checkpoint "
            "(AutoTokenizer.from_pretrained(<checkpoint dir>)), or set "
            "model.config.eos_token_id if the config is wrong.", UserWarning, stacklevel=3)


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
        if model_or_config is not None:
            check_context_fits_positions(model_or_config, override)
        return override, "context_length setting"
    limit = position_limit(model_or_config)
    if limit is not None:
        return limit
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _UNSET_MAX_LENGTH:
        return limit, "tokenizer.model_max_length (the model has no position limit)"
    return ALIBI_DEFAULT_CONTEXT, "default for models without a position limit"


def position_limit(model_or_config) -> tuple[int, str] | None:
    """(positions, config field) of the model's position limit (CONTEXT_FIELDS), or None
    for a model without one (BLOOM's ALiBi)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for name in CONTEXT_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, f"config.{name}"
    return None


LEARNED = re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings|pos_emb\w*|"
                     r"positional_embedding)$")  # fmt: skip
ROPE_KEYS = ("rope_theta", "rotary_emb_base", "rotary_pct", "rope_scaling", "rotary_dim",
             "partial_rotary_factor", "use_rotary_embeddings")  # fmt: skip
ROPE_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
              "phi", "phi3", "gpt_neox", "gptj", "stablelm", "olmo", "olmo2", "cohere", "falcon",
              "starcoder2", "granite", "internlm2", "deepseek_v2", "deepseek_v3", "smollm3"}


def position_kind(model_or_config) -> str:
    """How the model encodes positions: 'learned' (an absolute position table: GPT-2, OPT —
    it has no row past its limit), 'rotary' (RoPE: Llama, GPT-NeoX, … — it computes any
    position, but was trained only up to its limit), 'alibi' (BLOOM: no limit) or 'unknown'."""
    model = model_or_config if hasattr(model_or_config, "named_modules") else None
    if model is not None and any(isinstance(m, nn.Embedding) and LEARNED.search(n)
                                 for n, m in model.named_modules()):  # fmt: skip
        return "learned"
    cfg = getattr(model_or_config, "config", model_or_config)
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    if d.get("alibi") or d.get("model_type") == "bloom":
        return "alibi"
    if d.get("position_embedding_type", "rotary") in ("absolute", "learned"):
        return "learned"
    if any(k in d for k in ROPE_KEYS) or d.get("model_type") in ROPE_TYPES:
        return "rotary"
    if d.get("model_type") in ("gpt2", "opt", "gpt_bigcode", "codegen", "xglm", "bert"):
        return "learned"
    return "unknown"


def check_context_fits_positions(model_or_config, context: int) -> None:
    """A `context_length` beyond the model's position limit: refused for a model with
    learned absolute positions (GPT-2: there is no embedding for position N, the model
    would fail with an IndexError) or of unknown kind; for rotary positions (RoPE, which
    can extrapolate) accepted with a warning that tokens past the limit are read at
    positions the model was never trained on."""
    found = position_limit(model_or_config)
    if found is None or context <= found[0]:
        return
    limit, field = found
    kind = position_kind(model_or_config)
    if kind == "rotary":
        warnings.warn(f"context_length={context} is beyond the model's {limit} trained "
                      f"positions ({field}); its rotary positions (RoPE) can run past them, "
                      "but tokens beyond position "
                      f"{limit} are read at positions it was never trained on, so their "
                      f"scores are extrapolation. Leave context_length unset (or <= {limit}) "
                      "to split documents at the trained length instead.", UserWarning,
                      stacklevel=3)  # fmt: skip
        return
    why = ("its positions are a learned table with no row past that" if kind == "learned"
           else "the kit cannot tell whether its position encoding extrapolates")
    raise ValueError(f"context_length={context} is beyond the model's {limit} positions "
                     f"({field}) and {why}: leave context_length unset (or <= {limit}); long "
                     "documents are split into chunks of the model's context "
                     "(chunk_documents).")


def check_fits_context(n_tokens: int, context: int, what: str, fix: str) -> None:
    """Refuse a sequence longer than the model's context (GPT-2 would raise an IndexError,
    RoPE/ALiBi models would silently read positions they were never trained on). A long
    `what` (a 24,000-character prompt) is cut in the middle."""
    if n_tokens > context:
        if len(what) > 200:
            what = what[:90] + f"…[{len(what):,} characters]…" + what[-60:]
        raise ValueError(f"{what} is {n_tokens} tokens (with eos) but the model's context is "
                         f"{context} positions: {fix}")


def check_question_fits(n_tokens: int, context: int, answer_tokens: int, text: str = "") -> None:
    """Refuse a question whose tokens leave fewer than `answer_tokens` positions for the
    fine-tuned model's greedy answer, saying how much to cut or to pass the answer."""
    if n_tokens + answer_tokens > context:
        from msif_lite.engine.inputs import shorten

        what = f"the question {shorten(text, 100)}" if text else "the question"
        raise ValueError(
            f"{what} is {n_tokens} tokens and the model's context is {context}: that leaves "
            f"{max(context - n_tokens, 0)} positions for the model's own answer, which gets up "
            f"to {answer_tokens}. Shorten the question by at least "
            f"{n_tokens + answer_tokens - context} tokens, or pass the answer to attribute "
            "(a (prompt, answer) pair, or --answer), which needs only its own tokens.")
