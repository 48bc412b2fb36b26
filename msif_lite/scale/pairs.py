"""A pre-trained / fine-tuned Hugging Face model pair and the text to fit factors on.

Notebook 09 (BLOOM-560m → BLOOMZ-560m). `load_model_pair` goes through the ordinary
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` path, so a hub id
works wherever the user has the model cached (or network), and a local directory always
does; it then checks that the two models can form a multi-stage pair:

- same architecture: the same config `model_type` and the same parameter names and shapes
  (θ_ft and θ_pt must live in one parameter space);
- same tokenizer: the fine-tuned checkpoint's tokenizer (if it ships one) has the same
  vocabulary size and gives the same token ids for `PROBE` as the pre-trained one, and the
  model's embedding has a row for every token.

Reading a user's data is `scale.corpus` (`read_documents`, `read_texts`, `read_pairs`,
re-exported here), and

- `chunk_documents`: the long-document policy. A document longer than the model's context
  (`checks.context_length`) is cut, at token boundaries, into consecutive non-overlapping
  chunks of at most context − 1 tokens (each chunk + eos fits), ids `doc#1`, `doc#2`, …;
  each chunk is then a candidate of its own (what pre-training on packed or truncated
  sequences saw). Documents that fit keep their id. The Attributor refuses a longer one.

`world_texts` is the default stand-in: the kit's own world.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from msif_lite.attribution.checks import (
    check_checkpoint_tokenizer,
    check_same_architecture,
    check_same_tokenizer,
    check_tokenizer_fits,
    has_tokenizer_files,
)
from msif_lite.engine.layers import check_finite_parameters
from msif_lite.scale.corpus import (  # noqa: F401 (the public readers, re-exported)
    budget,
    count_tokens,
    read_documents,
    read_pairs,
    read_texts,
)

DEFAULT_PRETRAIN_TOKENS = 1_000_000
"""Default token budget of the pre-training text for H_pt (the issue's 1M-token target)."""
DEFAULT_FINETUNE_TOKENS = 200_000
"""Default token budget of the fine-tuning text for H_ft."""


@dataclass
class ModelPair:
    """θ_pt and θ_ft with their (shared) tokenizer; `names` are what was asked for."""

    pretrained: nn.Module
    finetuned: nn.Module
    tokenizer: object
    names: tuple[str, str]

    def describe(self) -> str:
        """One line saying which models actually ran (for notebook outputs)."""
        c = self.pretrained.config
        n = sum(p.numel() for p in self.pretrained.parameters())
        return (f"pre-trained: {_short(self.names[0])} → fine-tuned: {_short(self.names[1])} "
                f"({c.model_type}, {n / 1e6:.3g}M parameters, vocabulary {len(self.tokenizer)})")


def _short(name: str) -> str:
    """A hub id as is; a local directory by its last two parts (no absolute paths)."""
    p = Path(name)
    return name if not p.exists() else "/".join(p.parts[-2:])


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _load(kind: str, name: str, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loader = AutoModelForCausalLM if kind == "model" else AutoTokenizer
    try:
        return loader.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        if Path(name).exists():
            raise
        hint = ("HF_HUB_OFFLINE=1 is set, so only the local Hugging Face cache is searched"
                if _offline() else "the hub could not be reached or has no such repository")
        raise FileNotFoundError(
            f"could not load the {kind} {name!r}: {hint}. Download it once where there is "
            f"network (huggingface-cli download {name}), or pass a local directory written "
            f"by save_pretrained (e.g. MSIF_BLOOM_PT / MSIF_BLOOM_FT in Notebook 09). "
            f"[{type(e).__name__}: {str(e).splitlines()[0][:200]}]") from e


def _tokenizer_source(names: tuple[str, str], tokenizer) -> str | None:
    """Where to load the tokenizer from when none is given: the pre-trained checkpoint, or
    the fine-tuned one when only it is a local directory with tokenizer files; refuses two
    local directories without any (transformers would fail with "Couldn't instantiate the
    backend tokenizer … sentencepiece or tiktoken")."""
    if tokenizer is not None:
        return None
    local = [Path(n).is_dir() for n in names]
    files = [has_tokenizer_files(n) for n in names]
    if files[0] or not local[0]:
        return names[0]
    if files[1] or not local[1]:
        return names[1]
    raise FileNotFoundError(
        f"neither {names[0]} nor {names[1]} holds tokenizer files (tokenizer.json, "
        "tokenizer_config.json, vocab.json/merges.txt or tokenizer.model): save the tokenizer "
        "the models were trained with beside the weights (tokenizer.save_pretrained(dir)), or "
        "pass it: load_model_pair(…, tokenizer=<the tokenizer or its directory>)")


def load_model_pair(
    pretrained_id_or_dir: str | os.PathLike,
    finetuned_id_or_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    tokenizer=None,
) -> ModelPair:
    """Load θ_pt, θ_ft (`AutoModelForCausalLM.from_pretrained(..., dtype=dtype)`, eval mode)
    and the tokenizer (from the pre-trained checkpoint, else the fine-tuned one), and check
    they form a pair (see the module docstring). `tokenizer` (a tokenizer, or a directory /
    hub id to load one from) is used instead and compared with every tokenizer saved beside
    the weights; when neither folder holds one it cannot be compared, and a warning says so.
    Raises FileNotFoundError (offline, not cached; no tokenizer files anywhere) or
    ValueError."""
    names = (str(pretrained_id_or_dir), str(finetuned_id_or_dir))
    pt = _load("model", names[0], dtype=dtype).eval()
    ft = _load("model", names[1], dtype=dtype).eval()
    if pt.config.model_type != ft.config.model_type:
        raise ValueError(f"the models have different architectures: {pt.config.model_type!r} "
                         f"vs {ft.config.model_type!r}. Load the fine-tune of this model.")
    check_same_architecture(pt, ft)
    check_finite_parameters(pt, names[0])
    check_finite_parameters(ft, names[1])
    source = _tokenizer_source(names, tokenizer)
    if tokenizer is None:
        tok = _load("tokenizer", source)
    elif isinstance(tokenizer, str | os.PathLike):
        tok = _load("tokenizer", str(tokenizer))
    else:
        tok = tokenizer
    for name in names:
        if Path(name).is_dir() and not has_tokenizer_files(name):
            continue  # nothing saved there to compare with
        if name == source:
            continue
        try:
            saved = _load("tokenizer", name)
        except (FileNotFoundError, OSError, ValueError):
            continue  # a fine-tune without its own tokenizer files uses the base one
        what = ("the two checkpoints' tokenizers" if tokenizer is None else
                f"the tokenizer given and the one saved in {name}")  # fmt: skip
        check_same_tokenizer(saved, tok, what=what)
    check_tokenizer_fits(pt, tok)
    if tokenizer is not None and not any(has_tokenizer_files(n) for n in names):
        check_checkpoint_tokenizer(pt, tok)  # warns: nothing to compare the given one with
    if device is not None:
        pt, ft = pt.to(device), ft.to(device)
    return ModelPair(pt, ft, tok, names)


@dataclass(frozen=True)
class ChunkReport:
    """What `chunk_documents` did: how many documents were split into how many chunks."""

    context: int
    n_documents: int
    n_split: int
    n_chunks: int
    example: str = ""  # e.g. "long → long#1 … long#4"

    def __str__(self) -> str:
        if not self.n_split:
            return f"all {self.n_documents} documents fit the context of {self.context} tokens"
        return (f"{self.n_split} of {self.n_documents} documents longer than {self.context} "
                f"tokens were split into {self.n_chunks} chunks ({self.example})")


def _offset_token_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span of every token of `text` (fast tokenizers' offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("chunk_documents cuts at token boundaries and needs a fast tokenizer "
                         "(character offsets): load it with AutoTokenizer.from_pretrained(dir, "
                         "use_fast=True)")  # fmt: skip
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return [tuple(o) for o in enc["offset_mapping"]]


def _split(tokenizer, text: str, size: int) -> list[str]:
    """`text` cut at token boundaries into pieces that each encode to at most `size` tokens."""
    spans = _offset_token_spans(tokenizer, text)
    pieces, i = [], 0
    while i < len(spans):
        j = min(i + size, len(spans))
        while True:
            end = spans[j][0] if j < len(spans) else len(text)
            piece = text[spans[i][0]:end].strip()
            n = count_tokens(piece, tokenizer) - 1
            if n <= size or j == i + 1:
                break
            j = max(i + 1, j - (n - size))  # re-encoding a cut piece can add a token
        if piece:
            pieces.append(piece)
        i = j
    return pieces


def chunk_documents(documents: Sequence[tuple[str, str]], tokenizer, context: int
                    ) -> tuple[list[tuple[str, str]], ChunkReport]:  # fmt: skip
    """Split every document whose tokens + eos exceed `context` (the model's positions,
    `checks.context_length(model, tokenizer)`) into consecutive chunks of at most
    context − 1 tokens cut at token boundaries, ids `<id>#1`, `<id>#2`, …, in order;
    documents that fit keep their id (see the module docstring for the policy)."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an integer >= 2 tokens, got {context!r}")
    out, n_split, n_chunks, example = [], 0, 0, ""
    ids = {d for d, _ in documents}
    for doc_id, text in documents:
        if count_tokens(text, tokenizer) <= context:
            out.append((doc_id, text))
            continue
        pieces = _split(tokenizer, text, context - 1)
        clash = [f"{doc_id}#{n}" for n in range(1, len(pieces) + 1) if f"{doc_id}#{n}" in ids]
        if clash:
            raise ValueError(f"cannot name the chunks of {doc_id!r}: the id {clash[0]!r} is "
                             "already a document's; rename it")  # fmt: skip
        out.extend((f"{doc_id}#{n}", t) for n, t in enumerate(pieces, 1))
        n_split, n_chunks = n_split + 1, n_chunks + len(pieces)
        example = example or f"{doc_id} → {doc_id}#1 … {doc_id}#{len(pieces)}"
    return out, ChunkReport(context, len(documents), n_split, n_chunks, example)


def recorded_alpha(finetuned_dir: str | os.PathLike) -> float | None:
    """The proximity strength α a fine-tuned checkpoint records, if it is one of the kit's
    (`msif_meta.json` of the training pipeline, `msif_standin.json` of `save_standin`);
    None for any other checkpoint (a hub id, a user's own fine-tune)."""
    d = Path(finetuned_dir)
    for name in ("msif_meta.json", "msif_standin.json"):
        f = d / name
        if f.is_file():
            alpha = json.loads(f.read_text()).get("alpha")
            if alpha is not None:
                return float(alpha)
    return None


def world_texts(preset: str = "ci-fast", seed: int = 0):
    """The default stand-in data: (pre-training documents [(doc_id, text)], fine-tuning
    (prompt, answer) pairs, queries) of the kit's world (msif_lite.world.generate)."""
    from msif_lite.world.generate import make_world

    w = make_world(preset, seed=seed)
    docs = [(d.doc_id, d.text) for d in w.documents]
    return w, docs, [(q.prompt, q.answer) for q in w.finetune_qa]


STANDIN_ALPHA = 0.01
"""Proximity strength α of the stand-in's fine-tune (recorded in finetuned/msif_standin.json)."""


def save_standin(out_dir: str | os.PathLike, world=None, *, hidden: int = 64, n_layers: int = 2,
                 n_heads: int = 4, pretrain_steps: int = 60, finetune_steps: int = 30,
                 seed: int = 0) -> tuple[Path, Path]:
    """A tiny BLOOM pair standing in for BLOOM-560m → BLOOMZ-560m when those are not on disk:
    a byte-level BPE tokenizer trained on the kit's world, a BLOOM of the given shape
    pre-trained for `pretrain_steps` on the world's documents and fine-tuned for
    `finetune_steps` on its QA pairs with the proximity term (α = STANDIN_ALPHA); both are
    written with `save_pretrained` (model + tokenizer) to out_dir/{pretrained,finetuned}, so
    `load_model_pair` loads them exactly as it loads the real checkpoints."""
    from msif_lite.world.lm import ModelPreset, build_model, train_tokenizer
    from msif_lite.world.training import TrainConfig, finetune, pretrain, snapshot_params

    if world is None:
        from msif_lite.world.generate import make_world

        world = make_world("ci-fast", seed=seed)
    out = Path(out_dir)
    tok = train_tokenizer(world)
    preset = ModelPreset("bloom-standin", "bloom", n_layers, hidden, n_heads, 4 * hidden)
    model = build_model(preset, len(tok), seed, tok)
    pretrain(model, tok, world, TrainConfig(steps=pretrain_steps, batch_size=16, lr=3e-3,
                                            warmup=5, seed=seed, progress=False))  # fmt: skip
    model.save_pretrained(out / "pretrained")
    tok.save_pretrained(out / "pretrained")
    ref = snapshot_params(model)
    finetune(model, ref, tok, world.finetune_qa, TrainConfig(
        steps=finetune_steps, batch_size=16, lr=1e-3, warmup=3, seed=seed, progress=False),
        STANDIN_ALPHA)
    model.save_pretrained(out / "finetuned")
    tok.save_pretrained(out / "finetuned")
    meta = {"alpha": STANDIN_ALPHA, "world": world.preset, "seed": seed,
            "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps}
    (out / "finetuned" / "msif_standin.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out / "pretrained", out / "finetuned"
